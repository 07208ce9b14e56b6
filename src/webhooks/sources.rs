//! Which addresses may deliver webhooks: Stripe's published sources by
//! default. A refused source is answered 403 before any signature work,
//! logged, and kept in the forensic record.
//!
//! The signature stays the primary check; the allowlist is a second layer
//! that keeps everyone else from reaching the verifier at all.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use axum::{
    extract::{Request, State},
    http::HeaderMap,
    middleware::Next,
    response::{IntoResponse, Response},
};
use tokio::sync::watch;

use super::forensics;
use crate::{
    app::AppState,
    audit::RequestContext,
    client_ip::{ClientIp, IpNets},
    config::{ConfigError, Source, malformed, read_setting_file, value},
    error::{ApiError, ProblemType},
    rate_limit,
};

const ALLOWED: &str = "PAYMENTS_WEBHOOK_ALLOWED_SOURCES";
const ALLOWED_FILE: &str = "PAYMENTS_WEBHOOK_ALLOWED_SOURCES_FILE";
const ANY_SOURCE: &str = "PAYMENTS_INSECURE_ALLOW_ANY_WEBHOOK_SOURCE";
/// Stripe's list as shipped with this release (see the file's header).
pub const STRIPE_WEBHOOK_SOURCES: &str = include_str!("../../deploy/stripe-webhook-ips.txt");
/// The reason in logs and in `rejected_deliveries`.
pub const SOURCE_NOT_ALLOWED: &str = "source_not_allowed";
/// How often a mounted allowlist file is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(10);

/// The configured policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourcePolicy {
    /// Only these networks; `file` is re-read when it changes.
    Allowlist { nets: IpNets, file: Option<PathBuf> },
    /// Any address: only with `PAYMENTS_INSECURE_ALLOW_ANY_WEBHOOK_SOURCE=true`.
    AnySource,
}

impl SourcePolicy {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let any = match value(src, ANY_SOURCE)?.as_deref() {
            None => false,
            Some("true") => true,
            Some(_) => return Err(malformed(ANY_SOURCE, "the only accepted value is true")),
        };
        let listed = value(src, ALLOWED)?;
        if any {
            return match listed {
                Some(_) => Err(malformed(
                    ANY_SOURCE,
                    format!("set it or {ALLOWED}, not both"),
                )),
                None => Ok(Self::AnySource),
            };
        }
        let file = src
            .get(ALLOWED_FILE)
            .filter(|path| !path.trim().is_empty())
            .map(|path| PathBuf::from(path.trim()));
        let setting = if file.is_some() {
            ALLOWED_FILE
        } else {
            ALLOWED
        };
        let text = listed.unwrap_or_else(|| STRIPE_WEBHOOK_SOURCES.to_owned());
        let nets = parse_list(&text).map_err(|reason| malformed(setting, reason))?;
        Ok(Self::Allowlist { nets, file })
    }
}

fn parse_list(text: &str) -> Result<IpNets, String> {
    let nets = IpNets::parse(text)?;
    if nets.is_empty() {
        return Err(format!(
            "lists no address; to accept any source say {ANY_SOURCE}=true"
        ));
    }
    Ok(nets)
}

/// The policy in force, swapped in place when its file changes.
pub struct SourceAllowlist {
    any: bool,
    nets: RwLock<Arc<IpNets>>,
    file: Option<PathBuf>,
}

impl SourceAllowlist {
    pub fn new(policy: &SourcePolicy) -> Self {
        match policy {
            SourcePolicy::AnySource => {
                tracing::warn!(
                    setting = ANY_SOURCE,
                    "webhook deliveries are accepted from any address"
                );
                Self {
                    any: true,
                    nets: RwLock::new(Arc::default()),
                    file: None,
                }
            }
            SourcePolicy::Allowlist { nets, file } => {
                tracing::info!(networks = nets.len(), "webhook source allowlist in force");
                Self {
                    any: false,
                    nets: RwLock::new(Arc::new(nets.clone())),
                    file: file.clone(),
                }
            }
        }
    }

    pub fn allows(&self, source: Option<IpAddr>) -> bool {
        if self.any {
            return true;
        }
        let nets = self.nets.read().unwrap_or_else(|e| e.into_inner()).clone();
        source.is_some_and(|ip| nets.contains(ip))
    }

    /// Reads the file again. A file that cannot be read or parsed leaves the
    /// list in force as it was.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        let text =
            read_setting_file(ALLOWED_FILE, &path.to_string_lossy()).map_err(|e| e.to_string())?;
        let nets = parse_list(&text)?;
        let count = nets.len();
        *self.nets.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(nets);
        Ok(count)
    }

    /// Polls the file's modification time and reloads it when it changes,
    /// until the service stops. Returns at once without a file.
    pub async fn watch_file(self: Arc<Self>, mut stopping: watch::Receiver<bool>) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let mut seen = modified(&path);
        let mut tick = tokio::time::interval(FILE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            let now = modified(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match self.reload() {
                Ok(networks) => tracing::info!(networks, "webhook source allowlist reloaded"),
                Err(reason) => tracing::error!(
                    %reason,
                    "webhook source allowlist file not reloaded; the previous list stays"
                ),
            }
        }
    }
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Middleware for the webhook listener.
pub async fn require_allowed_source(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let source = ClientIp::from_extensions(request.extensions()).map(|c| c.0);
    if state.edge.sources.allows(source) {
        return next.run(request).await;
    }
    let context = request.extensions().get::<RequestContext>();
    refuse(&state, source, request.headers(), context)
        .await
        .into_response()
}

/// Refuses a source. Refusals spend the source's failure budget, so one
/// address cannot turn refusals into a stream of database writes.
async fn refuse(
    state: &AppState,
    source: Option<IpAddr>,
    headers: &HeaderMap,
    request_context: Option<&RequestContext>,
) -> ApiError {
    let limits = &state.edge.limits;
    if let Some(ip) = source
        && let Err(wait) = limits.webhook_failures.record(ip)
    {
        limits.log_refusal("webhook_failures", source);
        let detail = "Too many refused deliveries from this address. Retry later.";
        return rate_limit::too_many(wait, detail);
    }
    crate::metrics::count_decision("webhook_source.refused", "refused");
    let shown = source.map(|ip| ip.to_string());
    tracing::warn!(
        reason = SOURCE_NOT_ALLOWED,
        source = shown,
        "webhook delivery refused"
    );
    let record = forensics::RefusedDelivery {
        reason: SOURCE_NOT_ALLOWED,
        source,
        signature_header: headers.get("stripe-signature").map(|v| v.as_bytes()),
        // The body of a refused source is never read.
        body: &[],
        context: request_context,
    };
    forensics::record(&state.pool, &state.keyring, record).await;
    let detail = "This address may not deliver webhooks to this service.";
    ApiError::client(ProblemType::SourceNotAllowed, detail)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn stripes_list_is_the_default() {
        let policy = SourcePolicy::from_source(&env(&[])).unwrap();
        let list = SourceAllowlist::new(&policy);
        assert!(list.allows(ip("3.18.12.63")));
        assert!(list.allows(ip("54.187.216.72")));
        assert!(!list.allows(ip("127.0.0.1")));
        assert!(!list.allows(None));
    }

    #[test]
    fn a_configured_list_replaces_it() {
        let policy = SourcePolicy::from_source(&env(&[(ALLOWED, "127.0.0.1/32,::1/128")])).unwrap();
        let list = SourceAllowlist::new(&policy);
        assert!(list.allows(ip("127.0.0.1")));
        assert!(list.allows(ip("::1")));
        assert!(!list.allows(ip("3.18.12.63")));
    }

    #[test]
    fn any_source_must_be_said_exactly() {
        let policy = SourcePolicy::from_source(&env(&[(ANY_SOURCE, "true")])).unwrap();
        assert_eq!(policy, SourcePolicy::AnySource);
        assert!(SourceAllowlist::new(&policy).allows(ip("192.0.2.1")));
        for other in ["yes", "1", "TRUE", "false"] {
            let err = SourcePolicy::from_source(&env(&[(ANY_SOURCE, other)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(ANY_SOURCE), "{other}: {err}");
        }
        let both = env(&[(ANY_SOURCE, "true"), (ALLOWED, "127.0.0.1")]);
        assert!(SourcePolicy::from_source(&both).is_err());
    }

    #[test]
    fn a_bad_or_empty_list_is_named() {
        let err = SourcePolicy::from_source(&env(&[(ALLOWED, "127.0.0.1, stripe.com")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(ALLOWED) && err.contains("entry 2"), "{err}");
        let err = SourcePolicy::from_source(&env(&[(ALLOWED, "# nothing")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("lists no address"), "{err}");
    }

    #[test]
    fn a_mounted_file_is_read_and_reloaded_and_a_broken_one_is_ignored() {
        let dir = std::env::temp_dir().join(format!("payments-sources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stripe-ips.txt");
        std::fs::write(&path, "# Stripe\n3.18.12.63\n").unwrap();
        let file = path.display().to_string();
        let policy = SourcePolicy::from_source(&env(&[(ALLOWED_FILE, &file)])).unwrap();
        let list = SourceAllowlist::new(&policy);
        assert!(list.allows(ip("3.18.12.63")));

        std::fs::write(&path, "3.69.109.8\n").unwrap();
        assert_eq!(list.reload(), Ok(1));
        assert!(list.allows(ip("3.69.109.8")));
        assert!(!list.allows(ip("3.18.12.63")));

        std::fs::write(&path, "not an address\n").unwrap();
        assert!(list.reload().is_err());
        assert!(list.allows(ip("3.69.109.8")), "the previous list stays");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
