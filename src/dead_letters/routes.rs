//! Admin routes for dead letters.

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::json;

use super::{
    ReplayError, ReplayReport,
    jobs::{self, FilterError, FilterInput, JobFilter, JobView, Runner},
    store::{self, DiscardError, DiscardReason, Reason},
};
use crate::{
    app::AppState,
    audit::RequestContext,
    auth::Actor,
    error::{ApiError, ProblemType},
    http_util::json_body,
};

const MAX_LIST: i64 = 1000;
const JOBS_PATH: &str = "/v1/dead-letters/replay-jobs";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/dead-letters", get(list))
        .route("/v1/dead-letters/{id}", get(show))
        .route("/v1/dead-letters/{id}/replay", post(replay))
        .route("/v1/dead-letters/{id}/discard", post(discard))
        .route(JOBS_PATH, get(list_jobs).post(create_job))
        .route("/v1/dead-letters/replay-jobs/{id}", get(show_job))
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
    if status.is_some_and(|s| !store::STATUSES.contains(&s)) {
        return Err(ApiError::invalid(
            "status must be open, resolved or discarded.",
        ));
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
    let entry = store::find(&state.pool, &state.keyring, id).await?;
    entry.map(Json).ok_or_else(|| not_found(id))
}

/// `Payments-Reason` says why an operator replays; it is required and goes
/// into the audit record.
pub const REASON_HEADER: &str = "payments-reason";

fn operator_reason(headers: &HeaderMap) -> Result<String, ApiError> {
    let reason = headers
        .get(REASON_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match reason {
        Some(r) if !r.is_empty() && r.len() <= 500 => Ok(r.to_owned()),
        _ => Err(ApiError::invalid(format!(
            "Send a {REASON_HEADER} header (1 to 500 characters) saying why."
        ))),
    }
}

async fn replay(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Extension(context): Extension<RequestContext>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ReplayReport>, ApiError> {
    let id = parse_id(&id)?;
    let reason = operator_reason(&headers)?;
    let by = actor.id();
    let requested = super::Requested {
        by: &by,
        reason: &reason,
        context: Some(&context),
    };
    match super::replay(&state.pool, &state.keyring, id, requested).await {
        Ok(report) => Ok(Json(report)),
        Err(ReplayError::NotFound(id)) => Err(not_found(id)),
        Err(ReplayError::Closed { id, status }) => Err(not_open(id, &status)),
        Err(ReplayError::Database(err)) => Err(err.into()),
        Err(err @ ReplayError::Payload(_)) => Err(ApiError::Internal(err.into())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscardRequest {
    reason: String,
}

async fn discard(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Extension(context): Extension<RequestContext>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<store::DeadLetterSummary>, ApiError> {
    let id = parse_id(&id)?;
    let request: DiscardRequest = parse_body(&headers, &body)?;
    let reason = DiscardReason::parse(&request.reason).ok_or_else(|| {
        ApiError::invalid(format!(
            "reason must be 1 to {} characters, not all blank.",
            DiscardReason::MAX_CHARS
        ))
    })?;
    let by = actor.id();
    match store::discard(&state.pool, id, &reason, &by, Some(&context)).await {
        Ok(entry) => Ok(Json(entry)),
        Err(DiscardError::NotFound(id)) => Err(not_found(id)),
        Err(DiscardError::Closed { id, status }) => Err(not_open(id, &status)),
        Err(DiscardError::Database(err)) => Err(err.into()),
    }
}

/// A bulk replay request. `all` must be sent to mean "no filter", so a
/// forgotten filter cannot replay everything.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobRequest {
    reason: Option<String>,
    event_type: Option<String>,
    created_from: Option<String>,
    created_to: Option<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    dry_run: bool,
}

async fn create_job(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Extension(context): Extension<RequestContext>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: JobRequest = parse_body(&headers, &body)?;
    let dry_run = request.dry_run;
    let filter = job_filter(request)?;
    if dry_run {
        let matched = jobs::count_matching(&state.pool, &filter).await?;
        let body = json!({ "dry_run": true, "matched": matched, "filter": filter.view() });
        return Ok(Json(body).into_response());
    }
    let reason = operator_reason(&headers)?;
    let job = jobs::create_job(&state.pool, &filter, Runner::Background).await?;
    let by = actor.id();
    let resource = format!("replay_job:{}", job.progress.id);
    let record = crate::audit::Record::new(
        &by,
        "dead_letter.bulk_replay_requested",
        crate::audit::Outcome::Done,
    )
    .resource(&resource)
    .reason(&reason)
    .context(&context);
    crate::audit::record(&state.pool, &record).await?;
    Ok(accepted(job))
}

fn job_filter(request: JobRequest) -> Result<JobFilter, ApiError> {
    let reason = request
        .reason
        .map(|raw| {
            Reason::parse(&raw).ok_or_else(|| {
                ApiError::invalid("reason must be malformed_payload, not_an_event or apply_failed.")
            })
        })
        .transpose()?;
    let input = FilterInput {
        reason,
        event_type: request.event_type,
        created_from: timestamp("created_from", request.created_from)?,
        created_to: timestamp("created_to", request.created_to)?,
        all: request.all,
    };
    JobFilter::new(input).map_err(|err| filter_problem(&err))
}

/// The problem in the API's own field names.
fn filter_problem(err: &FilterError) -> ApiError {
    let detail = match err {
        FilterError::Empty => {
            "Give at least one of reason, event_type, created_from and created_to, \
             or \"all\": true to replay every open dead letter."
        }
        FilterError::AllWithFilter => {
            "\"all\": true means every open dead letter; send it without other filters."
        }
        FilterError::EmptyRange => "created_from must be before created_to.",
        FilterError::EventType => "event_type must be 1 to 255 characters.",
    };
    ApiError::invalid(detail)
}

fn timestamp(
    field: &str,
    raw: Option<String>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    raw.map(|raw| {
        jobs::parse_timestamp(&raw).ok_or_else(|| {
            ApiError::invalid(format!(
                "{field} must be an RFC 3339 timestamp such as 2026-12-04T17:25:00Z."
            ))
        })
    })
    .transpose()
}

/// 202 with the job and where to follow it.
fn accepted(job: JobView) -> Response {
    let location = format!("{JOBS_PATH}/{}", job.progress.id);
    let mut response = (StatusCode::ACCEPTED, Json(job)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

async fn list_jobs(State(state): State<AppState>) -> Result<Json<Vec<JobView>>, ApiError> {
    Ok(Json(jobs::list_jobs(&state.pool, jobs::LIST_LIMIT).await?))
}

async fn show_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let not_found = || ApiError::not_found(format!("No replay job with id {id}."));
    let job_id = id.parse::<i64>().ok().filter(|id| *id > 0);
    let Some(job_id) = job_id else {
        return Err(not_found());
    };
    let job = jobs::find_job(&state.pool, job_id).await?;
    job.map(Json).ok_or_else(not_found)
}

/// A JSON body in the exact shape `T` describes; unknown fields are refused.
fn parse_body<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, ApiError> {
    let json = json_body(headers, body)?;
    serde_json::from_value(json)
        .map_err(|e| ApiError::invalid(format!("The body does not match the schema: {e}")))
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

/// Only an open entry is replayed or discarded. A resolved one keeps the
/// problem type clients already know; any other status gets its own.
fn not_open(id: i64, status: &str) -> ApiError {
    let kind = match status {
        "resolved" => ProblemType::DeadLetterResolved,
        _ => ProblemType::DeadLetterClosed,
    };
    ApiError::client(kind, format!("Dead letter {id} is {status}, not open."))
}
