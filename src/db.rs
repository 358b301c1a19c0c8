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
/// The `application_name` of `projections rebuild`'s sessions (its lock's among them; those
/// working on its shadow schema carry the schema's name).
pub const REBUILD_APPLICATION_NAME: &str = "ledgerline-rebuild";
/// The `application_name` of `projections check`'s sessions (those building its scratch
/// schema carry the schema's name).
pub const CHECK_APPLICATION_NAME: &str = "ledgerline-check";
/// The `application_name` of `platform-key`'s sessions.
pub const PLATFORM_KEY_APPLICATION_NAME: &str = "ledgerline-platform-key";
/// The `application_name` of `claims check`'s sessions.
pub const CLAIMS_CHECK_APPLICATION_NAME: &str = "ledgerline-claims-check";

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
    check_url(url).with_context(context)?;
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

/// sqlx's PostgreSQL driver takes any scheme (`mysql://x@host/db` connects to PostgreSQL
/// on the default port as role `x`), so a URL meant for another database would fail later
/// with a message about roles or databases rather than about the URL. And it ignores a query
/// parameter it does not know, logging its value.
fn check_url(url: &str) -> anyhow::Result<()> {
    // One that does not parse is left to sqlx, which says why.
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    anyhow::ensure!(
        matches!(parsed.scheme(), "postgres" | "postgresql"),
        "`{}:` is not a PostgreSQL URL: ledgerline runs on PostgreSQL only, with a URL \
         such as postgres://user@127.0.0.1:5432/ledgerline",
        parsed.scheme()
    );
    // sqlx ignores any other parameter, and logs its value as it does: a libpq parameter
    // such as `sslpassword` would neither work nor stay secret.
    if let Some((key, _)) = parsed.query_pairs().find(|(key, _)| !driver_parameter(key)) {
        anyhow::bail!(
            "the URL's parameter `{key}` is not one the PostgreSQL driver takes (sslmode, \
             sslrootcert, sslcert, sslkey, host, hostaddr, port, dbname, user, password, \
             application_name, options, statement-cache-capacity): it would be ignored"
        );
    }
    Ok(())
}

/// Whether sqlx-postgres 0.8 reads query parameter `key` of a URL (`options/parse.rs`).
fn driver_parameter(key: &str) -> bool {
    matches!(
        key,
        "sslmode"
            | "ssl-mode"
            | "sslrootcert"
            | "ssl-root-cert"
            | "ssl-ca"
            | "sslcert"
            | "ssl-cert"
            | "sslkey"
            | "ssl-key"
            | "statement-cache-capacity"
            | "host"
            | "hostaddr"
            | "port"
            | "dbname"
            | "user"
            | "password"
            | "application_name"
            | "options"
    ) || (key.starts_with("options[") && key.ends_with(']'))
}

/// Applies this binary's migrations the database does not have yet; returns how many.
/// Refuses, applying none, a database whose applied migrations this binary cannot account
/// for (a newer release's, changed ones, one that failed part-way), saying which, in the
/// words `projections rebuild` and `check` use (sqlx would name only the first, as
/// "previously applied but is missing in the resolved migrations").
pub async fn migrate(pool: &PgPool) -> anyhow::Result<usize> {
    let mismatch = MigrationMismatch::read(pool)
        .await
        .context("reading the database's migrations")?;
    let conflicts = mismatch.conflicts();
    if !conflicts.is_empty() {
        anyhow::bail!(
            "the database's migrations are not this binary's: {}; nothing was migrated{}",
            conflicts.join("; "),
            if mismatch.unknown.is_empty() {
                ""
            } else {
                " (run the release that applied them, or a newer one)"
            }
        );
    }
    MIGRATOR.run(pool).await.context("applying migrations")?;
    Ok(mismatch.not_applied.len())
}

/// How the migrations applied to a database differ from the ones this binary carries, each
/// named by version and description.
#[derive(Debug, Default)]
pub struct MigrationMismatch {
    /// This binary's migrations the database does not have: `migrate` applies them.
    pub not_applied: Vec<String>,
    /// Applied migrations this binary does not carry (a newer release's).
    pub unknown: Vec<String>,
    /// Applied migrations whose SQL is not this binary's.
    pub changed: Vec<String>,
    /// Migrations that failed part-way.
    pub failed: Vec<String>,
}

impl MigrationMismatch {
    pub async fn read(pool: &PgPool) -> sqlx::Result<Self> {
        let recorded: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(pool)
                .await?;
        // version, description, checksum, success: as `_sqlx_migrations` records them.
        type Applied = (i64, String, Vec<u8>, bool);
        let applied: Vec<Applied> = if recorded {
            sqlx::query_as(
                "SELECT version, description, checksum, success FROM _sqlx_migrations \
                 ORDER BY version",
            )
            .fetch_all(pool)
            .await?
        } else {
            Vec::new()
        };
        let known: Vec<&sqlx::migrate::Migration> = MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .collect();
        // The applied migrations that `wrong` picks, by version and description.
        let applied_where = |wrong: &dyn Fn(&Applied) -> bool| -> Vec<String> {
            applied
                .iter()
                .filter(|a| wrong(a))
                .map(|(v, description, ..)| format!("{v} ({description})"))
                .collect()
        };
        Ok(Self {
            not_applied: known
                .iter()
                .filter(|m| applied.iter().all(|(v, ..)| *v != m.version))
                .map(|m| format!("{} ({})", m.version, m.description))
                .collect(),
            unknown: applied_where(&|(v, ..)| known.iter().all(|m| m.version != *v)),
            changed: applied_where(&|(v, _, checksum, _)| {
                known
                    .iter()
                    .any(|m| m.version == *v && *m.checksum != **checksum)
            }),
            failed: applied_where(&|(.., success)| !success),
        })
    }

    /// Every difference, one entry per kind; empty when the migrations are the same.
    pub fn all(&self) -> Vec<String> {
        Self::entries([
            ("not applied", &self.not_applied),
            (UNKNOWN, &self.unknown),
            (CHANGED, &self.changed),
            (FAILED, &self.failed),
        ])
    }

    /// The differences that applying this binary's migrations cannot mend.
    pub fn conflicts(&self) -> Vec<String> {
        Self::entries([
            (UNKNOWN, &self.unknown),
            (CHANGED, &self.changed),
            (FAILED, &self.failed),
        ])
    }

    /// The differences that can leave out a table or column this binary's migrations make:
    /// migrations not applied, or failed part-way.
    pub fn incomplete(&self) -> Vec<String> {
        Self::entries([("not applied", &self.not_applied), (FAILED, &self.failed)])
    }

    fn entries<const N: usize>(kinds: [(&str, &Vec<String>); N]) -> Vec<String> {
        kinds
            .into_iter()
            .filter(|(_, items)| !items.is_empty())
            .map(|(what, items)| format!("{what}: {}", items.join(", ")))
            .collect()
    }
}

const UNKNOWN: &str = "applied but unknown to this binary (a newer one's?)";
const CHANGED: &str = "applied with other SQL than this binary's";
const FAILED: &str = "failed part-way";

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
    use super::{check_url, redact_url};

    #[test]
    fn only_postgres_urls_are_taken() {
        for url in [
            "postgres://app@db/x",
            "postgresql://app@db/x",
            // Left to sqlx, which says why it does not parse.
            "postgres://app:s3cret@db:notaport/x",
        ] {
            assert!(check_url(url).is_ok(), "{url}");
        }
        for url in ["mysql://x@127.0.0.1/db", "http://127.0.0.1/db"] {
            let said = check_url(url).unwrap_err().to_string();
            assert!(said.contains("is not a PostgreSQL URL"), "{url}: {said}");
        }
        // What the driver would ignore, naming the parameter but never its value.
        let said = check_url("postgresql://app@db/x?sslmode=require&sslpassword=k3y")
            .unwrap_err()
            .to_string();
        assert!(said.contains("`sslpassword` is not one"), "{said}");
        assert!(!said.contains("k3y"), "{said}");
        assert!(check_url("postgres://app@db/x?PassWord=s3cret").is_err());
        assert!(check_url(
            "postgres://app@db/x?sslmode=disable&application_name=a&options[search_path]=b&port=5"
        )
        .is_ok());
    }

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
