//! ledgerline's read models: how each event of the ledger lands in its tables, and the
//! runner that applies events in position order, exactly once, with a checkpoint per
//! projection.
#![forbid(unsafe_code)]

use chrono::{DateTime, Utc};
use uuid::Uuid;

mod build;
mod check;
mod conversation_batch;
pub mod copy_in;
mod decode;
mod dependents;
mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod finish;
mod give_up;
pub mod lease;
mod messaging_batch;
pub mod notify;
mod projection;
mod projector;
mod rebuild;
mod roles_batch;
mod run_lock;
mod runner;
mod snapshots;
mod tail;
mod user_roles_batch;
mod users_batch;

pub mod api_keys;
mod api_keys_batch;
pub mod audit_events;
pub mod messaging;
pub mod organizations;
pub mod roles;
pub mod user_roles;
pub mod users;

pub use build::{Phase, Progress, ProgressState};
pub use check::{check, CheckReport, CheckedProjection, CheckedTable};
pub use error::{is_connection_error, ProjectionError, RunError};
pub use projection::Projection;
pub use projector::{Projector, ProjectorHandle, Waited};
pub use rebuild::{
    abandon_rebuild, job_kept, last_swapped, rebuild, rebuild_progress, resolve, resume_command,
    resume_or_abandon, RebuildOptions, RebuildProgress, RebuildSummary, SwappedJob,
};
pub use runner::{
    catch_up, names, reset, retry, run_batch, run_leased_batch, status, BatchOutcome,
    ProjectionFailure, ProjectionStatus,
};

static BULK_FALLBACKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many batches, since the process started, a projection's multi-row path handed to its
/// one-event-at-a-time path: an event that fails (reported as usual), or a case the
/// multi-row path does not cover. Rising on a healthy log means rebuilds run slower than
/// they should.
pub fn bulk_fallbacks() -> u64 {
    BULK_FALLBACKS.load(std::sync::atomic::Ordering::Relaxed)
}

pub(crate) fn note_bulk_fallback(projection: &str, error: &dyn std::fmt::Display) {
    BULK_FALLBACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(projection, %error, "multi-row batch applied one event at a time instead");
}

static BATCH_ERRORS: [std::sync::atomic::AtomicU64; Projection::ALL.len()] =
    [const { std::sync::atomic::AtomicU64::new(0) }; Projection::ALL.len()];

/// How many of each projection's live batches, since the process started, failed for a
/// reason that says nothing about the event (a lost connection, a deadlock, a full disk, a
/// statement timeout) and were left to the next poll rather than recorded as the
/// projection's failure. Such a cause may last (a full disk does): this, the log's warnings
/// and the lag are where it shows, not `projection_failures` or `/readyz`.
pub fn batch_errors() -> Vec<(&'static str, u64)> {
    Projection::ALL
        .iter()
        .map(|p| {
            let n = BATCH_ERRORS[p.index()].load(std::sync::atomic::Ordering::Relaxed);
            (p.name(), n)
        })
        .collect()
}

pub(crate) fn note_batch_error(projection: Projection) {
    BATCH_ERRORS[projection.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// One row of the ledger's `events` table, as projections and verifiers read it.
/// `payload` and `metadata` are the exact JSON text stored (and hashed).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredEvent {
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub organization_id: Option<Uuid>,
    pub recorded_at: DateTime<Utc>,
    pub payload: String,
    pub metadata: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
    /// The format of `hash` (1 or 2; docs/ledger-format.md, section 3).
    pub hash_version: i16,
}

/// How a session of `pg_stat_activity a` is named to an operator looking for it, in SQL
/// that constant SQL can `concat!`: its application (`?` when unnamed, or hidden from a role
/// without `pg_read_all_stats`), ...
macro_rules! session_application {
    () => {
        "coalesce(nullif(a.application_name, ''), '?')"
    };
}

/// ... where it connects from (`?` when hidden, or when a LEFT JOIN found no session) ...
macro_rules! session_client {
    () => {
        "CASE WHEN a.pid IS NULL OR a.backend_type IS NULL THEN '?' \
         ELSE coalesce(host(a.client_addr), 'a local socket') END"
    };
}

/// ... and the start of its last statement, on one line.
macro_rules! session_query {
    () => {
        "left(regexp_replace(coalesce(a.query, ''), '[[:space:]]+', ' ', 'g'), 80)"
    };
}
pub(crate) use {session_application, session_client, session_query};

/// The SQL of [`IMPOSSIBLE_TIME`], as a macro so that other constant SQL can `concat!` it.
#[macro_export]
macro_rules! impossible_time {
    () => {
        "(NOT isfinite(recorded_at) OR recorded_at >= '262143-01-01 00:00:00+00')"
    };
}

/// Whether an event's `recorded_at` is one no writer stores: `infinity`, or past what
/// `DateTime` holds (NULL when `recorded_at` is NULL).
pub const IMPOSSIBLE_TIME: &str = impossible_time!();

/// The column list that [`StoredEvent`] is read with, in field order. A `recorded_at` that no
/// writer stores (`infinity`, or past what `DateTime` holds: only a superuser's edit, which
/// `verify` reports) is read as NULL, which fails the read with a decoding error: decoding
/// the value itself would panic.
pub const STORED_EVENT_COLUMNS: &str = concat!(
    "position, aggregate_type, aggregate_id, sequence, event_type, event_version, \
     organization_id, CASE WHEN NOT ",
    impossible_time!(),
    " THEN recorded_at END AS recorded_at, \
     payload::text AS payload, metadata::text AS metadata, prev_hash, hash, hash_version"
);

/// A subject whose key an event destroys (a user erased, a message deleted), and the request
/// that appended the event (its API key and `Idempotency-Key`), whose own kept answer, read
/// once the key was gone, stays.
#[derive(Debug, Clone)]
pub(crate) struct Forgotten {
    subject: Uuid,
    by_key: Option<Uuid>,
    by_idempotency_key: Option<String>,
}

impl Forgotten {
    pub(crate) fn of(subject: Uuid, event: &StoredEvent) -> Result<Self, ProjectionError> {
        let meta = decode::Metadata::of(event)?;
        Ok(Self {
            subject,
            by_key: meta.uuid(ledgerline_aggregates::metadata::ACTOR_KEY_ID)?,
            by_idempotency_key: meta
                .text(ledgerline_aggregates::metadata::IDEMPOTENCY_KEY)?
                .map(str::to_string),
        })
    }

    pub(crate) fn subjects(forgotten: &[Forgotten]) -> Vec<Uuid> {
        forgotten.iter().map(|f| f.subject).collect()
    }
}

/// Users' data keys, by user.
pub(crate) const SUBJECT_KEYS: (&str, &str) = ("subject_keys", "subject_id");
/// Messages' content keys, by message.
pub(crate) const MESSAGE_KEYS: (&str, &str) = ("message_keys", "message_id");

/// Destroys the keys of `forgotten`'s subjects (`table`: `subject_keys` or `message_keys`,
/// keyed by `column`) and forgets the answers the API keeps for `Idempotency-Key` replays
/// (`idempotency_keys`) that name them, in the transaction that applies their erasure or
/// deletion, as the request that erased or deleted does (`api::idempotency::
/// forget_answers_naming`), for when it stopped before it could. The row of the request that
/// appended the event is left alone: its answer was read with the key gone.
///
/// Rows still `running` take a subject into their `subjects` (so that one that read it
/// before cannot keep what it showed) only when this transaction is the one that destroys its
/// key: a rebuild replaying an erasure long done finds no key and marks no live request (a
/// check replays into empty stand-ins, `build::OUTSIDE_TABLES`, and touches nothing live).
/// They are marked first, and stored answers blanked after, in statements of their own that
/// index scans serve: a request that keeps its answer meanwhile is either marked before it
/// keeps, or kept before the blanking reads it.
pub(crate) async fn destroy_keys_and_forget(
    conn: &mut sqlx::PgConnection,
    (table, column): (&str, &str),
    forgotten: &[Forgotten],
) -> sqlx::Result<()> {
    let subjects = Forgotten::subjects(forgotten);
    let destroyed: Vec<Uuid> = sqlx::query_scalar(&format!(
        "DELETE FROM {table} WHERE {column} = ANY($1) RETURNING {column}"
    ))
    .bind(&subjects)
    .persistent(false)
    .fetch_all(&mut *conn)
    .await?;
    let by_keys: Vec<Option<Uuid>> = forgotten.iter().map(|f| f.by_key).collect();
    let by_idempotency_keys: Vec<Option<String>> = forgotten
        .iter()
        .map(|f| f.by_idempotency_key.clone())
        .collect();
    // The appending requests' own rows: (API key, Idempotency-Key) pairs.
    const NOT_THEIRS: &str = "NOT EXISTS (SELECT 1 FROM unnest($2::uuid[], $3::text[]) o (k, i) \
                              WHERE o.k = idempotency_keys.api_key_id AND o.i = idempotency_keys.key)";
    // Each statement takes its subjects as $1 and the appending requests as $2 and $3.
    let mut forget = async |sql: String, subjects: &[Uuid]| {
        sqlx::query(&sql)
            .bind(subjects)
            .bind(&by_keys)
            .bind(&by_idempotency_keys)
            .persistent(false)
            .execute(&mut *conn)
            .await
    };
    if !destroyed.is_empty() {
        let sql = format!(
            "UPDATE idempotency_keys SET subjects = subjects || ARRAY( \
                 SELECT d FROM unnest($1::uuid[]) d WHERE NOT subjects @> ARRAY[d]) \
             WHERE state = 'running' AND {NOT_THEIRS}"
        );
        forget(sql, &destroyed).await?;
    }
    let sql = format!(
        "UPDATE idempotency_keys SET body = NULL \
         WHERE subjects && $1 AND body IS NOT NULL AND {NOT_THEIRS}"
    );
    forget(sql, &subjects).await?;
    Ok(())
}
