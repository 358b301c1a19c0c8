//! The `user_roles` projection applied a batch at a time: at most three statements per
//! batch (the assignments of the roles deleted in it removed, the assignments revoked
//! removed, the assignments standing at its end written as their last assignment left
//! them) instead of one per assignment, revocation or deletion, 24,000 of them in a
//! million-event rebuild.
//!
//! `user_roles.rs` stays the definition, and this gives its table: an assignment replaces
//! the row of its (user, role) whole, a revocation deletes it, a role's deletion deletes
//! all of the role's rows; so a (user, role) ends as its last such event in the batch leaves
//! it, and the rows of a deleted role not touched after the deletion are gone. The per-event
//! code checks no row counts; it fails only on an event that does not decode (the payload,
//! an assignment's organization or actor) or a statement that fails, and the fold gives up
//! on the first and the savepoint on the second, so that the batch goes one event at a time
//! and the per-event code says what is wrong.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ledgerline_aggregates::role::RoleEvent;
use ledgerline_aggregates::user::UserEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode;
use crate::give_up::{self, GiveUp};
use crate::user_roles::{Assignment, INSERT, REPLACE};
use crate::{Projection, StoredEvent};

/// Applies a batch of 8 events or more folded; `Err` when it gave up, its writes undone.
pub(crate) async fn bulk(conn: &mut PgConnection, events: &[StoredEvent]) -> Result<(), GiveUp> {
    let folded = Fold::of(events)?;
    give_up::under_savepoint(conn, async |conn| folded.write(conn).await).await
}

#[derive(Default)]
struct Fold {
    deleted_roles: Vec<Uuid>,
    /// Per (user, role), the assignment standing at the batch's end (`None`: removed).
    keys: HashMap<(Uuid, Uuid), Option<Assignment>>,
}

impl Fold {
    fn of(events: &[StoredEvent]) -> Result<Self, GiveUp> {
        let mut fold = Fold::default();
        for event in events {
            // As `Projection::apply` passes them over.
            if !Projection::UserRoles.reads(&event.aggregate_type, &event.event_type) {
                continue;
            }
            match event.aggregate_type.as_str() {
                "User" => fold.user_event(event)?,
                "Role" => {
                    if let RoleEvent::RoleDeleted { .. } = give_up::payload::<RoleEvent>(event)? {
                        let role = decode::aggregate_id(event)?;
                        fold.deleted_roles.push(role);
                        for (_, standing) in fold.keys.iter_mut().filter(|(k, _)| k.1 == role) {
                            *standing = None;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(fold)
    }

    fn user_event(&mut self, event: &StoredEvent) -> Result<(), GiveUp> {
        let user = decode::aggregate_id(event)?;
        match give_up::payload::<UserEvent>(event)? {
            UserEvent::UserRoleAssigned {
                role_id,
                expires_at,
                reason,
            } => {
                let assignment = Assignment::of(event, expires_at, reason)?;
                self.keys.insert((user, role_id), Some(assignment));
            }
            UserEvent::UserRoleRevoked { role_id, .. } => {
                self.keys.insert((user, role_id), None);
            }
            UserEvent::UserInvited { .. }
            | UserEvent::UserProfileUpdated { .. }
            | UserEvent::UserDeactivated { .. }
            | UserEvent::UserReactivated { .. }
            | UserEvent::UserErased { .. } => {}
        }
        Ok(())
    }

    async fn write(self, conn: &mut PgConnection) -> Result<(), GiveUp> {
        if !self.deleted_roles.is_empty() {
            sqlx::query("DELETE FROM user_roles WHERE role_id = ANY($1)")
                .bind(&self.deleted_roles)
                .execute(&mut *conn)
                .await?;
        }
        let (mut gone_user, mut gone_role) = (Vec::new(), Vec::new());
        let mut standing = Standing::default();
        for ((user, role), assignment) in self.keys {
            match assignment {
                None => {
                    gone_user.push(user);
                    gone_role.push(role);
                }
                Some(a) => standing.push(user, role, a),
            }
        }
        if !gone_user.is_empty() {
            sqlx::query(
                "DELETE FROM user_roles u USING unnest($1::uuid[], $2::uuid[]) AS t(user_id, \
                 role_id) WHERE u.user_id = t.user_id AND u.role_id = t.role_id",
            )
            .bind(&gone_user)
            .bind(&gone_role)
            .execute(&mut *conn)
            .await?;
        }
        standing.write(conn).await
    }
}

/// The assignments standing at the batch's end, as columns; each (user, role) once.
#[derive(Default)]
struct Standing {
    user: Vec<Uuid>,
    role: Vec<Uuid>,
    organization: Vec<Uuid>,
    by_user: Vec<Option<Uuid>>,
    by_key: Vec<Option<Uuid>>,
    reason: Vec<Option<String>>,
    expires_at: Vec<Option<DateTime<Utc>>>,
    at: Vec<DateTime<Utc>>,
}

impl Standing {
    fn push(&mut self, user: Uuid, role: Uuid, a: Assignment) {
        self.user.push(user);
        self.role.push(role);
        self.organization.push(a.organization);
        self.by_user.push(a.by_user);
        self.by_key.push(a.by_key);
        self.reason.push(a.reason);
        self.expires_at.push(a.expires_at);
        self.at.push(a.at);
    }

    /// As `user_roles::apply` writes one: an assignment replaces the row whole.
    async fn write(self, conn: &mut PgConnection) -> Result<(), GiveUp> {
        if self.user.is_empty() {
            return Ok(());
        }
        sqlx::query(&format!(
            "{INSERT} SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], \
             $5::uuid[], $6::text[], $7::timestamptz[], $8::timestamptz[]) {REPLACE}"
        ))
        .bind(&self.user)
        .bind(&self.role)
        .bind(&self.organization)
        .bind(&self.by_user)
        .bind(&self.by_key)
        .bind(&self.reason)
        .bind(&self.expires_at)
        .bind(&self.at)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
