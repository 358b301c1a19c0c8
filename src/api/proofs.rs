//! `/v1/ledger/checkpoints`, `/v1/ledger/proofs/*` and `/v1/ledger/public-key`: what an
//! auditor who does not trust the operator's database needs to check the log from outside
//! (signed checkpoints, inclusion and consistency proofs, the key that signs).

use axum::extract::State;
use chrono::{DateTime, Utc};
use ledgerline_aggregates::Permission;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::answers::PageOf;
use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::extract::Query;
use super::page;
use crate::app::App;
use crate::ledger::checkpoint_row::{self, CheckpointRow};
use crate::ledger::merkle::{Blake3, TreeHash};
use crate::ledger::tree::{self, TreeError};

impl From<TreeError> for ApiError {
    fn from(e: TreeError) -> Self {
        match e {
            TreeError::BadRequest(m) => ApiError::bad_request(m),
            e @ TreeError::NotIntegrated { .. } => ApiError::bad_request(e.to_string()),
            TreeError::Tampered(p) => ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!("the ledger does not verify at position {p}; proofs are withheld"),
            ),
            other => ApiError::internal(other),
        }
    }
}

/// A signed checkpoint. `tree_size`, `root`, `chain_head` and `signed_at` are what its note
/// signs, read from the note here (its signature is the reader's to check, with the log's
/// key): the row's columns of those names are the database's, which nothing signs.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CheckpointView {
    /// The tree size the note signs.
    pub tree_size: i64,
    /// The Merkle root the note signs, in hex.
    pub root: String,
    /// The hash of the event at `tree_size` the note signs, in hex.
    pub chain_head: String,
    /// The time the note signs.
    pub signed_at: DateTime<Utc>,
    /// The signed note exactly as signed: what an auditor keeps.
    pub note: String,
    /// What of the stored row is not what its note signs, empty for a row as signed: each
    /// of its columns `tree_size`, `root`, `chain_head`, `signed_at` that differs (the row was
    /// changed after signing; the fields above are still the note's), or `note` alone when
    /// the note is no readable checkpoint (the fields above are then the row's columns,
    /// which nothing signs).
    pub mismatch: Vec<&'static str>,
    /// The row's `tree_size` column, which names it in the server's log.
    #[serde(skip)]
    row_size: i64,
}

impl From<CheckpointRow> for CheckpointView {
    fn from(row: CheckpointRow) -> Self {
        let (read, mismatch) = row.read();
        let (tree_size, root, chain_head, signed_at) = match read {
            // `read` refuses a size past `i64`.
            Ok(cp) => (
                cp.tree_size as i64,
                cp.root.to_vec(),
                cp.chain_head.to_vec(),
                cp.time,
            ),
            // Nothing signed to show: the columns, which `mismatch` (`note`) says so of (and
            // the epoch for a time `DateTime` cannot hold, stored by an edit too).
            Err(_) => (
                row.tree_size,
                row.root,
                row.chain_head,
                row.signed_at.unwrap_or(DateTime::UNIX_EPOCH),
            ),
        };
        Self {
            tree_size,
            root: hex::encode(root),
            chain_head: hex::encode(chain_head),
            signed_at,
            note: row.note,
            mismatch,
            row_size: row.tree_size,
        }
    }
}

/// Each row as its note says, and one warning for the rows that disagree with their notes:
/// someone wrote them after signing (`ledgerline verify` names every such row).
fn views(rows: Vec<CheckpointRow>) -> Vec<CheckpointView> {
    let views: Vec<CheckpointView> = rows.into_iter().map(CheckpointView::from).collect();
    let mut faulty = views.iter().filter(|v| !v.mismatch.is_empty());
    if let Some(first) = faulty.next() {
        tracing::warn!(
            row = first.row_size,
            mismatch = ?first.mismatch,
            more_rows = faulty.count(),
            "serving checkpoints whose rows disagree with their signed notes: the answer shows \
             what the notes sign"
        );
    }
    views
}

fn select_checkpoints() -> String {
    format!("SELECT {} FROM checkpoints", checkpoint_row::COLUMNS)
}

pub async fn latest(
    State(app): State<App>,
    caller: Caller,
) -> ApiResult<axum::Json<CheckpointView>> {
    caller.require(Permission::LedgerRead)?;
    let rows = sqlx::query_as(&format!(
        "{} ORDER BY tree_size DESC LIMIT 1",
        select_checkpoints()
    ))
    .fetch_all(&app.pool)
    .await?;
    views(rows)
        .pop()
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found("checkpoint"))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointsQuery {
    /// Only rows of a smaller `tree_size` column (the `next_cursor` of the previous page).
    before_size: Option<i64>,
    /// Only the row of this `tree_size` column: its note signs that size unless the item's
    /// `mismatch` names `tree_size`.
    tree_size: Option<i64>,
    limit: Option<i64>,
}

/// Newest first.
pub async fn list(
    State(app): State<App>,
    caller: Caller,
    Query(q): Query<CheckpointsQuery>,
) -> ApiResult<axum::Json<PageOf<CheckpointView>>> {
    caller.require(Permission::LedgerRead)?;
    let limit = page::limit(q.limit, 100, 1000)?;
    let mut rows: Vec<CheckpointRow> = sqlx::query_as(&format!(
        "{} WHERE ($1::bigint IS NULL OR tree_size < $1) \
         AND ($2::bigint IS NULL OR tree_size = $2) ORDER BY tree_size DESC LIMIT $3",
        select_checkpoints()
    ))
    .bind(q.before_size)
    .bind(q.tree_size)
    .bind(limit + 1)
    .fetch_all(&app.pool)
    .await?;
    // The rows' own key: a row whose note signs another size is still where the table has it.
    let next_cursor = page::cut(&mut rows, limit, |r| r.tree_size);
    Ok(page::answer(views(rows), next_cursor))
}

fn size_param(value: Option<i64>, name: &str) -> ApiResult<u64> {
    match value {
        Some(v) if v >= 0 => Ok(v as u64),
        Some(_) => Err(ApiError::bad_request(format!(
            "{name} must not be negative"
        ))),
        None => Err(ApiError::bad_request(format!("{name} is required"))),
    }
}

fn hexes(proof: &[[u8; 32]]) -> Vec<String> {
    proof.iter().map(hex::encode).collect()
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InclusionQuery {
    position: Option<i64>,
    tree_size: Option<i64>,
}

/// That the event at `position` is in the tree of `tree_size` leaves (RFC 9162 style, BLAKE3;
/// docs/ledger-format.md). Hashes in hex.
#[derive(Debug, Serialize, JsonSchema)]
pub struct InclusionProof {
    /// Always `inclusion`.
    #[schemars(extend("const" = "inclusion"))]
    pub kind: &'static str,
    pub position: u64,
    pub tree_size: u64,
    pub event_hash: String,
    pub leaf_hash: String,
    pub proof: Vec<String>,
    pub root: String,
}

/// An organization's key may prove only its own events; the proof reveals hashes only, but
/// which positions belong to whom is the tenant's business.
pub async fn inclusion(
    State(app): State<App>,
    caller: Caller,
    Query(q): Query<InclusionQuery>,
) -> ApiResult<axum::Json<InclusionProof>> {
    caller.require(Permission::LedgerRead)?;
    let position = size_param(q.position, "position")?;
    let tree_size = size_param(q.tree_size, "tree_size")?;
    if position == 0 || position > tree_size {
        return Err(ApiError::bad_request(format!(
            "position must be between 1 and tree_size ({tree_size})"
        )));
    }
    let row: Option<(Vec<u8>, Option<Uuid>)> =
        sqlx::query_as("SELECT hash, organization_id FROM events WHERE position = $1")
            .bind(position as i64)
            .fetch_optional(&app.pool)
            .await?;
    let (hash, owner) = row.ok_or_else(|| ApiError::not_found("event"))?;
    if !caller.is_platform_admin() && (owner.is_none() || owner != caller.organization_id) {
        return Err(ApiError::not_found("event"));
    }
    let proof = tree::inclusion_proof(&app.pool, position, tree_size).await?;
    let root = tree::root_at(&app.pool, tree_size).await?;
    let event_hash: [u8; 32] = hash
        .as_slice()
        .try_into()
        .map_err(|_| ApiError::internal("a stored hash is not 32 bytes"))?;
    Ok(axum::Json(InclusionProof {
        kind: "inclusion",
        position,
        tree_size,
        event_hash: hex::encode(event_hash),
        leaf_hash: hex::encode(Blake3::leaf(&event_hash)),
        proof: hexes(&proof),
        root: hex::encode(root),
    }))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyQuery {
    from_size: Option<i64>,
    to_size: Option<i64>,
}

/// That the tree of `from_size` leaves is a prefix of the tree of `to_size`. Hashes in hex.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConsistencyProof {
    /// Always `consistency`.
    #[schemars(extend("const" = "consistency"))]
    pub kind: &'static str,
    pub from_size: u64,
    pub to_size: u64,
    pub from_root: String,
    pub to_root: String,
    pub proof: Vec<String>,
}

pub async fn consistency(
    State(app): State<App>,
    caller: Caller,
    Query(q): Query<ConsistencyQuery>,
) -> ApiResult<axum::Json<ConsistencyProof>> {
    caller.require(Permission::LedgerRead)?;
    let from = size_param(q.from_size, "from_size")?;
    let to = size_param(q.to_size, "to_size")?;
    let proof = tree::consistency_proof(&app.pool, from, to).await?;
    Ok(axum::Json(ConsistencyProof {
        kind: "consistency",
        from_size: from,
        to_size: to,
        from_root: hex::encode(tree::root_at(&app.pool, from).await?),
        to_root: hex::encode(tree::root_at(&app.pool, to).await?),
        proof: hexes(&proof),
    }))
}

/// The key that signs the checkpoints.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PublicKeyView {
    /// The log's name, as in its checkpoints' first line.
    pub name: String,
    /// Always `ed25519`.
    #[schemars(extend("const" = "ed25519"))]
    pub algorithm: &'static str,
    /// The signed-note verifier key (`name+keyid+key`).
    pub key: String,
    /// The raw public key, in hex.
    pub public_key: String,
}

pub async fn public_key(
    State(app): State<App>,
    caller: Caller,
) -> ApiResult<axum::Json<PublicKeyView>> {
    caller.require(Permission::LedgerRead)?;
    let signer = app.log_signer().ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "this server signs no checkpoints",
        )
    })?;
    let verifier = signer.verifier();
    Ok(axum::Json(PublicKeyView {
        name: signer.name().to_string(),
        algorithm: "ed25519",
        key: verifier.to_string(),
        public_key: verifier.public_key_hex(),
    }))
}
