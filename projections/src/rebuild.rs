//! Rebuild jobs: read models rebuilt from the log into a shadow schema while the live tables
//! keep serving, then swapped in by one short transaction, so that readers see either the
//! old tables or the complete new ones (a transaction whose snapshot is older than the
//! copies is waited for first: see `snapshots`; what hangs on the live tables is refused
//! before any work: see `dependents`).
//!
//! A job commits its position with every batch, so one killed at any point (even `kill -9`)
//! resumes from there when run again; until the swap, nothing it does touches a live table.
//! One job runs at a time (a session advisory lock, released by PostgreSQL when the process
//! dies) and a job's projections are fixed when it starts.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgArguments;
use sqlx::{Connection, PgConnection, PgPool, Postgres};

use crate::build::{self, Lane, Phase, Progress, Record};
use crate::dependents;
use crate::finish;
use crate::run_lock::{self, LockWatch};
use crate::runner::head;
use crate::snapshots::{self, Waited};
use crate::{Projection, RunError, StoredEvent, STORED_EVENT_COLUMNS};

/// The session advisory lock a running rebuild holds ("ledgerline rebuild" in ASCII).
const REBUILD_LOCK: i64 = 0x6c65_6467_7262_6c64;

/// `pg_locks` row `l` is the rebuild lock, granted, in this database: pg_locks shows a bigint
/// advisory key as its high half in `classid` ($1) and its low half in `objid` ($2), with
/// `objsubid` 1 (bind them with [`bind_lock_halves`]).
const REBUILD_LOCK_ROW: &str = "l.locktype = 'advisory' AND l.granted \
     AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid AND l.objsubid = 1 \
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// Binds [`REBUILD_LOCK`]'s halves as [`REBUILD_LOCK_ROW`] reads them.
fn bind_lock_halves<'q, O>(
    query: sqlx::query::QueryAs<'q, Postgres, O, PgArguments>,
) -> sqlx::query::QueryAs<'q, Postgres, O, PgArguments> {
    query
        .bind((REBUILD_LOCK as u64 >> 32) as i64)
        .bind((REBUILD_LOCK as u64 & 0xffff_ffff) as i64)
}

#[derive(Debug, Clone, Copy)]
pub struct RebuildOptions {
    /// Events per batch (one transaction per projection per batch).
    pub batch_size: i64,
    /// At most this many events are left for the swap transaction to apply while it holds
    /// the live projections back; until then the job keeps catching up without locks.
    pub swap_tail: i64,
    /// Connections vacuuming the copies, building their secondary indexes and analysing
    /// them at the end, one step each at a time (0 is taken as 1).
    pub finish_connections: u16,
    /// How long the job waits, once its copies are complete, for transactions whose
    /// snapshots are older than the copies (see `snapshots`) before it gives up, keeping
    /// its work.
    pub snapshot_wait: Duration,
    /// How long the build may go without any projection advancing, or the swap take, before
    /// its sessions are ended and it goes on on new connections (twice), and then stops,
    /// keeping its work.
    pub stall_limit: Duration,
}

impl RebuildOptions {
    /// The defaults, as a constant for the CLI's defaults.
    pub const DEFAULT: Self = Self {
        batch_size: 20_000,
        swap_tail: 2000,
        finish_connections: 2,
        snapshot_wait: Duration::from_secs(600),
        stall_limit: build::STALL_LIMIT,
    };
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What a finished rebuild did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RebuildSummary {
    pub job: i64,
    pub projections: Vec<&'static str>,
    /// True when an interrupted job was picked up rather than a new one started.
    pub resumed: bool,
    /// The position the swapped-in tables are at, and their projections' checkpoint.
    pub position: i64,
}

/// One projection of the unfinished rebuild job, for metrics and status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct RebuildProgress {
    pub job: i64,
    /// Where the job builds its tables (`ledgerline_rebuild_<uuid>`).
    pub schema: String,
    pub name: String,
    pub position: i64,
    pub target: i64,
    pub started_at: DateTime<Utc>,
    /// When the job last recorded a batch of this projection (when it started, before the
    /// first). It stands still while a live job builds indexes at the end, too.
    pub updated_at: DateTime<Utc>,
    /// Whether a session holds the rebuild lock now. The job's row says `running` until it
    /// is swapped in or abandoned, also after its process was killed or stopped by an
    /// error; only the lock, which PostgreSQL frees when the session ends, tells a job at
    /// work from one that waits to be resumed.
    pub held: bool,
    /// Who holds the lock, when a session does: its pid, `application_name` and client
    /// address ("?" where `pg_stat_activity` hides them from a role without
    /// `pg_read_all_stats`), for an operator to find the run.
    pub holder: Option<String>,
}

/// The unfinished job, if any, with each of its projections' positions.
pub async fn rebuild_progress(pool: &PgPool) -> Result<Vec<RebuildProgress>, RunError> {
    // Reading pg_locks takes no lock, so a status or a scrape never gets in the way of a
    // run starting at that moment (a `pg_try_advisory_lock` would).
    Ok(bind_lock_halves(sqlx::query_as(&format!(
        "SELECT r.id AS job, r.shadow_schema AS schema, p.name, p.position, \
         r.target_position AS target, r.started_at, p.updated_at, \
         h.holder IS NOT NULL AS held, h.holder \
         FROM projection_rebuilds r JOIN projection_rebuild_progress p ON p.rebuild_id = r.id \
         LEFT JOIN (SELECT format('pid %s, %s, from %s', l.pid, {application}, {client}) \
              AS holder \
              FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
              WHERE {REBUILD_LOCK_ROW} LIMIT 1) h ON true \
         WHERE r.status = 'running' ORDER BY p.name",
        application = crate::session_application!(),
        client = crate::session_client!(),
    )))
    .fetch_all(pool)
    .await?)
}

/// The command that resumes the unfinished job of `projections`: `--all` when it covers
/// every projection, as `projections status` and the errors all say it.
pub fn resume_command(projections: &[impl AsRef<str>]) -> String {
    let mut names: Vec<&str> = projections.iter().map(AsRef::as_ref).collect();
    names.sort_unstable();
    names.dedup();
    let mut all = crate::names();
    all.sort_unstable();
    if names == all {
        "ledgerline projections rebuild --all".to_string()
    } else {
        format!("ledgerline projections rebuild {}", names.join(" "))
    }
}

/// The commands that resume and drop the unfinished job of `projections`, in the one form
/// every message naming them uses.
pub fn resume_or_abandon(projections: &[impl AsRef<str>]) -> String {
    format!(
        "run `{}` to resume it, or `ledgerline projections rebuild --abandon` to drop it",
        resume_command(projections)
    )
}

/// What a rebuild that failed once its job existed says about the job, whatever the
/// failure (a lost database, a lost lock, a swap that never got the live tables).
pub fn job_kept(job: i64, projections: &[impl AsRef<str>]) -> String {
    format!(
        "rebuild job {job} keeps the work it recorded (the live tables are unchanged until \
         its swap); once the cause is fixed, {}; `ledgerline projections status` shows it",
        resume_or_abandon(projections)
    )
}

/// The projections named (all if `None`), resolved, sorted by name and deduplicated.
pub fn resolve(names: Option<&[&str]>) -> Result<Vec<Projection>, RunError> {
    let mut projections = match names {
        None => Projection::ALL.to_vec(),
        Some(names) => names
            .iter()
            .map(|n| {
                Projection::from_name(n).ok_or_else(|| RunError::UnknownProjection(n.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    projections.sort_by_key(|p| p.name());
    projections.dedup();
    Ok(projections)
}

#[derive(Debug)]
struct Job {
    id: i64,
    schema: String,
}

/// Rebuilds the named projections (all if `None`) and swaps them in. Resumes the unfinished
/// job of the same projections if there is one; refuses while a job of other projections
/// is unfinished (see [`abandon_rebuild`]) or another rebuild is running.
pub async fn rebuild(
    pool: &PgPool,
    names: Option<&[&str]>,
    options: RebuildOptions,
    progress: &Arc<Progress>,
) -> Result<RebuildSummary, RunError> {
    let projections = resolve(names)?;
    let wanted: Vec<&'static str> = projections.iter().map(|p| p.name()).collect();
    // A connection of its own, closed when the function returns (or the process dies),
    // which is what releases the lock.
    let mut lock = run_lock::connect(pool).await?;
    take_lock(&mut lock).await?;
    let unfinished = running_job(&mut lock, true).await?;
    if let Some((job, names)) = &unfinished {
        if *names != wanted {
            return Err(RunError::RebuildInProgress {
                job: job.id,
                projections: names.clone(),
            });
        }
    }
    // Said before any work, rather than by a swap that fails (or loses them) at the end.
    let dependents = dependents::of_tables(&mut lock, &Projection::tables_of(&projections)).await?;
    if !dependents.is_empty() {
        return Err(RunError::Dependents {
            dependents,
            next: match &unfinished {
                Some((job, _)) => job_kept(job.id, &wanted),
                None => "nothing was started".to_string(),
            },
        });
    }
    let (job, resumed) = match unfinished {
        Some((job, _)) => {
            build::end_orphans(&mut lock, &job.schema).await?;
            if shadow_matches_live(&mut lock, &job.schema, &projections).await? {
                (job, true)
            } else {
                tracing::warn!(
                    job = job.id,
                    "the live tables changed since the job started (a migration?); starting over"
                );
                abandon(&mut lock, &job).await?;
                (start_job(pool, &projections).await?, false)
            }
        }
        None => (start_job(pool, &projections).await?, false),
    };
    // Names joined by spaces: a log field holds text, and a debug list would be Rust's syntax.
    tracing::info!(job = job.id, projections = %wanted.join(" "), resumed, "rebuilding");
    progress.set_job(job.id);
    // From here on the job must stop if its lock's session ends (see `run_lock`).
    let watch = LockWatch::start(lock).await?;
    let lock_lost = |cause: String| RunError::LockLost {
        run: "rebuild",
        cause,
        next: job_kept(job.id, &wanted),
    };

    // Brings every lane of the job to the head as it is now; returns that head.
    let catch_up = || async {
        let target = head(pool).await?;
        sqlx::query("UPDATE projection_rebuilds SET target_position = $2 WHERE id = $1")
            .bind(job.id)
            .bind(target)
            .execute(pool)
            .await?;
        let lanes = lanes(pool, job.id, &projections, target).await?;
        progress.start(&lanes);
        let record = Record::Job(job.id);
        build::build(
            pool,
            &job.schema,
            &lanes,
            options.batch_size,
            record,
            progress,
            options.stall_limit,
        )
        .await?;
        Ok::<_, RunError>(target)
    };
    // Catches up without holding anything back, until what is left is small enough for the
    // swap to apply under its locks (or for `build::CATCH_UP_ROUNDS` rounds); returns where
    // the copies are.
    let within_tail = || async {
        let mut target = 0;
        for _ in 0..build::CATCH_UP_ROUNDS {
            target = catch_up().await?;
            if head(pool).await? - target <= options.swap_tail {
                break;
            }
        }
        Ok::<_, RunError>(target)
    };
    let built = async {
        within_tail().await?;
        progress.set_phase(Phase::Indexing);
        finish::finish_tables(pool, &job.schema, &projections, options.finish_connections).await?;
        // Events that arrived while the indexes were built (minutes of them on a large log):
        // caught up until the tail is short again, not left for the swap.
        let mut target = within_tail().await?;
        // A snapshot older than the copies' last batch would read them half-built once
        // swapped in. A long wait for such snapshots lets the swap's tail grow: the job
        // catches up again, and waits for the snapshots taken meanwhile, which saw the
        // copies complete up to the first wait.
        let deadline = tokio::time::Instant::now() + options.snapshot_wait;
        for round in 0..2 {
            progress.set_phase(Phase::WaitingForSnapshots);
            match snapshots::wait_for_older(pool, &job.schema, deadline).await? {
                Waited::NotAtAll => break,
                Waited::Ended => {}
                Waited::TimedOut(sessions) => {
                    return Err(RunError::OldSnapshots {
                        waited: options.snapshot_wait.as_secs(),
                        sessions,
                        job: job.id,
                        projections: wanted.iter().map(|n| n.to_string()).collect(),
                    })
                }
            }
            if round == 1 || head(pool).await? - target <= options.swap_tail {
                break;
            }
            target = within_tail().await?;
        }
        Ok(())
    };
    // A lost lock drops the build where it is: its workers' tasks are aborted, and what
    // they committed stays for the next run. The swap is not cut off this way (a commit
    // under way might land after the error was said): it looks for the lock itself.
    let built = tokio::select! {
        built = built => built,
        cause = watch.lost() => Err(lock_lost(cause)),
    };
    let result = match built {
        Ok(()) => {
            progress.set_phase(Phase::Swapping);
            swap_when_quiet(
                pool,
                &job,
                &projections,
                watch.pid(),
                options.stall_limit,
                &lock_lost,
            )
            .await
        }
        Err(e) => Err(e),
    };
    let result = match (result, watch.stop().await) {
        (Err(RunError::LiveTablesChanged(table)), Ok(mut lock)) => {
            // The copies can never be swapped in; the next run starts afresh. The reason
            // stays the error the caller sees, also if dropping them fails (the next run
            // retries it).
            if let Err(e) = abandon(&mut lock, &job).await {
                tracing::error!(job = job.id, error = %e, "the job could not be abandoned");
            }
            Err(RunError::LiveTablesChanged(table))
        }
        // A run that failed after losing its lock failed because of it, mostly: the run
        // that took the lock over ends this one's sessions.
        // Its own error is kept in the message: it may be a real one that a rerun meets again.
        (Err(e), Err(cause)) if !matches!(e, RunError::LockLost { .. }) => {
            Err(lock_lost(format!("{cause}; the run had failed with: {e}")))
        }
        // A swap that committed had the lock in its own transaction.
        (result, _) => result,
    };
    let position = result?;
    progress.swapped(position);
    tracing::info!(job = job.id, position, "rebuilt tables swapped in");
    Ok(RebuildSummary {
        job: job.id,
        projections: wanted,
        resumed,
        position,
    })
}

/// A rebuild job that was swapped in.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SwappedJob {
    pub job: i64,
    pub projections: Vec<String>,
    /// The position its tables were swapped in at.
    pub position: i64,
    pub finished_at: DateTime<Utc>,
}

/// The newest job that was swapped in, if any: what a run starting a new job tells its
/// operator, as a run killed just after its swap committed said nothing of it.
pub async fn last_swapped(pool: &PgPool) -> Result<Option<SwappedJob>, RunError> {
    Ok(sqlx::query_as(
        "SELECT id AS job, projections, target_position AS position, finished_at \
         FROM projection_rebuilds WHERE status = 'swapped' ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?)
}

/// Drops the unfinished job's shadow schema and marks it abandoned. Returns its id, if
/// there was one. The live tables are not touched.
pub async fn abandon_rebuild(pool: &PgPool) -> Result<Option<i64>, RunError> {
    let mut lock = run_lock::connect(pool).await?;
    take_lock(&mut lock).await?;
    let Some((job, _)) = running_job(&mut lock, false).await? else {
        return Ok(None);
    };
    abandon(&mut lock, &job).await?;
    Ok(Some(job.id))
}

async fn take_lock(conn: &mut PgConnection) -> Result<(), RunError> {
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(REBUILD_LOCK)
        .fetch_one(conn)
        .await?;
    if locked {
        Ok(())
    } else {
        Err(RunError::RebuildRunning)
    }
}

/// The unfinished job. A run about to resume or start it over reads it `FOR UPDATE`, which
/// waits for a swap still in flight from a run whose lock session just ended (the swap holds
/// the job's row) and reads the row as that swap left it, so a job swapped in is not taken for
/// one to resume. (Dropping a job needs no such wait: its update is for a running job only.)
async fn running_job(
    conn: &mut PgConnection,
    wait_for_a_swap: bool,
) -> sqlx::Result<Option<(Job, Vec<String>)>> {
    let row: Option<(i64, String, Vec<String>)> = sqlx::query_as(&format!(
        "SELECT id, shadow_schema, projections FROM projection_rebuilds \
         WHERE status = 'running'{}",
        if wait_for_a_swap { " FOR UPDATE" } else { "" }
    ))
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(id, schema, names)| (Job { id, schema }, names)))
}

/// Records a new job and creates its shadow schema, in one transaction: a crash leaves
/// either both or neither.
async fn start_job(pool: &PgPool, projections: &[Projection]) -> Result<Job, RunError> {
    let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
    let schema = format!("ledgerline_rebuild_{}", uuid::Uuid::new_v4().simple());
    let mut tx = pool.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO projection_rebuilds (projections, shadow_schema, target_position) \
         VALUES ($1, $2, (SELECT COALESCE(MAX(position), 0) FROM events)) RETURNING id",
    )
    .bind(&names)
    .bind(&schema)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO projection_rebuild_progress (rebuild_id, name) SELECT $1, unnest($2::text[])",
    )
    .bind(id)
    .bind(&names)
    .execute(&mut *tx)
    .await?;
    build::create_schema(&mut tx, &schema, projections).await?;
    tx.commit().await?;
    Ok(Job { id, schema })
}

async fn abandon(conn: &mut PgConnection, job: &Job) -> Result<(), RunError> {
    // Else `DROP SCHEMA` waits for them.
    build::end_orphans(conn, &job.schema).await?;
    let mut tx = conn.begin().await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", job.schema))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE projection_rebuilds SET status = 'abandoned', finished_at = now() \
         WHERE id = $1 AND status = 'running'",
    )
    .bind(job.id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(
        job = job.id,
        "rebuild job abandoned; its shadow tables are dropped"
    );
    Ok(())
}

async fn shadow_matches_live(
    conn: &mut PgConnection,
    schema: &str,
    projections: &[Projection],
) -> sqlx::Result<bool> {
    for table in Projection::tables_of(projections) {
        let live = build::column_signature(conn, "public", table).await?;
        let shadow = build::column_signature(conn, schema, table).await?;
        if live.is_none() || live != shadow {
            return Ok(false);
        }
        // The copy keeps the constraints the live table had when the job began: one the
        // live table has lost since (the cause of the failure that stopped the job, say)
        // would go on refusing rows there.
        if build::constraints(conn, "public", table).await?
            != build::constraints(conn, schema, table).await?
        {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn lanes(
    pool: &PgPool,
    job: i64,
    projections: &[Projection],
    to: i64,
) -> sqlx::Result<Vec<Lane>> {
    let positions = recorded_positions(pool, job).await?;
    Ok(projections
        .iter()
        .map(|&projection| Lane {
            projection,
            from: recorded(&positions, projection),
            to,
        })
        .collect())
}

/// Each projection's position as job `job` recorded it with its last committed batch.
pub(crate) async fn recorded_positions(
    db: impl sqlx::PgExecutor<'_>,
    job: i64,
) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("SELECT name, position FROM projection_rebuild_progress WHERE rebuild_id = $1")
        .bind(job)
        .fetch_all(db)
        .await
}

/// `projection`'s position among `positions` (0 before its first batch).
pub(crate) fn recorded(positions: &[(String, i64)], projection: Projection) -> i64 {
    positions
        .iter()
        .find(|(n, _)| n == projection.name())
        .map_or(0, |(_, p)| *p)
}

/// Tries the swap until no reader holds the live tables longer than [`LOCK_WAIT`]: a waiting
/// table lock queues every later reader behind it, so it must not wait long.
///
/// An attempt that has not ended after `stall_limit` is stalled (its final events' `COPY`
/// can hang as the build's did; `build::build`): it holds the live checkpoints, and so the
/// live projectors, and perhaps the live tables. Its session is ended, which rolls it back
/// unless it committed, and the swap is tried again on a new one, up to
/// [`build::STALL_RESUMES`] times.
async fn swap_when_quiet(
    pool: &PgPool,
    job: &Job,
    projections: &[Projection],
    lock_pid: i32,
    stall_limit: Duration,
    lock_lost: &impl Fn(String) -> RunError,
) -> Result<i64, RunError> {
    let tables = Projection::tables_of(projections);
    let mut attempt = 1;
    let mut stalls = 0;
    loop {
        let attempted = tokio::time::timeout(
            stall_limit,
            swap(pool, job, projections, lock_pid, lock_lost),
        )
        .await;
        let Ok(swapped) = attempted else {
            stalls += 1;
            let mut conn = pool.acquire().await?;
            let ended = build::end_orphans(&mut conn, &job.schema).await;
            // Cut off between its commit and the answer, it is done.
            if let Some(position) = swapped_at(&mut conn, job.id).await? {
                return Ok(position);
            }
            ended?;
            if stalls > build::STALL_RESUMES {
                return Err(RunError::Stalled {
                    what: "the swap",
                    setting: "--stall-secs",
                    waited: stall_limit,
                    behind: "the last events, and replacing the live tables".to_string(),
                    attempts: stalls,
                });
            }
            tracing::warn!(
                job = job.id,
                waited_seconds = stall_limit.as_secs_f64(),
                "the swap did not end; its session was ended, trying it again"
            );
            continue;
        };
        match swapped {
            Err(RunError::Sql(sqlx::Error::Database(e)))
                if e.code().is_some_and(|c| BACK_OFF.contains(&c.as_ref())) =>
            {
                if attempt >= SWAP_ATTEMPTS {
                    let holders = holders(pool, &job.schema, &tables)
                        .await
                        .unwrap_or_else(|e| format!("not read: {e}"));
                    return Err(RunError::SwapBusy {
                        attempts: SWAP_ATTEMPTS,
                        holders,
                        job: job.id,
                        projections: projections.iter().map(|p| p.name().to_string()).collect(),
                    });
                }
                // Read before the event: a value the macro holds across an await would
                // make the job's future one that cannot be sent to another thread.
                let holding = holders(pool, &job.schema, &tables)
                    .await
                    .unwrap_or_default();
                tracing::info!(
                    attempt,
                    holders = holding,
                    "other sessions hold the live tables; trying the swap again"
                );
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt)))
                    .await;
            }
            result => return result.map_err(with_detail),
        }
    }
}

/// A database error of the swap with PostgreSQL's DETAIL, when it has one: "cannot drop
/// table ... because other objects depend on it" names them only there.
fn with_detail(e: RunError) -> RunError {
    let RunError::Sql(sqlx::Error::Database(db)) = &e else {
        return e;
    };
    match db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|pg| pg.detail())
    {
        Some(detail) => RunError::SwapFailed {
            error: db.to_string(),
            detail: detail.to_string(),
        },
        None => e,
    }
}

/// The sessions holding locks on the live `tables`, for the operator to find: each one's
/// pid, application, tables, how long its transaction has been open and its last statement.
/// Not the job's own (named after `schema`): a swap that timed out on one table may still
/// hold another until its session ends.
async fn holders(pool: &PgPool, schema: &str, tables: &[&str]) -> sqlx::Result<String> {
    let rows: Vec<(i32, String, String, Option<i64>, String)> = sqlx::query_as(concat!(
        "SELECT a.pid, ",
        crate::session_application!(),
        ", string_agg(DISTINCT c.relname::text, ', '), \
         extract(epoch FROM now() - a.xact_start)::bigint, ",
        crate::session_query!(),
        " FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
         JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.granted \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND c.relnamespace = 'public'::regnamespace AND c.relname = ANY($1) \
         AND l.pid <> pg_backend_pid() AND a.application_name IS DISTINCT FROM $2 \
         GROUP BY a.pid, a.application_name, a.xact_start, a.query ORDER BY a.pid"
    ))
    .bind(tables)
    .bind(schema)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Ok("none holds them now".to_string());
    }
    Ok(rows
        .iter()
        .map(|(pid, app, on, open, query)| {
            let open = open.map_or(String::new(), |s| format!(", in a transaction for {s} s"));
            format!("pid {pid} ({app}) on {on}{open}, last statement `{query}`")
        })
        .collect::<Vec<_>>()
        .join("; "))
}

/// How long the swap waits for the live tables' lock before it backs off and tries again.
/// Under `deadlock_timeout` (1 s by default), so that a reader that goes on to a table the
/// swap holds is not cancelled as a deadlock.
const LOCK_WAIT: &str = "500ms";
const SWAP_ATTEMPTS: u32 = 10;
/// SQLSTATEs after which the swap backs off and tries again: lock_not_available (the
/// `lock_timeout` expired) and deadlock_detected.
const BACK_OFF: [&str; 2] = ["55P03", "40P01"];

/// The swap, in one transaction: hold the live projections back (their checkpoint rows),
/// apply the events that arrived since the last batch to the shadow tables, replace the
/// live tables with them and set the checkpoints to the position they now reflect.
/// Readers wait only for the table locks of the last few statements. It commits only while
/// the session `lock_pid` holds the rebuild lock.
async fn swap(
    pool: &PgPool,
    job: &Job,
    projections: &[Projection],
    lock_pid: i32,
    lock_lost: &impl Fn(String) -> RunError,
) -> Result<i64, RunError> {
    let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
    let tables = Projection::tables_of(projections);
    let mut conn = build::schema_connection(pool, &job.schema).await?;
    let mut tx = conn.begin().await?;
    // It holds the live checkpoints, then the live tables: a frozen operator process must
    // not hold the projector and the API with them (as a live batch's `open` does not).
    crate::lease::idle_limit(&mut tx).await?;
    sqlx::query(
        "INSERT INTO projection_checkpoints (name) SELECT unnest($1::text[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&names)
    .execute(&mut *tx)
    .await?;
    // In name order, as runners and `reset` take them.
    sqlx::query(
        "SELECT name FROM projection_checkpoints WHERE name = ANY($1) ORDER BY name FOR UPDATE",
    )
    .bind(&names)
    .execute(&mut *tx)
    .await?;
    let positions = recorded_positions(&mut *tx, job.id).await?;
    let from = positions.iter().map(|(_, p)| *p).min().unwrap_or(0);
    let tail: Vec<StoredEvent> = sqlx::query_as(&format!(
        "SELECT {STORED_EVENT_COLUMNS} FROM events WHERE position > $1 ORDER BY position"
    ))
    .bind(from)
    .fetch_all(&mut *tx)
    .await?;
    let position = tail.last().map_or(from, |e| e.position);
    for &projection in projections {
        let at = recorded(&positions, projection);
        let events = &tail[tail.partition_point(|e| e.position <= at)..];
        build::apply_final(&mut tx, projection, events).await?;
    }
    let live: Vec<String> = tables.iter().map(|t| format!("public.{t}")).collect();
    sqlx::query(&format!("SET LOCAL lock_timeout = '{LOCK_WAIT}'"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        live.join(", ")
    ))
    .execute(&mut *tx)
    .await?;
    for table in &tables {
        let shadow = build::layout(&mut tx, &job.schema, table).await?;
        let now = build::layout(&mut tx, "public", table).await?;
        if shadow != now {
            return Err(RunError::LiveTablesChanged(table.to_string()));
        }
    }
    // Looked for again under the locks, which keep new ones out: one made since the job
    // began would stop the drop, or go with it.
    let dependents = dependents::of_tables(&mut tx, &tables).await?;
    if !dependents.is_empty() {
        return Err(RunError::Dependents {
            dependents,
            next: job_kept(job.id, &names),
        });
    }
    // What `LIKE` left behind or the live tables gained since, read before they go.
    let mut carried = dependents::comment_statements(&mut tx, &job.schema, &tables).await?;
    carried.extend(dependents::storage_statements(&mut tx, &job.schema, &tables, "public").await?);
    carried.extend(dependents::access_statements(&mut tx, &job.schema, &tables).await?);
    sqlx::query(&format!("DROP TABLE {}", live.join(", ")))
        .execute(&mut *tx)
        .await?;
    for table in &tables {
        sqlx::query(&format!(
            "ALTER TABLE {}.{table} SET SCHEMA public",
            job.schema
        ))
        .execute(&mut *tx)
        .await?;
    }
    for statement in &carried {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    // With whatever a newer binary no longer counts among the projection's tables.
    sqlx::query(&format!("DROP SCHEMA {} CASCADE", job.schema))
        .execute(&mut *tx)
        .await?;
    // Other processes waiting on these projections learn of the jump when this commits.
    sqlx::query(
        "UPDATE projection_checkpoints SET position = $2, updated_at = now() \
         WHERE name = ANY($1) RETURNING pg_notify($3, name || ':' || position)",
    )
    .bind(&names)
    .bind(position)
    .bind(crate::notify::CHECKPOINT_CHANNEL)
    .execute(&mut *tx)
    .await?;
    // The rebuilt tables applied every event a stopped projection had failed on.
    sqlx::query("DELETE FROM projection_failures WHERE name = ANY($1)")
        .bind(&names)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE projection_rebuild_progress SET position = $2, updated_at = now() \
         WHERE rebuild_id = $1",
    )
    .bind(job.id)
    .bind(position)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE projection_rebuilds SET status = 'swapped', target_position = $2, \
         finished_at = now() WHERE id = $1",
    )
    .bind(job.id)
    .bind(position)
    .execute(&mut *tx)
    .await?;
    // Last, as everything before may wait for locks: a run that took the lock over since
    // (and owns the job now) ends this session, so the swap either commits before that
    // or not at all.
    if !lock_held_by(&mut tx, lock_pid).await? {
        return Err(lock_lost(format!(
            "session {lock_pid} no longer holds it at the swap"
        )));
    }
    tx.commit().await?;
    Ok(position)
}

/// The position job `job` was swapped in at, if it was.
async fn swapped_at(conn: &mut PgConnection, job: i64) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT target_position FROM projection_rebuilds WHERE id = $1 AND status = 'swapped'",
    )
    .bind(job)
    .fetch_optional(conn)
    .await
}

/// Whether the session `pid` holds the rebuild lock now (read from `pg_locks`, as
/// [`rebuild_progress`] does).
async fn lock_held_by(conn: &mut PgConnection, pid: i32) -> sqlx::Result<bool> {
    let held: (bool,) = bind_lock_halves(sqlx::query_as(&format!(
        "SELECT EXISTS (SELECT 1 FROM pg_locks l WHERE {REBUILD_LOCK_ROW} AND l.pid = $3)"
    )))
    .bind(pid)
    .fetch_one(conn)
    .await?;
    Ok(held.0)
}
