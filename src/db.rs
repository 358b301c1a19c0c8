//! Database connection and migrations.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// The SQL migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a first connection is retried (a server still starting, say).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the attempt that looks for the cause may take (a host that drops packets
/// answers nothing until the system gives up, minutes later).
const CAUSE_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT);
    let context = || format!("connecting to the database at {}", redact_url(url));
    match options.clone().connect(url).await {
        // The pool retries until the timeout and then says only that it timed out: one
        // more attempt of our own names the cause (refused, no such host, ...).
        Err(sqlx::Error::PoolTimedOut) => {
            match tokio::time::timeout(CAUSE_TIMEOUT, PgConnection::connect(url)).await {
                Ok(Err(cause)) => Err(anyhow::anyhow!(
                    "no connection within {} s; the last attempt: {cause}",
                    CONNECT_TIMEOUT.as_secs()
                )
                .context(context())),
                // Up by now: once more.
                Ok(Ok(conn)) => {
                    let _ = conn.close().await;
                    options.connect(url).await.with_context(context)
                }
                Err(_) => Err(anyhow::anyhow!(
                    "no connection within {} s, and no answer to one more attempt",
                    CONNECT_TIMEOUT.as_secs()
                )
                .context(context())),
            }
        }
        pooled => pooled.with_context(context),
    }
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying migrations")
}

/// A database URL with any password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_print() {
        assert_eq!(
            super::redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            super::redact_url("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
    }
}
