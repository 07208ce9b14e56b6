//! Rate limits at the edge, as keyed GCRA limiters (governor).
//!
//! - Public API: per client (whatever the key function names) and per source.
//! - Webhook ingress: a generous budget per source, so Stripe's bursts pass.
//! - Failures: a tight budget per source for webhook deliveries that are
//!   refused and for failed admin logins. A source that spends it is answered
//!   429 on its next requests, even valid ones, until the budget refills.
//!
//! A source is an IPv4 address or an IPv6 /64, the block one host usually
//! holds. A key lives only while its bucket is not full again: a sweep every
//! [`SWEEP_EVERY`] forgets the rest, and a limiter that grows past
//! [`MAX_KEYS`] sweeps itself at once, so memory stays bounded.

use std::{
    collections::HashMap,
    hash::Hash,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use governor::{
    DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock,
};
use tokio::sync::watch;

use crate::{
    client_ip::ClientIp,
    config::{ConfigError, Source, malformed, number, value},
    error::{ApiError, ProblemType},
};

/// How often idle keys are forgotten.
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Past this many keys a limiter sweeps at once rather than waiting.
pub const MAX_KEYS: usize = 100_000;
/// How many checks pass between two looks at a limiter's size.
const SIZE_CHECK_EVERY: u32 = 1024;

/// A budget: one request replenished every `replenish_every`, at most
/// `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub replenish_every: Duration,
    pub burst: NonZeroU32,
}

impl Budget {
    fn quota(self) -> Quota {
        Quota::with_period(self.replenish_every)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(self.burst)
    }

    /// `{prefix}_PER_SEC` or `{prefix}_PER_MIN` (not both), and
    /// `{prefix}_BURST`; `default` when unset.
    fn from_source(src: &dyn Source, prefix: &str, default: Self) -> Result<Self, ConfigError> {
        let per_sec = format!("{prefix}_PER_SEC");
        let per_min = format!("{prefix}_PER_MIN");
        let replenish_every = match (value(src, &per_sec)?, value(src, &per_min)?) {
            (Some(_), Some(_)) => {
                return Err(malformed(
                    &per_sec,
                    format!("set it or {per_min}, not both"),
                ));
            }
            (Some(_), None) => every(Duration::from_secs(1), number(src, &per_sec, 1, RATES)?),
            (None, Some(_)) => every(Duration::from_secs(60), number(src, &per_min, 1, RATES)?),
            (None, None) => default.replenish_every,
        };
        let burst = number(
            src,
            &format!("{prefix}_BURST"),
            default.burst.get().into(),
            RATES,
        )?;
        Ok(Self {
            replenish_every,
            burst: NonZeroU32::new(u32::try_from(burst).unwrap_or(u32::MAX))
                .unwrap_or(NonZeroU32::MIN),
        })
    }

    /// `rate` per `period`, at most `burst` at once.
    fn new(rate: u32, period: Duration, burst: u32) -> Self {
        Self {
            replenish_every: every(period, rate.into()),
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// What a rate or a burst may be set to.
const RATES: std::ops::RangeInclusive<u64> = 1..=1_000_000;

fn every(period: Duration, rate: u64) -> Duration {
    let rate = u32::try_from(rate).unwrap_or(u32::MAX).max(1);
    (period / rate).max(Duration::from_nanos(1))
}

#[derive(Clone, Debug)]
pub struct RateLimitConfig {
    pub public_per_client: Budget,
    pub public_per_source: Budget,
    pub webhook_per_source: Budget,
    pub webhook_failures_per_source: Budget,
    pub admin_failures_per_source: Budget,
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);

impl RateLimitConfig {
    /// Each budget from `PAYMENTS_RATE_LIMIT_{NAME}_PER_SEC` or `_PER_MIN`,
    /// and `_BURST`.
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let budget = |name: &str, default: Budget| {
            Budget::from_source(src, &format!("PAYMENTS_RATE_LIMIT_{name}"), default)
        };
        Ok(Self {
            public_per_client: budget("PUBLIC_CLIENT", Budget::new(100, SECOND, 200))?,
            public_per_source: budget("PUBLIC_SOURCE", Budget::new(50, SECOND, 100))?,
            // Stripe delivers in bursts; none of them may be dropped.
            webhook_per_source: budget("WEBHOOK", Budget::new(500, SECOND, 1000))?,
            webhook_failures_per_source: budget("WEBHOOK_FAILURES", Budget::new(5, SECOND, 20))?,
            admin_failures_per_source: budget("ADMIN_FAILURES", Budget::new(10, MINUTE, 10))?,
        })
    }
}

/// Every limiter of one process.
pub struct Limits {
    pub public_per_client: KeyedLimit<String>,
    pub public_per_source: KeyedLimit<IpAddr>,
    pub webhook_per_source: KeyedLimit<IpAddr>,
    pub webhook_failures: FailureBudget,
    pub admin_failures: FailureBudget,
    /// At most a few refusal log lines a second, so a flood cannot flood the logs.
    log_gate: DefaultDirectRateLimiter,
}

impl Limits {
    pub fn new(config: &RateLimitConfig) -> Self {
        Self {
            public_per_client: KeyedLimit::new(config.public_per_client),
            public_per_source: KeyedLimit::new(config.public_per_source),
            webhook_per_source: KeyedLimit::new(config.webhook_per_source),
            webhook_failures: FailureBudget::new(config.webhook_failures_per_source),
            admin_failures: FailureBudget::new(config.admin_failures_per_source),
            log_gate: RateLimiter::direct(Quota::per_second(
                NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN),
            )),
        }
    }

    /// Counts a refusal, and logs it unless too many were logged this second.
    pub fn log_refusal(&self, limit: &'static str, source: Option<IpAddr>) {
        crate::metrics::count_decision(&format!("rate_limit.{limit}"), "refused");
        crate::audit::rate_limits::note(limit, source);
        if self.log_gate.check().is_ok() {
            let source = source.map(|ip| ip.to_string());
            tracing::warn!(reason = "rate_limited", limit, source, "request refused");
        }
    }

    /// Forgets idle keys.
    pub fn sweep(&self) {
        self.public_per_client.sweep();
        self.public_per_source.sweep();
        self.webhook_per_source.sweep();
        self.webhook_failures.sweep();
        self.admin_failures.sweep();
    }
}

/// Sweeps `limits` every [`SWEEP_EVERY`] until the service stops.
pub async fn sweep(limits: Arc<Limits>, mut stopping: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => limits.sweep(),
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}

/// One keyed limiter with its memory bound.
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    checks: AtomicU32,
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    pub fn new(budget: Budget) -> Self {
        Self {
            limiter: RateLimiter::keyed(budget.quota()),
            checks: AtomicU32::new(0),
        }
    }

    /// Takes one request from `key`'s budget, or says how long to wait.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks.is_multiple_of(SIZE_CHECK_EVERY) && self.limiter.len() > MAX_KEYS {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// A budget that only failures spend. Once a source has spent it, the
/// source is blocked (every request refused, before any work) until one more
/// failure would fit again. Successes cost nothing.
pub struct FailureBudget {
    failures: KeyedLimit<IpAddr>,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl FailureBudget {
    pub fn new(budget: Budget) -> Self {
        Self {
            failures: KeyedLimit::new(budget),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(wait)` while `ip`'s source is blocked.
    pub fn gate(&self, ip: IpAddr) -> Result<(), Duration> {
        let key = source_key(ip);
        let blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        match blocked.get(&key) {
            Some(until) => match until.checked_duration_since(Instant::now()) {
                Some(wait) if !wait.is_zero() => Err(wait),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Counts one failure. `Err(wait)` when it did not fit: the source is
    /// blocked from now on for `wait`.
    pub fn record(&self, ip: IpAddr) -> Result<(), Duration> {
        let key = source_key(ip);
        let wait = match self.failures.check(&key) {
            Ok(()) => return Ok(()),
            Err(wait) => wait.max(Duration::from_millis(1)),
        };
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        if blocked.len() >= MAX_KEYS {
            let now = Instant::now();
            blocked.retain(|_, until| *until > now);
        }
        if blocked.len() < MAX_KEYS {
            blocked.insert(key, Instant::now() + wait);
        }
        Err(wait)
    }

    fn sweep(&self) {
        self.failures.sweep();
        let now = Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        blocked.retain(|_, until| *until > now);
        blocked.shrink_to_fit();
    }
}

/// The key of a source: an IPv4 address, or the /64 of an IPv6 one.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// The 429 answer: `Retry-After` in whole seconds, at least one.
pub fn too_many(wait: Duration, detail: &str) -> ApiError {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = u32::try_from(secs.max(1)).unwrap_or(u32::MAX);
    ApiError::client(ProblemType::RateLimited, detail).retry_after(secs)
}

/// Names the client a public request spends the per-client budget of.
pub type ClientKey = Arc<dyn Fn(&Request) -> String + Send + Sync>;

/// Middleware state for the public API's limits.
#[derive(Clone)]
pub struct PublicLimits {
    pub limits: Arc<Limits>,
    pub client_key: ClientKey,
}

/// Middleware: the public API's budget per source.
pub async fn limit_public_source(
    State(limits): State<Arc<Limits>>,
    request: Request,
    next: Next,
) -> Response {
    let detail = "Too many requests from this address. Retry later.";
    match refused_by_source(
        &limits,
        &limits.public_per_source,
        "public_per_source",
        &request,
        detail,
    ) {
        None => next.run(request).await,
        Some(refused) => refused,
    }
}

/// Spends one unit of `limiter`'s budget for the request's source; past
/// the budget, counts the refusal and gives the 429 to answer with.
fn refused_by_source(
    limits: &Limits,
    limiter: &KeyedLimit<IpAddr>,
    name: &'static str,
    request: &Request,
    detail: &str,
) -> Option<Response> {
    let source = ClientIp::from_extensions(request.extensions()).map(|c| c.0);
    let key = source_key(source.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)));
    let wait = limiter.check(&key).err()?;
    limits.log_refusal(name, source);
    Some(too_many(wait, detail).into_response())
}

/// Middleware: the public API's budget per client, as the key function
/// names it. Goes inside authentication, where the caller is known.
pub async fn limit_public_client(
    State(public): State<PublicLimits>,
    request: Request,
    next: Next,
) -> Response {
    let client = (public.client_key)(&request);
    if let Err(wait) = public.limits.public_per_client.check(&client) {
        let source = ClientIp::from_extensions(request.extensions()).map(|c| c.0);
        public.limits.log_refusal("public_per_client", source);
        let detail = "Too many requests from this client. Retry later.";
        return too_many(wait, detail).into_response();
    }
    next.run(request).await
}

/// Middleware: the webhook listener's budget per source.
pub async fn limit_webhook(
    State(limits): State<Arc<Limits>>,
    request: Request,
    next: Next,
) -> Response {
    let detail = "Too many deliveries from this address. Retry later.";
    match refused_by_source(
        &limits,
        &limits.webhook_per_source,
        "webhook_per_source",
        &request,
        detail,
    ) {
        None => next.run(request).await,
        Some(refused) => refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(per_sec: u32, burst: u32) -> Budget {
        Budget {
            replenish_every: Duration::from_secs(1) / per_sec,
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_key_gets_its_burst_then_waits() {
        let limit = KeyedLimit::new(budget(1, 3));
        for _ in 0..3 {
            assert!(limit.check(&"a").is_ok());
        }
        let wait = limit.check(&"a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(limit.check(&"b").is_ok(), "keys have their own budgets");
    }

    #[test]
    fn retry_after_is_whole_seconds_and_at_least_one() {
        for (wait, expected) in [
            (Duration::from_millis(1), 1),
            (Duration::from_millis(1000), 1),
            (Duration::from_millis(1001), 2),
            (Duration::ZERO, 1),
        ] {
            let ApiError::Client {
                retry_after_secs, ..
            } = too_many(wait, "x")
            else {
                panic!("client error");
            };
            assert_eq!(retry_after_secs, Some(expected), "{wait:?}");
        }
    }

    #[test]
    fn failures_block_a_source_once_spent_and_successes_cost_nothing() {
        let budget = FailureBudget::new(budget(1, 2));
        let source = ip("198.51.100.7");
        assert!(budget.gate(source).is_ok());
        assert!(budget.record(source).is_ok());
        assert!(budget.record(source).is_ok());
        assert!(
            budget.gate(source).is_ok(),
            "the budget is spent, not exceeded"
        );
        assert!(budget.record(source).is_err(), "one failure too many");
        assert!(budget.gate(source).is_err(), "blocked before any work");
        assert!(budget.gate(ip("198.51.100.8")).is_ok(), "others are not");
    }

    #[test]
    fn a_block_ends_when_the_budget_refills() {
        let budget = FailureBudget::new(budget(50, 1));
        let source = ip("198.51.100.7");
        assert!(budget.record(source).is_ok());
        assert!(budget.record(source).is_err());
        assert!(budget.gate(source).is_err());
        std::thread::sleep(Duration::from_millis(40));
        assert!(budget.gate(source).is_ok());
        budget.sweep();
        assert!(budget.blocked.lock().unwrap().is_empty());
    }

    #[test]
    fn an_ipv6_source_is_its_64_and_mapped_v4_is_v4() {
        assert_eq!(
            source_key(ip("2001:db8:1:2:aaaa::1")),
            source_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            source_key(ip("2001:db8:1:2::1")),
            source_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(source_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let limit = KeyedLimit::new(budget(1000, 1));
        for i in 0..100u32 {
            assert!(limit.check(&i).is_ok());
        }
        assert_eq!(limit.len(), 100);
        std::thread::sleep(Duration::from_millis(5));
        limit.sweep();
        assert!(limit.is_empty());
    }

    #[test]
    fn budgets_are_read_from_settings_with_defaults() {
        let mut env = HashMap::new();
        env.insert(
            "PAYMENTS_RATE_LIMIT_PUBLIC_SOURCE_PER_SEC".to_owned(),
            "4".to_owned(),
        );
        env.insert(
            "PAYMENTS_RATE_LIMIT_ADMIN_FAILURES_BURST".to_owned(),
            "3".to_owned(),
        );
        let config = RateLimitConfig::from_source(&env).unwrap();
        assert_eq!(
            config.public_per_source.replenish_every,
            Duration::from_millis(250)
        );
        assert_eq!(config.admin_failures_per_source.burst.get(), 3);
        assert_eq!(
            config.admin_failures_per_source.replenish_every,
            Duration::from_secs(6)
        );
        assert_eq!(config.webhook_per_source.burst.get(), 1000);
        env.insert(
            "PAYMENTS_RATE_LIMIT_WEBHOOK_BURST".to_owned(),
            "0".to_owned(),
        );
        let err = RateLimitConfig::from_source(&env).unwrap_err().to_string();
        assert!(err.contains("PAYMENTS_RATE_LIMIT_WEBHOOK_BURST"), "{err}");
        env.remove("PAYMENTS_RATE_LIMIT_WEBHOOK_BURST");

        env.insert(
            "PAYMENTS_RATE_LIMIT_WEBHOOK_FAILURES_PER_MIN".to_owned(),
            "2".to_owned(),
        );
        let config = RateLimitConfig::from_source(&env).unwrap();
        assert_eq!(
            config.webhook_failures_per_source.replenish_every,
            Duration::from_secs(30)
        );
        env.insert(
            "PAYMENTS_RATE_LIMIT_WEBHOOK_FAILURES_PER_SEC".to_owned(),
            "2".to_owned(),
        );
        let err = RateLimitConfig::from_source(&env).unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");
    }
}
