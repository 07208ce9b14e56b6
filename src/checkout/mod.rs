//! The public checkout API: create a Stripe Checkout Session, read its state.

pub mod redirect;
mod request;
pub mod store;

use std::sync::Arc;

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{Path, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;

use crate::{
    app::AppState,
    audit::{self, RequestContext},
    auth::{self, Actor},
    error::{ApiError, ProblemType},
    http_util::json_body,
    idempotency::{self, Claim, IdempotencyKey, KeyedRequest, Lease, StoredResponse},
    rate_limit,
    stripe_api::{CreatedSession, StripeCallError},
};

const CREATE_PATH: &str = "/v1/checkout/sessions";
const CREATE_ROUTE: &str = "POST /v1/checkout/sessions";

/// Every public route needs a caller (an API key or a browser token), within
/// its rate budget, stating a known purpose.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route(CREATE_PATH, post(create))
        .route("/v1/checkout/sessions/{id}", get(show))
        .route_layer(middleware::from_fn_with_state(
            audit::context::PurposeGate {
                purposes: state.purposes.clone(),
                pool: state.pool.clone(),
            },
            audit::context::require_purpose,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.edge.public_client_limit(Arc::new(rate_limit_key)),
            rate_limit::limit_public_client,
        ))
        .route_layer(middleware::from_fn_with_state(state, auth::require_caller))
}

/// The client whose rate budget a request spends: the authenticated caller
/// (the per-client limit runs inside `require_caller`).
fn rate_limit_key(request: &Request) -> String {
    request
        .extensions()
        .get::<Actor>()
        .map_or_else(|| "anonymous".to_owned(), Actor::id)
}

#[tracing::instrument(name = "create checkout session", skip_all)]
async fn create(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Extension(context): Extension<RequestContext>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let result = create_session(&state, &actor, &context, &headers, &body).await;
    if let Err(err) = &result {
        // A refusal is a decision too; the created case is recorded with the
        // session, in its transaction.
        let caller = actor.id();
        let record = audit::Record::new(&caller, "checkout.refused", audit::Outcome::Refused)
            .reason(err.kind().slug())
            .context(&context);
        audit::record_refusal(&state.pool, &record).await;
    }
    result
}

async fn create_session(
    state: &AppState,
    actor: &Actor,
    context: &RequestContext,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    // Validation comes before the key is taken: a refused body is not stored,
    // so the client may correct it and retry with the same key.
    let key = IdempotencyKey::from_headers(headers)?;
    let json = json_body(headers, body)?;
    let session = serde_json::from_value::<request::CreateRequest>(json.clone())
        .map_err(|e| ApiError::invalid(format!("The body does not match the schema: {e}")))?
        .validate(&state.edge.redirect_hosts)?;
    let caller = actor.id();
    let keyed = KeyedRequest {
        client: &caller,
        route: CREATE_ROUTE,
        key: &key,
        fingerprint: idempotency::fingerprint("POST", CREATE_PATH, &json),
    };

    let lease = match idempotency::claim(&state.pool, &state.idempotency, &keyed).await? {
        Claim::Completed(stored) => return Ok(replayed(stored)),
        Claim::Acquired(lease) => lease,
    };

    let reference = keyed.reference();
    let outbound_key = keyed.outbound_key();
    let created = state
        .stripe
        .create_checkout_session(&session, &outbound_key, &reference)
        .await;
    let created = match created {
        Ok(created) => created,
        Err(err) => {
            release_key(state, &keyed, lease).await;
            return Err(stripe_failure(err));
        }
    };
    tracing::info!(session_id = %created.id, "checkout session created");

    let answer = created_answer(&created);
    let recorded =
        record_created(state, &keyed, lease, &created, &reference, &answer, context).await;
    if let Err(err) = recorded {
        // Stripe has the session but we do not. Free the key so the client's
        // retry reaches Stripe with the same outbound key, gets the same
        // session back, and records it.
        release_key(state, &keyed, lease).await;
        return Err(err);
    }
    Ok(respond(&answer, false))
}

async fn record_created(
    state: &AppState,
    keyed: &KeyedRequest<'_>,
    lease: Lease,
    created: &CreatedSession,
    reference: &str,
    answer: &StoredResponse,
    context: &RequestContext,
) -> Result<(), ApiError> {
    let mut tx = state.pool.begin().await?;
    store::insert_created(&mut tx, created, reference, keyed.client).await?;
    let record = audit::Record::new(keyed.client, "checkout.created", audit::Outcome::Done)
        .resource(&created.id)
        .context(context);
    audit::record(&mut *tx, &record).await?;
    if !idempotency::complete(&mut tx, keyed, lease, answer).await? {
        tracing::warn!(
            "idempotency lease lapsed before the session was recorded; the new owner records it too"
        );
    }
    tx.commit().await?;
    Ok(())
}

async fn release_key(state: &AppState, keyed: &KeyedRequest<'_>, lease: Lease) {
    if let Err(err) = idempotency::release(&state.pool, keyed, lease).await {
        // The lease lapses by itself, after which the client's retry proceeds.
        tracing::warn!(error = %err, "could not release idempotency key; it frees when its lease lapses");
    }
}

fn created_answer(created: &CreatedSession) -> StoredResponse {
    StoredResponse {
        status: StatusCode::CREATED.as_u16(),
        headers: vec![(
            header::LOCATION.as_str().to_owned(),
            format!("{CREATE_PATH}/{}", created.id),
        )],
        body: json!({
            "id": created.id,
            "url": created.url,
            "status": store::SessionStatus::Open.as_str(),
            "expires_at": created.expires_at.to_rfc3339(),
        }),
    }
}

fn replayed(stored: StoredResponse) -> Response {
    respond(&stored, true)
}

/// Renders a stored answer; a replay is the same answer, marked as such.
fn respond(answer: &StoredResponse, replayed: bool) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let mut response = (status, Json(answer.body.clone())).into_response();
    let headers = response.headers_mut();
    for (name, value) in &answer.headers {
        let parsed = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        );
        if let (Ok(name), Ok(value)) = parsed {
            headers.insert(name, value);
        }
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
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
async fn show(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found("No checkout session with this id was created here.");
    if !store::valid_session_id(&id) {
        return Err(not_found());
    }
    let session = store::find(&state.pool, &id).await?.ok_or_else(not_found)?;
    // A shopper's browser sees only the sessions it created; the shop's
    // backends see all. To anyone else a session does not exist.
    let visible = match &actor {
        Actor::Browser { .. } => session.created_by.as_deref() == Some(actor.id().as_str()),
        _ => true,
    };
    if !visible {
        return Err(not_found());
    }
    Ok(Json(session).into_response())
}
