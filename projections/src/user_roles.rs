//! The `user_roles` read model: which roles each user holds, who assigned them and until
//! when. A deleted role grants nothing, so its assignments go with it.

use chrono::{DateTime, Utc};
use ledgerline_aggregates::metadata;
use ledgerline_aggregates::role::RoleEvent;
use ledgerline_aggregates::user::UserEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode::{self, Metadata};
use crate::{ProjectionError, StoredEvent};

pub const NAME: &str = "user_roles";
pub const TABLES: &[&str] = &["user_roles"];

pub async fn apply(conn: &mut PgConnection, event: &StoredEvent) -> Result<(), ProjectionError> {
    match event.aggregate_type.as_str() {
        "User" => apply_user_event(conn, event).await,
        "Role" => match decode::payload::<RoleEvent>(event)? {
            RoleEvent::RoleDeleted { .. } => {
                sqlx::query("DELETE FROM user_roles WHERE role_id = $1")
                    .bind(decode::aggregate_id(event)?)
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            }
            RoleEvent::RoleCreated { .. } | RoleEvent::RoleUpdated { .. } => Ok(()),
        },
        _ => Ok(()),
    }
}

async fn apply_user_event(
    conn: &mut PgConnection,
    event: &StoredEvent,
) -> Result<(), ProjectionError> {
    let user_id = decode::aggregate_id(event)?;
    match decode::payload::<UserEvent>(event)? {
        UserEvent::UserRoleAssigned {
            role_id,
            expires_at,
            reason,
        } => {
            let a = Assignment::of(event, expires_at, reason)?;
            sqlx::query(&format!(
                "{INSERT} VALUES ($1, $2, $3, $4, $5, $6, $7, $8) {REPLACE}"
            ))
            .bind(user_id)
            .bind(role_id)
            .bind(a.organization)
            .bind(a.by_user)
            .bind(a.by_key)
            .bind(a.reason)
            .bind(a.expires_at)
            .bind(a.at)
            .execute(&mut *conn)
            .await?;
        }
        UserEvent::UserRoleRevoked { role_id, .. } => {
            sqlx::query("DELETE FROM user_roles WHERE user_id = $1 AND role_id = $2")
                .bind(user_id)
                .bind(role_id)
                .execute(&mut *conn)
                .await?;
        }
        UserEvent::UserInvited { .. }
        | UserEvent::UserProfileUpdated { .. }
        | UserEvent::UserDeactivated { .. }
        | UserEvent::UserReactivated { .. }
        | UserEvent::UserErased { .. } => {}
    }
    Ok(())
}

/// What an assignment writes besides its (user, role), as both paths read it.
pub(crate) struct Assignment {
    pub(crate) organization: Uuid,
    pub(crate) by_user: Option<Uuid>,
    pub(crate) by_key: Option<Uuid>,
    pub(crate) reason: Option<String>,
    pub(crate) expires_at: Option<DateTime<Utc>>,
    pub(crate) at: DateTime<Utc>,
}

impl Assignment {
    pub(crate) fn of(
        event: &StoredEvent,
        expires_at: Option<DateTime<Utc>>,
        reason: Option<String>,
    ) -> Result<Self, ProjectionError> {
        // The event does not repeat its tenant: the ledger records it beside the event.
        let Some(organization) = event.organization_id else {
            return Err(ProjectionError::decode(
                event.position,
                "UserRoleAssigned without an organization",
            ));
        };
        let meta = Metadata::of(event)?;
        Ok(Assignment {
            organization,
            by_user: meta.uuid(metadata::ACTOR_USER_ID)?,
            by_key: meta.uuid(metadata::ACTOR_KEY_ID)?,
            reason,
            expires_at,
            at: event.recorded_at,
        })
    }
}

/// An assignment's row, followed by its values.
pub(crate) const INSERT: &str = "INSERT INTO user_roles (user_id, role_id, organization_id, \
     assigned_by_user_id, assigned_by_key_id, reason, expires_at, assigned_at)";
/// Assigning again (a new expiry, a new reason) replaces the assignment.
pub(crate) const REPLACE: &str = "ON CONFLICT (user_id, role_id) DO UPDATE SET \
     organization_id = EXCLUDED.organization_id, \
     assigned_by_user_id = EXCLUDED.assigned_by_user_id, \
     assigned_by_key_id = EXCLUDED.assigned_by_key_id, \
     reason = EXCLUDED.reason, expires_at = EXCLUDED.expires_at, \
     assigned_at = EXCLUDED.assigned_at";
