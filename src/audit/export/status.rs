//! Where each sink stands: its cursor, how far behind the sealed chain it is
//! (in records and in seconds), its last error, and whether an exporter
//! holds its lock right now. Read by the exporters for `/metrics` and by
//! `payments audit export-status`.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgExecutor, PgPool};

use crate::metrics;

pub const LAG_RECORDS: &str = "payments_audit_export_lag_records";
pub const LAG_SECONDS: &str = "payments_audit_export_lag_seconds";

/// How far one sink is behind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Lag {
    pub records: i64,
    /// Age of the oldest sealed record not yet sent; 0 when caught up.
    pub seconds: f64,
}

impl Lag {
    pub(super) fn publish(self, sink: &str) {
        metrics::set_gauge(
            LAG_RECORDS,
            "Sealed audit records not yet sent to the sink.",
            ("sink", sink),
            self.records as f64,
        );
        metrics::set_gauge(
            LAG_SECONDS,
            "Age of the oldest sealed audit record not yet sent to the sink.",
            ("sink", sink),
            self.seconds,
        );
    }
}

/// Measured with the database's clock, the one `occurred_at` was set by.
pub(super) async fn lag(executor: impl PgExecutor<'_>, sink: &str) -> Result<Lag, sqlx::Error> {
    let (records, seconds): (i64, f64) = sqlx::query_as(
        "SELECT greatest(h.head - coalesce(c.last_seq, 0), 0),
                coalesce(extract(epoch FROM clock_timestamp() - o.occurred_at), 0)::float8
         FROM (SELECT coalesce(max(chain_seq), 0) AS head FROM audit_records) h
         LEFT JOIN audit_export_cursors c ON c.sink = $1
         LEFT JOIN audit_records o ON o.chain_seq = coalesce(c.last_seq, 0) + 1",
    )
    .bind(sink)
    .fetch_one(executor)
    .await?;
    Ok(Lag {
        records,
        seconds: seconds.max(0.0),
    })
}

/// The session-level advisory lock that lets one exporter per sink run.
pub(super) fn lock_key(sink: &str) -> i64 {
    let digest = Sha256::digest(format!("payments.audit_export:{sink}"));
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(key)
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct SinkStatus {
    pub sink: String,
    /// The last `chain_seq` handed to the sink.
    pub last_seq: i64,
    /// The last sealed `chain_seq`.
    pub head: i64,
    pub lag_records: i64,
    pub lag_seconds: f64,
    /// When the cursor last moved (or the row was made).
    pub updated_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// Whether some replica's exporter holds this sink's lock now.
    #[sqlx(skip)]
    pub exporting: bool,
}

/// Every sink that has a cursor, by name.
pub async fn export_status(pool: &PgPool) -> anyhow::Result<Vec<SinkStatus>> {
    let mut sinks: Vec<SinkStatus> = sqlx::query_as(
        "SELECT c.sink, c.last_seq, h.head, greatest(h.head - c.last_seq, 0) AS lag_records,
                coalesce(extract(epoch FROM clock_timestamp() - o.occurred_at), 0)::float8
                    AS lag_seconds,
                c.updated_at, c.last_error
         FROM audit_export_cursors c
         CROSS JOIN (SELECT coalesce(max(chain_seq), 0) AS head FROM audit_records) h
         LEFT JOIN audit_records o ON o.chain_seq = c.last_seq + 1
         ORDER BY c.sink",
    )
    .fetch_all(pool)
    .await
    .context("read audit export cursors")?;
    for sink in &mut sinks {
        sink.exporting = lock_held(pool, &sink.sink)
            .await
            .context("look for the exporter's lock")?;
    }
    Ok(sinks)
}

/// A bigint advisory key shows in `pg_locks` as its high and low halves.
async fn lock_held(pool: &PgPool, sink: &str) -> Result<bool, sqlx::Error> {
    let key = lock_key(sink);
    let high = (key >> 32) & 0xffff_ffff;
    let low = key & 0xffff_ffff;
    sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND objsubid = 1
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND classid = $1::bigint::oid AND objid = $2::bigint::oid)",
    )
    .bind(high)
    .bind(low)
    .fetch_one(pool)
    .await
}
