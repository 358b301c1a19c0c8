//! `GET /v1/organizations/{org}/audit-events`: the audit view, filtered and paged by a
//! position cursor. Sealed personal fields stay sealed in `event_data`, and e-mail blind
//! indexes are left out (see [`without_blind_indexes`]).

use axum::extract::State;
use chrono::{DateTime, Utc};
use ledgerline_aggregates::Permission;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::answers::PageOf;
use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::extract::{Path, Query};
use super::{history, organizations, page};
use crate::app::App;

pub const MAX_PAGE: i64 = 500;

/// Removes every field named `*blind_index` from `value`, at any depth. A blind index is a
/// keyed hash of an address, the same for the same address in one organization: shown, it
/// would let whoever may invite users (and so learn the index of any address they choose)
/// test a guessed address of an erased user, whose index stays in the log. The raw log
/// (`/ledger/events`, exports) keeps it, as its hashes cover it.
pub(super) fn without_blind_indexes(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(fields) => fields_without_blind_indexes(fields),
        serde_json::Value::Array(items) => items.iter_mut().for_each(without_blind_indexes),
        _ => {}
    }
}

/// [`without_blind_indexes`] of an object's fields.
pub(super) fn fields_without_blind_indexes(
    fields: &mut serde_json::Map<String, serde_json::Value>,
) {
    fields.retain(|name, _| !name.ends_with("blind_index"));
    fields.values_mut().for_each(without_blind_indexes);
}

#[derive(Debug, Serialize, JsonSchema, sqlx::FromRow)]
pub struct AuditEventView {
    pub position: i64,
    pub organization_id: Option<Uuid>,
    pub actor_kind: Option<String>,
    pub actor_user_id: Option<Uuid>,
    pub actor_key_id: Option<Uuid>,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_data: serde_json::Value,
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub recorded_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    #[default]
    Desc,
    Asc,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// The acting user's id (`actor_user_id`). An API key's id is refused (400): see
    /// `actor_key`.
    actor: Option<Uuid>,
    /// The acting API key's id (`actor_key_id`): what a key did, a service key's included,
    /// which acts for no user. A user's id is refused (400): see `actor`.
    actor_key: Option<Uuid>,
    /// An event type exactly as the events name it, e.g. `UserInvited`.
    event_type: Option<String>,
    /// The entity type: `organization`, `user`, `role`, `api_key`, `conversation` or
    /// `message` (as in a history path), or the stored name the events show (`ApiKey`).
    aggregate_type: Option<String>,
    /// The entity's id (any case; not an id at all is refused, 400).
    aggregate_id: Option<Uuid>,
    /// The request a change was made by (its `x-request-id`, as `request_id` shows it): what
    /// a request with an `Idempotency-Key` whose outcome is not known did.
    request_id: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    #[serde(default)]
    order: Order,
    /// The `next_cursor` of the previous page.
    cursor: Option<i64>,
    limit: Option<i64>,
}

/// Refuses (400) an `actor` that is an API key's id and an `actor_key` that is a user's:
/// either would match no event, and an empty trail reads as "it did nothing" to an auditor
/// asking what a leaked key did. Known is what the organization's read models hold: its own
/// users and keys, or any that acted in it (the platform operator's key among them).
async fn require_right_kinds(
    app: &App,
    org: Uuid,
    actor: Option<Uuid>,
    actor_key: Option<Uuid>,
) -> ApiResult<()> {
    if actor.is_none() && actor_key.is_none() {
        return Ok(());
    }
    let (actor_is_key, key_is_user): (bool, bool) = sqlx::query_as(
        "SELECT $2::uuid IS NOT NULL AND ( \
                    EXISTS (SELECT 1 FROM api_keys WHERE organization_id = $1 AND id = $2) \
                    OR EXISTS (SELECT 1 FROM audit_events \
                               WHERE organization_id = $1 AND actor_key_id = $2)), \
                $3::uuid IS NOT NULL AND ( \
                    EXISTS (SELECT 1 FROM users WHERE organization_id = $1 AND id = $3) \
                    OR EXISTS (SELECT 1 FROM audit_events \
                               WHERE organization_id = $1 AND actor_user_id = $3))",
    )
    .bind(org)
    .bind(actor)
    .bind(actor_key)
    .fetch_one(&app.pool)
    .await?;
    if let (true, Some(id)) = (actor_is_key, actor) {
        return Err(ApiError::bad_request(format!(
            "actor takes a user's id, and {id} is an API key's: use actor_key={id}"
        )));
    }
    if let (true, Some(id)) = (key_is_user, actor_key) {
        return Err(ApiError::bad_request(format!(
            "actor_key takes an API key's id, and {id} is a user's: use actor={id}"
        )));
    }
    Ok(())
}

pub async fn list(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<axum::Json<PageOf<AuditEventView>>> {
    caller.require_in(org, Permission::AuditRead)?;
    organizations::require_exists(&app, &caller, org).await?;
    let limit = page::limit(q.limit, 100, MAX_PAGE)?;
    require_right_kinds(&app, org, q.actor, q.actor_key).await?;
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(
        "SELECT position, organization_id, actor_kind, actor_user_id, actor_key_id, event_type, aggregate_type,
                aggregate_id, sequence, event_data, request_id,
                -- The network address and browser of an erased user's requests are theirs too
                -- (the erasure destroyed their data key): left out, as the log cannot be.
                CASE WHEN erased.actor THEN NULL ELSE client_ip END AS client_ip,
                CASE WHEN erased.actor THEN NULL ELSE user_agent END AS user_agent, recorded_at
         FROM audit_events, LATERAL (
             SELECT actor_user_id IS NOT NULL AND NOT EXISTS (
                        SELECT 1 FROM subject_keys k WHERE k.subject_id = actor_user_id) AS actor
         ) erased
         WHERE organization_id = ",
    );
    sql.push_bind(org);
    if let Some(a) = q.actor {
        sql.push(" AND actor_user_id = ").push_bind(a);
    }
    if let Some(k) = q.actor_key {
        sql.push(" AND actor_key_id = ").push_bind(k);
    }
    if let Some(t) = q.event_type {
        sql.push(" AND event_type = ").push_bind(t);
    }
    if let Some(t) = q.aggregate_type {
        sql.push(" AND aggregate_type = ")
            .push_bind(history::EntityType::audit_filter(&t)?);
    }
    if let Some(id) = q.aggregate_id {
        // Stored as `Uuid`'s own text: lower case.
        sql.push(" AND aggregate_id = ").push_bind(id.to_string());
    }
    if let Some(id) = q.request_id {
        sql.push(" AND request_id = ").push_bind(id);
    }
    if let Some(from) = q.from {
        sql.push(" AND recorded_at >= ").push_bind(from);
    }
    if let Some(to) = q.to {
        sql.push(" AND recorded_at < ").push_bind(to);
    }
    if let Some(c) = q.cursor {
        sql.push(if q.order == Order::Desc {
            " AND position < "
        } else {
            " AND position > "
        })
        .push_bind(c);
    }
    sql.push(if q.order == Order::Desc {
        " ORDER BY position DESC"
    } else {
        " ORDER BY position ASC"
    });
    sql.push(" LIMIT ").push_bind(limit + 1);
    let mut items: Vec<AuditEventView> = sql.build_query_as().fetch_all(&app.pool).await?;
    for item in &mut items {
        without_blind_indexes(&mut item.event_data);
    }
    let next_cursor = page::cut(&mut items, limit, |e| e.position);
    Ok(page::answer(items, next_cursor))
}
