//! `/v1/organizations/{org}/roles` and role assignments under `.../users/{user}/roles`.

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use ledgerline_aggregates::organization::built_in_roles;
use ledgerline_aggregates::role::{Role, RoleCommand, MAX_INHERITANCE_DEPTH};
use ledgerline_aggregates::user::UserCommand;
use ledgerline_aggregates::{Permission, PermissionSet};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::answers::{List, PageOf};
use super::auth::{granted_by_role, granted_by_role_at, role_permissions, Caller};
use super::error::{naming_holder, ApiError, ApiResult};
use super::extract::{Json, Path, Query};
use super::owners::{keeping_an_owner, Loss};
use super::page::{self, Page, PageQuery};
use super::role_tree::{ancestry, in_turn, in_turn_if, levels_below};
use super::{
    absent_not_null, absent_or_null, double_option, not_null, organizations, users, OptionalJson,
};
use crate::app::{App, Guard};

#[derive(Debug, sqlx::FromRow)]
struct RoleRow {
    id: Uuid,
    organization_id: Uuid,
    name: String,
    description: String,
    parent_role_id: Option<Uuid>,
    is_built_in: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RoleView {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub name: String,
    pub description: String,
    pub parent_role_id: Option<Uuid>,
    pub built_in: bool,
    /// The role's own permissions.
    pub permissions: Vec<Permission>,
    /// Its own and every ancestor's: what holding the role grants.
    pub effective_permissions: Vec<Permission>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const SELECT: &str = "SELECT id, organization_id, name, description, parent_role_id, is_built_in, created_at, updated_at FROM roles";

async fn view(app: &App, r: RoleRow) -> ApiResult<RoleView> {
    let own: Vec<(String,)> =
        sqlx::query_as("SELECT permission FROM role_permissions WHERE role_id = $1")
            .bind(r.id)
            .fetch_all(&app.pool)
            .await?;
    let own: PermissionSet = own.into_iter().filter_map(|(p,)| p.parse().ok()).collect();
    let effective = role_permissions(&app.pool, r.id).await?;
    Ok(RoleView {
        id: r.id,
        organization_id: r.organization_id,
        name: r.name,
        description: r.description,
        parent_role_id: r.parent_role_id,
        built_in: r.is_built_in,
        permissions: own.into_iter().collect(),
        effective_permissions: effective.into_iter().collect(),
        created_at: r.created_at,
        updated_at: r.updated_at,
    })
}

async fn find_row(app: &App, org: Uuid, id: Uuid) -> ApiResult<RoleRow> {
    sqlx::query_as(&format!("{SELECT} WHERE id = $1 AND organization_id = $2"))
        .bind(id)
        .bind(org)
        .fetch_optional(&app.pool)
        .await?
        .ok_or_else(|| ApiError::not_found("role"))
}

pub async fn find(app: &App, org: Uuid, id: Uuid) -> ApiResult<RoleView> {
    let row = find_row(app, org, id).await?;
    view(app, row).await
}

/// A parent named in a request must be a role of the same organization.
async fn check_parent(app: &App, org: Uuid, parent: Uuid) -> ApiResult<()> {
    match find_row(app, org, parent).await {
        Ok(_) => Ok(()),
        Err(e) if e.status == StatusCode::NOT_FOUND => Err(ApiError::invalid(
            "parent_role_id is not a role of this organization",
        )),
        Err(e) => Err(e),
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRole {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default, deserialize_with = "super::permission_set")]
    permissions: PermissionSet,
    parent_role_id: Option<Uuid>,
}

/// What the caller may put into a role: its own permissions, less what a parent already
/// grants being irrelevant — the whole effective set of the role must be grantable.
pub(super) fn check_grantable(caller: &Caller, effective: &PermissionSet) -> ApiResult<()> {
    // Also the answer to taking away (deactivating, revoking a role...): a key takes away
    // only what it could give.
    caller.require_holds(effective, |missing| {
        format!(
            "this key does not hold {missing}: a key grants, and takes away, only permissions it \
             holds"
        )
    })
}

/// The guard under which a command decided on what `role` grants is appended, once
/// `caller` is found to be able to give everything it grants now (with its ancestors'; 403
/// otherwise, 503 while the read models do not show a change of it yet): a change of the
/// role in the meantime (its permissions widened, its parent moved, its deletion) refuses
/// the command as stale, so the log never shows a key giving a role past what the key
/// holds, or a deleted role given. A role no row shows (deleted since the caller's first
/// look) is a 404. A change of an ancestor is not guarded: see docs/design/known-limits.md.
async fn may_give(app: &App, caller: &Caller, role: Uuid) -> ApiResult<Guard> {
    may_give_or_gone(app, caller, role)
        .await?
        .ok_or_else(|| ApiError::not_found("role"))
}

/// [`may_give`] for taking a role away, which a deleted role (it grants nothing, and has
/// no row to be guarded by) still may be: `None` then.
async fn may_give_or_gone(app: &App, caller: &Caller, role: Uuid) -> ApiResult<Option<Guard>> {
    let (grants, version) = granted_by_role_at(&app.pool, role).await?;
    check_grantable(caller, &grants)?;
    Ok(version.map(|sequence| Guard {
        aggregate_type: Role::TYPE,
        aggregate_id: role,
        sequence,
    }))
}

pub async fn create(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    Json(body): Json<CreateRole>,
) -> ApiResult<axum::response::Response> {
    caller.require_in(org, Permission::RolesWrite)?;
    organizations::require_exists(&app, &caller, org).await?;
    let id = Uuid::new_v4();
    let under_a_parent = body.parent_role_id.is_some();
    let create = create_role(app.clone(), caller, org, id, body);
    in_turn_if(under_a_parent, &app, org, create).await?;
    super::created_answer(find(&app, org, id).await, id)
}

async fn create_role(
    app: App,
    caller: Caller,
    org: Uuid,
    id: Uuid,
    body: CreateRole,
) -> ApiResult<()> {
    let mut effective = body.permissions.clone();
    let mut parent_ancestry = Vec::new();
    if let Some(parent) = body.parent_role_id {
        check_parent(&app, org, parent).await?;
        parent_ancestry = ancestry(&app, parent).await?;
        effective.extend(granted_by_role(&app.pool, parent).await?);
    }
    check_grantable(&caller, &effective)?;
    let command = RoleCommand::Create {
        role_id: id,
        organization_id: org,
        name: body.name,
        description: body.description,
        permissions: body.permissions,
        parent_role_id: body.parent_role_id,
        parent_ancestry,
        built_in: false,
        grantable: caller.permissions.clone(),
    };
    app.execute_fresh::<Role>(id, Some(org), &caller.actor, None, command)
        .await
        .map_err(|e| naming_holder(&caller, Some(org), e))?;
    Ok(())
}

pub async fn list(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<PageOf<RoleView, String>>> {
    caller.require_in(org, Permission::RolesRead)?;
    let page = q.page::<(DateTime<Utc>, String)>("roles")?;
    organizations::require_exists(&app, &caller, org).await?;
    // Names are unique in an organization, so they break ties of creation time for good.
    let mut sql = page.of_organization(SELECT, org, "created_at, name");
    let mut rows: Vec<RoleRow> = sql.build_query_as().fetch_all(&app.pool).await?;
    let next_cursor = page.cut(&mut rows, |r| (r.created_at, r.name.clone()));
    let mut items = Vec::with_capacity(rows.len());
    for r in rows {
        items.push(view(&app, r).await?);
    }
    Ok(page::answer(items, next_cursor))
}

pub async fn get(
    State(app): State<App>,
    caller: Caller,
    Path((org, role)): Path<(Uuid, Uuid)>,
) -> ApiResult<axum::Json<RoleView>> {
    caller.require_in(org, Permission::RolesRead)?;
    Ok(axum::Json(find(&app, org, role).await?))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRole {
    #[serde(default, deserialize_with = "not_null")]
    #[schemars(transform = absent_not_null)]
    name: Option<String>,
    /// `""` once cleared, as when created without.
    #[serde(default, deserialize_with = "double_option")]
    #[schemars(transform = absent_or_null)]
    description: Option<Option<String>>,
    /// The role's own, replaced as a whole; none once cleared, as when created without.
    #[serde(default, deserialize_with = "super::permission_set_or_null")]
    #[schemars(transform = absent_or_null)]
    permissions: Option<Option<PermissionSet>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schemars(transform = absent_or_null)]
    parent_role_id: Option<Option<Uuid>>,
}

pub async fn update(
    State(app): State<App>,
    caller: Caller,
    Path((org, role)): Path<(Uuid, Uuid)>,
    Json(body): Json<UpdateRole>,
) -> ApiResult<axum::Json<RoleView>> {
    caller.require_in(org, Permission::RolesWrite)?;
    let re_parenting = body.parent_role_id.is_some();
    let update = update_role(app.clone(), caller, org, role, body);
    in_turn_if(re_parenting, &app, org, update).await?;
    Ok(axum::Json(find(&app, org, role).await?))
}

async fn update_role(
    app: App,
    caller: Caller,
    org: Uuid,
    role: Uuid,
    body: UpdateRole,
) -> ApiResult<()> {
    let current = find(&app, org, role).await?;
    // As with assigning: a user changing what a role of their own grants could copy a
    // time-limited role's permissions into one they hold for good.
    if let Some(me) = caller.user_id {
        if (body.permissions.is_some() || body.parent_role_id.is_some())
            && holds(&app, me, role).await?
        {
            return Err(ApiError::forbidden(
                "a user key cannot change the permissions or parent of a role its own user \
                 holds (or inherits from): another administrator does",
            ));
        }
    }
    let permissions = body.permissions.map(Option::unwrap_or_default);
    let parent = body.parent_role_id.unwrap_or(current.parent_role_id);
    let mut effective: PermissionSet = permissions
        .clone()
        .unwrap_or_else(|| current.permissions.iter().copied().collect());
    if let Some(p) = parent {
        check_parent(&app, org, p).await?;
        effective.extend(granted_by_role(&app.pool, p).await?);
    }
    check_grantable(&caller, &effective)?;
    // And what it grants now, which a change of parent or permissions may take away.
    let guard = match permissions.is_some() || body.parent_role_id.is_some() {
        true => Some(may_give(&app, &caller, role).await?),
        false => None,
    };
    // The tree as it stands in this turn, for the aggregate's cycle and depth rules.
    let (parent_ancestry, inheriting_levels) = match body.parent_role_id {
        Some(Some(p)) => (ancestry(&app, p).await?, levels_below(&app, role).await?),
        _ => (Vec::new(), 0),
    };
    // A new parent outside the owner role's line cuts this role's holders off from it. An
    // ancestry cut at the walk's end is refused as too deep before this matters.
    let owner = built_in_roles::role_id(org, built_in_roles::OWNER);
    let cut = body.parent_role_id.is_some()
        && parent_ancestry.len() <= MAX_INHERITANCE_DEPTH
        && !parent_ancestry.contains(&owner);
    let command = RoleCommand::Update {
        name: body.name,
        description: body.description.map(Option::unwrap_or_default),
        permissions,
        parent_role_id: body.parent_role_id,
        parent_ancestry,
        inheriting_levels,
        grantable: caller.permissions.clone(),
    };
    let update = {
        let caller = caller.clone();
        let execute =
            app.execute_owned(|f| &f.roles, role, Some(org), &caller.actor, guard, command);
        async move {
            execute
                .await
                .map_err(|e| naming_holder(&caller, Some(org), e))
        }
    };
    keeping_an_owner(&app, org, cut.then_some(Loss::Branch(role)), update).await
}

pub async fn delete(
    State(app): State<App>,
    caller: Caller,
    Path((org, role)): Path<(Uuid, Uuid)>,
    _: super::NoBody,
) -> ApiResult<StatusCode> {
    caller.require_in(org, Permission::RolesWrite)?;
    // In the turn: a role created under this one meanwhile would be left with no parent.
    in_turn(&app, org, delete_role(app.clone(), caller, org, role)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_role(app: App, caller: Caller, org: Uuid, role: Uuid) -> ApiResult<()> {
    find(&app, org, role).await?;
    // Deleting a role takes what it grants from everyone holding it: only for a key that
    // could give it.
    let guard = Some(may_give(&app, &caller, role).await?);
    // A child would silently lose what it inherits; make the operator re-parent it first.
    let (children,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM roles WHERE parent_role_id = $1")
            .bind(role)
            .fetch_one(&app.pool)
            .await?;
    if children > 0 {
        return Err(ApiError::conflict(format!(
            "{children} role(s) inherit from this role; change their parent first"
        )));
    }
    let delete = app.execute_owned(
        |f| &f.roles,
        role,
        Some(org),
        &caller.actor,
        guard,
        RoleCommand::Delete,
    );
    keeping_an_owner(&app, org, Some(Loss::Branch(role)), delete).await
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Assign {
    #[serde(default, deserialize_with = "super::extract::micros")]
    expires_at: Option<DateTime<Utc>>,
    reason: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema, sqlx::FromRow)]
pub struct AssignmentView {
    pub role_id: Uuid,
    pub role_name: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub assigned_at: DateTime<Utc>,
    /// False once `expires_at` has passed, or while the user is not active (deactivated or
    /// erased): such an assignment grants nothing.
    pub active: bool,
}

/// A user's assignments in order of role name: one page of them, or (`None`) all, as an
/// assignment answers.
async fn assignments(
    app: &App,
    user: Uuid,
    page: Option<&Page<(String, Uuid)>>,
) -> ApiResult<Vec<AssignmentView>> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(
        "SELECT ur.role_id, r.name AS role_name, ur.expires_at, ur.reason, ur.assigned_at,
                (ur.expires_at IS NULL OR ur.expires_at > now()) AND u.status = 'active' AS active
         FROM user_roles ur JOIN roles r ON r.id = ur.role_id JOIN users u ON u.id = ur.user_id
         WHERE ur.user_id = ",
    );
    sql.push_bind(user);
    // A user's roles are one organization's, whose names are unique: the id only makes
    // the order total for the keyset.
    const ORDER: &str = "r.name, ur.role_id";
    match page {
        Some(page) => page.push_ascending(&mut sql, ORDER),
        None => {
            sql.push(format_args!(" ORDER BY {ORDER}"));
        }
    }
    Ok(sql.build_query_as().fetch_all(&app.pool).await?)
}

/// Whether `user` holds `role`, assigned or as an ancestor of a role assigned to them. An
/// expired assignment counts: assigning it again is another administrator's act.
async fn holds(app: &App, user: Uuid, role: Uuid) -> ApiResult<bool> {
    Ok(sqlx::query_scalar(
        "WITH RECURSIVE held(id) AS ( \
             SELECT role_id FROM user_roles WHERE user_id = $1 \
             UNION \
             SELECT r.parent_role_id FROM roles r JOIN held h ON r.id = h.id \
             WHERE r.parent_role_id IS NOT NULL) \
         SELECT EXISTS (SELECT 1 FROM held WHERE id = $2)",
    )
    .bind(user)
    .bind(role)
    .fetch_one(&app.pool)
    .await?)
}

pub async fn assign(
    State(app): State<App>,
    caller: Caller,
    Path((org, user, role)): Path<(Uuid, Uuid, Uuid)>,
    body: OptionalJson<Assign>,
) -> ApiResult<axum::Json<List<AssignmentView>>> {
    caller.require_in(org, Permission::RolesWrite)?;
    // Assigning again replaces an assignment (its expiry too): a user assigning their own
    // roles could lift the expiry another administrator set.
    if caller.user_id == Some(user) {
        return Err(ApiError::forbidden(
            "a user key cannot assign roles to its own user: another administrator does",
        ));
    }
    users::find(&app, org, user).await?;
    find_row(&app, org, role).await?;
    // Assigning a role is granting what it grants: no more than the caller holds.
    let guard = Some(may_give(&app, &caller, role).await?);
    let body = body.0.unwrap_or_default();
    super::api_keys::require_not_outliving(&caller, body.expires_at, "a role it assigns")?;
    let now = Utc::now();
    // Given (again) with an expiry, an owner's assignment stops counting as keeping the
    // organization owned: it lapses by itself, with no command left to refuse. (An expiry
    // already past is the aggregate's to refuse, 422.)
    let loss = body
        .expires_at
        .is_some_and(|at| at > now)
        .then_some(Loss::Assignment { user, role });
    let command = UserCommand::AssignRole {
        role_id: role,
        expires_at: body.expires_at,
        reason: body.reason,
        now,
    };
    let assign = app.execute_owned(|f| &f.users, user, Some(org), &caller.actor, guard, command);
    keeping_an_owner(&app, org, loss, assign).await?;
    Ok(axum::Json(List::of(assignments(&app, user, None).await?)))
}

pub async fn revoke(
    State(app): State<App>,
    caller: Caller,
    Path((org, user, role)): Path<(Uuid, Uuid, Uuid)>,
    _: super::NoBody,
) -> ApiResult<StatusCode> {
    caller.require_in(org, Permission::RolesWrite)?;
    users::find(&app, org, user).await?;
    // Another organization's role, or none at all, is a 404 as for an assignment. Asked of
    // the ledger rather than the roles table, so that a role of this organization deleted
    // while assigned stays revocable: the user aggregate still holds that assignment (it
    // grants nothing, the role being gone), and revoking it tidies the user's record.
    if !super::created(&app.pool, Role::TYPE, role, org).await? {
        return Err(ApiError::not_found("role"));
    }
    // Taking a role away is the other half of granting it: an admin who may not give the
    // owner role may not take it from the owner either (a deleted role grants nothing).
    let guard = may_give_or_gone(&app, &caller, role).await?;
    let command = UserCommand::RevokeRole {
        role_id: role,
        reason: None,
    };
    let revoke = app.execute_owned(|f| &f.users, user, Some(org), &caller.actor, guard, command);
    keeping_an_owner(&app, org, Some(Loss::Assignment { user, role }), revoke).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_assignments(
    State(app): State<App>,
    caller: Caller,
    Path((org, user)): Path<(Uuid, Uuid)>,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<PageOf<AssignmentView, String>>> {
    caller.require_in(org, Permission::RolesRead)?;
    let page = q.page::<(String, Uuid)>("user-roles")?;
    users::find(&app, org, user).await?;
    let mut items = assignments(&app, user, Some(&page)).await?;
    let next_cursor = page.cut(&mut items, |a| (a.role_name.clone(), a.role_id));
    Ok(page::answer(items, next_cursor))
}
