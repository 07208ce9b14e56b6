//! Amounts in minor units and the currency exponents Stripe uses for them.
//!
//! Stripe sends every amount as an integer in the currency's smallest unit:
//! 1099 USD is $10.99, 1099 JPY is ¥1099, 1099 KWD is 1.099 KD. Showing an
//! amount needs the exponent, which is a property of the currency.

use serde::Serialize;

/// Currencies Stripe treats as having no minor unit.
const ZERO_DECIMAL: &[&str] = &[
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
    "xaf", "xof", "xpf",
];

/// Currencies Stripe treats as having three decimals.
const THREE_DECIMAL: &[&str] = &["bhd", "jod", "kwd", "omr", "tnd"];

/// The number of decimals in `currency`'s minor unit, as Stripe counts them.
pub fn exponent(currency: &str) -> u8 {
    let currency = currency.to_ascii_lowercase();
    if ZERO_DECIMAL.contains(&currency.as_str()) {
        0
    } else if THREE_DECIMAL.contains(&currency.as_str()) {
        3
    } else {
        2
    }
}

/// An amount as the API shows it: the integer Stripe uses, and the decimal
/// text a person reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Money {
    pub minor_units: i64,
    pub currency: String,
    pub exponent: u8,
    pub decimal: String,
}

impl Money {
    pub fn new(minor_units: i64, currency: &str, exponent: u8) -> Self {
        Self {
            minor_units,
            currency: currency.to_ascii_lowercase(),
            exponent,
            decimal: decimal(minor_units, exponent),
        }
    }
}

/// Formats minor units with integer arithmetic only: no float ever touches money.
pub fn decimal(minor_units: i64, exponent: u8) -> String {
    let sign = if minor_units < 0 { "-" } else { "" };
    let digits = minor_units.unsigned_abs().to_string();
    let exponent = usize::from(exponent);
    if exponent == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = exponent + 1);
    let (whole, fraction) = padded.split_at(padded.len() - exponent);
    format!("{sign}{whole}.{fraction}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponents_follow_stripe() {
        assert_eq!(exponent("usd"), 2);
        assert_eq!(exponent("JPY"), 0);
        assert_eq!(exponent("kwd"), 3);
        assert_eq!(exponent("eur"), 2);
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(decimal(1099, 2), "10.99");
        assert_eq!(decimal(5, 2), "0.05");
        assert_eq!(decimal(1099, 0), "1099");
        assert_eq!(decimal(1099, 3), "1.099");
        assert_eq!(decimal(7, 3), "0.007");
        assert_eq!(decimal(-250, 2), "-2.50");
        assert_eq!(decimal(i64::MIN, 2), "-92233720368547758.08");
    }
}
