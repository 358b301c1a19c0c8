//! Applying the log to the read models: a batch of events and the checkpoint that covers it
//! commit together, so each event takes effect exactly once; an event that cannot be applied
//! stops its projection there, recorded in `projection_failures`, until an operator retries.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};

use crate::{Projection, ProjectionError, RunError, StoredEvent, STORED_EVENT_COLUMNS};

/// Batch size for [`catch_up`]: large enough that a rebuild is not dominated by commits.
const CATCH_UP_BATCH: i64 = 1000;

/// An event a projection could not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProjectionFailure {
    pub position: i64,
    pub error: String,
    pub failed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// `applied` events were applied (0 when there was nothing new); the checkpoint is now
    /// `checkpoint`.
    Applied { applied: usize, checkpoint: i64 },
    /// The projection is stopped just before `failure.position` (`checkpoint` is the last
    /// event applied). It stays there, whatever the later events, until [`retry`].
    Failed {
        checkpoint: i64,
        failure: ProjectionFailure,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProjectionStatus {
    pub name: &'static str,
    /// How far it has got: the last position applied, moved past the following events it
    /// does not read (the live projector records those at its next batch, see `tail.rs`).
    pub position: i64,
    /// The position recorded in its checkpoint row.
    pub checkpoint: i64,
    /// The last position in the ledger.
    pub head: i64,
    pub lag: i64,
    pub failures: Vec<ProjectionFailure>,
}

/// The stable names of all projections, in the order they are run.
pub fn names() -> Vec<&'static str> {
    Projection::ALL.iter().map(|p| p.name()).collect()
}

/// Applies up to `max_events` events after the projection's checkpoint, in one transaction
/// that also advances the checkpoint. Concurrent runners of the same projection (in this
/// process or another) serialise on the checkpoint row.
pub async fn run_batch(
    pool: &PgPool,
    projection: Projection,
    max_events: i64,
) -> Result<BatchOutcome, RunError> {
    batch(pool, projection, max_events, None, None).await
}

/// [`run_batch`] for the holder of the projection's lease (`projection:<name>`): refused
/// with [`RunError::NotLeaseHolder`] unless `holder` holds it, and the lease cannot change
/// hands until the batch has committed (see `lease::fence`). The projector runs its batches
/// so.
///
/// A panic in the projection's code (a bug, perhaps met only by some event) does not end the
/// caller's task with it: the batch's events are applied again one per batch, and the
/// projection stops at the one that panics, recorded as a failure like an event it cannot
/// apply (shown by `status`, `/readyz` and the metrics, and tried again by [`retry`] once the
/// code is fixed).
///
/// A batch that has not ended after `stall_limit` is stalled (a rebuild's `COPY` twice stayed
/// half-sent with every task parked; `build::build`): it holds the checkpoint row, and so
/// every command waiting for the projection. Its session is ended, which rolls it back, its
/// task dropped, and [`RunError::Stalled`] returned; the next batch starts afresh. Its
/// transactions' lock waits end at about the same limit, on the server (see [`begin`]): a
/// batch still waiting in its opening statement has no session known to end.
pub async fn run_leased_batch(
    pool: &PgPool,
    projection: Projection,
    max_events: i64,
    holder: &str,
    stall_limit: Duration,
) -> Result<BatchOutcome, RunError> {
    match caught(pool, projection, max_events, holder, stall_limit).await {
        Err(RunError::Aborted { panicked: true, .. }) => {
            one_at_a_time(pool, projection, max_events, holder, stall_limit).await
        }
        outcome => outcome,
    }
}

/// A batch's database session, once its transaction has begun: its pid and the
/// transaction's start, which tell it from a later transaction of the same pooled
/// connection.
type Session = Arc<Mutex<Option<(i32, DateTime<Utc>)>>>;

/// A leased batch in a task of its own, which a panic ends instead of the caller's, and
/// which is dropped, its session ended, if it stalls (see [`run_leased_batch`]).
async fn caught(
    pool: &PgPool,
    projection: Projection,
    max_events: i64,
    holder: &str,
    stall_limit: Duration,
) -> Result<BatchOutcome, RunError> {
    let session = Session::default();
    let mut task = {
        let (pool, holder, session) = (pool.clone(), holder.to_string(), Arc::clone(&session));
        tokio::spawn(async move {
            let watch = Some((&session, stall_limit));
            batch(&pool, projection, max_events, Some(&holder), watch).await
        })
    };
    let joined = match tokio::time::timeout(stall_limit, &mut task).await {
        Ok(joined) => joined,
        Err(_) => {
            let began = *session.lock().unwrap_or_else(|p| p.into_inner());
            // Unknown while its first statement still waits (for the checkpoint row, say):
            // the batch's lock timeout ends that wait about now (see `begin`), and the
            // dropped transaction rolls back. A transaction that has ended meanwhile has
            // another start, or none.
            let ended = match began {
                Some((pid, xact_start)) => end_session(pool, pid, xact_start).await,
                None => Ok(()),
            };
            task.abort();
            match task.await {
                Err(e) if e.is_cancelled() => {
                    tracing::warn!(
                        projection = projection.name(),
                        waited_seconds = stall_limit.as_secs_f64(),
                        session = ?began,
                        ended = ?ended,
                        "a projection batch did not end; its task was dropped and its \
                         session, once known, ended"
                    );
                    return Err(RunError::Stalled {
                        what: "a projection batch",
                        setting: "LEDGERLINE_PROJECTION_STALL_SECS",
                        waited: stall_limit,
                        behind: format!("the events of {} after its checkpoint", projection.name()),
                        attempts: 1,
                    });
                }
                // It ended as the time ran out (or panicked): its own outcome stands.
                other => other,
            }
        }
    };
    joined.unwrap_or_else(|e| {
        let panicked = e.is_panic();
        let message = match e.try_into_panic() {
            Ok(payload) => panic_message(payload),
            Err(e) => e.to_string(),
        };
        Err(RunError::Aborted {
            name: projection.name(),
            message,
            panicked,
        })
    })
}

/// Ends a stalled batch's session, if its transaction is still the one that began then, on
/// a connection of its own: the pool may have none free (its connections may all be
/// batches waiting as this one does), and the batch's task, dropped next, must not be cut
/// off in the middle of a `COPY` on a live connection. Within [`END_SESSION_WAIT`], as the
/// pool's acquire was: a connection has no time limit of its own.
async fn end_session(pool: &PgPool, pid: i32, xact_start: DateTime<Utc>) -> sqlx::Result<()> {
    let end = async {
        let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid = $1 AND xact_start = $2",
        )
        .bind(pid)
        .bind(xact_start)
        .execute(&mut conn)
        .await?;
        conn.close().await
    };
    tokio::time::timeout(END_SESSION_WAIT, end)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()))
}

/// How long [`end_session`] may take.
const END_SESSION_WAIT: Duration = Duration::from_secs(10);

/// What a panic said, if it said it in text.
pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match (
        payload.downcast_ref::<&str>(),
        payload.downcast_ref::<String>(),
    ) {
        (Some(text), _) => text.to_string(),
        (_, Some(text)) => text.clone(),
        _ => "a panic without a message".to_string(),
    }
}

/// After a batch panicked: the events after the checkpoint again, one per batch, until the
/// one that panics (the projection then stops there), the end of the log, or as many as the
/// batch could hold.
async fn one_at_a_time(
    pool: &PgPool,
    projection: Projection,
    max_events: i64,
    holder: &str,
    stall_limit: Duration,
) -> Result<BatchOutcome, RunError> {
    tracing::warn!(
        projection = projection.name(),
        "a batch panicked; applying its events one at a time to find the one"
    );
    let mut applied: usize = 0;
    let mut reached = None;
    loop {
        let outcome = match (single(pool, projection, holder, stall_limit).await, reached) {
            (Ok(outcome), _) => outcome,
            // What was applied before the error stands: report it; the next batch meets the
            // error again if it lasts.
            (Err(e), Some(checkpoint)) => {
                tracing::warn!(projection = projection.name(), error = %e, "applying one at a time stopped");
                return Ok(BatchOutcome::Applied {
                    applied,
                    checkpoint,
                });
            }
            (Err(e), None) => return Err(e),
        };
        match outcome {
            BatchOutcome::Applied {
                applied: 1,
                checkpoint,
            } if ((applied + 1) as i64) < max_events => {
                applied += 1;
                reached = Some(checkpoint);
            }
            BatchOutcome::Applied {
                applied: more,
                checkpoint,
            } => {
                return Ok(BatchOutcome::Applied {
                    applied: applied + more,
                    checkpoint,
                })
            }
            failed @ BatchOutcome::Failed { .. } => return Ok(failed),
        }
    }
}

/// One event after the checkpoint, in a batch of its own; a panic stops the projection there.
async fn single(
    pool: &PgPool,
    projection: Projection,
    holder: &str,
    stall_limit: Duration,
) -> Result<BatchOutcome, RunError> {
    // Read before the batch, which reads it again under the checkpoint's lock: the event it
    // panics at is the one after this, unless another runner moved the checkpoint meanwhile,
    // which `stop_at` sees.
    let (checkpoint, next) = checkpoint_and_next(pool, projection.name()).await?;
    match caught(pool, projection, 1, holder, stall_limit).await {
        Err(RunError::Aborted {
            panicked: true,
            message,
            ..
        }) => {
            // No event to blame: the panic was not an event's. Tried again later.
            let Some(position) = next else {
                return Err(RunError::Aborted {
                    name: projection.name(),
                    message,
                    panicked: true,
                });
            };
            let error = ProjectionError::Panicked { position, message };
            let opening = Opening {
                pool,
                projection,
                holder: Some(holder),
                watch: None,
            };
            stop_at(opening, checkpoint, &[], position, error).await
        }
        other => other,
    }
}

/// The projection's checkpoint (0 before its first batch) and the position after it, if any.
async fn checkpoint_and_next(pool: &PgPool, name: &str) -> sqlx::Result<(i64, Option<i64>)> {
    sqlx::query_as(
        "SELECT c.position, (SELECT min(e.position) FROM events e WHERE e.position > c.position) \
         FROM (SELECT coalesce((SELECT position FROM projection_checkpoints WHERE name = $1), 0) \
               AS position) c",
    )
    .bind(name)
    .fetch_one(pool)
    .await
}

/// The most PostgreSQL takes as a `lock_timeout`, in milliseconds (`i32::MAX`, about 24.8
/// days): a longer stall limit bounds a batch's lock waits by this instead.
const LOCK_TIMEOUT_MAX_MS: u128 = 2_147_483_647;

/// How a batch's transactions are begun: the projection, the lease's holder (none where the
/// caller holds no lease) and, for a watched batch, its watch. A batch that fails records the
/// failure in a transaction begun the same way ([`stop_at`]).
#[derive(Clone, Copy)]
struct Opening<'a> {
    pool: &'a PgPool,
    projection: Projection,
    holder: Option<&'a str>,
    watch: Option<(&'a Session, Duration)>,
}

/// Begins a batch's transaction and opens it ([`open`]). A watched batch ([`caught`]) has
/// `watch`: where it tells its session, and the watch's limit, which also bounds each of
/// its transaction's lock waits (in `BEGIN`'s own round trip). A batch waiting for a lock
/// (the checkpoint row, behind a swap) before its session is known so ends its wait on
/// the server about when the watch gives up on it (the server's clock starts a little
/// later, once the pool gave a connection), instead of holding its pooled connection until
/// the lock is free.
async fn begin(
    Opening {
        pool,
        projection,
        holder,
        watch,
    }: Opening<'_>,
) -> Result<
    (
        Transaction<'static, Postgres>,
        bool,
        i64,
        Option<ProjectionFailure>,
    ),
    RunError,
> {
    let mut tx = match watch {
        Some((_, limit)) => {
            let millis = limit.as_millis().clamp(1, LOCK_TIMEOUT_MAX_MS);
            pool.begin_with(format!("BEGIN; SET LOCAL lock_timeout = {millis}"))
                .await?
        }
        None => pool.begin().await?,
    };
    let (fenced, checkpoint, failure, began) = open(&mut tx, projection.name(), holder).await?;
    if let Some((session, _)) = watch {
        *session.lock().unwrap_or_else(|p| p.into_inner()) = Some(began);
    }
    Ok((tx, fenced, checkpoint, failure))
}

async fn batch(
    pool: &PgPool,
    projection: Projection,
    max_events: i64,
    holder: Option<&str>,
    watch: Option<(&Session, Duration)>,
) -> Result<BatchOutcome, RunError> {
    let name = projection.name();
    let opening = Opening {
        pool,
        projection,
        holder,
        watch,
    };
    let (mut tx, fenced, checkpoint, failure) = begin(opening).await?;
    if !fenced {
        return Err(RunError::NotLeaseHolder(name));
    }
    if let Some(failure) = failure {
        tx.commit().await?;
        return Ok(BatchOutcome::Failed {
            checkpoint,
            failure,
        });
    }
    let limit = max_events.max(1);
    let events = match read_events(&mut tx, checkpoint, i64::MAX, limit).await {
        Ok(events) => events,
        // A row no writer stores (the log was altered: a time `DateTime` cannot hold, see
        // `STORED_EVENT_COLUMNS`, or a NULL once a constraint was dropped): stop at the first
        // such event, once those before it are applied.
        Err(e @ sqlx::Error::ColumnDecode { .. }) => {
            let altered: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT min(position) FROM (SELECT * FROM events \
                 WHERE position > $1 ORDER BY position LIMIT $2) e WHERE {UNREADABLE}"
            ))
            .bind(checkpoint)
            .bind(limit)
            .fetch_one(&mut *tx)
            .await?;
            let Some(altered) = altered else {
                return Err(e.into());
            };
            let before = read_events(&mut tx, checkpoint, altered, limit).await?;
            tx.rollback().await?;
            let error = ProjectionError::decode(
                altered,
                "the event cannot be read: a NULL where the writer always stores a value, or \
                 a recorded_at no writer stores (the log was altered; `ledgerline verify` \
                 names it)",
            );
            return stop_at(opening, checkpoint, &before, altered, error).await;
        }
        Err(e) => return Err(e.into()),
    };
    match projection.apply_many(&mut tx, &events).await {
        Ok(()) => {
            let last = events.last().map_or(checkpoint, |e| e.position);
            if last != checkpoint {
                advance(&mut tx, name, last).await?;
            }
            tx.commit().await?;
            Ok(BatchOutcome::Applied {
                applied: events.len(),
                checkpoint: last,
            })
        }
        Err((index, error)) => {
            // The failed statement aborted the transaction: start over without the event.
            tx.rollback().await?;
            let failed = events[index].position;
            stop_at(opening, checkpoint, &events[..index], failed, error).await
        }
    }
}

/// An `events` row that [`StoredEvent`] cannot be read from: a NULL in a column the writer
/// always fills, or a time no writer stores.
const UNREADABLE: &str = concat!(
    "(recorded_at IS NULL OR ",
    crate::impossible_time!(),
    " OR aggregate_type IS NULL OR aggregate_id IS NULL OR sequence IS NULL \
     OR event_type IS NULL OR event_version IS NULL OR payload IS NULL OR metadata IS NULL \
     OR prev_hash IS NULL OR hash IS NULL)"
);

/// Up to `limit` events after `after` and before `before`, in order.
async fn read_events(
    tx: &mut Transaction<'_, Postgres>,
    after: i64,
    before: i64,
    limit: i64,
) -> sqlx::Result<Vec<StoredEvent>> {
    sqlx::query_as(&format!(
        "SELECT {STORED_EVENT_COLUMNS} FROM events WHERE position > $1 AND position < $2 \
         ORDER BY position LIMIT $3"
    ))
    .bind(after)
    .bind(before)
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
}

/// Applies `prefix` (the events before the failing one, at `failed`) and records the
/// failure, in one transaction opened as a batch is (the lease checked and held, an idle
/// limit). If one of those events now fails too (the database changed in between), the
/// projection stops at that earlier one instead.
async fn stop_at(
    opening: Opening<'_>,
    checkpoint: i64,
    mut prefix: &[StoredEvent],
    mut failed: i64,
    mut error: ProjectionError,
) -> Result<BatchOutcome, RunError> {
    let name = opening.projection.name();
    loop {
        // A lost connection or a deadlock says nothing about the event: retry the batch
        // later rather than stop the projection.
        error = match error.into_transient() {
            Ok(e) => return Err(RunError::Sql(e)),
            Err(error) => error,
        };
        let (mut tx, fenced, now, recorded) = begin(opening).await?;
        if !fenced {
            // The lease moved while the batch failed: its new holder meets the event itself.
            return Err(RunError::NotLeaseHolder(name));
        }
        if now != checkpoint || recorded.is_some() {
            // Another runner got here first: re-applying our prefix would apply it twice, or
            // apply it past the failure that runner recorded (`open` reads it afresh).
            tx.commit().await?;
            return Ok(match recorded {
                Some(failure) => BatchOutcome::Failed {
                    checkpoint: now,
                    failure,
                },
                None => BatchOutcome::Applied {
                    applied: 0,
                    checkpoint: now,
                },
            });
        }
        if let Err((earlier, e)) = opening.projection.apply_many(&mut tx, prefix).await {
            tx.rollback().await?;
            (failed, error) = (prefix[earlier].position, e);
            prefix = &prefix[..earlier];
            continue;
        }
        let last = prefix.last().map_or(checkpoint, |e| e.position);
        if last != checkpoint {
            advance(&mut tx, name, last).await?;
        }
        let position = failed;
        let message = error.to_string();
        let failed_at: DateTime<Utc> = sqlx::query_scalar(
            "INSERT INTO projection_failures (name, position, error) VALUES ($1, $2, $3) \
             ON CONFLICT (name, position) DO UPDATE SET error = EXCLUDED.error, \
             failed_at = now() RETURNING failed_at",
        )
        .bind(name)
        .bind(position)
        .bind(&message)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::error!(
            projection = name,
            position,
            error = %message,
            "projection stopped at an event it cannot apply"
        );
        let failure = ProjectionFailure {
            position,
            error: message,
            failed_at,
        };
        return Ok(BatchOutcome::Failed {
            checkpoint: last,
            failure,
        });
    }
}

/// Opens a batch in one round trip, which matters because the live projector runs a batch
/// per projection after every commit of the writer. It
/// - makes the batch commit without waiting for the WAL flush: the batch notifies its
///   checkpoint (see `advance`), and PostgreSQL serialises the commits of notifying
///   transactions, flush included, which would hold up the writer's commits. Read models
///   commit atomically with their checkpoint, so a crash that loses this commit only makes
///   the projection apply the batch again;
/// - checks that `holder` (if any) holds the projection's lease, and keeps it from changing
///   hands until the batch ends (`lease::fence`), which a frozen process could then do
///   forever: the transaction ends if it idles past `lease::STALLED_TRANSACTION_LIMIT`;
/// - locks the checkpoint (created at 0 if new), then reads the first recorded failure (also
///   locked, so that one a swap or reset is deleting meanwhile is waited for and skipped).
///   In that order, as a swap or reset takes them: the failure's lateral join depends on the
///   checkpoint's, so it runs after it (a failure row held while waiting for a checkpoint a
///   swap held made a deadlock). The failure is read by `projection_first_failure` (migration
///   0009) with a snapshot taken then, not the statement's: a failure another runner recorded
///   while this one waited for the checkpoint is seen, not applied past;
/// - returns its session (pid and transaction start), for ending a batch that stalls.
async fn open(
    tx: &mut Transaction<'_, Postgres>,
    name: &'static str,
    holder: Option<&str>,
) -> Result<(bool, i64, Option<ProjectionFailure>, (i32, DateTime<Utc>)), RunError> {
    type Row = (
        bool,
        Option<i64>,
        Option<i64>,
        Option<String>,
        Option<DateTime<Utc>>,
        i32,
        DateTime<Utc>,
    );
    let (fenced, checkpoint, position, error, failed_at, pid, began): Row = sqlx::query_as(
        "SELECT \
         ($2::text IS NULL OR EXISTS (SELECT 1 FROM leases WHERE name = $3 AND holder = $2 \
              AND expires_at > clock_timestamp() FOR SHARE)) \
           AND set_config('synchronous_commit', 'off', true) = 'off' \
           AND set_config('idle_in_transaction_session_timeout', $4, true) <> '', \
         c.position, f.position, f.error, f.failed_at, pg_backend_pid(), now() \
         FROM (SELECT 1) AS one \
         LEFT JOIN LATERAL (SELECT name, position FROM projection_checkpoints \
              WHERE name = $1 FOR UPDATE) c ON true \
         LEFT JOIN LATERAL projection_first_failure(coalesce(c.name, $1)) f ON true",
    )
    .bind(name)
    .bind(holder)
    .bind(format!("projection:{name}"))
    .bind(crate::lease::STALLED_TRANSACTION_LIMIT)
    .fetch_one(&mut **tx)
    .await?;
    let failure = match (position, error, failed_at) {
        (Some(position), Some(error), Some(failed_at)) => Some(ProjectionFailure {
            position,
            error,
            failed_at,
        }),
        _ => None,
    };
    let session = (pid, began);
    match checkpoint {
        Some(position) => Ok((fenced, position, failure, session)),
        // No checkpoint row yet (a first batch): the failure was read before the row was
        // made and locked, so it is read again.
        None => {
            let position = lock_checkpoint(tx, name).await?;
            Ok((fenced, position, first_failure(tx, name).await?, session))
        }
    }
}

/// The projection's checkpoint, locked until the transaction ends (created at 0 if new).
async fn lock_checkpoint(tx: &mut Transaction<'_, Postgres>, name: &str) -> sqlx::Result<i64> {
    sqlx::query("INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(&mut **tx)
        .await?;
    sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = $1 FOR UPDATE")
        .bind(name)
        .fetch_one(&mut **tx)
        .await
}

async fn advance(
    tx: &mut Transaction<'_, Postgres>,
    name: &str,
    position: i64,
) -> sqlx::Result<()> {
    // Processes following this projection learn of it when the batch commits.
    sqlx::query(
        "UPDATE projection_checkpoints SET position = $2, updated_at = now() WHERE name = $1 \
         RETURNING pg_notify($3, name || ':' || position)",
    )
    .bind(name)
    .bind(position)
    .bind(crate::notify::CHECKPOINT_CHANNEL)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn first_failure(
    conn: &mut PgConnection,
    name: &str,
) -> sqlx::Result<Option<ProjectionFailure>> {
    let row: Option<(i64, String, DateTime<Utc>)> =
        sqlx::query_as("SELECT position, error, failed_at FROM projection_first_failure($1)")
            .bind(name)
            .fetch_optional(conn)
            .await?;
    Ok(row.map(|(position, error, failed_at)| ProjectionFailure {
        position,
        error,
        failed_at,
    }))
}

pub(crate) async fn head(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COALESCE(MAX(position), 0)::bigint FROM events")
        .fetch_one(pool)
        .await
}

/// Runs every projection up to the head as it is now. Each projection is run even if an
/// earlier one failed, so one broken projection does not hold back the others; the first
/// failure is then returned.
pub async fn catch_up(pool: &PgPool) -> Result<(), RunError> {
    let head = head(pool).await?;
    let mut first_error = None;
    for projection in Projection::ALL {
        let name = projection.name();
        loop {
            match run_batch(pool, projection, CATCH_UP_BATCH).await? {
                BatchOutcome::Applied {
                    applied,
                    checkpoint,
                } => {
                    if applied > 0 {
                        tracing::info!(
                            projection = name,
                            position = checkpoint,
                            head,
                            "caught up to"
                        );
                    }
                    if applied == 0 || checkpoint >= head {
                        break;
                    }
                }
                BatchOutcome::Failed { failure, .. } => {
                    first_error.get_or_insert(RunError::Failed {
                        name,
                        position: failure.position,
                        error: failure.error,
                    });
                    break;
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Where every projection stands, for operators and health checks.
pub async fn status(pool: &PgPool) -> Result<Vec<ProjectionStatus>, RunError> {
    let checkpoints: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, position FROM projection_checkpoints")
            .fetch_all(pool)
            .await?;
    // Read after the checkpoints, which only ever name committed positions: no projection
    // is then ahead of the head, nor its lag negative, however busy the writer is.
    let head = head(pool).await?;
    let failures: Vec<(String, i64, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT name, position, error, failed_at FROM projection_failures ORDER BY name, position",
    )
    .fetch_all(pool)
    .await?;
    let mut reached = Vec::new();
    for p in Projection::ALL {
        let checkpoint = checkpoints
            .iter()
            .find(|(n, _)| n == p.name())
            .map_or(0, |(_, pos)| *pos);
        reached.push((checkpoint, reach(pool, p, checkpoint, head).await?));
    }
    Ok(Projection::ALL
        .iter()
        .zip(reached)
        .map(|(p, (checkpoint, reached))| {
            let name = p.name();
            let failures: Vec<ProjectionFailure> = failures
                .iter()
                .filter(|(n, ..)| n == name)
                .map(|(_, position, error, failed_at)| ProjectionFailure {
                    position: *position,
                    error: error.clone(),
                    failed_at: *failed_at,
                })
                .collect();
            // Never past the event it is stopped at, as the projector's own reach: an event
            // no projection can read stops even those that skip its kind.
            let position = failures
                .iter()
                .map(|f| f.position)
                .min()
                .map_or(reached, |f| reached.min(f - 1).max(checkpoint));
            ProjectionStatus {
                name,
                position,
                checkpoint,
                head,
                lag: head - position,
                failures,
            }
        })
        .collect())
}

/// How far [`status`] looks past a checkpoint for an event the projection reads: the live
/// projector's window (`tail.rs`), so a projection far behind is not scanned to the head.
const REACH_SCAN: i64 = 1 << 16;

/// The position before the first event after `checkpoint` that `projection` reads (`head`
/// when there is none): what it has effectively reached. Looks at most [`REACH_SCAN`]
/// events ahead.
async fn reach(
    pool: &PgPool,
    projection: Projection,
    checkpoint: i64,
    head: i64,
) -> sqlx::Result<i64> {
    let Some((aggregates, events)) = projection.read_set() else {
        return Ok(checkpoint);
    };
    let until = head.min(checkpoint + REACH_SCAN);
    let next: Option<i64> = sqlx::query_scalar(
        "SELECT position FROM events WHERE position > $1 AND position <= $2 \
         AND (aggregate_type = ANY($3) OR aggregate_type || '.' || event_type = ANY($4)) \
         ORDER BY position LIMIT 1",
    )
    .bind(checkpoint)
    .bind(until)
    .bind(aggregates)
    .bind(events)
    .fetch_optional(pool)
    .await?;
    Ok(next.map_or(until, |p| p - 1).max(checkpoint))
}

/// Empties the read models of the named projections (all if `None`) and forgets their
/// checkpoints and failures, in one transaction, so that the next run rebuilds them from
/// the start of the log. `permissions` (reference data) and `subject_keys` (destroyed keys
/// must stay destroyed) are never touched.
pub async fn reset(pool: &PgPool, names: Option<&[&str]>) -> Result<(), RunError> {
    let projections = crate::rebuild::resolve(names)?;
    if projections.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
    let tables = Projection::tables_of(&projections);
    let mut tx = pool.begin().await?;
    // Take the checkpoint rows first, in name order, as runners do: a batch in flight then
    // finishes before the truncation instead of deadlocking against it.
    sqlx::query(
        "SELECT name FROM projection_checkpoints WHERE name = ANY($1) ORDER BY name FOR UPDATE",
    )
    .bind(&names)
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!("TRUNCATE {}", tables.join(", ")))
        .execute(&mut *tx)
        .await?;
    // Processes that wait for these projections learn that they start over.
    sqlx::query(
        "DELETE FROM projection_checkpoints WHERE name = ANY($1) \
         RETURNING pg_notify($2, name || ':0')",
    )
    .bind(&names)
    .bind(crate::notify::CHECKPOINT_CHANNEL)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM projection_failures WHERE name = ANY($1)")
        .bind(&names)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(projections = ?names, "projections reset; they rebuild from position 0");
    Ok(())
}

/// Clears the projection's recorded failures so that its next run tries the failed event
/// again. It never skips the event: if it still fails, the projection stops there again.
/// Returns how many failure rows were cleared.
pub async fn retry(pool: &PgPool, name: &str) -> Result<u64, RunError> {
    let projection =
        Projection::from_name(name).ok_or_else(|| RunError::UnknownProjection(name.to_string()))?;
    let cleared = sqlx::query("DELETE FROM projection_failures WHERE name = $1")
        .bind(projection.name())
        .execute(pool)
        .await?
        .rows_affected();
    tracing::info!(
        projection = name,
        cleared,
        "projection failures cleared for a retry"
    );
    Ok(cleared)
}
