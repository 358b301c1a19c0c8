//! The `user_roles` read model: which roles each user holds, who assigned them and until
//! when. A deleted role grants nothing, so its assignments go with it.

use ledgerline_aggregates::metadata;
use ledgerline_aggregates::role::RoleEvent;
use ledgerline_aggregates::user::UserEvent;
use sqlx::PgConnection;

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
            // The event does not repeat its tenant: the ledger records it beside the event.
            let Some(organization_id) = event.organization_id else {
                return Err(ProjectionError::decode(
                    event.position,
                    "UserRoleAssigned without an organization",
                ));
            };
            let meta = Metadata::of(event)?;
            // Assigning again (a new expiry, a new reason) replaces the assignment.
            sqlx::query(
                "INSERT INTO user_roles (user_id, role_id, organization_id, \
                 assigned_by_user_id, assigned_by_key_id, reason, expires_at, assigned_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (user_id, role_id) DO UPDATE SET \
                 organization_id = EXCLUDED.organization_id, \
                 assigned_by_user_id = EXCLUDED.assigned_by_user_id, \
                 assigned_by_key_id = EXCLUDED.assigned_by_key_id, \
                 reason = EXCLUDED.reason, expires_at = EXCLUDED.expires_at, \
                 assigned_at = EXCLUDED.assigned_at",
            )
            .bind(user_id)
            .bind(role_id)
            .bind(organization_id)
            .bind(meta.uuid(metadata::ACTOR_USER_ID)?)
            .bind(meta.uuid(metadata::ACTOR_KEY_ID)?)
            .bind(reason)
            .bind(expires_at)
            .bind(event.recorded_at)
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
