//! Idempotency keys on the public API.
//!
//! A key is taken in Postgres before Stripe is called, bound to a fingerprint
//! of the request. The same key with the same request replays the stored
//! answer; with another request it is refused; while the first request is still
//! running, a second one is told to retry shortly. If Stripe fails, the key is
//! released so the client can retry with it.

use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::error::{ApiError, ProblemType};

pub const HEADER: &str = "idempotency-key";

/// How long a request may hold its key before another may take it over. It
/// outlasts the Stripe call timeout, so a live owner is never overtaken.
const LEASE: Duration = Duration::from_secs(60);

/// A client's Idempotency-Key: 1 to 255 printable ASCII characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let mut values = headers.get_all(HEADER).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            let detail =
                "Send exactly one Idempotency-Key header so a retried request is not run twice.";
            return Err(ApiError::client(ProblemType::IdempotencyKeyMissing, detail));
        };
        let invalid = || {
            ApiError::client(
                ProblemType::IdempotencyKeyInvalid,
                "Idempotency-Key must be 1 to 255 printable ASCII characters.",
            )
        };
        let raw = value.to_str().map_err(|_| invalid())?;
        let printable = raw.bytes().all(|b| (0x20..=0x7e).contains(&b));
        if raw.is_empty() || raw.len() > 255 || !printable {
            return Err(invalid());
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// sha256 over method, path and the body in canonical form (serde_json
/// objects keep their keys sorted), so key order and spacing do not count as a
/// different request.
pub fn fingerprint(method: &str, path: &str, body: &Value) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update(b"\n");
    hash.update(path.as_bytes());
    hash.update(b"\n");
    hash.update(body.to_string().as_bytes());
    hash.finalize().into()
}

/// The key sent to Stripe: derived from the client's key and the request, so a
/// retry sends the same one (and Stripe deduplicates), while a corrected
/// request after a Stripe refusal does not collide with Stripe's stored error.
pub fn outbound_key(key: &IdempotencyKey, fingerprint: &[u8; 32]) -> String {
    let mut hash = Sha256::new();
    hash.update(key.as_str().as_bytes());
    hash.update([0]);
    hash.update(fingerprint);
    format!("payments-{}", hex::encode(hash.finalize()))
}

/// What the store says about a key when a request arrives.
#[derive(Debug)]
pub enum Claim {
    /// This request owns the key and must finish or release it.
    Acquired,
    /// The key finished earlier with this answer.
    Completed { status: u16, body: Value },
}

pub async fn claim(
    pool: &PgPool,
    key: &IdempotencyKey,
    fingerprint: &[u8; 32],
) -> Result<Claim, ApiError> {
    let lease = lease_secs();
    // Take the key if it is new, or if its owner's lease has lapsed (the owner
    // crashed): the derived Stripe key is the same, so Stripe returns the same
    // session rather than making a second.
    let taken: Option<(i32,)> = sqlx::query_as(
        "INSERT INTO idempotency_keys (key, fingerprint, state, locked_until)
         VALUES ($1, $2, 'in_progress', now() + make_interval(secs => $3))
         ON CONFLICT (key) DO UPDATE
             SET locked_until = EXCLUDED.locked_until
             WHERE idempotency_keys.state = 'in_progress'
               AND idempotency_keys.locked_until < now()
               AND idempotency_keys.fingerprint = EXCLUDED.fingerprint
         RETURNING 1",
    )
    .bind(key.as_str())
    .bind(fingerprint.as_slice())
    .bind(lease)
    .fetch_optional(pool)
    .await?;
    if taken.is_some() {
        return Ok(Claim::Acquired);
    }
    existing(pool, key, fingerprint).await
}

#[derive(sqlx::FromRow)]
struct StoredKey {
    fingerprint: Vec<u8>,
    state: String,
    response_status: Option<i16>,
    response_body: Option<Value>,
}

async fn existing(
    pool: &PgPool,
    key: &IdempotencyKey,
    fingerprint: &[u8; 32],
) -> Result<Claim, ApiError> {
    let row: Option<StoredKey> = sqlx::query_as(
        "SELECT fingerprint, state, response_status, response_body
         FROM idempotency_keys WHERE key = $1",
    )
    .bind(key.as_str())
    .fetch_optional(pool)
    .await?;
    let Some(StoredKey {
        fingerprint: stored,
        state,
        response_status: status,
        response_body: body,
    }) = row
    else {
        // Released between our insert and this read: the client may retry now.
        return Err(in_progress());
    };
    if stored.as_slice() != fingerprint.as_slice() {
        let detail = "This Idempotency-Key was used with a different request. Use a new key for a new request.";
        return Err(ApiError::client(ProblemType::IdempotencyKeyReused, detail));
    }
    match (state.as_str(), status, body) {
        ("completed", Some(status), Some(body)) => Ok(Claim::Completed {
            status: u16::try_from(status).unwrap_or(500),
            body,
        }),
        _ => Err(in_progress()),
    }
}

fn in_progress() -> ApiError {
    let detail = "A request with this Idempotency-Key is still running. Retry after a moment.";
    ApiError::client(ProblemType::IdempotencyKeyInProgress, detail).retry_after(1)
}

/// Stores the answer with the key, inside the caller's transaction, so the
/// key is completed exactly when the work it guards is committed.
pub async fn complete(
    tx: &mut sqlx::PgConnection,
    key: &IdempotencyKey,
    status: u16,
    body: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE idempotency_keys
         SET state = 'completed', response_status = $2, response_body = $3, completed_at = now()
         WHERE key = $1",
    )
    .bind(key.as_str())
    .bind(i16::try_from(status).unwrap_or(500))
    .bind(body)
    .execute(tx)
    .await?;
    Ok(())
}

/// Gives the key back after a failure, so the client may retry with it.
pub async fn release(pool: &PgPool, key: &IdempotencyKey) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM idempotency_keys WHERE key = $1 AND state = 'in_progress'")
        .bind(key.as_str())
        .execute(pool)
        .await?;
    Ok(())
}

fn lease_secs() -> f64 {
    LEASE.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers_with(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, HeaderValue::from_bytes(value).unwrap());
        headers
    }

    #[test]
    fn keys_must_be_printable_ascii_up_to_255() {
        assert!(IdempotencyKey::from_headers(&headers_with(b"order-42 retry")).is_ok());
        assert!(IdempotencyKey::from_headers(&headers_with(&[b'a'; 255])).is_ok());
        assert!(IdempotencyKey::from_headers(&headers_with(&[b'a'; 256])).is_err());
        assert!(IdempotencyKey::from_headers(&headers_with(b"tab\there")).is_err());
        assert!(IdempotencyKey::from_headers(&headers_with("caf\u{e9}".as_bytes())).is_err());
        assert!(IdempotencyKey::from_headers(&HeaderMap::new()).is_err());
    }

    #[test]
    fn key_order_and_spacing_do_not_change_the_fingerprint() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":[1,2]}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{ "b": [1, 2], "a": 1 }"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"a":1,"b":[2,1]}"#).unwrap();
        let path = "/v1/checkout/sessions";
        assert_eq!(fingerprint("POST", path, &a), fingerprint("POST", path, &b));
        assert_ne!(fingerprint("POST", path, &a), fingerprint("POST", path, &c));
    }

    #[test]
    fn the_outbound_key_is_stable_and_bound_to_the_request() {
        let key = IdempotencyKey("k1".into());
        let one = outbound_key(&key, &[1; 32]);
        assert_eq!(one, outbound_key(&key, &[1; 32]));
        assert_ne!(one, outbound_key(&key, &[2; 32]));
        assert!(one.len() <= 255);
    }
}
