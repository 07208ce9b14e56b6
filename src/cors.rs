//! Cross-origin access to the public API, for the shop's own frontends only.
//!
//! The API serves no pages, so any request that carries an `Origin` header
//! comes from a browser on another origin. It passes only when that origin is
//! one of `PAYMENTS_CORS_ORIGINS`; otherwise it is refused (403) before any
//! work, preflight or not. Requests without `Origin` (a shop's backend) are
//! not affected. No credentials (cookies) are ever allowed: callers send
//! their token in `Authorization`.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use crate::{
    config::{ConfigError, Source, malformed, value},
    error::{ApiError, ProblemType},
};

const ALLOW_METHODS: &str = "GET, POST";
const ALLOW_HEADERS: &str = "content-type, idempotency-key, authorization";
/// What a frontend may read of an answer besides the simple headers.
const EXPOSE_HEADERS: &str = "location, idempotent-replayed, retry-after";
/// How long a browser may cache a preflight answer.
const MAX_AGE_SECS: &str = "600";

/// The origins allowed cross-origin access, in their serialized form
/// (`https://shop.example`, `http://localhost:3000`).
#[derive(Clone, Debug, Default)]
pub struct CorsConfig {
    origins: Vec<String>,
}

impl CorsConfig {
    /// `PAYMENTS_CORS_ORIGINS`: comma-separated origins; none by default.
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        const NAME: &str = "PAYMENTS_CORS_ORIGINS";
        let raw = value(src, NAME)?.unwrap_or_default();
        let mut origins = Vec::new();
        for (position, entry) in raw.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let origin = serialized_origin(entry).filter(|o| o == &entry.to_ascii_lowercase());
            let Some(origin) = origin else {
                return Err(malformed(
                    NAME,
                    format!(
                        "entry {} is not an origin like https://shop.example (scheme, host and optional port; no path, no wildcard)",
                        position + 1
                    ),
                ));
            };
            origins.push(origin);
        }
        Ok(Self { origins })
    }

    pub fn new(origins: Vec<String>) -> Self {
        Self { origins }
    }

    fn allows(&self, origin: &str) -> bool {
        serialized_origin(origin).is_some_and(|o| self.origins.contains(&o))
    }
}

/// `scheme://host[:port]` of an http(s) origin, lowercased, default port
/// left out; `None` for anything else (`null`, paths, other schemes).
fn serialized_origin(text: &str) -> Option<String> {
    let url = url::Url::parse(text).ok()?;
    let bare = matches!(url.scheme(), "https" | "http")
        && url.host().is_some()
        && url.username().is_empty()
        && url.password().is_none()
        && url.path() == "/"
        && url.query().is_none()
        && url.fragment().is_none()
        && !text.ends_with('/')
        && !text.contains('*');
    bare.then(|| url.origin().ascii_serialization())
}

/// Middleware for the public listener.
pub async fn enforce(
    State(cors): State<Arc<CorsConfig>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(origin) = request.headers().get(header::ORIGIN).cloned() else {
        return next.run(request).await;
    };
    let allowed = origin.to_str().is_ok_and(|o| cors.allows(o));
    if !allowed {
        crate::metrics::count_decision("cors_origin.refused", "refused");
        tracing::debug!(
            reason = "origin_not_allowed",
            "cross-origin request refused"
        );
        let detail = "Requests from this origin are not allowed.";
        return ApiError::client(ProblemType::OriginNotAllowed, detail).into_response();
    }
    if is_preflight(&request) {
        return preflight(origin);
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    response
}

fn is_preflight(request: &Request) -> bool {
    request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

fn preflight(origin: HeaderValue) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOW_METHODS),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOW_HEADERS),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(MAX_AGE_SECS),
    );
    headers.insert(
        header::VARY,
        HeaderValue::from_static(
            "origin, access-control-request-method, access-control-request-headers",
        ),
    );
    (StatusCode::NO_CONTENT, headers).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(origins: &str) -> Result<CorsConfig, ConfigError> {
        let env: HashMap<String, String> =
            [("PAYMENTS_CORS_ORIGINS".to_owned(), origins.to_owned())].into();
        CorsConfig::from_source(&env)
    }

    #[test]
    fn origins_are_exact_and_normalized() {
        let cors = config("https://shop.example, http://localhost:3000").unwrap();
        assert!(cors.allows("https://shop.example"));
        assert!(cors.allows("https://SHOP.example"));
        assert!(cors.allows("https://shop.example:443"));
        assert!(cors.allows("http://localhost:3000"));
        assert!(!cors.allows("http://shop.example"));
        assert!(!cors.allows("https://shop.example:8443"));
        assert!(!cors.allows("https://evil.shop.example"));
        assert!(!cors.allows("https://shop.example.evil.example"));
        assert!(!cors.allows("null"));
    }

    #[test]
    fn none_by_default_and_no_wildcards_or_paths() {
        assert!(config("").unwrap().origins.is_empty());
        for bad in [
            "*",
            "https://*.shop.example",
            "https://shop.example/",
            "shop.example",
            "ftp://shop.example",
        ] {
            let err = config(bad).unwrap_err().to_string();
            assert!(err.contains("PAYMENTS_CORS_ORIGINS"), "{bad}: {err}");
        }
    }
}
