//! One error type for every listener, rendered as RFC 9457 problem details.
//!
//! Client errors carry a stable `type` and a human `detail`. Internal errors are
//! logged once here, with their cause chain, and answered with a generic 500 so
//! nothing about the database or Stripe leaks to the caller.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// The stable problem types this service answers with. The URI is relative,
/// documented in the README, and never changes meaning once published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemType {
    InvalidRequest,
    IdempotencyKeyMissing,
    IdempotencyKeyInvalid,
    IdempotencyKeyReused,
    IdempotencyKeyInProgress,
    StripeUnavailable,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    PurposeRequired,
    Unauthorized,
    SignatureMissing,
    SignatureInvalid,
    TimestampOutOfWindow,
    ReplayedDelivery,
    DeadLetterResolved,
    DeadLetterClosed,
    ServiceUnavailable,
    CardDataRejected,
    OriginNotAllowed,
    RateLimited,
    SourceNotAllowed,
    Internal,
}

impl ProblemType {
    pub fn slug(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid-request",
            Self::IdempotencyKeyMissing => "idempotency-key-missing",
            Self::IdempotencyKeyInvalid => "idempotency-key-invalid",
            Self::IdempotencyKeyReused => "idempotency-key-reused",
            Self::IdempotencyKeyInProgress => "idempotency-key-in-progress",
            Self::StripeUnavailable => "stripe-error",
            Self::NotFound => "not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::PayloadTooLarge => "payload-too-large",
            Self::RequestTimeout => "request-timeout",
            Self::PurposeRequired => "purpose-required",
            Self::Unauthorized => "unauthorized",
            Self::SignatureMissing => "signature-missing",
            Self::SignatureInvalid => "signature-invalid",
            Self::TimestampOutOfWindow => "timestamp-out-of-window",
            Self::ReplayedDelivery => "replayed-delivery",
            Self::DeadLetterResolved => "dead-letter-resolved",
            Self::DeadLetterClosed => "dead-letter-closed",
            Self::ServiceUnavailable => "service-unavailable",
            Self::CardDataRejected => "card-data-rejected",
            Self::OriginNotAllowed => "origin-not-allowed",
            Self::RateLimited => "rate-limited",
            Self::SourceNotAllowed => "source-not-allowed",
            Self::Internal => "internal",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::InvalidRequest
            | Self::IdempotencyKeyMissing
            | Self::IdempotencyKeyInvalid
            | Self::SignatureMissing
            | Self::SignatureInvalid
            | Self::TimestampOutOfWindow
            | Self::ReplayedDelivery => StatusCode::BAD_REQUEST,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::IdempotencyKeyInProgress | Self::DeadLetterResolved | Self::DeadLetterClosed => {
                StatusCode::CONFLICT
            }
            Self::StripeUnavailable => StatusCode::BAD_GATEWAY,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::PurposeRequired => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::CardDataRejected => StatusCode::UNPROCESSABLE_ENTITY,
            Self::OriginNotAllowed | Self::SourceNotAllowed => StatusCode::FORBIDDEN,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::InvalidRequest => "The request is invalid",
            Self::IdempotencyKeyMissing => "Idempotency-Key header required",
            Self::IdempotencyKeyInvalid => "Idempotency-Key header malformed",
            Self::IdempotencyKeyReused => "Idempotency-Key reused with a different request",
            Self::IdempotencyKeyInProgress => "A request with this Idempotency-Key is in progress",
            Self::StripeUnavailable => "Stripe did not complete the request",
            Self::NotFound => "Not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::PayloadTooLarge => "Payload too large",
            Self::RequestTimeout => "The request did not arrive in time",
            Self::PurposeRequired => "A known purpose must be stated",
            Self::Unauthorized => "Authentication required",
            Self::SignatureMissing => "Stripe-Signature header missing",
            Self::SignatureInvalid => "Webhook signature invalid",
            Self::TimestampOutOfWindow => "Webhook timestamp outside the tolerance window",
            Self::ReplayedDelivery => "Webhook delivery already received",
            Self::DeadLetterResolved => "Dead letter already resolved",
            Self::DeadLetterClosed => "Dead letter no longer open",
            Self::ServiceUnavailable => "Service temporarily unavailable",
            Self::CardDataRejected => "Card data is not accepted",
            Self::OriginNotAllowed => "Origin not allowed",
            Self::RateLimited => "Too many requests",
            Self::SourceNotAllowed => "Source address not allowed",
            Self::Internal => "Internal error",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// An error the caller can act on; `detail` is safe to show them.
    #[error("{detail}")]
    Client {
        kind: ProblemType,
        detail: String,
        retry_after_secs: Option<u32>,
    },
    /// The database could not be reached: the caller should retry later.
    #[error("database unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// Anything else: logged with its cause chain, never shown.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn client(kind: ProblemType, detail: impl Into<String>) -> Self {
        Self::Client {
            kind,
            detail: detail.into(),
            retry_after_secs: None,
        }
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::client(ProblemType::InvalidRequest, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::client(ProblemType::NotFound, detail)
    }

    pub fn retry_after(mut self, secs: u32) -> Self {
        if let Self::Client {
            retry_after_secs, ..
        } = &mut self
        {
            *retry_after_secs = Some(secs);
        }
        self
    }

    pub fn kind(&self) -> ProblemType {
        match self {
            Self::Client { kind, .. } => *kind,
            Self::Unavailable(_) => ProblemType::ServiceUnavailable,
            Self::Internal(_) => ProblemType::Internal,
        }
    }
}

/// Database errors become 503 when the server is out of reach and 500
/// otherwise, so Stripe and clients retry an outage instead of giving up.
impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if crate::db::is_unavailable(&err) {
            Self::Unavailable(err.into())
        } else {
            Self::Internal(err.into())
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        match err.downcast_ref::<sqlx::Error>() {
            Some(db) if crate::db::is_unavailable(db) => Self::Unavailable(err),
            _ => Self::Internal(err),
        }
    }
}

#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

/// Renders a problem document; used by the error type and by the middleware
/// that rewrites framework rejections, so every error body has one shape.
pub fn problem_response(kind: ProblemType, detail: &str, retry_after: Option<u32>) -> Response {
    render(kind.status(), kind, detail, retry_after)
}

/// The problem type that best names a bare HTTP status.
pub fn kind_for_status(status: StatusCode) -> ProblemType {
    match status {
        StatusCode::NOT_FOUND => ProblemType::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ProblemType::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ProblemType::PayloadTooLarge,
        StatusCode::REQUEST_TIMEOUT => ProblemType::RequestTimeout,
        StatusCode::UNAUTHORIZED => ProblemType::Unauthorized,
        StatusCode::SERVICE_UNAVAILABLE => ProblemType::ServiceUnavailable,
        StatusCode::TOO_MANY_REQUESTS => ProblemType::RateLimited,
        s if s.is_client_error() => ProblemType::InvalidRequest,
        _ => ProblemType::Internal,
    }
}

pub fn render(
    status: StatusCode,
    kind: ProblemType,
    detail: &str,
    retry_after: Option<u32>,
) -> Response {
    let body = ProblemBody {
        kind: format!("/problems/{}", kind.slug()),
        title: kind.title(),
        status: status.as_u16(),
        detail,
    };
    let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = (status, json).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
    );
    if let Some(secs) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Client {
                kind,
                detail,
                retry_after_secs,
            } => problem_response(kind, &detail, retry_after_secs),
            Self::Unavailable(cause) => {
                tracing::error!(error = format!("{cause:#}"), "database unavailable");
                let detail = "The service cannot reach its database. Retry later.";
                problem_response(ProblemType::ServiceUnavailable, detail, Some(5))
            }
            Self::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "internal error");
                let detail = "The request failed on our side. It is safe to retry.";
                problem_response(ProblemType::Internal, detail, None)
            }
        }
    }
}
