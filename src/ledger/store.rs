//! The chained event store: a `PersistedEventRepository` for cqrs-es. Appends go through
//! the group-commit writer (`writer.rs`), loads through the group loader (`loader.rs`).

use chrono::{DateTime, Utc};
use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, watch};

use super::hash::GENESIS;
use super::loader::{self, LoadRequest};
use super::writer::{self, prepare, AppendRequest, MAX_BATCH_COMMANDS};

/// Why an append was refused.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another command on the same aggregate got there first.
    #[error("the aggregate was changed concurrently; reload and retry")]
    Conflict,
    /// The aggregate a command was decided against (its guard) changed before the append.
    #[error("the {0} changed while the command was being decided; retry")]
    Stale(String),
    /// The acting API key changed (was revoked or rotated) after its request was
    /// authenticated (`metadata::ACTOR_KEY_SEQUENCE`).
    #[error("the acting API key changed after its request was authenticated")]
    KeyChanged,
    /// The acting key's user was deactivated, erased, or given or lost a role, one of its roles
    /// was changed or deleted, or its organization was suspended, after its request was
    /// authenticated (`metadata::ACTOR_USER_SEQUENCE`, `ACTOR_ROLE_SEQUENCES`,
    /// `ACTOR_ORGANIZATION_SEQUENCE`), or the key's end passed (`ACTOR_VALID_UNTIL`); says
    /// what ("this key's user was ...", "one of the roles this key's user held ...", for an
    /// end the three it may have been).
    #[error("{0} after its request was authenticated")]
    ActorStopped(&'static str),
    /// A name, slug, address or prefix that must be unique is taken, by `holder`
    /// (`<aggregate type>:<id>`).
    #[error("{scope} is already taken")]
    Taken { scope: &'static str, holder: String },
    #[error("invalid event: {0}")]
    Invalid(String),
    #[error("ledger database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the ledger writer has stopped")]
    WriterGone,
    /// The answer to the batch's COMMIT was lost and the log could not be read to learn
    /// whether it committed.
    #[error("the ledger could not confirm whether the command was recorded")]
    Unknown,
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

/// Where a command's events went: its last event's position, and the time the writer
/// recorded its batch at (every event's `recorded_at`, which read models show as the time
/// of what the event did).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
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
    loads: mpsc::Sender<LoadRequest>,
    committed: watch::Receiver<i64>,
}

impl LedgerStore {
    /// Starts the writer and loader tasks. `committed` follows the newest position this
    /// process committed.
    pub fn start(pool: PgPool) -> Self {
        let (sender, receiver) = mpsc::channel(4 * MAX_BATCH_COMMANDS);
        let (loads, load_receiver) = mpsc::channel(4 * MAX_BATCH_COMMANDS);
        let (committed_tx, committed) = watch::channel(0);
        tokio::spawn(writer::run(pool.clone(), receiver, committed_tx));
        tokio::spawn(loader::run(pool.clone(), load_receiver));
        Self {
            pool,
            sender,
            loads,
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

    /// Appends one command's events (of one aggregate, in sequence) through the writer.
    pub async fn append(&self, events: &[SerializedEvent]) -> Result<Appended, AppendError> {
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
        let (reply, answer) = oneshot::channel();
        let gone = || PersistenceError::UnknownError("the ledger loader has stopped".into());
        self.loads
            .send(LoadRequest {
                aggregate_type: A::TYPE,
                aggregate_id: aggregate_id.to_string(),
                after_sequence,
                reply,
            })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
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
