//! The public checkout API: create a Stripe Checkout Session, read its state.

mod request;
pub mod store;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};

use crate::{
    app::AppState,
    error::{ApiError, ProblemType},
    http_util::json_body,
    idempotency::{self, Claim, IdempotencyKey},
    stripe_api::{CreatedSession, StripeCallError},
};

const CREATE_PATH: &str = "/v1/checkout/sessions";

pub fn router() -> Router<AppState> {
    Router::new()
        .route(CREATE_PATH, post(create))
        .route("/v1/checkout/sessions/{id}", get(show))
}

#[tracing::instrument(name = "create checkout session", skip_all)]
async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // Validation comes before the key is taken: a refused body is not stored,
    // so the client may correct it and retry with the same key.
    let key = IdempotencyKey::from_headers(&headers)?;
    let json = json_body(&headers, &body)?;
    let session = serde_json::from_value::<request::CreateRequest>(json.clone())
        .map_err(|e| ApiError::invalid(format!("The body does not match the schema: {e}")))?
        .validate()?;
    let fingerprint = idempotency::fingerprint("POST", CREATE_PATH, &json);

    if let Claim::Completed { status, body } =
        idempotency::claim(&state.pool, &key, &fingerprint).await?
    {
        return Ok(replayed(status, body));
    }

    let outbound_key = idempotency::outbound_key(&key, &fingerprint);
    let created = match state
        .stripe
        .create_checkout_session(&session, &outbound_key)
        .await
    {
        Ok(created) => created,
        Err(err) => {
            release_key(&state, &key).await;
            return Err(stripe_failure(err));
        }
    };
    tracing::info!(session_id = %created.id, "checkout session created");

    let body = created_body(&created);
    if let Err(err) = record_created(&state, &key, &created, &body).await {
        // Stripe has the session but we do not. Free the key so the client's
        // retry reaches Stripe with the same outbound key and gets the same
        // session back, which is then recorded.
        release_key(&state, &key).await;
        return Err(err);
    }
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn record_created(
    state: &AppState,
    key: &IdempotencyKey,
    created: &CreatedSession,
    body: &Value,
) -> Result<(), ApiError> {
    let mut tx = state.pool.begin().await?;
    store::insert_created(&mut tx, created).await?;
    idempotency::complete(&mut tx, key, StatusCode::CREATED.as_u16(), body).await?;
    tx.commit().await?;
    Ok(())
}

async fn release_key(state: &AppState, key: &IdempotencyKey) {
    if let Err(err) = idempotency::release(&state.pool, key).await {
        // The lease lapses by itself, after which the client's retry proceeds.
        tracing::warn!(error = %err, "could not release idempotency key; it frees when its lease lapses");
    }
}

fn created_body(created: &CreatedSession) -> Value {
    json!({
        "id": created.id,
        "url": created.url,
        "status": store::SessionStatus::Open.as_str(),
        "expires_at": created.expires_at.to_rfc3339(),
    })
}

fn replayed(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

fn stripe_failure(err: StripeCallError) -> ApiError {
    tracing::warn!(error = %err, "stripe call failed");
    let detail = match err {
        StripeCallError::Refused { code, param, .. } => {
            let code = code.unwrap_or_else(|| "unknown".to_owned());
            match param {
                Some(param) => format!("Stripe refused the request ({code} on {param})."),
                None => format!("Stripe refused the request ({code})."),
            }
        }
        StripeCallError::Unreachable(_) => {
            "Stripe could not be reached. Retry with the same Idempotency-Key.".to_owned()
        }
    };
    ApiError::client(ProblemType::StripeUnavailable, detail)
}

#[tracing::instrument(name = "show checkout session", skip_all)]
async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found("No checkout session with this id was created here.");
    if !store::valid_session_id(&id) {
        return Err(not_found());
    }
    let session = store::find(&state.pool, &id).await?.ok_or_else(not_found)?;
    Ok(Json(session).into_response())
}
