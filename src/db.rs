//! Database connection and migrations.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// The SQL migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a first connection is retried (a server still starting, say).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the attempt that looks for the cause may take (a host that drops packets
/// answers nothing until the system gives up, minutes later).
const CAUSE_TIMEOUT: Duration = Duration::from_secs(3);

/// The `application_name` of `serve`'s sessions (its writer's are
/// [`crate::ledger::writer::APPLICATION_NAME`]), so that an operator, and a rebuild's swap
/// naming who holds the live tables, can tell them apart.
pub const SERVE_APPLICATION_NAME: &str = "ledgerline-serve";

pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    connect_with(url, max_connections, |options| options).await
}

/// [`connect`], with each session's options as `tune` makes them from the URL's.
pub async fn connect_with(
    url: &str,
    max_connections: u32,
    tune: impl FnOnce(PgConnectOptions) -> PgConnectOptions,
) -> anyhow::Result<PgPool> {
    let context = || format!("connecting to the database at {}", redact_url(url));
    let connect_options = tune(url.parse::<PgConnectOptions>().with_context(context)?);
    let options = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT);
    match options.clone().connect_with(connect_options.clone()).await {
        // The pool retries until the timeout and then says only that it timed out: one
        // more attempt of our own names the cause (refused, no such host, ...).
        Err(sqlx::Error::PoolTimedOut) => {
            match tokio::time::timeout(CAUSE_TIMEOUT, connect_options.connect()).await {
                Ok(Err(cause)) => Err(anyhow::anyhow!(
                    "no connection within {} s; the last attempt: {cause}",
                    CONNECT_TIMEOUT.as_secs()
                )
                .context(context())),
                // Up by now: once more.
                Ok(Ok(conn)) => {
                    let _ = conn.close().await;
                    options
                        .connect_with(connect_options)
                        .await
                        .with_context(context)
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

/// A database URL with any password replaced, for messages and logs: the user's, and any
/// query parameter named like one (`password`, `sslpassword`), which libpq's URLs allow.
pub fn redact_url(raw: &str) -> String {
    const MASK: &str = "***";
    // Not a URL sqlx would take either; it could still hold a password anywhere.
    let Ok(mut url) = url::Url::parse(raw) else {
        return "(a URL that does not parse, not shown)".to_string();
    };
    if url.password().is_some() && url.set_password(Some(MASK)).is_err() {
        return "(a URL whose password cannot be masked, not shown)".to_string();
    }
    let secret = |key: &str| key.to_ascii_lowercase().contains("password");
    if url.query_pairs().any(|(key, _)| secret(&key)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let value = if secret(&key) { MASK.into() } else { value };
                (key.into_owned(), value.into_owned())
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_print() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
    }

    #[test]
    fn a_password_in_the_query_is_masked() {
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:5432/nonexistent_db?password=s3cretpw"),
            "postgres://postgres@127.0.0.1:5432/nonexistent_db?password=***"
        );
        assert_eq!(
            redact_url(
                "postgresql://app@db/x?sslmode=require&sslpassword=k3y&PassWord=s3cret&user=app"
            ),
            "postgresql://app@db/x?sslmode=require&sslpassword=***&PassWord=***&user=app"
        );
        // Without a user, and with the password percent-encoded.
        assert_eq!(
            redact_url("postgres://db/x?password=s%26cret%3D"),
            "postgres://db/x?password=***"
        );
    }

    #[test]
    fn an_at_sign_in_the_password_or_the_query_does_not_confuse_it() {
        // In the query: the userinfo ends at the host, not at the last '@'.
        let shown = redact_url("postgres://app:s3cret@db:5432/x?password=p@ss&options=a@b");
        assert_eq!(
            shown,
            "postgres://app:***@db:5432/x?password=***&options=a%40b"
        );
        // In the password, raw or encoded.
        for url in ["postgres://app:p@ss@db/x", "postgres://app:p%40ss@db/x"] {
            let shown = redact_url(url);
            assert_eq!(shown, "postgres://app:***@db/x", "{url}");
        }
        let shown = redact_url("postgres://app:p@ss@db/x?password=p@ss");
        assert!(
            !shown.contains("p@ss") && !shown.contains("p%40ss"),
            "{shown}"
        );
    }

    #[test]
    fn a_url_that_does_not_parse_is_not_shown() {
        let shown = redact_url("postgres://app:s3cret@db:notaport/x");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
