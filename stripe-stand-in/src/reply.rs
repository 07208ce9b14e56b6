//! The one response shape the stand-in sends: a status and a JSON body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// A JSON answer, kept whole so an idempotent replay can send the very same bytes again.
#[derive(Debug, Clone)]
pub(crate) struct JsonReply {
    pub status: StatusCode,
    pub body: Vec<u8>,
    /// Marks a replay of a stored answer, as Stripe does with `Idempotent-Replayed`.
    pub replayed: bool,
}

impl JsonReply {
    pub fn new(status: StatusCode, body: &Value) -> Self {
        // Display on a Value cannot fail, unlike serde_json::to_vec's signature suggests.
        let body = body.to_string().into_bytes();
        Self {
            status,
            body,
            replayed: false,
        }
    }

    pub fn ok(body: &Value) -> Self {
        Self::new(StatusCode::OK, body)
    }

    pub fn as_replay(&self) -> Self {
        Self {
            replayed: true,
            ..self.clone()
        }
    }
}

impl IntoResponse for JsonReply {
    fn into_response(self) -> Response {
        let content_type = (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let mut response = (self.status, [content_type], self.body).into_response();
        if self.replayed {
            let replayed = HeaderValue::from_static("true");
            response
                .headers_mut()
                .insert("idempotent-replayed", replayed);
        }
        response
    }
}
