//! The group-commit writer: one task per process that appends every queued command in
//! shared transactions, assigning gap-free positions and chained hashes under the ledger lock.
//!
//! Why one task: positions must be gap-free and in commit order, which needs one lock held
//! until commit (DESIGN-NOTES.md). Taking it once per command caps throughput at one commit per
//! command; the writer instead takes whatever queued up while the last batch was committing.
//! It keeps a connection of its own (no pool wait) and spends four round trips on a batch
//! without claims: BEGIN + lock, head + conflict check, INSERT, COMMIT.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs_es::persist::SerializedEvent;
use cqrs_es::Aggregate;
use ledgerline_aggregates::api_key::ApiKey;
use ledgerline_aggregates::organization::Organization;
use ledgerline_aggregates::role::Role;
use ledgerline_aggregates::user::User;
use ledgerline_aggregates::{claims_for, metadata, validate, ClaimOp};
use ledgerline_projections::notify::HEAD_CHANNEL;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::claim_book::ClaimBook;
use super::hash::{event_hash, truncate_to_micros, EventFields, HashVersion, GENESIS};
use super::store::{AppendError, Appended};

/// What the writer answers each command: its events' place in the log, or why they are not
/// there.
type Outcome = Result<Appended, AppendError>;

/// The advisory lock every appender holds until commit, in every process ("ledger").
pub(super) const APPEND_LOCK: i64 = 0x6c65_6467_6572;
/// One round trip: the transaction, and [`APPEND_LOCK`].
const BEGIN_AND_LOCK: &str = "BEGIN; SELECT pg_advisory_xact_lock(119182731994482)";
/// How many commands one transaction may carry.
pub(super) const MAX_BATCH_COMMANDS: usize = 512;
/// The longest the writer waits for the database to answer one round trip (a connection
/// made, a statement, a COMMIT). A database that takes TCP connections but never answers (a
/// half-dead proxy, a frozen server) would otherwise stall every append of the process for
/// as long as TCP keeps the socket. A healthy round trip takes milliseconds; the longest
/// legitimate wait is for [`APPEND_LOCK`], whose holders idle at most
/// [`ledgerline_projections::lease::STALLED_TRANSACTION_LIMIT`] (10 s) before their server
/// ends them.
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(15);
/// The same limits on the server's side, below [`ROUND_TRIP_LIMIT`]: a session the writer
/// gave up on must not go on waiting for the append lock, or take it, after the writer has
/// moved on to a new connection (dropping a socket does not stop its backend's statement).
const SERVER_LIMIT: &str = "12s";
/// How the writer's connection shows in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "ledgerline-writer";

/// Whether `e` is the database's or the connection's failure (no answer in time, a lost
/// connection, the server shutting down), not one command's: the others of a failed batch
/// are then not tried one by one. A lock or statement timeout is not: a command waiting
/// behind a `claims check --repair`'s hold of the append lock, say, may go in after it.
fn database_failed(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || ["57P01", "57P02", "57P03"].contains(&&*c)),
        other => ledgerline_projections::is_connection_error(other),
    }
}

/// `round_trip`, or a timed-out I/O error once [`ROUND_TRIP_LIMIT`] has passed. The
/// connection is then in an unknown state: every error drops it ([`Conn::reset`]).
async fn within<T>(
    round_trip: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    tokio::time::timeout(ROUND_TRIP_LIMIT, round_trip)
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the database did not answer the writer within {ROUND_TRIP_LIMIT:?}"),
            )))
        })
}

/// One command's events, prepared (serialized, tenant read, claims derived) outside the lock.
pub(super) struct Prepared {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub first_sequence: i64,
    pub rows: Vec<Row>,
    pub claims: Vec<ClaimOp>,
    /// The acting key's guards first (the key's, its user's, its organization's, its user's
    /// roles': their refusals say more than another's), then the one the command was decided
    /// against.
    pub guards: Vec<Guard>,
    /// When what the acting key's request was authenticated on ends
    /// (`metadata::ACTOR_VALID_UNTIL`): refused if it would be recorded then or later.
    pub valid_until: Option<DateTime<Utc>>,
}

impl Prepared {
    /// Whether what its request was authenticated on has ended by `recorded_at`: a key
    /// expiring at `t` no longer acts at `t`, as authentication holds it.
    fn ended_by(&self, recorded_at: DateTime<Utc>) -> bool {
        self.valid_until.is_some_and(|until| recorded_at >= until)
    }
}

/// Why a command recorded at or after its `valid_until` is refused.
const ACTOR_ENDED: &str =
    "this key, its secret's grace period or one of its user's role assignments expired";

/// A command's `metadata::ACTOR_VALID_UNTIL`, if it carries one.
fn valid_until(metadata: &Value) -> Result<Option<DateTime<Utc>>, AppendError> {
    let Some(value) = metadata.get(metadata::ACTOR_VALID_UNTIL) else {
        return Ok(None);
    };
    // `FromStr`, not `parse_from_rfc3339`: it also reads the years past 9999 that chrono
    // writes with a sign (an expiry may be that far off).
    value
        .as_str()
        .and_then(|text| text.parse::<DateTime<Utc>>().ok())
        .map(Some)
        .ok_or_else(|| {
            AppendError::Invalid(format!("bad `{}` {value}", metadata::ACTOR_VALID_UNTIL))
        })
}

/// An aggregate and the sequence it had when the command was decided or its request was
/// authenticated: the append is refused if that aggregate has moved on since (by one of
/// `moved_by`'s events, when it names any). Either what the command was decided against
/// (`metadata::GUARD_*`) or where the acting API key stood (`metadata::ACTOR_*_SEQUENCE`).
pub(super) struct Guard {
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    /// The event types that move it; empty: any event of the aggregate.
    moved_by: &'static [&'static str],
    kind: GuardKind,
}

/// A guard as the database checks it: aggregate type, id, sequence, `moved_by` joined.
type GuardKey<'a> = (&'a str, &'a str, i64, String);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum GuardKind {
    ActorKey,
    ActorUser,
    ActorOrganization,
    ActorRole,
    Decided,
}

impl Guard {
    fn from_metadata(metadata: &Value) -> Result<Vec<Guard>, AppendError> {
        let text = |key: &str| metadata.get(key).and_then(Value::as_str);
        // Where the key stood: its own version, and (when it has them) its user's and its
        // organization's, each kept beside the id the metadata names it by.
        let standing = [
            (
                metadata::ACTOR_KEY_SEQUENCE,
                metadata::ACTOR_KEY_ID,
                ApiKey::TYPE,
                &[][..],
                GuardKind::ActorKey,
            ),
            (
                metadata::ACTOR_USER_SEQUENCE,
                metadata::ACTOR_USER_ID,
                User::TYPE,
                &metadata::ACTOR_USER_LOSSES[..],
                GuardKind::ActorUser,
            ),
            (
                metadata::ACTOR_ORGANIZATION_SEQUENCE,
                metadata::ORGANIZATION_ID,
                Organization::TYPE,
                &metadata::ACTOR_ORGANIZATION_LOSSES[..],
                GuardKind::ActorOrganization,
            ),
        ];
        let mut guards = Vec::new();
        for (sequence_key, id_key, aggregate_type, moved_by, kind) in standing {
            let Some(sequence) = text(sequence_key) else {
                continue;
            };
            let id = text(id_key).unwrap_or_default();
            let bad =
                || AppendError::Invalid(format!("bad `{sequence_key}` guard `{id}@{sequence}`"));
            guards.push(Guard {
                aggregate_type: aggregate_type.into(),
                aggregate_id: id.parse::<Uuid>().map_err(|_| bad())?.to_string(),
                sequence: sequence.parse().map_err(|_| bad())?,
                moved_by,
                kind,
            });
        }
        // And each of its user's roles, moved by a change or deletion of the role.
        for role in text(metadata::ACTOR_ROLE_SEQUENCES)
            .into_iter()
            .flat_map(metadata::role_sequences)
        {
            let (id, sequence) = role.map_err(|part| {
                let key = metadata::ACTOR_ROLE_SEQUENCES;
                AppendError::Invalid(format!("bad `{key}` guard `{part}`"))
            })?;
            guards.push(Guard {
                aggregate_type: Role::TYPE.into(),
                aggregate_id: id.to_string(),
                sequence,
                moved_by: &metadata::ACTOR_ROLE_LOSSES[..],
                kind: GuardKind::ActorRole,
            });
        }
        match (
            text(metadata::GUARD_AGGREGATE),
            text(metadata::GUARD_SEQUENCE),
        ) {
            (None, None) => {}
            (Some(aggregate), Some(sequence)) => {
                let bad = || AppendError::Invalid(format!("bad guard `{aggregate}@{sequence}`"));
                let (aggregate_type, aggregate_id) = aggregate.split_once(':').ok_or_else(bad)?;
                guards.push(Guard {
                    aggregate_type: aggregate_type.to_string(),
                    aggregate_id: aggregate_id.to_string(),
                    sequence: sequence.parse().map_err(|_| bad())?,
                    moved_by: &[],
                    kind: GuardKind::Decided,
                });
            }
            _ => {
                return Err(AppendError::Invalid(
                    "a guard needs both its aggregate and its sequence".into(),
                ))
            }
        }
        Ok(guards)
    }

    /// Whether events of these types, written after the guard's sequence, move it.
    fn moved_by_any<'a>(&self, mut types: impl Iterator<Item = &'a str>) -> bool {
        types.any(|t| self.moved_by.is_empty() || self.moved_by.contains(&t))
    }

    /// What it is checked by in the database: its aggregate, sequence and `moved_by` (as one
    /// comma-separated text, empty for any event).
    fn key(&self) -> GuardKey<'_> {
        (
            &self.aggregate_type,
            &self.aggregate_id,
            self.sequence,
            self.moved_by.join(","),
        )
    }

    /// Why a command whose guard moved is refused.
    fn refusal(&self) -> AppendError {
        match self.kind {
            GuardKind::ActorKey => AppendError::KeyChanged,
            GuardKind::ActorUser => AppendError::ActorStopped(
                "this key's user was deactivated, erased, or given or lost a role",
            ),
            GuardKind::ActorOrganization => {
                AppendError::ActorStopped("this key's organization was suspended")
            }
            GuardKind::ActorRole => AppendError::ActorStopped(
                "one of the roles this key's user held (or inherited) was changed or deleted",
            ),
            GuardKind::Decided => AppendError::Stale(self.aggregate_type.to_lowercase()),
        }
    }
}

pub(super) struct Row {
    sequence: i64,
    event_type: String,
    event_version: String,
    organization_id: Option<Uuid>,
    payload: String,
    metadata: String,
}

pub(super) struct AppendRequest {
    pub prepared: Prepared,
    pub reply: oneshot::Sender<Outcome>,
}

pub(super) fn prepare(events: &[SerializedEvent]) -> Result<Prepared, AppendError> {
    let first = events
        .first()
        .ok_or_else(|| AppendError::Invalid("no events".into()))?;
    let mut rows = Vec::with_capacity(events.len());
    let mut claims = Vec::new();
    for e in events {
        let (payload, metadata) = (e.payload.to_string(), e.metadata.to_string());
        // The ledger's `json` columns would take a NUL, but no projection could store it
        // (`text` and `jsonb` cannot): appended, it would stop them for good. The API refuses
        // NULs at the door; this keeps any other way in from poisoning the log.
        if validate::json_has_nul(payload.as_bytes()) || validate::json_has_nul(metadata.as_bytes())
        {
            return Err(AppendError::Invalid(format!(
                "{} holds a NUL character, which no read model can store",
                e.event_type
            )));
        }
        let organization_id = match e.metadata.get(metadata::ORGANIZATION_ID) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(
                Uuid::parse_str(s)
                    .map_err(|_| AppendError::Invalid(format!("bad organization_id `{s}`")))?,
            ),
            Some(other) => {
                return Err(AppendError::Invalid(format!(
                    "bad organization_id `{other}`"
                )))
            }
        };
        claims.extend(
            claims_for(&e.aggregate_type, organization_id, &e.payload)
                .map_err(|err| AppendError::Invalid(err.to_string()))?,
        );
        rows.push(Row {
            sequence: e.sequence as i64,
            event_type: e.event_type.clone(),
            event_version: e.event_version.clone(),
            organization_id,
            payload,
            metadata,
        });
    }
    Ok(Prepared {
        aggregate_type: first.aggregate_type.clone(),
        aggregate_id: first.aggregate_id.clone(),
        first_sequence: first.sequence as i64,
        rows,
        claims,
        guards: Guard::from_metadata(&first.metadata)?,
        valid_until: valid_until(&first.metadata)?,
    })
}

/// The writer's own connection, made on first use and after any failure.
struct Conn {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
}

impl Conn {
    async fn get(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        if self.conn.is_none() {
            let options = self.options.clone().application_name(APPLICATION_NAME);
            let c = within(async {
                let mut c = PgConnection::connect_with(&options).await?;
                // The conflict check is one prepared statement; a generic plan cached while
                // the table was small would scan it whole on every batch.
                c.execute("SET plan_cache_mode = force_custom_plan").await?;
                // Its batches hold the ledger's append lock: a frozen process must not hold
                // every other process's appends with it.
                sqlx::query(
                    "SELECT set_config('idle_in_transaction_session_timeout', $1, false), \
                            set_config('lock_timeout', $2, false), \
                            set_config('statement_timeout', $2, false)",
                )
                .bind(ledgerline_projections::lease::STALLED_TRANSACTION_LIMIT)
                .bind(SERVER_LIMIT)
                .execute(&mut c)
                .await?;
                Ok(c)
            })
            .await?;
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// After a failure the transaction state is unknown: drop the connection (the server
    /// rolls back whatever was open) and reconnect next time.
    fn reset(&mut self) {
        self.conn = None;
    }
}

pub(super) async fn run(
    pool: PgPool,
    mut receiver: mpsc::Receiver<AppendRequest>,
    committed: watch::Sender<i64>,
) {
    let mut conn = Conn {
        options: (*pool.connect_options()).clone(),
        conn: None,
    };
    let mut batch = Vec::with_capacity(MAX_BATCH_COMMANDS);
    while let Some(first) = receiver.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH_COMMANDS {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A caller that stopped waiting (its request timed out, its client hung up) was
        // answered without this command: appending it now would put in the log what its
        // caller was told had failed. (One already in a transaction goes on: see `commit`.)
        batch.retain(|r| !r.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let (prepared, replies): (Vec<_>, Vec<_>) = std::mem::take(&mut batch)
            .into_iter()
            .map(|r| (r.prepared, r.reply))
            .unzip();
        crate::metrics::record_batch(prepared.len(), prepared.iter().map(|p| p.rows.len()).sum());
        match commit(&mut conn, &prepared).await {
            Ok((outcomes, head)) => {
                publish(&committed, head);
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(BatchError::Unknown(e)) => {
                // Whether it committed cannot be learnt: neither success nor a retry (which
                // would be refused as a conflict if it did commit) would be the truth.
                tracing::error!(error = %e, commands = prepared.len(), "append batch outcome unknown");
                for reply in replies {
                    let _ = reply.send(Err(AppendError::Unknown));
                }
            }
            Err(BatchError::NotCommitted(e)) => {
                // A failure of the shared transaction must not fail commands that would
                // have committed alone: retry each on its own. But once the database itself
                // fails (no answer, a lost connection), the rest are not tried: each try
                // could cost the whole round-trip limit again.
                tracing::warn!(error = %e, commands = prepared.len(), "append batch failed; retrying one by one");
                let mut unreachable: Option<String> = None;
                for (p, reply) in prepared.into_iter().zip(replies) {
                    if reply.is_closed() {
                        continue; // its caller was answered without it (see above)
                    }
                    if let Some(why) = &unreachable {
                        let _ = reply.send(Err(AppendError::Database(sqlx::Error::Io(
                            std::io::Error::other(format!("not recorded: {why}")),
                        ))));
                        continue;
                    }
                    let outcome = match commit(&mut conn, std::slice::from_ref(&p)).await {
                        Ok((mut outcomes, head)) => {
                            publish(&committed, head);
                            outcomes.pop().unwrap_or(Err(AppendError::WriterGone))
                        }
                        Err(BatchError::NotCommitted(e)) => {
                            if database_failed(&e) {
                                unreachable = Some(e.to_string());
                            }
                            Err(AppendError::Database(e))
                        }
                        Err(BatchError::Unknown(e)) => {
                            unreachable = Some(e.to_string());
                            Err(AppendError::Unknown)
                        }
                    };
                    let _ = reply.send(outcome);
                }
            }
        }
    }
}

/// Why a batch has no outcomes.
enum BatchError {
    /// Nothing of it is in the log.
    NotCommitted(sqlx::Error),
    /// COMMIT was sent but its answer was lost, and the log could not be read to tell.
    Unknown(sqlx::Error),
}

/// What a batch had decided when it sent COMMIT.
struct Sent {
    outcomes: Vec<Outcome>,
    head: i64,
    /// The last row's hash, which covers every row before it.
    hash: [u8; 32],
}

enum Attempt {
    /// Failed before COMMIT was sent (or the batch wrote nothing): it did not commit.
    Before(sqlx::Error),
    /// Failed once COMMIT was sent: the server may have committed it all the same.
    AtCommit(sqlx::Error, Sent),
}

impl From<sqlx::Error> for Attempt {
    fn from(e: sqlx::Error) -> Self {
        Attempt::Before(e)
    }
}

/// How often, and how far apart, the log is read to learn a lost COMMIT's outcome (a server
/// restarting takes a few seconds to take connections again).
const LEARN_ATTEMPTS: u32 = 10;
const LEARN_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// [`commit_batch`], and when the answer to its COMMIT is lost (the connection dropped, the
/// server restarted), whether it committed, read from the log: answering such commands
/// with an error, or retrying them (refused then as conflicts with themselves), would tell
/// their callers that something in the log is not.
async fn commit(conn: &mut Conn, batch: &[Prepared]) -> Result<(Vec<Outcome>, i64), BatchError> {
    let (error, sent) = match commit_batch(conn, batch).await {
        Ok(done) => return Ok(done),
        Err(Attempt::Before(e)) => {
            conn.reset();
            return Err(BatchError::NotCommitted(e));
        }
        Err(Attempt::AtCommit(e, sent)) => (e, sent),
    };
    conn.reset();
    let mut last = error;
    for attempt in 0..LEARN_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(LEARN_PAUSE).await;
        }
        match landed(conn, sent.head, &sent.hash).await {
            Ok(true) => {
                tracing::warn!(error = %last, head = sent.head, "the answer to COMMIT was lost; the batch is in the log");
                return Ok((sent.outcomes, sent.head));
            }
            Ok(false) => return Err(BatchError::NotCommitted(last)),
            Err(e) => {
                conn.reset();
                last = e;
            }
        }
    }
    Err(BatchError::Unknown(last))
}

/// Whether the log holds `hash` at `position`. Under the append lock: a transaction whose
/// COMMIT is still in flight holds it, so the answer is final.
async fn landed(conn: &mut Conn, position: i64, hash: &[u8; 32]) -> Result<bool, sqlx::Error> {
    let conn = conn.get().await?;
    within(async {
        conn.execute(BEGIN_AND_LOCK).await?;
        let stored: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT hash FROM events WHERE position = $1")
                .bind(position)
                .fetch_optional(&mut *conn)
                .await?;
        conn.execute("ROLLBACK").await?;
        Ok(stored.as_deref() == Some(hash.as_slice()))
    })
    .await
}

fn publish(committed: &watch::Sender<i64>, head: i64) {
    committed.send_if_modified(|p| {
        let newer = head > *p;
        *p = (*p).max(head);
        newer
    });
}

/// Commits what it can of `batch` in one transaction. Returns, per command, its last
/// position or why it was refused, and the head position after the commit.
async fn commit_batch(conn: &mut Conn, batch: &[Prepared]) -> Result<(Vec<Outcome>, i64), Attempt> {
    let conn = conn.get().await?;
    // The lock in a statement of its own, so that every later statement's snapshot is taken
    // after it is held and sees every earlier appender's commit.
    within(conn.execute(BEGIN_AND_LOCK)).await?;
    let (head_position, head_hash, existing, stale) =
        within(head_and_conflicts(conn, batch)).await?;
    let mut claims = within(ClaimBook::load(conn, batch)).await?;

    // When the batch is recorded, as its events will say: what an acting key's request was
    // authenticated on must still hold then.
    let recorded_at = truncate_to_micros(Utc::now());
    // Decide, in arrival order, which commands go in.
    let mut outcomes: Vec<Option<Outcome>> = (0..batch.len()).map(|_| None).collect();
    let mut taken: HashSet<(&str, &str, i64)> = HashSet::new();
    // The event types written to each aggregate by commands accepted earlier in this batch:
    // a guard they move is stale even though the database does not show it yet.
    let mut written: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
    for (i, p) in batch.iter().enumerate() {
        let moved = p.guards.iter().enumerate().find(|(n, g)| {
            stale.contains(&(i, *n))
                || written
                    .get(&(g.aggregate_type.as_str(), g.aggregate_id.as_str()))
                    .is_some_and(|types| g.moved_by_any(types.iter().copied()))
        });
        if let Some((_, g)) = moved {
            outcomes[i] = Some(Err(g.refusal()));
            continue;
        }
        if p.ended_by(recorded_at) {
            outcomes[i] = Some(Err(AppendError::ActorStopped(ACTOR_ENDED)));
            continue;
        }
        let clash = existing.contains(&i)
            || p.rows.iter().any(|r| {
                taken.contains(&(
                    p.aggregate_type.as_str(),
                    p.aggregate_id.as_str(),
                    r.sequence,
                ))
            });
        if clash {
            outcomes[i] = Some(Err(AppendError::Conflict));
            continue;
        }
        if let Err((scope, holder)) = claims.apply(
            &p.claims,
            &format!("{}:{}", p.aggregate_type, p.aggregate_id),
        ) {
            outcomes[i] = Some(Err(AppendError::Taken { scope, holder }));
            continue;
        }
        for r in &p.rows {
            taken.insert((&p.aggregate_type, &p.aggregate_id, r.sequence));
        }
        written
            .entry((&p.aggregate_type, &p.aggregate_id))
            .or_default()
            .extend(p.rows.iter().map(|r| r.event_type.as_str()));
    }

    let mut cols = Columns::default();
    let mut position = head_position;
    let mut prev = head_hash;
    for (i, p) in batch.iter().enumerate() {
        if outcomes[i].is_some() {
            continue;
        }
        for r in &p.rows {
            position += 1;
            let hash = event_hash(
                &prev,
                &EventFields {
                    hash_version: HashVersion::CURRENT,
                    position,
                    aggregate_type: &p.aggregate_type,
                    aggregate_id: &p.aggregate_id,
                    sequence: r.sequence,
                    event_type: &r.event_type,
                    event_version: &r.event_version,
                    organization_id: r.organization_id,
                    recorded_at,
                    payload: &r.payload,
                    metadata: &r.metadata,
                },
            );
            cols.push(p, r, position, recorded_at, &prev, &hash);
            prev = hash;
        }
        outcomes[i] = Some(Ok(Appended {
            position,
            recorded_at,
        }));
    }

    if !cols.position.is_empty() {
        within(cols.insert(conn)).await?;
        within(claims.save(conn)).await?;
        // Tells other processes' projections and maintainer of the new head when (and only
        // if) this commits; sent with COMMIT, so it costs no round trip.
        let notify_and_commit = format!("SELECT pg_notify('{HEAD_CHANNEL}', '{position}'); COMMIT");
        if let Err(e) = within(conn.execute(notify_and_commit.as_str())).await {
            let sent = Sent {
                outcomes: decided(outcomes),
                head: position,
                hash: prev,
            };
            return Err(Attempt::AtCommit(e, sent));
        }
    } else {
        within(conn.execute("COMMIT")).await?;
    }
    Ok((decided(outcomes), position))
}

fn decided(outcomes: Vec<Option<Outcome>>) -> Vec<Outcome> {
    outcomes
        .into_iter()
        .map(|o| o.expect("every command decided"))
        .collect()
}

/// The head; the indexes of the commands whose first sequence number is already stored (a
/// concurrent command on the same aggregate committed first); and the guards, as (command
/// index, guard index), whose aggregate has moved past the guard's sequence (by one of its
/// `moved_by` events, when it names any). One round trip; a guard many commands share (their
/// key's, user's, roles' or organization's) is looked up once.
async fn head_and_conflicts(
    conn: &mut PgConnection,
    batch: &[Prepared],
) -> Result<(i64, [u8; 32], HashSet<usize>, HashSet<(usize, usize)>), sqlx::Error> {
    let types: Vec<&str> = batch.iter().map(|p| p.aggregate_type.as_str()).collect();
    let ids: Vec<&str> = batch.iter().map(|p| p.aggregate_id.as_str()).collect();
    let seqs: Vec<i64> = batch.iter().map(|p| p.first_sequence).collect();
    // Each distinct guard once, with every (command, guard) it stands for.
    let mut distinct: HashMap<GuardKey, Vec<(usize, usize)>> = HashMap::new();
    for (i, p) in batch.iter().enumerate() {
        for (n, g) in p.guards.iter().enumerate() {
            distinct.entry(g.key()).or_default().push((i, n));
        }
    }
    let distinct: Vec<_> = distinct.into_iter().collect();
    let guard_idx: Vec<i64> = (0..distinct.len() as i64).collect();
    let guard_types: Vec<&str> = distinct.iter().map(|((ty, ..), _)| *ty).collect();
    let guard_ids: Vec<&str> = distinct.iter().map(|((_, id, ..), _)| *id).collect();
    let guard_seqs: Vec<i64> = distinct.iter().map(|((_, _, seq, _), _)| *seq).collect();
    let guard_moved_by: Vec<&str> = distinct.iter().map(|((.., by), _)| by.as_str()).collect();
    let (position, hash, existing, stale): (Option<i64>, Option<Vec<u8>>, Vec<i64>, Vec<i64>) =
        sqlx::query_as(
            "SELECT h.position, h.hash,
                ARRAY(SELECT t.idx FROM unnest($1::text[], $2::text[], $3::bigint[]) WITH ORDINALITY AS t(ty, id, seq, idx)
                      JOIN events e ON e.aggregate_type = t.ty AND e.aggregate_id = t.id AND e.sequence = t.seq),
                ARRAY(SELECT g.idx FROM unnest($4::bigint[], $5::text[], $6::text[], $7::bigint[], $8::text[])
                                        AS g(idx, ty, id, seq, moved_by)
                      WHERE CASE WHEN g.moved_by = ''
                            THEN COALESCE((SELECT max(e.sequence) FROM events e
                                           WHERE e.aggregate_type = g.ty AND e.aggregate_id = g.id), 0) <> g.seq
                            ELSE EXISTS (SELECT 1 FROM events e
                                         WHERE e.aggregate_type = g.ty AND e.aggregate_id = g.id
                                           AND e.sequence > g.seq
                                           AND e.event_type = ANY (string_to_array(g.moved_by, ',')))
                            END)
         FROM (SELECT 1) AS one
         LEFT JOIN LATERAL (SELECT position, hash FROM events ORDER BY position DESC LIMIT 1) h ON true",
        )
        .bind(&types)
        .bind(&ids)
        .bind(&seqs)
        .bind(&guard_idx)
        .bind(&guard_types)
        .bind(&guard_ids)
        .bind(&guard_seqs)
        .bind(&guard_moved_by)
        .fetch_one(&mut *conn)
        .await?;
    let hash = match hash {
        Some(h) => h
            .try_into()
            .map_err(|_| sqlx::Error::Protocol("head hash is not 32 bytes".into()))?,
        None => GENESIS,
    };
    Ok((
        position.unwrap_or(0),
        hash,
        existing.into_iter().map(|idx| idx as usize - 1).collect(),
        stale
            .into_iter()
            .flat_map(|idx| distinct[idx as usize].1.iter().copied())
            .collect(),
    ))
}

/// The batch's rows as column arrays, for one multi-row INSERT.
#[derive(Default)]
struct Columns<'a> {
    aggregate_type: Vec<&'a str>,
    aggregate_id: Vec<&'a str>,
    sequence: Vec<i64>,
    event_type: Vec<&'a str>,
    event_version: Vec<&'a str>,
    payload: Vec<&'a str>,
    metadata: Vec<&'a str>,
    position: Vec<i64>,
    organization_id: Vec<Option<Uuid>>,
    recorded_at: Vec<chrono::DateTime<Utc>>,
    prev_hash: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
}

impl<'a> Columns<'a> {
    fn push(
        &mut self,
        p: &'a Prepared,
        r: &'a Row,
        position: i64,
        recorded_at: chrono::DateTime<Utc>,
        prev: &[u8; 32],
        hash: &[u8; 32],
    ) {
        self.aggregate_type.push(&p.aggregate_type);
        self.aggregate_id.push(&p.aggregate_id);
        self.sequence.push(r.sequence);
        self.event_type.push(&r.event_type);
        self.event_version.push(&r.event_version);
        self.payload.push(&r.payload);
        self.metadata.push(&r.metadata);
        self.position.push(position);
        self.organization_id.push(r.organization_id);
        self.recorded_at.push(recorded_at);
        self.prev_hash.push(prev.to_vec());
        self.hash.push(hash.to_vec());
    }

    async fn insert(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                                 payload, metadata, position, organization_id, recorded_at, prev_hash, hash,
                                 hash_version)
             SELECT ty, id, seq, et, ev, pl::json, md::json, pos, org, at, ph, h, $13
             FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::bigint[], $9::uuid[], $10::timestamptz[], $11::bytea[], $12::bytea[])
                  AS t(ty, id, seq, et, ev, pl, md, pos, org, at, ph, h)",
        )
        .bind(&self.aggregate_type)
        .bind(&self.aggregate_id)
        .bind(&self.sequence)
        .bind(&self.event_type)
        .bind(&self.event_version)
        .bind(&self.payload)
        .bind(&self.metadata)
        .bind(&self.position)
        .bind(&self.organization_id)
        .bind(&self.recorded_at)
        .bind(&self.prev_hash)
        .bind(&self.hash)
        .bind(HashVersion::CURRENT.number())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::persist::SerializedEvent;
    use serde_json::json;

    use super::{prepare, AppendError, Guard, GuardKind};
    use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
    use serde_json::Value;

    fn event(payload: serde_json::Value, metadata: serde_json::Value) -> SerializedEvent {
        SerializedEvent {
            aggregate_id: "00000000-0000-0000-0000-000000000001".into(),
            sequence: 1,
            aggregate_type: "Conversation".into(),
            event_type: "ConversationUpdated".into(),
            event_version: "1.0".into(),
            payload,
            metadata,
        }
    }

    #[test]
    fn events_holding_a_nul_are_refused_before_they_reach_the_log() {
        for (payload, metadata) in [
            (json!({"description": "a\u{0}"}), json!({})),
            (json!({"settings": {"a\u{0}": 1}}), json!({})),
            (json!({}), json!({"user_agent": "x\u{0}"})),
        ] {
            let refused = prepare(&[event(payload.clone(), metadata.clone())]);
            assert!(
                matches!(&refused, Err(AppendError::Invalid(m)) if m.contains("NUL")),
                "{payload} {metadata}: {:?}",
                refused.err()
            );
        }
        assert!(prepare(&[event(json!({"description": "\\u0000"}), json!({}))]).is_ok());
    }

    /// Where the acting key stood becomes its guards, key first; a user's, organization's
    /// or role's guard is moved only by the events that stop them or change it, a
    /// decided-against guard by any.
    #[test]
    fn where_the_key_stood_guards_the_command_against_what_stops_it() {
        let (key, user, org, role, parent) = (
            "00000000-0000-0000-0000-00000000000a",
            "00000000-0000-0000-0000-00000000000b",
            "00000000-0000-0000-0000-00000000000c",
            "00000000-0000-0000-0000-00000000000d",
            "00000000-0000-0000-0000-00000000000e",
        );
        let prepared = prepare(&[event(
            json!({}),
            json!({"actor_key_id": key, "actor_key_sequence": "3",
                   "actor_user_id": user, "actor_user_sequence": "7",
                   "organization_id": org, "actor_organization_sequence": "2",
                   "actor_role_sequences": format!("{role}@4,{parent}@1"),
                   "guard_aggregate": "Conversation:c", "guard_sequence": "5"}),
        )])
        .unwrap();
        let found: Vec<_> = prepared
            .guards
            .iter()
            .map(|g| {
                (
                    g.kind,
                    g.aggregate_type.as_str(),
                    g.aggregate_id.as_str(),
                    g.sequence,
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                (GuardKind::ActorKey, "ApiKey", key, 3),
                (GuardKind::ActorUser, "User", user, 7),
                (GuardKind::ActorOrganization, "Organization", org, 2),
                (GuardKind::ActorRole, "Role", role, 4),
                (GuardKind::ActorRole, "Role", parent, 1),
                (GuardKind::Decided, "Conversation", "c", 5),
            ]
        );
        let [key, user, org, role, _, decided] = &prepared.guards[..] else {
            panic!("six guards");
        };
        let moves = |g: &Guard, types: &[&str]| g.moved_by_any(types.iter().copied());
        assert!(moves(key, &["ApiKeyLabelled"]));
        assert!(!moves(user, &["UserProfileUpdated", "UserReactivated"]));
        for stop in [
            "UserDeactivated",
            "UserErased",
            "UserRoleAssigned",
            "UserRoleRevoked",
        ] {
            assert!(moves(user, &["UserProfileUpdated", stop]), "{stop}");
        }
        assert!(!moves(
            org,
            &["OrganizationUpdated", "OrganizationReactivated"]
        ));
        assert!(moves(org, &["OrganizationSuspended"]));
        assert!(!moves(role, &["RoleCreated"]));
        for change in ["RoleUpdated", "RoleDeleted"] {
            assert!(moves(role, &[change]), "{change}");
        }
        assert!(moves(decided, &["ConversationUpdated"]));
        assert!(!moves(decided, &[]));
        assert!(matches!(
            user.refusal(),
            AppendError::ActorStopped(m) if m.contains("user was deactivated")
        ));
        assert!(matches!(org.refusal(), AppendError::ActorStopped(m) if m.contains("suspended")));
        assert!(matches!(
            role.refusal(),
            AppendError::ActorStopped(m) if m.contains("roles this key's user held")
        ));
        assert!(matches!(key.refusal(), AppendError::KeyChanged));
    }

    /// A sequence without the id it belongs to, or a role's guard not written as the app
    /// writes it, is a bug of the caller, refused before the log.
    #[test]
    fn a_standing_sequence_without_its_id_is_refused() {
        for metadata in [
            json!({"actor_user_sequence": "7"}),
            json!({"actor_organization_sequence": "2"}),
            json!({"actor_user_id": "x", "actor_user_sequence": "7"}),
            json!({"actor_role_sequences": "00000000-0000-0000-0000-00000000000d"}),
            json!({"actor_role_sequences": "x@1"}),
            json!({"actor_role_sequences": "00000000-0000-0000-0000-00000000000d@one"}),
            json!({"actor_role_sequences": ""}),
        ] {
            let refused = prepare(&[event(json!({}), metadata.clone())]);
            assert!(
                matches!(&refused, Err(AppendError::Invalid(m)) if m.contains("guard")),
                "{metadata}: {:?}",
                refused.err()
            );
        }
    }

    /// The end a request's key carries is read as the app writes it (RFC 3339, microseconds,
    /// a year past 9999 with a sign), and holds until just before it; anything else is a bug
    /// of the caller, refused before the log.
    #[test]
    fn an_actors_end_is_read_or_refused() {
        let prepared = |metadata: Value| prepare(&[event(json!({}), metadata)]);
        let until = |metadata: Value| prepared(metadata).map(|p| p.valid_until);
        assert_eq!(until(json!({})).unwrap(), None);
        let written = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
        for at in [
            "2026-12-07T21:00:00.123456Z"
                .parse::<DateTime<Utc>>()
                .unwrap(),
            "+10000-01-01T00:00:00Z".parse().unwrap(),
        ] {
            assert_eq!(
                until(json!({ "actor_valid_until": written(at) })).unwrap(),
                Some(at)
            );
            let p = prepared(json!({ "actor_valid_until": written(at) })).unwrap();
            let micro = TimeDelta::microseconds(1);
            assert!(!p.ended_by(at - micro) && p.ended_by(at) && p.ended_by(at + micro));
        }
        assert!(!prepared(json!({})).unwrap().ended_by(Utc::now()));
        for bad in [json!("tomorrow"), json!(1_765_000_000), json!(null)] {
            let refused = until(json!({ "actor_valid_until": bad }));
            assert!(
                matches!(&refused, Err(AppendError::Invalid(m)) if m.contains("actor_valid_until")),
                "{bad}: {refused:?}"
            );
        }
    }

    #[test]
    fn the_lock_statement_names_the_ledger_lock() {
        assert!(super::BEGIN_AND_LOCK.contains(&format!("({})", super::APPEND_LOCK)));
    }
}
