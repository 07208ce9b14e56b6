//! Idempotency keys on the public API.
//!
//! A key belongs to one client and one route, and is bound to a fingerprint of
//! the request. It is taken in Postgres before Stripe is called. Then:
//! - the same key and request again replays the stored answer exactly;
//! - the same key with another request is refused (422);
//! - a request arriving while the first still runs waits for its answer (up
//!   to a configured time, then 409 with Retry-After);
//! - a failure releases the key, so the client may retry with it;
//! - a crashed owner's key is taken over once its lease lapses, and the same
//!   derived Stripe key makes Stripe return the session it already made.
//!
//! Keys expire (24 hours by default); expired ones are swept in batches.

use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    config::IdempotencyConfig,
    error::{ApiError, ProblemType},
};

pub const HEADER: &str = "idempotency-key";

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

/// One request under a key: who sent it, where, and what it asked.
pub struct KeyedRequest<'a> {
    pub client: &'a str,
    pub route: &'static str,
    pub key: &'a IdempotencyKey,
    pub fingerprint: [u8; 32],
}

impl KeyedRequest<'_> {
    /// A digest of the whole scope (client, route, key) and the request.
    /// Two clients using the same key never share a Stripe key.
    fn digest(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for part in [
            self.client.as_bytes(),
            self.route.as_bytes(),
            self.key.as_str().as_bytes(),
        ] {
            hash.update(part);
            hash.update([0]);
        }
        hash.update(self.fingerprint);
        hash.finalize().into()
    }

    /// The key sent to Stripe: the same for every retry of this request, so
    /// Stripe deduplicates; different for a corrected request, so it does not
    /// collide with an error Stripe stored for the first one.
    pub fn outbound_key(&self) -> String {
        format!("payments-{}", hex::encode(self.digest()))
    }

    /// An opaque reference sent to Stripe as metadata. Events that carry it
    /// are about objects this service created, even before it has recorded them.
    pub fn reference(&self) -> String {
        hex::encode(&self.digest()[..16])
    }
}

/// sha256 over method, path and the body in canonical form (serde_json
/// objects keep their keys sorted), so key order and spacing do not count as
/// a different request.
pub fn fingerprint(method: &str, path: &str, body: &Value) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update(b"\n");
    hash.update(path.as_bytes());
    hash.update(b"\n");
    hash.update(body.to_string().as_bytes());
    hash.finalize().into()
}

/// An answer as stored and replayed.
#[derive(Clone, Debug)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

/// Proof that this request holds the key.
#[derive(Clone, Copy, Debug)]
pub struct Lease {
    owner: Uuid,
}

#[derive(Debug)]
pub enum Claim {
    /// This request owns the key and must complete or release it.
    Acquired(Lease),
    /// The key finished earlier with this answer.
    Completed(StoredResponse),
}

pub async fn claim(
    pool: &PgPool,
    settings: &IdempotencyConfig,
    request: &KeyedRequest<'_>,
) -> Result<Claim, ApiError> {
    let deadline = Instant::now() + settings.wait;
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(lease) = try_take(pool, settings, request).await? {
            return Ok(Claim::Acquired(lease));
        }
        if let Some(answer) = finished_answer(pool, request).await? {
            return Ok(Claim::Completed(answer));
        }
        // Still running elsewhere (or released a moment ago): wait for it.
        if Instant::now() + pause > deadline {
            return Err(in_progress());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Takes the key when it is new, expired, or held by an owner whose lease
/// lapsed (that owner crashed) for the same request.
async fn try_take(
    pool: &PgPool,
    settings: &IdempotencyConfig,
    request: &KeyedRequest<'_>,
) -> Result<Option<Lease>, sqlx::Error> {
    let owner: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys
             (client, route, key, fingerprint, state, owner, locked_until, expires_at)
         VALUES ($1, $2, $3, $4, 'in_progress', $5,
                 now() + make_interval(secs => $6), now() + make_interval(secs => $7))
         ON CONFLICT (client, route, key) DO UPDATE
             SET fingerprint = EXCLUDED.fingerprint, state = 'in_progress',
                 owner = EXCLUDED.owner, locked_until = EXCLUDED.locked_until,
                 expires_at = EXCLUDED.expires_at, response_status = NULL,
                 response_body = NULL, response_headers = '{}', completed_at = NULL
             WHERE idempotency_keys.expires_at < now()
                OR (idempotency_keys.state = 'in_progress'
                    AND idempotency_keys.locked_until < now()
                    AND idempotency_keys.fingerprint = EXCLUDED.fingerprint)
         RETURNING owner",
    )
    .bind(request.client)
    .bind(request.route)
    .bind(request.key.as_str())
    .bind(request.fingerprint.as_slice())
    .bind(Uuid::new_v4())
    .bind(settings.lease.as_secs_f64())
    .bind(settings.ttl.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(owner.map(|owner| Lease { owner }))
}

#[derive(sqlx::FromRow)]
struct StoredKey {
    fingerprint: Vec<u8>,
    response_status: Option<i16>,
    response_headers: Value,
    response_body: Option<Value>,
}

/// The stored answer, if the key has finished; a 422 if it was used for a
/// different request; `None` while it is still running.
async fn finished_answer(
    pool: &PgPool,
    request: &KeyedRequest<'_>,
) -> Result<Option<StoredResponse>, ApiError> {
    let row: Option<StoredKey> = sqlx::query_as(
        "SELECT fingerprint, response_status, response_headers, response_body
         FROM idempotency_keys
         WHERE client = $1 AND route = $2 AND key = $3 AND expires_at >= now()",
    )
    .bind(request.client)
    .bind(request.route)
    .bind(request.key.as_str())
    .fetch_optional(pool)
    .await?;
    let Some(stored) = row else {
        return Ok(None);
    };
    if stored.fingerprint.as_slice() != request.fingerprint.as_slice() {
        let detail = "This Idempotency-Key was used with a different request. Use a new key for a new request.";
        return Err(ApiError::client(ProblemType::IdempotencyKeyReused, detail));
    }
    let (Some(status), Some(body)) = (stored.response_status, stored.response_body) else {
        return Ok(None);
    };
    Ok(Some(StoredResponse {
        status: u16::try_from(status).unwrap_or(500),
        headers: headers_from_json(&stored.response_headers),
        body,
    }))
}

fn in_progress() -> ApiError {
    let detail = "A request with this Idempotency-Key is still running. Retry after a moment.";
    ApiError::client(ProblemType::IdempotencyKeyInProgress, detail).retry_after(1)
}

/// Stores the answer inside the caller's transaction, so the key completes
/// exactly when the work it guards commits. Returns false when the lease was
/// lost to a takeover; the new owner then records the same Stripe session.
pub async fn complete(
    tx: &mut PgConnection,
    request: &KeyedRequest<'_>,
    lease: Lease,
    response: &StoredResponse,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE idempotency_keys
         SET state = 'completed', response_status = $5, response_headers = $6,
             response_body = $7, completed_at = now()
         WHERE client = $1 AND route = $2 AND key = $3 AND owner = $4",
    )
    .bind(request.client)
    .bind(request.route)
    .bind(request.key.as_str())
    .bind(lease.owner)
    .bind(i16::try_from(response.status).unwrap_or(500))
    .bind(headers_to_json(&response.headers))
    .bind(&response.body)
    .execute(tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives the key back after a failure, so the client may retry with it.
pub async fn release(
    pool: &PgPool,
    request: &KeyedRequest<'_>,
    lease: Lease,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM idempotency_keys
         WHERE client = $1 AND route = $2 AND key = $3 AND owner = $4 AND state = 'in_progress'",
    )
    .bind(request.client)
    .bind(request.route)
    .bind(request.key.as_str())
    .bind(lease.owner)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes expired keys, at most `batch` per statement and `batches` in all,
/// so a backlog never holds long locks. Returns how many went.
pub async fn sweep_expired(pool: &PgPool, batch: i64, batches: usize) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    for _ in 0..batches {
        let deleted = sqlx::query(
            "DELETE FROM idempotency_keys WHERE (client, route, key) IN (
                 SELECT client, route, key FROM idempotency_keys
                 WHERE expires_at < now() LIMIT $1)",
        )
        .bind(batch)
        .execute(pool)
        .await?
        .rows_affected();
        total += deleted;
        if deleted < u64::try_from(batch).unwrap_or(0) {
            break;
        }
    }
    Ok(total)
}

fn headers_to_json(headers: &[(String, String)]) -> Value {
    headers
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(value.clone())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn headers_from_json(value: &Value) -> Vec<(String, String)> {
    let Some(map) = value.as_object() else {
        return Vec::new();
    };
    map.iter()
        .filter_map(|(name, v)| Some((name.clone(), v.as_str()?.to_owned())))
        .collect()
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
    fn the_outbound_key_is_stable_and_bound_to_client_key_and_request() {
        let key = IdempotencyKey("k1".into());
        let request = |client, fingerprint| KeyedRequest {
            client,
            route: "POST /v1/checkout/sessions",
            key: &key,
            fingerprint,
        };
        let one = request("shop-a", [1; 32]).outbound_key();
        assert_eq!(one, request("shop-a", [1; 32]).outbound_key());
        assert_ne!(one, request("shop-a", [2; 32]).outbound_key());
        assert_ne!(one, request("shop-b", [1; 32]).outbound_key());
        assert!(one.len() <= 255);
        assert_eq!(request("shop-a", [1; 32]).reference().len(), 32);
    }
}
