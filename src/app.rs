//! The service as a function of its config, its listeners and a shutdown
//! signal, so tests start the real thing on port 0 and stop it cleanly.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{Router, http::StatusCode, middleware};
use sqlx::PgPool;
use tokio::{
    net::TcpListener,
    sync::{Notify, watch},
    task::JoinHandle,
};
use tower_http::{timeout::TimeoutLayer, trace::TraceLayer};

use crate::{
    admin, audit,
    auth::browser::BrowserTokens,
    checkout,
    config::{Config, IdempotencyConfig, Secret, WebhookConfig},
    crypto::Keyring,
    db, dead_letters,
    edge::{self, Edge},
    events::worker::{self, Worker},
    http_util, maintenance,
    server::{self, ConnectionLimits, ListenerTls, TlsReloader},
    stripe_api::StripeApi,
    webhooks::{
        self,
        ingest::{EventWriter, WriterOptions},
    },
};

/// Past this a request is answered 408; slow clients cannot hold a task forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for in-flight requests and claimed events.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub stripe: StripeApi,
    pub webhook: Arc<WebhookConfig>,
    pub events: EventWriter,
    pub admin_token: Secret,
    pub idempotency: IdempotencyConfig,
    /// Seals payloads before they are stored and opens them when read.
    pub keyring: Keyring,
    pub browser_tokens: Option<Arc<BrowserTokens>>,
    pub purposes: Arc<audit::context::Purposes>,
    /// Rate limits, the webhook source allowlist, redirect hosts.
    pub edge: Arc<Edge>,
}

/// The three sockets, bound before the service starts so a test can bind
/// port 0 and read the ports back.
pub struct Listeners {
    pub public: TcpListener,
    pub webhook: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            public: bind(config.public_addr, "PAYMENTS_PUBLIC_ADDR").await?,
            webhook: bind(config.webhook_addr, "PAYMENTS_WEBHOOK_ADDR").await?,
            admin: bind(config.admin_addr, "PAYMENTS_ADMIN_ADDR").await?,
        })
    }

    /// (public, webhook, admin)
    pub fn local_addrs(&self) -> anyhow::Result<(SocketAddr, SocketAddr, SocketAddr)> {
        Ok((
            self.public.local_addr()?,
            self.webhook.local_addr()?,
            self.admin.local_addr()?,
        ))
    }
}

async fn bind(addr: SocketAddr, setting: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {setting} ({addr})"))
}

/// Applies pending migrations, then serves until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let pool = db::connect_lazy(&config.database)?;
    db::migrate(&pool).await?;
    run(config, pool, listeners, shutdown).await
}

pub async fn run(
    config: Config,
    pool: PgPool,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let wake = Arc::new(Notify::new());
    let keyring = Keyring::new(&config.keyring, pool.clone());
    let state = AppState {
        pool: pool.clone(),
        stripe: StripeApi::new(&config.stripe)?,
        webhook: Arc::new(config.webhook.clone()),
        events: EventWriter::start(
            pool.clone(),
            keyring.clone(),
            wake.clone(),
            WriterOptions::default(),
        ),
        admin_token: config.admin_token.clone(),
        idempotency: config.idempotency.clone(),
        keyring: keyring.clone(),
        browser_tokens: config.browser_tokens.clone().map(Arc::new),
        purposes: Arc::new(config.purposes.clone()),
        edge: Arc::new(Edge::new(&config)),
    };
    let (stop, stopping) = watch::channel(false);
    let mut background = spawn_background(&config, &pool, &keyring, &wake, &stopping);
    background.extend(state.edge.spawn_background(&stopping));
    let (public_addr, webhook_addr, admin_addr) = listeners.local_addrs()?;
    let servers = [
        spawn_server(
            listeners.public,
            checkout::router(state.clone()),
            edge::public,
            &state,
            config.public_tls.as_ref(),
            &config.connection_limits,
            stopping.clone(),
        ),
        spawn_server(
            listeners.webhook,
            webhooks::router(),
            edge::webhook,
            &state,
            config.webhook_tls.as_ref(),
            &config.connection_limits,
            stopping.clone(),
        ),
        spawn_server(
            listeners.admin,
            admin::router(state.clone()),
            edge::admin,
            &state,
            config.admin_tls.as_ref(),
            &config.connection_limits,
            stopping,
        ),
    ];
    drop(state);
    tracing::info!(%public_addr, %webhook_addr, %admin_addr, "payments listening");

    shutdown.await;
    tracing::info!("shutting down: draining requests and claimed events");
    stop.send_replace(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        for task in servers.into_iter().chain(background) {
            join(task).await;
        }
    });
    if drained.await.is_err() {
        tracing::warn!("shutdown drain timed out; unfinished work stays pending in Postgres");
    }
    Ok(())
}

/// The worker tasks, the notification listener, housekeeping and the runner
/// of bulk replay jobs.
fn spawn_background(
    config: &Config,
    pool: &PgPool,
    keyring: &Keyring,
    wake: &Arc<Notify>,
    stopping: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let worker = Worker {
        pool: pool.clone(),
        config: config.worker.clone(),
        instance: instance_name().into(),
        keyring: keyring.clone(),
    };
    let mut tasks: Vec<_> = (0..config.worker.concurrency)
        .map(|_| tokio::spawn(worker.clone().run(wake.clone(), stopping.clone())))
        .collect();
    tasks.push(tokio::spawn(worker::listen(
        pool.clone(),
        wake.clone(),
        stopping.clone(),
    )));
    let housekeeping = maintenance::run(
        pool.clone(),
        config.webhook.tolerance,
        config.payload_retention,
        stopping.clone(),
    );
    tasks.push(tokio::spawn(housekeeping));
    tasks.push(tokio::spawn(audit::chain::run(
        pool.clone(),
        stopping.clone(),
    )));
    tasks.push(tokio::spawn(audit::rate_limits::run(
        pool.clone(),
        stopping.clone(),
    )));
    let password = db::watch_password(pool.clone(), config.database.clone(), stopping.clone());
    tasks.push(tokio::spawn(password));
    let replay_jobs =
        dead_letters::jobs::run_queued_jobs(pool.clone(), keyring.clone(), stopping.clone());
    tasks.push(tokio::spawn(replay_jobs));
    tasks.extend(audit::export::spawn(pool, &config.audit_export, stopping));
    tasks
}

/// Names this process in `processed_by`: the host (a pod name under
/// Kubernetes) and a suffix that differs per start.
fn instance_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "payments".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

/// Serves one listener (TLS when `tls` is set) until `stopping` turns true.
fn spawn_server(
    listener: TcpListener,
    routes: Router<AppState>,
    guard: edge::Guard,
    state: &AppState,
    tls: Option<&ListenerTls>,
    limits: &ConnectionLimits,
    stopping: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let app = with_common_layers(routes, guard, state, limits.body_read_timeout)
        .with_state(state.clone());
    let tls = tls.map(TlsReloader::new);
    tokio::spawn(server::serve(listener, app, tls, limits.clone(), stopping))
}

/// Fallbacks first, so the edge guards cover unknown routes too; the URL
/// card check outside the request log.
/// The request log layer: spans made by [`request_span`], failures not logged here.
type RequestLog = TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    fn(&axum::http::Request<axum::body::Body>) -> tracing::Span,
    tower_http::trace::DefaultOnRequest,
    tower_http::trace::DefaultOnResponse,
    tower_http::trace::DefaultOnBodyChunk,
    tower_http::trace::DefaultOnEos,
    (),
>;

/// Requests are logged with method and path only: a query string could hold
/// what a client should not have sent. Failures are logged once, where the
/// error is rendered (`error.rs`), not again here.
fn request_log() -> RequestLog {
    TraceLayer::new_for_http()
        .make_span_with(request_span as fn(&axum::http::Request<axum::body::Body>) -> tracing::Span)
        .on_failure(())
}

fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
}

fn with_common_layers(
    routes: Router<AppState>,
    guard: edge::Guard,
    state: &AppState,
    body_timeout: Duration,
) -> Router<AppState> {
    let routes = routes
        .fallback(http_util::not_found)
        .method_not_allowed_fallback(http_util::method_not_allowed);
    // The request context sits inside client-address resolution and outside
    // the guards, so every refusal is recorded with its request's ids.
    let with_context = guard(routes, state).layer(middleware::from_fn(audit::context::attach));
    let guarded = edge::common(with_context, state)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(middleware::from_fn_with_state(
            body_timeout,
            server::body_deadline,
        ))
        .layer(request_log())
        .layer(middleware::from_fn(http_util::ensure_problem_json));
    edge::outermost(guarded, state)
}

async fn join(task: JoinHandle<()>) {
    if let Err(err) = task.await {
        tracing::error!(error = %err, "task ended abnormally");
    }
}
