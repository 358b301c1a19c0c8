//! The ledger's Merkle tree in the database, and the maintainer task that keeps it and signs
//! checkpoints.
//!
//! The maintainer follows the ledger by position, like a projection: it recomputes each new
//! event's hash from its content and checks the link before it integrates the event, so the
//! log never signs a head it has not verified. Integration stores every new complete
//! subtree (`merkle_nodes`, levels 1 and up; leaves are derived from `events.hash`) and the
//! frontier in one transaction. A checkpoint is signed every `every_events` events, or after
//! `interval` when fewer arrived, and kept in `checkpoints`. It runs after commits, off the
//! append path, so appends do not wait for it. With several processes on one database it
//! runs in the one that holds the [`LEASE`], and each integration checks the lease in its
//! own transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use ledgerline_projections::lease::{self, Lease, Leasing};
use ledgerline_projections::{StoredEvent, STORED_EVENT_COLUMNS};
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::checkpoint::{describe_v2_from, note_signers, Checkpoint, LogSigner, NoteError};
use super::hash::{event_hash, EventFields, FormatRun, HashVersion, GENESIS};
use super::merkle::{self, Blake3, Digest, Frontier, Nodes, Recorder, TreeHash};

/// Events integrated per transaction.
const BATCH: i64 = 5_000;
/// How long the maintainer lets commits accumulate before integrating them: one
/// integration per commit would add a transaction to every one of the writer's.
const COALESCE: Duration = Duration::from_millis(200);
/// The lease under which one process at a time maintains the tree and signs.
pub const LEASE: &str = "log-maintainer";

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The ledger does not verify at this position: nothing from here on is integrated or
    /// signed until an operator looks (`ledgerline verify`).
    #[error("the ledger does not verify at position {0}; not integrating it")]
    Tampered(i64),
    #[error("the stored tree state is damaged: {0}")]
    Damaged(String),
    /// The log ends before the integrated tree: its newest events were cut off under it.
    /// Nothing more is integrated or signed until an operator looks (`ledgerline verify`).
    #[error(
        "the log ends at position {head}, but the Merkle tree integrated {integrated} events: \
         events were cut off the log (or `merkle_state` was set past it)"
    )]
    Truncated { head: i64, integrated: i64 },
    #[error("tree size {requested} is beyond the integrated size {integrated}")]
    NotIntegrated { requested: u64, integrated: u64 },
    #[error("{0}")]
    BadRequest(String),
    /// The integrated tree does not extend the newest checkpoint this key signed: the tree
    /// or the log was rewritten under the running server. Nothing more is signed.
    #[error("refusing to sign: {0}")]
    Unsignable(String),
    /// The newest stored checkpoint is a well-formed note of another key: this process was
    /// started with a key (or log name) that is not the one signing this log, or another
    /// process signs with one. Signing on would give auditors, who hold the log's public key,
    /// checkpoints that do not open under it. Nothing is signed until an operator looks.
    #[error(
        "the newest checkpoint in the database (size {size}) is signed by {signed_by}, not by \
         this server's key (`{name}` key id {key_id}): LEDGERLINE_SIGNING_KEY (or _FILE, or \
         LEDGERLINE_LOG_ORIGIN) is not the one that signs this log; start the server with the \
         log's key, the one whose public key auditors hold (rotating the signing key is not \
         supported)"
    )]
    OtherKey {
        size: u64,
        name: String,
        key_id: String,
        /// Each signer the note names: `` `<name>` key id <hex> ``.
        signed_by: String,
    },
    /// Another process holds the maintainer's lease.
    #[error("the log maintainer's lease is held by another process")]
    NotLeaseHolder,
}

fn digest(bytes: &[u8]) -> Result<Digest, TreeError> {
    bytes
        .try_into()
        .map_err(|_| TreeError::Damaged(format!("a {}-byte hash", bytes.len())))
}

/// The integrated tree, read in one statement.
struct TreeState {
    frontier: Frontier<Blake3>,
    /// The first v2 position integrated, as recorded (checked before it is signed).
    v2_from: Option<i64>,
}

/// The integrated size, frontier and first v2 position, locked for this transaction when
/// `lock`.
async fn state(conn: &mut PgConnection, lock: bool) -> Result<TreeState, TreeError> {
    let sql = if lock {
        "SELECT size, peaks, hash_v2_from FROM merkle_state FOR UPDATE"
    } else {
        "SELECT size, peaks, hash_v2_from FROM merkle_state"
    };
    let (size, peaks, v2_from): (i64, Vec<Vec<u8>>, Option<i64>) = sqlx::query_as(sql)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| {
            // Migration 0004 inserts its one row and nothing deletes it but a hand on the table.
            TreeError::Damaged(
                "the table merkle_state holds no row (the tree's size and frontier): it was \
                 deleted"
                    .into(),
            )
        })?;
    let peaks = peaks
        .iter()
        .map(|p| digest(p))
        .collect::<Result<Vec<_>, _>>()?;
    let frontier = Frontier::from_parts(size as u64, peaks)
        .ok_or_else(|| TreeError::Damaged(format!("frontier does not fit size {size}")))?;
    Ok(TreeState { frontier, v2_from })
}

/// The integrated tree size.
pub async fn integrated_size(pool: &PgPool) -> Result<u64, TreeError> {
    let mut conn = pool.acquire().await?;
    Ok(state(&mut conn, false).await?.frontier.size())
}

/// Integrates up to [`BATCH`] new events; returns the new size, the chain head hash and how
/// many events it integrated. Concurrent maintainers (another process) serialise on the
/// state row.
pub async fn integrate_batch(pool: &PgPool) -> Result<(u64, Digest, usize), TreeError> {
    integrate(pool, None).await
}

/// [`integrate_batch`], refused unless `holder` (if any) holds the [`LEASE`]; the lease
/// cannot change hands before this transaction ends.
async fn integrate(pool: &PgPool, holder: Option<&str>) -> Result<(u64, Digest, usize), TreeError> {
    let mut tx = pool.begin().await?;
    // The tree is derived from the log: a crash that loses this commit loses nothing that
    // integration cannot redo, so it need not wait for its WAL flush. It holds the lease's
    // row, so it must not outlive a frozen process (`lease::STALLED_TRANSACTION_LIMIT`).
    sqlx::query(
        "SELECT set_config('synchronous_commit', 'off', true), \
         set_config('idle_in_transaction_session_timeout', $1, true)",
    )
    .bind(ledgerline_projections::lease::STALLED_TRANSACTION_LIMIT)
    .execute(&mut *tx)
    .await?;
    if let Some(holder) = holder {
        if !lease::fence(&mut tx, LEASE, holder).await? {
            return Err(TreeError::NotLeaseHolder);
        }
    }
    let TreeState {
        mut frontier,
        mut v2_from,
    } = state(&mut tx, true).await?;
    let size = frontier.size() as i64;
    // Whether the last integrated event is v2 comes from that event, checked against the
    // tree, not from the column above, which only records where v2 began.
    let mut formats = FormatRun::default();
    let mut prev: Digest = if size == 0 {
        GENESIS
    } else {
        let (hash, version) = integrated_head(&mut tx, &frontier).await?;
        formats.admit(version);
        hash
    };
    let events: Vec<StoredEvent> = sqlx::query_as(&format!(
        "SELECT {STORED_EVENT_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2"
    ))
    .bind(size)
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    let mut levels: Vec<i16> = Vec::new();
    let mut indexes: Vec<i64> = Vec::new();
    let mut hashes: Vec<Vec<u8>> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let expected = size + 1 + i as i64;
        if HashVersion::from_number(e.hash_version.into()).is_none() {
            tracing::error!(
                position = expected,
                "unknown hash version; tree integration stopped"
            );
            return Err(TreeError::Tampered(expected));
        }
        let fields = EventFields::of(e);
        let recomputed = event_hash(&prev, &fields);
        // The writer turned to v2 for good: a v1 event after a v2 one was not written by it.
        let begins_v2 = fields.hash_version == HashVersion::V2 && !formats.has_v2();
        let downgraded = !formats.admit(fields.hash_version);
        if e.position != expected || e.prev_hash != prev || e.hash != recomputed || downgraded {
            tracing::error!(
                position = expected,
                "ledger does not verify; tree integration stopped"
            );
            return Err(TreeError::Tampered(expected));
        }
        if begins_v2 {
            v2_from = Some(expected);
        }
        for (level, index, node) in frontier.push(Blake3::leaf(&recomputed)) {
            if level > 0 {
                levels.push(level as i16);
                indexes.push(index as i64);
                hashes.push(node.to_vec());
            }
        }
        prev = recomputed;
    }
    if !events.is_empty() {
        sqlx::query(
            "INSERT INTO merkle_nodes (level, idx, hash) \
             SELECT * FROM unnest($1::smallint[], $2::bigint[], $3::bytea[])",
        )
        .bind(&levels)
        .bind(&indexes)
        .bind(&hashes)
        .execute(&mut *tx)
        .await?;
        let peaks: Vec<Vec<u8>> = frontier.peaks().iter().map(|p| p.to_vec()).collect();
        sqlx::query("UPDATE merkle_state SET size = $1, peaks = $2, hash_v2_from = $3")
            .bind(frontier.size() as i64)
            .bind(&peaks)
            .bind(v2_from)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok((frontier.size(), prev, events.len()))
}

/// The hash and format of the newest event the tree integrated, read from the log and checked
/// against the tree: its hash recomputed from its content, and its leaf hashed up with the
/// stored nodes beside it to the frontier's last peak. The next event must link to it, so it
/// cannot be taken from the table on trust: integrated events rewritten with their hashes
/// recomputed would otherwise be linked to by the next append and signed over, the signed root
/// still holding the old leaves while the signed chain head goes through the new ones.
async fn integrated_head(
    conn: &mut PgConnection,
    frontier: &Frontier<Blake3>,
) -> Result<(Digest, HashVersion), TreeError> {
    let size = frontier.size() as i64;
    let Some(e): Option<StoredEvent> = sqlx::query_as(&format!(
        "SELECT {STORED_EVENT_COLUMNS} FROM events WHERE position = $1"
    ))
    .bind(size)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Err(truncated(conn, size).await);
    };
    let tampered = || {
        tracing::error!(
            position = size,
            "the newest integrated event no longer matches the tree; tree integration stopped"
        );
        TreeError::Tampered(size)
    };
    let version = HashVersion::from_number(e.hash_version.into()).ok_or_else(tampered)?;
    let prev: Digest = e.prev_hash.as_slice().try_into().map_err(|_| tampered())?;
    let hash = event_hash(&prev, &EventFields::of(&e));
    if e.hash != hash {
        return Err(tampered());
    }
    // The last peak covers the newest 2^k leaves, k the trailing zeros of the size: the newest
    // leaf is the last of that subtree, whose inclusion proof is the left sibling at each
    // level on the way up.
    let last = size as u64 - 1;
    let levels = (size as u64).trailing_zeros();
    let siblings: Vec<(u32, u64)> = (0..levels)
        .map(|level| (level, (last >> level) - 1))
        .collect();
    let nodes = fetch(conn, siblings.clone()).await?;
    let mut proof = Vec::with_capacity(siblings.len());
    for (level, index) in siblings {
        proof.push(match nodes.get(&(level, index)) {
            Some(node) => *node,
            // The event before it, gone.
            None if level == 0 => return Err(tampered()),
            None => {
                return Err(TreeError::Damaged(format!(
                    "the stored node at level {level} beside the newest integrated event is \
                     missing"
                )))
            }
        });
    }
    let peak = frontier.peaks().last().ok_or_else(tampered)?;
    let subtree = 1u64 << levels;
    merkle::verify_inclusion::<Blake3>(subtree - 1, subtree, &Blake3::leaf(&hash), &proof, peak)
        .map_err(|_| tampered())?;
    Ok((hash, version))
}

/// The log holds no event at `size`, which the tree integrated: [`TreeError::Truncated`] if it
/// ends before it (a gap below its head is found as tampering when integrated).
async fn truncated(conn: &mut PgConnection, size: i64) -> TreeError {
    let head: Result<Option<i64>, _> = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(&mut *conn)
        .await;
    match head {
        Ok(head) if head.unwrap_or(0) < size => TreeError::Truncated {
            head: head.unwrap_or(0),
            integrated: size,
        },
        Ok(_) => TreeError::Tampered(size),
        Err(e) => e.into(),
    }
}

/// `e`, unless the log now ends before `size` (the tree's): then [`TreeError::Truncated`].
/// Events cut off while a round was checking its tree fail whichever check reads them
/// next; the operator is told of the cut, not of the check it broke.
async fn cut_off_or(conn: &mut PgConnection, size: u64, e: TreeError) -> TreeError {
    match truncated(conn, size as i64).await {
        cut @ TreeError::Truncated { .. } => cut,
        _ => e,
    }
}

/// The nodes a computation asked for: leaves from the events' hashes, the rest from
/// `merkle_nodes`, in two queries.
async fn fetch(
    conn: &mut PgConnection,
    wanted: Vec<(u32, u64)>,
) -> Result<HashMap<(u32, u64), Digest>, TreeError> {
    let (leaves, inner): (Vec<_>, Vec<_>) = wanted.into_iter().partition(|(level, _)| *level == 0);
    let positions: Vec<i64> = leaves.iter().map(|(_, i)| *i as i64 + 1).collect();
    let mut out = HashMap::new();
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT position, hash FROM events WHERE position = ANY($1)")
            .bind(&positions)
            .fetch_all(&mut *conn)
            .await?;
    for (position, hash) in rows {
        out.insert((0, position as u64 - 1), Blake3::leaf(&digest(&hash)?));
    }
    let levels: Vec<i16> = inner.iter().map(|(l, _)| *l as i16).collect();
    let indexes: Vec<i64> = inner.iter().map(|(_, i)| *i as i64).collect();
    let rows: Vec<(i16, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT m.level, m.idx, m.hash FROM merkle_nodes m \
         JOIN unnest($1::smallint[], $2::bigint[]) AS w(level, idx) ON m.level = w.level AND m.idx = w.idx",
    )
    // As the loader's: a cached generic plan could scan the whole table (see loader.rs).
    .persistent(false)
    .bind(&levels)
    .bind(&indexes)
    .fetch_all(&mut *conn)
    .await?;
    for (level, idx, hash) in rows {
        out.insert((level as u32, idx as u64), digest(&hash)?);
    }
    Ok(out)
}

/// Runs `compute` once to learn which nodes it needs, fetches them, and runs it again.
async fn with_nodes<T>(
    pool: &PgPool,
    size: u64,
    compute: impl Fn(&dyn NodesDyn) -> Option<T>,
) -> Result<T, TreeError> {
    let integrated = integrated_size(pool).await?;
    if size > integrated {
        return Err(TreeError::NotIntegrated {
            requested: size,
            integrated,
        });
    }
    let recorder = Recorder::default();
    let _ = compute(&recorder);
    let nodes = fetch(&mut *pool.acquire().await?, recorder.requests()).await?;
    compute(&nodes).ok_or_else(|| TreeError::Damaged("a stored node is missing".into()))
}

/// Object-safe view of [`Nodes`], so one closure serves both passes.
pub trait NodesDyn {
    fn get(&self, level: u32, index: u64) -> Option<Digest>;
}

impl<N: Nodes> NodesDyn for N {
    fn get(&self, level: u32, index: u64) -> Option<Digest> {
        self.node(level, index)
    }
}

struct Dyn<'a>(&'a dyn NodesDyn);

impl Nodes for Dyn<'_> {
    fn node(&self, level: u32, index: u64) -> Option<Digest> {
        self.0.get(level, index)
    }
}

pub async fn root_at(pool: &PgPool, size: u64) -> Result<Digest, TreeError> {
    with_nodes(pool, size, |n| {
        merkle::root_from::<Blake3, _>(&Dyn(n), size)
    })
    .await
}

/// The frontier of the tree of the first `size` events (at most the integrated size), from
/// one stored node per peak: what an export's header needs, without reading the log.
pub async fn frontier_at(pool: &PgPool, size: u64) -> Result<Frontier<Blake3>, TreeError> {
    let peaks = with_nodes(pool, size, |n| {
        merkle::peaks_from::<Blake3, _>(&Dyn(n), size)
    })
    .await?;
    Frontier::from_parts(size, peaks)
        .ok_or_else(|| TreeError::Damaged(format!("peaks do not fit size {size}")))
}

/// An inclusion proof of the event at `position` (1-based) in the tree of `size` events.
pub async fn inclusion_proof(
    pool: &PgPool,
    position: u64,
    size: u64,
) -> Result<Vec<Digest>, TreeError> {
    if position == 0 || position > size {
        return Err(TreeError::BadRequest(format!(
            "position must be between 1 and the tree size {size}"
        )));
    }
    with_nodes(pool, size, |n| {
        merkle::inclusion_proof_from::<Blake3, _>(&Dyn(n), position - 1, size)
    })
    .await
}

pub async fn consistency_proof(
    pool: &PgPool,
    from_size: u64,
    to_size: u64,
) -> Result<Vec<Digest>, TreeError> {
    if from_size > to_size {
        return Err(TreeError::BadRequest(
            "from_size must not exceed to_size".into(),
        ));
    }
    with_nodes(pool, to_size, |n| {
        merkle::consistency_proof_from::<Blake3, _>(&Dyn(n), from_size, to_size)
    })
    .await
}

/// When the maintainer signs.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    pub every_events: u64,
    pub interval: Duration,
}

/// Signs and stores a checkpoint of the integrated tree, unless one of that size exists.
/// Refuses ([`TreeError::Unsignable`]) a tree that does not extend the newest checkpoint this
/// key is known to have signed, so that someone who can write the database but has no key
/// cannot have the server sign a rewritten history. With a `holder`, refused unless it holds
/// the [`LEASE`], which cannot change hands until the note is stored: a holder whose lease ran
/// out while it integrated must not sign beside the next one.
pub async fn sign_checkpoint(
    pool: &PgPool,
    signer: &LogSigner,
    holder: Option<&str>,
) -> Result<Option<Checkpoint>, TreeError> {
    let mut conn = pool.acquire().await?;
    let TreeState { frontier, v2_from } = state(&mut conn, false).await?;
    let size = frontier.size();
    if size == 0 {
        return Ok(None);
    }
    let Some((head,)): Option<(Vec<u8>,)> =
        sqlx::query_as("SELECT hash FROM events WHERE position = $1")
            .bind(size as i64)
            .fetch_optional(&mut *conn)
            .await?
    else {
        return Err(truncated(&mut conn, size as i64).await);
    };
    // A position past the tree (or below 1) cannot be its boundary: signed as none, which the
    // check then refuses if the tree holds a v2 event.
    let v2_from = v2_from
        .and_then(|p| u64::try_from(p).ok())
        .filter(|p| *p <= size);
    if let Err(e) = check_boundary(&mut conn, v2_from, size).await {
        return Err(cut_off_or(&mut conn, size, e).await);
    }
    let checkpoint = Checkpoint {
        origin: signer.name().to_string(),
        tree_size: size,
        root: frontier.root(),
        chain_head: digest(&head)?,
        time: Utc::now().trunc_subsecs(0),
        hash_v2_from: v2_from,
    };
    drop(conn);
    match check_extends_signed(pool, signer, &checkpoint).await {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        // Without a connection to look, the check's own error stands.
        Err(e) => {
            return Err(match pool.acquire().await {
                Ok(mut conn) => cut_off_or(&mut conn, size, e).await,
                Err(_) => e,
            })
        }
    }
    let mut tx = pool.begin().await?;
    if let Some(holder) = holder {
        lease::idle_limit(&mut tx).await?;
        if !lease::fence(&mut tx, LEASE, holder).await? {
            return Err(TreeError::NotLeaseHolder);
        }
    }
    let note = signer.sign(&checkpoint);
    // Kept before it is stored: a crash in between must not leave a served note the anchor
    // does not hold.
    signer.remember(&checkpoint, Some(&note));
    let inserted = sqlx::query(
        "INSERT INTO checkpoints (tree_size, root, chain_head, signed_at, note) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tree_size) DO NOTHING",
    )
    .bind(size as i64)
    .bind(checkpoint.root.to_vec())
    .bind(checkpoint.chain_head.to_vec())
    .bind(checkpoint.time)
    .bind(&note)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((inserted.rows_affected() == 1).then_some(checkpoint))
}

/// How many of the newest stored checkpoints are tried for one this key signed.
const ANCHOR_CANDIDATES: i64 = 16;

/// The newest checkpoint this key is known to have signed: the one the signer remembers
/// (signed or seen by this process, or kept in its anchor file), or a stored one whose
/// signature opens under the key, the larger; a larger stored one is remembered from then
/// on, so that deleting it later does not make this process forget it. Refused
/// ([`TreeError::OtherKey`]) when a well-formed note of another key is newer than any this
/// key signed: this process does not hold the log's key.
pub async fn observe_signed(
    pool: &PgPool,
    signer: &LogSigner,
) -> Result<Option<Checkpoint>, TreeError> {
    let notes: Vec<(i64, String)> =
        sqlx::query_as("SELECT tree_size, note FROM checkpoints ORDER BY tree_size DESC LIMIT $1")
            .bind(ANCHOR_CANDIDATES)
            .fetch_all(pool)
            .await?;
    let verifier = signer.verifier();
    for (size, note) in &notes {
        match verifier.open(note) {
            Ok(checkpoint) => {
                signer.remember(&checkpoint, Some(note));
                break;
            }
            // Signed, in due form, by keys that are not this one (none of its name, or
            // another id under it).
            Err(NoteError::OtherKey { .. } | NoteError::NoSignature(_)) => {
                if let Some(signers) = note_signers(note).ok().filter(|s| !s.is_empty()) {
                    return Err(TreeError::OtherKey {
                        size: *size as u64,
                        name: verifier.name().to_string(),
                        key_id: verifier.key_id_hex(),
                        signed_by: signers
                            .iter()
                            .map(|(name, id)| format!("`{name}` key id {id}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
            }
            // Altered under this key, or damaged: it vouches for nothing, and an older note
            // that opens (or the one remembered) is the anchor.
            Err(_) => {}
        }
    }
    Ok(signer.last_signed())
}

/// Whether `next` may be signed: it extends the anchor ([`observe_signed`]): the log's hash
/// at the anchor's size is its chain head, the stored tree is consistent with its root (an
/// RFC 9162 consistency proof from the stored nodes, checked against both roots), and
/// `next`'s chain head is the last leaf of `next`'s root. `Ok(false)` when `next` is behind a
/// signed checkpoint that the tree or the log reaches (another process signed after `next`
/// was read, or the tree is catching up: skip this round); behind one that the log does not
/// reach, events were cut off, and it is refused.
async fn check_extends_signed(
    pool: &PgPool,
    signer: &LogSigner,
    next: &Checkpoint,
) -> Result<bool, TreeError> {
    let refuse = |anchor: u64, why: String| {
        Err(TreeError::Unsignable(format!(
            "the tree of {} events does not extend the checkpoint signed at size {anchor}: {why}",
            next.tree_size
        )))
    };
    // The signed head must be the root's last leaf, whatever came before.
    let proof = inclusion_proof(pool, next.tree_size, next.tree_size).await?;
    let leaf = merkle::event_leaf(&next.chain_head);
    let (last, size) = (next.tree_size - 1, next.tree_size);
    if let Err(e) = merkle::verify_inclusion::<Blake3>(last, size, &leaf, &proof, &next.root) {
        return Err(TreeError::Unsignable(format!(
            "the log's hash at position {size} is not the last leaf of the tree of {size} events ({e})"
        )));
    }
    let Some(signed) = observe_signed(pool, signer).await? else {
        return Ok(true);
    };
    if next.tree_size < signed.tree_size {
        // Behind a signed size: another process signed after this tree was read, or the tree
        // lost integrations its database did not flush before a crash (integration does not
        // wait for the flush) and is catching up. Either way it is checked against the signed
        // checkpoint once it reaches it; only a log that ends before it is refused here.
        let head: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events")
            .fetch_one(pool)
            .await?;
        if integrated_size(pool).await? >= signed.tree_size
            || head.unwrap_or(0) >= signed.tree_size as i64
        {
            return Ok(false);
        }
        return refuse(signed.tree_size, "the stored tree is smaller".into());
    }
    // Where v2 begins cannot move: a signed boundary stays, and none may appear inside a tree
    // signed as all v1.
    let boundary_kept = match signed.hash_v2_from {
        Some(p) => next.hash_v2_from == Some(p),
        None => next.hash_v2_from.is_none_or(|p| p > signed.tree_size),
    };
    if !boundary_kept {
        return refuse(
            signed.tree_size,
            format!(
                "it signs v2 hashes from {}, this tree from {}",
                describe_v2_from(signed.hash_v2_from),
                describe_v2_from(next.hash_v2_from)
            ),
        );
    }
    let head: Option<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM events WHERE position = $1")
        .bind(signed.tree_size as i64)
        .fetch_optional(pool)
        .await?;
    if head.as_deref() != Some(&signed.chain_head[..]) {
        return refuse(
            signed.tree_size,
            format!(
                "the log's hash at position {} is not the signed chain head",
                signed.tree_size
            ),
        );
    }
    let proof = consistency_proof(pool, signed.tree_size, next.tree_size).await?;
    if let Err(e) = merkle::verify_consistency::<Blake3>(
        signed.tree_size,
        next.tree_size,
        &signed.root,
        &next.root,
        &proof,
    ) {
        return refuse(
            signed.tree_size,
            format!("the stored tree is not consistent with it ({e})"),
        );
    }
    Ok(true)
}

/// Refuses ([`TreeError::Unsignable`]) a recorded first v2 position that the events around it
/// do not bear out (v1 just before it, v2 at it; with none recorded, v1 at the tree's end): the
/// column is the maintainer's note, writable by whoever can write the database, and the
/// boundary it signs decides which format an export's verifier holds each line to.
async fn check_boundary(
    conn: &mut PgConnection,
    v2_from: Option<u64>,
    size: u64,
) -> Result<(), TreeError> {
    let (at, want): (Vec<i64>, Vec<i16>) = match v2_from {
        Some(1) => (vec![1], vec![2]),
        Some(p) => (vec![p as i64 - 1, p as i64], vec![1, 2]),
        None => (vec![size as i64], vec![1]),
    };
    let found: Vec<i16> = sqlx::query_scalar(
        "SELECT hash_version FROM events WHERE position = ANY($1) ORDER BY position",
    )
    .bind(&at)
    .fetch_all(&mut *conn)
    .await?;
    if found != want {
        return Err(TreeError::Unsignable(format!(
            "the recorded first v2 position ({}) is not the log's: the events at positions \
             {at:?} are in hash versions {found:?}",
            describe_v2_from(v2_from)
        )));
    }
    Ok(())
}

async fn latest_checkpoint_size(pool: &PgPool) -> Result<u64, TreeError> {
    let (size,): (Option<i64>,) = sqlx::query_as("SELECT max(tree_size) FROM checkpoints")
        .fetch_one(pool)
        .await?;
    Ok(size.unwrap_or(0) as u64)
}

/// Integrates everything committed so far; signs when the policy says so. Returns the size.
pub async fn catch_up(
    pool: &PgPool,
    signer: Option<&LogSigner>,
    policy: CheckpointPolicy,
    force_sign: bool,
) -> Result<u64, TreeError> {
    catch_up_leased(pool, signer, policy, force_sign, None, None).await
}

/// [`catch_up`] under `lease` (if any): renewed between batches, each batch fenced by it.
/// Returns early, between batches, once `stop` says so: a graceful stop must not wait for
/// a long backlog (a first start against a large ledger).
async fn catch_up_leased(
    pool: &PgPool,
    signer: Option<&LogSigner>,
    policy: CheckpointPolicy,
    force_sign: bool,
    mut lease: Option<&mut Lease>,
    stop: Option<&watch::Receiver<bool>>,
) -> Result<u64, TreeError> {
    loop {
        let holder = match lease.as_deref_mut() {
            Some(lease) => {
                if !lease.keep(pool).await {
                    return Err(TreeError::NotLeaseHolder);
                }
                Some(lease.holder())
            }
            None => None,
        };
        let (size, _, integrated) = integrate(pool, holder).await?;
        if let Some(signer) = signer {
            let signed = latest_checkpoint_size(pool).await?;
            if size > signed && (force_sign || size - signed >= policy.every_events) {
                sign_checkpoint(pool, signer, holder).await?;
            }
        }
        if integrated < BATCH as usize || stop.is_some_and(|s| *s.borrow()) {
            return Ok(size);
        }
    }
}

/// The maintainer running under a lease; [`MaintainerHandle::shutdown`] stops it.
#[derive(Debug)]
pub struct MaintainerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    halted: Halted,
}

/// Why a maintainer stopped for good (the ledger does not verify, or its tree cannot be
/// signed), once it has: shown in `/readyz` and `/metrics`, not only in the log.
pub type Halted = Arc<std::sync::OnceLock<String>>;

impl MaintainerHandle {
    /// Why the maintainer stopped signing, if it did.
    pub fn halted(&self) -> Option<&str> {
        self.halted.get().map(String::as_str)
    }

    /// Stops the maintainer after its current integration and releases its lease.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "log maintainer ended abnormally");
        }
    }
}

/// The maintainer, for a process that is the only one on its database (no lease):
/// integrates what `committed` reports, [`COALESCE`] after a commit (and every `interval`),
/// signing by the policy. Stops at a tampered event.
pub fn spawn_maintainer(
    pool: PgPool,
    committed: watch::Receiver<i64>,
    signer: Option<Arc<LogSigner>>,
    policy: CheckpointPolicy,
) -> JoinHandle<()> {
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        maintain(
            pool,
            committed,
            signer,
            policy,
            None,
            stopped,
            Halted::default(),
        )
        .await;
        drop(stop);
    })
}

/// The maintainer in the process that holds the [`LEASE`] (taken when free, and at once
/// when `leasing` reports a release). `committed` should follow every process's commits.
pub fn spawn_leased_maintainer(
    pool: PgPool,
    committed: watch::Receiver<i64>,
    signer: Option<Arc<LogSigner>>,
    policy: CheckpointPolicy,
    leasing: Leasing,
) -> MaintainerHandle {
    let (stop, stopped) = watch::channel(false);
    let halted = Halted::default();
    let task = tokio::spawn(maintain(
        pool,
        committed,
        signer,
        policy,
        Some(leasing),
        stopped,
        halted.clone(),
    ));
    MaintainerHandle { stop, task, halted }
}

async fn maintain(
    pool: PgPool,
    mut committed: watch::Receiver<i64>,
    signer: Option<Arc<LogSigner>>,
    policy: CheckpointPolicy,
    leasing: Option<Leasing>,
    mut stop: watch::Receiver<bool>,
    halted: Halted,
) {
    let mut lease = leasing
        .as_ref()
        .map(|l| Lease::new(LEASE, l.config.clone()));
    let mut released = leasing.map(|l| l.released);
    let mut released_open = true;
    let mut tick = tokio::time::interval(policy.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A key that is not the log's is found at once, not at the first new event: a quiet log
    // would otherwise look ready.
    let mut observe = signer.is_some();
    loop {
        if *stop.borrow() {
            break;
        }
        if let (true, Some(signer)) = (observe, signer.as_deref()) {
            observe = false;
            match observe_signed(&pool, signer).await {
                Ok(_) => {}
                Err(e) if halts(&e, &halted) => break,
                Err(e) => tracing::debug!(error = %e, "could not read the stored checkpoints"),
            }
        }
        if let (Some(lease), Some(released)) = (lease.as_mut(), released.as_mut()) {
            if !lease.keep(&pool).await {
                // Another process signs meanwhile: learn its checkpoints as they come, so
                // that deleting them later cannot make this one sign a tree they contradict
                // (and a key that is not the log's is found before this one takes over).
                observe = true;
                tokio::select! {
                    _ = tokio::time::sleep_until(lease.due().into()) => {}
                    changed = released.changed(), if released_open => match changed {
                        Ok(()) => lease.try_now(),
                        Err(_) => released_open = false,
                    },
                    // A dropped handle stops the maintainer too.
                    changed = stop.changed() => if changed.is_err() { break },
                }
                continue;
            }
        }
        let renew_at = lease.as_ref().map(|l| l.due());
        let timed_out = tokio::select! {
            changed = committed.changed() => {
                if changed.is_err() {
                    break;
                }
                tokio::time::sleep(COALESCE).await;
                committed.borrow_and_update();
                false
            }
            _ = tick.tick() => true,
            // Renew the lease at its turn even when nothing happens.
            _ = tokio::time::sleep_until(renew_at.unwrap_or_else(std::time::Instant::now).into()), if renew_at.is_some() => continue,
            changed = stop.changed() => if changed.is_err() { break } else { continue },
        };
        match catch_up_leased(
            &pool,
            signer.as_deref(),
            policy,
            timed_out,
            lease.as_mut(),
            Some(&stop),
        )
        .await
        {
            Ok(_) => {}
            Err(e) if halts(&e, &halted) => break,
            Err(TreeError::NotLeaseHolder) => {
                if let Some(lease) = lease.as_mut() {
                    lease.lost();
                }
            }
            Err(e) => tracing::warn!(error = %e, "log maintainer: will retry"),
        }
    }
    if let Some(lease) = lease.as_mut() {
        lease.release(&pool).await;
    }
}

/// Whether `e` stops the maintainer for good; if so, logs it and records why in `halted`
/// (in short, for `/readyz`). None of these mends itself: retrying would only repeat the
/// warning while `/readyz` says all is well.
fn halts(e: &TreeError, halted: &Halted) -> bool {
    let why = match e {
        TreeError::Tampered(position) => {
            tracing::error!(
                position,
                "log maintainer stopped: the ledger does not verify"
            );
            format!("the ledger does not verify at position {position}")
        }
        TreeError::Unsignable(_) => {
            tracing::error!(error = %e, "log maintainer stopped: nothing more is signed");
            "its tree cannot be signed".to_string()
        }
        TreeError::Truncated { .. } => {
            tracing::error!(error = %e, "log maintainer stopped: the log was cut off under its tree; nothing more is signed");
            e.to_string()
        }
        TreeError::Damaged(_) => {
            tracing::error!(error = %e, "log maintainer stopped: nothing more is signed");
            e.to_string()
        }
        TreeError::OtherKey {
            key_id, signed_by, ..
        } => {
            tracing::error!(
                error = %e,
                key_id = %key_id,
                signed_by = %signed_by,
                "log maintainer stopped: this server's signing key is not the log's; nothing is signed"
            );
            format!(
                "the newest checkpoint is signed by {signed_by}, not by this server's key (key \
                 id {key_id}): it was started with another signing key than the log's"
            )
        }
        _ => return false,
    };
    let _ = halted.set(why);
    true
}
