//! Leases in the database, so that each background job (a projection, the log maintainer)
//! runs in one process at a time when several `ledgerline serve` processes share a database.
//!
//! Every statement takes its times from the database's clock (`now()`), so the processes'
//! clocks never have to agree. A holder counts its lease from the moment it *sent* the
//! statement that took or renewed it: the database set the expiry later than that, so the
//! holder's own reckoning always ends first, and it stops work before anyone else may start.
//! Work that must not overlap also checks the lease in its own transaction ([`fence`]),
//! which holds the row so the lease cannot change hands until that transaction ends.

use std::time::{Duration, Instant};

use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use uuid::Uuid;

use crate::notify::LEASE_CHANNEL;

/// The default time a lease lasts without renewal.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// How long a transaction that holds what other processes wait for (a lease row, the
/// ledger's append lock) may sit idle before the server ends it. Such a transaction idles
/// only while its process is frozen or cut off, and without a limit its locks would hold
/// every other process back until TCP gives up on the connection (hours): no lease could
/// change hands, no command append. Between two statements of a live process there is
/// milliseconds of work.
pub const STALLED_TRANSACTION_LIMIT: &str = "10s";

/// Who holds leases in this process, and for how long each lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// `hostname:pid:random`: tells processes apart, and two starts of one process too.
    pub holder: String,
    pub ttl: Duration,
}

impl LeaseConfig {
    pub fn new(ttl: Duration) -> Self {
        Self {
            holder: holder_id(),
            ttl,
        }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self::new(DEFAULT_TTL)
    }
}

/// What a leased task needs: who it is, and a signal that bumps whenever a lease is
/// released anywhere (so waiting processes try at once instead of at their next turn).
#[derive(Debug, Clone)]
pub struct Leasing {
    pub config: LeaseConfig,
    pub released: watch::Receiver<u64>,
}

impl Leasing {
    /// Leasing with no release signal: waiting tasks only try at their own turn.
    pub fn standalone(config: LeaseConfig) -> Self {
        let (_, released) = watch::channel(0);
        Self { config, released }
    }
}

/// This process's holder id: `hostname:pid:random`.
pub fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let random = Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &random[..8])
}

/// Takes the lease `name` for `ttl` if it is free, expired or already `holder`'s (then it
/// is extended). True if `holder` holds it now.
pub async fn acquire(pool: &PgPool, name: &str, holder: &str, ttl: Duration) -> sqlx::Result<bool> {
    let row: Option<(String,)> = sqlx::query_as(
        "INSERT INTO leases AS l (name, holder, acquired_at, expires_at) \
         VALUES ($1, $2, now(), now() + make_interval(secs => $3)) \
         ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, \
             acquired_at = CASE WHEN l.holder = EXCLUDED.holder THEN l.acquired_at ELSE now() END, \
             expires_at = EXCLUDED.expires_at \
         WHERE l.holder = EXCLUDED.holder OR l.expires_at <= now() \
         RETURNING l.holder",
    )
    .bind(name)
    .bind(holder)
    .bind(ttl.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(row.is_some())
}

/// Extends `holder`'s lease by `ttl` from now. False if it had expired or is someone else's.
pub async fn renew(pool: &PgPool, name: &str, holder: &str, ttl: Duration) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE leases SET expires_at = now() + make_interval(secs => $3) \
         WHERE name = $1 AND holder = $2 AND expires_at > now()",
    )
    .bind(name)
    .bind(holder)
    .bind(ttl.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives the lease up, and tells waiting processes so one takes it at once. False if it
/// was not `holder`'s.
pub async fn release(pool: &PgPool, name: &str, holder: &str) -> sqlx::Result<bool> {
    let released: Option<(String,)> = sqlx::query_as(
        "WITH gone AS (DELETE FROM leases WHERE name = $1 AND holder = $2 RETURNING name) \
         SELECT name FROM gone, LATERAL (SELECT pg_notify($3, gone.name)) AS n",
    )
    .bind(name)
    .bind(holder)
    .bind(LEASE_CHANNEL)
    .fetch_optional(pool)
    .await?;
    Ok(released.is_some())
}

/// One lease as the `leases` table has it now, for `projections status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct LeaseHolder {
    /// `projection:<name>` or `log-maintainer`.
    pub name: String,
    /// `hostname:pid:random` of the process holding it.
    pub holder: String,
    /// Milliseconds until it expires unless renewed, by the database's clock; negative once
    /// expired (free for another process to take; a killed holder's row stays until then).
    pub expires_in_ms: i64,
}

/// Every lease row, by name.
pub async fn holders(pool: &PgPool) -> sqlx::Result<Vec<LeaseHolder>> {
    sqlx::query_as(
        "SELECT name, holder, \
         (extract(epoch FROM expires_at - now()) * 1000)::bigint AS expires_in_ms \
         FROM leases ORDER BY name",
    )
    .fetch_all(pool)
    .await
}

/// Ends the current transaction if it idles past [`STALLED_TRANSACTION_LIMIT`]: for a
/// transaction that holds what a lease holder, the projector or the API needs (a swap, a
/// check's comparison, a signing under the maintainer's lease, a claims repair's hold of the
/// append lock), which a frozen process would otherwise hold until TCP gives up.
///
/// A `SET`, not a `SELECT set_config(..)`: it takes no snapshot, so a `REPEATABLE READ`
/// transaction may set it before the locks its snapshot must come after.
pub async fn idle_limit(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query(&format!(
        "SET LOCAL idle_in_transaction_session_timeout = '{STALLED_TRANSACTION_LIMIT}'"
    ))
    .execute(conn)
    .await?;
    Ok(())
}

/// In a transaction: true if `holder` holds `name` at this moment. The row stays locked
/// until the transaction ends, so nobody can take the lease over while the work it covers
/// is uncommitted: if the lease runs out meanwhile, the taker waits for the commit.
pub async fn fence(conn: &mut PgConnection, name: &str, holder: &str) -> sqlx::Result<bool> {
    let row: Option<(i32,)> = sqlx::query_as(
        "SELECT 1 FROM leases WHERE name = $1 AND holder = $2 \
         AND expires_at > clock_timestamp() FOR SHARE",
    )
    .bind(name)
    .bind(holder)
    .fetch_optional(conn)
    .await?;
    Ok(row.is_some())
}

/// One lease as a task keeps it: taken when free, renewed every third of its TTL, and
/// counted as held only until its TTL (less a margin) after the last successful renewal
/// was sent.
#[derive(Debug)]
pub struct Lease {
    name: String,
    config: LeaseConfig,
    valid_until: Option<Instant>,
    next_attempt: Instant,
}

impl Lease {
    pub fn new(name: impl Into<String>, config: LeaseConfig) -> Self {
        Self {
            name: name.into(),
            config,
            valid_until: None,
            next_attempt: Instant::now(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn holder(&self) -> &str {
        &self.config.holder
    }

    /// Whether work may start now: the lease is ours for at least another tenth of its TTL.
    pub fn held(&self) -> bool {
        self.valid_until
            .is_some_and(|until| Instant::now() + self.config.ttl / 10 < until)
    }

    /// When [`Lease::keep`] has something to do next (renew, or try to take the lease).
    pub fn due(&self) -> Instant {
        self.next_attempt
    }

    /// Makes the next [`Lease::keep`] try at once (a lease was released somewhere).
    pub fn try_now(&mut self) {
        self.next_attempt = Instant::now();
    }

    /// The lease turned out not to be ours (a fenced transaction said so).
    pub fn lost(&mut self) {
        if self.valid_until.take().is_some() {
            tracing::warn!(lease = %self.name, holder = %self.config.holder, "lease lost");
        }
        self.next_attempt = Instant::now() + self.config.ttl / 3;
    }

    /// Renews the lease, or tries to take it, when due. Returns [`Lease::held`].
    pub async fn keep(&mut self, pool: &PgPool) -> bool {
        let sent = Instant::now();
        if sent < self.next_attempt {
            return self.held();
        }
        let (name, holder, ttl) = (&self.name, &self.config.holder, self.config.ttl);
        let outcome = if self.valid_until.is_some() {
            renew(pool, name, holder, ttl).await
        } else {
            acquire(pool, name, holder, ttl).await
        };
        match outcome {
            Ok(true) => {
                if self.valid_until.is_none() {
                    tracing::info!(lease = %name, holder = %holder, "lease acquired");
                }
                self.valid_until = Some(sent + ttl);
                self.next_attempt = sent + ttl / 3;
            }
            Ok(false) => {
                if self.valid_until.take().is_some() {
                    tracing::warn!(lease = %name, holder = %holder, "lease could not be renewed; stopping its work");
                }
                self.next_attempt = Instant::now() + ttl / 3;
            }
            Err(e) => {
                // The lease may still be ours until `valid_until`: keep it and try again
                // soon; `held` turns false in time if the database stays out of reach.
                tracing::warn!(lease = %name, error = %e, "lease renewal failed; will retry");
                self.next_attempt = Instant::now() + (ttl / 10).max(Duration::from_millis(100));
            }
        }
        self.held()
    }

    /// Gives the lease up if held, so another process can take it at once.
    pub async fn release(&mut self, pool: &PgPool) {
        if self.valid_until.take().is_none() {
            return;
        }
        match release(pool, &self.name, &self.config.holder).await {
            Ok(_) => tracing::info!(lease = %self.name, "lease released"),
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "lease release failed; it expires on its own")
            }
        }
    }
}
