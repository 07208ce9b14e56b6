//! A loopback stand-in for the parts of the Stripe API that `payments` uses.
//!
//! Integration tests start it in-process with [`StandIn::spawn`] and point the service's
//! Stripe client at [`StandIn::base_url`]; the binary serves it for local runs.
//!
//! What it models:
//! - `POST /v1/checkout/sessions` with Stripe's form encoding, bearer-key check,
//!   parameter validation and idempotency keys. Every price costs
//!   [`UNIT_AMOUNT`] minor units, in USD unless the price id ends in another
//!   currency code (see [`currency_of`]); the price id `price_missing` does not exist.
//! - `GET /v1/checkout/sessions/{id}` for sessions it created.
//! - Injected failures and delays, from the handle or `/_stand_in/*` control endpoints.
//! - Webhook signing ([`sign_payload`]) and events built from fixtures
//!   ([`event_from_fixture`]), written independently from the service's verifier.

mod checkout;
mod control;
mod errors;
mod events;
mod idempotency;
mod params;
mod reply;
mod server;
mod session;
mod signing;
mod state;

pub use events::{EventOverrides, event_from_fixture};
pub use server::StandIn;
pub use session::{UNIT_AMOUNT, currency_of};
pub use signing::{sign_payload, v1_signature};
