//! The `audit_events` read model: one row per ledger event, with who did it and how pulled
//! out of the metadata so the audit API can filter on them.
//!
//! It copies every event, of any aggregate type or event type, without decoding the payload:
//! the audit trail must show everything the log holds, including events that the domain
//! projections do not (yet) understand.

use ledgerline_aggregates::metadata;
use sqlx::PgConnection;

use crate::decode::Metadata;
use crate::{ProjectionError, StoredEvent};

pub const NAME: &str = "audit_events";
pub const TABLES: &[&str] = &["audit_events"];

pub async fn apply(conn: &mut PgConnection, event: &StoredEvent) -> Result<(), ProjectionError> {
    let meta = Metadata::of(event)?;
    sqlx::query(
        "INSERT INTO audit_events (position, organization_id, actor_kind, actor_user_id, \
         actor_key_id, event_type, event_version, aggregate_type, aggregate_id, sequence, \
         event_data, request_id, client_ip, user_agent, recorded_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13, $14, $15) \
         ON CONFLICT (position) DO NOTHING",
    )
    .bind(event.position)
    .bind(event.organization_id)
    .bind(meta.text(metadata::ACTOR_KIND)?)
    .bind(meta.uuid(metadata::ACTOR_USER_ID)?)
    .bind(meta.uuid(metadata::ACTOR_KEY_ID)?)
    .bind(&event.event_type)
    .bind(&event.event_version)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(event.sequence)
    .bind(&event.payload)
    .bind(meta.text(metadata::REQUEST_ID)?)
    .bind(meta.text(metadata::CLIENT_IP)?)
    .bind(meta.text(metadata::USER_AGENT)?)
    .bind(event.recorded_at)
    .execute(conn)
    .await?;
    Ok(())
}
