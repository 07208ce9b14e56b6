//! The hash chain over audit records, and its verification.
//!
//! Records are written inside the transactions of the decisions they
//! describe, so they commit in an order no writer knows in advance. A single
//! sealer (one replica at a time, by advisory lock) gives committed records a
//! dense, gapless `chain_seq` in commit order and a hash:
//!
//! `hash(n) = sha256(hash(n-1) || encode(record n))`, with `hash(0)` all zeros.
//!
//! A record is sealed only once every transaction that could still insert a
//! record before it has finished (its writer's xid is older than the oldest
//! running transaction), so nothing can later appear behind it.
//!
//! `verify` recomputes the chain and names the first record that was altered,
//! removed or reordered.

use std::{fmt, time::Duration};

use anyhow::Context;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;

/// Any constant works; it only has to be the same for every replica.
const SEAL_LOCK: i64 = 0x7061_796d_656e_7473; // "payments"
const SEAL_BATCH: i64 = 1000;
const SEAL_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, sqlx::FromRow)]
struct Row {
    seq: i64,
    chain_seq: Option<i64>,
    hash: Option<Vec<u8>>,
    occurred_at: DateTime<Utc>,
    actor: String,
    action: String,
    resource: Option<String>,
    outcome: String,
    severity: String,
    reason: Option<String>,
    source_addr: Option<String>,
    request_id: Option<String>,
    trace_id: Option<String>,
    purpose: Option<String>,
    consent_ref: Option<String>,
}

const COLUMNS: &str =
    "seq, chain_seq, hash, occurred_at, actor, action, resource, outcome, severity,
    reason, source_addr, request_id, trace_id, purpose, consent_ref";

/// Every field, each length-prefixed (a missing one marked apart from an
/// empty one), so no two different records encode alike.
fn encode(chain_seq: i64, r: &Row) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&chain_seq.to_be_bytes());
    out.extend_from_slice(&r.seq.to_be_bytes());
    out.extend_from_slice(&r.occurred_at.timestamp_micros().to_be_bytes());
    let fields = [
        Some(r.actor.as_str()),
        Some(r.action.as_str()),
        r.resource.as_deref(),
        Some(r.outcome.as_str()),
        Some(r.severity.as_str()),
        r.reason.as_deref(),
        r.source_addr.as_deref(),
        r.request_id.as_deref(),
        r.trace_id.as_deref(),
        r.purpose.as_deref(),
        r.consent_ref.as_deref(),
    ];
    for field in fields {
        match field {
            None => out.push(0),
            Some(text) => {
                out.push(1);
                out.extend_from_slice(&(text.len() as u64).to_be_bytes());
                out.extend_from_slice(text.as_bytes());
            }
        }
    }
    out
}

fn link(previous: &[u8; 32], chain_seq: i64, r: &Row) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(previous);
    hash.update(encode(chain_seq, r));
    hash.finalize().into()
}

/// Seals what can be sealed now; returns how many records it sealed. Another
/// replica holding the lock makes this a no-op.
pub async fn seal_pending(pool: &PgPool) -> anyhow::Result<u64> {
    let mut tx = pool.begin().await.context("begin audit sealing")?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(SEAL_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(0);
    }
    let (mut chain_seq, mut previous) = head(&mut tx).await?;
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM audit_records
         WHERE chain_seq IS NULL AND writer_xid < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY seq LIMIT $1"
    ))
    .bind(SEAL_BATCH)
    .fetch_all(&mut *tx)
    .await
    .context("read unsealed audit records")?;
    for row in &rows {
        chain_seq += 1;
        previous = link(&previous, chain_seq, row);
        sqlx::query("UPDATE audit_records SET chain_seq = $1, hash = $2 WHERE seq = $3")
            .bind(chain_seq)
            .bind(previous.as_slice())
            .bind(row.seq)
            .execute(&mut *tx)
            .await
            .context("seal audit record")?;
    }
    tx.commit().await.context("commit audit sealing")?;
    Ok(rows.len() as u64)
}

/// The last sealed position and its hash.
async fn head(tx: &mut PgConnection) -> anyhow::Result<(i64, [u8; 32])> {
    let last: Option<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT chain_seq, hash FROM audit_records WHERE chain_seq IS NOT NULL
         ORDER BY chain_seq DESC LIMIT 1",
    )
    .fetch_optional(tx)
    .await
    .context("read the audit chain head")?;
    match last {
        None => Ok((0, [0; 32])),
        Some((seq, hash)) => {
            let hash: [u8; 32] = hash
                .try_into()
                .map_err(|_| anyhow::anyhow!("audit record {seq} has a malformed hash"))?;
            Ok((seq, hash))
        }
    }
}

/// Seals until shutdown.
pub async fn run(pool: PgPool, mut shutdown: watch::Receiver<bool>) {
    loop {
        match seal_pending(&pool).await {
            Ok(n) if n as i64 == SEAL_BATCH => continue,
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = format!("{err:#}"), "audit sealing failed; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(SEAL_INTERVAL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// What verification found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Intact {
        records: u64,
    },
    /// The first record whose stored hash does not match: it, or one before
    /// it, was altered, or records were reordered.
    Altered {
        chain_seq: i64,
        seq: i64,
    },
    /// A position in the chain has no record: it was removed.
    Missing {
        chain_seq: i64,
    },
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Intact { records } => write!(f, "audit chain intact: {records} records"),
            Self::Altered { chain_seq, seq } => write!(
                f,
                "audit chain broken at chain_seq {chain_seq} (record seq {seq}): altered or reordered"
            ),
            Self::Missing { chain_seq } => {
                write!(
                    f,
                    "audit chain broken at chain_seq {chain_seq}: record removed"
                )
            }
        }
    }
}

/// Recomputes the chain from the start, a page at a time.
pub async fn verify(pool: &PgPool) -> anyhow::Result<Verdict> {
    let mut previous = [0u8; 32];
    let mut expected = 1i64;
    loop {
        let page: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM audit_records WHERE chain_seq >= $1 ORDER BY chain_seq LIMIT 5000"
        ))
        .bind(expected)
        .fetch_all(pool)
        .await
        .context("read audit records")?;
        if page.is_empty() {
            return Ok(Verdict::Intact {
                records: (expected - 1) as u64,
            });
        }
        for row in &page {
            let chain_seq = row.chain_seq.unwrap_or_default();
            if chain_seq != expected {
                return Ok(Verdict::Missing {
                    chain_seq: expected,
                });
            }
            let hash = link(&previous, chain_seq, row);
            if row.hash.as_deref() != Some(hash.as_slice()) {
                return Ok(Verdict::Altered {
                    chain_seq,
                    seq: row.seq,
                });
            }
            previous = hash;
            expected += 1;
        }
    }
}
