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
    admin, checkout,
    config::{Config, IdempotencyConfig, Secret, WebhookConfig},
    db, dead_letters,
    events::worker::{self, Worker},
    http_util, maintenance,
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
    let pool = db::connect_lazy(&config.database_url)?;
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
    let state = AppState {
        pool: pool.clone(),
        stripe: StripeApi::new(&config.stripe)?,
        webhook: Arc::new(config.webhook.clone()),
        events: EventWriter::start(pool.clone(), wake.clone(), WriterOptions::default()),
        admin_token: config.admin_token.clone(),
        idempotency: config.idempotency.clone(),
    };
    let (stop, stopping) = watch::channel(false);
    let background = spawn_background(&config, &pool, &wake, &stopping);
    let (public_addr, webhook_addr, admin_addr) = listeners.local_addrs()?;
    let servers = [
        spawn_server(
            listeners.public,
            checkout::router(),
            &state,
            stopping.clone(),
        ),
        spawn_server(
            listeners.webhook,
            webhooks::router(),
            &state,
            stopping.clone(),
        ),
        spawn_server(
            listeners.admin,
            admin::router(state.clone()),
            &state,
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
    wake: &Arc<Notify>,
    stopping: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let worker = Worker {
        pool: pool.clone(),
        config: config.worker.clone(),
        instance: instance_name().into(),
    };
    let mut tasks: Vec<_> = (0..config.worker.concurrency)
        .map(|_| tokio::spawn(worker.clone().run(wake.clone(), stopping.clone())))
        .collect();
    tasks.push(tokio::spawn(worker::listen(
        pool.clone(),
        wake.clone(),
        stopping.clone(),
    )));
    let housekeeping = maintenance::run(pool.clone(), config.webhook.tolerance, stopping.clone());
    tasks.push(tokio::spawn(housekeeping));
    let replay_jobs = dead_letters::jobs::run_queued_jobs(pool.clone(), stopping.clone());
    tasks.push(tokio::spawn(replay_jobs));
    tasks
}

/// Names this process in `processed_by`: the host (a pod name under
/// Kubernetes) and a suffix that differs per start.
fn instance_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "payments".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

fn spawn_server(
    listener: TcpListener,
    routes: Router<AppState>,
    state: &AppState,
    mut stopping: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let app = with_common_layers(routes).with_state(state.clone());
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move {
        let stop = async move {
            let _closed = stopping.wait_for(|stop| *stop).await;
        };
        if let Err(err) = axum::serve(listener, service)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %err, "listener failed");
        }
    })
}

fn with_common_layers(routes: Router<AppState>) -> Router<AppState> {
    routes
        .fallback(http_util::not_found)
        .method_not_allowed_fallback(http_util::method_not_allowed)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(TraceLayer::new_for_http())
        .layer(middleware::from_fn(http_util::ensure_problem_json))
}

async fn join(task: JoinHandle<()>) {
    if let Err(err) = task.await {
        tracing::error!(error = %err, "task ended abnormally");
    }
}
