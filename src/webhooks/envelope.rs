//! The Stripe event envelope: the fields the event store indexes.
//!
//! Only the envelope is parsed at the door. The object inside `data` is parsed
//! by the worker when it applies the event, so an object shape we do not know
//! yet never costs Stripe a retry.

use chrono::{DateTime, Utc};
use serde::Deserialize;

/// A Stripe event id (`evt_...`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(String);

impl EventId {
    pub fn parse(raw: &str) -> Option<Self> {
        let valid = raw.len() <= 255
            && raw.starts_with("evt_")
            && raw.len() > "evt_".len()
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        valid.then(|| Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Debug)]
pub struct Envelope {
    pub id: EventId,
    pub event_type: String,
    pub api_version: Option<String>,
    pub livemode: bool,
    pub account: Option<String>,
    pub created: DateTime<Utc>,
}

/// Why authentic bytes are not a usable event. Such a delivery is
/// dead-lettered with this reason, never refused: Stripe would only retry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not JSON, or JSON that is not an object.
    Malformed(String),
    /// JSON, but not a Stripe event.
    NotAnEvent(String),
}

impl EnvelopeError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_payload",
            Self::NotAnEvent(_) => "not_an_event",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            Self::Malformed(d) | Self::NotAnEvent(d) => d,
        }
    }
}

#[derive(Deserialize)]
struct RawEnvelope {
    id: Option<serde_json::Value>,
    object: Option<serde_json::Value>,
    #[serde(rename = "type")]
    event_type: Option<serde_json::Value>,
    api_version: Option<serde_json::Value>,
    livemode: Option<serde_json::Value>,
    account: Option<serde_json::Value>,
    created: Option<serde_json::Value>,
    data: Option<serde_json::Value>,
}

pub fn parse(payload: &[u8]) -> Result<Envelope, EnvelopeError> {
    let raw: RawEnvelope = serde_json::from_slice(payload).map_err(describe_json_error)?;
    let not_event = |msg: &str| EnvelopeError::NotAnEvent(msg.to_owned());

    if raw.object.as_ref().and_then(|v| v.as_str()) != Some("event") {
        return Err(not_event("`object` is not \"event\""));
    }
    let id = raw
        .id
        .as_ref()
        .and_then(|v| v.as_str())
        .ok_or_else(|| not_event("no `id`"))?;
    let id = EventId::parse(id).ok_or_else(|| not_event("`id` is not an evt_ identifier"))?;
    let event_type = raw
        .event_type
        .as_ref()
        .and_then(|v| v.as_str())
        .filter(|t| valid_type(t))
        .ok_or_else(|| not_event("no usable `type`"))?;
    let created = raw
        .created
        .as_ref()
        .and_then(|v| v.as_i64())
        .and_then(|secs| DateTime::from_timestamp(secs, 0))
        .ok_or_else(|| not_event("no usable `created`"))?;
    if raw.data.as_ref().is_none_or(|d| d.get("object").is_none()) {
        return Err(not_event("no `data.object`"));
    }
    let livemode = raw
        .livemode
        .as_ref()
        .and_then(|v| v.as_bool())
        .ok_or_else(|| not_event("no boolean `livemode`"))?;
    let api_version = optional_token(raw.api_version.as_ref(), valid_api_version)
        .map_err(|()| not_event("`api_version` is not a Stripe API version"))?;
    let account = optional_token(raw.account.as_ref(), valid_account)
        .map_err(|()| not_event("`account` is not an acct_ identifier"))?;
    Ok(Envelope {
        id,
        event_type: event_type.to_owned(),
        api_version,
        livemode,
        account,
        created,
    })
}

/// Says where the JSON broke and what kind of fault it is, never quoting the
/// bytes: the detail is shown to operators and must not carry customer data.
fn describe_json_error(err: serde_json::Error) -> EnvelopeError {
    let kind = match err.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Data => "JSON, but not an object with the event's fields",
        serde_json::error::Category::Eof => "JSON cut short",
    };
    EnvelopeError::Malformed(format!(
        "{kind} (line {}, column {})",
        err.line(),
        err.column()
    ))
}

fn valid_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._".contains(&b))
}

/// An optional string field that must be null, absent, or valid by `check`.
/// Anything else (a number, a control character) makes the bytes not an event.
fn optional_token(
    value: Option<&serde_json::Value>,
    check: fn(&str) -> bool,
) -> Result<Option<String>, ()> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if check(s) => Ok(Some(s.clone())),
        Some(_) => Err(()),
    }
}

/// `2026-09-30.endive`, `2020-08-27`: dates and lowercase release names.
fn valid_api_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

fn valid_account(v: &str) -> bool {
    v.len() <= 255
        && v.strip_prefix("acct_")
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixture_event_parses() {
        let body = br#"{"id":"evt_1","object":"event","type":"checkout.session.completed",
            "api_version":"2026-09-30.endive","livemode":true,"account":"acct_9",
            "created":1234567890,"data":{"object":{"id":"cs_1"}}}"#;
        let env = parse(body).expect("parses");
        assert_eq!(env.id.as_str(), "evt_1");
        assert_eq!(env.event_type, "checkout.session.completed");
        assert_eq!(env.api_version.as_deref(), Some("2026-09-30.endive"));
        assert!(env.livemode);
        assert_eq!(env.account.as_deref(), Some("acct_9"));
        assert_eq!(env.created.timestamp(), 1_234_567_890);
    }

    #[test]
    fn text_fields_with_control_characters_are_not_an_event() {
        let with = |field: &str| {
            format!(
                r#"{{"id":"evt_1","object":"event","type":"x.y","created":1,"livemode":false,
                   "data":{{"object":{{}}}},{field}}}"#
            )
        };
        for field in [
            r#""account":"acct_\u0000""#,
            r#""api_version":"2026\u0000""#,
            r#""account":5"#,
        ] {
            let err = parse(with(field).as_bytes()).unwrap_err();
            assert_eq!(err.reason(), "not_an_event", "{field}");
        }
        assert!(parse(with(r#""account":null"#).as_bytes()).is_ok());
    }

    #[test]
    fn a_parse_error_never_quotes_the_payload() {
        let err = parse(br#""example@example.com""#).unwrap_err();
        assert!(!err.detail().contains("example"), "{}", err.detail());
    }

    #[test]
    fn non_json_is_malformed_and_json_without_an_id_is_not_an_event() {
        assert_eq!(
            parse(b"not json").unwrap_err().reason(),
            "malformed_payload"
        );
        assert_eq!(parse(b"[1,2]").unwrap_err().reason(), "malformed_payload");
        let no_id =
            br#"{"object":"event","type":"x.y","created":1,"livemode":false,"data":{"object":{}}}"#;
        assert_eq!(parse(no_id).unwrap_err().reason(), "not_an_event");
        let charge = br#"{"id":"ch_1","object":"charge"}"#;
        assert_eq!(parse(charge).unwrap_err().reason(), "not_an_event");
    }
}
