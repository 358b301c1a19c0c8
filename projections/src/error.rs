//! The errors of applying one event and of running projections.

/// Why one event could not be applied to a read model.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    /// The stored event is not one this projection understands (unknown type or version,
    /// malformed payload or metadata). Retrying cannot help until the code changes.
    #[error("cannot decode the event at position {position}: {message}")]
    Decode { position: i64, message: String },
    /// The event is well formed but does not fit the read model, e.g. it changes a row that
    /// was never created. Applying it anyway would let the read model drift silently.
    #[error("the event at position {position} does not fit the read model: {message}")]
    Inconsistent { position: i64, message: String },
    /// The projection's code panicked applying the event (a bug in it, found by applying
    /// the batch's events one at a time).
    #[error("the projection's code panicked at the event at position {position}: {message}")]
    Panicked { position: i64, message: String },
}

impl ProjectionError {
    pub(crate) fn decode(position: i64, message: impl Into<String>) -> Self {
        Self::Decode {
            position,
            message: message.into(),
        }
    }

    pub(crate) fn inconsistent(position: i64, message: impl Into<String>) -> Self {
        Self::Inconsistent {
            position,
            message: message.into(),
        }
    }

    /// The SQL error, if the failure belongs to the moment (a lost connection, a deadlock,
    /// a cancelled statement) rather than to the event: such errors are retried, not
    /// recorded as the event's failure.
    pub(crate) fn into_transient(self) -> Result<sqlx::Error, Self> {
        match self {
            Self::Sql(e) if is_transient(&e) => Ok(e),
            other => Err(other),
        }
    }
}

fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        // SQLSTATE classes 08 (connection), 40 (serialization failure, deadlock),
        // 53 (insufficient resources), 57 (operator intervention: cancel, shutdown,
        // statement timeout), and 55P03 (lock timeout).
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c == "55P03"
                || ["08", "40", "53", "57"]
                    .iter()
                    .any(|class| c.starts_with(class))
        }),
        other => is_connection_error(other),
    }
}

/// Whether `e` is the connection's failure (I/O, TLS, the protocol, the pool) rather than an
/// answer of the server's.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// Why running projections did not complete.
impl RunError {
    /// A rebuild or check could not apply the event at `position` to its copy of `name`,
    /// unless the failure belongs to the moment (see [`ProjectionError::into_transient`]).
    /// The live projection is not stopped by it.
    pub(crate) fn of_event(name: &'static str, position: i64, error: ProjectionError) -> Self {
        match error.into_transient() {
            Ok(e) => RunError::Sql(e),
            Err(error) => RunError::Replay {
                name,
                position,
                error: error.to_string(),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    /// The projection is stopped at an event it could not apply; see `projection_failures`.
    #[error("projection `{name}` is stopped at position {position}: {error}")]
    Failed {
        name: &'static str,
        position: i64,
        error: String,
    },
    /// A rebuild or check could not apply an event to its copy of the projection's tables
    /// (the live projection goes on as it was).
    #[error("the copy of `{name}` could not apply the event at position {position}: {error}")]
    Replay {
        name: &'static str,
        position: i64,
        error: String,
    },
    #[error("unknown projection `{0}`; the projections are {known}", known = crate::names().join(", "))]
    UnknownProjection(String),
    /// This process does not hold the projection's lease (another process runs it).
    #[error("projection `{0}` is leased to another process")]
    NotLeaseHolder(&'static str),
    /// Another `projections rebuild` holds the rebuild lock.
    #[error("another rebuild is running against this database")]
    RebuildRunning,
    /// An interrupted job of other projections would be left half done.
    #[error(
        "rebuild job {job} of {} is unfinished: {}",
        projections.join(", "),
        crate::rebuild::resume_or_abandon(projections)
    )]
    RebuildInProgress { job: i64, projections: Vec<String> },
    /// The database session holding the run's advisory lock ended while the run went on
    /// (an `idle_session_timeout`, a firewall or pooler, `pg_terminate_backend`): another
    /// run could now take the lock, so this one stopped. `next` says what is left and what
    /// to run.
    #[error(
        "the {run} lost its lock: the database session holding it ended ({cause}); it \
         stopped rather than go on without it: {next}"
    )]
    LockLost {
        run: &'static str,
        cause: String,
        next: String,
    },
    /// Other sessions held the live tables on every attempt at the swap; the job of
    /// `projections` keeps its work.
    #[error(
        "other sessions held the live tables through all {attempts} attempts at the swap \
         (holding them now: {holders}): {}",
        crate::rebuild::job_kept(*job, projections)
    )]
    SwapBusy {
        attempts: u32,
        holders: String,
        job: i64,
        projections: Vec<String>,
    },
    /// Transactions whose snapshots are older than the complete copies were still open
    /// after the wait: swapped in under them, the tables would look half-built to them.
    #[error(
        "transactions whose snapshots are older than the rebuilt tables were still open after \
         {waited} s (`--snapshot-wait-secs`), and would read the tables half-built once \
         swapped in: {sessions}; let them end (or end them): {}",
        crate::rebuild::job_kept(*job, projections)
    )]
    OldSnapshots {
        waited: u64,
        sessions: String,
        job: i64,
        projections: Vec<String>,
    },
    /// Objects depend on the live tables the job would swap, or would be lost with them
    /// (see `dependents`); `next` says whether a job keeps its work.
    #[error(
        "the rebuild cannot swap these tables in without breaking or losing what hangs on \
         the live ones: {}. A view, rule, foreign key or function on them stops the swap, \
         and a publication, trigger, policy or statistics object would be lost with them (a \
         publication's subscribers keeping the old rows). Drop them (or take the tables out \
         of the publication) for the rebuild and make them again after it; {next}",
        dependents.join("; ")
    )]
    Dependents {
        dependents: Vec<String>,
        next: String,
    },
    /// A statement of the swap failed; PostgreSQL's DETAIL (sqlx's message leaves it out)
    /// says more, e.g. which objects depend on a table.
    #[error("the swap failed: {error} (DETAIL: {detail})")]
    SwapFailed { error: String, detail: String },
    /// A migration changed a live table while its copy was being built.
    #[error(
        "the live table `{0}` changed since the rebuild began (a migration?): the job is \
         abandoned; run the rebuild again"
    )]
    LiveTablesChanged(String),
    /// A live checkpoint went back while a check built its copy (a reset, say): the copy is
    /// ahead of the live tables, and comparing them would report the gap as drift.
    #[error(
        "projection `{name}` went back from position {from} to {to} during the check (reset?); \
         run the check again"
    )]
    MovedBack {
        name: &'static str,
        from: i64,
        to: i64,
    },
    /// A batch's task ended without an outcome: it panicked (the message), or the runtime
    /// was shutting down.
    #[error("a batch of `{name}` ended abnormally: {message}")]
    Aborted {
        name: &'static str,
        message: String,
        panicked: bool,
    },
    /// Leftover sessions on a job's or check's schema that could not be ended.
    #[error(
        "database sessions left on `{schema}` by an earlier run could not be ended ({why}): \
         {sessions}; end them (pg_terminate_backend, as their role or a superuser), then run \
         again"
    )]
    OrphanSessions {
        schema: String,
        sessions: String,
        why: String,
    },
    /// `what` (a build, a swap, a live batch) went `waited` without advancing, on each of
    /// its `attempts` sets of connections (`setting` says how long it may); its sessions
    /// were ended, and what it committed stays.
    #[error(
        "{what} stalled: nothing advanced for {} s (`{setting}`){}; still to go: {behind}",
        waited.as_secs_f64(),
        if *attempts > 1 {
            format!(" in each of {attempts} attempts, the later ones on new connections")
        } else {
            String::new()
        }
    )]
    Stalled {
        what: &'static str,
        setting: &'static str,
        waited: std::time::Duration,
        behind: String,
        attempts: u32,
    },
}
