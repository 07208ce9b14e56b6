//! Discarding dead letters, and replaying them in bulk as recorded jobs:
//! through the admin API, the background runner and the CLI.

use std::{cell::RefCell, time::Duration};

use payments::{
    crypto::PayloadContext,
    dead_letters::jobs::{
        self, FilterInput, JobFilter, JobProgress, JobStatus, Runner, run_job, run_queued_jobs,
    },
};
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::{sync::watch, task::JoinHandle};

use crate::helpers::{ADMIN_TOKEN, TestApp, assert_problem, fixture, now};

const JOBS: &str = "/v1/dead-letters/replay-jobs";

// ---- test data ---------------------------------------------------------

/// Event bytes built on a PaymentIntent fixture, with a fresh id and the
/// given type. `payment_intent.created` is a type the service ignores, so
/// such an event resolves on replay; a checkout type fails, because its
/// object is not a checkout session.
fn event_bytes(event_type: &str) -> (String, Vec<u8>) {
    let event_id = format!("evt_test_{}", uuid::Uuid::new_v4().simple());
    let mut event = fixture("payment_intent.succeeded");
    event["id"] = json!(event_id);
    event["type"] = json!(event_type);
    event["created"] = json!(now());
    (
        event_id,
        serde_json::to_vec(&event).expect("serialise event"),
    )
}

/// Bytes an older parser refused and this one reads: replay resolves it.
async fn replayable(app: &TestApp) -> i64 {
    let (_, bytes) = event_bytes("payment_intent.created");
    app.quarantine("not_an_event", "old parser", &bytes).await
}

/// Bytes that are not JSON: replay fails every time.
async fn malformed(app: &TestApp) -> i64 {
    app.quarantine("malformed_payload", "expected value", b"not json")
        .await
}

/// A stored event that failed to apply, as the worker leaves it.
async fn apply_failed(app: &TestApp, event_type: &str) -> i64 {
    let (event_id, bytes) = event_bytes(event_type);
    let sealed = app
        .keyring
        .seal(PayloadContext::Event(&event_id), &bytes)
        .await
        .expect("seal payload");
    sqlx::query(
        "INSERT INTO webhook_events
             (id, type, livemode, created, payload, payload_key_id, status, detail)
         VALUES ($1, $2, false, now(), $3, $4, 'dead_lettered', 'rejected')",
    )
    .bind(&event_id)
    .bind(event_type)
    .bind(sealed.bytes)
    .bind(sealed.key_id)
    .execute(&app.db)
    .await
    .expect("insert stored event");
    sqlx::query_scalar(
        "INSERT INTO dead_letters (event_id, event_type, reason, detail)
         VALUES ($1, $2, 'apply_failed', 'rejected') RETURNING id",
    )
    .bind(&event_id)
    .bind(event_type)
    .fetch_one(&app.db)
    .await
    .expect("insert apply_failed dead letter")
}

async fn set_created_at(app: &TestApp, id: i64, at: &str) {
    sqlx::query("UPDATE dead_letters SET created_at = $2::timestamptz WHERE id = $1")
        .bind(id)
        .bind(at)
        .execute(&app.db)
        .await
        .expect("set created_at");
}

// ---- reading state -----------------------------------------------------

async fn entry_status(app: &TestApp, id: i64) -> String {
    sqlx::query_scalar("SELECT status FROM dead_letters WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .expect("entry status")
}

async fn attempts(app: &TestApp, id: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM dead_letter_attempts WHERE dead_letter_id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .expect("count attempts")
}

async fn item_outcome(app: &TestApp, job_id: i64, id: i64) -> Option<String> {
    sqlx::query_scalar(
        "SELECT outcome FROM replay_job_items WHERE job_id = $1 AND dead_letter_id = $2",
    )
    .bind(job_id)
    .bind(id)
    .fetch_one(&app.db)
    .await
    .expect("item outcome")
}

// ---- calling the API ---------------------------------------------------

async fn admin_post_json(app: &TestApp, path: &str, body: &Value) -> Response {
    app.http
        .post(format!("{}{path}", app.admin))
        .bearer_auth(ADMIN_TOKEN)
        .header("payments-reason", "test: operator action")
        .json(body)
        .send()
        .await
        .expect("admin post")
}

/// Creates a job through the API and answers its body.
async fn create_job(app: &TestApp, body: Value) -> Value {
    let response = admin_post_json(app, JOBS, &body).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.expect("job json");
    job
}

async fn get_job(app: &TestApp, id: i64) -> Value {
    let response = app.admin_get(&format!("{JOBS}/{id}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("job json")
}

/// Polls the job over the API until `done` holds for it.
async fn job_until(app: &TestApp, id: i64, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..400 {
        let job = get_job(app, id).await;
        if done(&job) {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "replay job {id} did not get there in time: {}",
        get_job(app, id).await
    );
}

async fn completed(app: &TestApp, id: i64) -> Value {
    job_until(app, id, |job| job["status"] == "completed").await
}

fn job_id(job: &Value) -> i64 {
    job["id"].as_i64().expect("job id")
}

fn counters(job: &Value) -> [i64; 5] {
    ["total", "processed", "resolved", "failed", "skipped"].map(|k| job[k].as_i64().unwrap())
}

// ---- the background runner, as app.rs will run it ----------------------

struct BackgroundRunner {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl BackgroundRunner {
    fn spawn(app: &TestApp) -> Self {
        let (stop, stopping) = watch::channel(false);
        let task = tokio::spawn(run_queued_jobs(
            app.db.clone(),
            app.keyring.clone(),
            stopping,
        ));
        Self { stop, task }
    }

    /// Signals shutdown and waits for the runner to return.
    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("runner stops on shutdown")
            .expect("runner task joins");
    }
}

/// Runs the job in this task, as the CLI does, and keeps every progress report.
async fn run_here(app: &TestApp, id: i64) -> (JobProgress, Vec<JobProgress>) {
    let seen = RefCell::new(Vec::new());
    let done = run_job(&app.db, &app.keyring, id, &|p| seen.borrow_mut().push(p))
        .await
        .expect("job runs");
    (done, seen.into_inner())
}

// ---- dry runs and filters ----------------------------------------------

#[tokio::test]
async fn a_dry_run_counts_matches_and_changes_nothing() {
    let app = TestApp::spawn().await;
    app.deliver_signed(b"not json").await;
    let ids = [malformed(&app).await, replayable(&app).await];

    let by_reason = admin_post_json(
        &app,
        JOBS,
        &json!({"reason": "malformed_payload", "dry_run": true}),
    )
    .await;
    let everything = admin_post_json(&app, JOBS, &json!({"all": true, "dry_run": true})).await;

    assert_eq!(by_reason.status(), StatusCode::OK);
    let by_reason: Value = by_reason.json().await.unwrap();
    assert_eq!(by_reason["dry_run"], true);
    assert_eq!(by_reason["matched"], 2, "{by_reason}");
    let everything: Value = everything.json().await.unwrap();
    assert_eq!(everything["matched"], 3, "{everything}");
    assert_eq!(app.count("replay_jobs").await, 0);
    assert_eq!(app.count("replay_job_items").await, 0);
    assert_eq!(app.count("dead_letter_attempts").await, 0);
    for id in ids {
        assert_eq!(entry_status(&app, id).await, "open");
    }
}

#[tokio::test]
async fn a_job_replays_only_the_entries_of_the_reason_it_names() {
    let app = TestApp::spawn().await;
    let wanted = [replayable(&app).await, replayable(&app).await];
    let other = malformed(&app).await;
    let runner = BackgroundRunner::spawn(&app);

    let response = admin_post_json(&app, JOBS, &json!({"reason": "not_an_event"})).await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = response.json().await.unwrap();
    let id = job_id(&created);
    assert_eq!(location, format!("{JOBS}/{id}"));
    assert_eq!(created["total"], 2);
    assert_eq!(created["filter"]["reason"], "not_an_event");
    assert_eq!(created["filter"]["all"], false);
    let done = completed(&app, id).await;
    runner.stop().await;
    assert_eq!(counters(&done), [2, 2, 2, 0, 0], "{done}");
    assert!(done["started_at"].is_string() && done["finished_at"].is_string());
    for entry in wanted {
        assert_eq!(entry_status(&app, entry).await, "resolved");
        assert_eq!(attempts(&app, entry).await, 1);
        assert_eq!(
            item_outcome(&app, id, entry).await.as_deref(),
            Some("resolved")
        );
    }
    assert_eq!(entry_status(&app, other).await, "open");
    assert_eq!(attempts(&app, other).await, 0);
}

#[tokio::test]
async fn a_job_replays_only_the_entries_of_the_event_type_it_names() {
    let app = TestApp::spawn().await;
    let ignored = [
        apply_failed(&app, "payment_intent.created").await,
        apply_failed(&app, "payment_intent.created").await,
    ];
    let rejected = apply_failed(&app, "checkout.session.expired").await;
    let created = create_job(&app, json!({"event_type": "checkout.session.expired"})).await;

    let (done, seen) = run_here(&app, job_id(&created)).await;

    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!((done.total, done.failed, done.resolved), (1, 1, 0));
    assert_eq!(seen.last(), Some(&done));
    assert!(seen.windows(2).all(|w| w[0].processed <= w[1].processed));
    assert_eq!(entry_status(&app, rejected).await, "open");
    assert_eq!(attempts(&app, rejected).await, 1);
    for entry in ignored {
        assert_eq!(attempts(&app, entry).await, 0);
    }
    let shown = get_job(&app, job_id(&created)).await;
    assert_eq!(counters(&shown), [1, 1, 0, 1, 0]);
}

#[tokio::test]
async fn a_time_range_includes_its_start_and_excludes_its_end() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for day in ["01", "02", "03", "04"] {
        let id = replayable(&app).await;
        set_created_at(&app, id, &format!("2026-01-{day}T00:00:00Z")).await;
        ids.push(id);
    }
    let filter = json!({"created_from": "2026-01-02T00:00:00Z",
                        "created_to": "2026-01-04T00:00:00+00:00"});
    let mut dry = filter.clone();
    dry["dry_run"] = json!(true);

    let counted: Value = admin_post_json(&app, JOBS, &dry)
        .await
        .json()
        .await
        .unwrap();
    let created = create_job(&app, filter).await;
    let (done, _) = run_here(&app, job_id(&created)).await;

    assert_eq!(counted["matched"], 2);
    assert_eq!((done.total, done.resolved), (2, 2));
    let statuses = [
        entry_status(&app, ids[0]).await,
        entry_status(&app, ids[1]).await,
        entry_status(&app, ids[2]).await,
        entry_status(&app, ids[3]).await,
    ];
    assert_eq!(statuses, ["open", "resolved", "resolved", "open"]);
}

#[tokio::test]
async fn an_entry_quarantined_after_the_job_was_created_is_not_included() {
    let app = TestApp::spawn().await;
    let before = replayable(&app).await;
    let created = create_job(&app, json!({"all": true})).await;
    let after = replayable(&app).await;

    let (done, _) = run_here(&app, job_id(&created)).await;

    assert_eq!((done.total, done.resolved), (1, 1));
    assert_eq!(entry_status(&app, before).await, "resolved");
    assert_eq!(entry_status(&app, after).await, "open");
}

#[tokio::test]
async fn a_job_that_matches_nothing_is_completed_at_once() {
    let app = TestApp::spawn().await;
    replayable(&app).await;

    let first = create_job(&app, json!({"reason": "apply_failed"})).await;
    let second = create_job(&app, json!({"all": true})).await;
    let listed: Value = app.admin_get(JOBS).await.json().await.unwrap();

    assert_eq!(first["status"], "completed");
    assert_eq!(counters(&first), [0, 0, 0, 0, 0]);
    assert!(first["finished_at"].is_string());
    assert_eq!(second["status"], "queued");
    assert_eq!(second["filter"]["all"], true);
    let listed: Vec<i64> = listed.as_array().unwrap().iter().map(job_id).collect();
    assert_eq!(listed, [job_id(&second), job_id(&first)]);
}

#[tokio::test]
async fn bad_job_requests_are_problems_and_create_nothing() {
    let app = TestApp::spawn().await;
    replayable(&app).await;
    let bodies = [
        json!({}),
        json!({"dry_run": true}),
        json!({"all": false}),
        json!({"all": true, "reason": "apply_failed"}),
        json!({"reason": "bogus"}),
        json!({"created_from": "yesterday"}),
        json!({"created_to": "2026-13-01T00:00:00Z"}),
        json!({"created_from": "2026-01-02T00:00:00Z", "created_to": "2026-01-02T00:00:00Z"}),
        json!({"event_type": ""}),
        json!({"all": true, "limit": 5}),
    ];

    for body in &bodies {
        let response = admin_post_json(&app, JOBS, body).await;
        let problem = assert_problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;
        assert!(problem["detail"].is_string(), "{body}: {problem}");
    }
    let not_json = app.admin_post(JOBS).await;
    assert_problem(not_json, StatusCode::BAD_REQUEST, "invalid-request").await;
    assert_eq!(app.count("replay_jobs").await, 0);
    let missing = app.admin_get(&format!("{JOBS}/999")).await;
    assert_problem(missing, StatusCode::NOT_FOUND, "not-found").await;
    let malformed_id = app.admin_get(&format!("{JOBS}/abc")).await;
    assert_problem(malformed_id, StatusCode::NOT_FOUND, "not-found").await;
}

#[tokio::test]
async fn an_empty_filter_names_the_way_to_replay_everything() {
    let app = TestApp::spawn().await;

    let response = admin_post_json(&app, JOBS, &json!({})).await;

    let problem = assert_problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("\"all\": true")
    );
}

// ---- running, progress, takeover ---------------------------------------

/// Holds the row lock a replay takes on a dead letter, so a replay of it
/// waits: the test can look at a job in the middle of its run.
async fn hold(app: &TestApp, id: i64) -> PgConnection {
    let mut conn = PgConnection::connect(&app.database_url)
        .await
        .expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut conn)
        .await
        .expect("begin");
    sqlx::query("SELECT id FROM dead_letters WHERE id = $1 FOR NO KEY UPDATE")
        .bind(id)
        .execute(&mut conn)
        .await
        .expect("lock entry");
    conn
}

async fn release(mut conn: PgConnection) {
    sqlx::query("ROLLBACK")
        .execute(&mut conn)
        .await
        .expect("release lock");
}

#[tokio::test]
async fn progress_is_readable_while_a_job_runs() {
    let app = TestApp::spawn().await;
    let ids = [
        replayable(&app).await,
        replayable(&app).await,
        replayable(&app).await,
    ];
    let held = hold(&app, ids[1]).await;
    let created = create_job(&app, json!({"all": true})).await;
    let runner = BackgroundRunner::spawn(&app);

    let midway = job_until(&app, job_id(&created), |job| job["processed"] == 1).await;
    release(held).await;
    let done = completed(&app, job_id(&created)).await;
    runner.stop().await;

    assert_eq!(midway["status"], "running");
    assert_eq!(counters(&midway), [3, 1, 1, 0, 0]);
    assert!(midway["heartbeat_at"].is_string());
    assert!(midway["finished_at"].is_null());
    assert_eq!(counters(&done), [3, 3, 3, 0, 0]);
}

#[tokio::test]
async fn an_entry_discarded_after_the_job_was_created_is_skipped() {
    let app = TestApp::spawn().await;
    let kept = replayable(&app).await;
    let dropped = replayable(&app).await;
    let created = create_job(&app, json!({"reason": "not_an_event"})).await;
    let discard = admin_post_json(
        &app,
        &format!("/v1/dead-letters/{dropped}/discard"),
        &json!({"reason": "duplicate of another entry"}),
    )
    .await;
    assert_eq!(discard.status(), StatusCode::OK);

    let (done, _) = run_here(&app, job_id(&created)).await;

    assert_eq!((done.total, done.resolved, done.skipped), (2, 1, 1));
    assert_eq!(entry_status(&app, kept).await, "resolved");
    assert_eq!(entry_status(&app, dropped).await, "discarded");
    assert_eq!(attempts(&app, dropped).await, 0);
    let outcome = item_outcome(&app, job_id(&created), dropped).await;
    assert_eq!(outcome.as_deref(), Some("skipped"));
}

/// A job whose runner replayed and recorded its first item, then died.
async fn abandoned_job(app: &TestApp, heartbeat_age: &str) -> (i64, Vec<i64>) {
    let ids = vec![
        replayable(app).await,
        replayable(app).await,
        malformed(app).await,
    ];
    let id = job_id(&create_job(app, json!({"all": true})).await);
    let report = payments::dead_letters::replay(&app.db, &app.keyring, ids[0], test_request())
        .await
        .expect("first replay");
    assert_eq!(report.outcome, "resolved");
    sqlx::query(
        "UPDATE replay_job_items SET outcome = 'resolved', detail = 'done', processed_at = now()
         WHERE job_id = $1 AND dead_letter_id = $2",
    )
    .bind(id)
    .bind(ids[0])
    .execute(&app.db)
    .await
    .expect("record first item");
    sqlx::query(
        "UPDATE replay_jobs SET status = 'running', claims = 1, processed = 1, resolved = 1,
             started_at = now() - interval '6 minutes',
             heartbeat_at = now() - $2::interval
         WHERE id = $1",
    )
    .bind(id)
    .bind(heartbeat_age)
    .execute(&app.db)
    .await
    .expect("leave the job running");
    (id, ids)
}

#[tokio::test]
async fn a_job_whose_runner_died_is_finished_without_replaying_done_items_again() {
    let app = TestApp::spawn().await;
    let (id, ids) = abandoned_job(&app, "5 minutes").await;

    let (done, seen) = run_here(&app, id).await;

    assert_eq!(seen.first().map(|p| p.processed), Some(1));
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(
        (done.total, done.processed, done.resolved, done.failed),
        (3, 3, 2, 1)
    );
    for entry in &ids {
        assert_eq!(attempts(&app, *entry).await, 1, "entry {entry}");
    }
    assert_eq!(entry_status(&app, ids[1]).await, "resolved");
}

#[tokio::test]
async fn the_background_runner_takes_over_only_once_the_heartbeat_is_stale() {
    let app = TestApp::spawn().await;
    let (id, ids) = abandoned_job(&app, "1 second").await;
    let runner = BackgroundRunner::spawn(&app);

    let refused = run_job(&app.db, &app.keyring, id, &|_| {}).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let untouched = get_job(&app, id).await;
    sqlx::query("UPDATE replay_jobs SET heartbeat_at = now() - interval '5 minutes' WHERE id = $1")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();
    let done = completed(&app, id).await;
    runner.stop().await;

    let refused = refused.expect_err("a live runner's job is not claimed");
    assert!(
        refused.to_string().contains("another process"),
        "{refused:#}"
    );
    assert_eq!(counters(&untouched), [3, 1, 1, 0, 0]);
    assert_eq!(counters(&done), [3, 3, 2, 1, 0]);
    for entry in &ids {
        assert_eq!(attempts(&app, *entry).await, 1, "entry {entry}");
    }
}

#[tokio::test]
async fn a_runner_stops_between_items_on_shutdown_and_the_job_resumes_later() {
    let app = TestApp::spawn().await;
    let ids = [
        replayable(&app).await,
        replayable(&app).await,
        replayable(&app).await,
    ];
    let held = hold(&app, ids[1]).await;
    let id = job_id(&create_job(&app, json!({"all": true})).await);
    let runner = BackgroundRunner::spawn(&app);
    job_until(&app, id, |job| job["processed"] == 1).await;

    runner.stop.send_replace(true);
    release(held).await;
    tokio::time::timeout(Duration::from_secs(10), runner.task)
        .await
        .expect("runner stops")
        .expect("runner joins");
    let paused = get_job(&app, id).await;
    sqlx::query("UPDATE replay_jobs SET heartbeat_at = now() - interval '5 minutes' WHERE id = $1")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();
    let (done, _) = run_here(&app, id).await;

    assert_eq!(paused["status"], "running");
    assert_eq!(counters(&paused), [3, 2, 2, 0, 0]);
    assert_eq!((done.processed, done.resolved), (3, 3));
    for entry in ids {
        assert_eq!(attempts(&app, entry).await, 1);
    }
}

#[tokio::test]
async fn a_job_the_cli_runs_is_left_to_it_unless_it_never_starts() {
    let app = TestApp::spawn().await;
    let entry = replayable(&app).await;
    let filter = JobFilter::new(FilterInput {
        all: true,
        ..FilterInput::default()
    })
    .unwrap();
    let job = jobs::create_job(&app.db, &filter, Runner::Inline)
        .await
        .unwrap();
    let id = job.progress.id;
    let runner = BackgroundRunner::spawn(&app);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting = get_job(&app, id).await;
    sqlx::query("UPDATE replay_jobs SET created_at = now() - interval '5 minutes' WHERE id = $1")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();
    let done = completed(&app, id).await;
    runner.stop().await;

    assert_eq!(waiting["status"], "queued");
    assert_eq!(waiting["runner"], "inline");
    assert_eq!(counters(&done), [1, 1, 1, 0, 0]);
    assert_eq!(entry_status(&app, entry).await, "resolved");
}

// ---- discard -------------------------------------------------------------

async fn discard(app: &TestApp, id: i64, body: &Value) -> Response {
    admin_post_json(app, &format!("/v1/dead-letters/{id}/discard"), body).await
}

#[tokio::test]
async fn discarding_keeps_the_entry_and_closes_it() {
    let app = TestApp::spawn().await;
    app.deliver_signed(b"not json at all").await;
    let id: i64 = sqlx::query_scalar("SELECT max(id) FROM dead_letters")
        .fetch_one(&app.db)
        .await
        .unwrap();

    let response = discard(&app, id, &json!({"reason": "test traffic from staging"})).await;

    assert_eq!(response.status(), StatusCode::OK);
    let entry: Value = response.json().await.unwrap();
    assert_eq!(entry["status"], "discarded");
    assert_eq!(entry["discard_reason"], "test traffic from staging");
    assert!(entry["discarded_at"].is_string());
    let shown: Value = app
        .admin_get(&format!("/v1/dead-letters/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["payload"], "not json at all");
    let listed: Value = app
        .admin_get("/v1/dead-letters?status=discarded")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["id"], id);
    let replay = app
        .admin_post(&format!("/v1/dead-letters/{id}/replay"))
        .await;
    assert_problem(replay, StatusCode::CONFLICT, "dead-letter-closed").await;
    let again = discard(&app, id, &json!({"reason": "twice"})).await;
    assert_problem(again, StatusCode::CONFLICT, "dead-letter-closed").await;
    assert_eq!(attempts(&app, id).await, 0);
}

#[tokio::test]
async fn a_discard_needs_a_reason_and_an_open_entry() {
    let app = TestApp::spawn().await;
    let id = malformed(&app).await;
    let resolved = replayable(&app).await;
    payments::dead_letters::replay(&app.db, &app.keyring, resolved, test_request())
        .await
        .unwrap();
    let path = format!("/v1/dead-letters/{id}/discard");

    let no_body = app.admin_post(&path).await;
    let no_reason = discard(&app, id, &json!({})).await;
    let blank = discard(&app, id, &json!({"reason": "   "})).await;
    let too_long = discard(&app, id, &json!({"reason": "x".repeat(501)})).await;
    let extra = discard(&app, id, &json!({"reason": "x", "force": true})).await;
    let unknown = discard(&app, 999, &json!({"reason": "x"})).await;
    let closed = discard(&app, resolved, &json!({"reason": "x"})).await;

    for refused in [no_body, no_reason, blank, too_long, extra] {
        assert_problem(refused, StatusCode::BAD_REQUEST, "invalid-request").await;
    }
    assert_problem(unknown, StatusCode::NOT_FOUND, "not-found").await;
    assert_problem(closed, StatusCode::CONFLICT, "dead-letter-resolved").await;
    assert_eq!(entry_status(&app, id).await, "open");
    let longest = discard(&app, id, &json!({"reason": "é".repeat(500)})).await;
    assert_eq!(longest.status(), StatusCode::OK);
}

// ---- the CLI -------------------------------------------------------------

fn stdout_json(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[tokio::test]
async fn the_cli_dry_run_prints_the_count_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let ids = [malformed(&app).await, malformed(&app).await];
    replayable(&app).await;

    let output = app.cli(&[
        "dlq",
        "replay",
        "--filter",
        "reason=malformed_payload",
        "--dry-run",
    ]);

    assert!(output.status.success(), "{output:?}");
    assert_eq!(stdout_json(&output)["matched"], 2);
    assert_eq!(app.count("replay_jobs").await, 0);
    assert_eq!(app.count("dead_letter_attempts").await, 0);
    for id in ids {
        assert_eq!(entry_status(&app, id).await, "open");
    }
}

#[tokio::test]
async fn the_cli_runs_a_filtered_job_to_completion() {
    let app = TestApp::spawn().await;
    let wanted = [
        apply_failed(&app, "payment_intent.created").await,
        apply_failed(&app, "payment_intent.created").await,
    ];
    let other = replayable(&app).await;

    let output = app.cli(&[
        "dlq",
        "replay",
        "--filter",
        "reason=apply_failed",
        "--filter",
        "type=payment_intent.created",
        "--filter",
        "since=2020-01-01T00:00:00Z",
    ]);

    assert!(output.status.success(), "{output:?}");
    let summary = stdout_json(&output);
    assert_eq!(summary["status"], "completed");
    assert_eq!(counters(&summary), [2, 2, 2, 0, 0]);
    assert_eq!(summary["runner"], "inline");
    assert_eq!(summary["filter"]["event_type"], "payment_intent.created");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("2/2"), "{stderr}");
    for entry in wanted {
        assert_eq!(entry_status(&app, entry).await, "resolved");
    }
    assert_eq!(entry_status(&app, other).await, "open");
    let shown = app.cli(&["dlq", "jobs", &summary["id"].to_string()]);
    assert_eq!(counters(&stdout_json(&shown)), [2, 2, 2, 0, 0]);
    let table = String::from_utf8(app.cli(&["dlq", "jobs"]).stdout).unwrap();
    assert!(table.contains("type=payment_intent.created"), "{table}");
}

#[tokio::test]
async fn the_cli_exits_non_zero_when_a_replay_in_its_job_fails() {
    let app = TestApp::spawn().await;
    malformed(&app).await;
    replayable(&app).await;

    let output = app.cli(&["dlq", "replay", "--all"]);

    assert!(!output.status.success());
    let summary = stdout_json(&output);
    assert_eq!(counters(&summary), [2, 2, 1, 1, 0]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("1 of 2 replays"));
}

#[tokio::test]
async fn the_cli_refuses_bad_filters_naming_the_key() {
    let app = TestApp::spawn().await;
    malformed(&app).await;

    let unknown = app.cli(&["dlq", "replay", "--filter", "colour=red"]);
    let bad_time = app.cli(&["dlq", "replay", "--filter", "until=tomorrow"]);
    let nothing = app.cli(&["dlq", "replay"]);
    let both = app.cli(&["dlq", "replay", "1", "--all"]);

    for (output, needle) in [
        (unknown, "colour"),
        (bad_time, "until"),
        (nothing, "--all"),
        (both, "--all"),
    ] {
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    assert_eq!(app.count("replay_jobs").await, 0);
}

#[tokio::test]
async fn the_cli_discards_with_a_reason() {
    let app = TestApp::spawn().await;
    let id = malformed(&app).await;

    let blank = app.cli(&["dlq", "discard", &id.to_string(), "--reason", ""]);
    let done = app.cli(&["dlq", "discard", &id.to_string(), "--reason", "x"]);
    let again = app.cli(&["dlq", "discard", &id.to_string(), "--reason", "x"]);
    let listed = app.cli(&["dlq", "list", "--json", "--status", "discarded"]);

    assert!(!blank.status.success());
    assert!(done.status.success(), "{done:?}");
    let entry = stdout_json(&done);
    assert_eq!(entry["status"], "discarded");
    assert_eq!(entry["discard_reason"], "x");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("discarded, not open"));
    assert_eq!(stdout_json(&listed)[0]["id"], id);
}

#[tokio::test]
async fn the_cli_resumes_a_job_whose_runner_died() {
    let app = TestApp::spawn().await;
    let (id, ids) = abandoned_job(&app, "5 minutes").await;

    let resumed = app.cli(&["dlq", "jobs", &id.to_string(), "--resume"]);
    let again = app.cli(&["dlq", "jobs", &id.to_string(), "--resume"]);

    // The malformed entry fails again, so the command reports a failure.
    assert!(!resumed.status.success());
    assert_eq!(counters(&stdout_json(&resumed)), [3, 3, 2, 1, 0]);
    for entry in &ids {
        assert_eq!(attempts(&app, *entry).await, 1, "entry {entry}");
    }
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already completed"));
}

fn test_request() -> payments::dead_letters::Requested<'static> {
    payments::dead_letters::Requested {
        by: "test",
        reason: "test: direct replay",
        context: None,
    }
}
