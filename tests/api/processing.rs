use serde_json::Value;

use crate::helpers::{TestApp, fixture, session_event};

/// Delivers a fixture event about `session` and waits for the worker.
async fn apply(app: &TestApp, event_type: &str, session: &str) -> Value {
    let (event_id, body) = session_event(event_type, session);
    let response = app.deliver_signed(&body).await;
    assert_eq!(response.status(), 200);
    app.settled_event(&event_id).await
}

#[tokio::test]
async fn completed_and_paid_makes_the_session_paid() {
    let app = TestApp::spawn().await;
    let session = app.new_session().await;

    let event = apply(&app, "checkout.session.completed", &session).await;

    assert_eq!(event["status"], "processed");
    assert_eq!(event["detail"], "open -> paid");
    assert_eq!(app.session_status(&session).await, "paid");
}

#[tokio::test]
async fn completed_but_unpaid_awaits_payment_until_the_async_result() {
    let app = TestApp::spawn().await;
    let paid_later = app.new_session().await;
    let failed_later = app.new_session().await;
    for session in [&paid_later, &failed_later] {
        let (event_id, body) = unpaid_completion(session);
        app.deliver_signed(&body).await;
        let settled = app.settled_event(&event_id).await;
        assert_eq!(
            app.session_status(session).await,
            "awaiting_payment",
            "{settled}"
        );
    }

    apply(
        &app,
        "checkout.session.async_payment_succeeded",
        &paid_later,
    )
    .await;
    apply(&app, "checkout.session.async_payment_failed", &failed_later).await;

    assert_eq!(app.session_status(&paid_later).await, "paid");
    assert_eq!(app.session_status(&failed_later).await, "payment_failed");
}

fn unpaid_completion(session: &str) -> (String, Vec<u8>) {
    let (event_id, body) = session_event("checkout.session.completed", session);
    let mut event: Value = serde_json::from_slice(&body).unwrap();
    event["data"]["object"]["payment_status"] = "unpaid".into();
    (event_id, serde_json::to_vec(&event).unwrap())
}

#[tokio::test]
async fn expired_expires_an_open_session() {
    let app = TestApp::spawn().await;
    let session = app.new_session().await;

    apply(&app, "checkout.session.expired", &session).await;

    assert_eq!(app.session_status(&session).await, "expired");
}

#[tokio::test]
async fn a_late_expiry_after_payment_is_recorded_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let session = app.new_session().await;
    apply(&app, "checkout.session.completed", &session).await;

    let late = apply(&app, "checkout.session.expired", &session).await;

    assert_eq!(late["status"], "processed");
    assert!(
        late["detail"].as_str().unwrap().starts_with("stale"),
        "{late}"
    );
    assert_eq!(app.session_status(&session).await, "paid");
}

#[tokio::test]
async fn other_event_types_are_stored_and_ignored() {
    let app = TestApp::spawn().await;
    for event_type in [
        "payment_intent.succeeded",
        "charge.refunded",
        "charge.dispute.created",
    ] {
        let body = serde_json::to_vec(&fixture(event_type)).unwrap();
        app.deliver_signed(&body).await;
        let id = fixture(event_type)["id"].as_str().unwrap().to_owned();

        let event = app.settled_event(&id).await;

        assert_eq!(event["status"], "ignored", "{event_type}");
    }
    assert_eq!(app.count("dead_letters").await, 0);
}

#[tokio::test]
async fn an_event_for_a_session_made_elsewhere_is_recorded_as_foreign() {
    let app = TestApp::spawn().await;
    // The fixture's session carries no payments_ref: another integration on
    // the same Stripe account made it.
    let body = serde_json::to_vec(&fixture("checkout.session.completed")).unwrap();
    app.deliver_signed(&body).await;

    let event = app
        .settled_event("evt_fixture_checkout_session_completed")
        .await;

    assert_eq!(event["status"], "ignored");
    assert!(
        event["detail"].as_str().unwrap().starts_with("foreign"),
        "{event}"
    );
    assert_eq!(event["attempts"], 1);
    assert_eq!(app.count("dead_letters").await, 0);
}

#[tokio::test]
async fn shutdown_drains_and_returns() {
    let app = TestApp::spawn().await;
    let session = app.new_session().await;
    apply(&app, "checkout.session.completed", &session).await;

    app.stop().await;
}
