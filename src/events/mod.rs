//! Stored Stripe events: the store, the worker that applies them, and the
//! payment state machine they drive.

pub mod apply;
pub mod store;
pub mod worker;
