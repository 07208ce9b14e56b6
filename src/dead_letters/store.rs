//! The dead_letters and dead_letter_attempts tables.

use base64::{Engine, prelude::BASE64_STANDARD};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    crypto::{Keyring, PayloadContext, PayloadError, Sealed},
    events::store::StoredEvent,
};

/// Every status an entry can have; only an open one is replayed or discarded.
pub const STATUSES: [&str; 3] = ["open", "resolved", "discarded"];

/// A summary line, as `GET /v1/dead-letters` and `payments dlq list` show it.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct DeadLetterSummary {
    pub id: i64,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub reason: String,
    pub detail: String,
    pub status: String,
    pub attempts: i64,
    pub created_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub discarded_at: Option<DateTime<Utc>>,
    pub discard_reason: Option<String>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Attempt {
    pub attempted_at: DateTime<Utc>,
    pub outcome: String,
    pub detail: String,
}

/// One entry with its payload and its replay history.
#[derive(Debug, Serialize)]
pub struct DeadLetterDetail {
    #[serde(flatten)]
    pub summary: DeadLetterSummary,
    pub payload_bytes: Option<usize>,
    /// The payload as text (invalid UTF-8 shown as U+FFFD), decrypted.
    /// Operators need it to judge a malformed delivery; it is never logged.
    /// Null once purged, or when it cannot be decrypted.
    pub payload: Option<String>,
    /// The exact bytes, base64: text cannot show bytes that are not UTF-8.
    pub payload_base64: Option<String>,
    pub payload_purged_at: Option<DateTime<Utc>>,
    /// Why a stored payload could not be decrypted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_error: Option<String>,
    pub replays: Vec<Attempt>,
}

/// The locked entry a replay works on.
#[derive(Debug, sqlx::FromRow)]
pub struct LockedEntry {
    pub id: i64,
    pub event_id: Option<String>,
    pub status: String,
    /// Sealed under `payload_key_id`; both are null once purged.
    pub payload: Option<Vec<u8>>,
    pub payload_key_id: Option<Uuid>,
}

impl LockedEntry {
    /// The quarantined bytes, decrypted.
    pub async fn open_payload(&self, keyring: &Keyring) -> Result<Vec<u8>, PayloadError> {
        let context = PayloadContext::DeadLetter(self.id);
        let sealed = self.payload.as_deref();
        keyring
            .open_stored(context, self.payload_key_id, sealed)
            .await
    }
}

/// Draws the id of an entry about to be inserted, so its payload can be
/// sealed for it first.
pub async fn next_id(tx: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('dead_letters', 'id'))")
        .fetch_one(tx)
        .await
}

/// Quarantines a delivery whose authentic bytes are not a usable event. The
/// payload is sealed for `PayloadContext::DeadLetter(id)`, `id` from [`next_id`].
pub async fn insert_malformed(
    tx: &mut PgConnection,
    id: i64,
    reason: &str,
    detail: &str,
    payload: &Sealed,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dead_letters (id, reason, detail, payload, payload_key_id)
         OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(reason)
    .bind(detail)
    .bind(&payload.bytes)
    .bind(payload.key_id)
    .execute(tx)
    .await?;
    Ok(())
}

/// Quarantines a stored event that failed to apply. Its payload stays in the
/// event store and is not copied.
pub async fn insert_for_event(
    tx: &mut PgConnection,
    event: &StoredEvent,
    detail: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dead_letters (event_id, event_type, reason, detail)
         VALUES ($1, $2, 'apply_failed', $3)",
    )
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(detail)
    .execute(tx)
    .await?;
    Ok(())
}

const SUMMARY_COLUMNS: &str = "d.id, d.event_id, d.event_type, d.reason, d.detail, d.status,
    (SELECT count(*) FROM dead_letter_attempts a WHERE a.dead_letter_id = d.id) AS attempts,
    d.created_at, d.resolved_at, d.discarded_at, d.discard_reason";

pub async fn list(
    pool: &PgPool,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetterSummary>, sqlx::Error> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS} FROM dead_letters d
         WHERE $1::text IS NULL OR d.status = $1
         ORDER BY d.id DESC LIMIT $2"
    );
    sqlx::query_as(&sql)
        .bind(status)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// Where an entry's payload is stored: its own, or else its event's.
#[derive(sqlx::FromRow)]
struct StoredPayload {
    own: Option<Vec<u8>>,
    own_key_id: Option<Uuid>,
    own_purged_at: Option<DateTime<Utc>>,
    event_payload: Option<Vec<u8>>,
    event_key_id: Option<Uuid>,
    event_purged_at: Option<DateTime<Utc>>,
}

pub async fn find(
    pool: &PgPool,
    keyring: &Keyring,
    id: i64,
) -> Result<Option<DeadLetterDetail>, sqlx::Error> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS},
                d.payload AS own, d.payload_key_id AS own_key_id,
                d.payload_purged_at AS own_purged_at,
                e.payload AS event_payload, e.payload_key_id AS event_key_id,
                e.payload_purged_at AS event_purged_at
         FROM dead_letters d LEFT JOIN webhook_events e ON e.id = d.event_id
         WHERE d.id = $1"
    );
    let row = sqlx::query(&sql).bind(id).fetch_optional(pool).await?;
    let Some(row) = row else {
        return Ok(None);
    };
    use sqlx::FromRow;
    let summary = DeadLetterSummary::from_row(&row)?;
    let stored = StoredPayload::from_row(&row)?;
    let (opened, purged_at) = open_for_operator(keyring, &summary, stored).await;
    let (payload, payload_error) = match opened {
        Ok(bytes) => (Some(bytes), None),
        Err(PayloadError::Database(err)) => return Err(err),
        Err(PayloadError::Purged) => (None, None),
        Err(err) => (None, Some(err.to_string())),
    };
    Ok(Some(DeadLetterDetail {
        summary,
        payload_bytes: payload.as_ref().map(Vec::len),
        payload_base64: payload.as_ref().map(|p| BASE64_STANDARD.encode(p)),
        payload: payload.map(|p| String::from_utf8_lossy(&p).into_owned()),
        payload_purged_at: purged_at,
        payload_error,
        replays: attempts(pool, id).await?,
    }))
}

/// The entry's own payload when it holds one, else its event's, decrypted,
/// with when it was purged if it was.
async fn open_for_operator(
    keyring: &Keyring,
    entry: &DeadLetterSummary,
    stored: StoredPayload,
) -> (Result<Vec<u8>, PayloadError>, Option<DateTime<Utc>>) {
    match (&stored.own, &entry.event_id) {
        (None, Some(event_id)) => {
            let context = PayloadContext::Event(event_id);
            let sealed = stored.event_payload.as_deref();
            let opened = keyring
                .open_stored(context, stored.event_key_id, sealed)
                .await;
            (opened, stored.event_purged_at)
        }
        _ => {
            let context = PayloadContext::DeadLetter(entry.id);
            let sealed = stored.own.as_deref();
            let opened = keyring
                .open_stored(context, stored.own_key_id, sealed)
                .await;
            (opened, stored.own_purged_at)
        }
    }
}

async fn attempts(pool: &PgPool, id: i64) -> Result<Vec<Attempt>, sqlx::Error> {
    sqlx::query_as(
        "SELECT attempted_at, outcome, detail FROM dead_letter_attempts
         WHERE dead_letter_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
}

/// Locks an entry for a replay. NO KEY UPDATE still excludes a second replay
/// and a discard, but not the key-share locks that foreign keys take, so a
/// replay job can be created (its items reference entries) while one runs.
pub async fn lock(tx: &mut PgConnection, id: i64) -> Result<Option<LockedEntry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, event_id, status, payload, payload_key_id FROM dead_letters
         WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(id)
    .fetch_optional(tx)
    .await
}

pub async fn record_attempt(
    tx: &mut PgConnection,
    id: i64,
    resolved: bool,
    detail: &str,
) -> Result<(), sqlx::Error> {
    let outcome = if resolved { "resolved" } else { "failed" };
    sqlx::query(
        "INSERT INTO dead_letter_attempts (dead_letter_id, outcome, detail) VALUES ($1, $2, $3)",
    )
    .bind(id)
    .bind(outcome)
    .bind(detail)
    .execute(&mut *tx)
    .await?;
    if resolved {
        sqlx::query(
            "UPDATE dead_letters SET status = 'resolved', resolved_at = now() WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Points a malformed entry at the event its bytes turned out to be, once a
/// replay could parse them.
pub async fn link_event(
    tx: &mut PgConnection,
    id: i64,
    event_id: &str,
    event_type: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE dead_letters SET event_id = $2, event_type = $3 WHERE id = $1")
        .bind(id)
        .bind(event_id)
        .bind(event_type)
        .execute(tx)
        .await?;
    Ok(())
}

/// Why an entry was quarantined, as the `reason` column holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    MalformedPayload,
    NotAnEvent,
    ApplyFailed,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Self::MalformedPayload, Self::NotAnEvent, Self::ApplyFailed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedPayload => "malformed_payload",
            Self::NotAnEvent => "not_an_event",
            Self::ApplyFailed => "apply_failed",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == raw)
    }
}

/// An operator's reason for discarding an entry: 1 to 500 characters once
/// surrounding whitespace is trimmed, so a blank reason cannot pass.
#[derive(Clone, Debug)]
pub struct DiscardReason(String);

impl DiscardReason {
    pub const MAX_CHARS: usize = 500;

    pub fn parse(raw: &str) -> Option<Self> {
        let trimmed = raw.trim();
        let chars = trimmed.chars().count();
        (1..=Self::MAX_CHARS)
            .contains(&chars)
            .then(|| Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("no dead letter with id {0}")]
    NotFound(i64),
    #[error("dead letter {id} is {status}, not open")]
    Closed { id: i64, status: String },
    #[error("database error during discard")]
    Database(#[from] sqlx::Error),
}

/// Marks an open entry discarded. The row is kept with its payload and
/// history. The status condition is checked by the UPDATE itself, so a replay
/// holding the row finishes first and a resolved entry is not discarded.
pub async fn discard(
    pool: &PgPool,
    id: i64,
    reason: &DiscardReason,
    by: &str,
    context: Option<&crate::audit::RequestContext>,
) -> Result<DeadLetterSummary, DiscardError> {
    let mut tx = pool.begin().await?;
    let changed = sqlx::query(
        "UPDATE dead_letters
         SET status = 'discarded', discarded_at = now(), discard_reason = $2
         WHERE id = $1 AND status = 'open'",
    )
    .bind(id)
    .bind(reason.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed == 1 {
        let resource = format!("dead_letter:{id}");
        let record =
            crate::audit::Record::new(by, "dead_letter.discarded", crate::audit::Outcome::Done)
                .resource(&resource)
                .reason(reason.as_str())
                .context(context);
        crate::audit::record(&mut *tx, &record).await?;
    }
    tx.commit().await?;
    let entry = summary(pool, id).await?.ok_or(DiscardError::NotFound(id))?;
    if changed == 0 {
        return Err(DiscardError::Closed {
            id,
            status: entry.status,
        });
    }
    tracing::info!(dead_letter_id = id, "dead letter discarded");
    Ok(entry)
}

/// Purges, in one bounded batch, the payloads of entries that are no longer
/// open and were created longer than `retention` ago; an open entry keeps its
/// payload, as an operator may still replay it.
pub async fn purge_payloads(
    pool: &PgPool,
    retention: std::time::Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    crate::db::purge_batch(
        pool,
        "UPDATE dead_letters
         SET payload = NULL, payload_key_id = NULL, payload_purged_at = now()
         WHERE id IN (
             SELECT id FROM dead_letters
             WHERE payload IS NOT NULL AND status <> 'open'
               AND created_at < now() - make_interval(secs => $1)
             ORDER BY id
             LIMIT $2
             FOR UPDATE SKIP LOCKED)",
        retention,
        batch,
    )
    .await
}

pub async fn summary(pool: &PgPool, id: i64) -> Result<Option<DeadLetterSummary>, sqlx::Error> {
    let sql = format!("SELECT {SUMMARY_COLUMNS} FROM dead_letters d WHERE d.id = $1");
    sqlx::query_as(&sql).bind(id).fetch_optional(pool).await
}
