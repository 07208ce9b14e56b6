//! The event worker: applies stored events to payment state, apart from the
//! ingress, so a slow or failing apply never delays Stripe's 2xx.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use super::{
    apply::{self, ApplyError},
    store::{self, EventStatus, StoredEvent},
};
use crate::dead_letters;

/// Even without a wake-up, pending work is looked for this often: a wake-up
/// can be lost (another replica stored the event, or a crash between commit
/// and notify), and the sweep is what recovers it.
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
const ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// The result of running one event through processing.
#[derive(Debug)]
pub enum Processed {
    /// Applied or ignored; `detail` says what happened.
    Done { status: EventStatus, detail: String },
    /// Could not be applied; belongs in the dead letters.
    Failed { reason: String },
}

/// Applies one event inside the caller's transaction. The apply runs in a
/// savepoint, so a refused event leaves nothing half-written behind it.
pub async fn process(tx: &mut PgConnection, event: &StoredEvent) -> Result<Processed, sqlx::Error> {
    if !apply::handles(&event.event_type) {
        return Ok(Processed::Done {
            status: EventStatus::Ignored,
            detail: "event type not handled".to_owned(),
        });
    }
    let mut savepoint = tx.begin().await?;
    let result = apply::apply(
        &mut savepoint,
        &event.event_type,
        event.created,
        &event.payload,
    )
    .await;
    match result {
        Ok(applied) => {
            savepoint.commit().await?;
            Ok(Processed::Done {
                status: EventStatus::Processed,
                detail: applied.describe(),
            })
        }
        Err(ApplyError::Rejected(reason)) => {
            savepoint.rollback().await?;
            Ok(Processed::Failed { reason })
        }
        Err(ApplyError::Database(err)) => Err(err),
    }
}

/// Processes the oldest pending event, if any. Returns whether one was found.
pub async fn process_next(pool: &PgPool) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await.context("begin worker transaction")?;
    let Some(event) = store::claim_next(&mut tx)
        .await
        .context("claim pending event")?
    else {
        return Ok(false);
    };
    let span =
        tracing::info_span!("process event", event_id = %event.id, event_type = %event.event_type);
    record_outcome(&mut tx, &event).instrument(span).await?;
    tx.commit().await.context("commit processed event")?;
    Ok(true)
}

async fn record_outcome(tx: &mut PgConnection, event: &StoredEvent) -> anyhow::Result<()> {
    match process(tx, event).await.context("apply event")? {
        Processed::Done { status, detail } => {
            store::mark(tx, &event.id, status, &detail).await?;
            tracing::info!(status = status.as_str(), detail = %detail, "event processed");
        }
        Processed::Failed { reason } => {
            dead_letters::store::insert_for_event(tx, event, &reason)
                .await
                .context("dead-letter event")?;
            store::mark(tx, &event.id, EventStatus::DeadLettered, &reason).await?;
            tracing::warn!(reason = %reason, "event dead-lettered");
        }
    }
    Ok(())
}

/// Runs until shutdown: drains pending events, then sleeps until woken by
/// the ingress or the sweep interval passes. A claimed event is always
/// finished (its transaction commits or rolls back) before shutdown returns.
pub async fn run(pool: PgPool, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let pause = match process_next(&pool).await {
            Ok(true) => continue,
            Ok(false) => SWEEP_INTERVAL,
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
