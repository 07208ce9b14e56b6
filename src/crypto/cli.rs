//! `payments keys`: KEK rotation for operators. Prints ids and counts, never
//! key material.

use anyhow::Context;
use clap::Subcommand;

use super::{Keyring, rewrap, status};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Re-wrap every data key under the active key-encryption key (the first
    /// in PAYMENTS_KEK_FILE), so older ones can then leave the file. Exits
    /// non-zero when a data key could not be re-wrapped.
    Rewrap,
    /// Show the key-encryption keys in PAYMENTS_KEK_FILE and how many data
    /// keys each one wraps (JSON).
    Status,
}

pub async fn keys(keyring: &Keyring, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Rewrap => {
            let report = rewrap(keyring).await.context("re-wrap data keys")?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.failed.is_empty() {
                anyhow::bail!(
                    "{} data keys could not be re-wrapped and stay under their old key",
                    report.failed.len()
                );
            }
            Ok(())
        }
        KeysCommand::Status => {
            let status = status(keyring).await.context("read data keys")?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(())
        }
    }
}
