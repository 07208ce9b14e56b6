//! `/_stand_in/*`: control endpoints for the binary, over the same state as the
//! library's handle, so a local run can stage failures without recompiling.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use crate::errors::StripeError;
use crate::reply::JsonReply;
use crate::state::Shared;

#[derive(Debug, Deserialize)]
pub(crate) struct FailNextCreates {
    count: usize,
    status: u16,
}

/// `POST /_stand_in/fail-next-creates` with `{"count":N,"status":S}`.
pub(crate) async fn fail_next_creates(
    State(shared): State<Shared>,
    body: Result<Json<FailNextCreates>, JsonRejection>,
) -> JsonReply {
    let request = match body {
        Ok(Json(request)) => request,
        Err(rejection) => return StripeError::invalid_request(rejection.body_text()).into(),
    };
    let Some(status) = failure_status(request.status) else {
        let message = format!("status must be 400..=599, not {}", request.status);
        return StripeError::bad_param("status", message).into();
    };
    shared.fail_next_creates(request.count, status);
    JsonReply::ok(&json!({ "count": request.count, "status": status.as_u16() }))
}

/// `GET /_stand_in/stats`.
pub(crate) async fn stats(State(shared): State<Shared>) -> JsonReply {
    JsonReply::ok(&json!({
        "create_requests": shared.create_requests(),
        "sessions_created": shared.sessions_created(),
    }))
}

/// Only error statuses make sense as an injected failure.
pub(crate) fn failure_status(status: u16) -> Option<StatusCode> {
    StatusCode::from_u16(status)
        .ok()
        .filter(|status| status.is_client_error() || status.is_server_error())
}
