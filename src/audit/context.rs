//! The context every decision is recorded with: a request id, a trace id,
//! the caller's address, and on the public API the purpose the caller stated
//! and its consent reference.

use std::net::IpAddr;

use axum::{
    extract::Request,
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::Response,
};
use rand::RngCore;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    pub request_id: String,
    /// W3C trace id: from the caller's `traceparent`, or new.
    pub trace_id: String,
    pub source: Option<IpAddr>,
    pub purpose: Option<String>,
    pub consent_ref: Option<String>,
}

impl RequestContext {
    /// The context of work no request started (the worker, the CLI).
    pub fn background() -> Self {
        Self {
            request_id: uuid::Uuid::new_v4().to_string(),
            trace_id: new_trace_id(),
            ..Self::default()
        }
    }
}

/// Gives every request its context and echoes the request id, so a caller
/// can quote it and an auditor can find the records it left.
pub async fn attach(mut request: Request, next: Next) -> Response {
    let trace_id = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(trace_id_of)
        .unwrap_or_else(new_trace_id);
    let context = RequestContext {
        request_id: uuid::Uuid::new_v4().to_string(),
        trace_id,
        source: crate::client_ip::ClientIp::from_extensions(request.extensions()).map(|ip| ip.0),
        purpose: None,
        consent_ref: None,
    };
    let request_id = context.request_id.clone();
    request.extensions_mut().insert(context);
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`);
/// an all-zero or malformed one is ignored.
fn trace_id_of(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let (Some(version), Some(trace), Some(span), Some(_flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let hex = |s: &str, n| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    let valid =
        version == "00" && hex(trace, 32) && hex(span, 16) && trace.bytes().any(|b| b != b'0');
    valid.then(|| trace.to_owned())
}

fn new_trace_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_gives_its_trace_id() {
        let id = trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(id.as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad}");
        }
    }
}

/// The purposes a public API caller may state, from `PAYMENTS_PURPOSES`.
#[derive(Clone, Debug)]
pub struct Purposes(Vec<String>);

impl Purposes {
    pub fn from_source(
        src: &dyn crate::config::Source,
    ) -> Result<Self, crate::config::ConfigError> {
        const NAME: &str = "PAYMENTS_PURPOSES";
        let raw = crate::config::value(src, NAME)?.unwrap_or_else(|| "checkout".to_owned());
        let list: Vec<String> = raw
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        let valid = |p: &String| {
            p.len() <= 64
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b))
        };
        if list.is_empty() || !list.iter().all(valid) {
            return Err(crate::config::malformed(
                NAME,
                "expected lowercase purpose names, comma-separated",
            ));
        }
        Ok(Self(list))
    }

    fn allows(&self, purpose: &str) -> bool {
        self.0.iter().any(|p| p == purpose)
    }
}

/// What the purpose check needs: the allowed purposes, and the pool to
/// record a refusal in.
#[derive(Clone)]
pub struct PurposeGate {
    pub purposes: std::sync::Arc<Purposes>,
    pub pool: sqlx::PgPool,
}

/// A call without a known purpose is refused, and that is recorded with
/// the caller it came from.
async fn record_refusal(pool: &sqlx::PgPool, actor: &str, context: Option<&RequestContext>) {
    let record = super::Record::new(actor, "purpose.refused", super::Outcome::Refused)
        .reason("missing or unknown purpose")
        .context(context);
    super::record_refusal(pool, &record).await;
}

pub const PURPOSE_HEADER: &str = "payments-purpose";
pub const CONSENT_HEADER: &str = "payments-consent-reference";

/// Public API callers say why they process the data (`Payments-Purpose`, one
/// of the configured purposes) and may name the consent it rests on
/// (`Payments-Consent-Reference`). Both go into every audit record of the
/// request.
pub async fn require_purpose(
    axum::extract::State(gate): axum::extract::State<PurposeGate>,
    mut request: Request,
    next: Next,
) -> Response {
    use axum::response::IntoResponse;
    let headers = request.headers();
    let purpose = headers
        .get(PURPOSE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let Some(purpose) = purpose
        .filter(|p| gate.purposes.allows(p))
        .map(str::to_owned)
    else {
        // Taken out first: the request cannot be held across an await.
        let actor = request
            .extensions()
            .get::<crate::auth::Actor>()
            .map_or_else(|| "anonymous".to_owned(), crate::auth::Actor::id);
        let context = request.extensions().get::<RequestContext>().cloned();
        record_refusal(&gate.pool, &actor, context.as_ref()).await;
        let detail = format!(
            "Send a {PURPOSE_HEADER} header naming one of: {}.",
            gate.purposes.0.join(", ")
        );
        return crate::error::ApiError::client(crate::error::ProblemType::PurposeRequired, detail)
            .into_response();
    };
    let consent = headers
        .get(CONSENT_HEADER)
        .map(|v| v.to_str().map(str::trim).map(str::to_owned));
    let consent = match consent {
        None => None,
        Some(Ok(c))
            if !c.is_empty() && c.len() <= 128 && c.bytes().all(|b| (0x21..=0x7e).contains(&b)) =>
        {
            Some(c)
        }
        Some(_) => {
            let detail = format!("{CONSENT_HEADER} must be 1 to 128 visible ASCII characters.");
            return crate::error::ApiError::invalid(detail).into_response();
        }
    };
    if let Some(context) = request.extensions_mut().get_mut::<RequestContext>() {
        context.purpose = Some(purpose);
        context.consent_ref = consent;
    }
    next.run(request).await
}
