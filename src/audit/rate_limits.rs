//! Rate-limit decisions, audited without letting a flood turn into a write
//! per refused request: refusals are counted in memory per limiter and
//! source, and each minute one record per pair says how many were refused.
//! A crash loses at most the last minute's counts; the metrics count them
//! as they happen.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use sqlx::PgPool;
use tokio::sync::watch;

use super::{Outcome, Record, Severity};

const FLUSH_EVERY: Duration = Duration::from_secs(60);
/// Distinct pairs kept between flushes; past it refusals are only counted
/// under the `other` source.
const MAX_PAIRS: usize = 10_000;

type Counts = HashMap<(&'static str, Option<IpAddr>), u64>;

fn counts() -> &'static Mutex<Counts> {
    static COUNTS: OnceLock<Mutex<Counts>> = OnceLock::new();
    COUNTS.get_or_init(|| Mutex::new(HashMap::new()))
}

pub fn note(limiter: &'static str, source: Option<IpAddr>) {
    let mut counts = counts()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let key = if counts.len() < MAX_PAIRS || counts.contains_key(&(limiter, source)) {
        (limiter, source)
    } else {
        (limiter, None)
    };
    *counts.entry(key).or_insert(0) += 1;
}

/// Writes one record per limiter and source refused since the last flush.
pub async fn flush(pool: &PgPool) -> Result<usize, sqlx::Error> {
    let taken: Counts = std::mem::take(&mut *counts().lock().unwrap_or_else(|p| p.into_inner()));
    if taken.is_empty() {
        return Ok(0);
    }
    // Owned texts first: the records borrow them.
    let texts: Vec<(Option<IpAddr>, String, String)> = taken
        .iter()
        .map(|(&(limiter, source), n)| {
            (
                source,
                format!("limiter:{limiter}"),
                format!("{n} requests refused"),
            )
        })
        .collect();
    let records: Vec<Record> = texts
        .iter()
        .map(|(source, resource, reason)| {
            let mut record = Record::new("anonymous", "rate_limit.applied", Outcome::Refused)
                .resource(resource)
                .reason(reason)
                .severity(Severity::Warning);
            record.source = *source;
            record
        })
        .collect();
    if let Err(err) = super::record_many(pool, &records).await {
        // Put the counts back for the next flush rather than lose them.
        let mut counts = counts().lock().unwrap_or_else(|p| p.into_inner());
        for (key, n) in taken {
            *counts.entry(key).or_insert(0) += n;
        }
        return Err(err);
    }
    Ok(records.len())
}

pub async fn run(pool: PgPool, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(FLUSH_EVERY) => false,
            _ = shutdown.wait_for(|stop| *stop) => true,
        };
        if let Err(err) = flush(&pool).await {
            tracing::warn!(error = %err, "rate-limit audit records not written; kept for the next flush");
        }
        if stopping {
            return;
        }
    }
}
