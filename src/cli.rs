//! The `payments` command line: the server and the operator commands.

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::{app, config, db, dead_letters};

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
    /// Inspect and replay dead-lettered deliveries.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, newest first.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only entries with this status.
        #[arg(long, value_parser = ["open", "resolved"])]
        status: Option<String>,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=1000))]
        limit: i64,
    },
    /// Show one dead letter with its payload and replay history (JSON).
    Show { id: i64 },
    /// Parse and apply a dead letter's stored bytes again, and record the attempt.
    Replay { id: i64 },
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
    }
}

async fn serve() -> anyhow::Result<()> {
    let config = config::Config::from_env()?;
    let listeners = app::Listeners::bind(&config).await?;
    app::serve(config, listeners, shutdown_signal()).await
}

async fn operator_pool() -> anyhow::Result<sqlx::PgPool> {
    let url = config::database_url_from_env()?;
    db::connect(&url).await
}

async fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    let pool = operator_pool().await?;
    match command {
        DlqCommand::List {
            json,
            status,
            limit,
        } => {
            let entries = dead_letters::store::list(&pool, status.as_deref(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print_table(&entries);
            }
        }
        DlqCommand::Show { id } => {
            let entry = dead_letters::store::find(&pool, id)
                .await?
                .with_context(|| format!("no dead letter with id {id}"))?;
            println!("{}", serde_json::to_string_pretty(&entry)?);
        }
        DlqCommand::Replay { id } => {
            let report = dead_letters::replay(&pool, id).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if report.outcome != "resolved" {
                anyhow::bail!("replay of dead letter {id} failed: {}", report.detail);
            }
        }
    }
    Ok(())
}

fn print_table(entries: &[dead_letters::store::DeadLetterSummary]) {
    println!(
        "{:>6}  {:<8}  {:<17}  {:<40}  {:>8}  {:<20}  DETAIL",
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
            "{:>6}  {:<8}  {:<17}  {:<40}  {:>8}  {:<20}  {}",
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
