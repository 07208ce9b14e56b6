//! The stand-in's memory, shared by the HTTP handlers and the test handle.
//!
//! One std Mutex guards it all; no lock is ever held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;

use crate::errors::StripeError;
use crate::idempotency::{self, IdempotencyStore, Lookup};
use crate::params::{self, CreateParams};
use crate::reply::JsonReply;
use crate::session;

/// Enough history for any test, bounded so a long local run does not grow without end.
const KEYS_SEEN_LIMIT: usize = 1000;

#[derive(Debug, Clone, Default)]
pub(crate) struct Shared(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    create_requests: usize,
    sessions_created: usize,
    failures: Option<Countdown<StatusCode>>,
    delays: Option<Countdown<Duration>>,
    sessions: HashMap<String, Value>,
    idempotency: IdempotencyStore,
    keys_seen: VecDeque<String>,
}

/// A value handed to the next `remaining` create requests, one each.
#[derive(Debug)]
struct Countdown<T> {
    remaining: usize,
    value: T,
}

fn countdown<T>(count: usize, value: T) -> Option<Countdown<T>> {
    (count > 0).then_some(Countdown {
        remaining: count,
        value,
    })
}

fn take_one<T: Copy>(slot: &mut Option<Countdown<T>>) -> Option<T> {
    let countdown = slot.as_mut()?;
    let value = countdown.value;
    countdown.remaining -= 1;
    if countdown.remaining == 0 {
        *slot = None;
    }
    Some(value)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked mid-request must not hide the counters from the others.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn create_requests(&self) -> usize {
        self.lock().create_requests
    }

    pub fn sessions_created(&self) -> usize {
        self.lock().sessions_created
    }

    pub fn session(&self, id: &str) -> Option<Value> {
        self.lock().sessions.get(id).cloned()
    }

    pub fn idempotency_keys_seen(&self) -> Vec<String> {
        self.lock().keys_seen.iter().cloned().collect()
    }

    pub fn fail_next_creates(&self, count: usize, status: StatusCode) {
        self.lock().failures = countdown(count, status);
    }

    pub fn delay_next_creates(&self, count: usize, delay: Duration) {
        self.lock().delays = countdown(count, delay);
    }

    /// Counts a create request and returns how long it should stall, if a test asked.
    pub fn note_create_request(&self, idempotency_key: Option<&str>) -> Option<Duration> {
        let mut state = self.lock();
        state.create_requests += 1;
        if let Some(key) = idempotency_key {
            if state.keys_seen.len() == KEYS_SEEN_LIMIT {
                state.keys_seen.pop_front();
            }
            state.keys_seen.push_back(key.to_owned());
        }
        take_one(&mut state.delays)
    }

    pub fn take_injected_failure(&self) -> Option<StatusCode> {
        take_one(&mut self.lock().failures)
    }

    /// Creates a session, or answers from the idempotency store when the key was used.
    ///
    /// Lookup, creation and storing happen under one lock, so two requests racing with
    /// the same key still create one session.
    pub fn create_session(&self, key: Option<&str>, pairs: &[(String, String)]) -> JsonReply {
        let fingerprint = idempotency::fingerprint(pairs);
        let mut state = self.lock();
        if let Some(key) = key {
            match state.idempotency.lookup(key, fingerprint) {
                Lookup::Fresh => {}
                Lookup::Replay(reply) => return reply,
                Lookup::Mismatch => return StripeError::idempotency_mismatch().into(),
            }
        }
        // Stripe stores no answer for parameters that fail validation.
        let params = match CreateParams::parse(pairs) {
            Ok(params) => params,
            Err(error) => return error.into(),
        };
        let reply = state.execute_create(&params);
        if let Some(key) = key.filter(|_| !reply.status.is_server_error()) {
            state
                .idempotency
                .remember(key.to_owned(), fingerprint, reply.clone());
        }
        reply
    }
}

impl State {
    /// The part of a create that Stripe would run, and whose answer it keeps under the key.
    fn execute_create(&mut self, params: &CreateParams) -> JsonReply {
        if let Err(error) = params::check_prices_exist(params) {
            return error.into();
        }
        match session::build(params) {
            Ok(session) => {
                let reply = JsonReply::ok(&session.object);
                self.sessions.insert(session.id, session.object);
                self.sessions_created += 1;
                reply
            }
            Err(error) => StripeError::internal(&error).into(),
        }
    }
}
