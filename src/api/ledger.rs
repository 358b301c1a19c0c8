//! The auditor's raw view of the ledger: the head, and one tenant's events exactly as
//! stored (payload and metadata as the hashed JSON text) with their hashes, page by page or
//! as an export file that `ledgerline verify --file` checks offline.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::SecondsFormat;
use ledgerline_aggregates::Permission;
use ledgerline_projections::{StoredEvent, STORED_EVENT_COLUMNS};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::answers::PageOf;
use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::extract::{Path, Query};
use super::{organizations, page};
use crate::app::App;
use crate::ledger::export::{self, ExportError, ExportScope};

/// The newest event of the whole ledger.
#[derive(Debug, Serialize, JsonSchema)]
pub struct LedgerHead {
    /// 0 while the ledger is empty.
    pub position: i64,
    /// Its hash, in hex (all zeros while the ledger is empty).
    pub hash: String,
}

pub async fn head(State(app): State<App>, caller: Caller) -> ApiResult<axum::Json<LedgerHead>> {
    caller.require(Permission::LedgerRead)?;
    let head = app.store.head().await?;
    Ok(axum::Json(LedgerHead {
        position: head.position,
        hash: hex::encode(head.hash),
    }))
}

/// An event exactly as the ledger stores it, with its hashes (docs/ledger-format.md).
#[derive(Debug, Serialize, JsonSchema)]
pub struct LedgerEventView {
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub organization_id: Option<Uuid>,
    /// RFC 3339 with microseconds, as hashed.
    pub recorded_at: String,
    pub recorded_at_micros: i64,
    /// The payload's JSON text, byte for byte as hashed.
    pub payload: String,
    /// The metadata's JSON text, byte for byte as hashed.
    pub metadata: String,
    /// The previous event's hash, in hex.
    pub prev_hash: String,
    /// In hex.
    pub hash: String,
    /// The format of `hash` (1 or 2).
    pub hash_version: i16,
}

impl From<StoredEvent> for LedgerEventView {
    fn from(e: StoredEvent) -> Self {
        Self {
            position: e.position,
            aggregate_type: e.aggregate_type,
            aggregate_id: e.aggregate_id,
            sequence: e.sequence,
            event_type: e.event_type,
            event_version: e.event_version,
            organization_id: e.organization_id,
            recorded_at: e.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            recorded_at_micros: e.recorded_at.timestamp_micros(),
            payload: e.payload,
            metadata: e.metadata,
            prev_hash: hex::encode(&e.prev_hash),
            hash: hex::encode(&e.hash),
            hash_version: e.hash_version,
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Only events after this position (the `next_cursor` of the previous page).
    after: Option<i64>,
    limit: Option<i64>,
}

pub async fn events(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<axum::Json<PageOf<LedgerEventView>>> {
    caller.require_in(org, Permission::LedgerRead)?;
    organizations::require_exists(&app, &caller, org).await?;
    let limit = page::limit(q.limit, 100, 1000)?;
    let mut rows: Vec<StoredEvent> = sqlx::query_as(&format!(
        "SELECT {STORED_EVENT_COLUMNS} FROM events WHERE organization_id = $1 AND position > $2 ORDER BY position LIMIT $3"
    ))
    .bind(org)
    .bind(q.after.unwrap_or(0))
    .bind(limit + 1)
    .fetch_all(&app.pool)
    .await?;
    // One row more than the page tells whether another follows: a full last page says so.
    let next_cursor = page::cut(&mut rows, limit, |r| r.position);
    let items = rows.into_iter().map(LedgerEventView::from).collect();
    Ok(axum::Json(PageOf { items, next_cursor }))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// The first position (default 1).
    from: Option<i64>,
    /// The last position (default: the head when the export starts).
    to: Option<i64>,
}

/// The tenant's export file (docs/ledger-format.md, "Export files"): its events in full, every
/// other position of the range as a stub, streamed as JSON Lines.
/// The range is checked before the first byte is sent; a failure after that ends the stream
/// abruptly rather than cleanly, so that a partial file is never taken for a whole one.
pub async fn export(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    Query(q): Query<ExportQuery>,
) -> ApiResult<Response> {
    caller.require_in(org, Permission::LedgerRead)?;
    organizations::require_exists(&app, &caller, org).await?;
    let scope = ExportScope {
        organization: Some(org),
        from: q.from.unwrap_or(1),
        to: q.to,
    };
    let prepared = export::prepare(&app.pool, scope, app.origin())
        .await
        .map_err(|e| match e {
            ExportError::Range(m) => ApiError::bad_request(m),
            other => ApiError::internal(other),
        })?;
    let filename = format!(
        "ledgerline-{org}-{}-{}.jsonl",
        prepared.header.from, prepared.header.to
    );
    let (writer, reader) = tokio::io::duplex(1 << 16);
    let pool = app.pool.clone();
    let task = tokio::spawn(async move { prepared.write(&pool, writer).await });
    let body = futures::stream::unfold((reader, Some(task)), |(mut reader, task)| async move {
        use tokio::io::AsyncReadExt;
        let task = task?;
        let mut buf = vec![0u8; 1 << 16];
        match reader.read(&mut buf).await {
            Ok(0) => {
                let failed = match task.await {
                    Ok(Ok(_)) => return None,
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(error = %failed, "export failed while streaming");
                Some((Err(std::io::Error::other(failed)), (reader, None)))
            }
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), (reader, Some(task))))
            }
            Err(e) => Some((Err(e), (reader, None))),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}
