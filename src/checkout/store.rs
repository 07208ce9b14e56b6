//! The checkout_sessions table: sessions created here and their payment state.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::stripe_api::CreatedSession;

/// A session's payment state, as this service tracks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Open,
    AwaitingPayment,
    Paid,
    PaymentFailed,
    Expired,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::AwaitingPayment => "awaiting_payment",
            Self::Paid => "paid",
            Self::PaymentFailed => "payment_failed",
            Self::Expired => "expired",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [
            Self::Open,
            Self::AwaitingPayment,
            Self::Paid,
            Self::PaymentFailed,
            Self::Expired,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }
}

/// What `GET /v1/checkout/sessions/{id}` answers.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct SessionView {
    pub id: String,
    pub status: String,
    pub payment_status: Option<String>,
    pub url: Option<String>,
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
    pub client_reference_id: Option<String>,
    pub livemode: bool,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub fn valid_session_id(id: &str) -> bool {
    id.starts_with("cs_")
        && id.len() <= 255
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Records a session Stripe created. A retry that got the same session back
/// from Stripe (same outbound idempotency key) finds the row already there.
pub async fn insert_created(tx: &mut PgConnection, s: &CreatedSession) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO checkout_sessions
             (id, status, payment_status, url, amount_total, currency,
              client_reference_id, livemode, expires_at)
         VALUES ($1, 'open', $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&s.id)
    .bind(&s.payment_status)
    .bind(&s.url)
    .bind(s.amount_total)
    .bind(&s.currency)
    .bind(&s.client_reference_id)
    .bind(s.livemode)
    .bind(s.expires_at)
    .execute(tx)
    .await?;
    Ok(())
}

pub async fn find(pool: &PgPool, id: &str) -> Result<Option<SessionView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, status, payment_status, url, amount_total, currency,
                client_reference_id, livemode, expires_at, created_at, updated_at
         FROM checkout_sessions WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Locks a session's row for the transaction that applies an event to it.
pub async fn lock_status(
    tx: &mut PgConnection,
    id: &str,
) -> Result<Option<SessionStatus>, sqlx::Error> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT status FROM checkout_sessions WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(tx)
            .await?;
    Ok(row.and_then(|(s,)| SessionStatus::parse(&s)))
}

pub async fn set_status(
    tx: &mut PgConnection,
    id: &str,
    status: SessionStatus,
    payment_status: Option<&str>,
    event_created: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE checkout_sessions
         SET status = $2,
             payment_status = COALESCE($3, payment_status),
             last_event_created = GREATEST(last_event_created, $4),
             updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(status.as_str())
    .bind(payment_status)
    .bind(event_created)
    .execute(tx)
    .await?;
    Ok(())
}
