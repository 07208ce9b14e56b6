//! `payments`: Stripe Checkout sessions for a shop's frontend, and a verified,
//! durable Stripe webhook ingress that turns events into payment state.

pub mod admin;
pub mod app;
pub mod audit;
pub mod auth;
pub mod checkout;
pub mod cli;
pub mod client_ip;
pub mod config;
pub mod cors;
pub mod crypto;
pub mod db;
pub mod dead_letters;
pub mod edge;
pub mod error;
pub mod events;
pub mod http_util;
pub mod idempotency;
pub mod maintenance;
pub mod metrics;
pub mod money;
pub mod pci;
pub mod rate_limit;
pub mod server;
pub mod stripe_api;
pub mod telemetry;
pub mod webhooks;
