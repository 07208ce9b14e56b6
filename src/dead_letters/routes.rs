//! Admin routes for dead letters.

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    routing::{get, post},
};
use serde::Deserialize;

use super::{ReplayError, ReplayReport, store};
use crate::{
    app::AppState,
    error::{ApiError, ProblemType},
};

const MAX_LIST: i64 = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/dead-letters", get(list))
        .route("/v1/dead-letters/{id}", get(show))
        .route("/v1/dead-letters/{id}/replay", post(replay))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    limit: Option<i64>,
}

async fn list(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<store::DeadLetterSummary>>, ApiError> {
    let status = query.status.as_deref();
    if !matches!(status, None | Some("open" | "resolved")) {
        return Err(ApiError::invalid("status must be open or resolved."));
    }
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_LIST).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit must be from 1 to {MAX_LIST}."
        )));
    }
    Ok(Json(store::list(&state.pool, status, limit).await?))
}

async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<store::DeadLetterDetail>, ApiError> {
    let id = parse_id(&id)?;
    let entry = store::find(&state.pool, id).await?;
    entry.map(Json).ok_or_else(|| not_found(id))
}

async fn replay(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ReplayReport>, ApiError> {
    let id = parse_id(&id)?;
    match super::replay(&state.pool, id).await {
        Ok(report) => Ok(Json(report)),
        Err(ReplayError::NotFound(id)) => Err(not_found(id)),
        Err(err @ ReplayError::AlreadyResolved(_)) => Err(ApiError::client(
            ProblemType::DeadLetterResolved,
            err.to_string(),
        )),
        Err(ReplayError::Database(err)) => Err(err.into()),
    }
}

fn parse_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::not_found("Dead letter ids are positive integers."))
}

fn not_found(id: i64) -> ApiError {
    ApiError::not_found(format!("No dead letter with id {id}."))
}
