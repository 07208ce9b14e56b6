//! Bulk replay: every open dead letter that matches a filter, replayed as a
//! job whose progress lives in Postgres.
//!
//! The entries a job covers are fixed when it is created (its items), so its
//! total is exact and an entry quarantined later is not swept in unseen. A
//! runner replays the items in order through [`super::replay`], writing each
//! outcome and the counters as it goes: any process can read the progress, and
//! when a runner dies another one claims the job and resumes at the first item
//! without an outcome.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tracing::Instrument;

use super::{ReplayError, store::Reason};
use crate::{crypto::Keyring, db};

/// A running job whose heartbeat is older than this is presumed abandoned and
/// may be claimed by another runner. Replaying one item takes milliseconds,
/// so a live runner is never this quiet.
const STALE_AFTER: Duration = Duration::from_secs(60);
/// How often the background runner looks for a job when it found none.
const IDLE_POLL: Duration = Duration::from_secs(1);
const ERROR_BACKOFF: Duration = Duration::from_secs(5);
/// How many jobs a listing shows, newest first.
pub const LIST_LIMIT: i64 = 50;
const MAX_EVENT_TYPE_CHARS: usize = 255;

/// Which open dead letters a job covers. Every condition given must hold. No
/// condition at all means every open entry; [`JobFilter::new`] makes the
/// caller say so.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobFilter {
    reason: Option<Reason>,
    event_type: Option<String>,
    created_from: Option<DateTime<Utc>>,
    created_to: Option<DateTime<Utc>>,
}

/// The conditions a caller gave, before they are checked together.
#[derive(Debug, Default)]
pub struct FilterInput {
    pub reason: Option<Reason>,
    pub event_type: Option<String>,
    /// Inclusive, on the entry's `created_at`.
    pub created_from: Option<DateTime<Utc>>,
    /// Exclusive, on the entry's `created_at`.
    pub created_to: Option<DateTime<Utc>>,
    /// The caller's explicit "no condition: every open entry".
    pub all: bool,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("no filter was given; to replay every open dead letter, ask for all of them")]
    Empty,
    #[error("all means every open dead letter and cannot be combined with a filter")]
    AllWithFilter,
    #[error("the time range is empty: its start must be before its end")]
    EmptyRange,
    #[error("the event type must be 1 to {MAX_EVENT_TYPE_CHARS} characters")]
    EventType,
}

impl JobFilter {
    pub fn new(input: FilterInput) -> Result<Self, FilterError> {
        let filter = Self {
            reason: input.reason,
            event_type: input.event_type,
            created_from: input.created_from,
            created_to: input.created_to,
        };
        match (filter.is_everything(), input.all) {
            (true, false) => return Err(FilterError::Empty),
            (false, true) => return Err(FilterError::AllWithFilter),
            _ => {}
        }
        if let (Some(from), Some(to)) = (filter.created_from, filter.created_to)
            && from >= to
        {
            return Err(FilterError::EmptyRange);
        }
        let type_chars = filter.event_type.as_deref().map(|t| t.chars().count());
        if type_chars.is_some_and(|n| !(1..=MAX_EVENT_TYPE_CHARS).contains(&n)) {
            return Err(FilterError::EventType);
        }
        Ok(filter)
    }

    fn is_everything(&self) -> bool {
        *self == Self::default()
    }

    /// The filter as the API and the CLI show it.
    pub fn view(&self) -> FilterView {
        FilterView {
            reason: self.reason.map(|r| r.as_str().to_owned()),
            event_type: self.event_type.clone(),
            created_from: self.created_from,
            created_to: self.created_to,
            all: self.is_everything(),
        }
    }
}

/// Parses an RFC 3339 timestamp such as `2026-12-04T17:25:00Z`.
pub fn parse_timestamp(raw: &str) -> Option<DateTime<Utc>> {
    let parsed = DateTime::parse_from_rfc3339(raw).ok()?;
    Some(parsed.with_timezone(&Utc))
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct FilterView {
    #[sqlx(rename = "filter_reason")]
    pub reason: Option<String>,
    #[sqlx(rename = "filter_event_type")]
    pub event_type: Option<String>,
    #[sqlx(rename = "filter_created_from")]
    pub created_from: Option<DateTime<Utc>>,
    #[sqlx(rename = "filter_created_to")]
    pub created_to: Option<DateTime<Utc>>,
    #[sqlx(rename = "filter_all")]
    pub all: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Completed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
        }
    }
}

/// Who runs a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runner {
    /// Whichever service replica claims it first (jobs created through the API).
    Background,
    /// The process that created it, right away (the CLI). The service leaves
    /// it alone unless that process never claims it or stops heartbeating.
    Inline,
}

impl Runner {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Background => "background",
            Self::Inline => "inline",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown value {0:?} in replay_jobs")]
pub struct UnknownValue(String);

impl TryFrom<String> for JobStatus {
    type Error = UnknownValue;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        [Self::Queued, Self::Running, Self::Completed]
            .into_iter()
            .find(|s| s.as_str() == raw)
            .ok_or(UnknownValue(raw))
    }
}

impl TryFrom<String> for Runner {
    type Error = UnknownValue;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        [Self::Background, Self::Inline]
            .into_iter()
            .find(|r| r.as_str() == raw)
            .ok_or(UnknownValue(raw))
    }
}

/// A job's counters. `processed` is `resolved + failed + skipped`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct JobProgress {
    pub id: i64,
    #[sqlx(try_from = "String")]
    pub status: JobStatus,
    pub total: i64,
    pub processed: i64,
    pub resolved: i64,
    pub failed: i64,
    pub skipped: i64,
}

/// A job as `GET /v1/dead-letters/replay-jobs/{id}` and `payments dlq jobs` show it.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct JobView {
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub progress: JobProgress,
    #[sqlx(flatten)]
    pub filter: FilterView,
    #[sqlx(try_from = "String")]
    pub runner: Runner,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const PROGRESS_COLUMNS: &str = "id, status, total, processed, resolved, failed, skipped";

const JOB_COLUMNS: &str = "id, status, total, processed, resolved, failed, skipped, runner,
    filter_reason, filter_event_type, filter_created_from, filter_created_to,
    (filter_reason IS NULL AND filter_event_type IS NULL
        AND filter_created_from IS NULL AND filter_created_to IS NULL) AS filter_all,
    created_at, started_at, heartbeat_at, finished_at";

/// The open entries a filter matches; binds are reason, event type, from, to.
const MATCHING: &str = "d.status = 'open'
    AND ($1::text IS NULL OR d.reason = $1)
    AND ($2::text IS NULL OR d.event_type = $2)
    AND ($3::timestamptz IS NULL OR d.created_at >= $3)
    AND ($4::timestamptz IS NULL OR d.created_at < $4)";

/// How many open entries the filter matches now. Changes nothing.
pub async fn count_matching(pool: &PgPool, filter: &JobFilter) -> Result<i64, sqlx::Error> {
    let sql = format!("SELECT count(*) FROM dead_letters d WHERE {MATCHING}");
    sqlx::query_scalar(&sql)
        .bind(filter.reason.map(Reason::as_str))
        .bind(filter.event_type.as_deref())
        .bind(filter.created_from)
        .bind(filter.created_to)
        .fetch_one(pool)
        .await
}

/// Creates a job and fixes the entries it covers, in one transaction. A job
/// that matches nothing is created completed.
pub async fn create_job(
    pool: &PgPool,
    filter: &JobFilter,
    runner: Runner,
) -> anyhow::Result<JobView> {
    let mut tx = pool.begin().await.context("begin replay job creation")?;
    let id = insert_job(&mut tx, filter, runner)
        .await
        .context("insert replay job")?;
    let total = insert_items(&mut tx, id, filter)
        .await
        .context("snapshot the matching dead letters")?;
    let job = set_total(&mut tx, id, total)
        .await
        .context("record the replay job's total")?;
    tx.commit().await.context("commit replay job")?;
    tracing::info!(
        job_id = id,
        total,
        runner = runner.as_str(),
        "replay job created"
    );
    Ok(job)
}

async fn insert_job(
    tx: &mut PgConnection,
    filter: &JobFilter,
    runner: Runner,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO replay_jobs (runner, filter_reason, filter_event_type,
             filter_created_from, filter_created_to, total)
         VALUES ($1, $2, $3, $4, $5, 0) RETURNING id",
    )
    .bind(runner.as_str())
    .bind(filter.reason.map(Reason::as_str))
    .bind(filter.event_type.as_deref())
    .bind(filter.created_from)
    .bind(filter.created_to)
    .fetch_one(tx)
    .await
}

async fn insert_items(
    tx: &mut PgConnection,
    job_id: i64,
    filter: &JobFilter,
) -> Result<i64, sqlx::Error> {
    let sql = format!(
        "INSERT INTO replay_job_items (job_id, dead_letter_id)
         SELECT $5, d.id FROM dead_letters d WHERE {MATCHING}"
    );
    let inserted = sqlx::query(&sql)
        .bind(filter.reason.map(Reason::as_str))
        .bind(filter.event_type.as_deref())
        .bind(filter.created_from)
        .bind(filter.created_to)
        .bind(job_id)
        .execute(tx)
        .await?
        .rows_affected();
    Ok(i64::try_from(inserted).unwrap_or(i64::MAX))
}

async fn set_total(tx: &mut PgConnection, id: i64, total: i64) -> Result<JobView, sqlx::Error> {
    let sql = format!(
        "UPDATE replay_jobs SET total = $2,
             status = CASE WHEN $2 = 0 THEN 'completed' ELSE status END,
             started_at = CASE WHEN $2 = 0 THEN now() END,
             finished_at = CASE WHEN $2 = 0 THEN now() END
         WHERE id = $1 RETURNING {JOB_COLUMNS}"
    );
    sqlx::query_as(&sql)
        .bind(id)
        .bind(total)
        .fetch_one(tx)
        .await
}

pub async fn find_job(pool: &PgPool, id: i64) -> Result<Option<JobView>, sqlx::Error> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM replay_jobs WHERE id = $1");
    sqlx::query_as(&sql).bind(id).fetch_optional(pool).await
}

/// The newest jobs first.
pub async fn list_jobs(pool: &PgPool, limit: i64) -> Result<Vec<JobView>, sqlx::Error> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM replay_jobs ORDER BY id DESC LIMIT $1");
    sqlx::query_as(&sql).bind(limit).fetch_all(pool).await
}

/// Claims the job and replays its remaining items, reporting progress after
/// the claim and after each item. Fails without replaying anything when the
/// job is unknown, completed, or held by a runner whose heartbeat is fresh.
pub async fn run_job(
    pool: &PgPool,
    keyring: &Keyring,
    job_id: i64,
    progress: &dyn Fn(JobProgress),
) -> anyhow::Result<JobProgress> {
    let Some(claim) = claim(pool, job_id).await.context("claim replay job")? else {
        return Err(unclaimable(pool, job_id).await);
    };
    let span = tracing::info_span!("replay job", job_id);
    execute(pool, keyring, claim, progress, &|| false)
        .instrument(span)
        .await
}

/// Runs jobs until shutdown: claims the oldest job that is queued for the
/// background (or abandoned by its runner), replays it, and looks again. On
/// shutdown it stops between items; the job stays running and is claimed
/// again once its heartbeat is older than [`STALE_AFTER`].
pub async fn run_queued_jobs(pool: PgPool, keyring: Keyring, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let pause = match run_next(&pool, &keyring, &shutdown).await {
            Ok(true) => continue,
            Ok(false) => IDLE_POLL,
            Err(err) => {
                tracing::error!(error = format!("{err:#}"), "replay job runner step failed");
                ERROR_BACKOFF
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Runs the next claimable job, if any. Returns whether there was one.
async fn run_next(
    pool: &PgPool,
    keyring: &Keyring,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<bool> {
    let Some(claim) = claim_next(pool).await.context("claim next replay job")? else {
        return Ok(false);
    };
    let span = tracing::info_span!("replay job", job_id = claim.progress.id);
    execute(pool, keyring, claim, &|_| {}, &|| *shutdown.borrow())
        .instrument(span)
        .await?;
    Ok(true)
}

/// The right to write a job's progress, held while the job's `claims` is
/// still `token`.
#[derive(Debug, sqlx::FromRow)]
struct Claim {
    #[sqlx(rename = "claims")]
    token: i32,
    #[sqlx(flatten)]
    progress: JobProgress,
}

/// The claim described in the module docs, for one job. Postgres serialises
/// concurrent claims on the row, so exactly one of them gets the job.
async fn claim(pool: &PgPool, job_id: i64) -> Result<Option<Claim>, sqlx::Error> {
    let sql = format!(
        "UPDATE replay_jobs SET status = 'running', heartbeat_at = now(),
             started_at = COALESCE(started_at, now()), claims = claims + 1
         WHERE id = $1 AND (status = 'queued'
             OR (status = 'running' AND heartbeat_at < now() - make_interval(secs => $2)))
         RETURNING claims, {PROGRESS_COLUMNS}"
    );
    sqlx::query_as(&sql)
        .bind(job_id)
        .bind(STALE_AFTER.as_secs_f64())
        .fetch_optional(pool)
        .await
}

/// Claims the oldest job a background runner may take. SKIP LOCKED lets
/// replicas polling at once pass over each other's candidates.
async fn claim_next(pool: &PgPool) -> Result<Option<Claim>, sqlx::Error> {
    let sql = format!(
        "UPDATE replay_jobs SET status = 'running', heartbeat_at = now(),
             started_at = COALESCE(started_at, now()), claims = claims + 1
         WHERE id = (
             SELECT id FROM replay_jobs
             WHERE (status = 'queued' AND (runner = 'background'
                     OR created_at < now() - make_interval(secs => $1)))
                OR (status = 'running' AND heartbeat_at < now() - make_interval(secs => $1))
             ORDER BY id LIMIT 1
             FOR UPDATE SKIP LOCKED)
         RETURNING claims, {PROGRESS_COLUMNS}"
    );
    sqlx::query_as(&sql)
        .bind(STALE_AFTER.as_secs_f64())
        .fetch_optional(pool)
        .await
}

/// Says why a job could not be claimed.
async fn unclaimable(pool: &PgPool, job_id: i64) -> anyhow::Error {
    let job = match find_job(pool, job_id).await {
        Ok(job) => job,
        Err(err) => return anyhow::Error::new(err).context("read replay job"),
    };
    match job {
        None => anyhow::anyhow!("no replay job with id {job_id}"),
        Some(job) if job.progress.status == JobStatus::Completed => {
            anyhow::anyhow!("replay job {job_id} is already completed")
        }
        Some(_) => anyhow::anyhow!(
            "replay job {job_id} is being run by another process; it can be taken over \
             once its heartbeat is {} seconds old",
            STALE_AFTER.as_secs()
        ),
    }
}

/// Replays the claimed job's remaining items in order, until none is left
/// (the job is then completed) or `stop` answers true between two items.
async fn execute<P, S>(
    pool: &PgPool,
    keyring: &Keyring,
    claim: Claim,
    progress: &P,
    stop: &S,
) -> anyhow::Result<JobProgress>
where
    P: Fn(JobProgress) + ?Sized,
    S: Fn() -> bool + ?Sized,
{
    let job_id = claim.progress.id;
    let mut current = claim.progress;
    progress(current);
    while let Some(dead_letter_id) = next_item(pool, job_id).await.context("find next item")? {
        if stop() {
            tracing::info!(
                processed = current.processed,
                "replay job paused by shutdown"
            );
            return Ok(current);
        }
        let result = replay_item(pool, keyring, dead_letter_id).await?;
        current = record_item(pool, job_id, claim.token, dead_letter_id, &result)
            .await
            .with_context(|| format!("record the outcome for dead letter {dead_letter_id}"))?
            .ok_or_else(|| taken_over(job_id))?;
        progress(current);
    }
    let done = complete(pool, job_id, claim.token)
        .await
        .context("complete replay job")?
        .ok_or_else(|| taken_over(job_id))?;
    tracing::info!(
        total = done.total,
        resolved = done.resolved,
        failed = done.failed,
        skipped = done.skipped,
        "replay job completed"
    );
    progress(done);
    Ok(done)
}

fn taken_over(job_id: i64) -> anyhow::Error {
    anyhow::anyhow!("replay job {job_id} was taken over by another runner")
}

/// The first item without an outcome.
async fn next_item(pool: &PgPool, job_id: i64) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT dead_letter_id FROM replay_job_items
         WHERE job_id = $1 AND outcome IS NULL
         ORDER BY dead_letter_id LIMIT 1",
    )
    .bind(job_id)
    .fetch_optional(pool)
    .await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Resolved,
    Failed,
    Skipped,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Resolved => "resolved",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

struct ItemResult {
    outcome: Outcome,
    detail: String,
}

/// Replays one item. An entry that is no longer open is skipped. Only an
/// unreachable database stops the job (it resumes later); any other database
/// error is this entry's failure, so one bad entry cannot stall a job forever.
async fn replay_item(
    pool: &PgPool,
    keyring: &Keyring,
    dead_letter_id: i64,
) -> anyhow::Result<ItemResult> {
    let requested = super::Requested {
        by: "system:replay-job",
        reason: "bulk replay job",
        context: None,
    };
    let (outcome, detail) = match super::replay(pool, keyring, dead_letter_id, requested).await {
        Ok(report) if report.outcome == "resolved" => (Outcome::Resolved, report.detail),
        Ok(report) => (Outcome::Failed, report.detail),
        Err(err @ (ReplayError::Closed { .. } | ReplayError::NotFound(_))) => {
            (Outcome::Skipped, err.to_string())
        }
        Err(ReplayError::Database(err)) if db::is_unavailable(&err) => {
            return Err(err).with_context(|| format!("replay dead letter {dead_letter_id}"));
        }
        Err(ReplayError::Database(err)) => {
            tracing::warn!(dead_letter_id, error = %err, "replay refused by the database");
            (
                Outcome::Failed,
                format!("the database refused the replay: {err}"),
            )
        }
        Err(ReplayError::Payload(err)) => {
            tracing::warn!(dead_letter_id, error = %err, "replayed payload not encrypted");
            (Outcome::Failed, format!("{err}"))
        }
    };
    Ok(ItemResult { outcome, detail })
}

/// Writes an item's outcome and the job's counters and heartbeat together.
/// Answers None, writing nothing, when another runner has claimed the job.
async fn record_item(
    pool: &PgPool,
    job_id: i64,
    token: i32,
    dead_letter_id: i64,
    result: &ItemResult,
) -> anyhow::Result<Option<JobProgress>> {
    let mut tx = pool.begin().await.context("begin")?;
    let Some(progress) = count_item(&mut tx, job_id, token, result.outcome)
        .await
        .context("update counters")?
    else {
        return Ok(None);
    };
    let marked = sqlx::query(
        "UPDATE replay_job_items SET outcome = $3, detail = $4, processed_at = now()
         WHERE job_id = $1 AND dead_letter_id = $2 AND outcome IS NULL",
    )
    .bind(job_id)
    .bind(dead_letter_id)
    .bind(result.outcome.as_str())
    .bind(&result.detail)
    .execute(&mut *tx)
    .await
    .context("mark item")?
    .rows_affected();
    // The claim token makes this runner the only writer; a second outcome
    // for one item would mean that guarantee broke, so nothing is counted.
    anyhow::ensure!(marked == 1, "the item already had an outcome");
    tx.commit().await.context("commit")?;
    Ok(Some(progress))
}

async fn count_item(
    tx: &mut PgConnection,
    job_id: i64,
    token: i32,
    outcome: Outcome,
) -> Result<Option<JobProgress>, sqlx::Error> {
    let sql = format!(
        "UPDATE replay_jobs SET processed = processed + 1,
             resolved = resolved + ($3 = 'resolved')::int,
             failed = failed + ($3 = 'failed')::int,
             skipped = skipped + ($3 = 'skipped')::int,
             heartbeat_at = now()
         WHERE id = $1 AND claims = $2 AND status = 'running'
         RETURNING {PROGRESS_COLUMNS}"
    );
    sqlx::query_as(&sql)
        .bind(job_id)
        .bind(token)
        .bind(outcome.as_str())
        .fetch_optional(tx)
        .await
}

async fn complete(
    pool: &PgPool,
    job_id: i64,
    token: i32,
) -> Result<Option<JobProgress>, sqlx::Error> {
    let sql = format!(
        "UPDATE replay_jobs SET status = 'completed', finished_at = now(), heartbeat_at = now()
         WHERE id = $1 AND claims = $2 AND status = 'running'
         RETURNING {PROGRESS_COLUMNS}"
    );
    sqlx::query_as(&sql)
        .bind(job_id)
        .bind(token)
        .fetch_optional(pool)
        .await
}
