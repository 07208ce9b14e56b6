//! The handle that runs the stand-in on a loopback port for as long as it lives.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::{get, post};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::state::Shared;
use crate::{checkout, control};

/// A running stand-in. Dropping it stops the server.
#[derive(Debug)]
pub struct StandIn {
    addr: SocketAddr,
    shared: Shared,
    /// Dropping this sender is the shutdown signal.
    stop: Option<oneshot::Sender<()>>,
}

impl StandIn {
    /// Serves on an OS-chosen loopback port; returns once the socket is listening.
    pub async fn spawn() -> anyhow::Result<StandIn> {
        Self::spawn_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Serves on `addr`; returns once the socket is listening.
    pub async fn spawn_on(addr: SocketAddr) -> anyhow::Result<StandIn> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind the Stripe stand-in to {addr}"))?;
        let addr = listener
            .local_addr()
            .context("read the stand-in's bound address")?;
        let shared = Shared::default();
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(serve(listener, router(shared.clone()), stopped));
        Ok(StandIn {
            addr,
            shared,
            stop: Some(stop),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API base for the Stripe client, with the trailing slash it expects.
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Create requests that made a new session: no replays, no failures.
    pub fn sessions_created(&self) -> usize {
        self.shared.sessions_created()
    }

    /// Create requests received at all.
    pub fn create_requests(&self) -> usize {
        self.shared.create_requests()
    }

    /// The next `count` create requests fail with `status` and a Stripe-shaped error body.
    /// These answers are not stored under the request's idempotency key.
    ///
    /// # Panics
    /// If `status` is not a 4xx or 5xx status: that is a mistake in the calling test.
    pub fn fail_next_creates(&self, count: usize, status: u16) {
        let status = control::failure_status(status)
            .unwrap_or_else(|| panic!("fail_next_creates needs a 4xx or 5xx status, not {status}"));
        self.shared.fail_next_creates(count, status);
    }

    /// The next `count` create requests wait `delay` before they are handled.
    pub fn delay_next_creates(&self, count: usize, delay: Duration) {
        self.shared.delay_next_creates(count, delay);
    }

    /// A created session, as the stand-in returned it.
    pub fn session(&self, id: &str) -> Option<Value> {
        self.shared.session(id)
    }

    /// Idempotency-Key values of create requests, oldest first (the last 1000 at most).
    pub fn idempotency_keys_seen(&self) -> Vec<String> {
        self.shared.idempotency_keys_seen()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        // Stops accepting, closes idle keep-alive connections and lets in-flight
        // requests finish, so a dropped stand-in does not keep answering on old sockets.
        drop(self.stop.take());
    }
}

fn router(shared: Shared) -> Router {
    Router::new()
        .route("/v1/checkout/sessions", post(checkout::create))
        .route("/v1/checkout/sessions/{id}", get(checkout::retrieve))
        .route(
            "/_stand_in/fail-next-creates",
            post(control::fail_next_creates),
        )
        .route("/_stand_in/stats", get(control::stats))
        .fallback(checkout::unknown_route)
        .with_state(shared)
}

async fn serve(listener: TcpListener, router: Router, stopped: oneshot::Receiver<()>) {
    // A send and a dropped sender both mean stop, so the receive result carries nothing.
    let shutdown = async move { stopped.await.unwrap_or_default() };
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    if let Err(error) = served {
        eprintln!("stripe stand-in stopped serving: {error}");
    }
}
