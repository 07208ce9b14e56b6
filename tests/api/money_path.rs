//! Money-path correctness under duplicates, disorder, races, crashes and
//! several replicas. Every event here is built from the fixtures in
//! ../shared/fixtures/stripe-events.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    SECRET_CURRENT, TestApp, event, event_from, now, reference_of, session_body, sign_now,
};

/// A session created through the API, with the ids Stripe would attach.
struct Lifecycle {
    session: String,
    reference: String,
    payment_intent: String,
}

impl Lifecycle {
    async fn start(app: &TestApp) -> Self {
        let session = app.new_session().await;
        let reference = reference_of(app, &session).await;
        let payment_intent = format!("pi_test_{}", uuid::Uuid::new_v4().simple());
        Self {
            session,
            reference,
            payment_intent,
        }
    }

    fn completed(&self, payment_status: &str, created: i64) -> (String, Vec<u8>) {
        event("checkout.session.completed", created, |o| {
            o["id"] = self.session.clone().into();
            o["payment_status"] = payment_status.into();
            o["payment_intent"] = self.payment_intent.clone().into();
            o["metadata"] = json!({ "payments_ref": self.reference });
        })
    }

    fn session_event(&self, event_type: &str, created: i64) -> (String, Vec<u8>) {
        event(event_type, created, |o| {
            o["id"] = self.session.clone().into();
            o["payment_intent"] = self.payment_intent.clone().into();
            o["metadata"] = json!({ "payments_ref": self.reference });
        })
    }

    fn payment_intent(&self, event_type: &str, created: i64) -> (String, Vec<u8>) {
        event(event_type, created, |o| {
            o["id"] = self.payment_intent.clone().into();
            o["metadata"] = json!({ "payments_ref": self.reference });
        })
    }

    /// Charges carry no reference of ours: they link through the PaymentIntent.
    fn refund(&self, amount_refunded: i64, full: bool, created: i64) -> (String, Vec<u8>) {
        event("charge.refunded", created, |o| {
            o["payment_intent"] = self.payment_intent.clone().into();
            o["amount_refunded"] = amount_refunded.into();
            o["refunded"] = full.into();
            o["metadata"] = json!({});
        })
    }

    fn dispute(&self, event_type: &str, status: &str, created: i64) -> (String, Vec<u8>) {
        event_from("charge.dispute.created", event_type, created, |o| {
            o["id"] = format!("dp_{}", self.payment_intent).into();
            o["payment_intent"] = self.payment_intent.clone().into();
            o["status"] = status.into();
        })
    }
}

async fn deliver_all(app: &TestApp, events: &[(String, Vec<u8>)]) -> Vec<Value> {
    for (_, body) in events {
        assert_eq!(app.deliver_signed(body).await.status(), StatusCode::OK);
    }
    let mut settled = Vec::new();
    for (id, _) in events {
        settled.push(app.settled_event(id).await);
    }
    settled
}

async fn session(app: &TestApp, id: &str) -> Value {
    app.public_get(&format!("/v1/checkout/sessions/{id}"))
        .await
        .json()
        .await
        .unwrap()
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut all = Vec::new();
    for rest in permutations(n - 1) {
        for at in 0..=rest.len() {
            let mut order = rest.clone();
            order.insert(at, n - 1);
            all.push(order);
        }
    }
    all
}

#[tokio::test]
async fn every_order_of_payment_and_refunds_ends_fully_refunded() {
    let app = TestApp::spawn().await;
    let t = now() - 100;
    let orders = permutations(4);
    assert_eq!(orders.len(), 24);
    for order in orders {
        let life = Lifecycle::start(&app).await;
        let events = [
            life.completed("paid", t),
            life.payment_intent("payment_intent.succeeded", t + 1),
            life.refund(500, false, t + 2),
            life.refund(2000, true, t + 3),
        ];
        let shuffled: Vec<_> = order.iter().map(|&i| events[i].clone()).collect();

        let settled = deliver_all(&app, &shuffled).await;

        assert!(
            settled.iter().all(|e| e["status"] == "processed"),
            "{order:?}: {settled:?}"
        );
        let state = session(&app, &life.session).await;
        assert_eq!(state["status"], "refunded", "order {order:?}: {state}");
        assert_eq!(
            state["amount_refunded"]["minor_units"], 2000,
            "order {order:?}"
        );
        assert_eq!(state["payment_intent"], life.payment_intent.as_str());
    }
}

#[tokio::test]
async fn every_order_of_a_dispute_ends_in_its_outcome() {
    let app = TestApp::spawn().await;
    let t = now() - 100;
    for order in permutations(3) {
        let life = Lifecycle::start(&app).await;
        let events = [
            life.completed("paid", t),
            life.dispute("charge.dispute.created", "needs_response", t + 1),
            life.dispute("charge.dispute.closed", "lost", t + 2),
        ];
        let shuffled: Vec<_> = order.iter().map(|&i| events[i].clone()).collect();

        deliver_all(&app, &shuffled).await;

        let state = session(&app, &life.session).await;
        assert_eq!(state["status"], "dispute_lost", "order {order:?}: {state}");
        assert_eq!(state["dispute"]["status"], "lost");
    }
}

#[tokio::test]
async fn delayed_payments_settle_in_either_order() {
    let app = TestApp::spawn().await;
    let t = now() - 100;
    for (outcome, expected) in [
        ("checkout.session.async_payment_succeeded", "paid"),
        ("checkout.session.async_payment_failed", "payment_failed"),
    ] {
        for reversed in [false, true] {
            let life = Lifecycle::start(&app).await;
            let mut events = vec![
                life.completed("unpaid", t),
                life.session_event(outcome, t + 60),
            ];
            if reversed {
                events.reverse();
            }

            deliver_all(&app, &events).await;

            let state = session(&app, &life.session).await;
            assert_eq!(
                state["status"], expected,
                "{outcome} reversed={reversed}: {state}"
            );
        }
    }
}

#[tokio::test]
async fn a_declined_attempt_leaves_the_session_open_and_a_late_failure_changes_nothing() {
    let app = TestApp::spawn().await;
    let t = now() - 100;
    let life = Lifecycle::start(&app).await;

    let declined = deliver_all(
        &app,
        &[life.payment_intent("payment_intent.payment_failed", t)],
    )
    .await;
    assert_eq!(session(&app, &life.session).await["status"], "open");
    assert!(
        declined[0]["detail"]
            .as_str()
            .unwrap()
            .contains("stays open")
    );

    let paid_then_failed = [
        life.completed("paid", t + 10),
        life.payment_intent("payment_intent.payment_failed", t + 5),
        life.session_event("checkout.session.expired", t + 20),
    ];
    let settled = deliver_all(&app, &paid_then_failed).await;

    assert_eq!(session(&app, &life.session).await["status"], "paid");
    assert!(
        settled[1]["detail"].as_str().unwrap().starts_with("stale"),
        "{settled:?}"
    );
    assert!(
        settled[2]["detail"].as_str().unwrap().starts_with("stale"),
        "{settled:?}"
    );
}

#[tokio::test]
async fn an_event_before_its_session_is_recorded_is_retried_then_applied() {
    let app = TestApp::spawn().await;
    let (event_id, body) = event("checkout.session.completed", now(), |o| {
        o["id"] = "cs_test_not_committed_yet".into();
        o["metadata"] = json!({"payments_ref": "ref-pending-0001"});
    });
    app.deliver_signed(&body).await;
    wait_for_attempts(&app, &event_id, 2).await;

    // The create's transaction commits only now.
    sqlx::query(
        "INSERT INTO checkout_sessions (id, livemode, expires_at, reference)
         VALUES ('cs_test_not_committed_yet', false, now() + interval '1 day', 'ref-pending-0001')",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let settled = app.settled_event(&event_id).await;

    assert_eq!(settled["status"], "processed", "{settled}");
    assert_eq!(
        app.session_status("cs_test_not_committed_yet").await,
        "paid"
    );
    assert_eq!(app.count("dead_letters").await, 0);
}

async fn wait_for_attempts(app: &TestApp, event_id: &str, at_least: i64) {
    for _ in 0..200 {
        let event: Value = app
            .admin_get(&format!("/v1/events/{event_id}"))
            .await
            .json()
            .await
            .unwrap();
        if event["attempts"].as_i64().unwrap_or(0) >= at_least {
            assert_eq!(event["status"], "pending");
            assert!(
                event["last_error"]
                    .as_str()
                    .unwrap()
                    .contains("not recorded yet")
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("event {event_id} was not retried");
}

#[tokio::test]
async fn amounts_are_shown_with_the_currency_exponent() {
    let app = TestApp::spawn().await;
    for (price, decimal, exponent) in [
        ("price_test_usd", "20.00", 2),
        ("price_test_jpy", "2000", 0),
        ("price_test_kwd", "2.000", 3),
    ] {
        let mut body = session_body();
        body["line_items"] = json!([{"price": price, "quantity": 2}]);
        let created = app.create_session(Some(price), &body).await;
        let id = created.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();

        let state = session(&app, &id).await;

        assert_eq!(state["amount_total"]["minor_units"], 2000, "{price}");
        assert_eq!(state["amount_total"]["decimal"], decimal, "{price}");
        assert_eq!(state["amount_total"]["exponent"], exponent, "{price}");
    }
}

#[tokio::test]
async fn two_identical_creates_at_once_make_one_stripe_call_and_get_one_answer() {
    let app = TestApp::spawn().await;
    app.stand_in
        .delay_next_creates(1, Duration::from_millis(400));

    let body = session_body();

    let (first, second) = tokio::join!(
        app.create_session(Some("k-race"), &body),
        app.create_session(Some("k-race"), &body),
    );

    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(second.status(), StatusCode::CREATED);
    let replayed = [&first, &second]
        .iter()
        .filter(|r| r.headers().get("idempotent-replayed").is_some())
        .count();
    assert_eq!(replayed, 1);
    let a: Value = first.json().await.unwrap();
    let b: Value = second.json().await.unwrap();
    assert_eq!(a, b);
    assert_eq!(app.stand_in.create_requests(), 1);
}

#[tokio::test]
async fn a_key_still_running_past_the_wait_is_409_with_retry_after() {
    let app = TestApp::spawn_with(|env| {
        env.insert("PAYMENTS_IDEMPOTENCY_WAIT_MS".into(), "100".into());
    })
    .await;
    app.stand_in
        .delay_next_creates(1, Duration::from_millis(800));

    let body = session_body();

    let (first, second) = tokio::join!(app.create_session(Some("k-slow"), &body), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        app.create_session(Some("k-slow"), &body).await
    });

    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(second.headers()["retry-after"], "1");
    crate::helpers::assert_problem(second, StatusCode::CONFLICT, "idempotency-key-in-progress")
        .await;
    assert_eq!(app.stand_in.create_requests(), 1);
}

#[tokio::test]
async fn a_replay_repeats_status_body_and_location() {
    let app = TestApp::spawn().await;
    let first = app.create_session(Some("k-loc"), &session_body()).await;
    let location = first.headers()["location"].to_str().unwrap().to_owned();

    let again = app.create_session(Some("k-loc"), &session_body()).await;

    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["location"], location.as_str());
    assert!(location.starts_with("/v1/checkout/sessions/cs_test_"));
}

#[tokio::test]
async fn a_crash_between_stripe_and_our_commit_is_recovered_by_the_clients_retry() {
    let app = TestApp::spawn_with(|env| {
        env.insert("PAYMENTS_IDEMPOTENCY_LEASE_SECS".into(), "1".into());
    })
    .await;
    app.stand_in
        .delay_next_creates(1, Duration::from_millis(500));

    // Postgres goes away while Stripe is creating the session.
    let body = session_body();
    let (lost, ()) = tokio::join!(app.create_session(Some("k-crash"), &body), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        app.db_proxy.cut();
    });
    assert!(lost.status().is_server_error(), "{}", lost.status());
    assert_eq!(app.stand_in.sessions_created(), 1);
    app.db_proxy.restore();
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let retried = app.create_session(Some("k-crash"), &body).await;

    assert_eq!(retried.status(), StatusCode::CREATED);
    let body: Value = retried.json().await.unwrap();
    assert!(app.stand_in.session(body["id"].as_str().unwrap()).is_some());
    assert_eq!(
        app.stand_in.sessions_created(),
        1,
        "Stripe made a second session"
    );
    assert_eq!(app.count("checkout_sessions").await, 1);
}

#[tokio::test]
async fn an_expired_key_starts_afresh_and_the_sweep_removes_it() {
    let app = TestApp::spawn().await;
    app.create_session(Some("k-old"), &session_body()).await;
    sqlx::query("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
        .execute(&app.db)
        .await
        .unwrap();

    let swept = payments::idempotency::sweep_expired(&app.db, 10, 1)
        .await
        .unwrap();
    let fresh = app.create_session(Some("k-old"), &session_body()).await;

    assert_eq!(swept, 1);
    assert_eq!(fresh.status(), StatusCode::CREATED);
    assert!(fresh.headers().get("idempotent-replayed").is_none());
    assert_eq!(app.count("idempotency_keys").await, 1);
}

#[tokio::test]
async fn twenty_concurrent_deliveries_of_one_event_store_it_once() {
    let app = TestApp::spawn().await;
    let life = Lifecycle::start(&app).await;
    let (event_id, body) = life.completed("paid", now());
    // Stripe signs each retry anew, so each delivery has its own signature.
    let deliveries = (0..20).map(|i| {
        let header = stripe_stand_in::sign_payload(SECRET_CURRENT, now() - i, &body);
        let (app, body) = (&app, &body);
        async move { app.deliver(body, Some(&header)).await }
    });

    let responses = futures::future::join_all(deliveries).await;

    let mut outcomes = Vec::new();
    for response in responses {
        assert_eq!(response.status(), StatusCode::OK);
        outcomes.push(response.json::<Value>().await.unwrap()["outcome"].clone());
    }
    assert_eq!(
        outcomes.iter().filter(|o| *o == "stored").count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(outcomes.iter().filter(|o| *o == "duplicate").count(), 19);
    assert_eq!(app.count("webhook_events").await, 1);
    assert_eq!(app.settled_event(&event_id).await["attempts"], 1);
}

#[tokio::test]
async fn two_instances_on_one_database_process_each_event_once() {
    let first = TestApp::spawn().await;
    let second = first.spawn_replica().await;
    let t = now() - 100;
    let mut events = Vec::new();
    for _ in 0..100 {
        let life = Lifecycle::start(&first).await;
        // Three events whose effects commute, so any interleaving ends paid.
        events.push(life.completed("paid", t));
        events.push(life.payment_intent("payment_intent.succeeded", t + 1));
        events.push(life.session_event("checkout.session.async_payment_succeeded", t + 2));
    }

    let deliveries = events.iter().enumerate().map(|(i, (_, body))| {
        let target = if i % 2 == 0 { &first } else { &second };
        let header = sign_now(SECRET_CURRENT, body);
        async move { target.deliver(body, Some(&header)).await.status() }
    });
    let statuses = futures::future::join_all(deliveries).await;

    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    for (id, _) in &events {
        let settled = first.settled_event(id).await;
        assert_eq!(settled["status"], "processed", "{settled}");
        // The claim counts attempts; a second application would count twice.
        assert_eq!(settled["attempts"], 1, "{settled}");
    }
    let paid: i64 =
        sqlx::query_scalar("SELECT count(*) FROM checkout_sessions WHERE status = 'paid'")
            .fetch_one(&first.db)
            .await
            .unwrap();
    assert_eq!(paid, 100);
    assert_eq!(first.count("dead_letters").await, 0);
}

#[tokio::test]
async fn a_payment_intent_claimed_by_two_sessions_is_dead_lettered_not_retried_forever() {
    let app = TestApp::spawn().await;
    let first = Lifecycle::start(&app).await;
    let mut second = Lifecycle::start(&app).await;
    second.payment_intent = first.payment_intent.clone();
    deliver_all(&app, &[first.completed("paid", now())]).await;

    let settled = deliver_all(&app, &[second.completed("paid", now())]).await;

    assert_eq!(settled[0]["status"], "dead_lettered", "{settled:?}");
    assert_eq!(settled[0]["attempts"], 1);
    assert!(
        settled[0]["detail"]
            .as_str()
            .unwrap()
            .contains("contradicts stored state")
    );
    assert_eq!(app.session_status(&second.session).await, "open");
}
