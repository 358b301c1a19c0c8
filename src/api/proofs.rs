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

#[derive(Debug, Serialize, JsonSchema, sqlx::FromRow)]
pub struct CheckpointView {
    pub tree_size: i64,
    #[sqlx(skip)]
    pub root: String,
    #[sqlx(skip)]
    pub chain_head: String,
    pub signed_at: DateTime<Utc>,
    /// The signed note exactly as signed: what an auditor keeps.
    pub note: String,
    #[serde(skip)]
    root_bytes: Vec<u8>,
    #[serde(skip)]
    chain_head_bytes: Vec<u8>,
}

const SELECT_CHECKPOINT: &str = "SELECT tree_size, signed_at, note, root AS root_bytes, \
     chain_head AS chain_head_bytes FROM checkpoints";

fn views(rows: Vec<CheckpointView>) -> Vec<CheckpointView> {
    rows.into_iter()
        .map(|mut c| {
            c.root = hex::encode(&c.root_bytes);
            c.chain_head = hex::encode(&c.chain_head_bytes);
            c
        })
        .collect()
}

pub async fn latest(
    State(app): State<App>,
    caller: Caller,
) -> ApiResult<axum::Json<CheckpointView>> {
    caller.require(Permission::LedgerRead)?;
    let rows = sqlx::query_as(&format!(
        "{SELECT_CHECKPOINT} ORDER BY tree_size DESC LIMIT 1"
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
    /// Only checkpoints of a smaller tree (the `next_cursor` of the previous page).
    before_size: Option<i64>,
    /// Exactly this size.
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
    let rows: Vec<CheckpointView> = sqlx::query_as(&format!(
        "{SELECT_CHECKPOINT} WHERE ($1::bigint IS NULL OR tree_size < $1) \
         AND ($2::bigint IS NULL OR tree_size = $2) ORDER BY tree_size DESC LIMIT $3"
    ))
    .bind(q.before_size)
    .bind(q.tree_size)
    .bind(limit + 1)
    .fetch_all(&app.pool)
    .await?;
    let mut items = views(rows);
    let next_cursor = page::cut(&mut items, limit, |c| c.tree_size);
    Ok(page::answer(items, next_cursor))
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
