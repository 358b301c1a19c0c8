//! The chained event store: a `PersistedEventRepository` for cqrs-es that appends through
//! one group-commit writer, assigning gap-free positions and hashes under a ledger lock.
//!
//! Why a writer task: positions must be gap-free and in commit order, which needs one lock
//! held until commit (DESIGN-NOTES.md). Taking it once per command caps throughput at one
//! commit per command; the writer instead takes whatever commands queued up while the last
//! batch was committing and commits them together.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use ledgerline_aggregates::{claims_for, metadata, ClaimOp};
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::hash::{event_hash, truncate_to_micros, EventFields, GENESIS};

/// The advisory lock every appender holds until commit, in every process.
const LEDGER_LOCK: i64 = 0x6c65_6467_6572; // "ledger"
/// How many commands one transaction may carry.
const MAX_BATCH_COMMANDS: usize = 512;

/// Why an append was refused.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another command on the same aggregate got there first.
    #[error("the aggregate was changed concurrently; reload and retry")]
    Conflict,
    /// A name, slug, address or prefix that must be unique is taken.
    #[error("{scope} is already taken")]
    Taken { scope: &'static str },
    #[error("invalid event: {0}")]
    Invalid(String),
    #[error("ledger database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the ledger writer has stopped")]
    WriterGone,
}

impl From<AppendError> for PersistenceError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Conflict => PersistenceError::OptimisticLockError,
            AppendError::Database(e) => PersistenceError::ConnectionError(Box::new(e)),
            other => PersistenceError::UnknownError(Box::new(other)),
        }
    }
}

/// One command's events, prepared outside the lock.
struct Prepared {
    aggregate_type: String,
    aggregate_id: String,
    first_sequence: i64,
    rows: Vec<Row>,
    claims: Vec<ClaimOp>,
}

struct Row {
    sequence: i64,
    event_type: String,
    event_version: String,
    organization_id: Option<Uuid>,
    payload: String,
    metadata: String,
}

struct AppendRequest {
    prepared: Prepared,
    reply: oneshot::Sender<Result<i64, AppendError>>,
}

/// The ledger head: the newest position (0 when empty) and its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub position: i64,
    pub hash: [u8; 32],
}

/// Cheap to clone; every clone appends through the same writer.
#[derive(Clone)]
pub struct LedgerStore {
    pool: PgPool,
    sender: mpsc::Sender<AppendRequest>,
    committed: watch::Receiver<i64>,
}

impl LedgerStore {
    /// Starts the writer task. `committed` follows the newest position this process committed.
    pub fn start(pool: PgPool) -> Self {
        let (sender, receiver) = mpsc::channel(4 * MAX_BATCH_COMMANDS);
        let (committed_tx, committed) = watch::channel(0);
        tokio::spawn(writer(pool.clone(), receiver, committed_tx));
        Self {
            pool,
            sender,
            committed,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Follows the newest position committed through this store (for projections and
    /// read-your-writes waits).
    pub fn committed(&self) -> watch::Receiver<i64> {
        self.committed.clone()
    }

    pub async fn head(&self) -> Result<Head, sqlx::Error> {
        read_head(&self.pool).await
    }

    async fn append(&self, events: &[SerializedEvent]) -> Result<i64, AppendError> {
        let prepared = prepare(events)?;
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(AppendRequest { prepared, reply })
            .await
            .map_err(|_| AppendError::WriterGone)?;
        answer.await.map_err(|_| AppendError::WriterGone)?
    }
}

pub async fn read_head<'e, E: sqlx::PgExecutor<'e>>(db: E) -> Result<Head, sqlx::Error> {
    let row: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1")
            .fetch_optional(db)
            .await?;
    Ok(match row {
        None => Head {
            position: 0,
            hash: GENESIS,
        },
        Some((position, hash)) => Head {
            position,
            hash: hash.try_into().unwrap_or(GENESIS),
        },
    })
}

fn prepare(events: &[SerializedEvent]) -> Result<Prepared, AppendError> {
    let first = events
        .first()
        .ok_or_else(|| AppendError::Invalid("no events".into()))?;
    let mut rows = Vec::with_capacity(events.len());
    let mut claims = Vec::new();
    for e in events {
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
            payload: e.payload.to_string(),
            metadata: e.metadata.to_string(),
        });
    }
    Ok(Prepared {
        aggregate_type: first.aggregate_type.clone(),
        aggregate_id: first.aggregate_id.clone(),
        first_sequence: first.sequence as i64,
        rows,
        claims,
    })
}

async fn writer(
    pool: PgPool,
    mut receiver: mpsc::Receiver<AppendRequest>,
    committed: watch::Sender<i64>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH_COMMANDS);
    while let Some(first) = receiver.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH_COMMANDS {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let requests: Vec<AppendRequest> = std::mem::take(&mut batch);
        let (prepared, replies): (Vec<_>, Vec<_>) =
            requests.into_iter().map(|r| (r.prepared, r.reply)).unzip();
        match commit_batch(&pool, &prepared).await {
            Ok((outcomes, head)) => {
                committed.send_if_modified(|p| {
                    let newer = head > *p;
                    *p = (*p).max(head);
                    newer
                });
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            // A database failure of the shared transaction must not fail commands that
            // would have committed alone: retry each on its own.
            Err(e) if prepared.len() > 1 => {
                tracing::warn!(error = %e, commands = prepared.len(), "batch append failed; retrying one by one");
                for (p, reply) in prepared.into_iter().zip(replies) {
                    let outcome = match commit_batch(&pool, std::slice::from_ref(&p)).await {
                        Ok((mut outcomes, head)) => {
                            committed.send_if_modified(|c| {
                                let newer = head > *c;
                                *c = (*c).max(head);
                                newer
                            });
                            outcomes.pop().unwrap_or(Err(AppendError::WriterGone))
                        }
                        Err(e) => Err(AppendError::Database(e)),
                    };
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(AppendError::Database(copy_sql_error(&e))));
                }
            }
        }
    }
}

fn copy_sql_error(e: &sqlx::Error) -> sqlx::Error {
    sqlx::Error::Protocol(e.to_string())
}

/// Commits what it can of `batch` in one transaction. Returns, per command, its last
/// position or why it was refused, and the head position after the commit.
async fn commit_batch(
    pool: &PgPool,
    batch: &[Prepared],
) -> Result<(Vec<Result<i64, AppendError>>, i64), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // A separate statement, so that every later statement's snapshot is taken after the
    // lock is held and sees every earlier appender's commit.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LEDGER_LOCK)
        .execute(&mut *tx)
        .await?;
    let head = read_head(&mut *tx).await?;

    let mut outcomes: Vec<Option<Result<i64, AppendError>>> =
        (0..batch.len()).map(|_| None).collect();
    let existing = existing_first_events(&mut tx, batch).await?;
    let mut claims = ClaimBook::load(&mut tx, batch).await?;

    // Decide, in arrival order, which commands go in.
    let mut taken_sequences: HashSet<(&str, &str, i64)> = HashSet::new();
    for (i, p) in batch.iter().enumerate() {
        let clash = existing.contains(&i)
            || p.rows.iter().any(|r| {
                taken_sequences.contains(&(
                    p.aggregate_type.as_str(),
                    p.aggregate_id.as_str(),
                    r.sequence,
                ))
            });
        if clash {
            outcomes[i] = Some(Err(AppendError::Conflict));
            continue;
        }
        if let Err(scope) = claims.apply(
            &p.claims,
            &format!("{}:{}", p.aggregate_type, p.aggregate_id),
        ) {
            outcomes[i] = Some(Err(AppendError::Taken { scope }));
            continue;
        }
        for r in &p.rows {
            taken_sequences.insert((&p.aggregate_type, &p.aggregate_id, r.sequence));
        }
    }

    let recorded_at = truncate_to_micros(Utc::now());
    let mut cols = Columns::default();
    let mut position = head.position;
    let mut prev = head.hash;
    for (i, p) in batch.iter().enumerate() {
        if outcomes[i].is_some() {
            continue;
        }
        for r in &p.rows {
            position += 1;
            let hash = event_hash(
                &prev,
                &EventFields {
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
        outcomes[i] = Some(Ok(position));
    }

    if !cols.position.is_empty() {
        cols.insert(&mut tx).await?;
        claims.save(&mut tx).await?;
    }
    tx.commit().await?;
    Ok((
        outcomes
            .into_iter()
            .map(|o| o.expect("every command decided"))
            .collect(),
        position,
    ))
}

/// Indexes of the commands whose first sequence number is already stored: a concurrent
/// command on the same aggregate committed first.
async fn existing_first_events(
    tx: &mut Transaction<'_, Postgres>,
    batch: &[Prepared],
) -> Result<HashSet<usize>, sqlx::Error> {
    let types: Vec<&str> = batch.iter().map(|p| p.aggregate_type.as_str()).collect();
    let ids: Vec<&str> = batch.iter().map(|p| p.aggregate_id.as_str()).collect();
    let seqs: Vec<i64> = batch.iter().map(|p| p.first_sequence).collect();
    let rows: Vec<(i64,)> = sqlx::query_as(
        "SELECT t.idx FROM unnest($1::text[], $2::text[], $3::bigint[]) WITH ORDINALITY AS t(ty, id, seq, idx)
         JOIN events e ON e.aggregate_type = t.ty AND e.aggregate_id = t.id AND e.sequence = t.seq",
    )
    .bind(&types)
    .bind(&ids)
    .bind(&seqs)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|(idx,)| idx as usize - 1).collect())
}

/// The unique claims a batch touches: loaded once, decided in memory, saved once.
struct ClaimBook {
    /// (scope, key) → owner, as stored before the batch.
    initial: HashMap<(&'static str, String), String>,
    current: HashMap<(&'static str, String), String>,
}

impl ClaimBook {
    async fn load(
        tx: &mut Transaction<'_, Postgres>,
        batch: &[Prepared],
    ) -> Result<Self, sqlx::Error> {
        let wanted: HashSet<(&'static str, &str)> = batch
            .iter()
            .flat_map(|p| p.claims.iter().map(|c| (c.scope(), c.key())))
            .collect();
        let mut initial = HashMap::new();
        if !wanted.is_empty() {
            let scopes: Vec<&str> = wanted.iter().map(|(s, _)| *s).collect();
            let keys: Vec<&str> = wanted.iter().map(|(_, k)| *k).collect();
            let rows: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT c.scope, c.key, c.owner FROM unique_claims c
                 JOIN unnest($1::text[], $2::text[]) AS w(scope, key) USING (scope, key)",
            )
            .bind(&scopes)
            .bind(&keys)
            .fetch_all(&mut **tx)
            .await?;
            for (scope, key, owner) in rows {
                if let Some((s, _)) = wanted.iter().find(|(s, _)| *s == scope) {
                    initial.insert((*s, key), owner);
                }
            }
        }
        Ok(Self {
            current: initial.clone(),
            initial,
        })
    }

    /// Applies one command's claims, all or nothing. Err names the scope that is taken.
    fn apply(&mut self, ops: &[ClaimOp], owner: &str) -> Result<(), &'static str> {
        let mut next = self.current.clone();
        for op in ops {
            let k = (op.scope(), op.key().to_string());
            match op {
                ClaimOp::Release { .. } => {
                    if next.get(&k).is_some_and(|o| o == owner) {
                        next.remove(&k);
                    }
                }
                ClaimOp::Claim { .. } => match next.get(&k) {
                    Some(o) if o != owner => return Err(op.scope()),
                    _ => {
                        next.insert(k, owner.to_string());
                    }
                },
            }
        }
        self.current = next;
        Ok(())
    }

    async fn save(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
        let released: Vec<&(&'static str, String)> = self
            .initial
            .keys()
            .filter(|k| !self.current.contains_key(*k))
            .collect();
        if !released.is_empty() {
            let scopes: Vec<&str> = released.iter().map(|(s, _)| *s).collect();
            let keys: Vec<&str> = released.iter().map(|(_, k)| k.as_str()).collect();
            sqlx::query(
                "DELETE FROM unique_claims c USING unnest($1::text[], $2::text[]) AS r(scope, key)
                 WHERE c.scope = r.scope AND c.key = r.key",
            )
            .bind(&scopes)
            .bind(&keys)
            .execute(&mut **tx)
            .await?;
        }
        let added: Vec<(&(&'static str, String), &String)> = self
            .current
            .iter()
            .filter(|(k, _)| !self.initial.contains_key(*k))
            .collect();
        if !added.is_empty() {
            let scopes: Vec<&str> = added.iter().map(|((s, _), _)| *s).collect();
            let keys: Vec<&str> = added.iter().map(|((_, k), _)| k.as_str()).collect();
            let owners: Vec<&str> = added.iter().map(|(_, o)| o.as_str()).collect();
            sqlx::query(
                "INSERT INTO unique_claims (scope, key, owner)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[])",
            )
            .bind(&scopes)
            .bind(&keys)
            .bind(&owners)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
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

    async fn insert(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                                 payload, metadata, position, organization_id, recorded_at, prev_hash, hash)
             SELECT ty, id, seq, et, ev, pl::json, md::json, pos, org, at, ph, h
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
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

impl PersistedEventRepository for LedgerStore {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.load_from::<A>(aggregate_id, 0).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.load_from::<A>(aggregate_id, last_sequence as i64)
            .await
    }

    // Snapshots are not used: cqrs-es 0.5's snapshot mode applies events twice.
    async fn get_snapshot<A: Aggregate>(
        &self,
        _aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        Ok(None)
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        _snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        if events.is_empty() {
            return Ok(());
        }
        self.append(events).await?;
        Ok(())
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        let events = self.load_from::<A>(aggregate_id, 0).await?;
        Ok(replay_of(events))
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        Err(PersistenceError::UnknownError(
            "replay through cqrs-es is not supported: projections read the ledger in position order"
                .into(),
        ))
    }
}

impl LedgerStore {
    async fn load_from<A: Aggregate>(
        &self,
        aggregate_id: &str,
        after_sequence: i64,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let rows: Vec<(String, String, i64, String, String, String, String)> = sqlx::query_as(
            "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version,
                    payload::text, metadata::text
             FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
             ORDER BY sequence",
        )
        .bind(A::TYPE)
        .bind(aggregate_id)
        .bind(after_sequence)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| PersistenceError::ConnectionError(Box::new(e)))?;
        rows.into_iter()
            .map(|(ty, id, seq, et, ev, pl, md)| {
                Ok(SerializedEvent::new(
                    id,
                    seq as usize,
                    ty,
                    et,
                    ev,
                    serde_json::from_str(&pl)?,
                    serde_json::from_str(&md)?,
                ))
            })
            .collect()
    }
}

fn replay_of(events: Vec<SerializedEvent>) -> ReplayStream {
    let (feed, stream) = ReplayStream::new(events.len().max(1));
    tokio::spawn(async move {
        let mut feed = feed;
        for e in events {
            if feed.push(Ok(e)).await.is_err() {
                break;
            }
        }
    });
    stream
}
