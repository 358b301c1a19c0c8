//! What the multi-row paths (`messaging_batch`, `users_batch`) share: when they are taken,
//! and why one gave up on a batch, which the per-event path then applies, saying what is
//! wrong, if anything.

use cqrs_es::DomainEvent;
use serde::de::DeserializeOwned;
use sqlx::PgConnection;

use crate::{copy_in, decode, ProjectionError, StoredEvent};

/// Batches shorter than this (the live projector's usual few events) go one by one: the
/// savepoint would cost more than the statements it saves (`Projection::apply_many`).
pub(crate) const BULK_FROM: usize = 8;

#[derive(Debug)]
pub(crate) enum GiveUp {
    Sql(sqlx::Error),
    Event(ProjectionError),
    /// A statement touched another number of rows than the events it applied.
    Rows {
        expected: usize,
        touched: i64,
    },
    /// An event the multi-row statements do not cover, or whose outcome one by one depends
    /// on more than the fold sees.
    Uncovered,
}

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GiveUp::Sql(e) => write!(f, "{e}"),
            GiveUp::Event(e) => write!(f, "{e}"),
            GiveUp::Rows { expected, touched } => {
                write!(
                    f,
                    "a statement touched {touched} rows for {expected} events"
                )
            }
            GiveUp::Uncovered => write!(f, "an event the multi-row path does not cover"),
        }
    }
}

impl From<sqlx::Error> for GiveUp {
    fn from(e: sqlx::Error) -> Self {
        GiveUp::Sql(e)
    }
}

impl From<copy_in::EncodeError> for GiveUp {
    fn from(e: copy_in::EncodeError) -> Self {
        GiveUp::Sql(e.into())
    }
}

impl From<ProjectionError> for GiveUp {
    fn from(e: ProjectionError) -> Self {
        GiveUp::Event(e)
    }
}

/// Runs a multi-row path's `write` under a savepoint: its writes kept if they all worked,
/// undone if it gave up, so that the one-by-one path starts from the batch's beginning.
/// Returns what `write` returned.
pub(crate) async fn under_savepoint(
    conn: &mut PgConnection,
    write: impl AsyncFnOnce(&mut PgConnection) -> Result<(), GiveUp>,
) -> Result<(), GiveUp> {
    sqlx::query("SAVEPOINT multi_row")
        .execute(&mut *conn)
        .await?;
    let result = write(&mut *conn).await;
    let end = if result.is_ok() {
        "RELEASE SAVEPOINT multi_row"
    } else {
        "ROLLBACK TO SAVEPOINT multi_row"
    };
    sqlx::query(end).execute(conn).await?;
    result
}

/// Fails (to the one-by-one path) unless a statement touched exactly `expected` rows.
pub(crate) fn exactly(expected: usize, touched: i64) -> Result<(), GiveUp> {
    if i64::try_from(expected).is_ok_and(|n| n == touched) {
        Ok(())
    } else {
        Err(GiveUp::Rows { expected, touched })
    }
}

/// An event's payload as a multi-row path reads it: as `decode::payload` does, but giving
/// up on a payload holding a NUL character (`\u0000` in its JSON). PostgreSQL's text refuses
/// NUL, so one by one such a value fails where it is written; a fold might never write it
/// (a later event of the batch replacing it) and so never fail.
pub(crate) fn payload<E: DeserializeOwned + DomainEvent>(event: &StoredEvent) -> Result<E, GiveUp> {
    if event.payload.contains("\\u0000") {
        return Err(GiveUp::Uncovered);
    }
    Ok(decode::payload(event)?)
}
