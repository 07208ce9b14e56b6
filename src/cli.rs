//! The `payments` command line: the server and the operator commands.

use std::{
    cell::Cell,
    io::IsTerminal,
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{ArgGroup, Args, Parser, Subcommand};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::{
    app, config,
    crypto::Keyring,
    db,
    dead_letters::{
        self,
        jobs::{
            self, FilterError, FilterInput, JobFilter, JobProgress, JobStatus, JobView, Runner,
        },
        store::{self, DiscardReason, Reason},
    },
};

#[derive(Parser)]
#[command(
    name = "payments",
    version,
    about = "Stripe Checkout and webhook service"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending migrations, then serve the public, webhook and admin listeners.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Create, list and revoke API clients (shop backends) and canary keys.
    #[command(subcommand)]
    Clients(crate::auth::cli::ClientsCommand),
    /// Issue and revoke operator and break-glass tokens for the admin API.
    #[command(subcommand)]
    Admin(crate::auth::cli::AdminCommand),
    /// Inspect and replay dead-lettered deliveries.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Rotate and inspect the keys that encrypt stored payloads.
    #[command(subcommand)]
    Keys(crate::crypto::cli::KeysCommand),
    /// Verify the audit hash chain and see the SIEM export status.
    #[command(subcommand)]
    Audit(crate::audit::cli::AuditCommand),
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, newest first.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only entries with this status.
        #[arg(long, value_parser = store::STATUSES)]
        status: Option<String>,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=1000))]
        limit: i64,
    },
    /// Show one dead letter with its payload and replay history (JSON).
    Show { id: i64 },
    /// Replay one dead letter by id, or every open one that matches filters as
    /// a recorded job, run here with its progress on stderr.
    Replay(ReplayArgs),
    /// Discard an open dead letter. It is kept, with its payload and history,
    /// and marked discarded with the reason.
    Discard {
        id: i64,
        /// Why it is discarded (1 to 500 characters); kept with the entry.
        #[arg(long)]
        reason: String,
    },
    /// Show one replay job (JSON), or list the recent ones, newest first.
    Jobs {
        id: Option<i64>,
        /// Print the list as JSON instead of a table.
        #[arg(long, conflicts_with = "id")]
        json: bool,
        /// Claim the job and run what is left of it here, when its runner has
        /// stopped (its heartbeat is over a minute old) or it is still queued.
        #[arg(long, requires = "id")]
        resume: bool,
    },
}

#[derive(Args)]
#[command(group(ArgGroup::new("target").required(true).args(["id", "filter", "all"])))]
struct ReplayArgs {
    /// The one dead letter to replay.
    id: Option<i64>,
    /// Replay the open dead letters that match. Repeat to narrow: reason=REASON,
    /// type=EVENT_TYPE, since=RFC3339 (inclusive), until=RFC3339 (exclusive).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_filter)]
    filter: Vec<FilterArg>,
    /// Replay every open dead letter.
    #[arg(long)]
    all: bool,
    /// Only count the open dead letters that match; change nothing.
    #[arg(long, conflicts_with = "id")]
    dry_run: bool,
    /// Why the replay is needed; kept in the audit trail. Required unless --dry-run.
    #[arg(long, required_unless_present = "dry_run")]
    reason: Option<String>,
}

/// One `--filter KEY=VALUE`, parsed.
#[derive(Clone, Debug)]
enum FilterArg {
    Reason(Reason),
    Type(String),
    Since(DateTime<Utc>),
    Until(DateTime<Utc>),
}

fn parse_filter(raw: &str) -> Result<FilterArg, String> {
    let (key, value) = raw
        .split_once('=')
        .ok_or("expected KEY=VALUE, such as reason=apply_failed")?;
    let timestamp = |value: &str| {
        jobs::parse_timestamp(value).ok_or_else(|| {
            format!("{key}: {value:?} is not an RFC 3339 timestamp such as 2026-12-04T17:25:00Z")
        })
    };
    match key {
        "reason" => Reason::parse(value).map(FilterArg::Reason).ok_or_else(|| {
            format!("reason: {value:?} is not malformed_payload, not_an_event or apply_failed")
        }),
        "type" => Ok(FilterArg::Type(value.to_owned())),
        "since" => timestamp(value).map(FilterArg::Since),
        "until" => timestamp(value).map(FilterArg::Until),
        other => Err(format!(
            "unknown filter key {other:?}; the keys are reason, type, since and until"
        )),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve => serve().await,
        Command::Migrate => {
            let pool = operator_pool().await?;
            db::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Dlq(command) => dlq(command).await,
        Command::Keys(command) => {
            let pool = operator_pool().await?;
            crate::crypto::cli::keys(&operator_keyring(&pool)?, command).await
        }
        Command::Clients(command) => {
            crate::auth::cli::clients(&operator_pool().await?, command).await
        }
        Command::Admin(command) => crate::auth::cli::admin(&operator_pool().await?, command).await,
        Command::Audit(command) => crate::audit::cli::audit(&operator_pool().await?, command).await,
    }
}

async fn serve() -> anyhow::Result<()> {
    let config = config::Config::from_env()?;
    let listeners = app::Listeners::bind(&config).await?;
    app::serve(config, listeners, shutdown_signal()).await
}

async fn operator_pool() -> anyhow::Result<sqlx::PgPool> {
    let settings = config::database_from_env()?;
    db::connect(&settings).await
}

/// The key-encryption keys, for the commands that read or store payloads.
fn operator_keyring(pool: &PgPool) -> anyhow::Result<Keyring> {
    let keks = crate::crypto::from_source(&config::ProcessEnv)?;
    Ok(Keyring::new(&keks, pool.clone()))
}

async fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    let pool = operator_pool().await?;
    match command {
        DlqCommand::List {
            json,
            status,
            limit,
        } => {
            let entries = store::list(&pool, status.as_deref(), limit).await?;
            if json {
                print_json(&entries)?;
            } else {
                print_table(&entries);
            }
            Ok(())
        }
        DlqCommand::Show { id } => {
            let entry = store::find(&pool, &operator_keyring(&pool)?, id)
                .await?
                .with_context(|| format!("no dead letter with id {id}"))?;
            print_json(&entry)
        }
        DlqCommand::Replay(args) => replay(&pool, args).await,
        DlqCommand::Discard { id, reason } => discard(&pool, id, &reason).await,
        DlqCommand::Jobs { id, json, resume } => match id {
            Some(id) if resume => run_job(&pool, &operator_keyring(&pool)?, id).await,
            Some(id) => show_job(&pool, id).await,
            None => list_jobs(&pool, json).await,
        },
    }
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn replay(pool: &PgPool, args: ReplayArgs) -> anyhow::Result<()> {
    if let Some(id) = args.id {
        let reason = args
            .reason
            .as_deref()
            .context("--reason is required: say why this replay is needed")?;
        return replay_one(pool, id, reason).await;
    }
    let filter = filter_from_args(&args.filter, args.all)?;
    if args.dry_run {
        let matched = jobs::count_matching(pool, &filter)
            .await
            .context("count the matching dead letters")?;
        return print_json(
            &json!({ "dry_run": true, "matched": matched, "filter": filter.view() }),
        );
    }
    // Before the job exists: a missing key file leaves nothing behind.
    let keyring = operator_keyring(pool)?;
    let job = jobs::create_job(pool, &filter, Runner::Inline).await?;
    let id = job.progress.id;
    let (actor, resource) = (crate::auth::cli::cli_actor(), format!("replay_job:{id}"));
    let reason = args.reason.as_deref().unwrap_or_default();
    let record = crate::audit::Record::new(
        &actor,
        "dead_letter.bulk_replay_requested",
        crate::audit::Outcome::Done,
    )
    .resource(&resource)
    .reason(reason);
    crate::audit::record(pool, &record).await?;
    eprintln!("replay job {id}: {} dead letters", job.progress.total);
    if job.progress.status == JobStatus::Completed {
        return print_json(&job);
    }
    run_job(pool, &keyring, id).await
}

async fn replay_one(pool: &PgPool, id: i64, reason: &str) -> anyhow::Result<()> {
    let actor = crate::auth::cli::cli_actor();
    let requested = dead_letters::Requested {
        by: &actor,
        reason,
        context: None,
    };
    let report = dead_letters::replay(pool, &operator_keyring(pool)?, id, requested).await?;
    print_json(&report)?;
    if report.outcome != "resolved" {
        anyhow::bail!("replay of dead letter {id} failed: {}", report.detail);
    }
    Ok(())
}

/// Each key at most once; the filter rules themselves are the library's.
fn filter_from_args(args: &[FilterArg], all: bool) -> anyhow::Result<JobFilter> {
    let mut input = FilterInput {
        all,
        ..FilterInput::default()
    };
    for arg in args.iter().cloned() {
        let (key, repeated) = match arg {
            FilterArg::Reason(r) => ("reason", input.reason.replace(r).is_some()),
            FilterArg::Type(t) => ("type", input.event_type.replace(t).is_some()),
            FilterArg::Since(t) => ("since", input.created_from.replace(t).is_some()),
            FilterArg::Until(t) => ("until", input.created_to.replace(t).is_some()),
        };
        anyhow::ensure!(!repeated, "--filter {key}=… is given more than once");
    }
    JobFilter::new(input).map_err(|err| anyhow::anyhow!(filter_problem(&err)))
}

/// The problem in the command's own words.
fn filter_problem(err: &FilterError) -> &'static str {
    match err {
        FilterError::Empty => "give --filter KEY=VALUE, or --all to replay every open dead letter",
        FilterError::AllWithFilter => {
            "--all replays every open dead letter; drop it or the filters"
        }
        FilterError::EmptyRange => "--filter since=… must be before until=…",
        FilterError::EventType => "--filter type=… must be 1 to 255 characters",
    }
}

/// Runs the job here, then prints it; fails when any replay failed.
async fn run_job(pool: &PgPool, keyring: &Keyring, id: i64) -> anyhow::Result<()> {
    let display = ProgressDisplay::new();
    let run = jobs::run_job(pool, keyring, id, &|progress| display.show(progress)).await;
    display.finish();
    let done = run?;
    let job = jobs::find_job(pool, id)
        .await
        .context("read the finished replay job")?
        .with_context(|| format!("replay job {id} is gone"))?;
    print_json(&job)?;
    if done.failed > 0 {
        anyhow::bail!(
            "{} of {} replays in job {id} failed",
            done.failed,
            done.total
        );
    }
    Ok(())
}

async fn discard(pool: &PgPool, id: i64, reason: &str) -> anyhow::Result<()> {
    let reason = DiscardReason::parse(reason).with_context(|| {
        format!(
            "--reason must be 1 to {} characters, not all blank",
            DiscardReason::MAX_CHARS
        )
    })?;
    let actor = crate::auth::cli::cli_actor();
    let entry = store::discard(pool, id, &reason, &actor, None).await?;
    print_json(&entry)
}

async fn show_job(pool: &PgPool, id: i64) -> anyhow::Result<()> {
    let job = jobs::find_job(pool, id)
        .await
        .context("read replay job")?
        .with_context(|| format!("no replay job with id {id}"))?;
    print_json(&job)
}

async fn list_jobs(pool: &PgPool, json: bool) -> anyhow::Result<()> {
    let jobs = jobs::list_jobs(pool, jobs::LIST_LIMIT)
        .await
        .context("list replay jobs")?;
    if json {
        return print_json(&jobs);
    }
    print_jobs_table(&jobs);
    Ok(())
}

/// Job progress on stderr: on a terminal a bar redrawn in place, otherwise
/// (a log, a pipe) a plain line at most once a second and at the end.
struct ProgressDisplay {
    terminal: bool,
    last_drawn: Cell<Option<Instant>>,
    last_processed: Cell<Option<i64>>,
}

impl ProgressDisplay {
    const BAR_WIDTH: i64 = 30;

    fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            last_drawn: Cell::new(None),
            last_processed: Cell::new(None),
        }
    }

    fn show(&self, progress: JobProgress) {
        let every = if self.terminal {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(1)
        };
        let due = self.last_drawn.get().is_none_or(|at| at.elapsed() >= every);
        let last = progress.processed == progress.total;
        if self.last_processed.get() == Some(progress.processed) || !(due || last) {
            return;
        }
        self.last_drawn.set(Some(Instant::now()));
        self.last_processed.set(Some(progress.processed));
        let counts = format!(
            "{}/{} resolved {} failed {} skipped {}",
            progress.processed,
            progress.total,
            progress.resolved,
            progress.failed,
            progress.skipped
        );
        if self.terminal {
            eprint!("\r{} {counts}\x1b[K", Self::bar(progress));
        } else {
            eprintln!("replay job {}: {counts}", progress.id);
        }
    }

    fn bar(progress: JobProgress) -> String {
        let filled = match progress.total {
            0 => Self::BAR_WIDTH,
            total => progress.processed * Self::BAR_WIDTH / total,
        };
        let filled = usize::try_from(filled).unwrap_or(0);
        let empty = usize::try_from(Self::BAR_WIDTH)
            .unwrap_or(0)
            .saturating_sub(filled);
        format!("[{}{}]", "#".repeat(filled), "-".repeat(empty))
    }

    /// Ends the line the bar was redrawn on.
    fn finish(&self) {
        if self.terminal && self.last_drawn.get().is_some() {
            eprintln!();
        }
    }
}

fn print_table(entries: &[store::DeadLetterSummary]) {
    println!(
        "{:>6}  {:<9}  {:<17}  {:<40}  {:>8}  {:<20}  DETAIL",
        "ID", "STATUS", "REASON", "EVENT", "REPLAYS", "CREATED"
    );
    for e in entries {
        let event = match (&e.event_type, &e.event_id) {
            (Some(t), Some(id)) => format!("{t} {id}"),
            (Some(t), None) => t.clone(),
            (None, Some(id)) => id.clone(),
            (None, None) => "-".to_owned(),
        };
        let detail: String = e.detail.chars().take(60).collect();
        println!(
            "{:>6}  {:<9}  {:<17}  {:<40}  {:>8}  {:<20}  {}",
            e.id,
            e.status,
            e.reason,
            event,
            e.attempts,
            e.created_at.format("%Y-%m-%d %H:%M:%S"),
            detail
        );
    }
    if entries.is_empty() {
        println!("(no dead letters)");
    }
}

fn print_jobs_table(jobs: &[JobView]) {
    println!(
        "{:>6}  {:<9}  {:>7}  {:>7}  {:>8}  {:>7}  {:>7}  {:<20}  FILTER",
        "ID", "STATUS", "TOTAL", "DONE", "RESOLVED", "FAILED", "SKIPPED", "CREATED"
    );
    for job in jobs {
        let p = &job.progress;
        println!(
            "{:>6}  {:<9}  {:>7}  {:>7}  {:>8}  {:>7}  {:>7}  {:<20}  {}",
            p.id,
            p.status.as_str(),
            p.total,
            p.processed,
            p.resolved,
            p.failed,
            p.skipped,
            job.created_at.format("%Y-%m-%d %H:%M:%S"),
            describe_filter(&job.filter)
        );
    }
    if jobs.is_empty() {
        println!("(no replay jobs)");
    }
}

/// The filter as the `--filter` arguments that would give it.
fn describe_filter(filter: &jobs::FilterView) -> String {
    if filter.all {
        return "--all".to_owned();
    }
    let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339());
    [
        ("reason", filter.reason.clone()),
        ("type", filter.event_type.clone()),
        ("since", time(filter.created_from)),
        ("until", time(filter.created_to)),
    ]
    .into_iter()
    .filter_map(|(key, value)| value.map(|v| format!("{key}={v}")))
    .collect::<Vec<_>>()
    .join(" ")
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before a kill).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
