//! Small pieces every listener shares: JSON bodies, fallbacks, body limits.

use axum::{
    body::Bytes,
    extract::Request,
    http::{HeaderMap, header},
    middleware::Next,
    response::Response,
};
use serde_json::Value;

use crate::error::{
    ApiError, PROBLEM_CONTENT_TYPE, ProblemType, kind_for_status, problem_response, render,
};

/// Parses a JSON request body, insisting on a JSON content type so a form
/// post from another origin cannot pass as an API call.
pub fn json_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::invalid("Send the body as application/json."));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("The body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid("The body must be a JSON object."));
    }
    Ok(value)
}

pub async fn not_found() -> Response {
    problem_response(ProblemType::NotFound, "No such route.", None)
}

pub async fn method_not_allowed() -> Response {
    let detail = "This method is not allowed on this route.";
    problem_response(ProblemType::MethodNotAllowed, detail, None)
}

/// Rewrites any error response that is not yet a problem document: axum's
/// extractor rejections, body limits and timeouts answer in plain text.
/// Their short text is about the request, so it is kept as the detail.
pub async fn ensure_problem_json(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PROBLEM_CONTENT_TYPE.as_bytes());
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let text = match axum::body::to_bytes(response.into_body(), 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let detail = if text.is_empty() || status.is_server_error() {
        status.canonical_reason().unwrap_or("Error").to_owned()
    } else {
        text
    };
    render(status, kind_for_status(status), &detail, retry_after)
}
