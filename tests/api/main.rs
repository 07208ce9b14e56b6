//! Integration tests: the real service against real Postgres, one database
//! per test, Stripe replaced by the loopback stand-in.

mod admin;
mod audit;
mod callers;
mod checkout;
mod dead_letters;
mod edge;
mod encryption;
mod helpers;
mod money_path;
mod processing;
mod replay_jobs;
mod siem;
mod startup;
mod tls;
mod webhooks;
