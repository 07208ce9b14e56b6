//! The stand-in over real HTTP on loopback, as the service's Stripe client meets it.

use std::time::{Duration, Instant};

use reqwest::{Client, Response, StatusCode};
use serde_json::Value;
use stripe_stand_in::StandIn;

const KEY: &str = "sk_test_stand_in";

fn form(order: &str) -> Vec<(&'static str, String)> {
    vec![
        ("mode", "payment".into()),
        ("line_items[0][price]", "price_a".into()),
        ("line_items[0][quantity]", "2".into()),
        ("line_items[1][price]", "price_b".into()),
        ("line_items[1][quantity]", "1".into()),
        ("success_url", "https://shop.test/ok".into()),
        ("cancel_url", "https://shop.test/cancel".into()),
        ("client_reference_id", order.into()),
        ("metadata[order]", order.into()),
        ("metadata[tenant]", "acme".into()),
    ]
}

async fn create(stand_in: &StandIn, key: Option<&str>, form: &[(&str, String)]) -> Response {
    let url = format!("{}v1/checkout/sessions", stand_in.base_url());
    let mut request = Client::new().post(url).bearer_auth(KEY).form(form);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.expect("the stand-in answers")
}

async fn json(response: Response) -> Value {
    response.json().await.expect("the body is JSON")
}

async fn spawn() -> StandIn {
    StandIn::spawn().await.expect("the stand-in starts")
}

#[tokio::test]
async fn create_reads_nested_line_items_and_metadata() {
    let stand_in = spawn().await;

    let response = create(&stand_in, None, &form("42")).await;

    assert_eq!(response.status(), StatusCode::OK);
    let session = json(response).await;
    assert_eq!(session["amount_total"], 3 * stripe_stand_in::UNIT_AMOUNT);
    assert_eq!(
        session["metadata"],
        serde_json::json!({"order": "42", "tenant": "acme"})
    );
    assert_eq!(session["client_reference_id"], "42");
    assert_eq!(session["status"], "open");
    let id = session["id"].as_str().expect("the session has an id");
    assert_eq!(stand_in.session(id), Some(session.clone()));
    assert_eq!(stand_in.sessions_created(), 1);
}

#[tokio::test]
async fn same_key_and_params_replays_the_first_answer() {
    let stand_in = spawn().await;
    let first = create(&stand_in, Some("key-1"), &form("42")).await;
    let first_body = first.text().await.expect("first body");

    let again = create(&stand_in, Some("key-1"), &form("42")).await;

    assert_eq!(again.status(), StatusCode::OK);
    let replayed = again
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.as_bytes().to_vec());
    assert_eq!(replayed.as_deref(), Some(&b"true"[..]));
    assert_eq!(again.text().await.expect("replayed body"), first_body);
    assert_eq!(stand_in.sessions_created(), 1);
    assert_eq!(stand_in.create_requests(), 2);
    assert_eq!(stand_in.idempotency_keys_seen(), ["key-1", "key-1"]);
}

#[tokio::test]
async fn same_key_with_other_params_is_an_idempotency_error() {
    let stand_in = spawn().await;
    create(&stand_in, Some("key-1"), &form("42")).await;

    let response = create(&stand_in, Some("key-1"), &form("43")).await;

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(response).await["error"]["type"], "idempotency_error");
    assert_eq!(stand_in.sessions_created(), 1);
}

#[tokio::test]
async fn injected_failure_is_not_stored_under_the_key() {
    let stand_in = spawn().await;
    stand_in.fail_next_creates(1, 503);

    let failed = create(&stand_in, Some("key-1"), &form("42")).await;
    let retried = create(&stand_in, Some("key-1"), &form("42")).await;

    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(failed).await["error"]["type"], "api_error");
    assert_eq!(retried.status(), StatusCode::OK);
    assert!(retried.headers().get("idempotent-replayed").is_none());
    assert_eq!(stand_in.sessions_created(), 1);
    assert_eq!(stand_in.create_requests(), 2);
}

#[tokio::test]
async fn unknown_price_is_a_stripe_client_error() {
    let stand_in = spawn().await;
    let mut params = form("42");
    params[1].1 = "price_missing".into();

    let response = create(&stand_in, None, &params).await;

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error = &json(response).await["error"];
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["code"], "resource_missing");
    assert_eq!(error["param"], "line_items[0][price]");
    assert_eq!(stand_in.sessions_created(), 0);
}

#[tokio::test]
async fn missing_success_url_names_the_param() {
    let stand_in = spawn().await;
    let params: Vec<_> = form("42")
        .into_iter()
        .filter(|(k, _)| *k != "success_url")
        .collect();

    let response = create(&stand_in, None, &params).await;

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(response).await["error"]["param"], "success_url");
}

#[tokio::test]
async fn publishable_or_missing_key_is_refused() {
    let stand_in = spawn().await;
    let url = format!("{}v1/checkout/sessions", stand_in.base_url());

    let response = Client::new()
        .post(url)
        .bearer_auth("pk_test_nope")
        .form(&form("42"))
        .send()
        .await
        .expect("the stand-in answers");

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        json(response).await["error"]["message"],
        "Invalid API Key provided"
    );
    assert_eq!(stand_in.create_requests(), 1);
}

#[tokio::test]
async fn retrieve_returns_the_stored_session_or_404() {
    let stand_in = spawn().await;
    let created = json(create(&stand_in, None, &form("42")).await).await;
    let id = created["id"].as_str().expect("the session has an id");
    let get = |id: String| {
        let url = format!("{}v1/checkout/sessions/{id}", stand_in.base_url());
        Client::new().get(url).bearer_auth(KEY).send()
    };

    let found = get(id.to_owned()).await.expect("the stand-in answers");
    let missing = get("cs_test_nope".to_owned())
        .await
        .expect("the stand-in answers");

    assert_eq!(json(found).await, created);
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(json(missing).await["error"]["code"], "resource_missing");
}

#[tokio::test]
async fn delayed_create_answers_after_the_delay() {
    let stand_in = spawn().await;
    stand_in.delay_next_creates(1, Duration::from_millis(300));

    let started = Instant::now();
    let slow = create(&stand_in, None, &form("42")).await;
    let slow_took = started.elapsed();

    assert_eq!(slow.status(), StatusCode::OK);
    assert!(
        slow_took >= Duration::from_millis(300),
        "took {slow_took:?}"
    );
}

#[tokio::test]
async fn control_endpoints_share_the_handle_state() {
    let stand_in = spawn().await;
    let client = Client::new();
    let control = |path: &str| format!("{}_stand_in/{path}", stand_in.base_url());
    let staged = client
        .post(control("fail-next-creates"))
        .json(&serde_json::json!({"count": 1, "status": 429}))
        .send()
        .await
        .expect("the stand-in answers");
    assert_eq!(staged.status(), StatusCode::OK);

    let limited = create(&stand_in, None, &form("42")).await;
    let stats = client
        .get(control("stats"))
        .send()
        .await
        .expect("the stand-in answers");

    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let expected = serde_json::json!({"create_requests": 1, "sessions_created": 0});
    assert_eq!(json(stats).await, expected);
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let stand_in = spawn().await;
    let url = format!("{}_stand_in/stats", stand_in.base_url());
    let client = Client::new();
    client
        .get(&url)
        .send()
        .await
        .expect("the stand-in answers while alive");

    drop(stand_in);

    // Shutdown runs in the server task; give it a bounded moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.get(&url).send().await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the stand-in still answers after drop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
