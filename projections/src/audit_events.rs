//! The `audit_events` read model: one row per ledger event, with who did it and how pulled
//! out of the metadata so the audit API can filter on them.
//!
//! It copies every event, of any aggregate type or event type, without decoding the payload:
//! the audit trail must show everything the log holds, including events that the domain
//! projections do not (yet) understand.
//!
//! A long batch (a rebuild's, a catch-up's) is written with one binary `COPY`
//! (`crate::copy_in`), the cheapest way into PostgreSQL. `COPY` has no `ON CONFLICT`: a row
//! already there fails it, and the batch then goes one event at a time with the per-event
//! `INSERT ... ON CONFLICT DO NOTHING`, which stays the definition, so the table ends the same
//! either way.

use ledgerline_aggregates::metadata;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::copy_in::{self, BinaryCopy, Field};
use crate::decode::Metadata;
use crate::{ProjectionError, StoredEvent};

pub const NAME: &str = "audit_events";
pub const TABLES: &[&str] = &["audit_events"];

/// Batches at least this long are written with one `COPY`; shorter ones (the live projector's
/// usual few events) one event at a time, which needs no savepoint.
const BULK_FROM: usize = 8;

/// The row of one event, decoded from its metadata.
struct Row<'e> {
    event: &'e StoredEvent,
    actor_kind: Option<String>,
    actor_user_id: Option<Uuid>,
    actor_key_id: Option<Uuid>,
    request_id: Option<String>,
    client_ip: Option<String>,
    user_agent: Option<String>,
}

impl<'e> Row<'e> {
    fn of(event: &'e StoredEvent) -> Result<Self, ProjectionError> {
        let meta = Metadata::of(event)?;
        let text = |key| Ok::<_, ProjectionError>(meta.text(key)?.map(str::to_owned));
        Ok(Self {
            event,
            actor_kind: text(metadata::ACTOR_KIND)?,
            actor_user_id: meta.uuid(metadata::ACTOR_USER_ID)?,
            actor_key_id: meta.uuid(metadata::ACTOR_KEY_ID)?,
            request_id: text(metadata::REQUEST_ID)?,
            client_ip: text(metadata::CLIENT_IP)?,
            user_agent: text(metadata::USER_AGENT)?,
        })
    }

    /// The row's fields in the order of [`COPY`]'s columns, each in its column's type.
    fn fields(&self) -> [Field<'_>; 15] {
        fn text(s: &Option<String>) -> Field<'_> {
            Field::or_null(s.as_deref().map(Field::Text))
        }
        let e = self.event;
        [
            Field::Bigint(e.position),
            Field::or_null(e.organization_id.map(Field::Uuid)),
            text(&self.actor_kind),
            Field::or_null(self.actor_user_id.map(Field::Uuid)),
            Field::or_null(self.actor_key_id.map(Field::Uuid)),
            Field::Text(&e.event_type),
            Field::Text(&e.event_version),
            Field::Text(&e.aggregate_type),
            Field::Text(&e.aggregate_id),
            Field::Bigint(e.sequence),
            Field::Jsonb(&e.payload),
            text(&self.request_id),
            text(&self.client_ip),
            text(&self.user_agent),
            Field::Timestamptz(e.recorded_at),
        ]
    }
}

/// Every column of `audit_events` (migrations 0002, 0013), in the order of [`Row::fields`].
const COPY: &str = "COPY audit_events (position, organization_id, actor_kind, actor_user_id, \
                    actor_key_id, event_type, event_version, aggregate_type, aggregate_id, \
                    sequence, event_data, request_id, client_ip, user_agent, recorded_at) \
                    FROM STDIN (FORMAT binary)";

pub async fn apply(conn: &mut PgConnection, event: &StoredEvent) -> Result<(), ProjectionError> {
    insert(conn, &[Row::of(event)?]).await?;
    Ok(())
}

/// Applies `events` in order with one `COPY`; on failure, the index of the failing event and
/// why. A `COPY` that fails (an event's row already there, say) is undone to a savepoint and
/// the events are applied one by one, so that the failure names its own event.
pub async fn apply_many(
    conn: &mut PgConnection,
    events: &[StoredEvent],
) -> Result<(), (usize, ProjectionError)> {
    if events.len() < BULK_FROM {
        for (index, event) in events.iter().enumerate() {
            apply(conn, event).await.map_err(|e| (index, e))?;
        }
        return Ok(());
    }
    let rows = events
        .iter()
        .enumerate()
        .map(|(index, event)| Row::of(event).map_err(|e| (index, e)))
        .collect::<Result<Vec<_>, _>>()?;
    let savepoint = |sql: &'static str| sqlx::query(sql);
    savepoint("SAVEPOINT audit_events_bulk")
        .execute(&mut *conn)
        .await
        .map_err(|e| (0, e.into()))?;
    match copy(conn, &rows).await {
        Ok(()) => {
            savepoint("RELEASE SAVEPOINT audit_events_bulk")
                .execute(&mut *conn)
                .await
                .map_err(|e| (0, e.into()))?;
            Ok(())
        }
        Err(bulk) => {
            crate::note_bulk_fallback(NAME, &bulk);
            savepoint("ROLLBACK TO SAVEPOINT audit_events_bulk")
                .execute(&mut *conn)
                .await
                .map_err(|e| (0, e.into()))?;
            for (index, row) in rows.iter().enumerate() {
                insert(conn, std::slice::from_ref(row))
                    .await
                    .map_err(|e| (index, e.into()))?;
            }
            // Each event went in alone: whatever failed the statement was not an event's.
            Ok(())
        }
    }
}

/// The rows in one `COPY`, all or none.
async fn copy(conn: &mut PgConnection, rows: &[Row<'_>]) -> sqlx::Result<()> {
    let mut data = BinaryCopy::new();
    for row in rows {
        data.row(&row.fields())?;
    }
    copy_in::copy(conn, COPY, data).await?;
    Ok(())
}

/// One statement for any number of rows; an event already copied is left as it is.
async fn insert(conn: &mut PgConnection, rows: &[Row<'_>]) -> sqlx::Result<()> {
    let column = |f: &dyn Fn(&Row) -> Option<String>| rows.iter().map(f).collect::<Vec<_>>();
    let ids = |f: &dyn Fn(&Row) -> Option<Uuid>| rows.iter().map(f).collect::<Vec<_>>();
    let e =
        |f: &dyn Fn(&StoredEvent) -> String| rows.iter().map(|r| f(r.event)).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO audit_events (position, organization_id, actor_kind, actor_user_id, \
         actor_key_id, event_type, event_version, aggregate_type, aggregate_id, sequence, \
         event_data, request_id, client_ip, user_agent, recorded_at) \
         SELECT position, organization_id, actor_kind, actor_user_id, actor_key_id, \
         event_type, event_version, aggregate_type, aggregate_id, sequence, \
         event_data::jsonb, request_id, client_ip, user_agent, recorded_at \
         FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::uuid[], $5::uuid[], \
         $6::text[], $7::text[], $8::text[], $9::text[], $10::bigint[], $11::text[], \
         $12::text[], $13::text[], $14::text[], $15::timestamptz[]) \
         AS r(position, organization_id, actor_kind, actor_user_id, actor_key_id, \
         event_type, event_version, aggregate_type, aggregate_id, sequence, event_data, \
         request_id, client_ip, user_agent, recorded_at) \
         ON CONFLICT (position) DO NOTHING",
    )
    .bind(rows.iter().map(|r| r.event.position).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.event.organization_id)
            .collect::<Vec<_>>(),
    )
    .bind(column(&|r| r.actor_kind.clone()))
    .bind(ids(&|r| r.actor_user_id))
    .bind(ids(&|r| r.actor_key_id))
    .bind(e(&|e| e.event_type.clone()))
    .bind(e(&|e| e.event_version.clone()))
    .bind(e(&|e| e.aggregate_type.clone()))
    .bind(e(&|e| e.aggregate_id.clone()))
    .bind(rows.iter().map(|r| r.event.sequence).collect::<Vec<_>>())
    .bind(e(&|e| e.payload.clone()))
    .bind(column(&|r| r.request_id.clone()))
    .bind(column(&|r| r.client_ip.clone()))
    .bind(column(&|r| r.user_agent.clone()))
    .bind(rows.iter().map(|r| r.event.recorded_at).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}
