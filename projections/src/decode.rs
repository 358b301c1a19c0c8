//! Reading a stored event's payload and metadata into typed values, strictly: an event a
//! projection cannot read is an error, never a silent skip.

use cqrs_es::DomainEvent;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::{ProjectionError, StoredEvent};

/// The payload as the domain event it claims to be. Versions other than the current one
/// would be upcast here; until there are any, they are refused.
pub(crate) fn payload<E: DeserializeOwned + DomainEvent>(
    event: &StoredEvent,
) -> Result<E, ProjectionError> {
    if event.event_version != ledgerline_aggregates::EVENT_VERSION {
        return Err(ProjectionError::decode(
            event.position,
            format!(
                "unsupported version {} of {} {}",
                event.event_version, event.aggregate_type, event.event_type
            ),
        ));
    }
    let decoded: E = serde_json::from_str(&event.payload).map_err(|e| {
        ProjectionError::decode(
            event.position,
            format!("{} {}: {e}", event.aggregate_type, event.event_type),
        )
    })?;
    // The column is what readers filter on; a payload of another type would make them lie.
    if decoded.event_type() != event.event_type {
        return Err(ProjectionError::decode(
            event.position,
            format!(
                "event_type is {} but the payload is {}",
                event.event_type,
                decoded.event_type()
            ),
        ));
    }
    Ok(decoded)
}

/// The aggregate id as a UUID (every ledgerline aggregate is identified by one).
pub(crate) fn aggregate_id(event: &StoredEvent) -> Result<Uuid, ProjectionError> {
    Uuid::parse_str(&event.aggregate_id).map_err(|e| {
        ProjectionError::decode(
            event.position,
            format!("aggregate_id `{}` is not a UUID: {e}", event.aggregate_id),
        )
    })
}

/// An event's metadata: a JSON object of strings (keys in `ledgerline_aggregates::metadata`).
pub(crate) struct Metadata {
    position: i64,
    fields: Map<String, Value>,
}

impl Metadata {
    pub(crate) fn of(event: &StoredEvent) -> Result<Self, ProjectionError> {
        let fields = serde_json::from_str(&event.metadata).map_err(|e| {
            ProjectionError::decode(
                event.position,
                format!("metadata is not a JSON object: {e}"),
            )
        })?;
        Ok(Self {
            position: event.position,
            fields,
        })
    }

    pub(crate) fn text(&self, key: &str) -> Result<Option<&str>, ProjectionError> {
        match self.fields.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(ProjectionError::decode(
                self.position,
                format!("metadata `{key}` is not a string: {other}"),
            )),
        }
    }

    pub(crate) fn uuid(&self, key: &str) -> Result<Option<Uuid>, ProjectionError> {
        self.text(key)?
            .map(|s| {
                Uuid::parse_str(s).map_err(|e| {
                    ProjectionError::decode(
                        self.position,
                        format!("metadata `{key}` is not a UUID: {e}"),
                    )
                })
            })
            .transpose()
    }
}

/// Fails unless a statement touched exactly one row: an update of a row that does not exist
/// means the read model and the log disagree, and applying on would hide it.
pub(crate) fn one_row(
    event: &StoredEvent,
    result: sqlx::postgres::PgQueryResult,
    table: &str,
) -> Result<(), ProjectionError> {
    match result.rows_affected() {
        1 => Ok(()),
        n => Err(ProjectionError::inconsistent(
            event.position,
            format!(
                "{} {} {} touched {n} rows of {table}, expected 1",
                event.aggregate_type, event.aggregate_id, event.event_type
            ),
        )),
    }
}
