//! The create request as the frontend sends it, and its validation.
//!
//! Unknown fields are refused rather than ignored: an option the API accepts
//! must be one the server honours. Limits follow Stripe's own, so a request we
//! accept is one Stripe will not refuse for its shape.

use std::collections::HashMap;

use serde::Deserialize;

use super::redirect::RedirectHosts;
use crate::{
    error::ApiError,
    stripe_api::{LineItem, NewCheckoutSession},
};

const MAX_LINE_ITEMS: usize = 100;
const MAX_QUANTITY: u64 = 999_999;
const MAX_URL_LEN: usize = 5000;
const MAX_REFERENCE_LEN: usize = 200;
/// Stripe allows 50; the service adds its own reference.
const MAX_METADATA_KEYS: usize = 49;
const MAX_METADATA_KEY_LEN: usize = 40;
const MAX_METADATA_VALUE_LEN: usize = 500;
/// The service's own metadata (see `stripe_api::REFERENCE_KEY`) uses this prefix.
const RESERVED_PREFIX: &str = "payments_";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    line_items: Vec<LineItemRequest>,
    success_url: String,
    cancel_url: String,
    #[serde(default)]
    client_reference_id: Option<String>,
    #[serde(default)]
    metadata: Option<HashMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineItemRequest {
    price: String,
    quantity: u64,
}

impl CreateRequest {
    /// `redirects`: the hosts Stripe may send the shopper back to.
    pub fn validate(self, redirects: &RedirectHosts) -> Result<NewCheckoutSession, ApiError> {
        self.reject_control_characters()?;
        Ok(NewCheckoutSession {
            line_items: line_items(self.line_items)?,
            success_url: redirect_url("success_url", self.success_url, redirects)?,
            cancel_url: redirect_url("cancel_url", self.cancel_url, redirects)?,
            client_reference_id: reference(self.client_reference_id)?,
            metadata: metadata(self.metadata.unwrap_or_default())?,
        })
    }
}

impl CreateRequest {
    /// No field may carry control characters (NUL, CR, LF…): they break
    /// headers and logs downstream, and Postgres refuses NUL in text.
    fn reject_control_characters(&self) -> Result<(), ApiError> {
        let mut fields: Vec<(String, &str)> = vec![
            ("success_url".into(), &self.success_url),
            ("cancel_url".into(), &self.cancel_url),
        ];
        if let Some(reference) = &self.client_reference_id {
            fields.push(("client_reference_id".into(), reference));
        }
        for (i, item) in self.line_items.iter().enumerate() {
            fields.push((format!("line_items[{i}].price"), &item.price));
        }
        for (key, value) in self.metadata.iter().flatten() {
            fields.push(("metadata (a key)".into(), key));
            fields.push((format!("metadata.{}", printable(key)), value));
        }
        match fields.iter().find(|(_, v)| v.chars().any(char::is_control)) {
            Some((field, _)) => Err(ApiError::invalid(format!(
                "{field} contains control characters."
            ))),
            None => Ok(()),
        }
    }
}

/// A key as it may be named in an error: control characters dropped.
fn printable(key: &str) -> String {
    key.chars().filter(|c| !c.is_control()).take(40).collect()
}

fn line_items(items: Vec<LineItemRequest>) -> Result<Vec<LineItem>, ApiError> {
    if items.is_empty() || items.len() > MAX_LINE_ITEMS {
        return Err(ApiError::invalid(format!(
            "line_items must hold 1 to {MAX_LINE_ITEMS} items."
        )));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| line_item(i, item))
        .collect()
}

fn line_item(index: usize, item: LineItemRequest) -> Result<LineItem, ApiError> {
    let price_ok = item.price.len() > "price_".len()
        && item.price.starts_with("price_")
        && item.price.len() <= 255
        && item
            .price
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !price_ok {
        return Err(ApiError::invalid(format!(
            "line_items[{index}].price must be a Stripe price id (price_...)."
        )));
    }
    if !(1..=MAX_QUANTITY).contains(&item.quantity) {
        return Err(ApiError::invalid(format!(
            "line_items[{index}].quantity must be from 1 to {MAX_QUANTITY}."
        )));
    }
    Ok(LineItem {
        price: item.price,
        quantity: item.quantity,
    })
}

/// An `https` URL on one of the shop's own hosts: anything else would make
/// the service an open redirect.
fn redirect_url(field: &str, raw: String, allowed: &RedirectHosts) -> Result<String, ApiError> {
    let invalid = || {
        ApiError::invalid(format!(
            "{field} must be an absolute https URL on a host this service redirects to."
        ))
    };
    if raw.len() > MAX_URL_LEN {
        return Err(invalid());
    }
    let parsed = url::Url::parse(&raw).map_err(|_| invalid())?;
    if !allowed.allows(&parsed) {
        return Err(invalid());
    }
    Ok(raw)
}

fn reference(value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.is_empty() || v.chars().count() > MAX_REFERENCE_LEN => Err(ApiError::invalid(
            format!("client_reference_id must be 1 to {MAX_REFERENCE_LEN} characters."),
        )),
        other => Ok(other),
    }
}

fn metadata(map: HashMap<String, String>) -> Result<HashMap<String, String>, ApiError> {
    if map.len() > MAX_METADATA_KEYS {
        return Err(ApiError::invalid(format!(
            "metadata may hold at most {MAX_METADATA_KEYS} keys."
        )));
    }
    for (key, value) in &map {
        let key_ok = !key.is_empty()
            && key.chars().count() <= MAX_METADATA_KEY_LEN
            && !key.contains(['[', ']']);
        if !key_ok {
            return Err(ApiError::invalid(format!(
                "metadata keys must be 1 to {MAX_METADATA_KEY_LEN} characters without square brackets."
            )));
        }
        if key.starts_with(RESERVED_PREFIX) {
            return Err(ApiError::invalid(format!(
                "metadata keys starting with {RESERVED_PREFIX} are reserved for this service."
            )));
        }
        if value.chars().count() > MAX_METADATA_VALUE_LEN {
            return Err(ApiError::invalid(format!(
                "metadata values must be at most {MAX_METADATA_VALUE_LEN} characters."
            )));
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<NewCheckoutSession, ApiError> {
        let env: std::collections::HashMap<String, String> =
            [("PAYMENTS_REDIRECT_HOSTS".into(), "shop.example".into())].into();
        let redirects = RedirectHosts::from_source(&env).expect("valid hosts");
        serde_json::from_str::<CreateRequest>(json)
            .map_err(|e| ApiError::invalid(e.to_string()))?
            .validate(&redirects)
    }

    const OK: &str = r#"{"line_items":[{"price":"price_1","quantity":2}],
        "success_url":"https://shop.example/ok","cancel_url":"https://shop.example/no"}"#;

    #[test]
    fn a_minimal_request_is_valid() {
        let session = request(OK).expect("valid");
        assert_eq!(session.line_items[0].quantity, 2);
        assert!(session.metadata.is_empty());
    }

    #[test]
    fn limits_are_enforced() {
        let too_many = format!(
            r#"{{"line_items":[{}],"success_url":"https://a.example","cancel_url":"https://a.example"}}"#,
            vec![r#"{"price":"price_1","quantity":1}"#; 101].join(",")
        );
        assert!(request(&too_many).is_err());
        assert!(request(&OK.replace("\"quantity\":2", "\"quantity\":0")).is_err());
        assert!(request(&OK.replace("https://shop.example/ok", "javascript:alert(1)")).is_err());
        for open_redirect in [
            "https://evil.example/",
            "http://shop.example/ok",
            "https://shop.example.evil.example/",
        ] {
            assert!(request(&OK.replace("https://shop.example/ok", open_redirect)).is_err());
        }
        assert!(request(&OK.replace("price_1", "prod_1")).is_err());
        let long_key = format!(r#"{{"{}":"v"}}"#, "k".repeat(41));
        let with_meta = OK.replacen('{', &format!(r#"{{"metadata":{long_key},"#), 1);
        assert!(request(&with_meta).is_err());
    }

    #[test]
    fn the_services_own_metadata_keys_are_reserved() {
        let ours = OK.replacen('{', r#"{"metadata":{"payments_ref":"forged"},"#, 1);
        assert!(request(&ours).is_err());
    }

    #[test]
    fn control_characters_are_refused_in_every_field() {
        let cases = [
            OK.replacen('{', r#"{"client_reference_id":"a\u0000b","#, 1),
            OK.replacen('{', r#"{"metadata":{"note":"line\nbreak"},"#, 1),
            OK.replace(
                "https://shop.example/ok",
                "https://shop.example/ok\\r\\nX: y",
            ),
            OK.replace("price_1", "price_1\\u0007"),
        ];
        for case in cases {
            let err = request(&case).unwrap_err().to_string();
            assert!(err.contains("control characters"), "{case}: {err}");
        }
        assert!(request(&OK.replace("price_1", "price_")).is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let extra = OK.replacen('{', r#"{"mode":"subscription","#, 1);
        assert!(request(&extra).is_err());
    }
}
