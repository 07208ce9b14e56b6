use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, session_body};

#[tokio::test]
async fn create_answers_201_and_records_the_session() {
    let app = TestApp::spawn().await;

    let response = app
        .create_session(Some("order-1042-a"), &session_body())
        .await;

    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap();
    assert!(id.starts_with("cs_test_"), "{body}");
    assert_eq!(body["status"], "open");
    assert!(
        body["url"]
            .as_str()
            .unwrap()
            .starts_with("https://checkout.stripe.com/")
    );
    assert!(chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).is_ok());
    let (status, reference): (String, Option<String>) =
        sqlx::query_as("SELECT status, client_reference_id FROM checkout_sessions WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(status, "open");
    assert_eq!(reference.as_deref(), Some("order-1042"));
    // Stripe saw a payment-mode session with our line items and metadata.
    let at_stripe = app.stand_in.session(id).expect("stand-in has the session");
    assert_eq!(at_stripe["mode"], "payment");
    assert_eq!(at_stripe["metadata"]["order"], "1042");
}

#[tokio::test]
async fn the_outbound_key_is_derived_not_the_clients_own() {
    let app = TestApp::spawn().await;

    app.create_session(Some("client-key-1"), &session_body())
        .await;

    let seen = app.stand_in.idempotency_keys_seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].starts_with("payments-"), "{seen:?}");
    assert_ne!(seen[0], "client-key-1");
}

#[tokio::test]
async fn the_same_key_and_body_replays_without_a_second_stripe_call() {
    let app = TestApp::spawn().await;
    let first = app.create_session(Some("k-replay"), &session_body()).await;
    let first_body: Value = first.json().await.unwrap();

    let second = app.create_session(Some("k-replay"), &session_body()).await;

    assert_eq!(second.status(), StatusCode::CREATED);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    let second_body: Value = second.json().await.unwrap();
    assert_eq!(first_body, second_body);
    assert_eq!(app.stand_in.create_requests(), 1);
    assert_eq!(app.count("checkout_sessions").await, 1);
}

#[tokio::test]
async fn the_same_key_with_another_body_is_422_and_calls_nobody() {
    let app = TestApp::spawn().await;
    app.create_session(Some("k-reuse"), &session_body()).await;
    let mut other = session_body();
    other["line_items"][0]["quantity"] = json!(3);

    let response = app.create_session(Some("k-reuse"), &other).await;

    assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    )
    .await;
    assert_eq!(app.stand_in.create_requests(), 1);
}

#[tokio::test]
async fn a_missing_or_malformed_key_is_400() {
    let app = TestApp::spawn().await;

    let missing = app.create_session(None, &session_body()).await;
    let too_long = app
        .create_session(Some(&"k".repeat(256)), &session_body())
        .await;

    assert_problem(missing, StatusCode::BAD_REQUEST, "idempotency-key-missing").await;
    assert_problem(too_long, StatusCode::BAD_REQUEST, "idempotency-key-invalid").await;
    assert_eq!(app.stand_in.create_requests(), 0);
}

#[tokio::test]
async fn an_invalid_body_is_refused_and_the_key_stays_usable() {
    let app = TestApp::spawn().await;
    let mut bad = session_body();
    bad["line_items"] = json!([]);

    let refused = app.create_session(Some("k-fix"), &bad).await;
    let fixed = app.create_session(Some("k-fix"), &session_body()).await;

    let problem = assert_problem(refused, StatusCode::BAD_REQUEST, "invalid-request").await;
    assert!(problem["detail"].as_str().unwrap().contains("line_items"));
    assert_eq!(fixed.status(), StatusCode::CREATED);
    assert_eq!(app.stand_in.create_requests(), 1);
}

#[tokio::test]
async fn unknown_fields_and_bad_urls_are_refused() {
    let app = TestApp::spawn().await;
    let mut unknown = session_body();
    unknown["mode"] = json!("subscription");
    let mut bad_url = session_body();
    bad_url["success_url"] = json!("javascript:alert(1)");

    let r1 = app.create_session(Some("k-u1"), &unknown).await;
    let r2 = app.create_session(Some("k-u2"), &bad_url).await;

    assert_problem(r1, StatusCode::BAD_REQUEST, "invalid-request").await;
    assert_problem(r2, StatusCode::BAD_REQUEST, "invalid-request").await;
    assert_eq!(app.stand_in.create_requests(), 0);
}

#[tokio::test]
async fn a_stripe_outage_is_502_records_nothing_and_the_retry_succeeds() {
    let app = TestApp::spawn().await;
    app.stand_in.fail_next_creates(1, 500);

    let failed = app.create_session(Some("k-outage"), &session_body()).await;

    assert_problem(failed, StatusCode::BAD_GATEWAY, "stripe-error").await;
    assert_eq!(app.count("checkout_sessions").await, 0);
    assert_eq!(app.count("idempotency_keys").await, 0);

    let retried = app.create_session(Some("k-outage"), &session_body()).await;
    assert_eq!(retried.status(), StatusCode::CREATED);
    assert_eq!(app.count("checkout_sessions").await, 1);
    // Both attempts carried the same outbound key, so Stripe could dedupe.
    let keys = app.stand_in.idempotency_keys_seen();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1]);
}

#[tokio::test]
async fn a_stripe_refusal_is_502_and_names_the_parameter() {
    let app = TestApp::spawn().await;
    let mut body = session_body();
    body["line_items"][0]["price"] = json!("price_missing");

    let response = app.create_session(Some("k-missing-price"), &body).await;

    let problem = assert_problem(response, StatusCode::BAD_GATEWAY, "stripe-error").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("resource_missing"), "{detail}");
    assert!(detail.contains("line_items[0][price]"), "{detail}");
    assert_eq!(app.count("checkout_sessions").await, 0);
}

#[tokio::test]
async fn show_returns_the_current_status_and_404_for_strangers() {
    let app = TestApp::spawn().await;
    let id = app.new_session().await;

    assert_eq!(app.session_status(&id).await, "open");
    let unknown = app
        .public_get("/v1/checkout/sessions/cs_test_unknown")
        .await;
    assert_problem(unknown, StatusCode::NOT_FOUND, "not-found").await;
}

#[tokio::test]
async fn a_non_json_body_is_a_problem_document() {
    let app = TestApp::spawn().await;

    let response = app
        .http
        .post(format!("{}/v1/checkout/sessions", app.public))
        .bearer_auth(&app.api_key)
        .header("Idempotency-Key", "k-form")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("line_items=1")
        .send()
        .await
        .unwrap();

    assert_problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;
}
