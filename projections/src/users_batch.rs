//! The `users` projection applied a batch at a time: each user's events in the batch are
//! folded into the row they leave, written with at most three statements per batch (the
//! users invited in it inserted as they end it, the others updated once each, the erased
//! users' data keys destroyed) instead of one per event. One statement per event made
//! `users` the costliest of a rebuild's small lanes: about 10 of a million-event rebuild's
//! 60 CPU-seconds on a 2-core machine (docs/benchmarks.md, 2026-12-06).
//!
//! `users.rs` stays the definition. The fold gives up, and the batch goes one event at a
//! time, on anything the per-event path could fail on: an event that does not decode or
//! names another user, an invitation after another event of the same user in the batch (a
//! second invitation, or one whose user was changed before it existed), any event after an
//! erasure in the batch, a statement that fails (an invitation of a user already there, a
//! check constraint) or touches another number of rows than users (one absent, or erased
//! before the batch: the per-event path fails on most events of an erased user, and a later
//! event could make the folded row valid again). Without an erasure no event can break the
//! table's check (the sealed fields are only ever set, never cleared), so the folded row is
//! valid exactly when every row on the way is.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ledgerline_aggregates::user::UserEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::give_up::{self, exactly, GiveUp};
use crate::{decode, Projection, StoredEvent};

/// Applies a batch of 8 events or more folded; `Err` when it gave up, its writes undone.
pub(crate) async fn bulk(conn: &mut PgConnection, events: &[StoredEvent]) -> Result<(), GiveUp> {
    let folded = Fold::of(events)?;
    give_up::under_savepoint(conn, async |conn| folded.write(conn).await).await
}

/// A column the batch sets (`Some`, to a value or to NULL) or leaves as it is (`None`).
type Set<T> = Option<Option<T>>;

/// One user's row as the batch's events leave it.
#[derive(Default)]
struct Row {
    /// Invited in the batch: every column is set.
    invited: Option<(Uuid, DateTime<Utc>)>,
    email: Set<String>,
    full_name: Set<String>,
    blind_index: Set<String>,
    status: Option<&'static str>,
    reason: Set<String>,
    updated_at: Option<DateTime<Utc>>,
    deactivated_at: Set<DateTime<Utc>>,
    erased_at: Set<DateTime<Utc>>,
    version: i64,
    erased: bool,
}

/// The batch's users, in the order of their first event.
struct Fold {
    rows: Vec<(Uuid, Row)>,
    erased: Vec<crate::Forgotten>,
}

impl Fold {
    fn of(events: &[StoredEvent]) -> Result<Self, GiveUp> {
        let mut rows: Vec<(Uuid, Row)> = Vec::new();
        let mut index: HashMap<Uuid, usize> = HashMap::new();
        let mut erased = Vec::new();
        for event in events {
            // As `Projection::apply` and `users::apply` pass them over.
            if event.aggregate_type != "User"
                || !Projection::Users.reads(&event.aggregate_type, &event.event_type)
            {
                continue;
            }
            let id = decode::aggregate_id(event)?;
            let kind = give_up::payload::<UserEvent>(event)?;
            let seen = index.get(&id).copied();
            let slot = *index.entry(id).or_insert_with(|| {
                rows.push((id, Row::default()));
                rows.len() - 1
            });
            let row = &mut rows[slot].1;
            if row.erased {
                return Err(GiveUp::Uncovered);
            }
            let at = event.recorded_at;
            row.version = event.sequence;
            match kind {
                UserEvent::UserInvited {
                    user_id,
                    organization_id,
                    email,
                    full_name,
                    email_blind_index,
                } => {
                    if user_id != id || seen.is_some() {
                        return Err(GiveUp::Uncovered);
                    }
                    *row = Row {
                        invited: Some((organization_id, at)),
                        email: Some(Some(email.0)),
                        full_name: Some(Some(full_name.0)),
                        blind_index: Some(Some(email_blind_index)),
                        status: Some("active"),
                        reason: Some(None),
                        updated_at: Some(at),
                        deactivated_at: Some(None),
                        erased_at: Some(None),
                        version: event.sequence,
                        erased: false,
                    };
                }
                // As `users::apply`: only the fields present change.
                UserEvent::UserProfileUpdated {
                    email,
                    email_blind_index,
                    full_name,
                    ..
                } => {
                    if let Some(email) = email {
                        row.email = Some(Some(email.0));
                    }
                    if let Some(blind_index) = email_blind_index {
                        row.blind_index = Some(Some(blind_index));
                    }
                    if let Some(full_name) = full_name {
                        row.full_name = Some(Some(full_name.0));
                    }
                    row.updated_at = Some(at);
                }
                UserEvent::UserDeactivated { reason } => {
                    row.status = Some("deactivated");
                    row.deactivated_at = Some(Some(at));
                    row.reason = Some(reason);
                    row.updated_at = Some(at);
                }
                UserEvent::UserReactivated {} => {
                    row.status = Some("active");
                    row.deactivated_at = Some(None);
                    row.reason = Some(None);
                    row.updated_at = Some(at);
                }
                UserEvent::UserErased { .. } => {
                    row.status = Some("erased");
                    (row.email, row.full_name, row.blind_index) =
                        (Some(None), Some(None), Some(None));
                    row.erased_at = Some(Some(at));
                    row.updated_at = Some(at);
                    row.erased = true;
                    erased.push(crate::Forgotten::of(id, event)?);
                }
                // Only the version moves (see users.rs).
                UserEvent::UserRoleAssigned { .. } | UserEvent::UserRoleRevoked { .. } => {}
            }
        }
        Ok(Self { rows, erased })
    }

    async fn write(self, conn: &mut PgConnection) -> Result<(), GiveUp> {
        let (invited, changed): (Vec<_>, Vec<_>) = self
            .rows
            .into_iter()
            .partition(|(_, r)| r.invited.is_some());
        insert(conn, invited).await?;
        update(conn, changed).await?;
        if !self.erased.is_empty() {
            // As users.rs: the erased users' data keys are destroyed with the erasure.
            crate::destroy_keys_and_forget(conn, crate::SUBJECT_KEYS, &self.erased).await?;
        }
        Ok(())
    }
}

/// The users invited in the batch, each as the batch leaves it. The statements that take
/// arrays are planned for their own (`persistent(false)`): a cached generic plan assumes a
/// hundred rows per array.
async fn insert(conn: &mut PgConnection, rows: Vec<(Uuid, Row)>) -> Result<(), GiveUp> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut c = Columns::default();
    let mut organizations = Vec::new();
    let mut created = Vec::new();
    for (id, row) in rows {
        let (organization, at) = row.invited.expect("only invited rows are inserted");
        organizations.push(organization);
        created.push(at);
        c.push(id, row);
    }
    let inserted = sqlx::query(
        "INSERT INTO users (id, organization_id, email_sealed, full_name_sealed, \
         email_blind_index, status, deactivation_reason, created_at, updated_at, \
         deactivated_at, erased_at, version) \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
         $6::text[], $7::text[], $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], \
         $11::timestamptz[], $12::bigint[])",
    )
    .bind(&c.ids)
    .bind(&organizations)
    .bind(&c.email.1)
    .bind(&c.full_name.1)
    .bind(&c.blind_index.1)
    .bind(&c.status)
    .bind(&c.reason.1)
    .bind(&created)
    .bind(&c.updated_at)
    .bind(&c.deactivated_at.1)
    .bind(&c.erased_at.1)
    .bind(&c.version)
    .persistent(false)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    exactly(c.ids.len(), i64::try_from(inserted).unwrap_or(i64::MAX))
}

/// The other users, each updated once: a column the batch sets takes its value, the others
/// keep theirs. An erased user is not touched (see the module's comment).
async fn update(conn: &mut PgConnection, rows: Vec<(Uuid, Row)>) -> Result<(), GiveUp> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut c = Columns::default();
    for (id, row) in rows {
        c.push(id, row);
    }
    let updated = sqlx::query(
        "UPDATE users u SET \
         email_sealed = CASE WHEN t.set_email THEN t.email ELSE u.email_sealed END, \
         full_name_sealed = CASE WHEN t.set_name THEN t.full_name ELSE u.full_name_sealed END, \
         email_blind_index = CASE WHEN t.set_blind THEN t.blind ELSE u.email_blind_index END, \
         status = coalesce(t.status, u.status), \
         deactivation_reason = CASE WHEN t.set_reason THEN t.reason ELSE u.deactivation_reason END, \
         updated_at = coalesce(t.updated_at, u.updated_at), \
         deactivated_at = CASE WHEN t.set_deactivated THEN t.deactivated_at ELSE u.deactivated_at END, \
         erased_at = CASE WHEN t.set_erased THEN t.erased_at ELSE u.erased_at END, \
         version = t.version \
         FROM unnest($1::uuid[], $2::bool[], $3::text[], $4::bool[], $5::text[], $6::bool[], \
         $7::text[], $8::text[], $9::bool[], $10::text[], $11::timestamptz[], $12::bool[], \
         $13::timestamptz[], $14::bool[], $15::timestamptz[], $16::bigint[]) \
         AS t(id, set_email, email, set_name, full_name, set_blind, blind, status, set_reason, \
         reason, updated_at, set_deactivated, deactivated_at, set_erased, erased_at, version) \
         WHERE u.id = t.id AND u.status <> 'erased'",
    )
    .bind(&c.ids)
    .bind(&c.email.0)
    .bind(&c.email.1)
    .bind(&c.full_name.0)
    .bind(&c.full_name.1)
    .bind(&c.blind_index.0)
    .bind(&c.blind_index.1)
    .bind(&c.status)
    .bind(&c.reason.0)
    .bind(&c.reason.1)
    .bind(&c.updated_at)
    .bind(&c.deactivated_at.0)
    .bind(&c.deactivated_at.1)
    .bind(&c.erased_at.0)
    .bind(&c.erased_at.1)
    .bind(&c.version)
    .persistent(false)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    exactly(c.ids.len(), i64::try_from(updated).unwrap_or(i64::MAX))
}

/// A settable column as two arrays: whether each row sets it, and to what.
type Settable<T> = (Vec<bool>, Vec<Option<T>>);

/// The rows' columns as arrays, for `unnest`.
#[derive(Default)]
struct Columns {
    ids: Vec<Uuid>,
    email: Settable<String>,
    full_name: Settable<String>,
    blind_index: Settable<String>,
    status: Vec<Option<&'static str>>,
    reason: Settable<String>,
    updated_at: Vec<Option<DateTime<Utc>>>,
    deactivated_at: Settable<DateTime<Utc>>,
    erased_at: Settable<DateTime<Utc>>,
    version: Vec<i64>,
}

impl Columns {
    fn push(&mut self, id: Uuid, row: Row) {
        fn set<T>(column: &mut Settable<T>, value: Set<T>) {
            column.0.push(value.is_some());
            column.1.push(value.flatten());
        }
        self.ids.push(id);
        set(&mut self.email, row.email);
        set(&mut self.full_name, row.full_name);
        set(&mut self.blind_index, row.blind_index);
        self.status.push(row.status);
        set(&mut self.reason, row.reason);
        self.updated_at.push(row.updated_at);
        set(&mut self.deactivated_at, row.deactivated_at);
        set(&mut self.erased_at, row.erased_at);
        self.version.push(row.version);
    }
}
