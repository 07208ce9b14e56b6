//! The admin listener: operator routes behind a bearer token, plus the
//! health probes, which need none.

use axum::{
    Json, Router,
    extract::{Path, Request, State},
    http::header,
    middleware::{self, Next},
    response::Response,
    routing::get,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    app::AppState,
    dead_letters,
    error::{ApiError, ProblemType},
    events::store as events,
};

pub fn router(state: AppState) -> Router<AppState> {
    let operator_routes = Router::new()
        .route("/v1/events/{id}", get(show_event))
        .merge(dead_letters::routes::router())
        .route_layer(middleware::from_fn_with_state(state, require_token));
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .merge(operator_routes)
}

async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if token_matches(token, state.admin_token.expose()) => {
            Ok(next.run(request).await)
        }
        _ => {
            tracing::warn!("admin request refused: missing or wrong token");
            Err(ApiError::client(
                ProblemType::Unauthorized,
                "Send Authorization: Bearer with a valid admin token.",
            ))
        }
    }
}

/// Compares digests in constant time, so neither the content nor the length
/// of the expected token leaks through timing.
fn token_matches(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.ct_eq(&b).into()
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
    let event = events::find(&state.pool, &id).await?;
    event
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("No event with id {id} is stored.")))
}
