//! The admin listener: operator routes behind a bearer token, plus the
//! health probes, which need none.

use std::net::IpAddr;

use axum::{
    Json, Router,
    extract::{Path, Request, State},
    http::header,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

use crate::{
    app::AppState,
    audit,
    auth::{self, Actor, Refusal, operators},
    client_ip::ClientIp,
    dead_letters,
    error::{ApiError, ProblemType},
    events::store as events,
    rate_limit,
    webhooks::envelope::EventId,
};

pub fn router(state: AppState) -> Router<AppState> {
    let operator_routes = Router::new()
        .route("/v1/events/{id}", get(show_event))
        .route("/metrics", get(metrics))
        .merge(dead_letters::routes::router())
        .route_layer(middleware::from_fn_with_state(state, require_token));
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .merge(operator_routes)
}

/// Operator routes need an operator token, a break-glass token or the
/// bootstrap token. The operator becomes the actor of what follows.
async fn require_token(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let source = ClientIp::from_extensions(request.extensions()).map(|c| c.0);
    // A source that spent its failed-login budget is refused even with a
    // good token, so guessing gains nothing until the budget refills.
    if let Some(ip) = source
        && let Err(wait) = state.edge.limits.admin_failures.gate(ip)
    {
        state.edge.limits.log_refusal("admin_failures", source);
        return too_many_failures(wait);
    }
    let Some(token) = auth::bearer(request.headers()) else {
        return refuse(&state, "no credential", source).await;
    };
    match operators::authenticate(&state.pool, &state.admin_token, token, source).await {
        Ok(operator) => {
            let actor = Actor::Operator(operator);
            // Taken out first: the request itself cannot be held across an await.
            let resource = format!("{} {}", request.method(), request.uri().path());
            let context = request.extensions().get::<audit::RequestContext>().cloned();
            if let Err(err) = record_granted(&state, &actor, &resource, context.as_ref()).await {
                // Access without its record must not happen: refuse instead.
                return ApiError::from(err).into_response();
            }
            request.extensions_mut().insert(actor);
            next.run(request).await
        }
        Err(Refusal::Unavailable(err)) => ApiError::from(err).into_response(),
        Err(Refusal::Denied(reason)) => refuse(&state, reason, source).await,
    }
}

async fn record_granted(
    state: &AppState,
    actor: &Actor,
    resource: &str,
    context: Option<&audit::RequestContext>,
) -> Result<(), sqlx::Error> {
    let by = actor.id();
    let record = audit::Record::new(&by, "admin_access.granted", audit::Outcome::Allowed)
        .resource(resource)
        .context(context);
    audit::record(&state.pool, &record).await
}

async fn refuse(state: &AppState, reason: &'static str, source: Option<IpAddr>) -> Response {
    tracing::warn!(reason, "admin request refused");
    let record = audit::Record::new("anonymous", "admin_access.refused", audit::Outcome::Refused)
        .reason(reason)
        .severity(audit::Severity::Warning)
        .source(source);
    audit::record_refusal(&state.pool, &record).await;
    if let Some(ip) = source
        && let Err(wait) = state.edge.limits.admin_failures.record(ip)
    {
        state.edge.limits.log_refusal("admin_failures", source);
        return too_many_failures(wait);
    }
    auth::unauthorized("Send Authorization: Bearer with a valid admin token.")
}

fn too_many_failures(wait: std::time::Duration) -> Response {
    let detail = "Too many failed logins from this address. Retry later.";
    rate_limit::too_many(wait, detail).into_response()
}

/// Security decision counters in the Prometheus text format.
async fn metrics() -> Response {
    let content_type = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (content_type, crate::metrics::render()).into_response()
}

async fn livez() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    match sqlx::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => Ok(Json(json!({ "status": "ready" }))),
        Err(err) => {
            tracing::warn!(error = %err, "not ready: database unreachable");
            let detail = "The database does not answer.";
            Err(ApiError::client(ProblemType::ServiceUnavailable, detail).retry_after(5))
        }
    }
}

async fn show_event(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<events::EventView>, ApiError> {
    let not_found = || ApiError::not_found("No event with this id is stored.");
    let id = EventId::parse(&id).ok_or_else(not_found)?;
    let event = events::find(&state.pool, id.as_str()).await?;
    event.map(Json).ok_or_else(not_found)
}
