//! The Postgres pool and the embedded migrations.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use tokio::sync::watch;

use crate::config::Secret;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How often a mounted password file is read again.
const PASSWORD_POLL: Duration = Duration::from_secs(10);

/// Connections are replaced at least this often, so that none outlives the
/// short-lived credentials it was opened with by much.
const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// Where the pool's connection settings come from: `DATABASE_URL`, with its
/// password replaced by the content of `PAYMENTS_DATABASE_PASSWORD_FILE` when
/// that is set (Vault and Kubernetes rotate such files in place).
#[derive(Clone, Debug)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub password_file: Option<PathBuf>,
}

impl DatabaseSettings {
    fn base_options(&self) -> anyhow::Result<PgConnectOptions> {
        let options: PgConnectOptions = self.url.expose().parse().context("parse DATABASE_URL")?;
        Ok(options.application_name("payments"))
    }

    /// The options for new connections, with the password as the file has it now.
    fn current_options(&self) -> anyhow::Result<PgConnectOptions> {
        let options = self.base_options()?;
        match &self.password_file {
            Some(path) => Ok(options.password(&read_password(path)?)),
            None => Ok(options),
        }
    }
}

fn read_password(path: &Path) -> anyhow::Result<String> {
    let content = std::fs::read_to_string(path)
        .with_context(|| format!("read PAYMENTS_DATABASE_PASSWORD_FILE {}", path.display()))?;
    let password = content.trim_end_matches(['\n', '\r']);
    anyhow::ensure!(
        !password.is_empty(),
        "PAYMENTS_DATABASE_PASSWORD_FILE {} is empty",
        path.display()
    );
    Ok(password.to_owned())
}

/// Opens a pool without waiting for the server: the service starts, answers
/// `/readyz` with 503 and webhook deliveries with 503 until Postgres is back.
pub fn connect_lazy(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(16)
        // A request must fail fast with 503 rather than hang while Postgres is away.
        .acquire_timeout(Duration::from_secs(3))
        .max_lifetime(MAX_CONNECTION_LIFETIME)
        .connect_lazy_with(settings.current_options()?);
    Ok(pool)
}

pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let pool = connect_lazy(settings)?;
    pool.acquire().await.context("connect to Postgres")?;
    Ok(pool)
}

/// Re-reads the password file and, when it changed, gives new connections
/// the new password. Open connections keep theirs (Postgres does not ask
/// again) until they are recycled. Returns whether the password changed.
pub fn reload_password(
    pool: &PgPool,
    settings: &DatabaseSettings,
    last: &mut Option<String>,
) -> anyhow::Result<bool> {
    let Some(path) = &settings.password_file else {
        return Ok(false);
    };
    let password = read_password(path)?;
    if last.as_deref() == Some(password.as_str()) {
        return Ok(false);
    }
    pool.set_connect_options(settings.base_options()?.password(&password));
    *last = Some(password);
    Ok(true)
}

/// Polls the password file until shutdown. A file that cannot be read keeps
/// the last good password and is logged (without its content).
pub async fn watch_password(
    pool: PgPool,
    settings: DatabaseSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    if settings.password_file.is_none() {
        return;
    }
    let mut last = settings
        .password_file
        .as_deref()
        .and_then(|p| read_password(p).ok());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PASSWORD_POLL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        match reload_password(&pool, &settings, &mut last) {
            Ok(true) => tracing::info!("database password rotated; new connections use it"),
            Ok(false) => {}
            Err(err) => tracing::warn!(
                error = format!("{err:#}"),
                "database password file not reloaded"
            ),
        }
    }
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("apply migrations")
}

/// Runs one bounded purge statement: `sql` takes the retention in seconds
/// as `$1` and the batch size as `$2`, and clears what is older. Returns how
/// many rows it purged.
pub async fn purge_batch(
    pool: &PgPool,
    sql: &'static str,
    retention: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let purged = sqlx::query(sql)
        .bind(retention.as_secs_f64())
        .bind(batch)
        .execute(pool)
        .await?;
    Ok(purged.rows_affected())
}

/// True when the error means the database could not be reached (as opposed to
/// a query the database refused), so callers answer 503 and retry later.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => true,
        // 57P01..57P03: admin shutdown, crash shutdown, cannot connect now.
        // 08xxx: connection exceptions.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rotated_password_file_is_picked_up_and_a_broken_one_keeps_the_last() {
        let dir = std::env::temp_dir().join(format!("payments-db-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("password");
        std::fs::write(&path, "first\n").unwrap();
        let settings = DatabaseSettings {
            url: Secret::new("postgres://app@127.0.0.1:1/payments"),
            password_file: Some(path.clone()),
        };
        let pool = connect_lazy(&settings).unwrap();
        let mut last = Some("first".to_owned());

        assert!(!reload_password(&pool, &settings, &mut last).unwrap());
        std::fs::write(&path, "second\n").unwrap();
        assert!(reload_password(&pool, &settings, &mut last).unwrap());
        assert_eq!(last.as_deref(), Some("second"));
        std::fs::write(&path, "").unwrap();
        assert!(reload_password(&pool, &settings, &mut last).is_err());
        assert_eq!(last.as_deref(), Some("second"));
    }
}
