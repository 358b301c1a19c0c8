//! The `roles` projection applied a batch at a time: each role's events in the batch are
//! folded into the row and the permissions they leave, written with a few statements per
//! batch (the roles created inserted, the others updated once, the deleted ones removed,
//! and the permissions of every role created or updated replaced once) instead of two or
//! three per event (26,000 round trips in a million-event rebuild).
//!
//! `roles.rs` stays the definition. A creation writes the whole row and an update all of it
//! but the creation's columns, each replacing the permissions with the event's set, so the
//! last spec of a role in the batch is the one its row and permissions end with. The
//! per-event code fails on an event that does not decode or names another role, a creation
//! of a role already there, an update or deletion of a role that is not; the fold gives up
//! on the first, on a creation after another event of its role in the batch, and on any
//! event after a deletion in it (one by one, those fail or make the role again), and the
//! statements touch exactly the rows they must or give up (a role made and deleted in the
//! batch must not be there before it), so that the per-event code says what is wrong.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ledgerline_aggregates::role::{RoleEvent, RoleSpec};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::give_up::{self, exactly, GiveUp};
use crate::{decode, StoredEvent};

/// Applies a batch of 8 events or more folded; `Err` when it gave up, its writes undone.
pub(crate) async fn bulk(conn: &mut PgConnection, events: &[StoredEvent]) -> Result<(), GiveUp> {
    let folded = Fold::of(events)?;
    give_up::under_savepoint(conn, async |conn| folded.write(conn).await).await
}

/// One role as the batch's events leave it.
struct Role {
    /// Created in the batch: its organization, whether built in, and when.
    created: Option<(Uuid, bool, DateTime<Utc>)>,
    /// The last spec (`None`: deleted).
    spec: Option<RoleSpec>,
    updated_at: DateTime<Utc>,
    version: i64,
}

/// The batch's roles, in the order of their first event.
struct Fold {
    roles: Vec<(Uuid, Role)>,
}

impl Fold {
    fn of(events: &[StoredEvent]) -> Result<Self, GiveUp> {
        let mut roles: Vec<(Uuid, Role)> = Vec::new();
        let mut index: HashMap<Uuid, usize> = HashMap::new();
        for event in events.iter().filter(|e| e.aggregate_type == "Role") {
            let id = decode::aggregate_id(event)?;
            let kind = give_up::payload::<RoleEvent>(event)?;
            let (at, version) = (event.recorded_at, event.sequence);
            let seen = index.get(&id).map(|&i| &mut roles[i].1);
            match (kind, seen) {
                (
                    RoleEvent::RoleCreated {
                        role_id,
                        organization_id,
                        spec,
                        built_in,
                    },
                    None,
                ) if role_id == id => {
                    index.insert(id, roles.len());
                    let role = Role {
                        created: Some((organization_id, built_in, at)),
                        spec: Some(spec),
                        updated_at: at,
                        version,
                    };
                    roles.push((id, role));
                }
                (RoleEvent::RoleCreated { .. }, _) => return Err(GiveUp::Uncovered),
                // After a deletion in the batch.
                (_, Some(Role { spec: None, .. })) => return Err(GiveUp::Uncovered),
                (RoleEvent::RoleUpdated { after, .. }, Some(role)) => {
                    (role.spec, role.updated_at, role.version) = (Some(after), at, version);
                }
                (RoleEvent::RoleDeleted { .. }, Some(role)) => {
                    (role.spec, role.version) = (None, version);
                }
                (kind, None) => {
                    index.insert(id, roles.len());
                    let spec = match kind {
                        RoleEvent::RoleUpdated { after, .. } => Some(after),
                        _ => None,
                    };
                    let role = Role {
                        created: None,
                        spec,
                        updated_at: at,
                        version,
                    };
                    roles.push((id, role));
                }
            }
        }
        Ok(Fold { roles })
    }

    async fn write(self, conn: &mut PgConnection) -> Result<(), GiveUp> {
        let mut created = Rows::default();
        let mut updated = Rows::default();
        let mut deleted = Vec::new();
        let mut permissions: (Vec<Uuid>, Vec<&'static str>) = (Vec::new(), Vec::new());
        // Made and deleted in the batch: nothing is left of it, but one by one its creation
        // fails if the role is there already.
        let mut fleeting = Vec::new();
        for (id, role) in &self.roles {
            let Some(spec) = &role.spec else {
                match role.created {
                    Some(_) => fleeting.push(*id),
                    None => deleted.push(*id),
                }
                continue;
            };
            match role.created {
                Some(made) => created.push(*id, role, spec, Some(made)),
                None => updated.push(*id, role, spec, None),
            }
            for permission in spec.permissions.iter() {
                permissions.0.push(*id);
                permissions.1.push(permission.as_str());
            }
        }
        if !fleeting.is_empty() {
            let there: i64 = sqlx::query_scalar("SELECT count(*) FROM roles WHERE id = ANY($1)")
                .bind(&fleeting)
                .fetch_one(&mut *conn)
                .await?;
            exactly(0, there)?;
        }
        if !created.id.is_empty() {
            let done = sqlx::query(
                "INSERT INTO roles (id, organization_id, name, description, parent_role_id, \
                 is_built_in, created_at, updated_at, version) \
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], \
                 $5::uuid[], $6::bool[], $7::timestamptz[], $8::timestamptz[], $9::bigint[])",
            )
            .bind(&created.id)
            .bind(&created.organization)
            .bind(&created.name)
            .bind(&created.description)
            .bind(&created.parent)
            .bind(&created.built_in)
            .bind(&created.created_at)
            .bind(&created.updated_at)
            .bind(&created.version)
            .execute(&mut *conn)
            .await?;
            exactly(created.id.len(), done.rows_affected() as i64)?;
        }
        if !updated.id.is_empty() {
            let done = sqlx::query(
                "UPDATE roles r SET name = t.name, description = t.description, \
                 parent_role_id = t.parent, updated_at = t.updated_at, version = t.version \
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], \
                 $5::timestamptz[], $6::bigint[]) \
                 AS t(id, name, description, parent, updated_at, version) WHERE r.id = t.id",
            )
            .bind(&updated.id)
            .bind(&updated.name)
            .bind(&updated.description)
            .bind(&updated.parent)
            .bind(&updated.updated_at)
            .bind(&updated.version)
            .execute(&mut *conn)
            .await?;
            exactly(updated.id.len(), done.rows_affected() as i64)?;
        }
        // As `roles::set_permissions` does for one role: the spec's set replaces the old.
        let replaced: Vec<Uuid> = (created.id.iter().chain(&updated.id))
            .chain(deleted.iter().chain(&fleeting))
            .copied()
            .collect();
        if !replaced.is_empty() {
            sqlx::query("DELETE FROM role_permissions WHERE role_id = ANY($1)")
                .bind(&replaced)
                .execute(&mut *conn)
                .await?;
        }
        if !deleted.is_empty() {
            let done = sqlx::query("DELETE FROM roles WHERE id = ANY($1)")
                .bind(&deleted)
                .execute(&mut *conn)
                .await?;
            exactly(deleted.len(), done.rows_affected() as i64)?;
        }
        if !permissions.0.is_empty() {
            sqlx::query(
                "INSERT INTO role_permissions (role_id, permission, organization_id) \
                 SELECT t.role_id, t.permission, r.organization_id \
                 FROM unnest($1::uuid[], $2::text[]) AS t(role_id, permission) \
                 JOIN roles r ON r.id = t.role_id ON CONFLICT DO NOTHING",
            )
            .bind(&permissions.0)
            .bind(&permissions.1)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

/// Roles to insert or update, as columns.
#[derive(Default)]
struct Rows {
    id: Vec<Uuid>,
    organization: Vec<Uuid>,
    name: Vec<String>,
    description: Vec<String>,
    parent: Vec<Option<Uuid>>,
    built_in: Vec<bool>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    version: Vec<i64>,
}

impl Rows {
    fn push(
        &mut self,
        id: Uuid,
        role: &Role,
        spec: &RoleSpec,
        created: Option<(Uuid, bool, DateTime<Utc>)>,
    ) {
        self.id.push(id);
        if let Some((organization, built_in, at)) = created {
            self.organization.push(organization);
            self.built_in.push(built_in);
            self.created_at.push(at);
        }
        self.name.push(spec.name.clone());
        self.description.push(spec.description.clone());
        self.parent.push(spec.parent_role_id);
        self.updated_at.push(role.updated_at);
        self.version.push(role.version);
    }
}
