//! The `roles` and `role_permissions` read models: each role and its own permissions.
//! Inherited permissions are resolved by readers through `parent_role_id`, so a change to a
//! parent takes effect for its children without touching their rows.

use ledgerline_aggregates::role::{RoleEvent, RoleSpec};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode::{self, one_row};
use crate::{ProjectionError, StoredEvent};

pub const NAME: &str = "roles";
pub const TABLES: &[&str] = &["roles", "role_permissions"];

pub async fn apply(conn: &mut PgConnection, event: &StoredEvent) -> Result<(), ProjectionError> {
    if event.aggregate_type != "Role" {
        return Ok(());
    }
    let id = decode::aggregate_id(event)?;
    let at = event.recorded_at;
    match decode::payload::<RoleEvent>(event)? {
        RoleEvent::RoleCreated {
            role_id,
            organization_id,
            spec,
            built_in,
        } => {
            if role_id != id {
                return Err(ProjectionError::inconsistent(
                    event.position,
                    format!("RoleCreated names {role_id} in aggregate {id}"),
                ));
            }
            sqlx::query(
                "INSERT INTO roles (id, organization_id, name, description, parent_role_id, \
                 is_built_in, created_at, updated_at, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8)",
            )
            .bind(id)
            .bind(organization_id)
            .bind(&spec.name)
            .bind(&spec.description)
            .bind(spec.parent_role_id)
            .bind(built_in)
            .bind(at)
            .bind(event.sequence)
            .execute(&mut *conn)
            .await?;
            set_permissions(conn, id, &spec).await
        }
        RoleEvent::RoleUpdated { after, .. } => {
            let result = sqlx::query(
                "UPDATE roles SET name = $2, description = $3, parent_role_id = $4, \
                 updated_at = $5, version = $6 WHERE id = $1",
            )
            .bind(id)
            .bind(&after.name)
            .bind(&after.description)
            .bind(after.parent_role_id)
            .bind(at)
            .bind(event.sequence)
            .execute(&mut *conn)
            .await?;
            one_row(event, result, "roles")?;
            set_permissions(conn, id, &after).await
        }
        RoleEvent::RoleDeleted { .. } => {
            sqlx::query("DELETE FROM role_permissions WHERE role_id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            let result = sqlx::query("DELETE FROM roles WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            one_row(event, result, "roles")
        }
    }
}

/// Replaces the role's own permissions with the spec's: the events carry the whole set.
async fn set_permissions(
    conn: &mut PgConnection,
    role_id: Uuid,
    spec: &RoleSpec,
) -> Result<(), ProjectionError> {
    sqlx::query("DELETE FROM role_permissions WHERE role_id = $1")
        .bind(role_id)
        .execute(&mut *conn)
        .await?;
    let names: Vec<&str> = spec.permissions.iter().map(|p| p.as_str()).collect();
    sqlx::query(
        "INSERT INTO role_permissions (role_id, permission, organization_id) \
         SELECT $1, unnest($2::text[]), organization_id FROM roles WHERE id = $1 \
         ON CONFLICT DO NOTHING",
    )
    .bind(role_id)
    .bind(names)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
