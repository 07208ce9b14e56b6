//! KEK rotation for operators: moving every data key under the active KEK,
//! and showing which KEKs the stored data keys still need. Key material is
//! never shown.
//!
//! A rotation: put the new KEK first in `PAYMENTS_KEK_FILE`, keep the old one
//! below it, restart (new data keys are now wrapped by the new KEK), run
//! `payments keys rewrap`, check `payments keys status`, then remove the old
//! KEK from the file.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{Keyring, PayloadError, data_keys::StoredKey};

/// Data keys read per query while re-wrapping.
const BATCH: i64 = 500;

#[derive(Debug, Serialize)]
pub struct RewrapReport {
    pub active_kek: String,
    /// Data keys moved under the active KEK by this run.
    pub rewrapped: u64,
    /// Data keys under the active KEK now.
    pub under_active_kek: i64,
    /// Data keys left as they were, and why.
    pub failed: Vec<RewrapFailure>,
}

#[derive(Debug, Serialize)]
pub struct RewrapFailure {
    pub data_key: String,
    pub kek_id: String,
    pub reason: String,
}

/// Re-wraps every data key that another KEK wraps under the active one. A
/// key whose KEK is missing from the file, or does not unwrap it, is
/// reported and left alone; only a database error stops the run.
pub async fn rewrap(keyring: &Keyring) -> Result<RewrapReport, sqlx::Error> {
    let active = keyring.active_kek().id().to_owned();
    let mut report = RewrapReport {
        active_kek: active.clone(),
        rewrapped: 0,
        under_active_kek: 0,
        failed: Vec::new(),
    };
    // Keyset pagination: each batch starts after the last id seen, so the
    // loop ends once every key not under the active KEK was visited.
    let mut after = Uuid::nil();
    loop {
        let batch = not_under(keyring, &active, after).await?;
        for stored in &batch {
            match rewrap_one(keyring, stored).await {
                Ok(moved) => report.rewrapped += u64::from(moved),
                Err(PayloadError::Database(err)) => return Err(err),
                Err(err) => report.failed.push(RewrapFailure {
                    data_key: stored.id.to_string(),
                    kek_id: stored.kek_id.clone(),
                    reason: err.to_string(),
                }),
            }
        }
        match batch.last() {
            Some(last) if batch.len() as i64 == BATCH => after = last.id,
            _ => break,
        }
    }
    report.under_active_kek = count_under(keyring, &active).await?;
    tracing::info!(
        rewrapped = report.rewrapped,
        failed = report.failed.len(),
        "data keys re-wrapped"
    );
    Ok(report)
}

async fn not_under(
    keyring: &Keyring,
    kek_id: &str,
    after: Uuid,
) -> Result<Vec<StoredKey>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, kek_id, wrapped FROM data_keys
         WHERE kek_id <> $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(kek_id)
    .bind(after)
    .bind(BATCH)
    .fetch_all(keyring.pool())
    .await
}

/// Whether the key was moved; false when another run moved it first.
async fn rewrap_one(keyring: &Keyring, stored: &StoredKey) -> Result<bool, PayloadError> {
    let old = keyring
        .kek(&stored.kek_id)
        .ok_or_else(|| PayloadError::UnknownKek {
            data_key: stored.id,
            kek_id: stored.kek_id.clone(),
        })?;
    let material = old.unwrap(stored.id, &stored.wrapped).await?;
    let active = keyring.active_kek();
    let wrapped = active.wrap(stored.id, &material).await?;
    let moved = sqlx::query(
        "UPDATE data_keys SET kek_id = $2, wrapped = $3, rewrapped_at = now()
         WHERE id = $1 AND kek_id = $4",
    )
    .bind(stored.id)
    .bind(active.id())
    .bind(&wrapped)
    .bind(&stored.kek_id)
    .execute(keyring.pool())
    .await?
    .rows_affected();
    Ok(moved == 1)
}

async fn count_under(keyring: &Keyring, kek_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM data_keys WHERE kek_id = $1")
        .bind(kek_id)
        .fetch_one(keyring.pool())
        .await
}

/// Which KEKs the file holds and which the stored data keys need.
#[derive(Debug, Serialize)]
pub struct KeyStatus {
    pub active_kek: String,
    pub keks_in_file: Vec<String>,
    /// Per KEK that wraps at least one data key.
    pub data_keys: Vec<KekUsage>,
    /// KEKs in the file, other than the active one, that wrap no data key:
    /// they can be removed from the file.
    pub removable_keks: Vec<String>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct KekUsage {
    pub kek_id: String,
    pub data_keys: i64,
    pub oldest: DateTime<Utc>,
    pub newest: DateTime<Utc>,
    /// False means the payloads under these data keys cannot be read.
    #[sqlx(skip)]
    pub in_file: bool,
}

pub async fn status(keyring: &Keyring) -> Result<KeyStatus, sqlx::Error> {
    let mut usage: Vec<KekUsage> = sqlx::query_as(
        "SELECT kek_id, count(*) AS data_keys, min(created_at) AS oldest, max(created_at) AS newest
         FROM data_keys GROUP BY kek_id ORDER BY kek_id",
    )
    .fetch_all(keyring.pool())
    .await?;
    for entry in &mut usage {
        entry.in_file = keyring.kek(&entry.kek_id).is_some();
    }
    let active = keyring.active_kek().id().to_owned();
    let in_file: Vec<String> = keyring.0.keks.keks().map(|k| k.id().to_owned()).collect();
    let removable = in_file
        .iter()
        .filter(|id| **id != active && !usage.iter().any(|u| &u.kek_id == *id))
        .cloned()
        .collect();
    Ok(KeyStatus {
        active_kek: active,
        keks_in_file: in_file,
        data_keys: usage,
        removable_keks: removable,
    })
}
