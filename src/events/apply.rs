//! Applying a stored Stripe event to a checkout session's payment state.
//!
//! States only move forward: open → awaiting_payment → paid | payment_failed,
//! and open → paid | expired. An event that would move a session backwards
//! (a late expiry after payment, a duplicate) is recorded and changes nothing.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::PgConnection;

use crate::checkout::store::{self, SessionStatus};

/// The event types this service acts on. Every other verified event is
/// stored and marked ignored.
pub const HANDLED_TYPES: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
];

pub fn handles(event_type: &str) -> bool {
    HANDLED_TYPES.contains(&event_type)
}

/// What applying an event did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Moved {
        from: SessionStatus,
        to: SessionStatus,
    },
    /// Recorded, nothing changed; the text says why.
    Unchanged(String),
}

impl Applied {
    pub fn describe(&self) -> String {
        match self {
            Self::Moved { from, to } => format!("{} -> {}", from.as_str(), to.as_str()),
            Self::Unchanged(why) => why.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The event cannot be applied as it is; it goes to the dead letters.
    #[error("{0}")]
    Rejected(String),
    /// The database failed; the event stays pending and is tried again.
    #[error("database error while applying event")]
    Database(#[from] sqlx::Error),
}

#[derive(Deserialize)]
struct EventBody {
    data: EventData,
}

#[derive(Deserialize)]
struct EventData {
    object: SessionObject,
}

#[derive(Deserialize)]
struct SessionObject {
    id: String,
    object: Option<String>,
    payment_status: Option<String>,
}

pub async fn apply(
    tx: &mut PgConnection,
    event_type: &str,
    created: DateTime<Utc>,
    payload: &[u8],
) -> Result<Applied, ApplyError> {
    let session = session_object(payload)?;
    let target = target_status(event_type, session.payment_status.as_deref())?;
    let Some(current) = store::lock_status(tx, &session.id).await? else {
        return Err(ApplyError::Rejected(format!(
            "checkout session {} was not created by this service",
            session.id
        )));
    };
    match transition(current, target) {
        Transition::Move => {
            let payment_status = session.payment_status.as_deref();
            store::set_status(tx, &session.id, target, payment_status, created).await?;
            Ok(Applied::Moved {
                from: current,
                to: target,
            })
        }
        Transition::Already => Ok(Applied::Unchanged(format!(
            "session already {}",
            current.as_str()
        ))),
        Transition::Backwards => Ok(Applied::Unchanged(format!(
            "stale: a {} session cannot become {}",
            current.as_str(),
            target.as_str()
        ))),
    }
}

fn session_object(payload: &[u8]) -> Result<SessionObject, ApplyError> {
    let body: EventBody = serde_json::from_slice(payload)
        .map_err(|e| ApplyError::Rejected(format!("data.object is not a checkout session: {e}")))?;
    let session = body.data.object;
    if session.object.as_deref() != Some("checkout.session")
        || !store::valid_session_id(&session.id)
    {
        return Err(ApplyError::Rejected(
            "data.object is not a checkout session".to_owned(),
        ));
    }
    Ok(session)
}

fn target_status(
    event_type: &str,
    payment_status: Option<&str>,
) -> Result<SessionStatus, ApplyError> {
    match (event_type, payment_status) {
        // Completed is not paid until Stripe says so: delayed methods (bank
        // debits) complete unpaid and settle with a later async event.
        ("checkout.session.completed", Some("paid" | "no_payment_required")) => {
            Ok(SessionStatus::Paid)
        }
        ("checkout.session.completed", Some("unpaid")) => Ok(SessionStatus::AwaitingPayment),
        ("checkout.session.async_payment_succeeded", _) => Ok(SessionStatus::Paid),
        ("checkout.session.async_payment_failed", _) => Ok(SessionStatus::PaymentFailed),
        ("checkout.session.expired", _) => Ok(SessionStatus::Expired),
        ("checkout.session.completed", other) => Err(ApplyError::Rejected(format!(
            "completed session with unknown payment_status {other:?}"
        ))),
        (other, _) => Err(ApplyError::Rejected(format!(
            "event type {other} is not handled"
        ))),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Transition {
    Move,
    Already,
    Backwards,
}

fn transition(from: SessionStatus, to: SessionStatus) -> Transition {
    use SessionStatus::*;
    if from == to {
        return Transition::Already;
    }
    match (from, to) {
        (Open, AwaitingPayment | Paid | PaymentFailed | Expired) => Transition::Move,
        (AwaitingPayment, Paid | PaymentFailed) => Transition::Move,
        _ => Transition::Backwards,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SessionStatus::*;

    #[test]
    fn completed_unpaid_is_not_paid() {
        let status = target_status("checkout.session.completed", Some("unpaid")).unwrap();
        assert_eq!(status, AwaitingPayment);
        let status = target_status("checkout.session.completed", Some("paid")).unwrap();
        assert_eq!(status, Paid);
    }

    #[test]
    fn states_never_move_backwards() {
        assert_eq!(transition(Paid, Expired), Transition::Backwards);
        assert_eq!(transition(Paid, PaymentFailed), Transition::Backwards);
        assert_eq!(transition(Expired, Paid), Transition::Backwards);
        assert_eq!(transition(AwaitingPayment, Open), Transition::Backwards);
        assert_eq!(transition(Paid, Paid), Transition::Already);
        assert_eq!(transition(AwaitingPayment, Paid), Transition::Move);
        assert_eq!(transition(Open, Expired), Transition::Move);
    }
}
