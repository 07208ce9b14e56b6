use reqwest::StatusCode;
use serde_json::Value;

use serde_json::json;

use crate::helpers::{TestApp, assert_problem, contains_bytes, event, now, session_event};

async fn malformed_entry(app: &TestApp) -> i64 {
    app.deliver_signed(b"this is not json").await;
    let list: Value = app
        .admin_get("/v1/dead-letters")
        .await
        .json()
        .await
        .unwrap();
    list[0]["id"].as_i64().expect("an entry")
}

#[tokio::test]
async fn a_malformed_delivery_is_listed_and_shown_with_its_bytes() {
    let app = TestApp::spawn().await;
    let id = malformed_entry(&app).await;

    let list: Value = app
        .admin_get("/v1/dead-letters?status=open")
        .await
        .json()
        .await
        .unwrap();
    let shown = app.admin_get(&format!("/v1/dead-letters/{id}")).await;

    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["reason"], "malformed_payload");
    assert_eq!(list[0]["status"], "open");
    assert_eq!(shown.status(), StatusCode::OK);
    let shown: Value = shown.json().await.unwrap();
    assert_eq!(shown["payload"], "this is not json");
    assert_eq!(shown["replays"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn replaying_bytes_that_still_do_not_parse_records_a_failed_attempt() {
    let app = TestApp::spawn().await;
    let id = malformed_entry(&app).await;

    let response = app
        .admin_post(&format!("/v1/dead-letters/{id}/replay"))
        .await;

    assert_eq!(response.status(), StatusCode::OK);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["outcome"], "failed");
    let shown: Value = app
        .admin_get(&format!("/v1/dead-letters/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["status"], "open");
    assert_eq!(shown["replays"][0]["outcome"], "failed");
    assert_eq!(app.count("webhook_events").await, 0);
}

#[tokio::test]
async fn an_event_whose_session_never_appears_is_dead_lettered_and_replays_once_it_does() {
    let app = TestApp::spawn_with(|env| {
        env.insert("PAYMENTS_WORKER_MAX_ATTEMPTS".into(), "2".into());
    })
    .await;
    let session = "cs_test_created_late_0001";
    let (event_id, body) = event("checkout.session.completed", now(), |object| {
        object["id"] = session.into();
        object["metadata"] = json!({"payments_ref": "ref-late-0001"});
    });
    app.deliver_signed(&body).await;

    let gave_up = app.settled_event(&event_id).await;

    assert_eq!(gave_up["status"], "dead_lettered");
    assert_eq!(gave_up["attempts"], 2);
    let (id, detail): (i64, String) =
        sqlx::query_as("SELECT id, detail FROM dead_letters WHERE event_id = $1")
            .bind(&event_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(
        detail.contains("not recorded yet") && detail.contains("gave up"),
        "{detail}"
    );

    // The session's record finally commits; the operator replays the entry.
    insert_session(&app, session, "ref-late-0001").await;
    let report: Value = app
        .admin_post(&format!("/v1/dead-letters/{id}/replay"))
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(report["outcome"], "resolved", "{report}");
    assert_eq!(app.session_status(session).await, "paid");
    assert_eq!(app.settled_event(&event_id).await["status"], "processed");
    let again = app
        .admin_post(&format!("/v1/dead-letters/{id}/replay"))
        .await;
    assert_problem(again, StatusCode::CONFLICT, "dead-letter-resolved").await;
    let shown: Value = app
        .admin_get(&format!("/v1/dead-letters/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["status"], "resolved");
    assert_eq!(shown["replays"].as_array().unwrap().len(), 1);
}

async fn insert_session(app: &TestApp, id: &str, reference: &str) {
    sqlx::query(
        "INSERT INTO checkout_sessions (id, livemode, expires_at, reference)
         VALUES ($1, false, now() + interval '1 day', $2)",
    )
    .bind(id)
    .bind(reference)
    .execute(&app.db)
    .await
    .unwrap();
}

#[tokio::test]
async fn quarantined_bytes_that_now_parse_are_stored_and_applied_on_replay() {
    let app = TestApp::spawn().await;
    let session = app.new_session().await;
    let (event_id, body) = session_event("checkout.session.expired", &session);
    // As an older build, whose parser refused these bytes, would have left them.
    let id = app.quarantine("not_an_event", "old parser", &body).await;

    let report: Value = app
        .admin_post(&format!("/v1/dead-letters/{id}/replay"))
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(report["outcome"], "resolved", "{report}");
    assert_eq!(report["event_id"], event_id.as_str());
    assert_eq!(app.session_status(&session).await, "expired");
    let raw: Vec<u8> = sqlx::query_scalar("SELECT payload FROM webhook_events WHERE id = $1")
        .bind(&event_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(!contains_bytes(&raw, b"example@example.com"));
    assert_eq!(app.stored_event_payload(&event_id).await, body);
}

#[tokio::test]
async fn unknown_entries_and_bad_filters_are_problems() {
    let app = TestApp::spawn().await;

    let missing = app.admin_get("/v1/dead-letters/999").await;
    let replay_missing = app.admin_post("/v1/dead-letters/999/replay").await;
    let bad_filter = app.admin_get("/v1/dead-letters?status=weird").await;
    let bad_limit = app.admin_get("/v1/dead-letters?limit=abc").await;

    assert_problem(missing, StatusCode::NOT_FOUND, "not-found").await;
    assert_problem(replay_missing, StatusCode::NOT_FOUND, "not-found").await;
    assert_problem(bad_filter, StatusCode::BAD_REQUEST, "invalid-request").await;
    assert_problem(bad_limit, StatusCode::BAD_REQUEST, "invalid-request").await;
}

#[tokio::test]
async fn the_cli_lists_shows_and_replays() {
    let app = TestApp::spawn().await;
    let id = malformed_entry(&app).await;
    app.deliver_signed(br#"{"object":"event","type":"charge.refunded"}"#)
        .await;

    let list = app.cli(&["dlq", "list", "--json"]);
    let show = app.cli(&["dlq", "show", &id.to_string()]);
    let replay = app.cli(&["dlq", "replay", &id.to_string()]);
    let table = app.cli(&["dlq", "list"]);

    assert!(list.status.success());
    let entries: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 2);
    assert!(show.status.success());
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["reason"], "malformed_payload");
    // A replay that fails again is reported and exits non-zero.
    assert!(!replay.status.success());
    let report: Value = serde_json::from_slice(&replay.stdout).unwrap();
    assert_eq!(report["outcome"], "failed");
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains("not_an_event") && table.contains("malformed_payload"),
        "{table}"
    );
}
