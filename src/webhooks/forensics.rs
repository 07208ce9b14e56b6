//! A bounded record of refused deliveries, for investigating attacks and
//! misconfigured secrets. It is kept apart from the event store and nothing
//! in it can be replayed.

use std::net::IpAddr;

use sqlx::PgPool;

use crate::audit::{self, RequestContext};

use crate::crypto::{Keyring, PayloadContext};

const MAX_HEADER_BYTES: usize = 512;
const MAX_BODY_BYTES: usize = 1024;
/// Rows kept; older ones are pruned by the maintenance task.
pub const MAX_ROWS: i64 = 10_000;

pub struct RefusedDelivery<'a> {
    /// `Rejection::code()`, or `source_not_allowed`.
    pub reason: &'static str,
    /// The resolved client address (see `client_ip`).
    pub source: Option<IpAddr>,
    pub signature_header: Option<&'a [u8]>,
    pub body: &'a [u8],
    /// The request's context, for the audit record of the refusal.
    pub context: Option<&'a RequestContext>,
}

/// Records a refusal, its body prefix encrypted like a stored payload (a real
/// event signed with a wrong secret carries customer details). A failure to
/// record is logged, never turned into a different answer: the delivery is
/// refused either way.
pub async fn record(pool: &PgPool, keyring: &Keyring, refused: RefusedDelivery<'_>) {
    if let Err(err) = insert(pool, keyring, &refused).await {
        let error = format!("{err:#}");
        tracing::warn!(
            error,
            reason = refused.reason,
            "refused delivery not recorded"
        );
    }
}

async fn insert(
    pool: &PgPool,
    keyring: &Keyring,
    refused: &RefusedDelivery<'_>,
) -> anyhow::Result<()> {
    let header = refused
        .signature_header
        .map(|h| cut_to(String::from_utf8_lossy(h).into_owned(), MAX_HEADER_BYTES));
    let prefix = &refused.body[..refused.body.len().min(MAX_BODY_BYTES)];
    let sealed = keyring
        .seal(PayloadContext::RefusedDelivery, prefix)
        .await?;
    // The forensic row and the audit record of the refusal commit together.
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO rejected_deliveries
             (reason, source_addr, signature_hdr, body_len, body_prefix, body_key_id)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(refused.reason)
    .bind(refused.source.map(|ip| ip.to_string()))
    .bind(header)
    .bind(i32::try_from(refused.body.len()).unwrap_or(i32::MAX))
    .bind(&sealed.bytes)
    .bind(sealed.key_id)
    .execute(&mut *tx)
    .await?;
    let record = audit::Record::new("anonymous", "webhook.rejected", audit::Outcome::Refused)
        .reason(refused.reason)
        .severity(audit::Severity::Warning)
        .context(refused.context)
        .source(refused.source);
    audit::record(&mut *tx, &record).await?;
    tx.commit().await?;
    Ok(())
}

/// Nulls, in one bounded batch, the body prefixes of records older than
/// `retention`; the rest of each record stays.
pub async fn purge_prefixes(
    pool: &PgPool,
    retention: std::time::Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    crate::db::purge_batch(
        pool,
        "UPDATE rejected_deliveries SET body_prefix = NULL, body_key_id = NULL
         WHERE id IN (
             SELECT id FROM rejected_deliveries
             WHERE body_prefix IS NOT NULL
               AND received_at < now() - make_interval(secs => $1)
             ORDER BY id
             LIMIT $2
             FOR UPDATE SKIP LOCKED)",
        retention,
        batch,
    )
    .await
}

/// Deletes all but the newest `MAX_ROWS` records.
pub async fn prune(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM rejected_deliveries
         WHERE id <= (SELECT max(id) FROM rejected_deliveries) - $1",
    )
    .bind(MAX_ROWS)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Cuts text to at most `max` bytes, on a character boundary.
fn cut_to(mut text: String, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}
