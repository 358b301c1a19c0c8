//! The `organizations` read model: each organization's profile and status.

use ledgerline_aggregates::organization::{OrganizationEvent, OrganizationProfile};
use sqlx::types::Json;
use sqlx::PgConnection;

use crate::decode::{self, one_row};
use crate::{ProjectionError, StoredEvent};

pub const NAME: &str = "organizations";
pub const TABLES: &[&str] = &["organizations"];

pub async fn apply(conn: &mut PgConnection, event: &StoredEvent) -> Result<(), ProjectionError> {
    if event.aggregate_type != "Organization" {
        return Ok(());
    }
    let id = decode::aggregate_id(event)?;
    let at = event.recorded_at;
    let result = match decode::payload::<OrganizationEvent>(event)? {
        OrganizationEvent::OrganizationCreated {
            organization_id,
            profile,
        } => {
            if organization_id != id {
                return Err(ProjectionError::inconsistent(
                    event.position,
                    format!("OrganizationCreated names {organization_id} in aggregate {id}"),
                ));
            }
            sqlx::query(
                "INSERT INTO organizations (id, name, slug, country_code, domain, settings, \
                 status, created_at, updated_at, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $7, $8)",
            )
            .bind(id)
            .bind(&profile.name)
            .bind(&profile.slug)
            .bind(&profile.country_code)
            .bind(&profile.domain)
            .bind(Json(&profile.settings))
            .bind(at)
            .bind(event.sequence)
            .execute(&mut *conn)
            .await?
        }
        OrganizationEvent::OrganizationUpdated { after, .. } => {
            update_profile(conn, event, &after).await?
        }
        OrganizationEvent::OrganizationSuspended { reason } => {
            sqlx::query(
                "UPDATE organizations SET status = 'suspended', suspended_at = $2, \
                 suspension_reason = $3, updated_at = $2, version = $4 WHERE id = $1",
            )
            .bind(id)
            .bind(at)
            .bind(reason)
            .bind(event.sequence)
            .execute(&mut *conn)
            .await?
        }
        OrganizationEvent::OrganizationReactivated {} => {
            sqlx::query(
                "UPDATE organizations SET status = 'active', suspended_at = NULL, \
                 suspension_reason = NULL, updated_at = $2, version = $3 WHERE id = $1",
            )
            .bind(id)
            .bind(at)
            .bind(event.sequence)
            .execute(&mut *conn)
            .await?
        }
    };
    one_row(event, result, "organizations")
}

/// The event carries the whole profile after the change, so every field is simply set.
async fn update_profile(
    conn: &mut PgConnection,
    event: &StoredEvent,
    after: &OrganizationProfile,
) -> Result<sqlx::postgres::PgQueryResult, ProjectionError> {
    Ok(sqlx::query(
        "UPDATE organizations SET name = $2, slug = $3, country_code = $4, domain = $5, \
         settings = $6, updated_at = $7, version = $8 WHERE id = $1",
    )
    .bind(decode::aggregate_id(event)?)
    .bind(&after.name)
    .bind(&after.slug)
    .bind(&after.country_code)
    .bind(&after.domain)
    .bind(Json(&after.settings))
    .bind(event.recorded_at)
    .bind(event.sequence)
    .execute(conn)
    .await?)
}
