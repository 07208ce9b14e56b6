//! The checkout_sessions table: sessions created here and their payment state.
//!
//! A session's state has three parts that move independently and only
//! forward: the payment (`status`), refunds (`amount_refunded`, which only
//! grows) and a dispute (open, then closed). What the API shows as `status`
//! combines them; see [`lifecycle`].

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::{money::Money, stripe_api::CreatedSession};

/// The payment part of a session's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Stripe's dispute statuses that end a dispute.
pub fn dispute_closed(status: &str) -> bool {
    matches!(status, "won" | "lost" | "warning_closed" | "prevented")
}

/// The one word the API shows for a session: a dispute outranks refunds,
/// which outrank the payment status.
pub fn lifecycle(
    status: SessionStatus,
    amount_refunded: i64,
    fully_refunded: bool,
    dispute: Option<&str>,
) -> &'static str {
    match dispute {
        Some("lost") => return "dispute_lost",
        Some(closed) if dispute_closed(closed) => return "dispute_won",
        Some(_) => return "disputed",
        None => {}
    }
    if fully_refunded {
        "refunded"
    } else if amount_refunded > 0 {
        "partially_refunded"
    } else {
        status.as_str()
    }
}

/// A session row locked for the transaction that applies an event to it.
#[derive(Debug, sqlx::FromRow)]
pub struct LockedSession {
    pub id: String,
    #[sqlx(try_from = "String")]
    pub status: StatusColumn,
    pub payment_intent_id: Option<String>,
    pub amount_refunded: i64,
    pub fully_refunded: bool,
    pub dispute_status: Option<String>,
    pub dispute_event_created: Option<DateTime<Utc>>,
}

/// `status` as read from the table, which its CHECK constraint keeps valid.
#[derive(Clone, Copy, Debug)]
pub struct StatusColumn(pub SessionStatus);

impl TryFrom<String> for StatusColumn {
    type Error = String;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        SessionStatus::parse(&raw)
            .map(Self)
            .ok_or_else(|| format!("unknown session status {raw}"))
    }
}

/// How an event names its session.
#[derive(Clone, Copy, Debug)]
pub enum SessionKey<'a> {
    Id(&'a str),
    /// Our `payments_ref` metadata, which Stripe copies onto what it reports.
    Reference(&'a str),
    PaymentIntent(&'a str),
}

pub async fn lock(
    tx: &mut PgConnection,
    key: SessionKey<'_>,
) -> Result<Option<LockedSession>, sqlx::Error> {
    let (column, value) = match key {
        SessionKey::Id(v) => ("id", v),
        SessionKey::Reference(v) => ("reference", v),
        SessionKey::PaymentIntent(v) => ("payment_intent_id", v),
    };
    let sql = format!(
        "SELECT id, status, payment_intent_id, amount_refunded, fully_refunded,
                dispute_status, dispute_event_created
         FROM checkout_sessions WHERE {column} = $1 FOR UPDATE"
    );
    sqlx::query_as(&sql).bind(value).fetch_optional(tx).await
}

pub fn valid_session_id(id: &str) -> bool {
    id.starts_with("cs_")
        && id.len() <= 255
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Records a session Stripe created. A retry that got the same session back
/// from Stripe (same outbound idempotency key) finds the row already there.
pub async fn insert_created(
    tx: &mut PgConnection,
    s: &CreatedSession,
    reference: &str,
    created_by: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO checkout_sessions
             (id, status, payment_status, url, amount_total, currency, currency_exponent,
              client_reference_id, livemode, expires_at, reference, created_by)
         VALUES ($1, 'open', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&s.id)
    .bind(&s.payment_status)
    .bind(&s.url)
    .bind(s.amount_total)
    .bind(&s.currency)
    .bind(
        s.currency
            .as_deref()
            .map(|c| i16::from(crate::money::exponent(c))),
    )
    .bind(&s.client_reference_id)
    .bind(s.livemode)
    .bind(s.expires_at)
    .bind(reference)
    .bind(created_by)
    .execute(tx)
    .await?;
    Ok(())
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

/// Remembers the session's PaymentIntent, through which charges, refunds and
/// disputes find it. A link once made is never changed.
pub async fn link_payment_intent(
    tx: &mut PgConnection,
    id: &str,
    payment_intent: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE checkout_sessions SET payment_intent_id = $2, updated_at = now()
         WHERE id = $1 AND payment_intent_id IS NULL",
    )
    .bind(id)
    .bind(payment_intent)
    .execute(tx)
    .await?;
    Ok(())
}

/// Stripe reports the running total refunded; a late event with a smaller
/// total cannot lower it.
pub async fn record_refund(
    tx: &mut PgConnection,
    id: &str,
    amount_refunded: i64,
    fully_refunded: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE checkout_sessions
         SET amount_refunded = GREATEST(amount_refunded, $2),
             fully_refunded = fully_refunded OR $3,
             updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(amount_refunded)
    .bind(fully_refunded)
    .execute(tx)
    .await?;
    Ok(())
}

pub struct DisputeUpdate<'a> {
    pub dispute_id: &'a str,
    pub status: &'a str,
    pub amount: i64,
    pub event_created: DateTime<Utc>,
}

pub async fn record_dispute(
    tx: &mut PgConnection,
    id: &str,
    dispute: &DisputeUpdate<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE checkout_sessions
         SET dispute_id = $2, dispute_status = $3, dispute_amount = $4,
             dispute_event_created = $5, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(dispute.dispute_id)
    .bind(dispute.status)
    .bind(dispute.amount)
    .bind(dispute.event_created)
    .execute(tx)
    .await?;
    Ok(())
}

#[derive(Debug, sqlx::FromRow)]
struct SessionRow {
    id: String,
    #[sqlx(try_from = "String")]
    status: StatusColumn,
    payment_status: Option<String>,
    url: Option<String>,
    amount_total: Option<i64>,
    currency: Option<String>,
    currency_exponent: Option<i16>,
    amount_refunded: i64,
    fully_refunded: bool,
    dispute_id: Option<String>,
    dispute_status: Option<String>,
    dispute_amount: Option<i64>,
    payment_intent_id: Option<String>,
    client_reference_id: Option<String>,
    reference: Option<String>,
    livemode: bool,
    expires_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    created_by: Option<String>,
}

/// What `GET /v1/checkout/sessions/{id}` answers.
#[derive(Debug, Serialize)]
pub struct SessionView {
    pub id: String,
    /// The combined lifecycle: open, awaiting_payment, paid, payment_failed,
    /// expired, partially_refunded, refunded, disputed, dispute_won, dispute_lost.
    pub status: &'static str,
    pub payment_status: Option<String>,
    pub url: Option<String>,
    pub amount_total: Option<Money>,
    pub amount_refunded: Option<Money>,
    pub dispute: Option<DisputeView>,
    pub payment_intent: Option<String>,
    pub client_reference_id: Option<String>,
    /// The `payments_ref` the service tagged the session with at Stripe.
    pub reference: Option<String>,
    pub livemode: bool,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The actor that created it, for access checks; not shown.
    #[serde(skip)]
    pub created_by: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DisputeView {
    pub id: Option<String>,
    pub status: String,
    pub amount: Option<Money>,
}

pub async fn find(pool: &PgPool, id: &str) -> Result<Option<SessionView>, sqlx::Error> {
    let row: Option<SessionRow> = sqlx::query_as(
        "SELECT id, status, payment_status, url, amount_total, currency, currency_exponent,
                amount_refunded, fully_refunded, dispute_id, dispute_status, dispute_amount,
                payment_intent_id, client_reference_id, reference, livemode, expires_at,
                created_at, updated_at, created_by
         FROM checkout_sessions WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(view))
}

fn view(row: SessionRow) -> SessionView {
    let money = |amount: Option<i64>| {
        let currency = row.currency.as_deref()?;
        let exponent = row
            .currency_exponent
            .and_then(|e| u8::try_from(e).ok())
            .unwrap_or_else(|| crate::money::exponent(currency));
        Some(Money::new(amount?, currency, exponent))
    };
    let refunded = (row.amount_refunded > 0).then_some(row.amount_refunded);
    SessionView {
        status: lifecycle(
            row.status.0,
            row.amount_refunded,
            row.fully_refunded,
            row.dispute_status.as_deref(),
        ),
        amount_total: money(row.amount_total),
        amount_refunded: money(refunded),
        dispute: row.dispute_status.clone().map(|status| DisputeView {
            id: row.dispute_id.clone(),
            status,
            amount: money(row.dispute_amount),
        }),
        id: row.id,
        payment_status: row.payment_status,
        url: row.url,
        payment_intent: row.payment_intent_id,
        client_reference_id: row.client_reference_id,
        reference: row.reference,
        livemode: row.livemode,
        expires_at: row.expires_at,
        created_at: row.created_at,
        updated_at: row.updated_at,
        created_by: row.created_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SessionStatus::*;

    #[test]
    fn disputes_outrank_refunds_which_outrank_payment() {
        assert_eq!(lifecycle(Paid, 0, false, None), "paid");
        assert_eq!(lifecycle(Paid, 30, false, None), "partially_refunded");
        assert_eq!(lifecycle(Paid, 100, true, None), "refunded");
        assert_eq!(
            lifecycle(Paid, 100, true, Some("needs_response")),
            "disputed"
        );
        assert_eq!(lifecycle(Paid, 0, false, Some("won")), "dispute_won");
        assert_eq!(lifecycle(Paid, 0, false, Some("lost")), "dispute_lost");
        assert_eq!(
            lifecycle(AwaitingPayment, 0, false, None),
            "awaiting_payment"
        );
    }
}
