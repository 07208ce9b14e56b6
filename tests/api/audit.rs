//! The audit trail: every decision leaves a record with its context, the
//! records form a hash chain, and tampering is found.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{
    ADMIN_TOKEN, SECRET_CURRENT, TestApp, assert_problem, event, fixture, now, reference_of,
    session_body,
};

#[derive(Debug, sqlx::FromRow)]
struct AuditRow {
    actor: String,
    action: String,
    resource: Option<String>,
    outcome: String,
    reason: Option<String>,
    request_id: Option<String>,
    trace_id: Option<String>,
    purpose: Option<String>,
    consent_ref: Option<String>,
}

async fn records(app: &TestApp) -> Vec<AuditRow> {
    sqlx::query_as(
        "SELECT actor, action, resource, outcome, reason, request_id, trace_id, purpose, consent_ref
         FROM audit_records ORDER BY seq",
    )
    .fetch_all(&app.db)
    .await
    .unwrap()
}

/// Seals until every record written so far is in the chain. A record is
/// sealed only once every older transaction on the server has ended (the
/// horizon is server-wide, so parallel tests can hold it back a moment).
async fn seal(app: &TestApp) {
    for _ in 0..200 {
        payments::audit::chain::seal_pending(&app.db).await.unwrap();
        let unsealed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_records WHERE chain_seq IS NULL")
                .fetch_one(&app.db)
                .await
                .unwrap();
        if unsealed == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("audit records were not sealed in time");
}

#[tokio::test]
async fn every_decision_path_leaves_a_record() {
    let app = TestApp::spawn().await;
    let session = app.new_session().await;
    let reference = reference_of(&app, &session).await;
    // refused create
    let mut bad = session_body();
    bad["line_items"] = json!([]);
    app.create_session(Some("k-bad"), &bad).await;
    // accepted, deduplicated, processed
    let (event_id, body) = event("checkout.session.completed", now(), |o| {
        o["id"] = session.clone().into();
        o["metadata"] = json!({ "payments_ref": reference });
    });
    app.deliver(
        &body,
        Some(&stripe_stand_in::sign_payload(
            SECRET_CURRENT,
            now() - 30,
            &body,
        )),
    )
    .await;
    app.deliver_signed(&body).await;
    app.settled_event(&event_id).await;
    // rejected, quarantined
    app.deliver(&body, Some("t=1,v1=00")).await;
    app.deliver_signed(b"not json").await;
    // operator actions
    let dead_letter: i64 = sqlx::query_scalar("SELECT id FROM dead_letters")
        .fetch_one(&app.db)
        .await
        .unwrap();
    app.admin_post(&format!("/v1/dead-letters/{dead_letter}/replay"))
        .await;
    app.http
        .post(format!(
            "{}/v1/dead-letters/{dead_letter}/discard",
            app.admin
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"reason": "test delivery"}))
        .send()
        .await
        .unwrap();
    app.http
        .get(format!("{}/v1/dead-letters", app.admin))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();

    let actions: HashSet<String> = records(&app).await.into_iter().map(|r| r.action).collect();

    for expected in [
        "checkout.created",
        "checkout.refused",
        "webhook.accepted",
        "webhook.deduplicated",
        "webhook.rejected",
        "webhook.quarantined",
        "event.processed",
        "dead_letter.replayed",
        "dead_letter.discarded",
        "admin_access.granted",
        "admin_access.refused",
    ] {
        assert!(
            actions.contains(expected),
            "no {expected} record in {actions:?}"
        );
    }
}

#[tokio::test]
async fn records_carry_the_request_context_and_no_personal_data() {
    let app = TestApp::spawn().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    let response = app
        .http
        .post(format!("{}/v1/checkout/sessions", app.public))
        .bearer_auth(&app.api_key)
        .header("Idempotency-Key", "k-context")
        .header("traceparent", traceparent)
        .header("payments-consent-reference", "consent-2026-77")
        .json(&session_body())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let created = records(&app)
        .await
        .into_iter()
        .find(|r| r.action == "checkout.created")
        .unwrap();
    assert_eq!(created.actor, "client:shop-backend");
    assert_eq!(created.outcome, "done");
    assert!(created.resource.as_deref().unwrap().starts_with("cs_test_"));
    assert_eq!(created.request_id.as_deref(), Some(request_id.as_str()));
    assert_eq!(
        created.trace_id.as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(created.purpose.as_deref(), Some("checkout"));
    assert_eq!(created.consent_ref.as_deref(), Some("consent-2026-77"));

    // A fixture event carries a customer's e-mail; no record may.
    app.deliver_signed(&serde_json::to_vec(&fixture("checkout.session.completed")).unwrap())
        .await;
    app.settled_event("evt_fixture_checkout_session_completed")
        .await;
    let dump: Vec<String> = sqlx::query_scalar("SELECT row_to_json(a)::text FROM audit_records a")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert!(
        dump.iter().all(|r| !r.contains("example@example.com")),
        "{dump:?}"
    );
}

#[tokio::test]
async fn a_missing_or_unknown_purpose_is_refused() {
    let app = TestApp::spawn().await;
    let plain = reqwest::Client::new();
    let post = |purpose: Option<&'static str>| {
        let mut request = plain
            .post(format!("{}/v1/checkout/sessions", app.public))
            .bearer_auth(&app.api_key)
            .header("Idempotency-Key", "k-purpose")
            .json(&session_body());
        if let Some(purpose) = purpose {
            request = request.header("payments-purpose", purpose);
        }
        request.send()
    };

    let missing = post(None).await.unwrap();
    let unknown = post(Some("marketing")).await.unwrap();

    assert_problem(missing, StatusCode::BAD_REQUEST, "purpose-required").await;
    assert_problem(unknown, StatusCode::BAD_REQUEST, "purpose-required").await;
    assert_eq!(app.stand_in.create_requests(), 0);
    let refused: Vec<AuditRow> = records(&app)
        .await
        .into_iter()
        .filter(|r| r.action == "purpose.refused")
        .collect();
    assert_eq!(refused.len(), 2);
    assert!(
        refused
            .iter()
            .all(|r| r.actor == "client:shop-backend" && r.request_id.is_some())
    );
}

#[tokio::test]
async fn a_card_number_refusal_is_recorded_naming_the_field_not_the_number() {
    let app = TestApp::spawn().await;
    let mut body = session_body();
    body["metadata"] = json!({"note": "4242 4242 4242 4242"});

    let response = app.create_session(Some("k-card"), &body).await;

    assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "card-data-rejected",
    )
    .await;
    let refused = records(&app)
        .await
        .into_iter()
        .find(|r| r.action == "card_data.rejected")
        .expect("card data refusal recorded");
    let reason = refused.reason.unwrap_or_default();
    assert!(reason.contains("metadata.note"), "{reason}");
    assert!(!reason.contains("4242"), "{reason}");
    assert!(refused.request_id.is_some());
}

#[tokio::test]
async fn operators_must_say_why_they_replay() {
    let app = TestApp::spawn().await;
    app.deliver_signed(b"not json").await;

    let response = app
        .http
        .post(format!("{}/v1/dead-letters/1/replay", app.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_payments"))
        .args(["dlq", "replay", "1"])
        .env_clear()
        .env("DATABASE_URL", &app.database_url)
        .env("PAYMENTS_KEK_FILE", &app.kek_file)
        .output()
        .unwrap();

    assert_problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;
    assert!(!cli.status.success());
    assert!(String::from_utf8_lossy(&cli.stderr).contains("--reason"));
    assert_eq!(app.count("dead_letter_attempts").await, 0);
    let replayed = app.admin_post("/v1/dead-letters/1/replay").await;
    assert_eq!(replayed.status(), StatusCode::OK);
    let record = records(&app)
        .await
        .into_iter()
        .find(|r| r.action == "dead_letter.replayed")
        .unwrap();
    assert_eq!(record.actor, "operator:admin");
    assert_eq!(record.reason.as_deref(), Some("test: operator action"));
}

#[tokio::test]
async fn the_chain_verifies_and_names_an_altered_or_removed_record() {
    let app = TestApp::spawn().await;
    for i in 0..5 {
        app.create_session(Some(&format!("k-chain-{i}")), &session_body())
            .await;
    }
    seal(&app).await;
    let verdict = payments::audit::chain::verify(&app.db).await.unwrap();
    // 5 sessions created and the harness's API key; the background sealer
    // may have sealed more by now, never fewer.
    let payments::audit::chain::Verdict::Intact { records } = verdict else {
        panic!("a fresh chain is not intact: {verdict:?}");
    };
    assert!(records >= 6, "{records}");

    // Someone with superuser rights edits a record behind the trigger's back.
    tamper(
        &app,
        "UPDATE audit_records SET reason = 'nothing to see' WHERE chain_seq = 4",
    )
    .await;
    let altered = payments::audit::chain::verify(&app.db).await.unwrap();
    assert!(
        matches!(
            altered,
            payments::audit::chain::Verdict::Altered { chain_seq: 4, .. }
        ),
        "{altered:?}"
    );

    // The operator's command names it too, and fails.
    let cli = app.cli(&["audit", "verify"]);
    assert!(!cli.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&cli.stdout),
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(said.contains("chain_seq 4"), "{said}");

    tamper(&app, "DELETE FROM audit_records WHERE chain_seq = 2").await;
    let missing = payments::audit::chain::verify(&app.db).await.unwrap();
    assert_eq!(
        missing,
        payments::audit::chain::Verdict::Missing { chain_seq: 2 }
    );
}

async fn tamper(app: &TestApp, statement: &str) {
    let mut tx = app.db.begin().await.unwrap();
    sqlx::query("ALTER TABLE audit_records DISABLE TRIGGER audit_records_append_only")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(statement).execute(&mut *tx).await.unwrap();
    sqlx::query("ALTER TABLE audit_records ENABLE TRIGGER audit_records_append_only")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn sealing_may_set_the_chain_once_and_nothing_else() {
    let app = TestApp::spawn().await;
    app.create_session(Some("k-seal"), &session_body()).await;
    seal(&app).await;

    let reseal = sqlx::query("UPDATE audit_records SET chain_seq = chain_seq + 100")
        .execute(&app.db)
        .await;
    // A "seal" that also rewrites the record, on a record not sealed yet.
    let mut tx = app.db.begin().await.unwrap();
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO audit_records (actor, action, outcome) VALUES ('test', 'test.sneak', 'done') RETURNING seq",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let sneak = sqlx::query(
        "UPDATE audit_records SET chain_seq = 999, hash = sha256('x'), actor = 'someone-else' WHERE seq = $1",
    )
    .bind(seq)
    .execute(&mut *tx)
    .await;

    assert!(reseal.is_err());
    assert!(sneak.is_err());
}

#[tokio::test]
async fn rate_limit_refusals_are_recorded_once_per_limiter_and_source() {
    let app = TestApp::spawn_with(|env| {
        env.insert(
            "PAYMENTS_RATE_LIMIT_WEBHOOK_FAILURES_PER_MIN".into(),
            "1".into(),
        );
        env.insert(
            "PAYMENTS_RATE_LIMIT_WEBHOOK_FAILURES_BURST".into(),
            "1".into(),
        );
    })
    .await;
    for _ in 0..5 {
        app.deliver(b"{}", Some("t=1,v1=00")).await;
    }

    payments::audit::rate_limits::flush(&app.db).await.unwrap();

    let limited: Vec<AuditRow> = records(&app)
        .await
        .into_iter()
        .filter(|r| r.action == "rate_limit.applied")
        .collect();
    assert!(!limited.is_empty());
    assert!(limited.iter().any(|r| {
        r.reason
            .as_deref()
            .is_some_and(|x| x.contains("requests refused"))
    }));
}
