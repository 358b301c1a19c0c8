//! `/v1/organizations`: create (platform operator), read, update, suspend, reactivate.

use std::collections::HashSet;

use axum::extract::State;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use ledgerline_aggregates::organization::{built_in_roles, Organization, OrganizationCommand};
use ledgerline_aggregates::role::{Role, RoleCommand};
use ledgerline_aggregates::{Permission, PermissionSet};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::answers::PageOf;
use super::auth::Caller;
use super::error::{naming_holder, ApiError, ApiResult};
use super::extract::{Json, Path, Query};
use super::page::{self, PageQuery};
use super::{absent_not_null, absent_or_null, double_option, not_null};
use crate::app::{Actor, App, CommandError};

#[derive(Debug, Serialize, JsonSchema, sqlx::FromRow)]
pub struct OrganizationView {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    pub country_code: Option<String>,
    pub domain: Option<String>,
    pub settings: serde_json::Value,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const SELECT: &str = "SELECT id, name, slug, country_code, domain, settings, status, created_at, updated_at FROM organizations";

pub async fn find(app: &App, id: Uuid) -> ApiResult<OrganizationView> {
    sqlx::query_as(&format!("{SELECT} WHERE id = $1"))
        .bind(id)
        .fetch_optional(&app.pool)
        .await?
        .ok_or_else(|| ApiError::not_found("organization"))
}

/// A 404 unless organization `id` exists. A tenant key's own organization needs no read:
/// authentication found it active, or refused the key.
pub async fn require_exists(app: &App, caller: &Caller, id: Uuid) -> ApiResult<()> {
    if caller.organization_id == Some(id) {
        return Ok(());
    }
    find(app, id).await.map(drop)
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrganization {
    name: String,
    slug: String,
    country_code: Option<String>,
    domain: Option<String>,
    #[serde(default)]
    settings: serde_json::Map<String, serde_json::Value>,
}

pub async fn create(
    State(app): State<App>,
    caller: Caller,
    Json(body): Json<CreateOrganization>,
) -> ApiResult<axum::response::Response> {
    caller.require(Permission::PlatformAdmin)?;
    let id = Uuid::new_v4();
    let command = OrganizationCommand::Create {
        organization_id: id,
        name: body.name,
        slug: body.slug,
        country_code: body.country_code,
        domain: body.domain,
        settings: body.settings,
    };
    // Five commands: a client hanging up or the request's time limit must not leave the
    // organization without some of its roles (a crash can; see `complete_interrupted`), nor
    // may an error after its creation (a database restart, a lock held too long): the roles
    // are then made in the background, as soon as they can be.
    let work = app.clone();
    super::to_the_end(async move {
        let created = work
            .execute_fresh::<Organization>(id, Some(id), &caller.actor, None, command)
            .await;
        if let Err(e) = created {
            if matches!(e, CommandError::Unknown) {
                // Made only once the log shows the organization, which the key made.
                complete_later(work.clone(), id, caller.actor.for_what_follows());
            }
            return Err(naming_holder(&caller, None, e));
        }
        // The roles follow from the creation, made by a key that was good then.
        let actor = caller.actor.for_what_follows();
        let made = create_built_in_roles(&work, id, &actor).await;
        if made.is_err() {
            complete_later(work.clone(), id, actor);
        }
        made
    })
    .await?;
    super::created_answer(find(&app, id).await, id)
}

/// Tries, in the background, to make the built-in roles of `org` that a creation failed to
/// make, once the log shows the organization (a creation whose outcome was not known may not
/// be in it), at growing intervals for about ten minutes; `serve`'s start-up completion
/// (`complete_interrupted`) does what is left after that.
fn complete_later(app: App, org: Uuid, actor: Actor) {
    let work = async move {
        let mut seen = false;
        for wait in [1, 2, 4, 8, 15, 30, 60, 120, 180, 180] {
            tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
            match super::created(&app.pool, Organization::TYPE, org, org).await {
                Ok(true) => seen = true,
                Ok(false) | Err(_) => continue,
            }
            match create_built_in_roles(&app, org, &actor).await {
                Ok(()) => {
                    tracing::info!(organization = %org, "made the built-in roles its creation failed to make");
                    return;
                }
                Err(e) => {
                    tracing::warn!(organization = %org, error = e.message, "could not make the built-in roles yet");
                }
            }
        }
        if seen {
            tracing::error!(organization = %org, "gave up making the built-in roles; the next `serve` start makes them");
        }
    };
    // In the request's span, so that what it logs names the request.
    tokio::spawn(tracing::Instrument::in_current_span(work));
}

/// Every organization starts with the built-in roles, each a real role made by events.
/// Their ids are derived from the organization's, and a role already in the log is left
/// as it is, so a creation cut off between the organization and its roles is completed by
/// running this again. A role that cannot be made does not keep the others from being made;
/// the first such error is returned.
pub async fn create_built_in_roles(app: &App, org: Uuid, actor: &Actor) -> ApiResult<()> {
    let everything: PermissionSet = Permission::ALL.into_iter().collect();
    let mut first_error = None;
    for name in built_in_roles::NAMES {
        let role_id = built_in_roles::role_id(org, name);
        if super::created(&app.pool, Role::TYPE, role_id, org).await? {
            continue;
        }
        let command = RoleCommand::Create {
            role_id,
            organization_id: org,
            name: name.to_string(),
            description: built_in_roles::description(name).to_string(),
            permissions: built_in_roles::permissions(name).expect("built-in role"),
            parent_role_id: None,
            parent_ancestry: Vec::new(),
            built_in: true,
            grantable: everything.clone(),
        };
        let made = app
            .execute(&app.cqrs.roles, role_id, Some(org), actor, command)
            .await;
        // Another process completing the same organization may have made it meanwhile.
        if let Err(e) = made {
            if !super::created(&app.pool, Role::TYPE, role_id, org).await? {
                first_error.get_or_insert(ApiError::from(e));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Completes the organizations whose creation was cut off before all their built-in roles
/// were made (the process died between those commands), read from the log, not the read
/// models, which may lag at start-up. `serve` runs it in the background as it starts (a
/// creation still under way in another process is harmless: a role made meanwhile counts
/// as made); returns how many it completed.
pub async fn complete_interrupted(app: &App) -> ApiResult<usize> {
    let orgs: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE aggregate_type = $1 AND sequence = 1",
    )
    .bind(Organization::TYPE)
    .fetch_all(&app.pool)
    .await?;
    let orgs: Vec<Uuid> = orgs.iter().filter_map(|id| id.parse().ok()).collect();
    let wanted: Vec<String> = orgs
        .iter()
        .flat_map(|org| {
            built_in_roles::NAMES
                .into_iter()
                .map(|name| built_in_roles::role_id(*org, name).to_string())
        })
        .collect();
    let made: HashSet<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE aggregate_type = $1 AND sequence = 1 \
         AND aggregate_id = ANY($2)",
    )
    .bind(Role::TYPE)
    .bind(&wanted)
    .fetch_all(&app.pool)
    .await?
    .into_iter()
    .collect();
    let mut completed = 0;
    for (org, roles) in orgs.iter().zip(wanted.chunks(built_in_roles::NAMES.len())) {
        if roles.iter().all(|r| made.contains(r)) {
            continue;
        }
        // One organization that cannot be completed now does not hold back the others.
        match create_built_in_roles(app, *org, &Actor::cli("complete-organization")).await {
            Ok(()) => {
                tracing::info!(organization = %org, "made the built-in roles an interrupted creation left out");
                completed += 1;
            }
            Err(e) => {
                tracing::warn!(organization = %org, error = e.message, "could not complete an interrupted organization creation");
            }
        }
    }
    Ok(completed)
}

/// The platform operator's list is every organization; anyone else's, their own.
pub async fn list(
    State(app): State<App>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<PageOf<OrganizationView, String>>> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(format!("{SELECT} WHERE true"));
    if !caller.is_platform_admin() {
        caller.require(Permission::OrganizationsRead)?;
        sql.push(" AND id = ").push_bind(caller.organization_id);
    }
    let page = q.page::<(DateTime<Utc>, Uuid)>("organizations")?;
    page.push_ascending(&mut sql, "created_at, id");
    let mut items: Vec<OrganizationView> = sql.build_query_as().fetch_all(&app.pool).await?;
    let next_cursor = page.cut(&mut items, |o| (o.created_at, o.id));
    Ok(page::answer(items, next_cursor))
}

pub async fn get(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
) -> ApiResult<axum::Json<OrganizationView>> {
    caller.require_in(org, Permission::OrganizationsRead)?;
    Ok(axum::Json(find(&app, org).await?))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateOrganization {
    #[serde(default, deserialize_with = "not_null")]
    #[schemars(transform = absent_not_null)]
    name: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    #[schemars(transform = absent_not_null)]
    slug: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schemars(transform = absent_or_null)]
    country_code: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schemars(transform = absent_or_null)]
    domain: Option<Option<String>>,
    /// Replaces the settings as a whole; `{}` once cleared, as when created without.
    #[serde(default, deserialize_with = "double_option")]
    #[schemars(transform = absent_or_null)]
    settings: Option<Option<serde_json::Map<String, serde_json::Value>>>,
}

pub async fn update(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    Json(body): Json<UpdateOrganization>,
) -> ApiResult<axum::Json<OrganizationView>> {
    caller.require_in(org, Permission::OrganizationsWrite)?;
    find(&app, org).await?;
    let command = OrganizationCommand::Update {
        name: body.name,
        slug: body.slug,
        country_code: body.country_code,
        domain: body.domain,
        settings: body.settings.map(Option::unwrap_or_default),
    };
    app.execute(
        &app.cqrs.organizations,
        org,
        Some(org),
        &caller.actor,
        command,
    )
    .await
    .map_err(|e| naming_holder(&caller, Some(org), e))?;
    Ok(axum::Json(find(&app, org).await?))
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    pub reason: Option<String>,
}

/// Suspension is the platform operator's act: it stops every key of the organization.
pub async fn suspend(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    body: super::OptionalJson<Reason>,
) -> ApiResult<axum::Json<OrganizationView>> {
    let reason = body.0.unwrap_or_default().reason;
    operator_act(&app, &caller, org, OrganizationCommand::Suspend { reason }).await
}

pub async fn reactivate(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    _: super::NoBody,
) -> ApiResult<axum::Json<OrganizationView>> {
    operator_act(&app, &caller, org, OrganizationCommand::Reactivate).await
}

async fn operator_act(
    app: &App,
    caller: &Caller,
    org: Uuid,
    command: OrganizationCommand,
) -> ApiResult<axum::Json<OrganizationView>> {
    caller.require_in(org, Permission::PlatformAdmin)?;
    find(app, org).await?;
    app.execute(
        &app.cqrs.organizations,
        org,
        Some(org),
        &caller.actor,
        command,
    )
    .await?;
    Ok(axum::Json(find(app, org).await?))
}
