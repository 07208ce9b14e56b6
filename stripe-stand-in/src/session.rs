//! Checkout Session objects: Stripe's own fixture with the fields a create request decides.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Map, Value, json};

use crate::params::{CreateParams, LineItem};

/// Copied verbatim from shared/fixtures/stripe-objects; see fixtures/SOURCES.md.
const FIXTURE: &str = include_str!("../fixtures/checkout_session.json");

/// The stand-in knows no prices, so every price costs the same number of
/// minor units: 1000 (10.00 USD, 1000 JPY, 1.000 KWD).
pub const UNIT_AMOUNT: u64 = 1000;

/// A price id whose last `_` segment is three lowercase letters is priced in
/// that currency (`price_test_jpy`); every other price is in USD. This lets
/// tests exercise zero- and three-decimal currencies.
pub fn currency_of(price: &str) -> String {
    match price.rsplit_once('_') {
        Some((_, code)) if code.len() == 3 && code.bytes().all(|b| b.is_ascii_lowercase()) => {
            code.to_owned()
        }
        _ => "usd".to_owned(),
    }
}

/// Real Checkout Session ids are `cs_test_` followed by 58 alphanumerics.
const ID_RANDOM_LEN: usize = 58;

/// Real sessions expire after 24 hours unless the request says otherwise.
const LIFETIME_SECS: i64 = 24 * 60 * 60;

/// A session made for one create request.
pub(crate) struct NewSession {
    pub id: String,
    pub object: Value,
}

pub(crate) fn build(params: &CreateParams) -> anyhow::Result<NewSession> {
    let id = new_id();
    let now = unix_now()?;
    let amount = total_amount(&params.line_items)?;
    if params.line_items.is_empty() {
        bail!("a session needs at least one line item");
    }
    let mut object = fixture()?;
    let decided = decided_fields(&id, now, amount, params);
    object.extend(decided.map(|(key, value)| (key.to_owned(), value)));
    Ok(NewSession {
        id,
        object: Value::Object(object),
    })
}

/// The fields a create request decides; every other field stays as in the fixture.
fn decided_fields(
    id: &str,
    now: i64,
    amount: u64,
    params: &CreateParams,
) -> [(&'static str, Value); 17] {
    [
        ("id", json!(id)),
        ("object", json!("checkout.session")),
        (
            "url",
            json!(format!("https://checkout.stripe.com/c/pay/{id}")),
        ),
        ("status", json!("open")),
        ("payment_status", json!("unpaid")),
        ("mode", json!("payment")),
        ("created", json!(now)),
        ("expires_at", json!(now + LIFETIME_SECS)),
        ("client_reference_id", json!(params.client_reference_id)),
        ("metadata", json!(params.metadata)),
        ("success_url", json!(params.success_url)),
        ("cancel_url", json!(params.cancel_url)),
        ("livemode", json!(false)),
        ("payment_intent", Value::Null),
        ("amount_subtotal", json!(amount)),
        ("amount_total", json!(amount)),
        ("currency", json!(currency_of(&params.line_items[0].price))),
    ]
}

fn fixture() -> anyhow::Result<Map<String, Value>> {
    let value: Value =
        serde_json::from_str(FIXTURE).context("parse the embedded checkout session fixture")?;
    match value {
        Value::Object(map) => Ok(map),
        _ => bail!("the embedded checkout session fixture is not a JSON object"),
    }
}

fn new_id() -> String {
    let random: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(ID_RANDOM_LEN)
        .map(char::from)
        .collect();
    format!("cs_test_{random}")
}

fn total_amount(items: &[LineItem]) -> anyhow::Result<u64> {
    items.iter().try_fold(0u64, |total, item| {
        item.quantity
            .checked_mul(UNIT_AMOUNT)
            .and_then(|amount| total.checked_add(amount))
            .with_context(|| format!("amount overflows at line_items[{}]", item.index))
    })
}

fn unix_now() -> anyhow::Result<i64> {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    i64::try_from(since_epoch.as_secs()).context("the system clock is past year 292 billion")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_currency_suffix_prices_the_session_in_that_currency() {
        assert_eq!(currency_of("price_test_jpy"), "jpy");
        assert_eq!(currency_of("price_1PgafmB7WZ01zgkW"), "usd");
        assert_eq!(currency_of("price_test_JPY"), "usd");
    }

    use super::*;

    fn params() -> CreateParams {
        CreateParams {
            line_items: vec![
                LineItem {
                    index: 0,
                    price: "price_a".into(),
                    quantity: 2,
                },
                LineItem {
                    index: 1,
                    price: "price_b".into(),
                    quantity: 3,
                },
            ],
            metadata: [("order".to_owned(), "42".to_owned())].into(),
            success_url: "https://shop.test/ok".into(),
            cancel_url: None,
            client_reference_id: None,
        }
    }

    #[test]
    fn request_fields_override_the_fixture() {
        let session = build(&params()).expect("session builds");

        let object = &session.object;
        assert_eq!(object["id"], session.id.as_str());
        assert_eq!(session.id.len(), "cs_test_".len() + ID_RANDOM_LEN);
        assert_eq!(object["amount_total"], 5 * UNIT_AMOUNT);
        assert_eq!(object["metadata"], json!({"order": "42"}));
        assert_eq!(object["cancel_url"], Value::Null);
        assert_eq!(object["payment_intent"], Value::Null);
        let expected_url = format!("https://checkout.stripe.com/c/pay/{}", session.id);
        assert_eq!(object["url"], expected_url.as_str());
    }

    #[test]
    fn other_fixture_fields_are_kept() {
        let session = build(&params()).expect("session builds");

        let fixture = fixture().expect("fixture parses");
        assert_eq!(session.object["custom_text"], fixture["custom_text"]);
        assert_eq!(session.object["payment_method_types"], json!(["card"]));
    }
}
