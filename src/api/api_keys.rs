//! `/v1/organizations/{org}/api-keys`: issue (the secret is answered once), read, revoke,
//! rotate. Only the secret's hash and visible prefix are ever stored.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use chrono::{DateTime, SubsecRound, Utc};
use ledgerline_aggregates::api_key::{ApiKey, ApiKeyCommand, MAX_ROTATION_GRACE};
use ledgerline_aggregates::{Permission, PermissionSet};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::answers::PageOf;
use super::auth::{self, Caller};
use super::error::{ApiError, ApiResult};
use super::extract::{Json, Path, Query};
use super::idempotency::SecretShownOnce;
use super::organizations::{self, Reason};
use super::page::{self, PageQuery};
use super::{users, OptionalJson};
use crate::app::App;
use crate::keys;

#[derive(Debug, Serialize, JsonSchema, sqlx::FromRow)]
pub struct ApiKeyView {
    pub id: Uuid,
    pub organization_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub label: String,
    pub prefix: String,
    /// The permissions the key was issued with (what a request may do is also cut down to
    /// its user's roles).
    pub permissions: Vec<String>,
    pub status: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub rotated_at: Option<DateTime<Utc>>,
    /// Whether a request with this key would be let in now, as far as the read models show:
    /// `status` is the key's own, and a key can be `active` yet refused for its user or
    /// organization.
    pub usable: bool,
    /// Why not, when not: `revoked`, `expired`, `user deactivated`, `user erased`,
    /// `organization suspended`.
    pub unusable_because: Option<String>,
}

/// A key just issued or rotated: the only answer that ever carries its secret (marked
/// [`SecretShownOnce`], so that an `Idempotency-Key` replay does not keep it).
#[derive(Debug, Serialize, JsonSchema)]
pub struct IssuedKey {
    #[serde(flatten)]
    pub key: ApiKeyView,
    /// Shown once; ledgerline keeps only its hash.
    pub secret: String,
    /// After a rotation given a grace period: until when the replaced secret keeps working.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_secret_valid_until: Option<DateTime<Utc>>,
}

/// A rotation's options.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// Keep the replaced secret working for this many seconds more (1 to 86400), so that
    /// its users can move over, and a client whose answer was lost can rotate again with it;
    /// a later rotation or a revocation ends it. Absent: it stops at once.
    #[serde(default, deserialize_with = "super::not_null")]
    #[schemars(transform = super::absent_not_null, extend("minimum" = 1, "maximum" = 86400))]
    pub previous_secret_valid_for_seconds: Option<u32>,
}

// A subquery, so that the lists' keyset conditions and order read its columns unqualified.
const SELECT: &str = "SELECT *, unusable_because IS NULL AS usable FROM ( \
     SELECT k.id, k.organization_id, k.user_id, k.label, k.prefix, k.permissions, k.status, \
            k.expires_at, k.created_at, k.revoked_at, k.rotated_at, \
            CASE WHEN k.status <> 'active' THEN k.status \
                 WHEN k.expires_at <= now() THEN 'expired' \
                 WHEN o.status = 'suspended' THEN 'organization suspended' \
                 WHEN u.status <> 'active' THEN 'user ' || u.status END AS unusable_because \
     FROM api_keys k \
     LEFT JOIN users u ON u.id = k.user_id \
     LEFT JOIN organizations o ON o.id = k.organization_id) api_keys";

async fn find(app: &App, org: Uuid, id: Uuid) -> ApiResult<ApiKeyView> {
    sqlx::query_as(&format!("{SELECT} WHERE id = $1 AND organization_id = $2"))
        .bind(id)
        .bind(org)
        .fetch_optional(&app.pool)
        .await?
        .ok_or_else(|| ApiError::not_found("API key"))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueKey {
    label: String,
    #[serde(deserialize_with = "super::permission_set")]
    permissions: PermissionSet,
    /// The user the key acts as; omitted for a service key.
    user_id: Option<Uuid>,
    /// Kept to the microsecond: finer digits are dropped.
    #[serde(default, deserialize_with = "super::extract::micros")]
    expires_at: Option<DateTime<Utc>>,
}

pub async fn issue(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    Json(body): Json<IssueKey>,
) -> ApiResult<(
    StatusCode,
    Extension<SecretShownOnce>,
    axum::Json<IssuedKey>,
)> {
    caller.require_in(org, Permission::KeysWrite)?;
    organizations::require_exists(&app, &caller, org).await?;
    require_own_user(&caller, body.user_id, "issue")?;
    require_not_outliving(&caller, body.expires_at, "a key it may issue")?;
    if let Some(user) = body.user_id {
        let u = users::find(&app, org, user).await.map_err(|e| {
            if e.status == StatusCode::NOT_FOUND {
                ApiError::invalid("user_id is not a user of this organization")
            } else {
                e
            }
        })?;
        if u.status != "active" {
            return Err(ApiError::conflict(
                "keys can be issued only for active users",
            ));
        }
        require_standing(&app, &caller, user, "issue").await?;
    }
    let id = Uuid::new_v4();
    let secret = keys::generate();
    // Microseconds, as the log keeps times.
    let now = Utc::now().trunc_subsecs(6);
    // The key as issued: the answer when the read models do not show it yet, since its
    // secret is shown only in this answer and only its hash is kept.
    let issued = ApiKeyView {
        id,
        organization_id: Some(org),
        user_id: body.user_id,
        label: body.label.trim().to_string(),
        prefix: secret.prefix.clone(),
        permissions: body.permissions.iter().map(|p| p.to_string()).collect(),
        status: "active".into(),
        expires_at: body.expires_at,
        created_at: now,
        revoked_at: None,
        rotated_at: None,
        // Issuing checked the user is active.
        usable: true,
        unusable_because: None,
    };
    let command = ApiKeyCommand::Issue {
        key_id: id,
        organization_id: Some(org),
        user_id: body.user_id,
        label: body.label,
        permissions: body.permissions,
        expires_at: body.expires_at,
        prefix: secret.prefix.clone(),
        secret_hash: secret.hash.clone(),
        bootstrap: false,
        grantable: caller.permissions.clone(),
        now,
    };
    app.execute_fresh::<ApiKey>(id, Some(org), &caller.actor, None, command)
        .await?;
    let key = match find(&app, org, id).await {
        Err(e) if e.status == StatusCode::NOT_FOUND => issued,
        found => found?,
    };
    Ok((
        StatusCode::CREATED,
        Extension(SecretShownOnce {
            organization_id: org,
            key_id: id,
            rotated: false,
        }),
        axum::Json(IssuedKey {
            key,
            secret: secret.secret,
            previous_secret_valid_until: None,
        }),
    ))
}

/// A user key acts for its user, so every key it issues or rotates is that user's own. Another
/// user's key would act, and be audited, as that user (and assign this user's roles, which a
/// user key may not), and a service key would outlive this user's roles and deactivation and
/// see every conversation: both are made with a service key.
fn require_own_user(caller: &Caller, key_user: Option<Uuid>, verb: &str) -> ApiResult<()> {
    match caller.user_id {
        Some(me) if key_user != Some(me) => Err(ApiError::forbidden(format!(
            "a user key may {verb} only keys of its own user (user_id {me}): another user's \
             key would act as them, and a service key would outlive this user's roles; \
             use a service key"
        ))),
        _ => Ok(()),
    }
}

/// A key that expires issues or rotates no key, and assigns no role, that outlives it: else
/// an expiry an administrator set would be escaped with a fresh secret of a key that has
/// none, or through a user key its holder also has.
pub(super) fn require_not_outliving(
    caller: &Caller,
    expires_at: Option<DateTime<Utc>>,
    what: &str,
) -> ApiResult<()> {
    let whose = match caller.secret_valid_until {
        Some(_) => "this secret (rotated away, in its grace period) stops working",
        None => "this key expires",
    };
    match caller.expires_at {
        Some(limit) if expires_at.is_none_or(|t| t > limit) => Err(ApiError::forbidden(format!(
            "{whose} at {}: {what} must expire by then",
            limit.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ))),
        _ => Ok(()),
    }
}

/// A key for `user` acts as them: the log records its commands as theirs, and it revokes
/// their other keys as their own. So a key of another user or a service key makes one only if
/// it holds everything `user`'s roles grant (inheritance included), as it would to deactivate
/// them: an `admin` provisions a member's keys, not the owner's, and cannot act as the owner
/// through one. What the new key lists is bounded by the caller's hold as well (the aggregate
/// checks it), but that alone would let an admin mint an owner's key listing `keys:write`.
async fn require_standing(app: &App, caller: &Caller, user: Uuid, verb: &str) -> ApiResult<()> {
    // The platform operator's key holds everything: no need to read (or wait for) the roles.
    if caller.user_id == Some(user) || caller.is_platform_admin() {
        return Ok(());
    }
    let held = auth::user_permissions(&app.pool, user).await?;
    caller.require_holds(&held, |missing| {
        format!(
            "cannot {verb} a key for user {user}: their roles grant permissions this key does \
             not hold: {missing} (a key acting as a user is made only by that user or by a key \
             holding all their roles grant)"
        )
    })
}

/// 403 unless the caller holds every permission `key` lists (what holding its secret gives,
/// at most): revoking takes that away, and rotating hands it over.
fn require_holds_all(caller: &Caller, key: &ApiKeyView, verb: &str) -> ApiResult<()> {
    let listed: PermissionSet = key
        .permissions
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    caller.require_holds(&listed, |missing| {
        format!("cannot {verb} a key that holds permissions this key does not: {missing}")
    })
}

pub async fn list(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<PageOf<ApiKeyView, String>>> {
    caller.require_in(org, Permission::KeysRead)?;
    let page = q.page::<(DateTime<Utc>, Uuid)>("api-keys")?;
    organizations::require_exists(&app, &caller, org).await?;
    let mut sql = page.of_organization(SELECT, org, "created_at, id");
    let mut items: Vec<ApiKeyView> = sql.build_query_as().fetch_all(&app.pool).await?;
    let next_cursor = page.cut(&mut items, |k| (k.created_at, k.id));
    Ok(page::answer(items, next_cursor))
}

pub async fn get(
    State(app): State<App>,
    caller: Caller,
    Path((org, key)): Path<(Uuid, Uuid)>,
) -> ApiResult<axum::Json<ApiKeyView>> {
    caller.require_in(org, Permission::KeysRead)?;
    Ok(axum::Json(find(&app, org, key).await?))
}

pub async fn revoke(
    State(app): State<App>,
    caller: Caller,
    Path((org, key)): Path<(Uuid, Uuid)>,
    body: OptionalJson<Reason>,
) -> ApiResult<axum::Json<ApiKeyView>> {
    caller.require_in(org, Permission::KeysWrite)?;
    let current = find(&app, org, key).await?;
    // Taking away only what it could give, as with roles and users: else an admin's key, or
    // one holding only `keys:write`, could revoke every key of the owner. A user's own keys
    // are theirs to revoke, those someone else issued them too: only a key that could act
    // as that user may make one (`require_standing`).
    let own = caller.user_id.is_some() && current.user_id == caller.user_id;
    if !own {
        require_holds_all(&caller, &current, "revoke")?;
    }
    let command = ApiKeyCommand::Revoke {
        reason: body.0.unwrap_or_default().reason,
    };
    app.execute(&app.cqrs.api_keys, key, Some(org), &caller.actor, command)
        .await?;
    Ok(axum::Json(find(&app, org, key).await?))
}

/// A new secret for the same key; the old secret stops working with the event, or at the
/// end of the grace period asked for.
pub async fn rotate(
    State(app): State<App>,
    caller: Caller,
    Path((org, key)): Path<(Uuid, Uuid)>,
    body: OptionalJson<RotateKey>,
) -> ApiResult<(Extension<SecretShownOnce>, axum::Json<IssuedKey>)> {
    caller.require_in(org, Permission::KeysWrite)?;
    let current = find(&app, org, key).await?;
    // Holding a fresh secret is holding the key's powers: no more than the caller's own, and
    // for a user key only its own user's (a fresh secret is as good as a new key); another
    // user's key, only with the standing to issue them one.
    require_own_user(&caller, current.user_id, "rotate")?;
    if let Some(user) = current.user_id {
        require_standing(&app, &caller, user, "rotate").await?;
    }
    require_holds_all(&caller, &current, "rotate")?;
    // A key rotating itself gets a secret for its own life: so may one whose secret is in a
    // grace period (a client whose rotation's answer was lost rotates again with it).
    if caller.key_id != key {
        require_not_outliving(&caller, current.expires_at, "a key it may rotate")?;
    }
    let grace = body.0.unwrap_or_default().previous_secret_valid_for_seconds;
    let longest = MAX_ROTATION_GRACE.num_seconds();
    if grace.is_some_and(|secs| secs == 0 || i64::from(secs) > longest) {
        return Err(ApiError::invalid(format!(
            "previous_secret_valid_for_seconds must be from 1 to {longest}"
        )));
    }
    let now = Utc::now().trunc_subsecs(6);
    let previous_valid_until = grace.map(|secs| now + chrono::TimeDelta::seconds(secs.into()));
    let secret = keys::generate();
    let command = ApiKeyCommand::Rotate {
        prefix: secret.prefix.clone(),
        secret_hash: secret.hash.clone(),
        previous_valid_until,
        now,
    };
    app.execute(&app.cqrs.api_keys, key, Some(org), &caller.actor, command)
        .await?;
    let mut key = find(&app, org, key).await?;
    // Not shown yet (the answer is marked behind): the new secret goes with its own prefix.
    key.prefix = secret.prefix.clone();
    let shown = SecretShownOnce {
        organization_id: org,
        key_id: key.id,
        rotated: true,
    };
    Ok((
        Extension(shown),
        axum::Json(IssuedKey {
            key,
            secret: secret.secret,
            // As authentication will hold it.
            previous_secret_valid_until: previous_valid_until
                .map(|t| auth::grace_end(t, current.expires_at)),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use ledgerline_aggregates::api_key::MAX_ROTATION_GRACE;

    use super::RotateKey;

    /// The documented bounds of a rotation's grace are the aggregate's.
    #[test]
    fn the_grace_periods_schema_says_the_aggregates_limit() {
        let schema = schemars::schema_for!(RotateKey);
        let field = &schema.as_value()["properties"]["previous_secret_valid_for_seconds"];
        assert_eq!(field["minimum"], 1);
        assert_eq!(field["maximum"], MAX_ROTATION_GRACE.num_seconds());
    }
}
