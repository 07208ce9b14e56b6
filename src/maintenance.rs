//! Periodic housekeeping: expired webhook nonces, expired idempotency keys
//! and old forensic records, each deleted in bounded batches; and stored
//! payloads past their retention, purged in bounded batches.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::{dead_letters, events, idempotency, webhooks::forensics};

const INTERVAL: Duration = Duration::from_secs(60);
/// Rows deleted per statement, so a sweep never holds long locks.
const BATCH: i64 = 5_000;
/// Batches per sweep; what remains waits for the next one.
const MAX_BATCHES: usize = 20;

pub async fn run(
    pool: PgPool,
    tolerance: Duration,
    payload_retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        sweep(&pool, tolerance).await;
        log_purge(purge_payloads(&pool, payload_retention).await);
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn sweep(pool: &PgPool, tolerance: Duration) {
    match sweep_nonces(pool, tolerance).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, "expired webhook nonces swept"),
        Err(err) => tracing::warn!(error = %err, "webhook nonce sweep failed"),
    }
    match idempotency::sweep_expired(pool, BATCH, MAX_BATCHES).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, "expired idempotency keys swept"),
        Err(err) => tracing::warn!(error = %err, "idempotency key sweep failed"),
    }
    match forensics::prune(pool).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, "old refused-delivery records pruned"),
        Err(err) => tracing::warn!(error = %err, "refused-delivery prune failed"),
    }
}

/// What a payload purge removed, per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    pub events: u64,
    pub dead_letters: u64,
    pub refused_deliveries: u64,
}

/// Purges payloads older than `retention`: of processed and ignored events,
/// of closed dead letters, and forensic body prefixes. Metadata stays, and
/// pending or dead-lettered events and open dead letters keep theirs.
pub async fn purge_payloads(pool: &PgPool, retention: Duration) -> Result<Purged, sqlx::Error> {
    Ok(Purged {
        events: batched(|| events::store::purge_payloads(pool, retention, BATCH)).await?,
        dead_letters: batched(|| dead_letters::store::purge_payloads(pool, retention, BATCH))
            .await?,
        refused_deliveries: batched(|| forensics::purge_prefixes(pool, retention, BATCH)).await?,
    })
}

fn log_purge(result: Result<Purged, sqlx::Error>) {
    match result {
        Ok(purged) if purged == Purged::default() => {}
        Ok(purged) => tracing::info!(
            events = purged.events,
            dead_letters = purged.dead_letters,
            refused_deliveries = purged.refused_deliveries,
            "payloads past retention purged"
        ),
        Err(err) => tracing::warn!(error = %err, "payload purge failed"),
    }
}

/// Runs `step` (one batch of at most `BATCH` rows) until a batch comes back
/// short or `MAX_BATCHES` ran; what remains waits for the next sweep.
async fn batched<F, Fut>(mut step: F) -> Result<u64, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, sqlx::Error>>,
{
    let mut total = 0;
    for _ in 0..MAX_BATCHES {
        let done = step().await?;
        total += done;
        if done < BATCH as u64 {
            break;
        }
    }
    Ok(total)
}

/// A nonce only matters while its timestamp is inside the window: after that
/// the delivery is refused as too old anyway. A minute of margin covers clock
/// differences between replicas.
async fn sweep_nonces(pool: &PgPool, tolerance: Duration) -> Result<u64, sqlx::Error> {
    let keep_secs = tolerance.as_secs_f64() + 60.0;
    let mut total = 0;
    for _ in 0..MAX_BATCHES {
        let deleted = sqlx::query(
            "DELETE FROM webhook_nonces WHERE signature IN (
                 SELECT signature FROM webhook_nonces
                 WHERE signed_at < now() - make_interval(secs => $1)
                 LIMIT $2)",
        )
        .bind(keep_secs)
        .bind(BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        total += deleted;
        if deleted < BATCH as u64 {
            break;
        }
    }
    Ok(total)
}
