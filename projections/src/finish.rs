//! Readying a build's copies to serve, after their rows are in: each table is vacuumed,
//! gets the secondary indexes the build left out ([`crate::build::create_schema`]), and is
//! analysed. A few connections share these steps one at a time, not a table at a time, so
//! that the largest table's indexes are built on every connection once the other tables
//! are done, instead of on one while the others run out of work.
//!
//! The order within a table is fixed by PostgreSQL's locks and by what each step is for:
//! - `VACUUM` first. It sets the visibility map (index-only scans; the server may run
//!   without autovacuum) and hint bits once here rather than by the first readers, and it
//!   prunes the dead rows the build's updates left where no older snapshot still sees them,
//!   so that an index built after it seldom finds a broken update chain (which would keep it
//!   from older snapshots). Before the secondary indexes exist it has fewer indexes to clean.
//! - Then the indexes, any number at once (`CREATE INDEX` takes a lock that another index
//!   build shares and a `VACUUM` does not).
//! - `ANALYZE` last: an index on an expression gets its statistics only from an `ANALYZE`
//!   that runs after it exists.
//!
//! Every step is idempotent, so a job killed here does the rest when resumed.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::build::{index_definitions, schema_connection, task_result};
use crate::Projection;

/// What each index build may sort in, per connection, unless the server allows more: room
/// for PostgreSQL to give a large build two parallel workers (32 MB each; its default 64 MB
/// allows one). Its share of the two connections' gain was not told apart from the noise
/// (docs/benchmarks.md).
const INDEX_BUILD_MEMORY: &str = "256MB";

/// Readies the copies of `projections`' tables in `schema` to serve, with `connections`
/// connections at once (see the module's documentation).
pub(crate) async fn finish_tables(
    pool: &PgPool,
    schema: &str,
    projections: &[Projection],
    connections: u16,
) -> sqlx::Result<()> {
    let names = Projection::tables_of(projections);
    let mut sized: Vec<(i64, String)> = sqlx::query_as(
        "SELECT pg_total_relation_size(format('%I.%I', $1::text, t)::regclass), t \
         FROM unnest($2::text[]) AS t",
    )
    .bind(schema)
    .bind(&names)
    .fetch_all(pool)
    .await?;
    // The largest first: its steps are the longest, so they start as early as they can.
    sized.sort_by(|a, b| b.cmp(a));
    let mut tables = Vec::with_capacity(sized.len());
    {
        let mut conn = schema_connection(pool, schema).await?;
        for (_, table) in sized {
            let indexes = missing_indexes(&mut conn, schema, &table).await?;
            tables.push(Table::new(table, indexes));
        }
        conn.close().await?;
    }
    tracing::info!(
        schema,
        tables = tables.len(),
        indexes = tables.iter().map(|t| t.indexes.len()).sum::<usize>(),
        connections,
        "building the copies' indexes and statistics"
    );
    let plan = Arc::new(Plan {
        steps: Mutex::new(Steps {
            tables,
            failed: false,
        }),
        changed: Notify::new(),
    });
    let mut finishers = JoinSet::new();
    for _ in 0..connections.max(1) {
        let (pool, schema, plan) = (pool.clone(), schema.to_string(), Arc::clone(&plan));
        finishers.spawn(async move {
            let mut ends = EndsOnDrop {
                plan: Arc::clone(&plan),
                armed: true,
            };
            let finished = finish(&pool, &schema, &plan).await;
            ends.armed = finished.is_err();
            finished
        });
    }
    let mut first_error = None;
    while let Some(joined) = finishers.join_next().await {
        if let Err(e) = task_result(joined, "index builder") {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The steps left, shared by the finishers; `changed` wakes those waiting for a table's
/// step to end.
struct Plan {
    steps: Mutex<Steps>,
    changed: Notify,
}

impl Plan {
    fn steps(&self) -> std::sync::MutexGuard<'_, Steps> {
        // A finisher that panicked holding the lock left the steps consistent: each is
        // changed by a single assignment.
        self.steps.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Steps {
    /// Largest first.
    tables: Vec<Table>,
    failed: bool,
}

/// One table's steps: where its vacuum and analysis stand, and its indexes.
struct Table {
    name: String,
    vacuum: Stage,
    /// `CREATE INDEX` statements no finisher has taken yet.
    indexes: Vec<String>,
    /// Index builds under way.
    building: usize,
    analyze: Stage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Waiting,
    Running,
    Done,
}

impl Table {
    fn new(name: String, mut indexes: Vec<String>) -> Self {
        // Taken from the end: in the live table's order.
        indexes.reverse();
        Table {
            name,
            vacuum: Stage::Waiting,
            indexes,
            building: 0,
            analyze: Stage::Waiting,
        }
    }

    fn indexed(&self) -> bool {
        self.vacuum == Stage::Done && self.indexes.is_empty() && self.building == 0
    }
}

/// A step for one finisher.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Vacuum(usize),
    Index(usize, String),
    Analyze(usize),
}

impl Step {
    fn describe(&self) -> &str {
        match self {
            Step::Vacuum(_) => "vacuum",
            Step::Index(_, create) => create,
            Step::Analyze(_) => "analyze",
        }
    }
}

/// What a finisher is to do next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Run(Step),
    /// Nothing can start until a step under way ends.
    Wait,
    /// Every step is taken (or the finish failed).
    Done,
}

impl Steps {
    /// Takes the next step: an analysis that is ready (short, and it ends its table), else
    /// a vacuum, else an index whose table is vacuumed; each of the largest table first.
    fn take(&mut self) -> Next {
        if self.failed {
            return Next::Done;
        }
        if let Some(i) = self
            .tables
            .iter()
            .position(|t| t.indexed() && t.analyze == Stage::Waiting)
        {
            self.tables[i].analyze = Stage::Running;
            return Next::Run(Step::Analyze(i));
        }
        if let Some(i) = self.tables.iter().position(|t| t.vacuum == Stage::Waiting) {
            self.tables[i].vacuum = Stage::Running;
            return Next::Run(Step::Vacuum(i));
        }
        let ready = self
            .tables
            .iter()
            .position(|t| t.vacuum == Stage::Done && !t.indexes.is_empty());
        if let Some(i) = ready {
            let table = &mut self.tables[i];
            if let Some(index) = table.indexes.pop() {
                table.building += 1;
                return Next::Run(Step::Index(i, index));
            }
        }
        if self.tables.iter().all(|t| t.analyze != Stage::Waiting) {
            Next::Done
        } else {
            Next::Wait
        }
    }

    fn ended(&mut self, step: &Step) {
        match *step {
            Step::Vacuum(i) => self.tables[i].vacuum = Stage::Done,
            Step::Index(i, _) => self.tables[i].building -= 1,
            Step::Analyze(i) => self.tables[i].analyze = Stage::Done,
        }
    }
}

/// One finisher: runs steps until none is left.
async fn finish(pool: &PgPool, schema: &str, plan: &Plan) -> sqlx::Result<()> {
    let mut conn = schema_connection(pool, schema).await?;
    // Never less than the server's own setting.
    sqlx::query(
        "SELECT set_config('maintenance_work_mem', \
         greatest(pg_size_bytes(current_setting('maintenance_work_mem')), pg_size_bytes($1)) \
         / 1024 || 'kB', false)",
    )
    .bind(INDEX_BUILD_MEMORY)
    .execute(&mut conn)
    .await?;
    while let Some((step, table)) = next_step(plan).await {
        let statement = match &step {
            Step::Vacuum(_) => format!("VACUUM {schema}.{table}"),
            Step::Index(_, create) => create.clone(),
            Step::Analyze(_) => format!("ANALYZE {schema}.{table}"),
        };
        let started = Instant::now();
        sqlx::query(&statement).execute(&mut conn).await?;
        tracing::debug!(
            table,
            step = step.describe(),
            seconds = started.elapsed().as_secs_f64(),
            "finish step done"
        );
        plan.steps().ended(&step);
        plan.changed.notify_waiters();
    }
    conn.close().await
}

/// The next step for a finisher, with its table's name, once one can start; `None` when
/// every step is taken or the finish failed.
async fn next_step(plan: &Plan) -> Option<(Step, String)> {
    loop {
        // Made before looking, so that a step ending after the look still wakes this one.
        let changed = plan.changed.notified();
        {
            let mut steps = plan.steps();
            match steps.take() {
                Next::Run(step) => {
                    let (Step::Vacuum(i) | Step::Index(i, _) | Step::Analyze(i)) = step;
                    let table = steps.tables[i].name.clone();
                    return Some((step, table));
                }
                Next::Done => return None,
                Next::Wait => {}
            }
        }
        changed.await;
    }
}

/// Ends the finish for every finisher when dropped armed: a finisher that fails, or panics
/// in the middle of a step, leaves that step running for good, and the others would wait
/// for it forever. They stop after their current step; the job fails anyway.
struct EndsOnDrop {
    plan: Arc<Plan>,
    armed: bool,
}

impl Drop for EndsOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.plan.steps().failed = true;
            self.plan.changed.notify_waiters();
        }
    }
}

/// The `CREATE INDEX` statement of each index the live `table` has and its copy in
/// `schema` lacks, under the live name. Each index of the copy stands for one live index (a
/// table may have two of one definition): the one of its own name first, as a resumed job
/// built it, so that its twin is not taken for it and built again under a name in use.
async fn missing_indexes(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> sqlx::Result<Vec<String>> {
    let mut live = index_definitions(conn, "public", table).await?;
    let mut copy = index_definitions(conn, schema, table).await?;
    let mut take = |wanted: &dyn Fn(&(String, String)) -> bool| match copy.iter().position(wanted) {
        Some(at) => {
            copy.remove(at);
            true
        }
        None => false,
    };
    live.retain(|index| !take(&|c| c == index));
    live.retain(|(_, definition)| !take(&|(_, d)| d == definition));
    Ok(live
        .into_iter()
        .map(|(name, definition)| {
            definition.replacen(
                "INDEX ON ",
                &format!("INDEX {name} ON {schema}.{table} "),
                1,
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(tables: &[(&str, usize)]) -> Steps {
        Steps {
            tables: tables
                .iter()
                .map(|(name, n)| {
                    let indexes = (0..*n).map(|i| format!("{name}{i}")).collect();
                    Table::new(name.to_string(), indexes)
                })
                .collect(),
            failed: false,
        }
    }

    #[test]
    fn vacuums_come_first_then_indexes_then_the_analysis_of_each_table() {
        let mut s = steps(&[("big", 2), ("small", 0)]);
        assert_eq!(s.take(), Next::Run(Step::Vacuum(0)));
        assert_eq!(s.take(), Next::Run(Step::Vacuum(1)));
        // The big table is still being vacuumed: its indexes cannot start.
        assert_eq!(s.take(), Next::Wait);
        s.ended(&Step::Vacuum(1));
        assert_eq!(s.take(), Next::Run(Step::Analyze(1)));
        s.ended(&Step::Vacuum(0));
        // Two finishers build the big table's two indexes at once.
        assert_eq!(s.take(), Next::Run(Step::Index(0, "big0".into())));
        assert_eq!(s.take(), Next::Run(Step::Index(0, "big1".into())));
        assert_eq!(s.take(), Next::Wait);
        s.ended(&Step::Index(0, "big0".into()));
        // Not analysed while an index is still being built.
        assert_eq!(s.take(), Next::Wait);
        s.ended(&Step::Index(0, "big1".into()));
        assert_eq!(s.take(), Next::Run(Step::Analyze(0)));
        assert_eq!(s.take(), Next::Done);
    }

    #[tokio::test]
    async fn a_finisher_that_fails_or_panics_mid_step_ends_the_others_wait() {
        for panics in [false, true] {
            let plan = Arc::new(Plan {
                steps: Mutex::new(steps(&[("big", 2)])),
                changed: Notify::new(),
            });
            let step = next_step(&plan).await;
            assert_eq!(step, Some((Step::Vacuum(0), "big".into())));
            let waiting = Arc::clone(&plan);
            let other = tokio::spawn(async move { next_step(&waiting).await });
            tokio::task::yield_now().await;
            assert!(!other.is_finished(), "nothing starts while the vacuum runs");
            // The vacuum's finisher ends without ending its step: by an error or a panic.
            let ends = EndsOnDrop {
                plan: Arc::clone(&plan),
                armed: true,
            };
            if panics {
                let finisher = tokio::spawn(async move {
                    let _ends = ends;
                    panic!("a finisher's panic");
                });
                assert!(finisher.await.is_err());
            } else {
                drop(ends);
            }
            let woken = tokio::time::timeout(std::time::Duration::from_secs(10), other).await;
            assert_eq!(woken.expect("woken").unwrap(), None, "panics: {panics}");
        }
    }
}
