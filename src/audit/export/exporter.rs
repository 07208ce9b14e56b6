//! One exporter per sink: hold the sink's lock, read sealed records past
//! the cursor, send them, move the cursor; on failure back off, reconnect
//! and, for syslog, rewind.
//!
//! Only one replica exports a sink at a time: the exporter holds a
//! session-level advisory lock on a connection of its own, which it also
//! uses for its queries, so losing that connection loses the lock and stops
//! the exporter's writes together. The session is replaced every
//! [`SESSION_MAX_AGE`] like the pool's connections, so it never outlives
//! rotated database credentials by much.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use anyhow::Context;
use rand::Rng;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::watch;

use super::{
    ExportSettings, Rewind, Sink, Target,
    format::{self, ExportRecord},
    hec::HecSink,
    status::{self, Lag},
    stdout,
    syslog::SyslogSink,
};

const SESSION_MAX_AGE: Duration = Duration::from_secs(30 * 60);
/// How much of an error is kept in `audit_export_cursors.last_error`.
const MAX_ERROR_CHARS: usize = 500;

/// Exports to `sink` until `stopping` turns true. Sends nothing but sealed
/// records, in `chain_seq` order, at least once each.
pub async fn run_sink(
    pool: PgPool,
    sink: Sink,
    settings: ExportSettings,
    mut stopping: watch::Receiver<bool>,
) {
    tracing::info!(sink = %sink.name, "audit export started");
    let mut backoff = Backoff::new(settings.backoff_base, settings.backoff_max);
    let idle = settings.poll;
    let mut exporter = Exporter::new(pool, sink, settings);
    loop {
        let step = tokio::select! {
            step = exporter.step() => step,
            _ = stopping.wait_for(|stop| *stop) => break,
        };
        let pause = match step {
            Ok(Step::Sent) => {
                backoff.reset();
                continue;
            }
            Ok(Step::Idle) => {
                backoff.reset();
                idle
            }
            Ok(Step::Standby) => idle.saturating_mul(5),
            Err(failure) => {
                exporter.fail(failure).await;
                backoff.next()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopping.wait_for(|stop| *stop) => break,
        }
    }
    exporter.close().await;
    tracing::info!(sink = %exporter.name, "audit export stopped");
}

enum Step {
    /// A batch went out; look for the next at once.
    Sent,
    /// Caught up.
    Idle,
    /// Another replica exports this sink.
    Standby,
}

enum Failure {
    Database(anyhow::Error),
    Sink(anyhow::Error),
}

/// The lock-holding connection and the cursor as this exporter last read
/// or wrote it.
struct Session {
    conn: PgConnection,
    opened: Instant,
    cursor: i64,
}

struct Exporter {
    pool: PgPool,
    name: String,
    settings: ExportSettings,
    lock_key: i64,
    connection: Connection,
    session: Option<Session>,
    /// The cursor when the last session ended: if another replica moved it
    /// since, the sink connection is not ours to continue.
    last_cursor: Option<i64>,
    /// The last `chain_seq` written to the open sink connection.
    position: Option<i64>,
    /// Where the next sink connection starts, worked out when the last one failed.
    resume: Option<i64>,
    /// First `chain_seq` of each recent write, for the rewind window.
    written: VecDeque<(Instant, i64)>,
    /// `last_error` is set on the cursor row and must be cleared.
    error_recorded: bool,
}

impl Exporter {
    fn new(pool: PgPool, sink: Sink, settings: ExportSettings) -> Self {
        let connection = Connection::new(sink.target, settings.timeout);
        Self {
            pool,
            lock_key: status::lock_key(&sink.name),
            name: sink.name,
            settings,
            connection,
            session: None,
            last_cursor: None,
            position: None,
            resume: None,
            written: VecDeque::new(),
            error_recorded: false,
        }
    }

    async fn step(&mut self) -> Result<Step, Failure> {
        let Some(mut session) = self.hold_lock().await.map_err(Failure::Database)? else {
            return Ok(Step::Standby);
        };
        let step = self.export_batch(&mut session).await;
        if matches!(step, Err(Failure::Database(_))) {
            // Dropping the connection ends its session and frees the lock.
            self.last_cursor = Some(session.cursor);
        } else {
            self.session = Some(session);
        }
        step
    }

    async fn export_batch(&mut self, session: &mut Session) -> Result<Step, Failure> {
        if !self.connection.is_connected() {
            self.connection.connect().await.map_err(Failure::Sink)?;
            self.position = Some(self.start_point(session.cursor));
        }
        let from = self.position.unwrap_or(session.cursor);
        let records = fetch(&mut session.conn, from, self.settings.batch)
            .await
            .map_err(Failure::Database)?;
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            publish_lag(&mut session.conn, &self.name)
                .await
                .map_err(Failure::Database)?;
            return Ok(Step::Idle);
        };
        let (first, last) = (first.chain_seq, last.chain_seq);
        self.connection
            .send(&records)
            .await
            .map_err(Failure::Sink)?;
        self.note_written(first);
        self.position = Some(last);
        if last > session.cursor || self.error_recorded {
            let cursor = store_cursor(&mut session.conn, &self.name, last)
                .await
                .map_err(Failure::Database)?;
            session.cursor = cursor;
            self.last_cursor = Some(cursor);
            self.error_recorded = false;
        }
        publish_lag(&mut session.conn, &self.name)
            .await
            .map_err(Failure::Database)?;
        Ok(Step::Sent)
    }

    /// Takes or keeps the sink's lock; `None` when another replica has it.
    async fn hold_lock(&mut self) -> anyhow::Result<Option<Session>> {
        if let Some(session) = self.session.take() {
            if session.opened.elapsed() < SESSION_MAX_AGE {
                return Ok(Some(session));
            }
            self.end_session(session).await;
        }
        let mut pooled = self.pool.acquire().await.context("acquire a connection")?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(self.lock_key)
            .fetch_one(&mut *pooled)
            .await
            .context("try the export lock")?;
        if !locked {
            drop(pooled);
            self.standby().await;
            return Ok(None);
        }
        // The lock belongs to this connection's session: it leaves the pool.
        let mut conn = pooled.detach();
        let cursor = read_cursor(&mut conn, &self.name).await?;
        if self.last_cursor != Some(cursor) {
            // Another replica exported meanwhile (or this is the first
            // session): start over from the stored cursor.
            self.connection.disconnect();
            self.position = None;
            self.resume = None;
        }
        self.last_cursor = Some(cursor);
        Ok(Some(Session {
            conn,
            opened: Instant::now(),
            cursor,
        }))
    }

    async fn standby(&mut self) {
        self.connection.disconnect();
        self.position = None;
        self.last_cursor = None;
        if let Err(err) = self.publish_lag_from_pool().await {
            tracing::debug!(sink = %self.name, error = %err, "audit export lag not measured");
        }
    }

    /// Where a new sink connection starts: after the cursor for sinks that
    /// acknowledge, rewound for syslog.
    fn start_point(&mut self, cursor: i64) -> i64 {
        match (self.connection.rewind(), self.resume.take()) {
            (None, _) => cursor,
            (Some(_), Some(resume)) => resume,
            (Some(rewind), None) => (cursor - rewind.records).max(0),
        }
    }

    fn note_written(&mut self, first: i64) {
        let Some(rewind) = self.connection.rewind() else {
            return;
        };
        let now = Instant::now();
        self.written.push_back((now, first));
        while let Some((at, _)) = self.written.front() {
            if now.duration_since(*at) <= rewind.window {
                break;
            }
            self.written.pop_front();
        }
    }

    /// The rewind for the next connection: the last `records` before the
    /// cursor, or back to the first record written in the `window` before
    /// this failure, whichever reaches further.
    fn rewind_point(&self, rewind: Rewind) -> Option<i64> {
        let cursor = self.session.as_ref()?.cursor;
        let now = Instant::now();
        let recent = self
            .written
            .iter()
            .find(|(at, _)| now.duration_since(*at) <= rewind.window)
            .map(|(_, first)| first - 1);
        let by_count = cursor - rewind.records;
        Some(recent.map_or(by_count, |r| r.min(by_count)).max(0))
    }

    async fn fail(&mut self, failure: Failure) {
        match failure {
            Failure::Database(err) => tracing::warn!(
                sink = %self.name,
                error = format!("{err:#}"),
                "audit export: database unavailable; backing off"
            ),
            Failure::Sink(err) => {
                let error = format!("{err:#}");
                tracing::warn!(sink = %self.name, error, "audit export: sink failed; backing off");
                // Keep the furthest rewind until a connection succeeds: a
                // long outage must not age the window's writes out of it.
                let rewind = self.connection.rewind().and_then(|r| self.rewind_point(r));
                self.resume = match (self.resume, rewind) {
                    (Some(pending), Some(new)) => Some(pending.min(new)),
                    (pending, new) => pending.or(new),
                };
                self.connection.disconnect();
                self.position = None;
                self.record_error(&error).await;
                if let Err(err) = self.publish_lag_from_pool().await {
                    tracing::debug!(sink = %self.name, error = %err, "audit export lag not measured");
                }
            }
        }
    }

    async fn record_error(&mut self, error: &str) {
        let error: String = error.chars().take(MAX_ERROR_CHARS).collect();
        let stored = sqlx::query(
            "INSERT INTO audit_export_cursors (sink, last_error) VALUES ($1, $2)
             ON CONFLICT (sink) DO UPDATE SET last_error = EXCLUDED.last_error",
        )
        .bind(&self.name)
        .bind(&error)
        .execute(&self.pool)
        .await;
        match stored {
            Ok(_) => self.error_recorded = true,
            Err(err) => {
                tracing::warn!(sink = %self.name, error = %err, "audit export error not recorded")
            }
        }
    }

    async fn publish_lag_from_pool(&self) -> Result<Lag, sqlx::Error> {
        let lag = status::lag(&self.pool, &self.name).await?;
        lag.publish(&self.name);
        Ok(lag)
    }

    async fn end_session(&mut self, session: Session) {
        self.last_cursor = Some(session.cursor);
        let close = tokio::time::timeout(Duration::from_secs(2), session.conn.close());
        if !matches!(close.await, Ok(Ok(()))) {
            tracing::debug!(sink = %self.name, "export lock session not closed cleanly");
        }
    }

    async fn close(&mut self) {
        self.connection.disconnect();
        if let Some(session) = self.session.take() {
            self.end_session(session).await;
        }
    }
}

async fn publish_lag(conn: &mut PgConnection, sink: &str) -> anyhow::Result<()> {
    let lag = status::lag(conn, sink)
        .await
        .context("measure export lag")?;
    lag.publish(sink);
    Ok(())
}

async fn fetch(
    conn: &mut PgConnection,
    after: i64,
    batch: i64,
) -> anyhow::Result<Vec<ExportRecord>> {
    let sql = format!(
        "SELECT {} FROM audit_records WHERE chain_seq > $1 ORDER BY chain_seq LIMIT $2",
        format::COLUMNS
    );
    sqlx::query_as(&sql)
        .bind(after)
        .bind(batch)
        .fetch_all(conn)
        .await
        .context("read sealed audit records")
}

async fn read_cursor(conn: &mut PgConnection, sink: &str) -> anyhow::Result<i64> {
    sqlx::query("INSERT INTO audit_export_cursors (sink) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(sink)
        .execute(&mut *conn)
        .await
        .context("create the export cursor")?;
    sqlx::query_scalar("SELECT last_seq FROM audit_export_cursors WHERE sink = $1")
        .bind(sink)
        .fetch_one(conn)
        .await
        .context("read the export cursor")
}

/// Moves the cursor forward (never back: a rewind resends behind it) and
/// clears the last error. Returns the stored cursor.
async fn store_cursor(conn: &mut PgConnection, sink: &str, sent: i64) -> anyhow::Result<i64> {
    sqlx::query_scalar(
        "UPDATE audit_export_cursors
         SET last_seq = greatest(last_seq, $2),
             updated_at = CASE WHEN $2 > last_seq THEN now() ELSE updated_at END,
             last_error = NULL
         WHERE sink = $1
         RETURNING last_seq",
    )
    .bind(sink)
    .bind(sent)
    .fetch_one(conn)
    .await
    .context("advance the export cursor")
}

/// The destination, connected or not.
enum Connection {
    Stdout,
    Syslog(SyslogSink),
    Hec(HecSink),
}

impl Connection {
    fn new(target: Target, timeout: Duration) -> Self {
        match target {
            Target::Stdout => Self::Stdout,
            Target::Syslog(target) => Self::Syslog(SyslogSink::new(target, timeout)),
            Target::Hec(target) => Self::Hec(HecSink::new(target, timeout)),
        }
    }

    fn is_connected(&self) -> bool {
        match self {
            Self::Stdout => true,
            Self::Syslog(sink) => sink.is_connected(),
            Self::Hec(sink) => sink.is_connected(),
        }
    }

    async fn connect(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Stdout => Ok(()),
            Self::Syslog(sink) => sink.connect().await,
            Self::Hec(sink) => sink.connect(),
        }
    }

    fn disconnect(&mut self) {
        match self {
            Self::Stdout => {}
            Self::Syslog(sink) => sink.disconnect(),
            Self::Hec(sink) => sink.disconnect(),
        }
    }

    async fn send(&mut self, records: &[ExportRecord]) -> anyhow::Result<()> {
        match self {
            Self::Stdout => stdout::send(records).await,
            Self::Syslog(sink) => sink.send(records).await,
            Self::Hec(sink) => sink.send(records).await,
        }
    }

    /// Only syslog needs a rewind: standard output and HEC acknowledge
    /// each batch (a write returned, a 2xx).
    fn rewind(&self) -> Option<Rewind> {
        match self {
            Self::Syslog(sink) => Some(sink.target().rewind),
            Self::Stdout | Self::Hec(_) => None,
        }
    }
}

/// Exponential backoff with jitter: between half and all of
/// `base × 2^(n-1)`, capped at `max`.
struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            failures: 0,
        }
    }

    fn reset(&mut self) {
        self.failures = 0;
    }

    fn next(&mut self) -> Duration {
        let doubling = 2u32.saturating_pow(self.failures.min(20));
        self.failures = self.failures.saturating_add(1);
        let full = self.base.saturating_mul(doubling).min(self.max);
        full.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = backoff.next();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let second = backoff.next();
        assert!(second >= Duration::from_millis(100) && second <= Duration::from_millis(200));
        for _ in 0..30 {
            assert!(backoff.next() <= Duration::from_secs(1));
        }
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(100));
    }
}
