//! The webhook_events table: verified Stripe events and their processing status.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    audit,
    crypto::{Keyring, PayloadContext, PayloadError, Sealed},
    webhooks::envelope::Envelope,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventStatus {
    Pending,
    Processed,
    Ignored,
    DeadLettered,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processed => "processed",
            Self::Ignored => "ignored",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// What processing needs of a stored event.
#[derive(Debug, sqlx::FromRow)]
pub struct StoredEvent {
    pub id: String,
    #[sqlx(rename = "type")]
    pub event_type: String,
    pub created: DateTime<Utc>,
    /// Sealed under `payload_key_id`; both are null once purged.
    pub payload: Option<Vec<u8>>,
    pub payload_key_id: Option<Uuid>,
    /// Attempts so far, this one included.
    pub attempts: i32,
}

impl StoredEvent {
    /// The delivered bytes, decrypted.
    pub async fn open_payload(&self, keyring: &Keyring) -> Result<Vec<u8>, PayloadError> {
        let context = PayloadContext::Event(&self.id);
        let sealed = self.payload.as_deref();
        keyring
            .open_stored(context, self.payload_key_id, sealed)
            .await
    }
}

/// What operators see of an event: metadata, never the payload, which
/// carries customer details.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct EventView {
    pub id: String,
    #[sqlx(rename = "type")]
    #[serde(rename = "type")]
    pub event_type: String,
    pub status: String,
    pub detail: Option<String>,
    pub api_version: Option<String>,
    pub livemode: bool,
    pub account: Option<String>,
    pub created: DateTime<Utc>,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub processed_by: Option<String>,
    pub received_at: DateTime<Utc>,
    pub processed_at: Option<DateTime<Utc>>,
    /// When the payload was removed after the retention period.
    pub payload_purged_at: Option<DateTime<Utc>>,
}

/// Claims the pending event that is due soonest, for this transaction. SKIP
/// LOCKED lets several workers, in one process or many, take different events;
/// the row lock is the claim, so a crashed worker's claim ends with its
/// connection and nothing needs releasing.
pub async fn claim_next(tx: &mut PgConnection) -> Result<Option<StoredEvent>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE webhook_events SET attempts = attempts + 1
         WHERE id = (
             SELECT id FROM webhook_events
             WHERE status = 'pending' AND next_attempt_at <= now()
             ORDER BY next_attempt_at
             LIMIT 1
             FOR UPDATE SKIP LOCKED)
         RETURNING id, type, created, payload, payload_key_id, attempts",
    )
    .fetch_optional(tx)
    .await
}

pub async fn lock(tx: &mut PgConnection, id: &str) -> Result<Option<StoredEvent>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, type, created, payload, payload_key_id, attempts
         FROM webhook_events WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(tx)
    .await
}

/// Records how processing ended, and audits it in the same transaction.
/// `by` names the worker's instance, or the replay that applied it.
pub async fn mark(
    tx: &mut PgConnection,
    id: &str,
    status: EventStatus,
    detail: &str,
    by: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_events
         SET status = $2, detail = $3, processed_at = now(), processed_by = $4
         WHERE id = $1",
    )
    .bind(id)
    .bind(status.as_str())
    .bind(detail)
    .bind(by)
    .execute(&mut *tx)
    .await?;
    let (action, outcome) = match status {
        EventStatus::Processed => ("event.processed", audit::Outcome::Done),
        EventStatus::Ignored => ("event.ignored", audit::Outcome::Done),
        EventStatus::DeadLettered => ("event.dead_lettered", audit::Outcome::Failed),
        EventStatus::Pending => ("event.pending", audit::Outcome::Done),
    };
    let actor = format!("system:{by}");
    let record = audit::Record::new(&actor, action, outcome)
        .resource(id)
        .reason(detail);
    audit::record(&mut *tx, &record).await
}

/// Counts an attempt that failed outside the claiming transaction.
pub async fn count_attempt(tx: &mut PgConnection, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE webhook_events SET attempts = attempts + 1 WHERE id = $1")
        .bind(id)
        .execute(tx)
        .await?;
    Ok(())
}

/// Leaves the event pending until `delay` has passed.
pub async fn reschedule(
    tx: &mut PgConnection,
    id: &str,
    delay: std::time::Duration,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_events
         SET next_attempt_at = now() + make_interval(secs => $2), last_error = $3
         WHERE id = $1",
    )
    .bind(id)
    .bind(delay.as_secs_f64())
    .bind(reason)
    .execute(tx)
    .await?;
    Ok(())
}

/// When the next pending event falls due, if any is waiting.
pub async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT min(next_attempt_at) FROM webhook_events WHERE status = 'pending'")
        .fetch_one(pool)
        .await
}

pub async fn find(pool: &PgPool, id: &str) -> Result<Option<EventView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, type, status, detail, api_version, livemode, account, created,
                attempts, next_attempt_at, last_error, processed_by, received_at, processed_at,
                payload_purged_at
         FROM webhook_events WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// A verified event about to be stored.
pub struct NewEvent<'a> {
    pub envelope: &'a Envelope,
    /// The delivered bytes, sealed for `PayloadContext::Event(id)`.
    pub payload: Sealed,
    pub status: EventStatus,
    pub detail: Option<&'a str>,
}

/// Inserts events in one statement and returns the ids that were new; an id
/// already stored is skipped, which is how Stripe's retries are deduplicated.
/// Callers pass rows sorted by id so concurrent batches lock keys in one order
/// and cannot deadlock.
pub async fn insert_batch(
    tx: &mut PgConnection,
    events: &[NewEvent<'_>],
) -> Result<Vec<String>, sqlx::Error> {
    let mut ids = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut versions = Vec::with_capacity(events.len());
    let mut livemodes = Vec::with_capacity(events.len());
    let mut accounts = Vec::with_capacity(events.len());
    let mut created = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    let mut key_ids = Vec::with_capacity(events.len());
    let mut statuses = Vec::with_capacity(events.len());
    let mut details = Vec::with_capacity(events.len());
    for event in events {
        let envelope = event.envelope;
        ids.push(envelope.id.as_str());
        types.push(envelope.event_type.as_str());
        versions.push(envelope.api_version.as_deref());
        livemodes.push(envelope.livemode);
        accounts.push(envelope.account.as_deref());
        created.push(envelope.created);
        payloads.push(event.payload.bytes.as_slice());
        key_ids.push(event.payload.key_id);
        statuses.push(event.status.as_str());
        details.push(event.detail);
    }
    let finished = events.iter().map(|e| e.status != EventStatus::Pending);
    let processed_at: Vec<Option<DateTime<Utc>>> =
        finished.map(|done| done.then(Utc::now)).collect();
    sqlx::query_scalar(
        "INSERT INTO webhook_events
             (id, type, api_version, livemode, account, created, payload, status, detail,
              processed_at, payload_key_id)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bool[], $5::text[],
                              $6::timestamptz[], $7::bytea[], $8::text[], $9::text[],
                              $10::timestamptz[], $11::uuid[])
         ON CONFLICT (id) DO NOTHING
         RETURNING id",
    )
    .bind(&ids)
    .bind(&types)
    .bind(&versions)
    .bind(&livemodes)
    .bind(&accounts)
    .bind(&created)
    .bind(&payloads)
    .bind(&statuses)
    .bind(&details)
    .bind(&processed_at)
    .bind(&key_ids)
    .fetch_all(tx)
    .await
}

/// Purges, in one bounded batch, the payloads of processed and ignored events
/// received longer than `retention` ago; everything else about them stays.
/// Pending and dead-lettered events keep theirs (they may be applied or
/// replayed), and so does an event with an open dead letter. Rows another
/// transaction holds are left for the next batch.
pub async fn purge_payloads(
    pool: &PgPool,
    retention: std::time::Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    crate::db::purge_batch(
        pool,
        "UPDATE webhook_events
         SET payload = NULL, payload_key_id = NULL, payload_purged_at = now()
         WHERE id IN (
             SELECT e.id FROM webhook_events e
             WHERE e.payload IS NOT NULL
               AND e.received_at < now() - make_interval(secs => $1)
               AND e.status IN ('processed', 'ignored')
               AND NOT EXISTS (SELECT 1 FROM dead_letters d
                               WHERE d.event_id = e.id AND d.status = 'open')
             ORDER BY e.received_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED)",
        retention,
        batch,
    )
    .await
}
