use reqwest::StatusCode;
use serde_json::Value;
use stripe_stand_in::{sign_payload, v1_signature};

use crate::helpers::{
    FIXTURE_TYPES, SECRET_CURRENT, SECRET_NEXT, TestApp, assert_problem, contains_bytes, fixture,
    now, sign_now,
};

fn fixture_bytes(event_type: &str) -> Vec<u8> {
    serde_json::to_vec(&fixture(event_type)).unwrap()
}

async fn outcome(response: reqwest::Response) -> String {
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["outcome"].as_str().unwrap().to_owned()
}

/// Refused deliveries leave nothing in the event store but a forensic record.
async fn assert_refused_and_recorded(app: &TestApp, reason: &str) {
    assert_eq!(app.count("webhook_events").await, 0);
    assert_eq!(app.count("dead_letters").await, 0);
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rejected_deliveries WHERE reason = $1")
            .bind(reason)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(recorded, 1, "forensic record for {reason}");
}

#[tokio::test]
async fn every_fixture_event_is_stored_with_its_exact_bytes() {
    let app = TestApp::spawn().await;
    for event_type in FIXTURE_TYPES {
        let bytes = fixture_bytes(event_type);
        let response = app.deliver_signed(&bytes).await;
        assert_eq!(outcome(response).await, "stored", "{event_type}");

        let id = fixture(event_type)["id"].as_str().unwrap().to_owned();
        let row: (String, Option<String>, bool, Option<String>, i64, Vec<u8>) = sqlx::query_as(
            "SELECT type, api_version, livemode, account, extract(epoch FROM created)::bigint,
                    payload
             FROM webhook_events WHERE id = $1",
        )
        .bind(&id)
        .fetch_one(&app.db)
        .await
        .unwrap();
        assert_eq!(row.0, *event_type);
        assert_eq!(row.1, None);
        assert!(!row.2);
        assert_eq!(row.3, None);
        assert_eq!(row.4, 1_234_567_890);
        // Stored encrypted: the column holds neither the bytes nor a part of
        // them, and decrypts to exactly what was delivered.
        assert_ne!(row.5, bytes);
        for plaintext in [id.as_bytes(), b"example@example.com", event_type.as_bytes()] {
            assert!(!contains_bytes(&row.5, plaintext), "{event_type}");
        }
        let stored = app.stored_event_payload(&id).await;
        assert_eq!(stored, bytes, "raw bytes unchanged for {event_type}");
    }
    assert_eq!(
        app.count("webhook_events").await,
        FIXTURE_TYPES.len() as i64
    );
}

#[tokio::test]
async fn two_v1_values_where_only_the_second_matches_are_accepted() {
    let app = TestApp::spawn().await;
    let body = fixture_bytes("payment_intent.succeeded");
    let t = now();
    let wrong = v1_signature("whsec_not_ours", t, &body);
    let right = v1_signature(SECRET_CURRENT, t, &body);

    let response = app
        .deliver(&body, Some(&format!("t={t},v1={wrong},v1={right}")))
        .await;

    assert_eq!(outcome(response).await, "stored");
}

#[tokio::test]
async fn a_second_configured_secret_is_accepted_during_rotation() {
    let app = TestApp::spawn().await;
    let body = fixture_bytes("payment_intent.succeeded");

    let response = app
        .deliver(&body, Some(&sign_now(SECRET_NEXT, &body)))
        .await;

    assert_eq!(outcome(response).await, "stored");
}

#[tokio::test]
async fn spaces_in_the_header_are_tolerated() {
    let app = TestApp::spawn().await;
    let body = fixture_bytes("charge.refunded");
    let t = now();
    let sig = v1_signature(SECRET_CURRENT, t, &body);

    let response = app
        .deliver(&body, Some(&format!("t={t}, v0=deadbeef,  v1={sig} ")))
        .await;

    assert_eq!(outcome(response).await, "stored");
}

#[tokio::test]
async fn an_old_timestamp_is_refused() {
    let app = TestApp::spawn().await;
    let body = fixture_bytes("charge.refunded");
    let header = sign_payload(SECRET_CURRENT, now() - 301, &body);

    let response = app.deliver(&body, Some(&header)).await;

    assert_problem(response, StatusCode::BAD_REQUEST, "timestamp-out-of-window").await;
    assert_refused_and_recorded(&app, "timestamp_too_old").await;
}

#[tokio::test]
async fn a_future_timestamp_is_refused() {
    let app = TestApp::spawn().await;
    let body = fixture_bytes("charge.refunded");
    let header = sign_payload(SECRET_CURRENT, now() + 301, &body);

    let response = app.deliver(&body, Some(&header)).await;

    assert_problem(response, StatusCode::BAD_REQUEST, "timestamp-out-of-window").await;
    assert_refused_and_recorded(&app, "timestamp_in_future").await;
}

#[tokio::test]
async fn a_tampered_body_is_refused() {
    let app = TestApp::spawn().await;
    let body = fixture_bytes("charge.refunded");
    let header = sign_now(SECRET_CURRENT, &body);
    let tampered = String::from_utf8(body.clone())
        .unwrap()
        .replace("\"amount\":100", "\"amount\":1");
    assert_ne!(tampered.as_bytes(), body.as_slice());

    let response = app.deliver(tampered.as_bytes(), Some(&header)).await;

    assert_problem(response, StatusCode::BAD_REQUEST, "signature-invalid").await;
    assert_refused_and_recorded(&app, "signature_mismatch").await;
}

#[tokio::test]
async fn a_wrong_secret_is_refused() {
    let app = TestApp::spawn().await;
    let body = fixture_bytes("charge.refunded");

    let response = app
        .deliver(&body, Some(&sign_now("whsec_someone_else", &body)))
        .await;

    assert_problem(response, StatusCode::BAD_REQUEST, "signature-invalid").await;
    assert_refused_and_recorded(&app, "signature_mismatch").await;
}

#[tokio::test]
async fn a_missing_header_is_refused() {
    let app = TestApp::spawn().await;

    let response = app.deliver(&fixture_bytes("charge.refunded"), None).await;

    assert_problem(response, StatusCode::BAD_REQUEST, "signature-missing").await;
    assert_refused_and_recorded(&app, "missing_signature").await;
}

#[tokio::test]
async fn a_malformed_header_is_refused() {
    let app = TestApp::spawn().await;

    let response = app.deliver(b"{}", Some("v1=abc")).await;

    assert_problem(response, StatusCode::BAD_REQUEST, "signature-invalid").await;
    assert_refused_and_recorded(&app, "malformed_signature").await;
}

#[tokio::test]
async fn an_empty_body_is_refused_unless_it_is_what_was_signed() {
    let app = TestApp::spawn().await;
    let signed_for_other = sign_now(SECRET_CURRENT, b"{}");

    let forged = app.deliver(b"", Some(&signed_for_other)).await;
    assert_problem(forged, StatusCode::BAD_REQUEST, "signature-invalid").await;

    // An authentic empty body is Stripe's bytes all the same: quarantined.
    let authentic = app.deliver_signed(b"").await;
    assert_eq!(outcome(authentic).await, "dead_lettered");
    let reason: String = sqlx::query_scalar("SELECT reason FROM dead_letters")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(reason, "malformed_payload");
    assert_eq!(app.count("webhook_events").await, 0);
}

#[tokio::test]
async fn a_body_with_non_ascii_text_verifies_over_its_raw_bytes() {
    let app = TestApp::spawn().await;
    let mut event = fixture("checkout.session.completed");
    event["data"]["object"]["customer_details"]["name"] = "Zoë Ångström-Łukasz 東京".into();
    let body = serde_json::to_vec(&event).unwrap();
    assert!(!body.is_ascii());

    let response = app.deliver_signed(&body).await;

    assert_eq!(outcome(response).await, "stored");
    let (id, raw): (String, Vec<u8>) = sqlx::query_as("SELECT id, payload FROM webhook_events")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(!contains_bytes(&raw, "Zoë Ångström".as_bytes()));
    assert_eq!(app.stored_event_payload(&id).await, body);
}

#[tokio::test]
async fn the_same_signed_delivery_twice_is_a_replay() {
    let app = TestApp::spawn().await;
    let body = fixture_bytes("charge.refunded");
    let header = sign_now(SECRET_CURRENT, &body);
    assert_eq!(
        outcome(app.deliver(&body, Some(&header)).await).await,
        "stored"
    );

    let again = app.deliver(&body, Some(&header)).await;

    assert_problem(again, StatusCode::BAD_REQUEST, "replayed-delivery").await;
    assert_eq!(app.count("webhook_events").await, 1);
    let replays: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rejected_deliveries WHERE reason = 'replayed'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(replays, 1);
}

#[tokio::test]
async fn a_resigned_retry_of_a_stored_event_is_acknowledged_and_not_stored_again() {
    let app = TestApp::spawn().await;
    let session = app.new_session().await;
    let (event_id, body) = crate::helpers::session_event("checkout.session.completed", &session);
    let first_header = sign_payload(SECRET_CURRENT, now() - 60, &body);
    let stored = app.deliver(&body, Some(&first_header)).await;
    assert_eq!(outcome(stored).await, "stored");
    let first = app.settled_event(&event_id).await;

    // Stripe re-signs each retry, so the signature differs from the first.
    let header = sign_payload(SECRET_CURRENT, now(), &body);
    let retry = app.deliver(&body, Some(&header)).await;

    assert_eq!(outcome(retry).await, "duplicate");
    assert_eq!(app.count("webhook_events").await, 1);
    let after = app.settled_event(&event_id).await;
    assert_eq!(after["attempts"], 1);
    assert_eq!(after["processed_at"], first["processed_at"]);
}

#[tokio::test]
async fn an_authentic_delivery_that_is_not_an_event_is_dead_lettered_with_its_bytes() {
    let app = TestApp::spawn().await;
    let body = br#"{"object":"event","type":"checkout.session.completed"}"#;

    let response = app.deliver_signed(body).await;

    assert_eq!(outcome(response).await, "dead_lettered");
    let (id, reason, raw, key_id): (i64, String, Vec<u8>, uuid::Uuid) =
        sqlx::query_as("SELECT id, reason, payload, payload_key_id FROM dead_letters")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(reason, "not_an_event");
    assert!(!contains_bytes(&raw, b"checkout.session.completed"));
    let payload = app
        .keyring
        .open(
            payments::crypto::PayloadContext::DeadLetter(id),
            key_id,
            &raw,
        )
        .await
        .unwrap();
    assert_eq!(payload, body);
    assert_eq!(app.count("webhook_events").await, 0);
}

#[tokio::test]
async fn concurrent_distinct_deliveries_are_all_stored() {
    let app = TestApp::spawn().await;
    let deliveries = (0..60).map(|i| {
        let mut event = fixture("payment_intent.succeeded");
        event["id"] = format!("evt_concurrent_{i}").into();
        let body = serde_json::to_vec(&event).unwrap();
        let app = &app;
        async move { app.deliver_signed(&body).await.status() }
    });

    let statuses = futures::future::join_all(deliveries).await;

    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(app.count("webhook_events").await, 60);
    assert_eq!(app.count("webhook_nonces").await, 60);
}

#[tokio::test]
async fn a_database_outage_is_503_never_2xx() {
    let app = TestApp::spawn().await;
    app.db_proxy.cut();

    let response = app.deliver_signed(&fixture_bytes("charge.refunded")).await;

    let problem = assert_problem(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "service-unavailable",
    )
    .await;
    assert!(!problem["detail"].as_str().unwrap().contains("127.0.0.1"));
    let ready = app
        .http
        .get(format!("{}/readyz", app.admin))
        .send()
        .await
        .unwrap();
    assert_problem(
        ready,
        StatusCode::SERVICE_UNAVAILABLE,
        "service-unavailable",
    )
    .await;
    // Nothing reached the store through the test's own direct connection either.
    assert_eq!(app.count("webhook_events").await, 0);
}

#[tokio::test]
async fn an_oversized_body_is_413_and_unknown_routes_are_problems() {
    let app = TestApp::spawn().await;
    let huge = vec![b' '; payments::webhooks::MAX_BODY_BYTES + 1];

    let too_big = app
        .deliver(&huge, Some(&sign_now(SECRET_CURRENT, &huge)))
        .await;
    let unknown = app
        .http
        .get(format!("{}/nope", app.webhook))
        .send()
        .await
        .unwrap();
    let wrong_method = app
        .http
        .get(format!("{}/webhooks/stripe", app.webhook))
        .send()
        .await
        .unwrap();

    assert_problem(too_big, StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large").await;
    assert_problem(unknown, StatusCode::NOT_FOUND, "not-found").await;
    assert_problem(
        wrong_method,
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
    )
    .await;
    assert_eq!(app.count("webhook_events").await, 0);
}

#[tokio::test]
async fn authentic_deliveries_with_control_characters_do_not_fail_their_neighbours() {
    let app = TestApp::spawn().await;
    let deliveries = (0..60).map(|i| {
        let mut event = fixture("payment_intent.succeeded");
        event["id"] = format!("evt_neighbour_{i}").into();
        if i % 3 == 0 {
            // Valid JSON that Postgres text columns refuse.
            event["account"] = "acct_\u{0}".into();
        }
        let body = serde_json::to_vec(&event).unwrap();
        let app = &app;
        async move { (i, app.deliver_signed(&body).await) }
    });

    let responses = futures::future::join_all(deliveries).await;

    for (i, response) in responses {
        assert_eq!(response.status(), StatusCode::OK, "delivery {i}");
        let expected = if i % 3 == 0 {
            "dead_lettered"
        } else {
            "stored"
        };
        assert_eq!(outcome(response).await, expected, "delivery {i}");
    }
    assert_eq!(app.count("webhook_events").await, 40);
    assert_eq!(app.count("dead_letters").await, 20);
}
