//! Dead letters: authentic input that could not become payment state, kept
//! with its reason until an operator replays it.
//!
//! A replay parses and applies the stored bytes again. The signature verdict
//! from receipt stands and the timestamp window is not checked again: the
//! bytes were authentic when they arrived. Every attempt is recorded.

pub mod jobs;
pub mod routes;
pub mod store;

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::{
    crypto::{Keyring, PayloadContext, PayloadError},
    events::{
        store::{self as events, EventStatus, NewEvent},
        worker::{self, Processed},
    },
    webhooks::envelope,
};

#[derive(Debug, Serialize)]
pub struct ReplayReport {
    pub dead_letter_id: i64,
    /// `resolved` or `failed`.
    pub outcome: &'static str,
    pub detail: String,
    pub event_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no dead letter with id {0}")]
    NotFound(i64),
    /// Resolved or discarded: only an open entry is replayed.
    #[error("dead letter {id} is {status}, not open")]
    Closed { id: i64, status: String },
    #[error("database error during replay")]
    Database(#[from] sqlx::Error),
    /// The parsed event could not be sealed for storing.
    #[error("the replayed payload could not be encrypted")]
    Payload(#[source] PayloadError),
}

impl From<PayloadError> for ReplayError {
    fn from(err: PayloadError) -> Self {
        match err {
            PayloadError::Database(err) => Self::Database(err),
            other => Self::Payload(other),
        }
    }
}

/// What one replay attempt came to, before it is recorded.
struct Attempt {
    resolved: bool,
    detail: String,
    event_id: Option<String>,
}

/// Replays one dead letter in a single transaction: the entry is locked, so
/// two operators replaying it at once cannot both apply it.
/// Who asked for an operator action, and why; both go into its audit record.
#[derive(Clone, Copy, Debug)]
pub struct Requested<'a> {
    pub by: &'a str,
    pub reason: &'a str,
    pub context: Option<&'a crate::audit::RequestContext>,
}

impl Requested<'_> {
    fn record(
        &self,
        action: &'static str,
        outcome: crate::audit::Outcome,
    ) -> crate::audit::Record<'_> {
        crate::audit::Record::new(self.by, action, outcome)
            .reason(self.reason)
            .context(self.context)
    }
}

pub async fn replay(
    pool: &PgPool,
    keyring: &Keyring,
    id: i64,
    requested: Requested<'_>,
) -> Result<ReplayReport, ReplayError> {
    let mut tx = pool.begin().await?;
    let entry = store::lock(&mut tx, id)
        .await?
        .ok_or(ReplayError::NotFound(id))?;
    if entry.status != "open" {
        return Err(ReplayError::Closed {
            id,
            status: entry.status,
        });
    }
    let attempt = match &entry.event_id {
        Some(event_id) => replay_event(&mut tx, keyring, event_id).await?,
        None => replay_bytes(&mut tx, keyring, &entry).await?,
    };
    store::record_attempt(&mut tx, id, attempt.resolved, &attempt.detail).await?;
    let outcome = if attempt.resolved {
        crate::audit::Outcome::Done
    } else {
        crate::audit::Outcome::Failed
    };
    let resource = format!("dead_letter:{id}");
    let record = requested
        .record("dead_letter.replayed", outcome)
        .resource(&resource);
    crate::audit::record(&mut *tx, &record).await?;
    tx.commit().await?;
    tracing::info!(
        dead_letter_id = id,
        resolved = attempt.resolved,
        "dead letter replayed"
    );
    Ok(ReplayReport {
        dead_letter_id: id,
        outcome: if attempt.resolved {
            "resolved"
        } else {
            "failed"
        },
        detail: attempt.detail,
        event_id: attempt.event_id,
    })
}

/// A payload that cannot be read (purged, or not decryptable) is a failed
/// attempt with the reason; a database error is the replay's error.
fn unreadable(err: PayloadError, event_id: Option<String>) -> Result<Attempt, ReplayError> {
    match err {
        PayloadError::Database(err) => Err(ReplayError::Database(err)),
        err => Ok(Attempt {
            resolved: false,
            detail: err.to_string(),
            event_id,
        }),
    }
}

/// An event that was stored but failed to apply: apply it again. One whose
/// payload was purged is left as it is.
async fn replay_event(
    tx: &mut PgConnection,
    keyring: &Keyring,
    event_id: &str,
) -> Result<Attempt, ReplayError> {
    let Some(event) = events::lock(tx, event_id).await? else {
        return Ok(Attempt {
            resolved: false,
            detail: format!("event {event_id} is no longer stored"),
            event_id: Some(event_id.to_owned()),
        });
    };
    if event.payload.is_none() {
        return unreadable(PayloadError::Purged, Some(event.id));
    }
    let (resolved, detail) = apply_and_mark(tx, keyring, &event).await?;
    Ok(Attempt {
        resolved,
        detail,
        event_id: Some(event.id),
    })
}

/// Bytes that never parsed as an event: parse them again, and if they are an
/// event now, store and apply it like a fresh delivery.
async fn replay_bytes(
    tx: &mut PgConnection,
    keyring: &Keyring,
    entry: &store::LockedEntry,
) -> Result<Attempt, ReplayError> {
    let payload = match entry.open_payload(keyring).await {
        Ok(payload) => payload,
        Err(err) => return unreadable(err, None),
    };
    let envelope = match envelope::parse(&payload) {
        Ok(envelope) => envelope,
        Err(err) => {
            return Ok(Attempt {
                resolved: false,
                detail: format!("{}: {}", err.reason(), err.detail()),
                event_id: None,
            });
        }
    };
    let event_id = envelope.id.as_str().to_owned();
    let sealed = keyring
        .seal(PayloadContext::Event(&event_id), &payload)
        .await?;
    let new = NewEvent {
        envelope: &envelope,
        payload: sealed,
        status: EventStatus::Pending,
        detail: None,
    };
    if events::insert_batch(tx, &[new]).await?.is_empty() {
        let detail = "the event is already stored; it was delivered again since".to_owned();
        return Ok(Attempt {
            resolved: true,
            detail,
            event_id: Some(event_id),
        });
    }
    store::link_event(tx, entry.id, &event_id, &envelope.event_type).await?;
    replay_event(tx, keyring, &event_id).await
}

/// Names the replay in the event's `processed_by`.
const REPLAYED_BY: &str = "dead-letter replay";

async fn apply_and_mark(
    tx: &mut PgConnection,
    keyring: &Keyring,
    event: &events::StoredEvent,
) -> Result<(bool, String), sqlx::Error> {
    match worker::process(tx, keyring, event).await? {
        Processed::Done { status, detail } => {
            events::mark(tx, &event.id, status, &detail, REPLAYED_BY).await?;
            Ok((true, detail))
        }
        Processed::Failed { reason } => {
            events::mark(
                tx,
                &event.id,
                EventStatus::DeadLettered,
                &reason,
                REPLAYED_BY,
            )
            .await?;
            Ok((false, reason))
        }
        // The entry stays open and keeps the event; a later replay may find
        // the session. The worker must not pick the event up on its own.
        Processed::NotYet { reason, .. } => {
            let detail = format!("not yet: {reason}");
            events::mark(
                tx,
                &event.id,
                EventStatus::DeadLettered,
                &detail,
                REPLAYED_BY,
            )
            .await?;
            Ok((false, detail))
        }
    }
}
