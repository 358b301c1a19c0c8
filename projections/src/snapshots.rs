//! Before a rebuild's swap: waiting until no transaction holds a snapshot older than the
//! rebuilt copies, as `CREATE INDEX CONCURRENTLY` waits for old snapshots.
//!
//! Dropping a table and moving another into its place is not versioned by PostgreSQL: a
//! transaction that meets the swapped-in table reads it through its own snapshot, i.e. as
//! far as the build had filled it when that snapshot was taken. A REPEATABLE READ
//! transaction (an export in one transaction, `pg_dump`, a CDC tool's initial copy) that
//! began mid-build would read the new tables half-built, with fewer rows than the live ones
//! it read before. So once the copies hold every batch, the rebuild waits until every
//! snapshot taken before that has ended: a snapshot that meets the swapped-in tables then
//! sees them complete up to where the build stopped, short of only the swap's tail (which
//! the swap applies in its own transaction): a consistent prefix of the log.
//!
//! A snapshot is told by its session's `backend_xmin`: one taken before the copies' last
//! commit has its xmin below the next transaction id of that moment. Sessions at READ
//! COMMITTED hold a snapshot only while a statement runs, so only long statements and
//! REPEATABLE READ or SERIALIZABLE transactions are waited for.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::time::Instant;

/// How often the sessions are looked at again.
const POLL: Duration = Duration::from_millis(250);
/// How often the log says who is still waited for.
const REMIND: Duration = Duration::from_secs(30);

/// Sessions of this database (clients, and logical replication's senders, which export
/// snapshots; also those whose kind `pg_stat_activity` hides from a role without
/// `pg_read_all_stats`, as it shows their xmin) other than the caller's and the job's own
/// (named after its schema, `$2`)
/// whose snapshot is older than `$1`, a 32-bit transaction id: xids wrap around, so
/// "older" is PostgreSQL's own test, a negative 32-bit difference.
const OLD_SNAPSHOTS: &str = concat!(
    "SELECT pid, backend_start, xact_start, ",
    crate::session_application!(),
    " AS application, ",
    crate::session_client!(),
    " AS client, query_start, coalesce(state, '?') AS state, ",
    crate::session_query!(),
    " AS query \
     FROM pg_stat_activity a \
     WHERE datname = current_database() \
     AND (backend_type IN ('client backend', 'walsender') OR backend_type IS NULL) \
     AND pid <> pg_backend_pid() AND application_name IS DISTINCT FROM $2 \
     AND backend_xmin IS NOT NULL \
     AND ((backend_xmin::text::bigint - $1) % 4294967296 + 4294967296) % 4294967296 \
         >= 2147483648 \
     ORDER BY pid"
);

/// One session whose snapshot is older than the copies.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct OldSnapshot {
    pid: i32,
    backend_start: Option<DateTime<Utc>>,
    xact_start: Option<DateTime<Utc>>,
    application: String,
    client: String,
    query_start: Option<DateTime<Utc>>,
    state: String,
    query: String,
}

impl OldSnapshot {
    /// The same transaction as `other` (a pid is reused by a later session, and a session
    /// goes on to later transactions, whose snapshots are new).
    fn same_transaction(&self, other: &Self) -> bool {
        (self.pid, self.backend_start, self.xact_start)
            == (other.pid, other.backend_start, other.xact_start)
    }
}

/// The sessions waited for, as an operator finds them: pid, application, client, since
/// when, doing what.
fn describe(sessions: &[OldSnapshot]) -> String {
    let time = |t: Option<DateTime<Utc>>| {
        t.map_or("?".to_string(), |t| {
            t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
        })
    };
    sessions
        .iter()
        .map(|s| {
            format!(
                "pid {} ({}, from {}), in a transaction since {}, {} since {}: `{}`",
                s.pid,
                s.application,
                s.client,
                time(s.xact_start),
                s.state,
                time(s.query_start),
                s.query
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The sessions whose snapshots are older than `limit`, as [`OLD_SNAPSHOTS`] finds them.
async fn older(pool: &PgPool, limit: i64, schema: &str) -> sqlx::Result<Vec<OldSnapshot>> {
    sqlx::query_as(OLD_SNAPSHOTS)
        .bind(limit)
        // By value: a borrowed bind makes the rebuild's future one that cannot be sent to
        // another thread.
        .bind(schema.to_string())
        .fetch_all(pool)
        .await
}

/// How the wait ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Waited {
    /// No snapshot was older than the copies.
    NotAtAll,
    /// Some were; they have ended.
    Ended,
    /// Some were still open at the deadline: who they are.
    TimedOut(String),
}

/// Waits until no session but this job's (named `schema`) holds a snapshot taken before
/// now, or until `deadline`. Called once the copies hold every batch of the build.
pub(crate) async fn wait_for_older(
    pool: &PgPool,
    schema: &str,
    deadline: Instant,
) -> sqlx::Result<Waited> {
    // Every transaction that committed a batch of the copies has a smaller id than this.
    let limit: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
            .fetch_one(pool)
            .await?;
    let limit = limit % (1 << 32);
    // Only the transactions open now: a later one's snapshot sees the copies complete,
    // even when its xmin is held below the limit by a transaction older than the copies.
    let mut waited_for = older(pool, limit, schema).await?;
    if waited_for.is_empty() {
        return Ok(Waited::NotAtAll);
    }
    let started = Instant::now();
    tracing::warn!(
        sessions = %describe(&waited_for),
        gives_up_in_seconds = deadline.saturating_duration_since(started).as_secs_f64().round(),
        "waiting for transactions whose snapshots are older than the rebuilt tables: \
         swapped in now, the tables would look half-built to them"
    );
    let mut reminded = started;
    loop {
        if Instant::now() >= deadline {
            return Ok(Waited::TimedOut(describe(&waited_for)));
        }
        tokio::time::sleep(POLL).await;
        // As they are now (their statements move on), the same transactions only.
        waited_for = older(pool, limit, schema)
            .await?
            .into_iter()
            .filter(|now| waited_for.iter().any(|w| w.same_transaction(now)))
            .collect();
        if waited_for.is_empty() {
            tracing::info!(
                seconds = started.elapsed().as_secs(),
                "the older snapshots have ended; swapping"
            );
            return Ok(Waited::Ended);
        }
        if reminded.elapsed() >= REMIND {
            reminded = Instant::now();
            tracing::info!(
                sessions = %describe(&waited_for),
                seconds = started.elapsed().as_secs(),
                "still waiting for transactions whose snapshots are older than the rebuilt tables"
            );
        }
    }
}
