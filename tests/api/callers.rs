//! Every way into the public and admin APIs proves who it is: API keys,
//! canary keys, browser tokens, operator and break-glass tokens.

use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, now, session_body};

const ISSUER: &str = "https://shop.example";
const AUDIENCE: &str = "payments";

/// An Ed25519 signing key the "shop" holds, and its public JWK.
struct ShopKey {
    kid: &'static str,
    pkcs8: Vec<u8>,
    public_x: String,
}

impl ShopKey {
    fn new(kid: &'static str) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap();
        let public_x =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        Self {
            kid,
            pkcs8,
            public_x,
        }
    }

    fn jwks(&self) -> String {
        json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": self.public_x, "kid": self.kid, "alg": "EdDSA"}]})
            .to_string()
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.to_owned());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(&self.pkcs8)).unwrap()
    }
}

fn claims(subject: &str) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now(), "exp": now() + 300})
}

async fn app_with_browser_tokens(key: &ShopKey) -> TestApp {
    let jwks = key.jwks();
    TestApp::spawn_with(move |env| {
        env.insert("PAYMENTS_BROWSER_TOKEN_ISSUER".into(), ISSUER.into());
        env.insert("PAYMENTS_BROWSER_TOKEN_AUDIENCE".into(), AUDIENCE.into());
        env.insert("PAYMENTS_BROWSER_TOKEN_JWKS".into(), jwks);
    })
    .await
}

async fn create_as(app: &TestApp, credential: &str, key: &str) -> reqwest::Response {
    app.http
        .post(format!("{}/v1/checkout/sessions", app.public))
        .bearer_auth(credential)
        .header("Idempotency-Key", key)
        .json(&session_body())
        .send()
        .await
        .unwrap()
}

async fn get_as(app: &TestApp, credential: &str, session: &str) -> reqwest::Response {
    app.http
        .get(format!("{}/v1/checkout/sessions/{session}", app.public))
        .bearer_auth(credential)
        .send()
        .await
        .unwrap()
}

async fn audit_count(app: &TestApp, action: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_records WHERE action = $1")
        .bind(action)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn assert_refused(response: reqwest::Response) {
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

#[tokio::test]
async fn the_public_api_refuses_calls_without_a_valid_key_and_records_it() {
    let app = TestApp::spawn().await;

    let none = app
        .http
        .post(format!("{}/v1/checkout/sessions", app.public))
        .header("Idempotency-Key", "k1")
        .json(&session_body())
        .send()
        .await
        .unwrap();
    let wrong = create_as(
        &app,
        "payk_0000000000000000000000000000000000000000000000000000000000000000",
        "k2",
    )
    .await;

    assert_refused(none).await;
    assert_refused(wrong).await;
    assert_eq!(app.stand_in.create_requests(), 0);
    assert_eq!(app.count("idempotency_keys").await, 0);
    assert_eq!(audit_count(&app, "public_api.refused").await, 2);
}

#[tokio::test]
async fn a_keys_client_becomes_the_actor_and_scopes_idempotency() {
    let app = TestApp::spawn().await;
    let other = app.new_api_client("second-shop").await;

    let mine = create_as(&app, &app.api_key, "shared-key").await;
    let theirs = create_as(&app, &other, "shared-key").await;

    assert_eq!(mine.status(), StatusCode::CREATED);
    assert_eq!(theirs.status(), StatusCode::CREATED);
    assert!(theirs.headers().get("idempotent-replayed").is_none());
    let a: Value = mine.json().await.unwrap();
    let b: Value = theirs.json().await.unwrap();
    assert_ne!(
        a["id"], b["id"],
        "two clients' keys must not share an answer"
    );
    let creators: Vec<String> =
        sqlx::query_scalar("SELECT created_by FROM checkout_sessions ORDER BY created_at")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(creators, ["client:shop-backend", "client:second-shop"]);
}

#[tokio::test]
async fn a_canary_key_is_refused_like_a_wrong_key_and_raised_as_critical() {
    let app = TestApp::spawn().await;
    let canary = payments::auth::api_keys::create(&app.db, "canary-in-wiki", true, "test")
        .await
        .unwrap();
    let before = payments::metrics::decision_count("api_key.canary_used", "refused");

    let trapped = create_as(&app, &canary, "k-canary").await;
    let wrong = create_as(&app, &format!("{canary}0"), "k-wrong").await;

    let trapped_body = trapped.text().await.unwrap();
    let wrong_body = wrong.text().await.unwrap();
    assert_eq!(
        trapped_body, wrong_body,
        "the holder must not learn it hit a trap"
    );
    let severity: String = sqlx::query_scalar(
        "SELECT severity FROM audit_records WHERE action = 'api_key.canary_used'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(severity, "critical");
    assert!(payments::metrics::decision_count("api_key.canary_used", "refused") > before);
    assert_eq!(app.stand_in.create_requests(), 0);
}

#[tokio::test]
async fn a_revoked_key_stops_working() {
    let app = TestApp::spawn().await;
    payments::auth::api_keys::revoke(&app.db, "shop-backend", "test")
        .await
        .unwrap();

    assert_refused(create_as(&app, &app.api_key, "k-revoked").await).await;
}

#[tokio::test]
async fn a_browser_token_creates_and_reads_only_its_own_sessions() {
    let key = ShopKey::new("shop-2026");
    let app = app_with_browser_tokens(&key).await;
    let token = key.sign(&claims("shopper-7f3a"));
    let backend_session = app.new_session().await;

    let created = create_as(&app, &token, "k-browser").await;

    assert_eq!(created.status(), StatusCode::CREATED);
    let own: Value = created.json().await.unwrap();
    let own = own["id"].as_str().unwrap();
    assert_eq!(get_as(&app, &token, own).await.status(), StatusCode::OK);
    let foreign = get_as(&app, &token, &backend_session).await;
    assert_problem(foreign, StatusCode::NOT_FOUND, "not-found").await;
    // The shop's backend sees every session.
    assert_eq!(
        get_as(&app, &app.api_key, own).await.status(),
        StatusCode::OK
    );
    let creator: String =
        sqlx::query_scalar("SELECT created_by FROM checkout_sessions WHERE id = $1")
            .bind(own)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(creator, "browser:shopper-7f3a");
}

#[tokio::test]
async fn forged_expired_and_misdirected_browser_tokens_are_refused() {
    let key = ShopKey::new("shop-2026");
    let app = app_with_browser_tokens(&key).await;
    let impostor = ShopKey::new("shop-2026");
    let mut expired = claims("s1");
    expired["iat"] = json!(now() - 600);
    expired["exp"] = json!(now() - 120);
    let mut not_yet = claims("s1");
    not_yet["nbf"] = json!(now() + 120);
    let mut other_audience = claims("s1");
    other_audience["aud"] = json!("someone-else");
    let mut other_issuer = claims("s1");
    other_issuer["iss"] = json!("https://evil.example");
    let mut long_lived = claims("s1");
    long_lived["exp"] = json!(now() + 86_400);
    let mut no_subject = claims("s1");
    no_subject.as_object_mut().unwrap().remove("sub");

    let tokens = [
        ("signed by another key", impostor.sign(&claims("s1"))),
        ("expired", key.sign(&expired)),
        ("not yet valid", key.sign(&not_yet)),
        ("wrong audience", key.sign(&other_audience)),
        ("wrong issuer", key.sign(&other_issuer)),
        ("too long-lived", key.sign(&long_lived)),
        ("no subject", key.sign(&no_subject)),
        ("alg none", unsigned_token(&claims("s1"))),
        (
            "HMAC keyed with the public key",
            hmac_token(&key, &claims("s1")),
        ),
        ("tampered claims", tamper(&key.sign(&claims("s1")))),
    ];
    for (what, token) in tokens {
        let response = create_as(&app, &token, what).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{what} was accepted"
        );
    }
    assert_eq!(app.stand_in.create_requests(), 0);
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The classic `alg: none` forgery: no signature at all.
fn unsigned_token(claims: &Value) -> String {
    let header = b64(br#"{"alg":"none","typ":"JWT","kid":"shop-2026"}"#);
    format!("{header}.{}.", b64(claims.to_string().as_bytes()))
}

/// Algorithm confusion: an HS256 token whose secret is the public key.
fn hmac_token(key: &ShopKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.kid.to_owned());
    let secret = EncodingKey::from_secret(key.public_x.as_bytes());
    jsonwebtoken::encode(&header, claims, &secret).unwrap()
}

/// A valid token whose claims were swapped after signing.
fn tamper(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let forged = b64(claims("someone-else").to_string().as_bytes());
    format!("{}.{forged}.{}", parts[0], parts[2])
}

#[tokio::test]
async fn operator_tokens_work_and_break_glass_ends_by_itself_or_when_revoked() {
    let app = TestApp::spawn().await;
    let alice = payments::auth::operators::issue(&app.db, "alice", None, None, "test")
        .await
        .unwrap();
    let glass = payments::auth::operators::issue(
        &app.db,
        "bob",
        Some(Duration::from_secs(1)),
        Some("incident 42: replay stuck events"),
        "test",
    )
    .await
    .unwrap();
    let revoked = payments::auth::operators::issue(
        &app.db,
        "carol",
        Some(Duration::from_secs(3600)),
        Some("incident 43"),
        "test",
    )
    .await
    .unwrap();
    payments::auth::operators::revoke(&app.db, revoked.id, "incident closed", "test")
        .await
        .unwrap();

    let as_alice = admin_get_with(&app, &alice.token).await;
    let as_bob = admin_get_with(&app, &glass.token).await;
    let as_carol = admin_get_with(&app, &revoked.token).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let bob_later = admin_get_with(&app, &glass.token).await;

    assert_eq!(as_alice.status(), StatusCode::OK);
    assert_eq!(as_bob.status(), StatusCode::OK);
    assert_refused(as_carol).await;
    assert_refused(bob_later).await;
    for action in [
        "break_glass.issued",
        "break_glass.used",
        "break_glass.revoked",
    ] {
        assert!(audit_count(&app, action).await >= 1, "{action} not audited");
    }
    assert!(audit_count(&app, "admin_access.refused").await >= 2);
}

async fn admin_get_with(app: &TestApp, token: &str) -> reqwest::Response {
    app.http
        .get(format!("{}/v1/dead-letters", app.admin))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_audit_trail_cannot_be_changed_or_deleted() {
    let app = TestApp::spawn().await;
    admin_get_with(&app, "wrong").await;
    let before = app.count("audit_records").await;

    let update = sqlx::query("UPDATE audit_records SET outcome = 'allowed'")
        .execute(&app.db)
        .await;
    let delete = sqlx::query("DELETE FROM audit_records")
        .execute(&app.db)
        .await;
    let truncate = sqlx::query("TRUNCATE audit_records").execute(&app.db).await;

    assert!(update.is_err() && delete.is_err() && truncate.is_err());
    assert_eq!(app.count("audit_records").await, before);
    assert_eq!(audit_count(&app, "admin_access.refused").await, 1);
}

#[tokio::test]
async fn metrics_count_security_decisions_behind_the_token() {
    let app = TestApp::spawn().await;
    admin_get_with(&app, "wrong").await;

    let open = app
        .http
        .get(format!("{}/metrics", app.admin))
        .send()
        .await
        .unwrap();
    let text = app.admin_get("/metrics").await.text().await.unwrap();

    assert_eq!(open.status(), StatusCode::UNAUTHORIZED);
    assert!(
        text.contains(
            "payments_security_decisions_total{action=\"admin_access.refused\",outcome=\"refused\"}"
        ),
        "{text}"
    );
}
