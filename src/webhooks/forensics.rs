//! A bounded record of refused deliveries, for investigating attacks and
//! misconfigured secrets. It is kept apart from the event store and nothing
//! in it can be replayed.

use std::net::SocketAddr;

use sqlx::PgPool;

use super::signature::Rejection;

const MAX_HEADER_BYTES: usize = 512;
const MAX_BODY_BYTES: usize = 1024;
/// Rows kept; older ones are pruned by the maintenance task.
pub const MAX_ROWS: i64 = 10_000;

pub struct RefusedDelivery<'a> {
    pub rejection: Rejection,
    pub source: SocketAddr,
    pub signature_header: Option<&'a [u8]>,
    pub body: &'a [u8],
}

/// Records a refusal. A failure to record is logged, never turned into a
/// different answer: the delivery is refused either way.
pub async fn record(pool: &PgPool, refused: RefusedDelivery<'_>) {
    let header = refused
        .signature_header
        .map(|h| String::from_utf8_lossy(&h[..h.len().min(MAX_HEADER_BYTES)]).into_owned());
    let prefix = &refused.body[..refused.body.len().min(MAX_BODY_BYTES)];
    let result = sqlx::query(
        "INSERT INTO rejected_deliveries (reason, source_addr, signature_hdr, body_len, body_prefix)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(refused.rejection.code())
    .bind(refused.source.ip().to_string())
    .bind(header)
    .bind(i32::try_from(refused.body.len()).unwrap_or(i32::MAX))
    .bind(prefix)
    .execute(pool)
    .await;
    if let Err(err) = result {
        tracing::warn!(error = %err, reason = refused.rejection.code(), "refused delivery not recorded");
    }
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
