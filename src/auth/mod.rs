//! Who is calling. Every way into the public and admin APIs proves its
//! identity here, and the identity becomes the actor of what it does.
//!
//! - The shop's backend sends an API key (`Authorization: Bearer payk_…`).
//! - The shopper's browser sends a short-lived token the shop signed (a JWT).
//! - Operators send an operator or break-glass token (`padm_…`) on the admin
//!   listener, or the bootstrap `PAYMENTS_ADMIN_TOKEN`.
//!
//! Credentials are never logged or stored: only their sha256 is kept.

pub mod api_keys;
pub mod browser;
pub mod cli;
pub mod operators;

use std::net::IpAddr;

use axum::{
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::{
    app::AppState,
    audit,
    error::{ApiError, ProblemType},
};

/// The authenticated caller of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    /// A shop backend, by its API client name.
    Client { name: String },
    /// A shopper's browser, by the subject of the token the shop signed.
    Browser { subject: String },
    /// An operator on the admin API.
    Operator(operators::Operator),
}

impl Actor {
    /// The actor as audit records and idempotency scopes name it.
    pub fn id(&self) -> String {
        match self {
            Self::Client { name } => format!("client:{name}"),
            Self::Browser { subject } => format!("browser:{subject}"),
            Self::Operator(op) => format!("operator:{}", op.name),
        }
    }
}

/// A fresh random credential: a prefix that says what it is, then 32 random
/// bytes in hex. The prefix lets secret scanners recognise a leaked one.
pub(crate) fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

pub(crate) fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The bearer credential, if exactly one well-formed one was sent.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let token = value.to_str().ok()?.strip_prefix("Bearer ")?.trim();
    (!token.is_empty() && token.len() <= 8192).then_some(token)
}

pub(crate) fn unauthorized(detail: &str) -> Response {
    let mut response = ApiError::client(ProblemType::Unauthorized, detail).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// The caller's address: resolved through trusted proxies when configured.
pub(crate) fn peer_ip(request: &Request) -> Option<IpAddr> {
    crate::client_ip::ClientIp::from_extensions(request.extensions()).map(|ip| ip.0)
}

/// Public API middleware: an API key or a browser token, or 401.
pub async fn require_caller(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let source = peer_ip(&request);
    let Some(credential) = bearer(request.headers()) else {
        return refuse(&state, "public_api.refused", "no credential", source).await;
    };
    let actor = if credential.starts_with(api_keys::PREFIX) {
        api_keys::authenticate(&state.pool, credential, source).await
    } else {
        browser::authenticate(state.browser_tokens.as_deref(), credential)
    };
    match actor {
        Ok(actor) => {
            request.extensions_mut().insert(actor);
            next.run(request).await
        }
        Err(Refusal::Unavailable(err)) => ApiError::from(err).into_response(),
        Err(Refusal::Denied(reason)) => refuse(&state, "public_api.refused", reason, source).await,
    }
}

/// Why a credential was not accepted.
#[derive(Debug)]
pub enum Refusal {
    /// The credential is wrong, expired, revoked or a trap. The reason is for
    /// the audit record; the caller only ever learns "unauthorized".
    Denied(&'static str),
    /// It could not be checked: the database is away.
    Unavailable(sqlx::Error),
}

async fn refuse(
    state: &AppState,
    action: &'static str,
    reason: &'static str,
    source: Option<IpAddr>,
) -> Response {
    tracing::warn!(reason, "caller refused");
    let record = audit::Record::new("anonymous", action, audit::Outcome::Refused)
        .reason(reason)
        .source(source);
    audit::record_refusal(&state.pool, &record).await;
    unauthorized("Send Authorization: Bearer with a valid API key or browser token.")
}
