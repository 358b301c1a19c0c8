//! Building read models from the log into a schema of their own, for rebuild jobs and
//! checks: an empty copy of each projection's tables, filled by one reader of the log and
//! one worker per projection, each committing a batch at a time.
//!
//! The projections' own code does the work, unchanged: the workers' connections put the
//! build schema first on their `search_path`, so the unqualified table names of every
//! projection's SQL resolve to the copies. Tables a projection only changes outside its own
//! (`subject_keys`, `message_keys`, `idempotency_keys`: [`OUTSIDE_TABLES`]) have no copy in a
//! rebuild and resolve to the live ones: destroying a key again is a no-op, and destroying it
//! because the rebuild reached the erasure before the live projection did is what the
//! erasure asked for. A check changes nothing live: its schema holds empty stand-ins for
//! them ([`create_stand_ins`]).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};

use crate::{dependents, Projection, ProjectionError, RunError, StoredEvent, STORED_EVENT_COLUMNS};

/// One projection's share of a build: its tables are at `from`, and are to reach `to`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lane {
    pub projection: Projection,
    pub from: i64,
    pub to: i64,
}

/// What a build has reached, for progress bars and metrics; shared with the caller.
#[derive(Debug, Default)]
pub struct Progress {
    state: Mutex<ProgressState>,
}

/// What a run is doing, for the progress it shows: the count of events stands still while
/// a rebuild builds its indexes or waits for the live tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Phase {
    /// Applying the log's events to the copies.
    #[default]
    Applying,
    /// Building the copies' secondary indexes and statistics.
    Indexing,
    /// Waiting for transactions whose snapshots are older than the complete copies.
    WaitingForSnapshots,
    /// Taking the live tables and swapping the copies in.
    Swapping,
    /// Done: the copies are the live tables, at the position the figures show (with the
    /// events that arrived meanwhile, which the swap applied).
    Swapped,
    /// Comparing the copies with the live tables.
    Comparing,
}

impl Phase {
    pub fn describe(self) -> &'static str {
        match self {
            Phase::Applying => "applying events",
            Phase::Indexing => "building indexes and statistics",
            Phase::WaitingForSnapshots => {
                "waiting for older snapshots to end (the log names their sessions)"
            }
            Phase::Swapping => "swapping the tables in",
            Phase::Swapped => "swapped in",
            Phase::Comparing => "comparing with the live tables",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgressState {
    /// The rebuild job the run works on, once it has one (a check has none): a run that
    /// fails after this keeps its work there.
    pub job: Option<i64>,
    pub phase: Phase,
    /// The position the slowest projection started from in this run.
    pub first: i64,
    /// The position the build is working towards.
    pub target: i64,
    /// Each projection's last applied position.
    pub positions: Vec<(&'static str, i64)>,
    /// Where each projection's work ends, when short of `target` (a check compares each
    /// projection at its own live checkpoint, and a stopped one's is behind the others').
    pub ends: Vec<(&'static str, i64)>,
}

impl ProgressState {
    /// The position every projection of the build has reached; one at its own end holds
    /// nothing back.
    pub fn done(&self) -> i64 {
        self.positions
            .iter()
            .map(|&(name, p)| {
                if p >= self.end_of(name) {
                    self.target
                } else {
                    p
                }
            })
            .min()
            .unwrap_or(self.target)
    }

    /// Where `name`'s work ends.
    fn end_of(&self, name: &str) -> i64 {
        self.ends
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(self.target, |&(_, e)| e)
    }
}

impl Progress {
    pub fn snapshot(&self) -> ProgressState {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProgressState> {
        // A worker that panicked mid-update leaves a number, not a broken invariant.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.lock().phase = phase;
    }

    pub(crate) fn set_job(&self, job: i64) {
        self.lock().job = Some(job);
    }

    /// The swap put every projection at `position`, past the target when events arrived
    /// during it: the last figures shown are the summary's.
    pub(crate) fn swapped(&self, position: i64) {
        let mut state = self.lock();
        state.phase = Phase::Swapped;
        state.target = position;
        state.ends.clear();
        for entry in &mut state.positions {
            entry.1 = position;
        }
    }

    pub(crate) fn start(&self, lanes: &[Lane]) {
        let mut state = self.lock();
        state.phase = Phase::Applying;
        state.first = lanes.iter().map(|l| l.from).min().unwrap_or(0);
        state.target = lanes.iter().map(|l| l.to).max().unwrap_or(0);
        state.positions = lanes
            .iter()
            .map(|l| (l.projection.name(), l.from))
            .collect();
        state.ends = lanes
            .iter()
            .filter(|l| l.to < state.target)
            .map(|l| (l.projection.name(), l.to))
            .collect();
    }

    fn advance(&self, name: &str, position: i64) {
        let mut state = self.lock();
        if let Some(entry) = state.positions.iter_mut().find(|(n, _)| *n == name) {
            entry.1 = position;
        }
    }
}

/// Where a worker records its position, in the transaction of each batch.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Record {
    /// `projection_rebuild_progress` of this job: the build resumes there after a crash.
    Job(i64),
    /// Nowhere: a check's scratch schema does not outlive the check.
    Nowhere,
}

/// At most this many builds (the first and the catch-ups after it) run before a check's
/// comparison or a rebuild's next step takes whatever tail is left: a live log written as
/// fast as a build applies it would otherwise hold them off for ever.
pub(crate) const CATCH_UP_ROUNDS: usize = 8;

/// Tables outside the read models that replaying an erasure or a deletion changes: the keys
/// it destroys and the API's kept answers it forgets (`destroy_keys_and_forget`).
pub(crate) const OUTSIDE_TABLES: [&str; 3] = ["subject_keys", "message_keys", "idempotency_keys"];

/// Empty tables in `schema` standing in for [`OUTSIDE_TABLES`], so that a build whose
/// connections put `schema` first changes none of the live ones (a check's). Runs in the
/// caller's transaction.
pub(crate) async fn create_stand_ins(conn: &mut PgConnection, schema: &str) -> sqlx::Result<()> {
    for table in OUTSIDE_TABLES {
        sqlx::query(&format!(
            "CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING DEFAULTS)"
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Creates `schema` holding an empty copy of each projection's tables: the live tables'
/// columns, defaults, checks, unique indexes (under the live names, so the swapped-in
/// tables are indistinguishable from migrated ones), foreign keys, storage parameters and
/// statistics targets. Runs in the caller's transaction.
pub(crate) async fn create_schema(
    conn: &mut PgConnection,
    schema: &str,
    projections: &[Projection],
) -> sqlx::Result<()> {
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut *conn)
        .await?;
    for table in Projection::tables_of(projections) {
        sqlx::query(&format!(
            "CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(&mut *conn)
        .await?;
        rename_indexes_as_live(conn, schema, table).await?;
        // The live table's storage parameters (a fillfactor, say) apply to the build's writes.
        for statement in dependents::storage_statements(conn, schema, &[table], schema).await? {
            sqlx::query(&statement).execute(&mut *conn).await?;
        }
        // Kept up row by row, the read models' secondary indexes cost more than the rows:
        // built once at the end (`finish::finish_tables`), a sort each. The unique ones
        // stay, as the projections rely on what they enforce.
        let secondary: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = $1::regclass AND NOT i.indisunique",
        )
        .bind(format!("{schema}.{table}"))
        .fetch_all(&mut *conn)
        .await?;
        for index in secondary {
            sqlx::query(&format!("DROP INDEX {schema}.{index}"))
                .execute(&mut *conn)
                .await?;
        }
        let foreign_keys: Vec<(String, String)> = sqlx::query_as(
            "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = $1::regclass AND contype = 'f' ORDER BY conname",
        )
        .bind(format!("public.{table}"))
        .fetch_all(&mut *conn)
        .await?;
        for (name, definition) in foreign_keys {
            sqlx::query(&format!(
                "ALTER TABLE {schema}.{table} ADD CONSTRAINT {name} {definition}"
            ))
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// `LIKE … INCLUDING ALL` names the copied indexes by PostgreSQL's defaults; give each the
/// name of the live index with the same definition, each live name once (a table may have
/// two indexes of one definition). Two steps, so that a default name that happens to be
/// another live index's name cannot collide.
async fn rename_indexes_as_live(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> sqlx::Result<()> {
    let mut live = index_definitions(conn, "public", table).await?;
    let copy = index_definitions(conn, schema, table).await?;
    let mut renames = Vec::new();
    for (copy_name, definition) in &copy {
        if let Some(at) = live.iter().position(|(_, d)| d == definition) {
            let (live_name, _) = live.remove(at);
            renames.push((copy_name.clone(), live_name));
        }
    }
    for (i, (from, _)) in renames.iter().enumerate() {
        sqlx::query(&format!(
            "ALTER INDEX {schema}.{from} RENAME TO ledgerline_build_index_{i}"
        ))
        .execute(&mut *conn)
        .await?;
    }
    for (i, (_, to)) in renames.iter().enumerate() {
        sqlx::query(&format!(
            "ALTER INDEX {schema}.ledgerline_build_index_{i} RENAME TO {to}"
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// A task's own result, or its panic or cancellation as an error of `what`.
pub(crate) fn task_result<E: From<sqlx::Error>>(
    joined: Result<Result<(), E>, JoinError>,
    what: &str,
) -> Result<(), E> {
    joined.unwrap_or_else(|e| {
        Err(sqlx::Error::Protocol(format!("{what} ended abnormally: {e}")).into())
    })
}

/// Each index of `schema.table` with its definition, the index's own name and table left out.
pub(crate) async fn index_definitions(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> sqlx::Result<Vec<(String, String)>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = $1::regclass \
         ORDER BY c.relname",
    )
    .bind(format!("{schema}.{table}"))
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, definition)| {
            let normal = definition.replacen(
                &format!("INDEX {name} ON {schema}.{table} "),
                "INDEX ON ",
                1,
            );
            (name, normal)
        })
        .collect())
}

/// The columns of `schema.table`, as one comparable string: a copy made before a
/// migration changed the live table must not be swapped in.
pub(crate) async fn column_signature(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod) || \
         CASE WHEN attnotnull THEN ' not null' ELSE '' END, ', ' ORDER BY attnum) \
         FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 \
         AND NOT attisdropped",
    )
    .bind(format!("{schema}.{table}"))
    .fetch_one(conn)
    .await
}

/// The constraints of `schema.table`, each as `name: definition`, by name. A check added
/// `NOT VALID` (its old rows unchecked) asks of new rows what its copy asks, which `LIKE`
/// makes valid: the two count as the same.
pub(crate) async fn constraints(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT conname || ': ' || regexp_replace(pg_get_constraintdef(oid), ' NOT VALID$', '') \
         FROM pg_constraint WHERE conrelid = $1::regclass ORDER BY conname",
    )
    .bind(format!("{schema}.{table}"))
    .fetch_all(conn)
    .await
}

/// Everything that makes `schema.table` what a migration made it: columns, constraints
/// and indexes, as one comparable text. The swap refuses a copy whose layout is not the
/// live table's, e.g. after a migration ran while the job was under way.
pub(crate) async fn layout(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> sqlx::Result<String> {
    let columns = column_signature(conn, schema, table).await?;
    let constraints = constraints(conn, schema, table).await?;
    let indexes: Vec<String> = index_definitions(conn, schema, table)
        .await?
        .into_iter()
        .map(|(name, definition)| format!("{name}: {definition}"))
        .collect();
    Ok(format!(
        "columns {}; constraints {}; indexes {}",
        columns.unwrap_or_default(),
        constraints.join(", "),
        indexes.join(", ")
    ))
}

/// How long [`end_orphans`] waits for the sessions it ended to be gone.
const ORPHAN_WAIT: Duration = Duration::from_secs(30);

/// Ends the database sessions still working on `schema` and waits until they are gone. The
/// caller holds the lock of the job or check that owns `schema`, so no live run can own a
/// session named after it (as every connection this module opens for a schema is): each is
/// left over, mostly from an earlier run that was killed. Most end as soon as their socket
/// closes, but one in the middle of a statement (a `CREATE INDEX`, a `VACUUM`) goes on until
/// the statement is done, holding its locks and its uncommitted index name, which would
/// stall or fail the run that resumes or drops the schema. Ending another role's session
/// takes that role's membership (or `pg_signal_backend`); without it this fails, naming the
/// sessions, rather than wait.
pub(crate) async fn end_orphans(conn: &mut PgConnection, schema: &str) -> Result<(), RunError> {
    let deadline = tokio::time::Instant::now() + ORPHAN_WAIT;
    let mut logged = false;
    loop {
        let sessions: Vec<(i32, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT pid, usename::text, left(query, 80) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = $1 \
             AND pid <> pg_backend_pid() ORDER BY pid",
        )
        .bind(schema)
        .fetch_all(&mut *conn)
        .await?;
        if sessions.is_empty() {
            return Ok(());
        }
        let listed = || {
            sessions
                .iter()
                .map(|(pid, user, query)| {
                    format!(
                        "pid {pid} ({}): {}",
                        user.as_deref().unwrap_or("?"),
                        query.as_deref().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        if !logged {
            tracing::warn!(schema, sessions = %listed(), "ending leftover database sessions");
            logged = true;
        }
        // Sent again on every pass until they are gone; a second signal is harmless.
        let pids: Vec<i32> = sessions.iter().map(|(pid, _, _)| *pid).collect();
        let signalled =
            sqlx::query("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid")
                .bind(&pids)
                .execute(&mut *conn)
                .await;
        let why = match signalled {
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Ok(_) => format!("still there after {} s", ORPHAN_WAIT.as_secs()),
            Err(e) => e.to_string(),
        };
        return Err(RunError::OrphanSessions {
            schema: schema.to_string(),
            sessions: listed(),
            why,
        });
    }
}

/// A pool whose connections resolve unqualified names in `schema` first, named after it
/// (see [`end_orphans`]). Its commits do not wait for the WAL flush: a batch and its
/// recorded position commit together, so a server crash loses both, and the job redoes
/// them when resumed. Sequential scans are off: the tables start empty, and a generic plan
/// cached then (a sequential scan is cheapest on an empty table) would scan the whole
/// table on every execution by the end. Planning every statement for its own parameters
/// instead (`plan_cache_mode`) cost more than many one-row statements themselves
/// (docs/benchmarks.md, 2026-12-06); those that take arrays still are (`messaging_batch`).
pub(crate) async fn schema_pool(
    pool: &PgPool,
    schema: &str,
    connections: u32,
) -> sqlx::Result<PgPool> {
    let options = (*pool.connect_options())
        .clone()
        .application_name(schema)
        .options([
            ("search_path", format!("{schema},public")),
            ("synchronous_commit", "off".to_string()),
            ("enable_seqscan", "off".to_string()),
        ]);
    PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(options)
        .await
}

/// A connection outside `pool`'s with `schema` first on its `search_path`, named after
/// `schema` as [`end_orphans`] expects.
pub(crate) async fn schema_connection(pool: &PgPool, schema: &str) -> sqlx::Result<PgConnection> {
    let options = (*pool.connect_options())
        .clone()
        .application_name(schema)
        .options([("search_path", format!("{schema},public"))]);
    PgConnection::connect_with(&options).await
}

/// How long a build may go without any of its projections advancing before its sessions
/// are ended ([`build`]): a batch takes about a second at most here (20,000 events), and a
/// multi-row path that gives up applies its batch an event at a time.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// How many times a rebuild's build (or swap) that stalled is resumed on new connections
/// before it gives up.
pub(crate) const STALL_RESUMES: u32 = 2;

/// How long a build waits for its pool's connections to close before leaving them to the
/// server (one stuck mid-statement may never answer).
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Brings every lane from its `from` to its `to` on a pool of its own for `schema` (see
/// [`schema_pool`]): one task reads the log once, in batches of `batch` events, and hands
/// each batch to one worker per projection over a short queue, so the slowest projection
/// sets the pace and memory stays a few batches. Each worker commits its batch and its
/// position together. The first failure stops the build; what was committed stays, so a
/// rebuild job resumes from there.
///
/// A build in which no projection advances for `stall_limit` while one has events left is
/// stalled (twice, a `COPY` stayed half-sent over TLS with every task parked, which the
/// patched sqlx-core in `vendor/` fixes; the watch stays for causes not known): its
/// workers and reader are dropped and their database
/// sessions ended, which rolls back what they had not committed and frees the copies'
/// locks. A rebuild job then resumes from the positions it recorded (read again: a batch
/// cut off in its `COMMIT` may have committed) on new connections, up to
/// [`STALL_RESUMES`] times; a check, which records none, stops at once. Either fails with
/// [`RunError::Stalled`] in the end.
pub(crate) async fn build(
    log: &PgPool,
    schema: &str,
    lanes: &[Lane],
    batch: i64,
    record: Record,
    progress: &Arc<Progress>,
    stall_limit: Duration,
) -> Result<(), RunError> {
    let mut lanes: Vec<Lane> = lanes.iter().copied().filter(|l| l.to > l.from).collect();
    let mut attempts = 0;
    while !lanes.is_empty() {
        attempts += 1;
        // One connection per lane and the reader's, all named after the schema.
        let pool = ClosedOnDrop(schema_pool(log, schema, lanes.len() as u32 + 1).await?);
        let result = tokio::select! {
            built = build_on(schema, &pool.0, &lanes, batch, record, progress) => built,
            behind = stalled(progress, stall_limit) => Err(RunError::Stalled {
                what: "the build",
                setting: "--stall-secs",
                waited: stall_limit,
                behind,
                attempts,
            }),
        };
        // The dropped tasks' sessions may be stuck in the middle of a statement, their
        // transactions holding the copies' locks: ended, they free them, and the
        // connections' clients (which `close` waits for) see their sockets closed.
        if matches!(result, Err(RunError::Stalled { .. })) {
            let mut conn = log.acquire().await?;
            end_orphans(&mut conn, schema).await?;
        }
        if tokio::time::timeout(CLOSE_WAIT, pool.0.close())
            .await
            .is_err()
        {
            tracing::warn!(
                schema,
                "the build's connections did not close; left to the server"
            );
        }
        let job = match (result, record) {
            (Err(RunError::Stalled { behind, .. }), Record::Job(job))
                if attempts <= STALL_RESUMES =>
            {
                tracing::warn!(
                    schema,
                    waited_seconds = stall_limit.as_secs_f64(),
                    behind = %behind,
                    "no projection of the build advanced; resuming it on new connections"
                );
                job
            }
            (result, _) => return result,
        };
        let recorded = crate::rebuild::recorded_positions(log, job).await?;
        lanes = lanes
            .iter()
            .map(|&lane| Lane {
                from: crate::rebuild::recorded(&recorded, lane.projection).max(lane.from),
                ..lane
            })
            .filter(|l| l.to > l.from)
            .collect();
    }
    Ok(())
}

/// A build's pool, closed when dropped, also with a build cut off (a lost lock): the
/// connections its aborted workers held are then closed as they come back, not kept.
struct ClosedOnDrop(PgPool);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        // Closing takes effect at the call; the future only waits for the connections.
        drop(self.0.close());
    }
}

/// Resolves once no position in `progress` has moved for `limit` while a projection is
/// short of its end, with those projections and their positions; never otherwise.
async fn stalled(progress: &Progress, limit: Duration) -> String {
    let tick = (limit / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut last = progress.snapshot();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = progress.snapshot();
        if now.positions != last.positions {
            (last, since) = (now, Instant::now());
            continue;
        }
        let behind: Vec<String> = now
            .positions
            .iter()
            .filter_map(|&(name, position)| {
                let end = now.end_of(name);
                (position < end).then(|| format!("{name} at {position} of {end}"))
            })
            .collect();
        if !behind.is_empty() && since.elapsed() >= limit {
            return behind.join(", ");
        }
    }
}

/// [`build`]'s one attempt, on `pool`.
async fn build_on(
    schema: &str,
    pool: &PgPool,
    lanes: &[Lane],
    batch: i64,
    record: Record,
    progress: &Arc<Progress>,
) -> Result<(), RunError> {
    let mut workers = JoinSet::new();
    let mut queues = Vec::new();
    for lane in lanes {
        let (tx, rx) = mpsc::channel::<Arc<Vec<StoredEvent>>>(2);
        queues.push((*lane, tx));
        workers.spawn(work(
            pool.clone(),
            schema.to_string(),
            *lane,
            rx,
            record,
            Arc::clone(progress),
        ));
    }
    let from = lanes.iter().map(|l| l.from).min().unwrap_or(0);
    let to = lanes.iter().map(|l| l.to).max().unwrap_or(0);
    let read = read_log(pool, from, to, batch, &queues).await;
    drop(queues);
    let mut first_error = read.err();
    while let Some(joined) = workers.join_next().await {
        if let Err(e) = task_result(joined, "build worker") {
            // A worker's own failure explains a reader that found its queue closed.
            if first_error
                .as_ref()
                .is_none_or(|f| matches!(f, RunError::Sql(_)))
            {
                first_error = Some(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn read_log(
    log: &PgPool,
    from: i64,
    to: i64,
    batch: i64,
    queues: &[(Lane, mpsc::Sender<Arc<Vec<StoredEvent>>>)],
) -> Result<(), RunError> {
    let mut cursor = from;
    while cursor < to {
        let events: Vec<StoredEvent> = sqlx::query_as(&format!(
            "SELECT {STORED_EVENT_COLUMNS} FROM events WHERE position > $1 AND position <= $2 \
             ORDER BY position LIMIT $3"
        ))
        .bind(cursor)
        .bind(to)
        .bind(batch.max(1))
        .fetch_all(log)
        .await?;
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            break;
        };
        let (first, last) = (first.position, last.position);
        let events = Arc::new(events);
        for (lane, queue) in queues {
            if lane.from < last
                && first <= lane.to
                && queue.send(Arc::clone(&events)).await.is_err()
            {
                // The worker stopped on a failure; it reports it when joined.
                return Ok(());
            }
        }
        cursor = last;
    }
    Ok(())
}

async fn work(
    pool: PgPool,
    schema: String,
    lane: Lane,
    mut queue: mpsc::Receiver<Arc<Vec<StoredEvent>>>,
    record: Record,
    progress: Arc<Progress>,
) -> Result<(), RunError> {
    let name = lane.projection.name();
    // Held through each batch: a schema dropped under a run that lost its job lock (an
    // `--abandon`, a later check's clean-up) fails the batch here, where unqualified names
    // would otherwise resolve to the live tables further down the search path.
    let fence = format!(
        "LOCK TABLE {} IN ACCESS SHARE MODE",
        lane.projection
            .tables()
            .iter()
            .map(|t| format!("{schema}.{t}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut position = lane.from;
    // Where the lane's time went, for finding the one that sets the pace.
    let (mut waiting, mut applying) = (Duration::ZERO, Duration::ZERO);
    let mut since = Instant::now();
    while let Some(events) = queue.recv().await {
        waiting += since.elapsed();
        since = Instant::now();
        let start = events.partition_point(|e| e.position <= position);
        let end = events.partition_point(|e| e.position <= lane.to);
        let Some(slice) = events.get(start..end).filter(|s| !s.is_empty()) else {
            continue;
        };
        let last = slice[slice.len() - 1].position;
        match panic_as_err(commit(&pool, &fence, lane, record, slice)).await {
            Ok(committed) => committed?,
            // As the live projector does (`runner::run_leased_batch`): the batch's events
            // again one per transaction, so that the job stops at the one that panics,
            // named, with every event before it kept.
            Err(message) => {
                tracing::warn!(
                    projection = name,
                    error = %message,
                    "a batch panicked; applying its events one at a time to find the one"
                );
                for event in slice {
                    let one = std::slice::from_ref(event);
                    match panic_as_err(commit(&pool, &fence, lane, record, one)).await {
                        Ok(committed) => committed?,
                        Err(message) => return Err(panicked(name, event.position, message)),
                    }
                    progress.advance(name, event.position);
                }
            }
        }
        position = last;
        progress.advance(name, position);
        applying += since.elapsed();
        since = Instant::now();
        if position >= lane.to {
            break;
        }
    }
    // Its queue also closes when the reader stops short (a failure elsewhere, a stall).
    tracing::debug!(
        projection = name,
        position,
        applying_seconds = applying.as_secs_f64(),
        waiting_for_the_log_seconds = waiting.as_secs_f64(),
        "{}",
        if position >= lane.to {
            "lane built"
        } else {
            "lane stopped short"
        }
    );
    Ok(())
}

/// Applies `events` to the lane's copy and records how far the job got, in one transaction.
async fn commit(
    pool: &PgPool,
    fence: &str,
    lane: Lane,
    record: Record,
    events: &[StoredEvent],
) -> Result<(), RunError> {
    let name = lane.projection.name();
    let Some(last) = events.last().map(|e| e.position) else {
        return Ok(());
    };
    let mut tx = pool.begin().await?;
    sqlx::query(fence).execute(&mut *tx).await?;
    if let Err((index, error)) = lane.projection.apply_many(&mut tx, events).await {
        return Err(RunError::of_event(name, events[index].position, error));
    }
    if let Record::Job(job) = record {
        sqlx::query(
            "UPDATE projection_rebuild_progress SET position = $3, updated_at = now() \
             WHERE rebuild_id = $1 AND name = $2",
        )
        .bind(job)
        .bind(name)
        .bind(last)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Applies `events` to `projection` in a run's final transaction (a swap's, a check's), as
/// `apply_many` does, but with a panic in the projection's code handled as the build's
/// workers handle it: rolled back to before the events, which are then applied one at a
/// time, so that the run stops at the one that panics, named; a panic only in a multi-row
/// path, which no single event meets, is pinned on none. (A panic comes from the
/// projection's own code between its statements, so the connection is not left mid-way
/// through one.)
pub(crate) async fn apply_final(
    tx: &mut PgConnection,
    projection: Projection,
    events: &[StoredEvent],
) -> Result<(), RunError> {
    if events.is_empty() {
        return Ok(());
    }
    let name = projection.name();
    let failed = |event: &StoredEvent, error| RunError::of_event(name, event.position, error);
    sqlx::query("SAVEPOINT final_events")
        .execute(&mut *tx)
        .await?;
    match panic_as_err(projection.apply_many(tx, events)).await {
        Ok(applied) => applied.map_err(|(index, error)| failed(&events[index], error))?,
        Err(message) => {
            tracing::warn!(
                projection = name,
                error = %message,
                "the final events panicked; applying them one at a time to find the one"
            );
            sqlx::query("ROLLBACK TO SAVEPOINT final_events")
                .execute(&mut *tx)
                .await?;
            for event in events {
                let one = std::slice::from_ref(event);
                match panic_as_err(projection.apply_many(tx, one)).await {
                    Ok(applied) => applied.map_err(|(_, error)| failed(event, error))?,
                    Err(message) => return Err(panicked(name, event.position, message)),
                }
            }
        }
    }
    sqlx::query("RELEASE SAVEPOINT final_events")
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The failure of a run stopped by `name`'s code panicking at the event at `position`.
fn panicked(name: &'static str, position: i64, message: String) -> RunError {
    RunError::of_event(
        name,
        position,
        ProjectionError::Panicked { position, message },
    )
}

/// Runs `work`, turning a panic in it into `Err` with the panic's message (a transaction it
/// owned is dropped, so rolled back; one it borrowed is the caller's to roll back). In the
/// caller's own task, so that a worker stopped with its job stops its batch too.
async fn panic_as_err<T>(work: impl Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .map_err(crate::runner::panic_message)
}
