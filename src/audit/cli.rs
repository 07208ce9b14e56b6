//! `payments audit …`: check the hash chain, and see how far each SIEM sink
//! has got.

use clap::Subcommand;
use sqlx::PgPool;

use crate::audit::{chain, export};

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recompute the hash chain; exits non-zero and names the first record
    /// altered, removed or reordered when it is broken.
    Verify,
    /// Show each SIEM sink's cursor, lag, last error and whether a replica
    /// exports to it now.
    ExportStatus {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub async fn audit(pool: &PgPool, command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify => verify(pool).await,
        AuditCommand::ExportStatus { json } => export_status(pool, json).await,
    }
}

async fn verify(pool: &PgPool) -> anyhow::Result<()> {
    let verdict = chain::verify(pool).await?;
    if let chain::Verdict::Intact { .. } = verdict {
        println!("{verdict}");
        return Ok(());
    }
    anyhow::bail!("{verdict}")
}

async fn export_status(pool: &PgPool, json: bool) -> anyhow::Result<()> {
    let sinks = export::export_status(pool).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&sinks)?);
        return Ok(());
    }
    println!(
        "{:<16}  {:>10}  {:>10}  {:>10}  {:>9}  {:<9}  {:<20}  LAST ERROR",
        "SINK", "SENT", "SEALED", "LAG", "LAG (S)", "EXPORTING", "UPDATED"
    );
    for s in &sinks {
        println!(
            "{:<16}  {:>10}  {:>10}  {:>10}  {:>9.1}  {:<9}  {:<20}  {}",
            s.sink,
            s.last_seq,
            s.head,
            s.lag_records,
            s.lag_seconds,
            if s.exporting { "yes" } else { "no" },
            s.updated_at.format("%Y-%m-%d %H:%M:%S"),
            s.last_error.as_deref().unwrap_or("-")
        );
    }
    if sinks.is_empty() {
        println!("(no sink has exported yet; set PAYMENTS_AUDIT_SINKS)");
    }
    Ok(())
}
