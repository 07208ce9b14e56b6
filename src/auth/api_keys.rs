//! API keys for shop backends, and canary keys that catch leaks.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use super::{Actor, Refusal, digest, new_secret};
use crate::audit::{self, Outcome, Severity};

pub const PREFIX: &str = "payk_";

#[derive(sqlx::FromRow)]
struct KeyRow {
    name: String,
    key_hash: Vec<u8>,
    canary: bool,
    revoked_at: Option<DateTime<Utc>>,
}

/// Looks the key up by its digest. A canary is refused exactly like a wrong
/// key, so whoever holds it learns nothing, and raised as a critical event.
pub async fn authenticate(
    pool: &PgPool,
    key: &str,
    source: Option<IpAddr>,
) -> Result<Actor, Refusal> {
    let hash = digest(key);
    let row: Option<KeyRow> = sqlx::query_as(
        "SELECT name, key_hash, canary, revoked_at FROM api_clients WHERE key_hash = $1",
    )
    .bind(hash.as_slice())
    .fetch_optional(pool)
    .await
    .map_err(Refusal::Unavailable)?;
    // The row was found by this digest; comparing again in constant time
    // keeps the check explicit and independent of how the index matched.
    let Some(row) = row.filter(|r| bool::from(r.key_hash.as_slice().ct_eq(&hash))) else {
        return Err(Refusal::Denied("unknown api key"));
    };
    if row.canary {
        raise_canary(pool, &row.name, source).await;
        return Err(Refusal::Denied("canary api key"));
    }
    if row.revoked_at.is_some() {
        return Err(Refusal::Denied("revoked api key"));
    }
    Ok(Actor::Client { name: row.name })
}

async fn raise_canary(pool: &PgPool, name: &str, source: Option<IpAddr>) {
    let actor = format!("client:{name}");
    let record = audit::Record::new(&actor, "api_key.canary_used", Outcome::Refused)
        .severity(Severity::Critical)
        .reason(
            "a canary key was presented: treat it as leaked and investigate where it was planted",
        )
        .source(source);
    audit::record_refusal(pool, &record).await;
}

/// A new client and its key. The key is returned once and never stored.
pub async fn create(pool: &PgPool, name: &str, canary: bool, by: &str) -> anyhow::Result<String> {
    let key = new_secret(PREFIX);
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO api_clients (name, key_hash, canary) VALUES ($1, $2, $3)")
        .bind(name)
        .bind(digest(&key).as_slice())
        .bind(canary)
        .execute(&mut *tx)
        .await?;
    let action = if canary {
        "api_key.canary_created"
    } else {
        "api_key.created"
    };
    audit::record(
        &mut *tx,
        &audit::Record::new(by, action, Outcome::Done).resource(name),
    )
    .await?;
    tx.commit().await?;
    Ok(key)
}

pub async fn revoke(pool: &PgPool, name: &str, by: &str) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE api_clients SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
    )
    .bind(name)
    .execute(&mut *tx)
    .await?;
    let revoked = done.rows_affected() > 0;
    if revoked {
        let record = audit::Record::new(by, "api_key.revoked", Outcome::Done).resource(name);
        audit::record(&mut *tx, &record).await?;
    }
    tx.commit().await?;
    Ok(revoked)
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct ClientView {
    pub name: String,
    pub canary: bool,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub async fn list(pool: &PgPool) -> Result<Vec<ClientView>, sqlx::Error> {
    sqlx::query_as("SELECT name, canary, created_at, revoked_at FROM api_clients ORDER BY id")
        .fetch_all(pool)
        .await
}
