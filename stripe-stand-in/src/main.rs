//! Command line for local runs: serve the stand-in, build fixture events, sign payloads.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use stripe_stand_in::{EventOverrides, StandIn, event_from_fixture, sign_payload};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A loopback stand-in for the Stripe API that payments uses"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the stand-in API until Ctrl-C or SIGTERM.
    Serve {
        #[arg(long, env = "STRIPE_STAND_IN_ADDR", default_value = "127.0.0.1:12111")]
        addr: SocketAddr,
    },
    /// Print a webhook event built from a fixture file, as the exact bytes to sign.
    Event {
        fixture: PathBuf,
        /// Event id (top-level `id`).
        #[arg(long)]
        id: Option<String>,
        /// Object id (`data.object.id`).
        #[arg(long)]
        object_id: Option<String>,
        /// Event creation time, unix seconds.
        #[arg(long)]
        created: Option<i64>,
        /// Set `data.object.metadata[KEY]`; repeat for more.
        #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = key_value)]
        metadata: Vec<(String, String)>,
    },
    /// Print the Stripe-Signature header value for the exact bytes of FILE.
    Sign {
        file: PathBuf,
        /// Signing secret; defaults to the first of STRIPE_WEBHOOK_SECRETS.
        #[arg(long)]
        secret: Option<String>,
        /// Signature time, unix seconds; defaults to now.
        #[arg(long)]
        timestamp: Option<i64>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve { addr } => serve(addr).await,
        Command::Event {
            fixture,
            id,
            object_id,
            created,
            metadata,
        } => {
            let overrides = EventOverrides {
                event_id: id,
                object_id,
                created,
                metadata,
            };
            print_event(&fixture, &overrides)
        }
        Command::Sign {
            file,
            secret,
            timestamp,
        } => print_signature(&file, secret, timestamp),
    }
}

async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let stand_in = StandIn::spawn_on(addr).await?;
    println!("stripe stand-in listening on {}", stand_in.base_url());
    shutdown_signal().await?;
    drop(stand_in);
    Ok(())
}

#[cfg(unix)]
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    let mut terminate = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    tokio::select! {
        ctrl_c = tokio::signal::ctrl_c() => ctrl_c.context("listen for Ctrl-C"),
        _ = terminate.recv() => Ok(()),
    }
}

#[cfg(not(unix))]
async fn shutdown_signal() -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await.context("listen for Ctrl-C")
}

fn key_value(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .filter(|(key, _)| !key.is_empty())
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("{raw:?} is not KEY=VALUE"))
}

fn print_event(fixture: &Path, overrides: &EventOverrides) -> anyhow::Result<()> {
    let text = std::fs::read(fixture)
        .with_context(|| format!("read the fixture {}", fixture.display()))?;
    let parsed = serde_json::from_slice(&text)
        .with_context(|| format!("parse the fixture {} as JSON", fixture.display()))?;
    let event = event_from_fixture(&parsed, overrides)
        .with_context(|| format!("build an event from {}", fixture.display()))?;
    // Written as-is: these are the bytes that get signed, so no newline is added.
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&event)
        .context("write the event to stdout")?;
    stdout.flush().context("flush stdout")
}

fn print_signature(
    file: &Path,
    secret: Option<String>,
    timestamp: Option<i64>,
) -> anyhow::Result<()> {
    let payload =
        std::fs::read(file).with_context(|| format!("read the payload {}", file.display()))?;
    let secret = match secret {
        Some(secret) => secret,
        None => secret_from_env()?,
    };
    let timestamp = match timestamp {
        Some(timestamp) => timestamp,
        None => unix_now()?,
    };
    println!("{}", sign_payload(&secret, timestamp, &payload));
    Ok(())
}

/// The service accepts a comma-separated list for rotation; new events are signed with the first.
fn secret_from_env() -> anyhow::Result<String> {
    // var_os, not var: VarError would print a non-UTF-8 value, and this one is a secret.
    let secrets = std::env::var_os("STRIPE_WEBHOOK_SECRETS")
        .context("no signing secret: pass --secret or set STRIPE_WEBHOOK_SECRETS")?;
    let secrets = secrets
        .to_str()
        .context("STRIPE_WEBHOOK_SECRETS is not valid UTF-8")?;
    let first = secrets.split(',').next().unwrap_or_default().trim();
    anyhow::ensure!(
        !first.is_empty(),
        "the first entry of STRIPE_WEBHOOK_SECRETS is empty"
    );
    Ok(first.to_owned())
}

fn unix_now() -> anyhow::Result<i64> {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    i64::try_from(since_epoch.as_secs()).context("the system clock is out of range")
}
