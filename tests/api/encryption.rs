//! Stored payloads are encrypted at rest, bound to their rows, readable
//! across a key rotation, and purged after the retention period.

use std::{collections::HashMap, process::Output, time::Duration};

use payments::crypto::{self, Keyring, PayloadContext, PayloadError};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{
    SECRET_CURRENT, TestApp, contains_bytes, event_from, kek_file, now, session_event, sign_now,
};

const EMAIL: &str = "example@example.com";
const NAME: &str = "Zoë Customer-Privacy";

/// A completed-checkout event for a new session, with a customer name and
/// e-mail that must never show in the stored bytes.
async fn paid_event(app: &TestApp) -> (String, String, Vec<u8>) {
    let session = app.new_session().await;
    let (event_id, bytes) = session_event("checkout.session.completed", &session);
    let mut event: Value = serde_json::from_slice(&bytes).unwrap();
    event["data"]["object"]["customer_details"]["name"] = NAME.into();
    assert_eq!(event["data"]["object"]["customer_details"]["email"], EMAIL);
    (session, event_id, serde_json::to_vec(&event).unwrap())
}

/// An event type the service stores as ignored at once.
fn ignored_event() -> (String, Vec<u8>) {
    event_from(
        "payment_intent.succeeded",
        "payment_intent.created",
        now(),
        |_| {},
    )
}

async fn deliver(app: &TestApp, body: &[u8]) -> String {
    let response = app.deliver_signed(body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["outcome"].as_str().unwrap().to_owned()
}

async fn raw_event(app: &TestApp, event_id: &str) -> (Option<Vec<u8>>, Option<uuid::Uuid>) {
    sqlx::query_as("SELECT payload, payload_key_id FROM webhook_events WHERE id = $1")
        .bind(event_id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn open_event(
    keyring: &Keyring,
    app: &TestApp,
    event_id: &str,
) -> Result<Vec<u8>, PayloadError> {
    let (sealed, key_id) = raw_event(app, event_id).await;
    let context = PayloadContext::Event(event_id);
    keyring
        .open_stored(context, key_id, sealed.as_deref())
        .await
}

async fn kek_of_event(app: &TestApp, event_id: &str) -> String {
    sqlx::query_scalar(
        "SELECT k.kek_id FROM webhook_events e JOIN data_keys k ON k.id = e.payload_key_id
         WHERE e.id = $1",
    )
    .bind(event_id)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

async fn newest_dead_letter(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT max(id) FROM dead_letters")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn shown_dead_letter(app: &TestApp, id: i64) -> Value {
    let response = app.admin_get(&format!("/v1/dead-letters/{id}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

fn with_keys(file: String) -> impl FnOnce(&mut HashMap<String, String>) {
    move |env| {
        env.insert(crypto::SETTING.to_owned(), file);
    }
}

fn keys_cli(app: &TestApp, kek_file: &str, command: &str) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_payments"))
        .args(["keys", command])
        .env_clear()
        .env("DATABASE_URL", &app.database_url)
        .env(crypto::SETTING, kek_file)
        .env("RUST_LOG", "error")
        .output()
        .expect("run payments keys")
}

fn stdout_json(output: &Output) -> Value {
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("stdout is JSON")
}

#[tokio::test]
async fn a_delivered_event_is_stored_encrypted_and_still_processed() {
    let app = TestApp::spawn().await;
    let (session, event_id, body) = paid_event(&app).await;

    assert_eq!(deliver(&app, &body).await, "stored");

    let event = app.settled_event(&event_id).await;
    assert_eq!(event["status"], "processed", "{event}");
    assert_eq!(app.session_status(&session).await, "paid");
    let (raw, key_id) = raw_event(&app, &event_id).await;
    let raw = raw.expect("payload kept");
    assert_ne!(raw, body);
    for plaintext in [EMAIL, NAME, &event_id, &session] {
        assert!(
            !contains_bytes(&raw, plaintext.as_bytes()),
            "{plaintext} in the column"
        );
    }
    assert_eq!(app.stored_event_payload(&event_id).await, body);
    assert!(key_id.is_some());
    assert_eq!(kek_of_event(&app, &event_id).await, "test-1");
}

#[tokio::test]
async fn a_malformed_delivery_is_stored_encrypted_and_shown_decrypted() {
    let app = TestApp::spawn().await;
    let body = format!(r#"{{"object":"event","customer_email":"{EMAIL}"}}"#);

    assert_eq!(deliver(&app, body.as_bytes()).await, "dead_lettered");

    let id = newest_dead_letter(&app).await;
    let (raw, key_id): (Vec<u8>, uuid::Uuid) =
        sqlx::query_as("SELECT payload, payload_key_id FROM dead_letters WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(!contains_bytes(&raw, EMAIL.as_bytes()));
    let opened = app
        .keyring
        .open(PayloadContext::DeadLetter(id), key_id, &raw)
        .await
        .unwrap();
    assert_eq!(opened, body.as_bytes());
    let shown = shown_dead_letter(&app, id).await;
    assert_eq!(shown["payload"], body);
    assert_eq!(shown["payload_bytes"], body.len());
    assert!(shown["payload_purged_at"].is_null());
}

#[tokio::test]
async fn a_refused_delivery_keeps_only_an_encrypted_prefix() {
    let app = TestApp::spawn().await;
    let (_, _, body) = paid_event(&app).await;

    let response = app
        .deliver(&body, Some(&sign_now("whsec_not_ours", &body)))
        .await;

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let (raw, key_id): (Vec<u8>, uuid::Uuid) =
        sqlx::query_as("SELECT body_prefix, body_key_id FROM rejected_deliveries")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(!contains_bytes(&raw, EMAIL.as_bytes()));
    let prefix = app
        .keyring
        .open(PayloadContext::RefusedDelivery, key_id, &raw)
        .await
        .unwrap();
    assert_eq!(prefix, &body[..body.len().min(1024)]);
}

#[tokio::test]
async fn keys_rotate_without_losing_a_payload() {
    let (k1, k2): ([u8; 32], [u8; 32]) = (rand::random(), rand::random());
    let only_k1 = kek_file(&[("k1", k1)]);
    let k2_then_k1 = kek_file(&[("k2", k2), ("k1", k1)]);
    let only_k2 = kek_file(&[("k2", k2)]);
    let before = TestApp::spawn_with(with_keys(only_k1)).await;
    let (old_event, old_body) = ignored_event();
    deliver(&before, &old_body).await;
    deliver(&before, b"not json, from before the rotation").await;
    let old_entry = newest_dead_letter(&before).await;

    // The new key first, the old one kept: new data keys are wrapped by k2,
    // and what k1 protects still decrypts.
    let during = before
        .spawn_replica_with(with_keys(k2_then_k1.clone()))
        .await;
    let (new_event, new_body) = ignored_event();
    deliver(&during, &new_body).await;

    assert_eq!(kek_of_event(&during, &old_event).await, "k1");
    assert_eq!(kek_of_event(&during, &new_event).await, "k2");
    assert_eq!(
        open_event(&during.keyring, &during, &old_event)
            .await
            .unwrap(),
        old_body
    );
    assert_eq!(
        open_event(&during.keyring, &during, &new_event)
            .await
            .unwrap(),
        new_body
    );
    let k2_alone = Keyring::new(&key_config(&only_k2), during.db.clone());
    let unreadable = open_event(&k2_alone, &during, &old_event).await;
    assert!(
        matches!(unreadable, Err(PayloadError::UnknownKek { .. })),
        "{unreadable:?}"
    );

    let status = stdout_json(&keys_cli(&during, &k2_then_k1, "status"));
    assert_eq!(status["active_kek"], "k2");
    assert!(
        status["removable_keks"].as_array().unwrap().is_empty(),
        "{status}"
    );
    let rewrap = keys_cli(&during, &k2_then_k1, "rewrap");
    let report = stdout_json(&rewrap);
    assert!(report["rewrapped"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["failed"].as_array().unwrap().is_empty(), "{report}");
    let status = keys_cli(&during, &k2_then_k1, "status");
    let printed = String::from_utf8_lossy(&status.stdout).into_owned();
    let status = stdout_json(&status);
    assert_eq!(
        status["removable_keks"],
        serde_json::json!(["k1"]),
        "{status}"
    );
    use base64::{Engine, engine::general_purpose::STANDARD};
    for key in [k1, k2] {
        assert!(
            !printed.contains(&STANDARD.encode(key)),
            "key material printed"
        );
    }
    let under_k1: i64 = sqlx::query_scalar("SELECT count(*) FROM data_keys WHERE kek_id <> 'k2'")
        .fetch_one(&during.db)
        .await
        .unwrap();
    assert_eq!(under_k1, 0);

    // k1 has left the file: a fresh process reads everything with k2 alone.
    let after = before.spawn_replica_with(with_keys(only_k2)).await;
    assert_eq!(
        open_event(&after.keyring, &after, &old_event)
            .await
            .unwrap(),
        old_body
    );
    assert_eq!(
        open_event(&after.keyring, &after, &new_event)
            .await
            .unwrap(),
        new_body
    );
    let shown = shown_dead_letter(&after, old_entry).await;
    assert_eq!(shown["payload"], "not json, from before the rotation");
}

fn key_config(file: &str) -> crypto::KeyringConfig {
    let env = HashMap::from([(crypto::SETTING.to_owned(), file.to_owned())]);
    crypto::from_source(&env).expect("key file is valid")
}

#[tokio::test]
async fn a_payload_moved_to_another_row_does_not_decrypt() {
    let app = TestApp::spawn().await;
    let first = app
        .quarantine("malformed_payload", "x", b"first entry")
        .await;
    let second = app
        .quarantine("malformed_payload", "x", b"second entry")
        .await;
    sqlx::query(
        "UPDATE dead_letters d SET payload = f.payload, payload_key_id = f.payload_key_id
         FROM dead_letters f WHERE d.id = $2 AND f.id = $1",
    )
    .bind(first)
    .bind(second)
    .execute(&app.db)
    .await
    .unwrap();

    let shown = shown_dead_letter(&app, second).await;
    let replay = app
        .admin_post(&format!("/v1/dead-letters/{second}/replay"))
        .await;

    assert!(shown["payload"].is_null(), "{shown}");
    let error = shown["payload_error"].as_str().unwrap();
    assert!(error.contains("belongs to another row"), "{error}");
    let report: Value = replay.json().await.unwrap();
    assert_eq!(report["outcome"], "failed");
    assert!(
        report["detail"].as_str().unwrap().contains("another row"),
        "{report}"
    );
    assert_eq!(
        shown_dead_letter(&app, first).await["payload"],
        "first entry"
    );
}

#[tokio::test]
async fn the_worker_dead_letters_an_event_whose_payload_was_swapped_in() {
    let app = TestApp::spawn().await;
    let (session, _, body) = paid_event(&app).await;
    let sealed_elsewhere = app
        .keyring
        .seal(PayloadContext::Event("evt_some_other_row"), &body)
        .await
        .unwrap();
    let event_id = format!("evt_test_{}", uuid::Uuid::new_v4().simple());

    sqlx::query(
        "INSERT INTO webhook_events (id, type, livemode, created, payload, payload_key_id)
         VALUES ($1, 'checkout.session.completed', false, now(), $2, $3)",
    )
    .bind(&event_id)
    .bind(&sealed_elsewhere.bytes)
    .bind(sealed_elsewhere.key_id)
    .execute(&app.db)
    .await
    .unwrap();

    let event = app.settled_event(&event_id).await;
    assert_eq!(event["status"], "dead_lettered", "{event}");
    let detail = event["detail"].as_str().unwrap();
    assert!(detail.contains("does not decrypt"), "{detail}");
    assert_eq!(app.session_status(&session).await, "open");
}

async fn backdate(app: &TestApp, table: &str, column: &str, days: i32) {
    let sql = format!("UPDATE {table} SET {column} = {column} - make_interval(days => $1)");
    sqlx::query(&sql).bind(days).execute(&app.db).await.unwrap();
}

async fn event_holds_payload(app: &TestApp, event_id: &str) -> bool {
    raw_event(app, event_id).await.0.is_some()
}

async fn set_event_status(app: &TestApp, event_id: &str, status: &str) {
    sqlx::query(
        "UPDATE webhook_events SET status = $2, next_attempt_at = now() + interval '1 day'
         WHERE id = $1",
    )
    .bind(event_id)
    .bind(status)
    .execute(&app.db)
    .await
    .unwrap();
}

#[tokio::test]
async fn payloads_past_retention_are_purged_and_the_rest_is_kept() {
    let app = TestApp::spawn().await;
    let (_, processed, body) = paid_event(&app).await;
    deliver(&app, &body).await;
    app.settled_event(&processed).await;
    let (ignored, body) = ignored_event();
    deliver(&app, &body).await;
    let mut held = Vec::new();
    for status in ["pending", "dead_lettered", "processed"] {
        let (event_id, body) = ignored_event();
        deliver(&app, &body).await;
        set_event_status(&app, &event_id, status).await;
        held.push(event_id);
    }
    // The last one is processed, but an open dead letter still points at it.
    sqlx::query(
        "INSERT INTO dead_letters (event_id, event_type, reason, detail)
         VALUES ($1, 'payment_intent.created', 'apply_failed', 'x')",
    )
    .bind(&held[2])
    .execute(&app.db)
    .await
    .unwrap();
    let open_entry = app
        .quarantine("malformed_payload", "x", b"open entry")
        .await;
    let closed_entry = app
        .quarantine("malformed_payload", "x", b"closed entry")
        .await;
    let discard = app
        .http
        .post(format!(
            "{}/v1/dead-letters/{closed_entry}/discard",
            app.admin
        ))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .json(&serde_json::json!({"reason": "test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(discard.status(), StatusCode::OK);
    app.deliver(b"{}", Some(&sign_now("whsec_not_ours", b"{}")))
        .await;
    backdate(&app, "webhook_events", "received_at", 31).await;
    backdate(&app, "dead_letters", "created_at", 31).await;
    backdate(&app, "rejected_deliveries", "received_at", 31).await;
    let (recent, body) = ignored_event();
    deliver(&app, &body).await;

    let retention = Duration::from_secs(30 * 86_400);
    let purged = payments::maintenance::purge_payloads(&app.db, retention)
        .await
        .unwrap();

    assert_eq!(purged.events, 2, "{purged:?}");
    assert_eq!(purged.dead_letters, 1, "{purged:?}");
    assert_eq!(purged.refused_deliveries, 1, "{purged:?}");
    for event_id in [&processed, &ignored] {
        assert!(!event_holds_payload(&app, event_id).await);
        let shown: Value = app
            .admin_get(&format!("/v1/events/{event_id}"))
            .await
            .json()
            .await
            .unwrap();
        assert!(shown["payload_purged_at"].is_string(), "{shown}");
        assert!(
            shown["type"].is_string() && shown["status"].is_string(),
            "{shown}"
        );
    }
    for event_id in held.iter().chain([&recent]) {
        assert!(
            event_holds_payload(&app, event_id).await,
            "{event_id} lost its payload"
        );
    }
    assert_eq!(
        shown_dead_letter(&app, open_entry).await["payload"],
        "open entry"
    );
    let closed = shown_dead_letter(&app, closed_entry).await;
    assert!(closed["payload"].is_null() && closed["payload_purged_at"].is_string());
    assert_eq!(closed["status"], "discarded");
    assert_eq!(closed["reason"], "malformed_payload");
    let again = payments::maintenance::purge_payloads(&app.db, retention)
        .await
        .unwrap();
    assert_eq!(again, payments::maintenance::Purged::default());
}

#[tokio::test]
async fn replaying_a_purged_payload_fails_with_the_reason() {
    let app = TestApp::spawn().await;
    let id = app
        .quarantine("not_an_event", "x", b"{\"object\":\"event\"}")
        .await;
    // As the encryption migration leaves an entry stored in plaintext before it.
    sqlx::query(
        "UPDATE dead_letters SET payload = NULL, payload_key_id = NULL, payload_purged_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .execute(&app.db)
    .await
    .unwrap();

    let report: Value = app
        .admin_post(&format!("/v1/dead-letters/{id}/replay"))
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(report["outcome"], "failed");
    assert!(
        report["detail"].as_str().unwrap().contains("purged"),
        "{report}"
    );
    let shown = shown_dead_letter(&app, id).await;
    assert_eq!(shown["status"], "open");
    assert!(
        shown["replays"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("purged")
    );
    assert!(
        shown["payload"].is_null() && shown["payload_error"].is_null(),
        "{shown}"
    );
}

fn serve_with_keys(kek_file: Option<&str>) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_payments"));
    command
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("STRIPE_SECRET_KEY", "sk_test_encryption_start")
        .env("STRIPE_WEBHOOK_SECRETS", SECRET_CURRENT)
        .env("PAYMENTS_ADMIN_TOKEN", crate::helpers::ADMIN_TOKEN)
        .env("PAYMENTS_PUBLIC_ADDR", "127.0.0.1:0")
        .env("PAYMENTS_WEBHOOK_ADDR", "127.0.0.1:0")
        .env("PAYMENTS_ADMIN_ADDR", "127.0.0.1:0");
    if let Some(file) = kek_file {
        command.env(crypto::SETTING, file);
    }
    command.output().expect("run payments serve")
}

#[test]
fn a_missing_or_malformed_key_file_stops_the_start() {
    use base64::{Engine, engine::general_purpose::STANDARD};
    let good: [u8; 32] = rand::random();
    let short: [u8; 16] = rand::random();
    let dir = std::env::temp_dir().join(format!("payments-test-keks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let malformed = dir.join(format!("{}.txt", uuid::Uuid::new_v4().simple()));
    let content = format!(
        "k2:{}\nk1:{}\n",
        STANDARD.encode(good),
        STANDARD.encode(short)
    );
    std::fs::write(&malformed, content).unwrap();
    let absent = dir.join("absent.txt");

    let outputs = [
        serve_with_keys(None),
        serve_with_keys(Some(&absent.display().to_string())),
        serve_with_keys(Some(&malformed.display().to_string())),
    ];

    for output in &outputs {
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(crypto::SETTING), "{stderr}");
        assert!(!stderr.contains(&STANDARD.encode(good)), "{stderr}");
        assert!(!stderr.contains(&STANDARD.encode(short)), "{stderr}");
    }
    let malformed = String::from_utf8_lossy(&outputs[2].stderr);
    assert!(malformed.contains("line 2"), "{malformed}");
}
