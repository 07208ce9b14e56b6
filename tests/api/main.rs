//! Integration tests: the real service against real Postgres, one database
//! per test, Stripe replaced by the loopback stand-in.

mod admin;
mod checkout;
mod dead_letters;
mod helpers;
mod processing;
mod startup;
mod webhooks;
