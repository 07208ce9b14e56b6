//! The guards at each listener's edge, built from the config once and
//! wired here so `app` only names which listener gets which.
//!
//! | listener | guards, outermost first |
//! |---|---|
//! | every one | card data in the URL (422), client address |
//! | public | CORS (403), rate limit per source (429), card data in the body (422); per client (429) inside authentication |
//! | webhook | rate limit per source (429), source allowlist (403); failed deliveries spend a failure budget (429) |
//! | admin | card data in the body (422); failed logins spend a failure budget (429) |

use std::sync::Arc;

use axum::{Router, middleware};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    app::AppState,
    checkout::redirect::RedirectHosts,
    client_ip::{self, TrustedProxies},
    config::Config,
    cors::{self, CorsConfig},
    pci,
    rate_limit::{self, ClientKey, Limits, PublicLimits},
    webhooks::sources::{self, SourceAllowlist},
};

/// Wraps one listener's routes in its guards.
pub type Guard = fn(Router<AppState>, &AppState) -> Router<AppState>;

pub struct Edge {
    pub redirect_hosts: RedirectHosts,
    pub limits: Arc<Limits>,
    pub sources: Arc<SourceAllowlist>,
    proxies: Arc<TrustedProxies>,
    cors: Arc<CorsConfig>,
}

impl Edge {
    pub fn new(config: &Config) -> Self {
        Self {
            redirect_hosts: config.redirect_hosts.clone(),
            limits: Arc::new(Limits::new(&config.rate_limits)),
            sources: Arc::new(SourceAllowlist::new(&config.webhook_sources)),
            proxies: Arc::new(config.trusted_proxies.clone()),
            cors: Arc::new(config.cors.clone()),
        }
    }

    /// The limiter sweep and the allowlist file watch, until `stopping`.
    pub fn spawn_background(&self, stopping: &watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(rate_limit::sweep(self.limits.clone(), stopping.clone())),
            tokio::spawn(self.sources.clone().watch_file(stopping.clone())),
        ]
    }

    /// The per-client budget, keyed by `client_key`: a layer for inside
    /// authentication, where the caller is known.
    pub fn public_client_limit(&self, client_key: ClientKey) -> PublicLimits {
        PublicLimits {
            limits: self.limits.clone(),
            client_key,
        }
    }
}

/// Every listener: the client address, for everything inside.
pub fn common(routes: Router<AppState>, state: &AppState) -> Router<AppState> {
    routes.layer(middleware::from_fn_with_state(
        state.edge.proxies.clone(),
        client_ip::resolve,
    ))
}

/// The URL check, for outside the request log: a refused URL is never
/// logged.
pub fn outermost(routes: Router<AppState>, state: &AppState) -> Router<AppState> {
    routes.layer(middleware::from_fn_with_state(
        state.pool.clone(),
        pci::reject_card_data_in_url,
    ))
}

pub fn public(routes: Router<AppState>, state: &AppState) -> Router<AppState> {
    let edge = &state.edge;
    routes
        .layer(middleware::from_fn_with_state(
            state.pool.clone(),
            pci::reject_card_data_in_body,
        ))
        .layer(middleware::from_fn_with_state(
            edge.limits.clone(),
            rate_limit::limit_public_source,
        ))
        .layer(middleware::from_fn_with_state(
            edge.cors.clone(),
            cors::enforce,
        ))
}

pub fn webhook(routes: Router<AppState>, state: &AppState) -> Router<AppState> {
    routes
        .layer(middleware::from_fn_with_state(
            state.clone(),
            sources::require_allowed_source,
        ))
        .layer(middleware::from_fn_with_state(
            state.edge.limits.clone(),
            rate_limit::limit_webhook,
        ))
}

pub fn admin(routes: Router<AppState>, state: &AppState) -> Router<AppState> {
    routes.layer(middleware::from_fn_with_state(
        state.pool.clone(),
        pci::reject_card_data_in_body,
    ))
}
