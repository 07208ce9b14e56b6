//! `payments clients …` and `payments admin …`: issuing and revoking
//! credentials. Each change is audited with the operating system user who ran
//! the command as its actor.

use anyhow::Context;
use clap::Subcommand;
use sqlx::PgPool;

use super::{api_keys, operators};

#[derive(Subcommand)]
pub enum ClientsCommand {
    /// Create an API client and print its key (shown this once).
    Create {
        name: String,
        /// A trap key: any use is refused and raised as a critical event.
        #[arg(long)]
        canary: bool,
    },
    /// List API clients (never their keys).
    List,
    /// Revoke a client's live key.
    Revoke { name: String },
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Issue an operator token for the admin API (printed this once).
    Token {
        #[arg(long)]
        operator: String,
        /// Optional lifetime, such as 8h or 30d.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Issue a time-bound emergency token; it stops working at its expiry.
    BreakGlass {
        #[arg(long)]
        operator: String,
        /// Lifetime, such as 30m or 2h (at most 12h).
        #[arg(long)]
        ttl: String,
        /// Why it is needed; kept in the audit trail.
        #[arg(long)]
        reason: String,
    },
    /// Revoke an operator or break-glass token by id, before its expiry.
    Revoke {
        id: i64,
        #[arg(long)]
        reason: String,
    },
    /// List admin tokens (never the tokens themselves).
    Tokens,
}

/// The actor of CLI changes: who ran the command.
///
/// The name comes from the environment (`USER`, `LOGNAME`), else the process's
/// numeric uid. It is what the operator's shell says, not a proof: whoever
/// runs the CLI holds `DATABASE_URL` already. Give each operator their own
/// database role to make the CLI actor something the database enforces.
pub fn cli_actor() -> String {
    let named = ["USER", "LOGNAME"]
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .find(|v| !v.trim().is_empty());
    match named {
        Some(user) => format!("cli:{}", user.trim()),
        None => format!(
            "cli:uid-{}",
            process_uid().unwrap_or_else(|| "unknown".to_owned())
        ),
    }
}

/// The real uid from `/proc/self/status`, where there is one.
fn process_uid() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1).map(str::to_owned)
}

pub async fn clients(pool: &PgPool, command: ClientsCommand) -> anyhow::Result<()> {
    match command {
        ClientsCommand::Create { name, canary } => {
            let key = api_keys::create(pool, &name, canary, &cli_actor())
                .await
                .with_context(|| format!("create API client {name}"))?;
            println!("{key}");
            eprintln!("API client {name} created. Store the key now: it is not shown again.");
        }
        ClientsCommand::List => println!(
            "{}",
            serde_json::to_string_pretty(&api_keys::list(pool).await?)?
        ),
        ClientsCommand::Revoke { name } => {
            if !api_keys::revoke(pool, &name, &cli_actor()).await? {
                anyhow::bail!("no live API client named {name}");
            }
            eprintln!("API client {name} revoked");
        }
    }
    Ok(())
}

pub async fn admin(pool: &PgPool, command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Token { operator, ttl } => {
            let ttl = ttl.as_deref().map(duration).transpose()?;
            let issued = operators::issue(pool, &operator, ttl, None, &cli_actor()).await?;
            println!("{}", serde_json::to_string_pretty(&issued)?);
        }
        AdminCommand::BreakGlass {
            operator,
            ttl,
            reason,
        } => {
            let reason = reason.trim();
            if reason.is_empty() {
                anyhow::bail!("--reason must say why break-glass access is needed");
            }
            let issued = operators::issue(
                pool,
                &operator,
                Some(duration(&ttl)?),
                Some(reason),
                &cli_actor(),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&issued)?);
        }
        AdminCommand::Revoke { id, reason } => {
            if !operators::revoke(pool, id, &reason, &cli_actor()).await? {
                anyhow::bail!("no live admin token with id {id}");
            }
            eprintln!("admin token {id} revoked");
        }
        AdminCommand::Tokens => println!(
            "{}",
            serde_json::to_string_pretty(&operators::list(pool).await?)?
        ),
    }
    Ok(())
}

fn duration(raw: &str) -> anyhow::Result<std::time::Duration> {
    operators::parse_duration(raw)
        .with_context(|| format!("{raw:?} is not a duration such as 30m, 4h or 1d"))
}
