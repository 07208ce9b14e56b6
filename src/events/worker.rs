//! The event worker: applies stored events to payment state, apart from the
//! ingress, so a slow or failing apply never delays Stripe's 2xx.
//!
//! Each worker task claims one due event at a time with `FOR UPDATE SKIP
//! LOCKED` and applies it in that transaction, so any number of tasks and
//! replicas share the queue and each event is applied once. Workers wake on
//! `LISTEN/NOTIFY` (any replica's ingress), on the local ingress, and on a
//! periodic sweep that recovers a lost notification. An event waiting for its
//! session is retried with exponential backoff and jitter; when its attempts
//! run out it is dead-lettered (or, if nothing says it is ours, ignored).

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use rand::Rng;
use sqlx::{Connection, PgConnection, PgPool, postgres::PgListener};
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use super::{
    apply::{self, ApplyError, WhenExhausted},
    store::{self, EventStatus, StoredEvent},
};
use crate::{
    config::WorkerConfig,
    crypto::{Keyring, PayloadError},
    dead_letters,
};

/// The channel the ingress notifies after committing new pending events.
pub const CHANNEL: &str = "payments_events";

/// Even without a wake-up, pending work is looked for this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
const ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// The result of running one event through processing.
#[derive(Debug)]
pub enum Processed {
    /// Applied, or recorded as needing nothing; `detail` says which.
    Done { status: EventStatus, detail: String },
    /// Cannot be applied; belongs in the dead letters.
    Failed { reason: String },
    /// Its session is not recorded yet; try again later.
    NotYet {
        reason: String,
        when_exhausted: WhenExhausted,
    },
}

/// Applies one event inside the caller's transaction. The apply runs in a
/// savepoint, so a refused event leaves nothing half-written behind it. A
/// payload that cannot be decrypted (or was purged) fails the event: that
/// will not change on a retry, and an operator must look.
pub async fn process(
    tx: &mut PgConnection,
    keyring: &Keyring,
    event: &StoredEvent,
) -> Result<Processed, sqlx::Error> {
    if !apply::handles(&event.event_type) {
        return Ok(Processed::Done {
            status: EventStatus::Ignored,
            detail: "event type not handled".to_owned(),
        });
    }
    let payload = match event.open_payload(keyring).await {
        Ok(payload) => payload,
        Err(PayloadError::Database(err)) => return Err(err),
        Err(err) => {
            return Ok(Processed::Failed {
                reason: err.to_string(),
            });
        }
    };
    let mut savepoint = tx.begin().await?;
    let result = apply::apply(&mut savepoint, &event.event_type, event.created, &payload).await;
    let processed = match result {
        Ok(apply::Applied::Changed(detail) | apply::Applied::Unchanged(detail)) => {
            Processed::Done {
                status: EventStatus::Processed,
                detail,
            }
        }
        Ok(apply::Applied::Foreign(detail)) => Processed::Done {
            status: EventStatus::Ignored,
            detail,
        },
        Err(ApplyError::Rejected(reason)) => Processed::Failed { reason },
        Err(ApplyError::NotYet {
            reason,
            when_exhausted,
        }) => Processed::NotYet {
            reason,
            when_exhausted,
        },
        // A broken constraint will break the same way on every retry: the
        // event contradicts what is stored, which is for an operator to see.
        Err(ApplyError::Database(sqlx::Error::Database(db)))
            if is_integrity(db.code().as_deref()) =>
        {
            Processed::Failed {
                reason: format!(
                    "contradicts stored state ({})",
                    db.constraint().unwrap_or("constraint")
                ),
            }
        }
        Err(ApplyError::Database(err)) => return Err(err),
    };
    match processed {
        Processed::Done { .. } => savepoint.commit().await?,
        _ => savepoint.rollback().await?,
    }
    Ok(processed)
}

/// SQLSTATE class 23: integrity constraint violations.
fn is_integrity(code: Option<&str>) -> bool {
    code.is_some_and(|c| c.starts_with("23"))
}

/// What a worker needs besides the pool.
#[derive(Clone)]
pub struct Worker {
    pub pool: PgPool,
    pub config: WorkerConfig,
    /// Names this process in `processed_by`.
    pub instance: Arc<str>,
    /// Decrypts the stored payloads.
    pub keyring: Keyring,
}

impl Worker {
    /// Processes the due event that waited longest, if any. Returns whether
    /// one was found.
    pub async fn process_next(&self) -> anyhow::Result<bool> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context("begin worker transaction")?;
        let Some(event) = store::claim_next(&mut tx)
            .await
            .context("claim pending event")?
        else {
            return Ok(false);
        };
        let span = tracing::info_span!("process event", event_id = %event.id, event_type = %event.event_type);
        let finished = self.finish(&mut tx, &event).instrument(span.clone()).await;
        match finished {
            Ok(()) => {
                tx.commit().await.context("commit processed event")?;
            }
            Err(err) if unavailable(&err) => return Err(err),
            Err(err) => {
                // Roll back whatever the failed step left, then count the
                // failure on its own so a poison event cannot loop forever.
                tx.rollback().await.context("roll back failed event")?;
                self.record_error(&event, &err).instrument(span).await?;
            }
        }
        Ok(true)
    }

    /// An unexpected error while processing: counted as an attempt, retried
    /// with backoff, and dead-lettered when the attempts run out.
    async fn record_error(&self, event: &StoredEvent, err: &anyhow::Error) -> anyhow::Result<()> {
        tracing::error!(error = format!("{err:#}"), "event processing failed");
        let mut tx = self.pool.begin().await.context("begin error record")?;
        let Some(mut failed) = store::lock(&mut tx, &event.id).await? else {
            return Ok(());
        };
        failed.attempts += 1;
        store::count_attempt(&mut tx, &event.id).await?;
        let reason = "processing failed with an internal error; see the service log";
        self.retry_or_give_up(&mut tx, &failed, reason, WhenExhausted::DeadLetter)
            .await?;
        tx.commit().await.context("commit error record")?;
        Ok(())
    }

    async fn finish(&self, tx: &mut PgConnection, event: &StoredEvent) -> anyhow::Result<()> {
        let by = &*self.instance;
        let processed = process(tx, &self.keyring, event).await;
        match processed.context("apply event")? {
            Processed::Done { status, detail } => {
                store::mark(tx, &event.id, status, &detail, by).await?;
                tracing::info!(status = status.as_str(), detail = %detail, "event processed");
            }
            Processed::Failed { reason } => dead_letter(tx, event, &reason, by).await?,
            Processed::NotYet {
                reason,
                when_exhausted,
            } => {
                self.retry_or_give_up(tx, event, &reason, when_exhausted)
                    .await?
            }
        }
        Ok(())
    }

    async fn retry_or_give_up(
        &self,
        tx: &mut PgConnection,
        event: &StoredEvent,
        reason: &str,
        when_exhausted: WhenExhausted,
    ) -> anyhow::Result<()> {
        let attempts = u32::try_from(event.attempts).unwrap_or(u32::MAX);
        if attempts < self.config.max_attempts {
            let delay = backoff(attempts, &self.config);
            store::reschedule(tx, &event.id, delay, reason).await?;
            tracing::info!(
                attempts,
                delay_ms = delay.as_millis() as u64,
                reason,
                "event retried later"
            );
            return Ok(());
        }
        let gave_up = format!("{reason} (gave up after {attempts} attempts)");
        match when_exhausted {
            WhenExhausted::DeadLetter => dead_letter(tx, event, &gave_up, &self.instance).await,
            WhenExhausted::IgnoreAsForeign => {
                let detail = format!("foreign: {gave_up}");
                store::mark(tx, &event.id, EventStatus::Ignored, &detail, &self.instance).await?;
                tracing::info!(detail = %detail, "event ignored as foreign");
                Ok(())
            }
        }
    }

    /// Runs one worker task until shutdown. A claimed event is always
    /// finished (its transaction commits or rolls back) before it returns.
    pub async fn run(self, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let pause = match self.process_next().await {
                Ok(true) => {
                    // There may be more: let a sibling task help.
                    wake.notify_one();
                    continue;
                }
                Ok(false) => self.until_next_due().await,
                Err(err) => {
                    tracing::error!(error = format!("{err:#}"), "event worker step failed");
                    ERROR_BACKOFF
                }
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Sleeps no longer than until the next retry falls due.
    async fn until_next_due(&self) -> Duration {
        match store::next_due(&self.pool).await {
            Ok(Some(due)) => (due - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .clamp(Duration::from_millis(5), SWEEP_INTERVAL),
            Ok(None) => SWEEP_INTERVAL,
            Err(err) => {
                tracing::warn!(error = %err, "could not read the next due event");
                SWEEP_INTERVAL
            }
        }
    }
}

fn unavailable(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<sqlx::Error>())
        .any(crate::db::is_unavailable)
}

async fn dead_letter(
    tx: &mut PgConnection,
    event: &StoredEvent,
    reason: &str,
    by: &str,
) -> anyhow::Result<()> {
    dead_letters::store::insert_for_event(tx, event, reason)
        .await
        .context("dead-letter event")?;
    store::mark(tx, &event.id, EventStatus::DeadLettered, reason, by).await?;
    tracing::warn!(reason = %reason, "event dead-lettered");
    Ok(())
}

/// Exponential backoff with jitter: the nth retry waits between half and all
/// of base × 2^(n-1), capped; the jitter keeps replicas from retrying a burst
/// of events in lockstep.
pub fn backoff(attempts: u32, config: &WorkerConfig) -> Duration {
    let exponent = attempts.saturating_sub(1).min(30);
    let full = config
        .backoff_base
        .saturating_mul(1u32 << exponent)
        .min(config.backoff_max);
    let half = full / 2;
    half + full
        .saturating_sub(half)
        .mul_f64(rand::rng().random::<f64>())
}

/// Wakes local workers whenever any replica commits new pending events.
/// Reconnects by itself; while it is down the sweep still finds the work.
pub async fn listen(pool: PgPool, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        let listener = subscribe(&pool).await;
        let mut listener = match listener {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(
                    error = format!("{err:#}"),
                    "cannot listen for new events; sweeping only"
                );
                tokio::select! {
                    _ = tokio::time::sleep(ERROR_BACKOFF * 5) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        loop {
            tokio::select! {
                received = listener.recv() => match received {
                    Ok(_) => wake.notify_waiters(),
                    Err(err) => {
                        tracing::warn!(error = %err, "event notification stream broke; reconnecting");
                        break;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

async fn subscribe(pool: &PgPool) -> anyhow::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool)
        .await
        .context("connect listener")?;
    listener.listen(CHANNEL).await.context("LISTEN")?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WorkerConfig {
        WorkerConfig {
            concurrency: 1,
            max_attempts: 8,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        }
    }

    #[test]
    fn backoff_doubles_within_jitter_and_is_capped() {
        for attempts in 1..=10u32 {
            let full =
                Duration::from_millis(100 * 2u64.pow(attempts - 1)).min(Duration::from_secs(1));
            for _ in 0..50 {
                let delay = backoff(attempts, &config());
                assert!(delay >= full / 2 && delay <= full, "{attempts}: {delay:?}");
            }
        }
    }
}
