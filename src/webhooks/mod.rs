//! The Stripe webhook ingress: verify, store, acknowledge.
//!
//! Before any of this, the edge refuses sources outside the allowlist (403)
//! and sources that spent their failure budget (429); see `sources` and
//! `rate_limit`.
//!
//! Order of checks: signature over the raw bytes (against every configured
//! secret), then the timestamp window, then the nonce (inside the storing
//! transaction). Only then is the envelope looked at. A refused delivery gets
//! a 400 and a forensic record; an accepted one gets a 200 only once it is
//! committed.

pub mod envelope;
pub mod forensics;
pub mod ingest;
pub mod signature;
pub mod sources;

use std::net::IpAddr;

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, HeaderValue},
    routing::post,
};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use self::{
    ingest::{Delivery, Outcome},
    signature::{Rejection, SignatureHeader},
};
use crate::{
    app::AppState,
    audit::RequestContext,
    client_ip::ClientIp,
    error::{ApiError, ProblemType},
    rate_limit,
};

/// Stripe events are a few KiB; the largest real ones stay well under this.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/webhooks/stripe", post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

#[tracing::instrument(name = "receive stripe webhook", skip_all, fields(outcome))]
async fn receive(
    State(state): State<AppState>,
    ClientIp(peer): ClientIp,
    Extension(context): Extension<RequestContext>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    // A source that spent its failure budget gets no verification work.
    let limits = &state.edge.limits;
    if let Err(wait) = limits.webhook_failures.gate(peer) {
        limits.log_refusal("webhook_failures", Some(peer));
        let detail = "Too many refused deliveries from this address. Retry later.";
        return Err(rate_limit::too_many(wait, detail));
    }
    let header = headers.get("stripe-signature");
    let verdict = signature_header(&headers).and_then(|one| verify(&state, one, &body, &context));
    let delivery = match verdict {
        Ok(delivery) => delivery,
        Err(rejection) => {
            return Err(refuse(&state, rejection, peer, header, &body, &context).await);
        }
    };
    let outcome = state.events.store(delivery).await.map_err(|err| {
        if err.unavailable {
            ApiError::Unavailable(err.into())
        } else {
            ApiError::Internal(err.into())
        }
    })?;
    if outcome == Outcome::Replayed {
        return Err(refuse(&state, Rejection::Replayed, peer, header, &body, &context).await);
    }
    tracing::Span::current().record("outcome", outcome_name(outcome));
    Ok(Json(
        json!({ "received": true, "outcome": outcome_name(outcome) }),
    ))
}

/// The header, if sent exactly once. Two headers would leave it to us to
/// pick one, so that is refused like a malformed header.
fn signature_header(headers: &HeaderMap) -> Result<&HeaderValue, Rejection> {
    let mut values = headers.get_all("stripe-signature").iter();
    match (values.next(), values.next()) {
        (Some(one), None) => Ok(one),
        (None, _) => Err(Rejection::MissingHeader),
        (Some(_), Some(_)) => Err(Rejection::MalformedHeader),
    }
}

fn verify(
    state: &AppState,
    header: &HeaderValue,
    body: &Bytes,
    context: &RequestContext,
) -> Result<Delivery, Rejection> {
    let raw = header.to_str().map_err(|_| Rejection::MalformedHeader)?;
    let parsed = SignatureHeader::parse(raw)?;
    let now = Utc::now().timestamp();
    let settings = &state.webhook;
    let matched = signature::verify(&parsed, body, &settings.secrets, now, settings.tolerance)?;
    Ok(Delivery {
        signature: matched,
        signed_at: DateTime::from_timestamp(parsed.timestamp, 0).unwrap_or_default(),
        payload: body.clone(),
        envelope: envelope::parse(body),
        context: context.clone(),
    })
}

async fn refuse(
    state: &AppState,
    rejection: Rejection,
    peer: IpAddr,
    header: Option<&HeaderValue>,
    body: &[u8],
    context: &RequestContext,
) -> ApiError {
    tracing::Span::current().record("outcome", rejection.code());
    // Every refusal spends the source's failure budget; past it the answer
    // is 429 and nothing more is written for this source.
    let limits = &state.edge.limits;
    if let Err(wait) = limits.webhook_failures.record(peer) {
        limits.log_refusal("webhook_failures", Some(peer));
        let detail = "Too many refused deliveries from this address. Retry later.";
        return rate_limit::too_many(wait, detail);
    }
    tracing::warn!(reason = rejection.code(), source = %peer, "webhook delivery refused");
    let record = forensics::RefusedDelivery {
        reason: rejection.code(),
        source: Some(peer),
        signature_header: header.map(HeaderValue::as_bytes),
        body,
        context: Some(context),
    };
    forensics::record(&state.pool, &state.keyring, record).await;
    let (kind, detail) = match rejection {
        Rejection::MissingHeader => (
            ProblemType::SignatureMissing,
            "Send one Stripe-Signature header.",
        ),
        Rejection::MalformedHeader => (
            ProblemType::SignatureInvalid,
            "Send one Stripe-Signature header with exactly one t= and at least one v1= of 64 hex digits.",
        ),
        Rejection::NoMatchingSignature => (
            ProblemType::SignatureInvalid,
            "No v1 signature matches the body under any configured webhook secret.",
        ),
        Rejection::TimestampTooOld => (
            ProblemType::TimestampOutOfWindow,
            "The signature timestamp is older than the tolerance window.",
        ),
        Rejection::TimestampInFuture => (
            ProblemType::TimestampOutOfWindow,
            "The signature timestamp is further ahead than the tolerance window.",
        ),
        Rejection::Replayed => (
            ProblemType::ReplayedDelivery,
            "This signed delivery was already accepted.",
        ),
    };
    ApiError::client(kind, detail)
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Stored => "stored",
        Outcome::Duplicate => "duplicate",
        Outcome::DeadLettered => "dead_lettered",
        Outcome::Replayed => "replayed",
    }
}
