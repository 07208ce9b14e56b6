//! Parameters of `POST /v1/checkout/sessions`, read from the flat form pairs that Stripe
//! clients send (`line_items[0][price]=..`, `metadata[order]=..`).
//!
//! Only the parameters the stand-in acts on are read; all others are accepted and ignored.

use std::collections::BTreeMap;

use axum::http::StatusCode;

use crate::errors::StripeError;

/// A price id that answers like a price Stripe does not know, so tests can trigger a
/// realistic client error.
pub(crate) const MISSING_PRICE: &str = "price_missing";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LineItem {
    /// The index the client sent, kept for error messages that name `line_items[N]`.
    pub index: usize,
    pub price: String,
    pub quantity: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CreateParams {
    pub line_items: Vec<LineItem>,
    pub metadata: BTreeMap<String, String>,
    pub success_url: String,
    pub cancel_url: Option<String>,
    pub client_reference_id: Option<String>,
}

/// What the form said before validation; every field may be absent.
#[derive(Debug, Default)]
struct RawParams {
    mode: Option<String>,
    success_url: Option<String>,
    cancel_url: Option<String>,
    client_reference_id: Option<String>,
    metadata: BTreeMap<String, String>,
    line_items: BTreeMap<usize, RawLineItem>,
}

#[derive(Debug, Default)]
struct RawLineItem {
    price: Option<String>,
    quantity: Option<String>,
}

impl CreateParams {
    /// Validates the pairs as Stripe would for a one-off payment session.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, StripeError> {
        let raw = collect(pairs)?;
        require_payment_mode(raw.mode.as_deref())?;
        let line_items = validate_line_items(raw.line_items)?;
        let success_url = raw
            .success_url
            .ok_or_else(|| StripeError::missing_param("success_url"))?;
        Ok(Self {
            line_items,
            metadata: raw.metadata,
            success_url,
            cancel_url: raw.cancel_url,
            client_reference_id: raw.client_reference_id,
        })
    }
}

fn collect(pairs: &[(String, String)]) -> Result<RawParams, StripeError> {
    let mut raw = RawParams::default();
    for (key, value) in pairs {
        let value = value.clone();
        match key.as_str() {
            "mode" => raw.mode = Some(value),
            "success_url" => raw.success_url = Some(value),
            "cancel_url" => raw.cancel_url = Some(value),
            "client_reference_id" => raw.client_reference_id = Some(value),
            _ => collect_nested(&mut raw, key, value)?,
        }
    }
    Ok(raw)
}

fn collect_nested(raw: &mut RawParams, key: &str, value: String) -> Result<(), StripeError> {
    if let Some(name) = bracketed(key, "metadata") {
        raw.metadata.insert(name.to_owned(), value);
    } else if let Some(rest) = bracketed(key, "line_items") {
        collect_line_item_field(raw, key, rest, value)?;
    }
    Ok(())
}

/// `prefix[inner]` → `inner`; for `line_items[0][price]` the inner part is `0][price`.
fn bracketed<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    key.strip_prefix(prefix)?
        .strip_prefix('[')?
        .strip_suffix(']')
}

fn collect_line_item_field(
    raw: &mut RawParams,
    key: &str,
    inner: &str,
    value: String,
) -> Result<(), StripeError> {
    let invalid = || StripeError::bad_param(key, format!("Invalid parameter: {key}"));
    let (index, field) = inner.split_once("][").ok_or_else(invalid)?;
    let index: usize = index.parse().map_err(|_| invalid())?;
    let item = raw.line_items.entry(index).or_default();
    match field {
        "price" => item.price = Some(value),
        "quantity" => item.quantity = Some(value),
        // price_data, adjustable_quantity and the like: accepted, not modelled.
        _ => {}
    }
    Ok(())
}

fn require_payment_mode(mode: Option<&str>) -> Result<(), StripeError> {
    match mode {
        Some("payment") => Ok(()),
        None => Err(StripeError::missing_param("mode")),
        Some(other) => Err(StripeError::bad_param(
            "mode",
            format!("The Stripe stand-in supports only mode=payment, not '{other}'."),
        )),
    }
}

fn validate_line_items(raw: BTreeMap<usize, RawLineItem>) -> Result<Vec<LineItem>, StripeError> {
    if raw.is_empty() {
        return Err(StripeError::missing_param("line_items"));
    }
    raw.into_iter()
        .map(|(index, item)| validate_line_item(index, item))
        .collect()
}

fn validate_line_item(index: usize, raw: RawLineItem) -> Result<LineItem, StripeError> {
    let price = raw
        .price
        .ok_or_else(|| StripeError::missing_param(&format!("line_items[{index}][price]")))?;
    let quantity = parse_quantity(index, raw.quantity)?;
    Ok(LineItem {
        index,
        price,
        quantity,
    })
}

/// Answers like Stripe for a price it does not know; every other price exists.
pub(crate) fn check_prices_exist(params: &CreateParams) -> Result<(), StripeError> {
    let missing = params
        .line_items
        .iter()
        .find(|item| item.price == MISSING_PRICE);
    match missing {
        None => Ok(()),
        Some(item) => Err(StripeError::resource_missing(
            StatusCode::BAD_REQUEST,
            &format!("line_items[{}][price]", item.index),
            format!("No such price: '{}'", item.price),
        )),
    }
}

fn parse_quantity(index: usize, quantity: Option<String>) -> Result<u64, StripeError> {
    let param = format!("line_items[{index}][quantity]");
    let Some(quantity) = quantity else {
        let message = format!("Quantity is required. Add `quantity` to `line_items[{index}]`.");
        return Err(StripeError::bad_param(param, message));
    };
    match quantity.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err(StripeError::bad_param(
            param,
            "This value must be greater than or equal to 1.",
        )),
        Err(_) => Err(StripeError::bad_param(
            param,
            format!("Invalid integer: {quantity}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn valid() -> Vec<(String, String)> {
        pairs(&[
            ("line_items[1][price]", "price_b"),
            ("line_items[0][price]", "price_a"),
            ("line_items[0][quantity]", "2"),
            ("line_items[1][quantity]", "1"),
            ("line_items[1][adjustable_quantity][enabled]", "false"),
            ("mode", "payment"),
            ("success_url", "https://shop.test/ok"),
            ("cancel_url", "https://shop.test/cancel"),
            ("client_reference_id", "order-42"),
            ("metadata[order]", "42"),
            ("metadata[tenant]", "acme"),
            ("payment_method_types[0]", "card"),
        ])
    }

    #[test]
    fn nested_line_items_and_metadata_are_collected() {
        let params = CreateParams::parse(&valid()).expect("valid params");

        let items = vec![
            LineItem {
                index: 0,
                price: "price_a".into(),
                quantity: 2,
            },
            LineItem {
                index: 1,
                price: "price_b".into(),
                quantity: 1,
            },
        ];
        assert_eq!(params.line_items, items);
        let metadata: Vec<_> = params
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(metadata, [("order", "42"), ("tenant", "acme")]);
        assert_eq!(params.client_reference_id.as_deref(), Some("order-42"));
        assert_eq!(
            params.cancel_url.as_deref(),
            Some("https://shop.test/cancel")
        );
    }

    fn without(key: &str) -> Vec<(String, String)> {
        valid().into_iter().filter(|(k, _)| k != key).collect()
    }

    fn rejected_param(pairs: &[(String, String)]) -> Option<String> {
        CreateParams::parse(pairs)
            .expect_err("params are rejected")
            .param
    }

    #[test]
    fn missing_required_params_are_named() {
        assert_eq!(rejected_param(&without("mode")).as_deref(), Some("mode"));
        assert_eq!(
            rejected_param(&without("success_url")).as_deref(),
            Some("success_url")
        );
        let quantity = rejected_param(&without("line_items[0][quantity]"));
        assert_eq!(quantity.as_deref(), Some("line_items[0][quantity]"));
    }

    #[test]
    fn no_line_items_is_rejected() {
        let only_top_level = pairs(&[("mode", "payment"), ("success_url", "https://s.test")]);

        assert_eq!(
            rejected_param(&only_top_level).as_deref(),
            Some("line_items")
        );
    }

    #[test]
    fn other_modes_are_rejected() {
        let mut subscription = without("mode");
        subscription.push(("mode".into(), "subscription".into()));

        assert_eq!(rejected_param(&subscription).as_deref(), Some("mode"));
    }

    #[test]
    fn unknown_price_is_resource_missing() {
        let mut missing = without("line_items[0][price]");
        missing.push(("line_items[0][price]".into(), MISSING_PRICE.into()));

        let params = CreateParams::parse(&missing).expect("params are well formed");
        let error = check_prices_exist(&params).expect_err("price is unknown");

        assert_eq!(error.code, Some("resource_missing"));
        assert_eq!(error.param.as_deref(), Some("line_items[0][price]"));
    }

    #[test]
    fn non_numeric_index_is_rejected() {
        let mut odd = valid();
        odd.push(("line_items[x][price]".into(), "price_c".into()));

        assert_eq!(
            rejected_param(&odd).as_deref(),
            Some("line_items[x][price]")
        );
    }
}
