//! Applying a stored Stripe event to a checkout session's payment state.
//!
//! Events arrive duplicated, late and out of order, so every change only
//! moves forward:
//! - payment: open → awaiting_payment → paid | payment_failed, open → paid |
//!   payment_failed | expired; nothing leaves paid, payment_failed or expired;
//! - refunds: the refunded total only grows;
//! - a dispute: opened, then closed; a closed dispute is not reopened, and an
//!   older update does not overwrite a newer one.
//!
//! An event that would move anything backwards is recorded and changes
//! nothing. An event about a session not recorded yet is retried later; one
//! about an object this service never created is recorded as foreign.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use sqlx::PgConnection;

use crate::{
    checkout::store::{self, DisputeUpdate, LockedSession, SessionKey, SessionStatus},
    stripe_api::REFERENCE_KEY,
};

/// The event types this service acts on. Every other verified event is
/// stored and marked ignored.
pub const HANDLED_TYPES: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.closed",
];

pub fn handles(event_type: &str) -> bool {
    HANDLED_TYPES.contains(&event_type)
}

/// What applying an event did; the text is stored on the event.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Changed(String),
    /// Recorded, nothing changed (a duplicate, late or stale event).
    Unchanged(String),
    /// About an object this service did not create.
    Foreign(String),
}

/// What to do with an event that keeps waiting for its session once the
/// worker's attempts run out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenExhausted {
    /// It is ours (it carries our reference): an operator must look.
    DeadLetter,
    /// Nothing says it is ours: treat it as foreign.
    IgnoreAsForeign,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The event cannot be applied as it is; it goes to the dead letters.
    #[error("{0}")]
    Rejected(String),
    /// The session it refers to is not recorded yet; try again later.
    #[error("{reason}")]
    NotYet {
        reason: String,
        when_exhausted: WhenExhausted,
    },
    /// The database failed; the event stays pending and is tried again.
    #[error("database error while applying event")]
    Database(#[from] sqlx::Error),
}

pub async fn apply(
    tx: &mut PgConnection,
    event_type: &str,
    created: DateTime<Utc>,
    payload: &[u8],
) -> Result<Applied, ApplyError> {
    match event_type {
        "payment_intent.succeeded" | "payment_intent.payment_failed" => {
            payment_intent_event(tx, event_type, created, object(payload)?).await
        }
        "charge.refunded" => refund_event(tx, created, object(payload)?).await,
        "charge.dispute.created" | "charge.dispute.closed" => {
            dispute_event(tx, created, object(payload)?).await
        }
        t if t.starts_with("checkout.session.") && handles(t) => {
            session_event(tx, t, created, object(payload)?).await
        }
        other => Err(ApplyError::Rejected(format!(
            "event type {other} is not handled"
        ))),
    }
}

// ---- the objects inside events ------------------------------------------

#[derive(Deserialize)]
struct Envelope<T> {
    data: Data<T>,
}

#[derive(Deserialize)]
struct Data<T> {
    object: T,
}

/// Fields every Stripe object we read has.
trait StripeObject: DeserializeOwned {
    const KIND: &'static str;
    fn kind(&self) -> &str;
    /// Every id the object carries that the service will look up or store.
    fn ids(&self) -> Vec<Option<&str>>;
}

fn stripe_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 255 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn object<T: StripeObject>(payload: &[u8]) -> Result<T, ApplyError> {
    let envelope: Envelope<T> = serde_json::from_slice(payload).map_err(|e| {
        ApplyError::Rejected(format!("data.object is not a usable {}: {e}", T::KIND))
    })?;
    let object = envelope.data.object;
    // Ids go into queries and stored details: only Stripe's id alphabet.
    if !object.ids().into_iter().flatten().all(stripe_id) {
        return Err(ApplyError::Rejected(
            "data.object carries an id that is not a Stripe id".to_owned(),
        ));
    }
    if object.kind() != T::KIND {
        return Err(ApplyError::Rejected(format!(
            "data.object is a {}, not a {}",
            object.kind(),
            T::KIND
        )));
    }
    Ok(object)
}

/// Stripe sends a related object as its id, or as the object itself when
/// expanded; either way only the id is kept.
fn expandable_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IdOrObject {
        Id(String),
        Object { id: String },
    }
    Ok(Option::<IdOrObject>::deserialize(d)?.map(|v| match v {
        IdOrObject::Id(id) | IdOrObject::Object { id } => id,
    }))
}

type Metadata = Option<HashMap<String, serde_json::Value>>;

fn our_reference(metadata: &Metadata) -> Option<&str> {
    metadata.as_ref()?.get(REFERENCE_KEY)?.as_str()
}

#[derive(Deserialize)]
struct SessionObject {
    id: String,
    object: String,
    payment_status: Option<String>,
    #[serde(default, deserialize_with = "expandable_id")]
    payment_intent: Option<String>,
    #[serde(default)]
    metadata: Metadata,
}

impl StripeObject for SessionObject {
    const KIND: &'static str = "checkout.session";
    fn kind(&self) -> &str {
        &self.object
    }
    fn ids(&self) -> Vec<Option<&str>> {
        vec![Some(&self.id), self.payment_intent.as_deref()]
    }
}

#[derive(Deserialize)]
struct PaymentIntentObject {
    id: String,
    object: String,
    #[serde(default)]
    metadata: Metadata,
}

impl StripeObject for PaymentIntentObject {
    const KIND: &'static str = "payment_intent";
    fn kind(&self) -> &str {
        &self.object
    }
    fn ids(&self) -> Vec<Option<&str>> {
        vec![Some(&self.id)]
    }
}

#[derive(Deserialize)]
struct ChargeObject {
    id: String,
    object: String,
    #[serde(default, deserialize_with = "expandable_id")]
    payment_intent: Option<String>,
    amount_refunded: i64,
    refunded: bool,
    #[serde(default)]
    metadata: Metadata,
}

impl StripeObject for ChargeObject {
    const KIND: &'static str = "charge";
    fn kind(&self) -> &str {
        &self.object
    }
    fn ids(&self) -> Vec<Option<&str>> {
        vec![Some(&self.id), self.payment_intent.as_deref()]
    }
}

#[derive(Deserialize)]
struct DisputeObject {
    id: String,
    object: String,
    #[serde(default, deserialize_with = "expandable_id")]
    payment_intent: Option<String>,
    status: String,
    amount: i64,
    #[serde(default)]
    metadata: Metadata,
}

impl StripeObject for DisputeObject {
    const KIND: &'static str = "dispute";
    fn kind(&self) -> &str {
        &self.object
    }
    fn ids(&self) -> Vec<Option<&str>> {
        vec![Some(&self.id), self.payment_intent.as_deref()]
    }
}

// ---- finding the session -------------------------------------------------

/// Locks the session by the first key that finds it.
async fn find(
    tx: &mut PgConnection,
    keys: &[SessionKey<'_>],
) -> Result<Option<LockedSession>, sqlx::Error> {
    for key in keys {
        if let Some(session) = store::lock(tx, *key).await? {
            return Ok(Some(session));
        }
    }
    Ok(None)
}

/// An object carrying our reference is ours even though its session is not
/// recorded yet (the create has not committed): wait for it.
fn not_recorded_yet(what: &str, id: &str) -> ApplyError {
    ApplyError::NotYet {
        reason: format!("{what} {id} was created by this service but is not recorded yet"),
        when_exhausted: WhenExhausted::DeadLetter,
    }
}

fn foreign(what: &str, id: &str) -> Applied {
    Applied::Foreign(format!(
        "foreign: {what} {id} was not created by this service"
    ))
}

// ---- applying ------------------------------------------------------------

async fn session_event(
    tx: &mut PgConnection,
    event_type: &str,
    created: DateTime<Utc>,
    s: SessionObject,
) -> Result<Applied, ApplyError> {
    let target = session_target(event_type, s.payment_status.as_deref())?;
    let reference = our_reference(&s.metadata);
    let mut keys = vec![SessionKey::Id(&s.id)];
    keys.extend(reference.map(SessionKey::Reference));
    let Some(session) = find(tx, &keys).await? else {
        return match reference {
            Some(_) => Err(not_recorded_yet("checkout session", &s.id)),
            None => Ok(foreign("checkout session", &s.id)),
        };
    };
    if let Some(payment_intent) = &s.payment_intent {
        store::link_payment_intent(tx, &session.id, payment_intent).await?;
    }
    let payment_status = s.payment_status.as_deref();
    move_payment(tx, &session, target, payment_status, created).await
}

fn session_target(
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
        (t, other) => Err(ApplyError::Rejected(format!(
            "{t} with unknown payment_status {other:?}"
        ))),
    }
}

async fn payment_intent_event(
    tx: &mut PgConnection,
    event_type: &str,
    created: DateTime<Utc>,
    pi: PaymentIntentObject,
) -> Result<Applied, ApplyError> {
    let reference = our_reference(&pi.metadata);
    let mut keys = vec![SessionKey::PaymentIntent(&pi.id)];
    keys.extend(reference.map(SessionKey::Reference));
    let Some(session) = find(tx, &keys).await? else {
        return match reference {
            Some(_) => Err(not_recorded_yet("payment intent", &pi.id)),
            None => Ok(foreign("payment intent", &pi.id)),
        };
    };
    store::link_payment_intent(tx, &session.id, &pi.id).await?;
    if event_type == "payment_intent.succeeded" {
        return move_payment(tx, &session, SessionStatus::Paid, None, created).await;
    }
    // A declined card leaves the session open: the shopper may try another.
    // Only a payment already waiting to settle fails with it.
    match session.status.0 {
        SessionStatus::Open => Ok(Applied::Unchanged(
            "a payment attempt failed; the session stays open for another".to_owned(),
        )),
        _ => move_payment(tx, &session, SessionStatus::PaymentFailed, None, created).await,
    }
}

async fn refund_event(
    tx: &mut PgConnection,
    created: DateTime<Utc>,
    charge: ChargeObject,
) -> Result<Applied, ApplyError> {
    let lookup =
        session_of_charge(tx, &charge.id, &charge.payment_intent, &charge.metadata).await?;
    let Lookup::Found(session) = lookup else {
        return Ok(foreign("charge", &charge.id));
    };
    ensure_paid(tx, &session, "refund", created).await?;
    let already = charge.amount_refunded <= session.amount_refunded
        && (!charge.refunded || session.fully_refunded);
    if already {
        return Ok(Applied::Unchanged(format!(
            "stale: refunds already recorded up to {}",
            session.amount_refunded
        )));
    }
    store::record_refund(tx, &session.id, charge.amount_refunded, charge.refunded).await?;
    let how = if charge.refunded {
        "fully"
    } else {
        "partially"
    };
    Ok(Applied::Changed(format!(
        "refunded {how}: {} in minor units",
        charge.amount_refunded
    )))
}

async fn dispute_event(
    tx: &mut PgConnection,
    created: DateTime<Utc>,
    dispute: DisputeObject,
) -> Result<Applied, ApplyError> {
    let lookup =
        session_of_charge(tx, &dispute.id, &dispute.payment_intent, &dispute.metadata).await?;
    let Lookup::Found(session) = lookup else {
        return Ok(foreign("dispute", &dispute.id));
    };
    ensure_paid(tx, &session, "dispute", created).await?;
    if let Some(stale) = stale_dispute(&session, &dispute.status, created) {
        return Ok(Applied::Unchanged(stale));
    }
    let update = DisputeUpdate {
        dispute_id: &dispute.id,
        status: &dispute.status,
        amount: dispute.amount,
        event_created: created,
    };
    store::record_dispute(tx, &session.id, &update).await?;
    Ok(Applied::Changed(format!("dispute {}", dispute.status)))
}

enum Lookup {
    Found(LockedSession),
    /// Nothing links it to any session of ours, now or later.
    Foreign,
}

/// Charges and disputes name the PaymentIntent, which a session learns from
/// its own completion event. Until then the event waits; if it never links,
/// nothing says it is ours and it is treated as foreign.
async fn session_of_charge(
    tx: &mut PgConnection,
    id: &str,
    payment_intent: &Option<String>,
    metadata: &Metadata,
) -> Result<Lookup, ApplyError> {
    let reference = our_reference(metadata);
    let mut keys: Vec<SessionKey> = payment_intent
        .iter()
        .map(|p| SessionKey::PaymentIntent(p))
        .collect();
    keys.extend(reference.map(SessionKey::Reference));
    if let Some(session) = find(tx, &keys).await? {
        return Ok(Lookup::Found(session));
    }
    match (reference, payment_intent) {
        (Some(_), _) => Err(not_recorded_yet("charge or dispute", id)),
        (None, Some(pi)) => Err(ApplyError::NotYet {
            reason: format!("payment intent {pi} is not linked to a session yet"),
            when_exhausted: WhenExhausted::IgnoreAsForeign,
        }),
        (None, None) => Ok(Lookup::Foreign),
    }
}

/// A refund or a dispute proves the payment succeeded, even if the event
/// saying so has not arrived yet. On a session recorded as failed or expired
/// it is a contradiction an operator must see.
async fn ensure_paid(
    tx: &mut PgConnection,
    session: &LockedSession,
    what: &str,
    created: DateTime<Utc>,
) -> Result<(), ApplyError> {
    match session.status.0 {
        SessionStatus::Paid => Ok(()),
        SessionStatus::Open | SessionStatus::AwaitingPayment => {
            store::set_status(tx, &session.id, SessionStatus::Paid, Some("paid"), created).await?;
            Ok(())
        }
        other => Err(ApplyError::Rejected(format!(
            "{what} for session {} recorded as {}",
            session.id,
            other.as_str()
        ))),
    }
}

fn stale_dispute(session: &LockedSession, status: &str, created: DateTime<Utc>) -> Option<String> {
    let current = session.dispute_status.as_deref()?;
    if store::dispute_closed(current) {
        return Some(format!("stale: dispute already closed as {current}"));
    }
    let older = session
        .dispute_event_created
        .is_some_and(|seen| created < seen);
    if older && !store::dispute_closed(status) {
        return Some("stale: a newer dispute update is recorded".to_owned());
    }
    None
}

async fn move_payment(
    tx: &mut PgConnection,
    session: &LockedSession,
    target: SessionStatus,
    payment_status: Option<&str>,
    created: DateTime<Utc>,
) -> Result<Applied, ApplyError> {
    let current = session.status.0;
    match transition(current, target) {
        Transition::Move => {
            store::set_status(tx, &session.id, target, payment_status, created).await?;
            Ok(Applied::Changed(format!(
                "{} -> {}",
                current.as_str(),
                target.as_str()
            )))
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
        let status = session_target("checkout.session.completed", Some("unpaid")).unwrap();
        assert_eq!(status, AwaitingPayment);
        let status = session_target("checkout.session.completed", Some("paid")).unwrap();
        assert_eq!(status, Paid);
    }

    #[test]
    fn states_never_move_backwards() {
        assert_eq!(transition(Paid, Expired), Transition::Backwards);
        assert_eq!(transition(Paid, PaymentFailed), Transition::Backwards);
        assert_eq!(transition(Expired, Paid), Transition::Backwards);
        assert_eq!(transition(AwaitingPayment, Open), Transition::Backwards);
        assert_eq!(transition(Paid, AwaitingPayment), Transition::Backwards);
        assert_eq!(transition(Paid, Paid), Transition::Already);
        assert_eq!(transition(AwaitingPayment, Paid), Transition::Move);
        assert_eq!(transition(Open, Expired), Transition::Move);
    }

    #[test]
    fn related_objects_are_read_as_ids_whether_expanded_or_not() {
        let plain = br#"{"data":{"object":{"id":"ch_1","object":"charge","payment_intent":"pi_1",
            "amount_refunded":5,"refunded":false}}}"#;
        let expanded = br#"{"data":{"object":{"id":"ch_1","object":"charge",
            "payment_intent":{"id":"pi_1","object":"payment_intent"},"amount_refunded":5,"refunded":false}}}"#;
        for payload in [&plain[..], &expanded[..]] {
            let charge: ChargeObject = object(payload).unwrap();
            assert_eq!(charge.payment_intent.as_deref(), Some("pi_1"));
        }
    }

    #[test]
    fn an_object_of_another_kind_is_rejected() {
        let payload = br#"{"data":{"object":{"id":"pi_1","object":"payment_intent"}}}"#;
        assert!(matches!(
            object::<SessionObject>(payload),
            Err(ApplyError::Rejected(_))
        ));
    }
}
