//! Card data never enters: requests that carry a card number or a card
//! security code are refused (422) before any handler, idempotency record or
//! database write sees them, and the value is neither echoed nor logged.
//!
//! What counts as a card number: a sequence of whole digit groups, joined by
//! single spaces or dashes, with 13 to 19 digits in all, that passes the Luhn
//! check. A group is a maximal run of digits; groups are never split, so a
//! 25-digit order id matches nothing. Windows of whole groups are tried, so a
//! number written next to others (`4242 4242 4242 4242 12/28`) is still found.
//! Any other character, or two separators in a row, ends a sequence. A
//! window must be delimited: a letter touching it makes it part of a word,
//! so digit runs inside hex ids (`evt_e744132104714342ae…`) never match; the
//! price is that a number glued to letters (`card4242…`) is not found either.
//!
//! A card security code: a key named `cvv`, `cvc`, `cvv2`, `cvc2`, `cid`,
//! `csc`, `security_code`, `card_verification`, `card_verification_value` or
//! `card_verification_code` (case, `_`, `-` and a `card` prefix do not
//! matter), anywhere in a JSON body, form body or query, holding 3 or 4 digits.
//!
//! JSON bodies are walked after parsing, so escapes cannot hide a number, and
//! the refusal names the field (`metadata.note`, `line_items[0].price`). Other
//! bodies are scanned as bytes and named `body`. URL paths and query strings
//! are scanned on every listener; bodies on the public and admin listeners
//! only (Stripe's signed webhook bytes are stored as they are).

use std::fmt;

use axum::{
    body::{Body, Bytes},
    extract::Request,
    http::{HeaderMap, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde_json::Value;

use crate::error::{ApiError, ProblemType, problem_response};

/// Bodies are buffered up to this (axum's own default limit) to be scanned.
pub const MAX_SCANNED_BODY_BYTES: usize = 2 * 1024 * 1024;
const MIN_CARD_DIGITS: usize = 13;
const MAX_CARD_DIGITS: usize = 19;
/// Names in a refusal are cut to this many characters.
const MAX_NAME_CHARS: usize = 64;
const VERIFICATION_KEYS: &[&str] = &[
    "cvv",
    "cvc",
    "cvv2",
    "cvc2",
    "cid",
    "csc",
    "securitycode",
    "cardverification",
    "cardverificationvalue",
    "cardverificationcode",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CardData {
    Number,
    SecurityCode,
}

/// Where card data was found. Never holds the data itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A JSON path or a form field name.
    Field(String),
    /// A key (a name, not a value) inside this JSON path; empty at the top.
    KeyIn(String),
    Body,
    QueryParameter(String),
    QueryParameterName,
    Path,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Field(path) => write!(f, "field {path}"),
            Self::KeyIn(path) if path.is_empty() => f.write_str("a top-level key"),
            Self::KeyIn(path) => write!(f, "a key in {path}"),
            Self::Body => f.write_str("body"),
            Self::QueryParameter(name) => write!(f, "query parameter {name}"),
            Self::QueryParameterName => f.write_str("a query parameter name"),
            Self::Path => f.write_str("the URL path"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub location: Location,
    pub kind: CardData,
}

impl Finding {
    fn new(location: Location, kind: CardData) -> Self {
        Self { location, kind }
    }

    /// The refusal's detail: where, and what, never the value.
    pub fn detail(&self) -> String {
        let what = match self.kind {
            CardData::Number => "a card number",
            CardData::SecurityCode => "a card security code",
        };
        format!(
            "{} holds what looks like {what}. This service never accepts card data: \
             card details go from the shopper's browser to Stripe only.",
            self.location
        )
    }
}

/// Middleware for the public and admin listeners: buffers and scans the
/// body, and passes the request on with the same bytes when it is clean.
pub async fn reject_card_data_in_body(
    axum::extract::State(pool): axum::extract::State<sqlx::PgPool>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_SCANNED_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(_) => {
            let detail = "The body is larger than this service accepts.";
            return problem_response(ProblemType::PayloadTooLarge, detail, None);
        }
    };
    if let Some(finding) = scan_body(&parts.headers, &bytes) {
        return refuse(&finding, &pool, &parts.extensions).await;
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Middleware for every listener: the path and the query string.
pub async fn reject_card_data_in_url(
    axum::extract::State(pool): axum::extract::State<sqlx::PgPool>,
    request: Request,
    next: Next,
) -> Response {
    match scan_url(request.uri().path(), request.uri().query()) {
        Some(finding) => refuse(&finding, &pool, request.extensions()).await,
        None => next.run(request).await,
    }
}

/// Refuses, and records the refusal naming where the card data was, never
/// the value.
async fn refuse(
    finding: &Finding,
    pool: &sqlx::PgPool,
    extensions: &axum::http::Extensions,
) -> Response {
    let location = finding.location.to_string();
    let record = crate::audit::Record::new(
        "anonymous",
        "card_data.rejected",
        crate::audit::Outcome::Refused,
    )
    .reason(&location)
    .severity(crate::audit::Severity::Warning)
    .context(extensions.get::<crate::audit::RequestContext>())
    .source(crate::client_ip::ClientIp::from_extensions(extensions).map(|ip| ip.0));
    crate::audit::record_refusal(pool, &record).await;
    tracing::warn!(
        reason = "card_data_rejected",
        location = %finding.location,
        kind = ?finding.kind,
        "request refused"
    );
    ApiError::client(ProblemType::CardDataRejected, finding.detail()).into_response()
}

/// Scans a request body: JSON and form bodies field by field, anything else
/// as bytes.
pub fn scan_body(headers: &HeaderMap, body: &Bytes) -> Option<Finding> {
    if body.is_empty() {
        return None;
    }
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if is_form {
        return scan_pairs(body, Location::Field, || Location::Body);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(json) => scan_json(&json),
        Err(_) => has_card_number(body).then(|| Finding::new(Location::Body, CardData::Number)),
    }
}

/// Scans the path and the query parameters of a URL.
pub fn scan_url(path: &str, query: Option<&str>) -> Option<Finding> {
    // Read as form text only to percent-decode it; '&' and '=' end a digit
    // sequence as any other character would.
    let decoded_path = url::form_urlencoded::parse(path.as_bytes());
    if decoded_path
        .flat_map(|(k, v)| [k, v])
        .any(|part| has_card_number(part.as_bytes()))
    {
        return Some(Finding::new(Location::Path, CardData::Number));
    }
    let query = query?;
    scan_pairs(query.as_bytes(), Location::QueryParameter, || {
        Location::QueryParameterName
    })
}

/// Scans `name=value` pairs (a query string, a form body).
fn scan_pairs(
    text: &[u8],
    field: fn(String) -> Location,
    name_itself: impl Fn() -> Location,
) -> Option<Finding> {
    for (name, value) in url::form_urlencoded::parse(text) {
        if has_card_number(name.as_bytes()) {
            return Some(Finding::new(name_itself(), CardData::Number));
        }
        let kind = if has_card_number(value.as_bytes()) {
            CardData::Number
        } else if is_verification_key(&name) && is_verification_code(&value) {
            CardData::SecurityCode
        } else {
            continue;
        };
        return Some(Finding::new(field(shorten(&name)), kind));
    }
    None
}

/// Walks a JSON document. Keys are looked at before what they hold, so a
/// path in a finding never contains card data itself.
pub fn scan_json(value: &Value) -> Option<Finding> {
    let mut path = Vec::new();
    walk(value, &mut path)
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn walk<'a>(value: &'a Value, path: &mut Vec<Segment<'a>>) -> Option<Finding> {
    match value {
        Value::String(text) => has_card_number(text.as_bytes())
            .then(|| Finding::new(Location::Field(render(path)), CardData::Number)),
        Value::Number(n) => has_card_number(n.to_string().as_bytes())
            .then(|| Finding::new(Location::Field(render(path)), CardData::Number)),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            path.push(Segment::Index(i));
            let found = walk(item, path);
            path.pop();
            found
        }),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            if has_card_number(key.as_bytes()) {
                return Some(Finding::new(
                    Location::KeyIn(render(path)),
                    CardData::Number,
                ));
            }
            path.push(Segment::Key(key));
            let found = if is_verification_key(key) && is_verification_value(item) {
                Some(Finding::new(
                    Location::Field(render(path)),
                    CardData::SecurityCode,
                ))
            } else {
                walk(item, path)
            };
            path.pop();
            found
        }),
        Value::Null | Value::Bool(_) => None,
    }
}

/// `metadata.note`, `line_items[0].price`.
fn render(path: &[Segment<'_>]) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&shorten(key));
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn shorten(name: &str) -> String {
    name.chars().take(MAX_NAME_CHARS).collect()
}

fn is_verification_key(key: &str) -> bool {
    let normalized: String = key
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | ' ' | '[' | ']' | '.'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let bare = normalized.strip_prefix("card").unwrap_or(&normalized);
    VERIFICATION_KEYS
        .iter()
        .any(|name| normalized == *name || bare == *name)
}

fn is_verification_value(value: &Value) -> bool {
    match value {
        Value::String(text) => is_verification_code(text),
        Value::Number(n) => n.as_u64().is_some_and(|n| (100..=9999).contains(&n)),
        _ => false,
    }
}

fn is_verification_code(text: &str) -> bool {
    let text = text.trim();
    (3..=4).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `text` holds a card number, by the rule in the module docs.
pub fn has_card_number(text: &[u8]) -> bool {
    let mut digits: Vec<u8> = Vec::new();
    // Where each group of the current sequence ends, in `digits`.
    let mut group_ends: Vec<usize> = Vec::new();
    let mut glued_left = false;
    let mut i = 0;
    while i < text.len() {
        let byte = text[i];
        if byte.is_ascii_digit() {
            if digits.is_empty() {
                glued_left = i > 0 && text[i - 1].is_ascii_alphabetic();
            }
            digits.push(byte - b'0');
            let continues = text.get(i + 1).is_some_and(u8::is_ascii_digit);
            if !continues {
                group_ends.push(digits.len());
                let joined = matches!(text.get(i + 1), Some(b' ' | b'-'))
                    && text.get(i + 2).is_some_and(u8::is_ascii_digit);
                if joined {
                    i += 1; // the separator
                } else {
                    let sequence = Sequence {
                        digits: &digits,
                        group_ends: &group_ends,
                        glued_left,
                        glued_right: text.get(i + 1).is_some_and(u8::is_ascii_alphabetic),
                    };
                    if sequence.has_card_number() {
                        return true;
                    }
                    digits.clear();
                    group_ends.clear();
                }
            }
        }
        i += 1;
    }
    false
}

/// Digit groups joined by single separators, and whether a letter touches
/// either end (then the ends belong to a word, such as a hex id).
struct Sequence<'a> {
    digits: &'a [u8],
    group_ends: &'a [usize],
    glued_left: bool,
    glued_right: bool,
}

impl Sequence<'_> {
    /// Tries every delimited window of whole groups with 13 to 19 digits.
    fn has_card_number(&self) -> bool {
        if self.digits.len() < MIN_CARD_DIGITS {
            return false;
        }
        let mut start = 0;
        for first in 0..self.group_ends.len() {
            let open_left = first > 0 || !self.glued_left;
            for &end in &self.group_ends[first..] {
                let len = end - start;
                if len > MAX_CARD_DIGITS {
                    break;
                }
                let open_right = end < self.digits.len() || !self.glued_right;
                if open_left
                    && open_right
                    && len >= MIN_CARD_DIGITS
                    && luhn_valid(&self.digits[start..end])
                {
                    return true;
                }
            }
            start = self.group_ends[first];
        }
        false
    }
}

/// The Luhn check over digit values (0 to 9).
pub fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use serde_json::json;

    use super::*;

    fn card(text: &str) -> bool {
        has_card_number(text.as_bytes())
    }

    fn digits(text: &str) -> Vec<u8> {
        text.bytes().map(|b| b - b'0').collect()
    }

    #[test]
    fn luhn_accepts_test_cards_and_refuses_one_digit_off() {
        for valid in [
            "4242424242424242",
            "4000056655665556",
            "378282246310005",
            "79927398713",
        ] {
            assert!(luhn_valid(&digits(valid)), "{valid}");
        }
        for invalid in ["4242424242424241", "4000056655665557", "79927398710"] {
            assert!(!luhn_valid(&digits(invalid)), "{invalid}");
        }
    }

    #[test]
    fn card_numbers_are_found_plain_and_with_separators() {
        for text in [
            "4242424242424242",
            "4242 4242 4242 4242",
            "4000-0566-5566-5556",
            "4242-4242 4242-4242",
            "3782 822463 10005",
            "note: 4242424242424242, thanks",
            "card_4242424242424242.",
            "ab-4242424242424242",
        ] {
            assert!(card(text), "{text}");
        }
    }

    #[test]
    fn digit_runs_inside_words_and_hex_ids_do_not_count() {
        // A Luhn-valid 15-digit run inside a hex id.
        assert!(luhn_valid(&digits("744132104714342")));
        assert!(!card("evt_test_e744132104714342aec123557fd87bb7"));
        assert!(!card("order-550e8400-a716-4242424242424242x"));
        assert!(!card("card4242424242424242"));
        // The delimited part of a sequence still counts.
        assert!(card("a12 4242424242424242"));
    }

    #[test]
    fn luhn_invalid_numbers_pass() {
        for text in [
            "4242424242424241",
            "4242 4242 4242 4241",
            "order 1234567890123456",
        ] {
            assert!(!card(text), "{text}");
        }
    }

    #[test]
    fn only_13_to_19_digits_count() {
        // Luhn-valid runs of 12, 13, 19 and 20 digits.
        let twelve = "123456789015";
        let thirteen = "1234567890128";
        let nineteen = "1234567890123456785";
        let twenty = "12345678901234567894";
        for (text, len) in [(twelve, 12), (thirteen, 13), (nineteen, 19), (twenty, 20)] {
            assert_eq!(text.len(), len);
            assert!(luhn_valid(&digits(text)), "{text} should be Luhn-valid");
        }
        assert!(!card(twelve));
        assert!(card(thirteen));
        assert!(card(nineteen));
        assert!(!card(twenty));
    }

    #[test]
    fn a_longer_digit_run_is_not_split() {
        // 25 digits with a Luhn-valid 16-digit stretch inside: one group.
        let order_id = "1114242424242424242111111";
        assert_eq!(order_id.len(), 25);
        assert!(!card(order_id));
        assert!(!card(&format!("order {order_id} shipped")));
    }

    #[test]
    fn a_card_number_among_other_numbers_is_still_found() {
        assert!(card("4242 4242 4242 4242 12/28 123"));
        assert!(card("4242424242424242 1228"));
        assert!(card("ref 12 4242424242424242"));
    }

    #[test]
    fn double_separators_and_other_characters_end_a_sequence() {
        assert!(!card("4242  4242  4242  4242"));
        assert!(!card("4242.4242.4242.4242"));
        assert!(!card("4242 4242 4242 4242".replace(' ', "_").as_str()));
        assert!(!card("2026-12-04T17:25:04Z"));
    }

    #[test]
    fn json_findings_name_the_path_and_never_the_value() {
        let body = json!({
            "line_items": [{"price": "price_1", "quantity": 1}, {"price": "4242424242424242"}],
        });
        let finding = scan_json(&body).unwrap();
        assert_eq!(
            finding.location,
            Location::Field("line_items[1].price".into())
        );
        assert_eq!(finding.kind, CardData::Number);
        assert!(!finding.detail().contains("4242"), "{}", finding.detail());

        let nested = json!({"metadata": {"note": "card 4000-0566-5566-5556"}});
        assert_eq!(
            scan_json(&nested).unwrap().location,
            Location::Field("metadata.note".into())
        );
        let as_number = json!({"client_reference_id": 4242424242424242u64});
        assert_eq!(
            scan_json(&as_number).unwrap().location,
            Location::Field("client_reference_id".into())
        );
    }

    #[test]
    fn a_card_number_as_a_key_is_named_by_its_parent() {
        let body = json!({"metadata": {"4242424242424242": "x"}});
        let finding = scan_json(&body).unwrap();
        assert_eq!(finding.location, Location::KeyIn("metadata".into()));
        assert!(!finding.detail().contains("4242"));
    }

    #[test]
    fn escaped_digits_are_seen_after_decoding() {
        let raw = br#"{"note":"\u0034242424242424242"}"#;
        let finding = scan_body(&HeaderMap::new(), &Bytes::from_static(raw)).unwrap();
        assert_eq!(finding.location, Location::Field("note".into()));
    }

    #[test]
    fn security_codes_are_found_by_key_nested_and_in_any_case() {
        for body in [
            json!({"cvv": "123"}),
            json!({"payment": {"CVC": "0123"}}),
            json!({"card": {"Security_Code": 737}}),
            json!({"metadata": {"card_cvc2": "999"}}),
            json!({"items": [{"card_verification_value": "1234"}]}),
            json!({"cid": " 4321 "}),
        ] {
            let finding = scan_json(&body).unwrap_or_else(|| panic!("{body}"));
            assert_eq!(finding.kind, CardData::SecurityCode, "{body}");
        }
        assert_eq!(
            scan_json(&json!({"payment": {"cvc": "123"}}))
                .unwrap()
                .location,
            Location::Field("payment.cvc".into())
        );
    }

    #[test]
    fn code_like_keys_without_a_code_and_codes_under_other_keys_pass() {
        for body in [
            json!({"cvv": "12"}),
            json!({"cvv": "12345"}),
            json!({"cvv": "abc"}),
            json!({"cvv": null}),
            json!({"cvv": 12}),
            json!({"quantity": 123}),
            json!({"discovery": "1234"}),
            json!({"metadata": {"order": "1042"}}),
        ] {
            assert_eq!(scan_json(&body), None, "{body}");
        }
    }

    #[test]
    fn other_bodies_are_scanned_as_bytes_and_named_body() {
        let headers = HeaderMap::new();
        let text = Bytes::from_static(b"pay with 4242 4242 4242 4242 please");
        assert_eq!(scan_body(&headers, &text).unwrap().location, Location::Body);
        let broken_json = Bytes::from_static(b"{\"note\": \"4242424242424242\"");
        assert_eq!(
            scan_body(&headers, &broken_json).unwrap().location,
            Location::Body
        );
        assert_eq!(scan_body(&headers, &Bytes::from_static(b"hello")), None);
    }

    #[test]
    fn form_bodies_are_scanned_field_by_field() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        let body = Bytes::from_static(b"a=1&card%5Bcvc%5D=123");
        let finding = scan_body(&headers, &body).unwrap();
        assert_eq!(finding.location, Location::Field("card[cvc]".into()));
        assert_eq!(finding.kind, CardData::SecurityCode);
        let number = Bytes::from_static(b"note=4242+4242+4242+4242");
        assert_eq!(
            scan_body(&headers, &number).unwrap().location,
            Location::Field("note".into())
        );
    }

    #[test]
    fn query_parameters_and_paths_are_scanned() {
        let finding = scan_url("/v1/x", Some("limit=10&ref=4242%204242%204242%204242")).unwrap();
        assert_eq!(finding.location, Location::QueryParameter("ref".into()));
        let finding = scan_url("/v1/x", Some("cvv=123")).unwrap();
        assert_eq!(finding.kind, CardData::SecurityCode);
        assert_eq!(
            scan_url("/v1/x", Some("4242424242424242=1"))
                .unwrap()
                .location,
            Location::QueryParameterName
        );
        assert_eq!(
            scan_url("/v1/checkout/sessions/4242424242424242", None)
                .unwrap()
                .location,
            Location::Path
        );
        assert_eq!(
            scan_url("/v1/dead-letters", Some("status=open&limit=50")),
            None
        );
    }
}
