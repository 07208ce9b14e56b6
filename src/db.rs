//! The Postgres pool and the embedded migrations.

use std::time::Duration;

use anyhow::Context;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::Secret;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a pool without waiting for the server: the service starts, answers
/// `/readyz` with 503 and webhook deliveries with 503 until Postgres is back.
pub fn connect_lazy(database_url: &Secret) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = database_url
        .expose()
        .parse()
        .context("parse DATABASE_URL")?;
    let pool = PgPoolOptions::new()
        .max_connections(16)
        // A request must fail fast with 503 rather than hang while Postgres is away.
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy_with(options.application_name("payments"));
    Ok(pool)
}

pub async fn connect(database_url: &Secret) -> anyhow::Result<PgPool> {
    let pool = connect_lazy(database_url)?;
    pool.acquire().await.context("connect to Postgres")?;
    Ok(pool)
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("apply migrations")
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
