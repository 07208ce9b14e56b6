//! Errors in the shape Stripe sends them, so the service's Stripe client parses them
//! the way it would parse real ones: `{"error":{"type":..,"message":..,"code":..,"param":..}}`.

use axum::http::StatusCode;
use serde_json::{Map, Value};

use crate::reply::JsonReply;

#[derive(Debug, Clone)]
pub(crate) struct StripeError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) message: String,
    pub(crate) code: Option<&'static str>,
    pub(crate) param: Option<String>,
}

impl StripeError {
    /// A 400 `invalid_request_error`, Stripe's answer to bad parameters.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            code: None,
            param: None,
        }
    }

    /// A 400 naming the parameter at fault, as Stripe's `param` field does.
    pub fn bad_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::invalid_request(message)
        }
    }

    pub fn missing_param(param: &str) -> Self {
        Self::bad_param(param, format!("Missing required param: {param}."))
    }

    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            ..Self::invalid_request("Invalid API Key provided")
        }
    }

    pub fn resource_missing(status: StatusCode, param: &str, message: String) -> Self {
        Self {
            status,
            code: Some("resource_missing"),
            ..Self::bad_param(param, message)
        }
    }

    pub fn idempotency_mismatch() -> Self {
        Self {
            kind: "idempotency_error",
            ..Self::invalid_request(
                "Keys for idempotent requests can only be used with the same parameters \
                 they were first used with. Try using a key other than the one used for \
                 the original request.",
            )
        }
    }

    /// A failure a test asked for; 5xx use `api_error` as Stripe does for its own faults.
    pub fn injected(status: StatusCode) -> Self {
        let message = format!(
            "Injected failure from the Stripe stand-in (HTTP {})",
            status.as_u16()
        );
        let kind = if status.is_server_error() {
            "api_error"
        } else {
            "invalid_request_error"
        };
        let code = (status == StatusCode::TOO_MANY_REQUESTS).then_some("rate_limit");
        Self {
            status,
            kind,
            message,
            code,
            param: None,
        }
    }

    /// The stand-in's own bug, reported the way Stripe reports an internal fault.
    pub fn internal(error: &anyhow::Error) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "api_error",
            message: format!("Stripe stand-in internal error: {error:#}"),
            code: None,
            param: None,
        }
    }

    fn body(&self) -> Value {
        let mut error = Map::new();
        error.insert("type".into(), self.kind.into());
        error.insert("message".into(), self.message.as_str().into());
        if let Some(code) = self.code {
            error.insert("code".into(), code.into());
        }
        if let Some(param) = &self.param {
            error.insert("param".into(), param.as_str().into());
        }
        serde_json::json!({ "error": error })
    }
}

impl From<StripeError> for JsonReply {
    fn from(error: StripeError) -> Self {
        JsonReply::new(error.status, &error.body())
    }
}
