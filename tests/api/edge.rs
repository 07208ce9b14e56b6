//! The edge guards, each shown refusing its attack against the real service:
//! card data, open redirects, foreign origins, floods, password guessing,
//! webhook sources outside the allowlist and forged forwarding headers.

use std::collections::HashMap;

use reqwest::{Response, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_TOKEN, SECRET_CURRENT, TestApp, assert_problem, event, fixture, now, session_body,
    sign_now,
};

/// One of Stripe's published webhook source addresses.
const STRIPE_IP: &str = "3.18.12.63";

fn body_with(edit: impl FnOnce(&mut Value)) -> Value {
    let mut body = session_body();
    edit(&mut body);
    body
}

async fn create(app: &TestApp, body: &Value) -> Response {
    let key = uuid::Uuid::new_v4().to_string();
    app.create_session(Some(&key), body).await
}

async fn nothing_was_stored(app: &TestApp) {
    assert_eq!(app.count("idempotency_keys").await, 0);
    assert_eq!(app.count("checkout_sessions").await, 0);
    assert_eq!(app.stand_in.create_requests(), 0);
}

fn event_bytes() -> Vec<u8> {
    serde_json::to_vec(&fixture("charge.refunded")).unwrap()
}

async fn deliver_forwarded(app: &TestApp, forwarded_for: &str) -> Response {
    let body = event_bytes();
    app.http
        .post(format!("{}/webhooks/stripe", app.webhook))
        .header("content-type", "application/json")
        .header("stripe-signature", sign_now(SECRET_CURRENT, &body))
        .header("x-forwarded-for", forwarded_for)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn refused_sources(app: &TestApp) -> Vec<Option<String>> {
    sqlx::query_scalar(
        "SELECT source_addr FROM rejected_deliveries WHERE reason = 'source_not_allowed' ORDER BY id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap()
}

fn retry_after(response: &Response) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_card_number_in_any_field_is_refused_by_name_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let in_metadata = body_with(|b| b["metadata"]["note"] = "4242 4242 4242 4242".into());
    let in_reference = body_with(|b| b["client_reference_id"] = "4000-0566-5566-5556".into());

    for (body, field) in [
        (in_metadata, "metadata.note"),
        (in_reference, "client_reference_id"),
    ] {
        let response = create(&app, &body).await;

        let problem = assert_problem(
            response,
            StatusCode::UNPROCESSABLE_ENTITY,
            "card-data-rejected",
        )
        .await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(field), "{detail}");
        assert!(
            !detail.contains("4242") && !detail.contains("5556"),
            "{detail}"
        );
    }
    nothing_was_stored(&app).await;
}

#[tokio::test]
async fn a_security_code_is_refused_before_the_schema_is_checked() {
    let app = TestApp::spawn().await;
    let body = body_with(|b| b["card"] = json!({"cvc": "123"}));

    let response = create(&app, &body).await;

    let problem = assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "card-data-rejected",
    )
    .await;
    assert!(problem["detail"].as_str().unwrap().contains("card.cvc"));
    nothing_was_stored(&app).await;
}

#[tokio::test]
async fn a_card_number_in_the_query_is_refused_on_every_listener() {
    let app = TestApp::spawn().await;

    let public = app
        .public_get("/v1/checkout/sessions/cs_test_x?ref=4242424242424242")
        .await;
    let admin = app
        .admin_get("/v1/dead-letters?note=4242-4242-4242-4242")
        .await;

    let problem = assert_problem(
        public,
        StatusCode::UNPROCESSABLE_ENTITY,
        "card-data-rejected",
    )
    .await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("query parameter ref")
    );
    assert_problem(
        admin,
        StatusCode::UNPROCESSABLE_ENTITY,
        "card-data-rejected",
    )
    .await;
}

#[tokio::test]
async fn a_luhn_invalid_number_passes() {
    let app = TestApp::spawn().await;
    let body = body_with(|b| b["metadata"]["note"] = "4242 4242 4242 4241".into());

    let response = create(&app, &body).await;

    assert_eq!(response.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn open_redirects_are_refused_naming_the_field() {
    let app = TestApp::spawn().await;
    for url in [
        "https://evil.example/",
        "http://shop.example/thanks",
        "https://shop.example.evil.example/",
    ] {
        for field in ["success_url", "cancel_url"] {
            let body = body_with(|b| b[field] = url.into());

            let response = create(&app, &body).await;

            let problem =
                assert_problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;
            let detail = problem["detail"].as_str().unwrap();
            assert!(detail.starts_with(field), "{url}: {detail}");
        }
    }
    nothing_was_stored(&app).await;
}

#[tokio::test]
async fn a_foreign_origin_is_refused_and_the_shops_origin_gets_cors_headers() {
    let app = TestApp::spawn_with(|env| {
        env.insert(
            "PAYMENTS_CORS_ORIGINS".into(),
            "https://shop.example".into(),
        );
    })
    .await;
    let url = format!("{}/v1/checkout/sessions", app.public);

    let foreign = app
        .http
        .post(&url)
        .header("origin", "https://evil.example")
        .bearer_auth(&app.api_key)
        .header("idempotency-key", "k1")
        .json(&session_body())
        .send()
        .await
        .unwrap();
    let preflight = app
        .http
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type, idempotency-key",
        )
        .send()
        .await
        .unwrap();
    let allowed = app
        .http
        .get(format!("{url}/cs_test_unknown"))
        .header("origin", "https://shop.example")
        .bearer_auth(&app.api_key)
        .send()
        .await
        .unwrap();

    assert_problem(foreign, StatusCode::FORBIDDEN, "origin-not-allowed").await;
    nothing_was_stored(&app).await;
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    let headers = preflight.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://shop.example"
    );
    assert!(
        headers["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    let allow_headers = headers["access-control-allow-headers"].to_str().unwrap();
    assert!(allow_headers.contains("idempotency-key") && allow_headers.contains("authorization"));
    assert_eq!(allowed.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
}

#[tokio::test]
async fn no_origin_is_allowed_by_default() {
    let app = TestApp::spawn().await;

    let preflight = app
        .http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/checkout/sessions", app.public),
        )
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();

    assert_problem(preflight, StatusCode::FORBIDDEN, "origin-not-allowed").await;
}

#[tokio::test]
async fn a_burst_beyond_the_public_limit_per_source_is_429_with_retry_after() {
    let app = TestApp::spawn_with(|env| {
        env.insert(
            "PAYMENTS_RATE_LIMIT_PUBLIC_SOURCE_PER_MIN".into(),
            "1".into(),
        );
        env.insert("PAYMENTS_RATE_LIMIT_PUBLIC_SOURCE_BURST".into(), "2".into());
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(
            app.public_get("/v1/checkout/sessions/cs_test_x")
                .await
                .status(),
        );
    }

    let third = app.public_get("/v1/checkout/sessions/cs_test_x").await;

    assert_eq!(statuses, [StatusCode::NOT_FOUND; 2]);
    assert!(
        (1..=60).contains(&retry_after(&third)),
        "{:?}",
        third.headers()
    );
    assert_problem(third, StatusCode::TOO_MANY_REQUESTS, "rate-limited").await;
}

#[tokio::test]
async fn a_burst_beyond_the_public_limit_per_client_is_429_for_that_client_only() {
    let app = TestApp::spawn_with(|env| {
        env.insert(
            "PAYMENTS_RATE_LIMIT_PUBLIC_CLIENT_PER_MIN".into(),
            "1".into(),
        );
        env.insert("PAYMENTS_RATE_LIMIT_PUBLIC_CLIENT_BURST".into(), "2".into());
    })
    .await;
    let other_key = app.new_api_client("other-shop").await;
    for _ in 0..2 {
        let response = app.public_get("/v1/checkout/sessions/cs_test_x").await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }

    let third = app.public_get("/v1/checkout/sessions/cs_test_x").await;
    let other = app
        .http
        .get(format!("{}/v1/checkout/sessions/cs_test_x", app.public))
        .bearer_auth(other_key)
        .send()
        .await
        .unwrap();

    assert!(retry_after(&third) >= 1);
    assert_problem(third, StatusCode::TOO_MANY_REQUESTS, "rate-limited").await;
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn repeated_bad_signatures_block_the_source_even_for_a_valid_delivery() {
    let app = TestApp::spawn_with(|env| {
        env.insert(
            "PAYMENTS_RATE_LIMIT_WEBHOOK_FAILURES_PER_MIN".into(),
            "1".into(),
        );
        env.insert(
            "PAYMENTS_RATE_LIMIT_WEBHOOK_FAILURES_BURST".into(),
            "3".into(),
        );
    })
    .await;
    let fresh_event = || event("charge.refunded", now(), |_| {}).1;
    // Valid deliveries first: they do not spend the failure budget.
    for _ in 0..5 {
        assert_eq!(
            app.deliver_signed(&fresh_event()).await.status(),
            StatusCode::OK
        );
    }
    for _ in 0..3 {
        let bad = app.deliver(&fresh_event(), Some("t=1,v1=00")).await;
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    }

    let one_too_many = app.deliver(&fresh_event(), Some("t=1,v1=00")).await;
    let valid_but_blocked = app.deliver_signed(&fresh_event()).await;

    assert!(retry_after(&one_too_many) >= 1);
    assert_problem(one_too_many, StatusCode::TOO_MANY_REQUESTS, "rate-limited").await;
    assert_problem(
        valid_but_blocked,
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
    )
    .await;
    assert_eq!(app.count("webhook_events").await, 5);
    let recorded = app.count("rejected_deliveries").await;
    assert_eq!(recorded, 3, "refusals past the budget write nothing");
}

#[tokio::test]
async fn failed_admin_logins_beyond_the_budget_block_even_the_right_token() {
    let app = TestApp::spawn_with(|env| {
        env.insert(
            "PAYMENTS_RATE_LIMIT_ADMIN_FAILURES_PER_MIN".into(),
            "1".into(),
        );
        env.insert(
            "PAYMENTS_RATE_LIMIT_ADMIN_FAILURES_BURST".into(),
            "3".into(),
        );
    })
    .await;
    let url = format!("{}/v1/dead-letters", app.admin);
    let guess = || {
        app.http
            .get(&url)
            .bearer_auth("guess-0123456789abcdef0123456789")
            .send()
    };
    for _ in 0..3 {
        assert_eq!(guess().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }

    let one_too_many = guess().await.unwrap();
    let right_token = app
        .http
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let probe = app
        .http
        .get(format!("{}/livez", app.admin))
        .send()
        .await
        .unwrap();

    assert_problem(one_too_many, StatusCode::TOO_MANY_REQUESTS, "rate-limited").await;
    assert!(retry_after(&right_token) >= 1);
    assert_problem(right_token, StatusCode::TOO_MANY_REQUESTS, "rate-limited").await;
    assert_eq!(probe.status(), StatusCode::OK, "probes need no login");
}

/// The service as deployed without a proxy: only Stripe's address may deliver.
async fn stripe_only(trusted_proxies: Option<&str>) -> TestApp {
    let trusted_proxies = trusted_proxies.map(str::to_owned);
    TestApp::spawn_with(move |env: &mut HashMap<String, String>| {
        env.insert(
            "PAYMENTS_WEBHOOK_ALLOWED_SOURCES".into(),
            format!("{STRIPE_IP}/32"),
        );
        if let Some(proxies) = trusted_proxies {
            env.insert("PAYMENTS_TRUSTED_PROXIES".into(), proxies);
        }
    })
    .await
}

#[tokio::test]
async fn a_source_outside_the_allowlist_is_403_and_recorded() {
    let app = stripe_only(None).await;

    let response = app.deliver_signed(&event_bytes()).await;

    assert_problem(response, StatusCode::FORBIDDEN, "source-not-allowed").await;
    assert_eq!(refused_sources(&app).await, [Some("127.0.0.1".to_owned())]);
    assert_eq!(app.count("webhook_events").await, 0);
    let counted = payments::metrics::decision_count("webhook_source.refused", "refused");
    assert!(counted >= 1, "counted as a security decision");
}

#[tokio::test]
async fn a_forged_forwarded_for_from_an_untrusted_peer_changes_nothing() {
    let app = stripe_only(None).await;

    let response = deliver_forwarded(&app, STRIPE_IP).await;

    assert_problem(response, StatusCode::FORBIDDEN, "source-not-allowed").await;
    assert_eq!(refused_sources(&app).await, [Some("127.0.0.1".to_owned())]);
}

#[tokio::test]
async fn through_a_trusted_proxy_the_forwarded_client_is_the_source() {
    let app = stripe_only(Some("127.0.0.1/32")).await;

    let from_stripe = deliver_forwarded(&app, STRIPE_IP).await;
    // A Stripe address the caller put in front of its own proves nothing:
    // the proxy appended the address it saw, 198.51.100.7.
    let prepended = deliver_forwarded(&app, &format!("{STRIPE_IP}, 198.51.100.7")).await;

    assert_eq!(from_stripe.status(), StatusCode::OK);
    assert_problem(prepended, StatusCode::FORBIDDEN, "source-not-allowed").await;
    assert_eq!(
        refused_sources(&app).await,
        [Some("198.51.100.7".to_owned())]
    );
    assert_eq!(app.count("webhook_events").await, 1);
}
