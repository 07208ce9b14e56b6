//! `payments`: Stripe Checkout sessions for a shop's frontend, and a verified,
//! durable Stripe webhook ingress that turns events into payment state.

pub mod admin;
pub mod app;
pub mod checkout;
pub mod cli;
pub mod config;
pub mod db;
pub mod dead_letters;
pub mod error;
pub mod events;
pub mod http_util;
pub mod idempotency;
pub mod maintenance;
pub mod money;
pub mod stripe_api;
pub mod telemetry;
pub mod webhooks;
