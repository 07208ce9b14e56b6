//! `/v1/checkout/sessions`: the Stripe endpoints the service calls.

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};

use crate::errors::StripeError;
use crate::reply::JsonReply;
use crate::state::Shared;

type FormPairs = Vec<(String, String)>;

/// `POST /v1/checkout/sessions`.
pub(crate) async fn create(
    State(shared): State<Shared>,
    headers: HeaderMap,
    form: Result<Form<FormPairs>, FormRejection>,
) -> JsonReply {
    let key = idempotency_key(&headers);
    if let Some(delay) = shared.note_create_request(key.as_deref()) {
        tokio::time::sleep(delay).await;
    }
    if let Err(error) = authorize(&headers) {
        return error.into();
    }
    // An injected outage comes before the idempotency lookup: a down Stripe replays nothing.
    if let Some(status) = shared.take_injected_failure() {
        return StripeError::injected(status).into();
    }
    match form {
        Ok(Form(pairs)) => shared.create_session(key.as_deref(), &pairs),
        Err(rejection) => {
            StripeError::invalid_request(format!("Invalid form body: {rejection}")).into()
        }
    }
}

/// `GET /v1/checkout/sessions/{id}`.
pub(crate) async fn retrieve(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> JsonReply {
    if let Err(error) = authorize(&headers) {
        return error.into();
    }
    match shared.session(&id) {
        Some(session) => JsonReply::ok(&session),
        None => {
            let message = format!("No such checkout.session: '{id}'");
            StripeError::resource_missing(StatusCode::NOT_FOUND, "session", message).into()
        }
    }
}

/// Any other path, answered as Stripe answers an unknown URL.
pub(crate) async fn unknown_route(method: Method, uri: Uri) -> JsonReply {
    let message = format!("Unrecognized request URL ({method}: {}).", uri.path());
    let error = StripeError::invalid_request(message);
    StripeError {
        status: StatusCode::NOT_FOUND,
        ..error
    }
    .into()
}

/// Stripe accepts secret keys of either mode as a bearer token.
fn authorize(headers: &HeaderMap) -> Result<(), StripeError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match token {
        Some(key) if key.starts_with("sk_test_") || key.starts_with("sk_live_") => Ok(()),
        _ => Err(StripeError::unauthorized()),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("idempotency-key")?.to_str().ok()?;
    Some(value.to_owned())
}
