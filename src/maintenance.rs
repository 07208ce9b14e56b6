//! Periodic housekeeping: expired webhook nonces, expired idempotency keys
//! and old forensic records, each deleted in bounded batches.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::{idempotency, webhooks::forensics};

const INTERVAL: Duration = Duration::from_secs(60);
/// Rows deleted per statement, so a sweep never holds long locks.
const BATCH: i64 = 5_000;
/// Batches per sweep; what remains waits for the next one.
const MAX_BATCHES: usize = 20;

pub async fn run(pool: PgPool, tolerance: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        sweep(&pool, tolerance).await;
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
