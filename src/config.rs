//! Typed settings read from the environment and validated once at start.
//!
//! A missing or malformed setting stops the start with an error that names the
//! setting. Secret values live in [`Secret`], whose `Debug` output is masked, so
//! an error or a log line can never print one.

use std::{collections::HashMap, fmt, net::SocketAddr, time::Duration};

/// The real Stripe API. Production keeps this; tests and the local run point
/// `STRIPE_API_BASE` at the loopback stand-in.
pub const DEFAULT_STRIPE_API_BASE: &str = "https://api.stripe.com/";

/// A value that must never appear in logs, errors or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it (an HMAC key, a
    /// bearer header). Never format the result.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("setting {name} is required but not set")]
    Missing { name: String },
    #[error("setting {name} is malformed: {reason}")]
    Malformed { name: String, reason: String },
}

#[derive(Clone, Debug)]
pub struct Config {
    pub database: crate::db::DatabaseSettings,
    pub stripe: StripeConfig,
    pub webhook: WebhookConfig,
    pub public_addr: SocketAddr,
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub admin_token: Secret,
    pub idempotency: IdempotencyConfig,
    pub worker: WorkerConfig,
    /// Key-encryption keys for stored payloads (`PAYMENTS_KEK_FILE`).
    pub keyring: crate::crypto::KeyringConfig,
    /// How long a finished event keeps its payload before it is purged.
    pub payload_retention: Duration,
    /// TLS per listener (`PAYMENTS_{PUBLIC,WEBHOOK,ADMIN}_TLS_*`); `None` is plain HTTP.
    pub public_tls: Option<crate::server::ListenerTls>,
    pub webhook_tls: Option<crate::server::ListenerTls>,
    pub admin_tls: Option<crate::server::ListenerTls>,
    /// Header, body and handshake deadlines and the connection cap.
    pub connection_limits: crate::server::ConnectionLimits,
    /// Shoppers' browser tokens; `None` when no issuer is configured.
    pub browser_tokens: Option<crate::auth::browser::BrowserTokens>,
    /// What public API callers may state as their purpose.
    pub purposes: crate::audit::context::Purposes,
    /// Hosts `success_url` and `cancel_url` may point at (`PAYMENTS_REDIRECT_HOSTS`).
    pub redirect_hosts: crate::checkout::redirect::RedirectHosts,
    /// Browser origins allowed on the public API (`PAYMENTS_CORS_ORIGINS`).
    pub cors: crate::cors::CorsConfig,
    /// Budgets per client, source and failure (`PAYMENTS_RATE_LIMIT_*`).
    pub rate_limits: crate::rate_limit::RateLimitConfig,
    /// Proxies whose `X-Forwarded-For` is believed (`PAYMENTS_TRUSTED_PROXIES`).
    pub trusted_proxies: crate::client_ip::TrustedProxies,
    /// Who may deliver webhooks (`PAYMENTS_WEBHOOK_ALLOWED_SOURCES`).
    pub webhook_sources: crate::webhooks::sources::SourcePolicy,
    /// SIEM sinks for the audit trail (`PAYMENTS_AUDIT_SINKS`, `PAYMENTS_AUDIT_*`).
    pub audit_export: crate::audit::export::ExportConfig,
}

#[derive(Clone, Debug)]
pub struct IdempotencyConfig {
    /// How long a key and its stored answer are kept.
    pub ttl: Duration,
    /// How long a request may hold its key; past it (its owner crashed) the
    /// client's retry takes it over. Longer than the Stripe call timeout.
    pub lease: Duration,
    /// How long a second request with a key in flight waits for the first
    /// answer before it is told to retry (409).
    pub wait: Duration,
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Worker tasks in this process; replicas add their own.
    pub concurrency: usize,
    /// Attempts before an event that keeps failing is dead-lettered.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

#[derive(Clone, Debug)]
pub struct StripeConfig {
    pub secret_key: Secret,
    pub api_base: String,
    /// Upper bound on one call to Stripe; past it the key stays retryable.
    pub request_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Every secret here is accepted, so a rotation can overlap old and new.
    pub secrets: Vec<Secret>,
    pub tolerance: Duration,
}

/// Where settings come from. The process environment in production; a map in
/// tests, so they never race on the global environment.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&ProcessEnv)
    }

    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let config = Self {
            database: database(src)?,
            stripe: StripeConfig {
                secret_key: stripe_secret_key(src)?,
                api_base: stripe_api_base(src)?,
                request_timeout: Duration::from_secs(20),
            },
            webhook: WebhookConfig {
                secrets: webhook_secrets(src)?,
                tolerance: Duration::from_secs(tolerance_secs(src)?),
            },
            public_addr: addr(src, "PAYMENTS_PUBLIC_ADDR", "127.0.0.1:8080")?,
            webhook_addr: addr(src, "PAYMENTS_WEBHOOK_ADDR", "127.0.0.1:8081")?,
            admin_addr: addr(src, "PAYMENTS_ADMIN_ADDR", "127.0.0.1:8082")?,
            admin_token: admin_token(src)?,
            idempotency: idempotency(src)?,
            worker: worker(src)?,
            keyring: crate::crypto::from_source(src)?,
            payload_retention: payload_retention(src)?,
            public_tls: crate::server::ListenerTls::from_source(src, "PAYMENTS_PUBLIC")?,
            webhook_tls: crate::server::ListenerTls::from_source(src, "PAYMENTS_WEBHOOK")?,
            admin_tls: crate::server::ListenerTls::from_source(src, "PAYMENTS_ADMIN")?,
            connection_limits: crate::server::ConnectionLimits::from_source(src)?,
            browser_tokens: crate::auth::browser::from_source(src)?,
            purposes: crate::audit::context::Purposes::from_source(src)?,
            redirect_hosts: crate::checkout::redirect::RedirectHosts::from_source(src)?,
            cors: crate::cors::CorsConfig::from_source(src)?,
            rate_limits: crate::rate_limit::RateLimitConfig::from_source(src)?,
            trusted_proxies: crate::client_ip::TrustedProxies::from_source(src)?,
            webhook_sources: crate::webhooks::sources::SourcePolicy::from_source(src)?,
            audit_export: crate::audit::export::from_source(src)?,
        };
        distinct_listeners(&config)?;
        Ok(config)
    }
}

fn idempotency(src: &dyn Source) -> Result<IdempotencyConfig, ConfigError> {
    let ttl = number(
        src,
        "PAYMENTS_IDEMPOTENCY_TTL_SECS",
        86_400,
        60..=30 * 86_400,
    )?;
    let lease = number(src, "PAYMENTS_IDEMPOTENCY_LEASE_SECS", 60, 1..=3600)?;
    let wait_ms = number(src, "PAYMENTS_IDEMPOTENCY_WAIT_MS", 10_000, 0..=60_000)?;
    Ok(IdempotencyConfig {
        ttl: Duration::from_secs(ttl),
        lease: Duration::from_secs(lease),
        wait: Duration::from_millis(wait_ms),
    })
}

fn worker(src: &dyn Source) -> Result<WorkerConfig, ConfigError> {
    let concurrency = number(src, "PAYMENTS_WORKER_CONCURRENCY", 2, 1..=64)?;
    let max_attempts = number(src, "PAYMENTS_WORKER_MAX_ATTEMPTS", 8, 1..=100)?;
    let base_ms = number(src, "PAYMENTS_WORKER_BACKOFF_BASE_MS", 1000, 1..=600_000)?;
    let max_secs = number(src, "PAYMENTS_WORKER_BACKOFF_MAX_SECS", 600, 1..=86_400)?;
    Ok(WorkerConfig {
        concurrency: usize::try_from(concurrency).unwrap_or(1),
        max_attempts: u32::try_from(max_attempts).unwrap_or(1),
        backoff_base: Duration::from_millis(base_ms),
        backoff_max: Duration::from_secs(max_secs),
    })
}

fn payload_retention(src: &dyn Source) -> Result<Duration, ConfigError> {
    let days = number(src, "PAYMENTS_PAYLOAD_RETENTION_DAYS", 30, 1..=3650)?;
    Ok(Duration::from_secs(days * 86_400))
}

/// A whole number within `range`, or `default` when unset.
pub(crate) fn number(
    src: &dyn Source,
    name: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    let Some(raw) = value(src, name)? else {
        return Ok(default);
    };
    match raw.trim().parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(malformed(
            name,
            format!(
                "expected a whole number from {} to {}",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// Only the database setting, for operator commands that need nothing else.
pub fn database_from_env() -> Result<crate::db::DatabaseSettings, ConfigError> {
    database(&ProcessEnv)
}

/// `DATABASE_URL`, and the file whose content replaces its password, read
/// again while the service runs (short-lived credentials).
fn database(src: &dyn Source) -> Result<crate::db::DatabaseSettings, ConfigError> {
    Ok(crate::db::DatabaseSettings {
        url: database_url(src)?,
        password_file: src
            .get("PAYMENTS_DATABASE_PASSWORD_FILE")
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.trim().into()),
    })
}

/// A setting's value: from `NAME`, or read from the file `NAME_FILE` names
/// (as Kubernetes and Vault mount secrets). Blank counts as unset.
pub(crate) fn value(src: &dyn Source, name: &str) -> Result<Option<String>, ConfigError> {
    let direct = src.get(name).filter(|v| !v.trim().is_empty());
    let file_setting = format!("{name}_FILE");
    let path = src.get(&file_setting).filter(|v| !v.trim().is_empty());
    match (direct, path) {
        (Some(_), Some(_)) => Err(malformed(
            name,
            format!("set {name} or {file_setting}, not both"),
        )),
        (Some(v), None) => Ok(Some(v.trim().to_owned())),
        (None, Some(path)) => read_setting_file(&file_setting, path.trim()).map(Some),
        (None, None) => Ok(None),
    }
}

/// Reads a mounted secret. The error names the setting and the kind of
/// failure, never the content.
pub(crate) fn read_setting_file(setting: &str, path: &str) -> Result<String, ConfigError> {
    let content = std::fs::read_to_string(path)
        .map_err(|e| malformed(setting, format!("cannot read {path}: {}", e.kind())))?;
    let content = content.trim();
    if content.is_empty() {
        return Err(malformed(setting, format!("{path} is empty")));
    }
    Ok(content.to_owned())
}

pub(crate) fn required(src: &dyn Source, name: &str) -> Result<String, ConfigError> {
    value(src, name)?.ok_or_else(|| ConfigError::Missing {
        name: name.to_owned(),
    })
}

pub(crate) fn malformed(name: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Malformed {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

fn database_url(src: &dyn Source) -> Result<Secret, ConfigError> {
    const NAME: &str = "DATABASE_URL";
    let raw = required(src, NAME)?;
    // Parse without echoing the value: it may carry a password.
    let parsed = url::Url::parse(&raw).map_err(|e| malformed(NAME, e.to_string()))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(malformed(
            NAME,
            "scheme must be postgres:// or postgresql://",
        ));
    }
    Ok(Secret::new(raw))
}

fn stripe_secret_key(src: &dyn Source) -> Result<Secret, ConfigError> {
    const NAME: &str = "STRIPE_SECRET_KEY";
    let raw = required(src, NAME)?;
    let known = ["sk_test_", "sk_live_", "rk_test_", "rk_live_"];
    if !known.iter().any(|p| raw.starts_with(p)) {
        return Err(malformed(
            NAME,
            "expected a secret or restricted key (sk_test_, sk_live_, rk_test_, rk_live_)",
        ));
    }
    Ok(Secret::new(raw))
}

/// The one Stripe host this process may call, unless the operator names
/// others (the loopback stand-in in tests and local runs). Checked here so
/// the Stripe client can never be built for another destination.
const DEFAULT_STRIPE_HOSTS: &str = "api.stripe.com";

fn stripe_api_base(src: &dyn Source) -> Result<String, ConfigError> {
    const NAME: &str = "STRIPE_API_BASE";
    let raw = value(src, NAME)?.unwrap_or_else(|| DEFAULT_STRIPE_API_BASE.to_owned());
    let parsed = url::Url::parse(&raw).map_err(|e| malformed(NAME, e.to_string()))?;
    let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
    if !matches!(parsed.scheme(), "https" | "http") || host.is_empty() {
        return Err(malformed(NAME, "expected an http(s) URL with a host"));
    }
    const HOSTS: &str = "PAYMENTS_STRIPE_ALLOWED_HOSTS";
    let allowed = value(src, HOSTS)?.unwrap_or_else(|| DEFAULT_STRIPE_HOSTS.to_owned());
    if !allowed
        .split(',')
        .map(str::trim)
        .any(|h| h.eq_ignore_ascii_case(&host))
    {
        return Err(malformed(NAME, format!("host {host} is not in {HOSTS}")));
    }
    if parsed.scheme() == "http" && !is_loopback_host(&host) {
        return Err(malformed(
            NAME,
            "plain http is only allowed to a loopback address",
        ));
    }
    // The client joins paths onto the base, so it must end with a slash.
    let mut base = parsed.to_string();
    if !base.ends_with('/') {
        base.push('/');
    }
    Ok(base)
}

fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn webhook_secrets(src: &dyn Source) -> Result<Vec<Secret>, ConfigError> {
    const NAME: &str = "STRIPE_WEBHOOK_SECRETS";
    let raw = required(src, NAME)?;
    let mut secrets = Vec::new();
    for (position, item) in raw.split(',').map(str::trim).enumerate() {
        if !item.starts_with("whsec_") || item.len() <= "whsec_".len() {
            let reason = format!("entry {} is not a whsec_ secret", position + 1);
            return Err(malformed(NAME, reason));
        }
        secrets.push(Secret::new(item));
    }
    Ok(secrets)
}

fn tolerance_secs(src: &dyn Source) -> Result<u64, ConfigError> {
    number(src, "PAYMENTS_WEBHOOK_TOLERANCE_SECS", 300, 1..=3600)
}

fn addr(src: &dyn Source, name: &'static str, default: &str) -> Result<SocketAddr, ConfigError> {
    let raw = value(src, name)?.unwrap_or_else(|| default.to_owned());
    raw.parse().map_err(|_| {
        malformed(
            name,
            "expected HOST:PORT with an IP address, such as 127.0.0.1:8080",
        )
    })
}

/// Each listener sits behind its own network policy, so two may never share
/// a port (port 0, an ephemeral port chosen at bind, excepted).
fn distinct_listeners(config: &Config) -> Result<(), ConfigError> {
    let listeners = [
        ("PAYMENTS_PUBLIC_ADDR", config.public_addr),
        ("PAYMENTS_WEBHOOK_ADDR", config.webhook_addr),
        ("PAYMENTS_ADMIN_ADDR", config.admin_addr),
    ];
    for (i, (name, addr)) in listeners.iter().enumerate() {
        for (other, other_addr) in &listeners[i + 1..] {
            if addr.port() != 0 && addr.port() == other_addr.port() {
                return Err(malformed(name, format!("shares its port with {other}")));
            }
        }
    }
    Ok(())
}

fn admin_token(src: &dyn Source) -> Result<Secret, ConfigError> {
    const NAME: &str = "PAYMENTS_ADMIN_TOKEN";
    let raw = required(src, NAME)?;
    // A short token can be guessed; 32 characters is what `openssl rand -hex 16` gives.
    if raw.len() < 32 {
        return Err(malformed(NAME, "must be at least 32 characters"));
    }
    Ok(Secret::new(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV_KEK_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/dev-kek.txt");

    fn base() -> HashMap<String, String> {
        [
            (
                "DATABASE_URL",
                "postgres://postgres:pw@127.0.0.1:5432/payments",
            ),
            ("STRIPE_SECRET_KEY", "sk_test_abc"),
            ("STRIPE_WEBHOOK_SECRETS", "whsec_one, whsec_two"),
            ("PAYMENTS_ADMIN_TOKEN", "0123456789abcdef0123456789abcdef"),
            ("PAYMENTS_KEK_FILE", DEV_KEK_FILE),
            ("PAYMENTS_REDIRECT_HOSTS", "shop.example"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn defaults_apply_and_every_webhook_secret_is_kept() {
        let config = Config::from_source(&base()).expect("valid config");
        assert_eq!(config.stripe.api_base, DEFAULT_STRIPE_API_BASE);
        assert_eq!(config.webhook.secrets.len(), 2);
        assert_eq!(config.webhook.secrets[1].expose(), "whsec_two");
        assert_eq!(config.webhook.tolerance, Duration::from_secs(300));
        assert_eq!(config.admin_addr.to_string(), "127.0.0.1:8082");
    }

    #[test]
    fn a_missing_setting_is_named() {
        let mut env = base();
        env.remove("STRIPE_SECRET_KEY");
        let err = Config::from_source(&env).unwrap_err().to_string();
        assert!(err.contains("STRIPE_SECRET_KEY"), "{err}");
    }

    #[test]
    fn a_malformed_setting_is_named_without_its_value() {
        let mut env = base();
        env.insert("STRIPE_WEBHOOK_SECRETS".into(), "whsec_ok,hunter2".into());
        let err = Config::from_source(&env).unwrap_err().to_string();
        assert!(err.contains("STRIPE_WEBHOOK_SECRETS"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_secret_can_come_from_a_file() {
        let dir = std::env::temp_dir().join(format!("payments-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stripe-key");
        std::fs::write(&path, "sk_test_from_file\n").unwrap();
        let mut env = base();
        env.remove("STRIPE_SECRET_KEY");
        env.insert("STRIPE_SECRET_KEY_FILE".into(), path.display().to_string());

        let config = Config::from_source(&env).expect("valid config");

        assert_eq!(config.stripe.secret_key.expose(), "sk_test_from_file");
        env.insert("STRIPE_SECRET_KEY".into(), "sk_test_both".into());
        let err = Config::from_source(&env).unwrap_err().to_string();
        assert!(
            err.contains("STRIPE_SECRET_KEY") && !err.contains("sk_test"),
            "{err}"
        );
    }

    #[test]
    fn the_stripe_client_may_reach_only_allowed_hosts() {
        let mut env = base();
        env.insert("STRIPE_API_BASE".into(), "https://evil.example/".into());
        let err = Config::from_source(&env).unwrap_err().to_string();
        assert!(err.contains("STRIPE_API_BASE"), "{err}");
        env.insert("STRIPE_API_BASE".into(), "http://127.0.0.1:9/".into());
        env.insert("PAYMENTS_STRIPE_ALLOWED_HOSTS".into(), "127.0.0.1".into());
        assert!(Config::from_source(&env).is_ok());
    }

    #[test]
    fn listeners_may_not_share_a_port() {
        let mut env = base();
        env.insert("PAYMENTS_ADMIN_ADDR".into(), "127.0.0.1:8080".into());
        let err = Config::from_source(&env).unwrap_err().to_string();
        assert!(err.contains("shares its port"), "{err}");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let config = Config::from_source(&base()).expect("valid config");
        let debug = format!("{config:?}");
        for needle in ["pw@", "sk_test_abc", "whsec_one", "0123456789abcdef"] {
            assert!(!debug.contains(needle), "{needle} leaked in {debug}");
        }
        let kek_file = std::fs::read_to_string(DEV_KEK_FILE).unwrap();
        let kek_line = kek_file.lines().find(|l| l.starts_with("dev-only-1:"));
        let kek = kek_line.and_then(|l| l.split_once(':')).unwrap().1;
        assert!(!debug.contains(kek), "key material leaked in {debug}");
    }
}
