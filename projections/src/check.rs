//! `projections check`: rebuild into a scratch schema and compare with the live tables row
//! by row, at the very positions the live tables are at, so that a difference is drift
//! (a projection bug since fixed, a hand edit, a lost write) and never lag.
//!
//! The scratch schema is built up to each projection's live checkpoint as it was when the
//! check started; the comparison then runs in one REPEATABLE READ transaction that reads
//! the checkpoints again, applies the few events the live side moved on by meanwhile, and
//! compares, all in the same snapshot as the live tables it reads. Nothing live is locked.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::{Connection, PgConnection, PgPool};

use crate::build::{self, Lane, Phase, Progress, Record};
use crate::rebuild::resolve;
use crate::run_lock::{self, LockWatch};
use crate::{Projection, RunError, StoredEvent, STORED_EVENT_COLUMNS};

/// Advisory lock class of running checks: a check holds one on its scratch schema's name,
/// so that the next check can tell an abandoned scratch schema (a killed check) from a
/// running one.
const CHECK_LOCK_CLASS: i32 = 0x6c6c_6368;
/// Rows shown per table and side; the counts cover all of them.
const SHOWN: i64 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub projections: Vec<CheckedProjection>,
    /// The log's head in the comparison's snapshot.
    pub head: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckedProjection {
    pub name: &'static str,
    /// The position both sides were compared at.
    pub position: i64,
    /// The position of the event the live projection is stopped at on a failure, if it is:
    /// its tables are compared at its checkpoint, short of that event, and equal tables do
    /// not say it is running.
    pub stopped_at: Option<i64>,
    pub tables: Vec<CheckedTable>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckedTable {
    pub table: &'static str,
    pub live_rows: i64,
    pub rebuilt_rows: i64,
    /// Rows the rebuild has and the live table lacks (counting duplicates).
    pub missing_from_live: i64,
    /// Rows the live table has and the rebuild lacks.
    pub unexpected_in_live: i64,
    /// Up to 10 rows of each kind, as JSON.
    pub missing_rows: Vec<String>,
    pub unexpected_rows: Vec<String>,
}

impl CheckedTable {
    pub fn equal(&self) -> bool {
        self.missing_from_live == 0 && self.unexpected_in_live == 0
    }
}

impl CheckReport {
    pub fn equal(&self) -> bool {
        self.projections
            .iter()
            .all(|p| p.tables.iter().all(CheckedTable::equal))
    }
}

/// Rebuilds the named projections (all if `None`) into a scratch schema and compares them
/// with the live tables. The scratch schema is dropped afterwards.
pub async fn check(
    pool: &PgPool,
    names: Option<&[&str]>,
    batch_size: i64,
    stall_limit: Duration,
    progress: &Arc<Progress>,
) -> Result<CheckReport, RunError> {
    let projections = resolve(names)?;
    let schema = format!("ledgerline_check_{}", uuid::Uuid::new_v4().simple());
    let mut lock = run_lock::connect(pool).await?;
    drop_abandoned_scratch(&mut lock).await?;
    sqlx::query("SELECT pg_advisory_lock($1, hashtext($2))")
        .bind(CHECK_LOCK_CLASS)
        .bind(&schema)
        .execute(&mut lock)
        .await?;
    let mut tx = lock.begin().await?;
    build::create_schema(&mut tx, &schema, &projections).await?;
    // A check is read-only: replayed erasures and deletions destroy no live key and forget
    // no kept answer.
    build::create_stand_ins(&mut tx, &schema).await?;
    tx.commit().await?;
    // Without its lock, the next check would take the scratch schema for a killed check's
    // and drop it under this one (see `run_lock`).
    let watch = LockWatch::start(lock).await?;
    let lock_lost = |cause: String| RunError::LockLost {
        run: "check",
        cause,
        next: "nothing live was changed; run `ledgerline projections check` again".to_string(),
    };
    let checked = async {
        let built = tokio::select! {
            built = build_scratch(pool, &schema, &projections, batch_size, stall_limit, progress) => built,
            cause = watch.lost() => Err(lock_lost(cause)),
        };
        let started = built?;
        progress.set_phase(Phase::Comparing);
        compare(
            pool,
            &schema,
            projections.as_slice(),
            &started,
            watch.pid(),
            &lock_lost,
        )
        .await
    };
    let result = checked.await;
    match (result, watch.stop().await) {
        (result, Ok(mut lock)) => {
            // The verdict is what the operator ran this for: a failed clean-up is a
            // warning, not the answer.
            let dropped = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .execute(&mut lock)
                .await;
            if let Err(e) = dropped {
                tracing::warn!(schema, error = %e, "the check's scratch schema could not be dropped; `projections check` drops it at its next run");
            }
            lock.close().await.ok();
            result
        }
        (result, Err(cause)) => {
            tracing::warn!(schema, "the check's scratch schema is left for the next check to drop, as its lock was lost");
            match result {
                // The comparison had the lock in its own transaction.
                Ok(report) => Ok(report),
                Err(e @ RunError::LockLost { .. }) => Err(e),
                Err(e) => Err(lock_lost(format!(
                    "{cause}; the check had failed with: {e}"
                ))),
            }
        }
    }
}

/// At most about this many events per projection are left for the comparison to apply in
/// its one transaction, which holds the live tables and reads its tail at once: until then
/// the build catches up with the live checkpoints without locks.
const COMPARE_TAIL: i64 = 2_000;

/// Builds the scratch copies up to each projection's live checkpoint, again while a live
/// projection moved on by more than [`COMPARE_TAIL`] meanwhile (one catching up fast, say);
/// returns the checkpoints the copies reached.
async fn build_scratch(
    pool: &PgPool,
    schema: &str,
    projections: &[Projection],
    batch_size: i64,
    stall_limit: Duration,
    progress: &Arc<Progress>,
) -> Result<Vec<(Projection, i64)>, RunError> {
    let close = |(&(_, from), &(_, to)): (&(Projection, i64), &(Projection, i64))| {
        to - from <= COMPARE_TAIL
    };
    let mut built: Vec<(Projection, i64)> = projections.iter().map(|&p| (p, 0)).collect();
    for round in 0..build::CATCH_UP_ROUNDS {
        let live = live_checkpoints(pool, projections).await?;
        if round > 0 && built.iter().zip(&live).all(close) {
            break;
        }
        // A checkpoint that went back (a reset) is left for the comparison to name.
        let lanes: Vec<Lane> = built
            .iter()
            .zip(&live)
            .map(|(&(projection, from), &(_, to))| Lane {
                projection,
                from,
                to: to.max(from),
            })
            .collect();
        progress.start(&lanes);
        build::build(
            pool,
            schema,
            &lanes,
            batch_size,
            Record::Nowhere,
            progress,
            stall_limit,
        )
        .await?;
        built = lanes.iter().map(|l| (l.projection, l.to)).collect();
    }
    Ok(built)
}

/// Compares the copies built up to `started` with the live tables, in one snapshot, after
/// applying the events the live side took since. Only while the session `lock_pid` holds
/// the check's lock.
async fn compare(
    pool: &PgPool,
    schema: &str,
    projections: &[Projection],
    started: &[(Projection, i64)],
    lock_pid: i32,
    lock_lost: &impl Fn(String) -> RunError,
) -> Result<CheckReport, RunError> {
    let mut conn = build::schema_connection(pool, schema).await?;
    let mut tx = conn.begin().await?;
    // One snapshot for the checkpoints, the tail of the log and the live tables. The table
    // locks come first (they take no snapshot): a rebuild's swap then either finishes before
    // the snapshot is taken or waits until the comparison is done, and never replaces a
    // table under it.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    // It holds the live tables (against a swap, or a migration that every reader would
    // then queue behind): a frozen operator process must not hold them for long. A `SET`:
    // no snapshot yet either (one taken here saw a table swapped in meanwhile empty).
    crate::lease::idle_limit(&mut tx).await?;
    // The copies too: once the lock is seen held below, a next check that finds it gone
    // cannot drop them under this comparison (whose unqualified names would then fall
    // through to the live tables).
    let tables: Vec<String> = Projection::tables_of(projections)
        .iter()
        .flat_map(|t| [format!("public.{t}"), format!("{schema}.{t}")])
        .collect();
    sqlx::query(&format!(
        "LOCK TABLE {} IN ACCESS SHARE MODE",
        tables.join(", ")
    ))
    .execute(&mut *tx)
    .await?;
    if !lock_held_by(&mut tx, schema, lock_pid).await? {
        return Err(lock_lost(format!(
            "session {lock_pid} no longer holds it at the comparison"
        )));
    }
    let now = live_checkpoints(&mut *tx, projections).await?;
    let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0)::bigint FROM events")
        .fetch_one(&mut *tx)
        .await?;
    let stopped: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, min(position) FROM projection_failures GROUP BY name")
            .fetch_all(&mut *tx)
            .await?;
    let mut report = CheckReport {
        projections: Vec::new(),
        head,
    };
    for ((projection, before), (_, position)) in started.iter().zip(&now) {
        if position < before {
            return Err(RunError::MovedBack {
                name: projection.name(),
                from: *before,
                to: *position,
            });
        }
        let tail: Vec<StoredEvent> = sqlx::query_as(&format!(
            "SELECT {STORED_EVENT_COLUMNS} FROM events WHERE position > $1 AND position <= $2 \
             ORDER BY position"
        ))
        .bind(before)
        .bind(position)
        .fetch_all(&mut *tx)
        .await?;
        build::apply_final(&mut tx, *projection, &tail).await?;
        let mut tables = Vec::new();
        for &table in projection.tables() {
            tables.push(compare_table(&mut tx, schema, table).await?);
        }
        report.projections.push(CheckedProjection {
            name: projection.name(),
            position: *position,
            stopped_at: stopped
                .iter()
                .find(|(n, _)| n == projection.name())
                .map(|(_, p)| *p),
            tables,
        });
    }
    tx.rollback().await?;
    conn.close().await?;
    Ok(report)
}

/// Whether the session `pid` holds the lock of the check of `schema` now.
async fn lock_held_by(conn: &mut PgConnection, schema: &str, pid: i32) -> sqlx::Result<bool> {
    // A lock on two int4 keys shows them in `classid` and `objid`, with `objsubid` 2.
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND pid = $3 AND classid = $1::oid AND objid = hashtext($2)::oid AND objsubid = 2 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
    )
    .bind(CHECK_LOCK_CLASS)
    .bind(schema)
    .bind(pid)
    .fetch_one(conn)
    .await
}

/// Each projection's live checkpoint (0 for one that never ran).
async fn live_checkpoints<'c, E>(
    executor: E,
    projections: &[Projection],
) -> sqlx::Result<Vec<(Projection, i64)>>
where
    E: sqlx::PgExecutor<'c>,
{
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, position FROM projection_checkpoints")
            .fetch_all(executor)
            .await?;
    Ok(projections
        .iter()
        .map(|&p| {
            let position = rows
                .iter()
                .find(|(n, _)| n == p.name())
                .map_or(0, |(_, pos)| *pos);
            (p, position)
        })
        .collect())
}

async fn compare_table(
    conn: &mut PgConnection,
    schema: &str,
    table: &'static str,
) -> sqlx::Result<CheckedTable> {
    let live = format!("public.{table}");
    let rebuilt = format!("{schema}.{table}");
    let (live_rows, rebuilt_rows): (i64, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM {live}), (SELECT count(*) FROM {rebuilt})"
    ))
    .fetch_one(&mut *conn)
    .await?;
    let (missing_from_live, missing_rows) = difference(conn, &rebuilt, &live).await?;
    let (unexpected_in_live, unexpected_rows) = difference(conn, &live, &rebuilt).await?;
    Ok(CheckedTable {
        table,
        live_rows,
        rebuilt_rows,
        missing_from_live,
        unexpected_in_live,
        missing_rows,
        unexpected_rows,
    })
}

/// Rows of `a` not in `b` (as multisets): how many, and the first few as JSON.
async fn difference(conn: &mut PgConnection, a: &str, b: &str) -> sqlx::Result<(i64, Vec<String>)> {
    let rows: Vec<(i64, String)> = sqlx::query_as(&format!(
        "WITH d AS (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) \
         SELECT count(*) OVER (), row_to_json(d)::text FROM d ORDER BY 2 LIMIT {SHOWN}"
    ))
    .fetch_all(conn)
    .await?;
    Ok((
        rows.first().map_or(0, |(n, _)| *n),
        rows.into_iter().map(|(_, row)| row).collect(),
    ))
}

/// Drops scratch schemas whose check no longer holds its lock (it was killed). Only names a
/// check makes (`ledgerline_check_` and a simple UUID) are taken: the name is put into a
/// `DROP SCHEMA`, and a role that may create schemas could otherwise name one
/// `"ledgerline_check_x, public"`.
async fn drop_abandoned_scratch(conn: &mut PgConnection) -> Result<(), RunError> {
    let schemas: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname ~ '^ledgerline_check_[0-9a-f]{32}$'",
    )
    .fetch_all(&mut *conn)
    .await?;
    for schema in schemas {
        let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(CHECK_LOCK_CLASS)
            .bind(&schema)
            .fetch_one(&mut *conn)
            .await?;
        if free {
            build::end_orphans(conn, &schema).await?;
            sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .execute(&mut *conn)
                .await?;
            sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
                .bind(CHECK_LOCK_CLASS)
                .bind(&schema)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}
