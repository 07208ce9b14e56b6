//! Operator tokens for the admin API, and break-glass tokens.
//!
//! A break-glass token is issued for an emergency, names its operator and
//! reason, and stops working at its expiry by itself; it can be revoked
//! early. Issuing, every use and revoking it are audited.

use std::{net::IpAddr, time::Duration};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use super::{Refusal, digest, new_secret};
use crate::{
    audit::{self, Outcome, Severity},
    config::Secret,
};

pub const PREFIX: &str = "padm_";
/// The longest a break-glass token may live.
pub const MAX_BREAK_GLASS: Duration = Duration::from_secs(12 * 3600);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// `PAYMENTS_ADMIN_TOKEN` from the environment.
    Bootstrap,
    Operator,
    BreakGlass,
}

/// An authenticated operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    pub kind: TokenKind,
    pub token_id: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    id: i64,
    operator: String,
    token_hash: Vec<u8>,
    kind: String,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

/// Checks an admin bearer token: the bootstrap token, or an issued one that
/// is neither revoked nor expired.
pub async fn authenticate(
    pool: &PgPool,
    bootstrap: &Secret,
    token: &str,
    source: Option<IpAddr>,
) -> Result<Operator, Refusal> {
    if digests_match(&digest(token), &digest(bootstrap.expose())) {
        return Ok(Operator {
            name: "admin".to_owned(),
            kind: TokenKind::Bootstrap,
            token_id: None,
        });
    }
    if !token.starts_with(PREFIX) {
        return Err(Refusal::Denied("unknown admin token"));
    }
    let hash = digest(token);
    let row: Option<TokenRow> = sqlx::query_as(
        "SELECT id, operator, token_hash, kind, expires_at, revoked_at FROM admin_tokens WHERE token_hash = $1",
    )
    .bind(hash.as_slice())
    .fetch_optional(pool)
    .await
    .map_err(Refusal::Unavailable)?;
    let Some(row) = row.filter(|r| digests_match(&r.token_hash, &hash)) else {
        return Err(Refusal::Denied("unknown admin token"));
    };
    if row.revoked_at.is_some() {
        return Err(Refusal::Denied("revoked admin token"));
    }
    if row.expires_at.is_some_and(|at| at <= Utc::now()) {
        return Err(Refusal::Denied("expired admin token"));
    }
    let operator = Operator {
        kind: if row.kind == "break_glass" {
            TokenKind::BreakGlass
        } else {
            TokenKind::Operator
        },
        name: row.operator,
        token_id: Some(row.id),
    };
    note_use(pool, &operator, source)
        .await
        .map_err(Refusal::Unavailable)?;
    Ok(operator)
}

/// Compares two digests in constant time.
fn digests_match(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Every use of an issued token is counted on it; a break-glass use is also
/// audited, in the same transaction.
async fn note_use(
    pool: &PgPool,
    operator: &Operator,
    source: Option<IpAddr>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE admin_tokens SET last_used_at = now(), uses = uses + 1 WHERE id = $1")
        .bind(operator.token_id)
        .execute(&mut *tx)
        .await?;
    if operator.kind == TokenKind::BreakGlass {
        let actor = format!("operator:{}", operator.name);
        let id = operator.token_id.unwrap_or_default().to_string();
        let record = audit::Record::new(&actor, "break_glass.used", Outcome::Allowed)
            .resource(&id)
            .severity(Severity::Warning)
            .source(source);
        audit::record(&mut *tx, &record).await?;
    }
    tx.commit().await
}

/// What issuing a token returns. The token itself is shown once.
#[derive(Debug, Serialize)]
pub struct Issued {
    pub id: i64,
    pub operator: String,
    pub kind: TokenKind,
    pub token: String,
    pub expires_at: Option<DateTime<Utc>>,
}

pub async fn issue(
    pool: &PgPool,
    operator: &str,
    ttl: Option<Duration>,
    break_glass: Option<&str>,
    by: &str,
) -> anyhow::Result<Issued> {
    let bounded = ttl.is_some_and(|t| t <= MAX_BREAK_GLASS);
    if break_glass.is_some() && !bounded {
        anyhow::bail!("a break-glass token needs a ttl of at most 12h");
    }
    let token = new_secret(PREFIX);
    let expires_at = ttl.map(|t| Utc::now() + t);
    let kind = if break_glass.is_some() {
        TokenKind::BreakGlass
    } else {
        TokenKind::Operator
    };
    let kind_column = if break_glass.is_some() {
        "break_glass"
    } else {
        "operator"
    };
    let mut tx = pool.begin().await?;
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO admin_tokens (operator, token_hash, kind, reason, expires_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(operator)
    .bind(digest(&token).as_slice())
    .bind(kind_column)
    .bind(break_glass)
    .bind(expires_at)
    .fetch_one(&mut *tx)
    .await?;
    let resource = format!("admin_token:{id} operator:{operator}");
    let (action, severity) = match kind {
        TokenKind::BreakGlass => ("break_glass.issued", Severity::Warning),
        _ => ("admin_token.issued", Severity::Info),
    };
    let mut record = audit::Record::new(by, action, Outcome::Done)
        .resource(&resource)
        .severity(severity);
    if let Some(reason) = break_glass {
        record = record.reason(reason);
    }
    audit::record(&mut *tx, &record).await?;
    tx.commit().await?;
    Ok(Issued {
        id,
        operator: operator.to_owned(),
        kind,
        token,
        expires_at,
    })
}

pub async fn revoke(pool: &PgPool, id: i64, reason: &str, by: &str) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let kind: Option<String> = sqlx::query_scalar(
        "UPDATE admin_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING kind",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(kind) = kind else {
        return Ok(false);
    };
    let action = if kind == "break_glass" {
        "break_glass.revoked"
    } else {
        "admin_token.revoked"
    };
    let resource = format!("admin_token:{id}");
    let record = audit::Record::new(by, action, Outcome::Done)
        .resource(&resource)
        .reason(reason);
    audit::record(&mut *tx, &record).await?;
    tx.commit().await?;
    Ok(true)
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct TokenView {
    pub id: i64,
    pub operator: String,
    pub kind: String,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub uses: i64,
}

pub async fn list(pool: &PgPool) -> Result<Vec<TokenView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, operator, kind, reason, created_at, expires_at, revoked_at, last_used_at, uses
         FROM admin_tokens ORDER BY id",
    )
    .fetch_all(pool)
    .await
}

/// Parses a duration such as `90s`, `30m`, `4h` or `1d`.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = raw.split_at(split);
    let n: u64 = number.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("4h"), Some(Duration::from_secs(14_400)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        for bad in ["", "30", "m", "0s", "5w", "-1h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
