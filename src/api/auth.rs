//! Who is calling: the bearer key is looked up on every request (no cache, so a revoked key
//! fails on its very next request) and turned into effective permissions.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use chrono::{DateTime, Utc};
use ledgerline_aggregates::{permissions, Permission, PermissionSet};
use uuid::Uuid;

use super::error::{ApiError, ApiResult};
use crate::app::{Actor, App, AuthenticatedAt};
use crate::keys;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: Uuid,
    /// The prefix of the secret presented.
    pub prefix: String,
    /// When the secret presented stops working, if it was rotated away and is in the grace
    /// period the rotation gave it.
    pub secret_valid_until: Option<DateTime<Utc>>,
    pub organization_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    /// What this request may do: the key's permissions, cut down to its user's roles.
    pub permissions: PermissionSet,
    /// What the key lists but its user's roles do not grant (cut from `permissions`): a
    /// refusal for one of these names the user's roles, not the key, as what to change.
    pub not_granted: PermissionSet,
    /// When the key stops working, if ever, or the secret presented (in a grace period)
    /// does, if sooner: nothing it issues or assigns outlives it.
    pub expires_at: Option<DateTime<Utc>>,
    pub actor: Actor,
}

impl Caller {
    pub fn is_platform_admin(&self) -> bool {
        self.permissions.contains(&Permission::PlatformAdmin)
    }

    pub fn require(&self, p: Permission) -> ApiResult<()> {
        if self.is_platform_admin() || self.permissions.contains(&p) {
            Ok(())
        } else if self.not_granted.contains(&p) {
            Err(ApiError::forbidden(format!(
                "this key lists the `{p}` permission, but its user's roles do not grant it \
                 (a user key does only what its user's roles allow)"
            )))
        } else {
            Err(ApiError::forbidden(format!(
                "this key lacks the `{p}` permission"
            )))
        }
    }

    /// 403 unless this key holds all of `wanted` (the platform operator's holds everything);
    /// `refusal` words it from the list of those it lacks.
    pub fn require_holds(
        &self,
        wanted: &PermissionSet,
        refusal: impl FnOnce(String) -> String,
    ) -> ApiResult<()> {
        match permissions::missing(&self.permissions, wanted) {
            missing if missing.is_empty() => Ok(()),
            missing => Err(ApiError::forbidden(refusal(permissions::list(&missing)))),
        }
    }

    /// Access to one organization: another tenant's anything is a 404, so that keys cannot
    /// probe which organizations exist; within its own, a missing permission is a 403.
    pub fn require_in(&self, org: Uuid, p: Permission) -> ApiResult<()> {
        if !self.is_platform_admin() && self.organization_id != Some(org) {
            return Err(ApiError::not_found("organization"));
        }
        self.require(p)
    }
}

/// Request facts every handler's events record.
pub fn request_actor(parts: &Parts) -> Actor {
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(512).collect::<String>())
    };
    Actor {
        kind: "api_key".into(),
        user_id: None,
        key_id: None,
        key_prefix: None,
        authenticated_at: None,
        request_id: header("x-request-id").unwrap_or_else(|| Uuid::new_v4().to_string()),
        // Set by `api::idempotency` once it has checked and taken the key.
        idempotency_key: None,
        client_ip: parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(a)| a.ip().to_string()),
        user_agent: header(header::USER_AGENT.as_str()),
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    /// The key's last event as `api_keys` shows it; with `key_changing` false, the log's too.
    version: i64,
    organization_id: Option<Uuid>,
    user_id: Option<Uuid>,
    key_hash: String,
    permissions: Vec<String>,
    status: String,
    expires_at: Option<DateTime<Utc>>,
    org_status: Option<String>,
    user_status: Option<String>,
    /// A user key's user's permissions now; `None` for a service key.
    held: Option<Vec<String>>,
    /// When the first of the user's role assignments that count now expires, if any does.
    roles_until: Option<DateTime<Utc>>,
    /// The roles the user's permissions come from (those assigned, their ancestors), by id,
    /// and their versions beside them; `None` when there are none. With `roles_changing`
    /// false, each version is the role's last sequence in the log.
    role_ids: Option<Vec<Uuid>>,
    role_versions: Option<Vec<i64>>,
    /// A user key's user's last sequence in the log (which the `users` row may lag).
    user_sequence: Option<i64>,
    /// The organization's last event as `organizations` shows it.
    org_version: Option<i64>,
    /// The log holds events of the key that `api_keys` does not show yet.
    key_changing: bool,
    /// The log suspends the organization, and `organizations` does not show it yet.
    org_suspending: bool,
    /// The log deactivates or erases the user, and `users` does not show it yet.
    user_leaving: bool,
    /// The log changes the user's roles or one of them, and the read models do not show it
    /// yet.
    roles_changing: bool,
}

/// Whether the log assigns or revokes a role of user `$user` (an SQL expression) beyond
/// what `user_roles` shows: an assignment counts too, as assigning again replaces one (with a
/// nearer expiry, say).
macro_rules! assignments_changing {
    ($user:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM events e WHERE e.aggregate_type = 'User' \
               AND e.aggregate_id = ",
            $user,
            "::text AND e.event_type IN ('UserRoleAssigned', 'UserRoleRevoked') \
               AND e.position > coalesce((SELECT position FROM projection_checkpoints \
                                          WHERE name = 'user_roles'), 0))"
        )
    };
}

/// The statement every request makes: the key `$where` picks (by `$1`) and its user's
/// permissions in one round trip. Read models can lag the log, or stop at an event they
/// cannot apply, and a key must not outlive its revocation meanwhile: events of the key, its
/// organization, its user and its roles that the read models do not show yet are looked for
/// in the log itself (each a range of the events' primary key, beyond the version a row
/// shows). An assignment counts too: assigning again replaces it, with a nearer expiry say.
/// The walk up each role's parents stops at 64 levels: chains are at most 16 deep
/// (`MAX_INHERITANCE_DEPTH`), so only a cycle or a longer chain an older release let through
/// meets that guard, and grants what it granted then. Assignments count until `$2`, the app's
/// clock, which the writer also checks their expiry against (`metadata::ACTOR_VALID_UNTIL`):
/// on the database's, one expired by the app's could be granted and then always refused.
macro_rules! key_row_query {
    ($where:literal) => {
        concat!(
            "SELECT k.id, k.version, k.organization_id, k.user_id, k.key_hash, k.permissions, k.status, k.expires_at,
                    o.status AS org_status, o.version AS org_version, u.status AS user_status, g.held,
                    g.roles_until, g.role_ids, g.role_versions,
                    (SELECT max(e.sequence) FROM events e WHERE e.aggregate_type = 'User'
                       AND e.aggregate_id = k.user_id::text) AS user_sequence,
                    EXISTS (SELECT 1 FROM events e WHERE e.aggregate_type = 'ApiKey'
                              AND e.aggregate_id = k.id::text AND e.sequence > k.version
                           ) AS key_changing,
                    EXISTS (SELECT 1 FROM events e WHERE e.aggregate_type = 'Organization'
                              AND e.aggregate_id = o.id::text AND e.sequence > o.version
                              AND e.event_type = 'OrganizationSuspended') AS org_suspending,
                    EXISTS (SELECT 1 FROM events e WHERE e.aggregate_type = 'User'
                              AND e.aggregate_id = u.id::text AND e.sequence > u.version
                              AND e.event_type IN ('UserDeactivated', 'UserErased')) AS user_leaving,
                    coalesce(g.roles_changing, false) OR ",
            assignments_changing!("k.user_id"),
            " AS roles_changing
             FROM api_keys k
             LEFT JOIN organizations o ON o.id = k.organization_id
             LEFT JOIN users u ON u.id = k.user_id
             LEFT JOIN LATERAL (
                 WITH RECURSIVE granted(id, parent, version, depth) AS (
                     SELECT r.id, r.parent_role_id, r.version, 0
                     FROM user_roles ur JOIN roles r ON r.id = ur.role_id
                     WHERE ur.user_id = k.user_id
                       AND (ur.expires_at IS NULL OR ur.expires_at > $2)
                   UNION
                     SELECT p.id, p.parent_role_id, p.version, g.depth + 1
                     FROM roles p JOIN granted g ON p.id = g.parent
                     WHERE g.depth < 64
                 )
                 SELECT ARRAY(SELECT DISTINCT rp.permission
                              FROM granted g JOIN role_permissions rp ON rp.role_id = g.id) AS held,
                        -- A probe of each role's own events (LIMIT keeps it from becoming a
                        -- join over every role's).
                        EXISTS (SELECT 1 FROM granted g, LATERAL (
                                    SELECT 1 FROM events e WHERE e.aggregate_type = 'Role'
                                      AND e.aggregate_id = g.id::text AND e.sequence > g.version
                                    LIMIT 1) pending) AS roles_changing,
                        (SELECT min(ur.expires_at) FROM user_roles ur
                         WHERE ur.user_id = k.user_id AND ur.expires_at > $2) AS roles_until,
                        acted_under.role_ids, acted_under.role_versions
                 FROM (SELECT array_agg(d.id ORDER BY d.id) AS role_ids,
                              array_agg(d.version ORDER BY d.id) AS role_versions
                       FROM (SELECT DISTINCT id, version FROM granted) d) acted_under
             ) g ON k.user_id IS NOT NULL
             WHERE ", $where
        )
    };
}

/// What a secret no key has, or one whose key's hash it does not match, is told: nothing of
/// any key.
const INVALID_KEY: &str = "invalid API key";

/// The end of the grace period the `ApiKeyRotated` event `$e` (an SQL alias of `events`)
/// gave the secret it replaced, as `timestamptz`; NULL when it gave none.
macro_rules! grace_until {
    ($e:literal) => {
        concat!(
            "(",
            $e,
            ".payload::jsonb -> 'ApiKeyRotated' ->> 'previous_valid_until')::timestamptz"
        )
    };
}

/// The key whose current secret has this prefix.
const KEY_BY_PREFIX: &str = key_row_query!("k.prefix = $1");
/// The key of this id (for a secret in its grace period: [`KnownPrefix::InGrace`]).
const KEY_BY_ID: &str = key_row_query!("k.id = $1::uuid");

async fn key_row(
    pool: &sqlx::PgPool,
    query: &'static str,
    by: impl ToString,
) -> Result<Option<KeyRow>, sqlx::Error> {
    sqlx::query_as(query)
        .bind(by.to_string())
        .bind(Utc::now())
        .fetch_optional(pool)
        .await
}

impl FromRequestParts<App> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        // Already authenticated for this very request, by the `Idempotency-Key` layer (which
        // scopes keys by the caller): once is enough. Extensions are the server's own.
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <key>`"))?
            .to_str()
            .ok()
            // The scheme is case-insensitive (RFC 9110 §11.1).
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .ok_or_else(|| {
                ApiError::unauthorized("malformed Authorization header: expected `Bearer <key>`")
            })?;
        let invalid = || ApiError::unauthorized(INVALID_KEY);
        let prefix = keys::prefix_of(presented).ok_or_else(invalid)?;
        let (row, secret_valid_until) = match key_row(&app.pool, KEY_BY_PREFIX, prefix).await? {
            Some(row) if keys::matches(presented, &row.key_hash) => {
                // The secret is being rotated away with a grace period, and `api_keys` does
                // not show it yet: let in once it does, rather than refused as rotated.
                if row.key_changing && grace_pending(&app.pool, &row, prefix).await? {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "this API key was rotated with a grace period for this secret, and the \
                         read models do not show the rotation yet; retry shortly",
                    ));
                }
                (row, None)
            }
            Some(_) => return Err(invalid()),
            None => {
                let (row, until) = by_retired_prefix(&app.pool, prefix, presented).await?;
                (row, Some(until))
            }
        };
        // A pending revocation or rotation is as good as shown: the event is in the log.
        if row.status != "active" || row.key_changing {
            return Err(ApiError::unauthorized(
                "this API key has been revoked or rotated",
            ));
        }
        if row.expires_at.is_some_and(|t| t <= Utc::now()) {
            return Err(ApiError::unauthorized("this API key has expired"));
        }
        // A secret in its grace period acts as the key until then, or until the key expires
        // if sooner (what `/v1/me` shows): nothing it issues or assigns outlives that
        // (`api_keys::require_not_outliving`).
        let secret_valid_until = secret_valid_until.map(|t| grace_end(t, row.expires_at));
        let expires_at = secret_valid_until.or(row.expires_at);
        if row.organization_id.is_some()
            && (row.org_status.as_deref() != Some("active") || row.org_suspending)
        {
            return Err(ApiError::unauthorized(
                "this key's organization is suspended",
            ));
        }
        if row.user_id.is_some()
            && (row.user_status.as_deref() != Some("active") || row.user_leaving)
        {
            return Err(ApiError::unauthorized("this key's user is not active"));
        }
        // What the user's roles now grant cannot be told until the read models show the
        // change: refuse rather than grant what may have been taken away.
        if row.roles_changing {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this key's roles are being changed and the read models do not show it yet; \
                 retry shortly",
            ));
        }
        let mut permissions: PermissionSet = row
            .permissions
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        let mut not_granted = PermissionSet::new();
        if let Some(held) = &row.held {
            let held: PermissionSet = held.iter().filter_map(|p| p.parse().ok()).collect();
            (permissions, not_granted) = permissions.into_iter().partition(|p| held.contains(p));
        }
        let mut actor = request_actor(parts);
        actor.key_id = Some(row.id);
        // Which secret acted matters where a grace lets two act: an organization's keys. A
        // platform key (rotated only by the CLI, with no grace) acting in an organization
        // leaves its prefix out of that tenant's log.
        actor.key_prefix = row.organization_id.map(|_| prefix.to_string());
        // Where the key stands, for the writer to refuse its commands if that is lost before
        // they are appended: the key as the log has it (`key_changing` is false), and from
        // what was checked above no deactivation, erasure, role assignment or revocation,
        // change of one of its roles or suspension after these sequences, nor any of its ends
        // passed. The user's is the log's: its `users` row may lag role revocations that
        // `user_roles` already shows.
        actor.authenticated_at = Some(AuthenticatedAt {
            key: row.version,
            user: row.user_sequence,
            organization: row.organization_id.zip(row.org_version),
            // Which assignment granted what the handler will check is not known here: the
            // first to expire bounds them all (sent again after it, a command is decided on
            // the roles left).
            until: [expires_at, row.roles_until].into_iter().flatten().min(),
            // Likewise every role assigned or inherited, not only what the handler will need.
            roles: row
                .role_ids
                .unwrap_or_default()
                .into_iter()
                .zip(row.role_versions.unwrap_or_default())
                .collect(),
        });
        actor.user_id = row.user_id;
        Ok(Caller {
            key_id: row.id,
            prefix: prefix.to_string(),
            secret_valid_until,
            organization_id: row.organization_id,
            user_id: row.user_id,
            permissions,
            not_granted,
            expires_at,
            actor,
        })
    }
}

/// Where a rotated-away secret's grace period ends for the key it opens: at its own end, or
/// at the key's expiry if sooner (a grace never outlives its key).
pub(super) fn grace_end(
    until: DateTime<Utc>,
    key_expires_at: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    key_expires_at.map_or(until, |k| k.min(until))
}

/// A prefix no row shows that belongs to a key the log holds.
enum KnownPrefix {
    /// The key was rotated away from it (and is `active`, or revoked since), with no grace
    /// period left.
    Retired { active: bool, grace: GraceLeft },
    /// The key's last rotation replaced it and gave it a grace period that is not over:
    /// it still opens key `key`, as the row at `version` shows it.
    InGrace {
        key: Uuid,
        version: i64,
        until: DateTime<Utc>,
    },
    /// Given by an issue or a rotation the read model does not show yet.
    NotShownYet,
}

/// Why a rotated-away secret has no grace period left.
enum GraceLeft {
    /// Its rotation gave it none.
    NoneGiven,
    /// It ended at this time.
    Ended(DateTime<Utc>),
    /// A later rotation of the key ended it.
    RotatedAgain,
}

/// A key by a secret no row shows: the key's row when the secret is in the grace period its
/// rotation gave it, and when that ends; otherwise why it is refused.
async fn by_retired_prefix(
    pool: &sqlx::PgPool,
    prefix: &str,
    presented: &str,
) -> ApiResult<(KeyRow, DateTime<Utc>)> {
    let rotated = |why: String| Err(ApiError::unauthorized(why));
    match prefix_of_a_known_key(pool, prefix, presented).await? {
        None => Err(ApiError::unauthorized(INVALID_KEY)),
        // The key as it is now, if nothing changed it since the look.
        Some(KnownPrefix::InGrace {
            key,
            version,
            until,
        }) => match key_row(pool, KEY_BY_ID, key).await? {
            Some(row) if row.version == version => Ok((row, until)),
            _ => rotated("this API key has been rotated again or revoked".into()),
        },
        Some(KnownPrefix::Retired { active: false, .. }) => {
            rotated("this API key has been revoked or rotated".into())
        }
        Some(KnownPrefix::Retired { grace, .. }) => rotated(match grace {
            GraceLeft::NoneGiven => {
                "this API key's secret has been rotated: use the secret the rotation returned"
                    .into()
            }
            GraceLeft::Ended(at) => format!(
                "this API key's secret has been rotated, and the grace period the rotation \
                 gave it ended at {}: use the new secret",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            GraceLeft::RotatedAgain => "this API key's secret has been rotated, and the key \
                 rotated again since, which ended its grace period: use the newest secret"
                .into(),
        }),
        Some(KnownPrefix::NotShownYet) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this API key's secret is new and the read models do not show it yet; retry shortly",
        )),
    }
}

/// Whether the key's events beyond its row (`key_changing`) are only its rotation away from
/// `prefix`, giving it a grace period that is not over.
async fn grace_pending(pool: &sqlx::PgPool, row: &KeyRow, prefix: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar(concat!(
        "SELECT coalesce(bool_and(e.event_type = 'ApiKeyRotated'
                         AND e.payload::jsonb -> 'ApiKeyRotated' ->> 'previous_prefix' = $3
                         AND ",
        grace_until!("e"),
        " > $4) AND count(*) = 1, false)
         FROM events e WHERE e.aggregate_type = 'ApiKey' AND e.aggregate_id = $1
           AND e.sequence > $2",
    ))
    .bind(row.id.to_string())
    .bind(row.version)
    .bind(prefix)
    .bind(Utc::now())
    .fetch_one(pool)
    .await
}

#[derive(sqlx::FromRow)]
struct PrefixFound {
    /// The key's row shows a later secret than the one this prefix names.
    shown: bool,
    active: bool,
    /// The hash of the secret the prefix names.
    secret_hash: String,
    /// The grace period the rotation that retired the prefix gave it, if any.
    grace_until: Option<DateTime<Utc>>,
    /// A rotation of the key came after that one.
    rotated_again: bool,
    key: Option<Uuid>,
    version: Option<i64>,
}

/// What became of `prefix`, when no key row shows it, told only to the holder of the secret
/// it was given with: prefixes are not secret (lists, logs and exports show them), so to
/// anyone else the key's state (live, revoked, being rotated) is none of theirs. Prefixes
/// stay claimed by their key for good (so none is issued twice); the key's event that gave
/// it holds that secret's hash and says whether the row has moved past it (shown: rotated
/// away) or not yet, if there is a row at all; the rotation after it says whether it is in
/// a grace period. Asked only when no row has the prefix, so a key that works costs nothing
/// more.
async fn prefix_of_a_known_key(
    pool: &sqlx::PgPool,
    prefix: &str,
    presented: &str,
) -> Result<Option<KnownPrefix>, sqlx::Error> {
    let found: Option<PrefixFound> = sqlx::query_as(concat!(
        // A row that shows the prefix by now (shown since the first look) reads as not shown
        // yet: the retry it is told to make finds it. The rotation that retired the prefix
        // is the key's first after the event that gave it.
        "SELECT coalesce(k.prefix <> $2 AND e.sequence <= k.version, false) AS shown,
                coalesce(k.status = 'active', false) AS active,
                e.payload::jsonb -> e.event_type ->> 'secret_hash' AS secret_hash,
                r.grace_until,
                EXISTS (SELECT 1 FROM events l WHERE l.aggregate_type = 'ApiKey'
                          AND l.aggregate_id = e.aggregate_id AND l.event_type = 'ApiKeyRotated'
                          AND l.sequence > r.sequence) AS rotated_again,
                k.id AS key, k.version
         FROM unique_claims c
         JOIN events e ON e.aggregate_type = 'ApiKey'
          AND e.aggregate_id = split_part(c.owner, ':', 2)
          AND jsonb_path_exists(e.payload::jsonb, '$.*.prefix ? (@ == $p)',
                                jsonb_build_object('p', $2::text))
         LEFT JOIN api_keys k ON k.id = split_part(c.owner, ':', 2)::uuid
         LEFT JOIN LATERAL (
             SELECT r.sequence, ",
        grace_until!("r"),
        " AS grace_until
             FROM events r WHERE r.aggregate_type = 'ApiKey' AND r.aggregate_id = e.aggregate_id
               AND r.event_type = 'ApiKeyRotated' AND r.sequence > e.sequence
             ORDER BY r.sequence LIMIT 1) r ON true
         WHERE c.scope = $1 AND c.key = $2
         LIMIT 1",
    ))
    .bind(ledgerline_aggregates::claims::API_KEY_PREFIX)
    .bind(prefix)
    .fetch_optional(pool)
    .await?;
    Ok(found
        .filter(|f| keys::matches(presented, &f.secret_hash))
        .map(|f| {
            // The app's clock, as for a key's expiry.
            let now = Utc::now();
            match (f.shown, f.key, f.version, f.grace_until) {
                (true, Some(key), Some(version), Some(until))
                    if f.active && !f.rotated_again && until > now =>
                {
                    KnownPrefix::InGrace {
                        key,
                        version,
                        until,
                    }
                }
                (true, ..) => KnownPrefix::Retired {
                    active: f.active,
                    grace: match f.grace_until {
                        None => GraceLeft::NoneGiven,
                        Some(_) if f.rotated_again => GraceLeft::RotatedAgain,
                        Some(until) => GraceLeft::Ended(until),
                    },
                },
                (false, ..) => KnownPrefix::NotShownYet,
            }
        }))
}

/// A role's effective permissions: its own and every ancestor's.
pub async fn role_permissions(
    pool: &sqlx::PgPool,
    role_id: Uuid,
) -> Result<PermissionSet, sqlx::Error> {
    Ok(role_permissions_and_change(pool, role_id).await?.0)
}

/// [`role_permissions`], to decide what granting the role grants: 503 while the log changes
/// the role or an ancestor beyond what the read models show (as authentication does), since
/// the tables may then show less than the role will grant.
pub async fn granted_by_role(pool: &sqlx::PgPool, role_id: Uuid) -> ApiResult<PermissionSet> {
    Ok(granted_by_role_at(pool, role_id).await?.0)
}

/// [`granted_by_role`], with the role's own version (the sequence of its last event; `None`
/// when no row shows the role, deleted or never made): a command decided on what the role
/// grants is guarded with it, so that a change of the role before the append refuses it.
pub async fn granted_by_role_at(
    pool: &sqlx::PgPool,
    role_id: Uuid,
) -> ApiResult<(PermissionSet, Option<i64>)> {
    match role_permissions_and_change(pool, role_id).await? {
        (_, true, _) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the role is being changed and the read models do not show it yet; retry shortly",
        )),
        (permissions, false, version) => Ok((permissions, version)),
    }
}

/// What `user`'s unexpired role assignments grant (with inheritance), as [`granted_by_role`]
/// reads each (503 while one of the roles changes beyond what the read models show).
pub async fn user_permissions(pool: &sqlx::PgPool, user: Uuid) -> ApiResult<PermissionSet> {
    let (roles, changing): (Vec<Uuid>, bool) = sqlx::query_as(concat!(
        "SELECT ARRAY(SELECT role_id FROM user_roles \
                      WHERE user_id = $1 AND (expires_at IS NULL OR expires_at > $2)), ",
        assignments_changing!("$1")
    ))
    .bind(user)
    // The app's clock, as authentication counts assignments (`key_row_query!`).
    .bind(Utc::now())
    .fetch_one(pool)
    .await?;
    if changing {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the user's roles are being changed and the read models do not show it yet; \
             retry shortly",
        ));
    }
    let mut held = PermissionSet::new();
    for role in roles {
        held.extend(granted_by_role(pool, role).await?);
    }
    Ok(held)
}

/// A role's effective permissions, whether the log holds events of it or an ancestor past
/// the versions their rows show, and the role's own version. The walk's guard of 64 levels
/// is met only by a cycle or a chain deeper than `MAX_INHERITANCE_DEPTH` that an older
/// release let through.
async fn role_permissions_and_change(
    pool: &sqlx::PgPool,
    role_id: Uuid,
) -> Result<(PermissionSet, bool, Option<i64>), sqlx::Error> {
    let (permissions, changing, version): (Vec<String>, bool, Option<i64>) = sqlx::query_as(
        "WITH RECURSIVE chain(id, parent, version, depth) AS (
             SELECT id, parent_role_id, version, 0 FROM roles WHERE id = $1
           UNION
             SELECT p.id, p.parent_role_id, p.version, c.depth + 1
             FROM roles p JOIN chain c ON p.id = c.parent
             WHERE c.depth < 64
         )
         SELECT ARRAY(SELECT DISTINCT rp.permission
                      FROM chain c JOIN role_permissions rp ON rp.role_id = c.id),
                EXISTS (SELECT 1 FROM chain c, LATERAL (
                            SELECT 1 FROM events e WHERE e.aggregate_type = 'Role'
                              AND e.aggregate_id = c.id::text AND e.sequence > c.version
                            LIMIT 1) pending),
                (SELECT version FROM chain WHERE depth = 0)",
    )
    .bind(role_id)
    .fetch_one(pool)
    .await?;
    let permissions = permissions.iter().filter_map(|p| p.parse().ok()).collect();
    Ok((permissions, changing, version))
}
