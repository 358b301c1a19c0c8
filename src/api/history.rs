//! `GET /v1/organizations/{org}/history/{entity_type}/{id}`: every change to one entity in
//! order, each with who made it, when, and the fields before and after. The entity's events
//! are replayed through its own aggregate, so the history is exactly what the domain made of
//! them. Nothing is opened here: sealed fields stay ciphertext, or read `erased` once the key
//! that could open them is gone.

use std::collections::HashSet;

use axum::extract::State;
use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, DomainEvent};
use ledgerline_aggregates::api_key::ApiKey;
use ledgerline_aggregates::conversation::Conversation;
use ledgerline_aggregates::message::Message;
use ledgerline_aggregates::organization::Organization;
use ledgerline_aggregates::role::Role;
use ledgerline_aggregates::user::User;
use ledgerline_aggregates::{metadata, Permission, Sealed, EVENT_VERSION};
use ledgerline_projections::{StoredEvent, STORED_EVENT_COLUMNS};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::extract::Path;
use crate::app::App;

/// The longest history this view replays. Entities have short streams by design (a
/// conversation's messages are streams of their own), so a longer one is refused, not paged.
pub const MAX_EVENTS: usize = 10_000;

/// The most JSON values a replay's states may hold in all, each event's state counted whole
/// (a message read by thousands holds them all after each read): what a replay costs, while
/// its answer shows only what each event changed. A costlier one is refused as a longer one
/// is.
pub const MAX_REPLAYED_VALUES: usize = 10_000_000;

/// Why an entity's events could not be replayed.
#[derive(Debug)]
enum ReplayError {
    /// An event the aggregate cannot read: a fault, not the caller's.
    Unreadable(String),
    /// Over [`MAX_REPLAYED_VALUES`].
    TooCostly,
}

/// What a sealed value reads once its key is destroyed.
pub const ERASED: &str = "erased";

/// The kinds of entity with a history, as named in the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EntityType {
    Organization,
    User,
    Role,
    ApiKey,
    Conversation,
    Message,
}

/// The entity types a history path names.
pub const ENTITY_TYPES: [&str; 6] = [
    "organization",
    "user",
    "role",
    "api_key",
    "conversation",
    "message",
];

impl EntityType {
    const ALL: [(&'static str, EntityType); 6] = [
        (ENTITY_TYPES[0], Self::Organization),
        (ENTITY_TYPES[1], Self::User),
        (ENTITY_TYPES[2], Self::Role),
        (ENTITY_TYPES[3], Self::ApiKey),
        (ENTITY_TYPES[4], Self::Conversation),
        (ENTITY_TYPES[5], Self::Message),
    ];

    fn parse(name: &str) -> ApiResult<Self> {
        Self::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
                ApiError::bad_request(format!(
                    "unknown entity type `{name}`; expected one of: {}",
                    names.join(", ")
                ))
            })
    }

    /// An audit filter's entity type: its name in a history path, or the aggregate's stored
    /// name that the audit events show (`api_key` or `ApiKey`), never an unknown one, which
    /// would match nothing and look like an empty trail.
    pub(super) fn audit_filter(name: &str) -> ApiResult<&'static str> {
        Self::ALL
            .iter()
            .map(|(n, t)| (*n, t.aggregate_type()))
            .find(|(path, stored)| *path == name || *stored == name)
            .map(|(_, stored)| stored)
            .ok_or_else(|| {
                let names: Vec<String> = Self::ALL
                    .iter()
                    .map(|(n, t)| format!("{n} ({})", t.aggregate_type()))
                    .collect();
                ApiError::bad_request(format!(
                    "unknown aggregate_type `{name}`; expected one of: {}",
                    names.join(", ")
                ))
            })
    }

    fn aggregate_type(self) -> &'static str {
        match self {
            Self::Organization => Organization::TYPE,
            Self::User => User::TYPE,
            Self::Role => Role::TYPE,
            Self::ApiKey => ApiKey::TYPE,
            Self::Conversation => Conversation::TYPE,
            Self::Message => Message::TYPE,
        }
    }

    fn replay(self, events: &[StoredEvent]) -> Result<Vec<HistoryEntry>, ReplayError> {
        match self {
            Self::Organization => replay::<Organization>(events, &[]),
            Self::User => replay::<User>(events, &[]),
            Self::Role => replay::<Role>(events, &[]),
            Self::ApiKey => replay::<ApiKey>(events, &[]),
            Self::Conversation => replay::<Conversation>(events, &[]),
            // The aggregate keeps no content (no rule needs it), yet what a message said and
            // how an edit changed it is what an auditor asks first.
            Self::Message => {
                replay::<Message>(events, &["content", "attachments", "parent_message_id"])
            }
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct HistoryView {
    pub entity_type: String,
    pub id: Uuid,
    pub items: Vec<HistoryEntry>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct HistoryEntry {
    pub position: i64,
    pub sequence: i64,
    pub event_type: String,
    pub recorded_at: DateTime<Utc>,
    pub actor: ActorView,
    pub request_id: Option<String>,
    pub changes: Changes,
}

/// Who acted, from the event's metadata.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ActorView {
    pub kind: Option<String>,
    pub user_id: Option<String>,
    pub key_id: Option<String>,
    /// The prefix of the key's secret the request presented: a rotated-away one in its grace
    /// period, or the current one (events since the third release of 2026-12-07).
    pub key_prefix: Option<String>,
}

/// The top-level fields an event changed; a field on one side only is `null` on the other. A
/// field that is a list or an object on both sides shows only what changed in it: under
/// `before` the elements or entries the event removed or replaced, under `after` those it
/// added or replaced (a list whose elements only moved shows whole).
#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct Changes {
    pub before: Map<String, Value>,
    pub after: Map<String, Value>,
}

pub async fn get(
    State(app): State<App>,
    caller: Caller,
    Path((org, entity_type, id)): Path<(Uuid, String, Uuid)>,
) -> ApiResult<axum::Json<HistoryView>> {
    caller.require_in(org, Permission::AuditRead)?;
    let kind = EntityType::parse(&entity_type)?;
    let events: Vec<StoredEvent> = sqlx::query_as(&format!(
        "SELECT {STORED_EVENT_COLUMNS} FROM events
         WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence LIMIT $3"
    ))
    .bind(kind.aggregate_type())
    .bind(id.to_string())
    .bind(MAX_EVENTS as i64 + 1)
    .fetch_all(&app.pool)
    .await?;
    // Tenancy before size: another tenant's entity is a 404 however long it is. An
    // organization's events carry its own id, so only `id == org` has a history here.
    if events.is_empty() || events.iter().any(|e| e.organization_id != Some(org)) {
        return Err(ApiError::not_found("entity"));
    }
    if events.len() > MAX_EVENTS {
        return Err(ApiError::invalid(format!(
            "this {entity_type} has more than {MAX_EVENTS} events, too many to replay here; \
             read them from /audit-events?aggregate_id={id}"
        )));
    }
    // Off the async workers: a replay is all CPU, up to its limit.
    let replayed = tokio::task::spawn_blocking(move || kind.replay(&events))
        .await
        .map_err(ApiError::internal)?;
    let mut items = match replayed {
        Ok(items) => items,
        Err(ReplayError::Unreadable(why)) => return Err(ApiError::internal(why)),
        Err(ReplayError::TooCostly) => {
            return Err(ApiError::invalid(format!(
                "this {entity_type}'s states hold more than {MAX_REPLAYED_VALUES} values in all \
                 over its events, too many to replay here; read them from \
                 /audit-events?aggregate_id={id}"
            )))
        }
    };
    for item in &mut items {
        super::audit::fields_without_blind_indexes(&mut item.changes.before);
        super::audit::fields_without_blind_indexes(&mut item.changes.after);
    }
    mark_erased(&app, &mut items).await?;
    Ok(axum::Json(HistoryView {
        entity_type,
        id,
        items,
    }))
}

/// Folds the events through `A` from its default state. `carried` names payload fields the
/// aggregate does not keep but the history should: each keeps the last value an event gave it.
fn replay<A: Aggregate>(
    events: &[StoredEvent],
    carried: &[&str],
) -> Result<Vec<HistoryEntry>, ReplayError> {
    let mut state = A::default();
    let mut kept = Map::new();
    let mut before = view(&state, &kept).map_err(ReplayError::Unreadable)?;
    let mut items = Vec::with_capacity(events.len());
    let mut replayed = 0usize;
    for e in events {
        let what = || format!("{} {} #{}", e.aggregate_type, e.aggregate_id, e.sequence);
        if e.event_version != EVENT_VERSION {
            return Err(ReplayError::Unreadable(format!(
                "{}: unsupported event version {}",
                what(),
                e.event_version
            )));
        }
        let unreadable =
            |err: serde_json::Error| ReplayError::Unreadable(format!("{}: {err}", what()));
        let payload: Value = serde_json::from_str(&e.payload).map_err(unreadable)?;
        let event: A::Event = serde_json::from_value(payload.clone()).map_err(unreadable)?;
        if event.event_type() != e.event_type {
            return Err(ReplayError::Unreadable(format!(
                "{}: event_type is {} but the payload is {}",
                what(),
                e.event_type,
                event.event_type()
            )));
        }
        state.apply(event);
        // A payload is `{"<EventType>": {fields}}`.
        if let Some(fields) = payload
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_object)
        {
            for name in carried {
                if let Some(v) = fields.get(*name) {
                    kept.insert((*name).to_string(), v.clone());
                }
            }
        }
        let after = view(&state, &kept).map_err(ReplayError::Unreadable)?;
        replayed = replayed.saturating_add(after.values().map(values_in).sum());
        if replayed > MAX_REPLAYED_VALUES {
            return Err(ReplayError::TooCostly);
        }
        items.push(HistoryEntry {
            position: e.position,
            sequence: e.sequence,
            event_type: e.event_type.clone(),
            recorded_at: e.recorded_at,
            actor: actor_of(&e.metadata),
            request_id: metadata_text(&e.metadata, metadata::REQUEST_ID),
            changes: changes(&before, &after),
        });
        before = after;
    }
    Ok(items)
}

/// The state's fields as JSON, with the carried fields beside them.
fn view<A: Aggregate>(
    state: &A,
    carried: &Map<String, Value>,
) -> Result<Map<String, Value>, String> {
    match serde_json::to_value(state) {
        Ok(Value::Object(mut fields)) => {
            for (k, v) in carried {
                fields.entry(k.clone()).or_insert_with(|| v.clone());
            }
            Ok(fields)
        }
        Ok(other) => Err(format!("{} state is not a JSON object: {other}", A::TYPE)),
        Err(e) => Err(format!("{} state: {e}", A::TYPE)),
    }
}

/// How many JSON values `v` is: itself and all it holds.
fn values_in(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(values_in).sum::<usize>(),
        Value::Object(fields) => 1 + fields.values().map(values_in).sum::<usize>(),
        _ => 1,
    }
}

fn changes(before: &Map<String, Value>, after: &Map<String, Value>) -> Changes {
    let mut c = Changes::default();
    let names: HashSet<&String> = before.keys().chain(after.keys()).collect();
    for name in names {
        // Absent and `null` say the same: no value.
        let (b, a) = (
            before.get(name).unwrap_or(&Value::Null),
            after.get(name).unwrap_or(&Value::Null),
        );
        if b == a {
            continue;
        }
        // A set or map an event changes a part of (a reader, a participant) shows that part:
        // whole, each side would repeat all the entity's earlier events in every later one.
        let (b, a) = match (b, a) {
            (Value::Array(b), Value::Array(a)) => match elements_changed(b, a) {
                Some((removed, added)) => (Value::Array(removed), Value::Array(added)),
                // Only the order changed: whole, as nothing else shows that.
                None => (Value::Array(b.clone()), Value::Array(a.clone())),
            },
            (Value::Object(b), Value::Object(a)) => {
                let (removed, added) = entries_changed(b, a);
                (Value::Object(removed), Value::Object(added))
            }
            _ => (b.clone(), a.clone()),
        };
        c.before.insert(name.clone(), b);
        c.after.insert(name.clone(), a);
    }
    c
}

/// The elements of `before` that `after` lacks and those `after` adds, counted as multisets;
/// `None` when there are none (the two differ only in order). Linear for what the states hold
/// (sorted sets, changed at one place): the common ends are skipped first.
fn elements_changed(before: &[Value], after: &[Value]) -> Option<(Vec<Value>, Vec<Value>)> {
    let start = before.iter().zip(after).take_while(|(b, a)| b == a).count();
    let (before, after) = (&before[start..], &after[start..]);
    let end = before
        .iter()
        .rev()
        .zip(after.iter().rev())
        .take_while(|(b, a)| b == a)
        .count();
    let (before, after) = (&before[..before.len() - end], &after[..after.len() - end]);
    // `Value` has no `Hash`: its text stands for it.
    let counted = |values: &[Value]| {
        let mut counts: std::collections::HashMap<String, usize> = Default::default();
        for v in values {
            *counts.entry(v.to_string()).or_default() += 1;
        }
        counts
    };
    let only_in = |these: &[Value], mut others: std::collections::HashMap<String, usize>| {
        these
            .iter()
            .filter(|v| match others.get_mut(&v.to_string()) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    false
                }
                _ => true,
            })
            .cloned()
            .collect::<Vec<Value>>()
    };
    let removed = only_in(before, counted(after));
    let added = only_in(after, counted(before));
    (!removed.is_empty() || !added.is_empty()).then_some((removed, added))
}

/// The entries of `before` that `after` lacks or holds otherwise, and those of `after` that
/// are new or other.
fn entries_changed(
    before: &Map<String, Value>,
    after: &Map<String, Value>,
) -> (Map<String, Value>, Map<String, Value>) {
    let only_in = |these: &Map<String, Value>, others: &Map<String, Value>| {
        these
            .iter()
            .filter(|(k, v)| others.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    (only_in(before, after), only_in(after, before))
}

fn metadata_text(metadata: &str, key: &str) -> Option<String> {
    let fields: Map<String, Value> = serde_json::from_str(metadata).ok()?;
    fields.get(key)?.as_str().map(str::to_string)
}

fn actor_of(metadata: &str) -> ActorView {
    ActorView {
        kind: metadata_text(metadata, metadata::ACTOR_KIND),
        user_id: metadata_text(metadata, metadata::ACTOR_USER_ID),
        key_id: metadata_text(metadata, metadata::ACTOR_KEY_ID),
        key_prefix: metadata_text(metadata, metadata::ACTOR_KEY_PREFIX),
    }
}

/// Replaces every sealed value whose key is gone with [`ERASED`]: a user's fields once the
/// user's key is destroyed, a message's once its own key or its author's is.
async fn mark_erased(app: &App, items: &mut [HistoryEntry]) -> Result<(), sqlx::Error> {
    let mut subjects = HashSet::new();
    for item in items.iter_mut() {
        for side in [&mut item.changes.before, &mut item.changes.after] {
            for v in side.values_mut() {
                walk_sealed(v, &mut |s| {
                    if let Some(subject) = subject_of(s) {
                        subjects.insert(subject);
                    }
                });
            }
        }
    }
    if subjects.is_empty() {
        return Ok(());
    }
    let subjects: Vec<Uuid> = subjects.into_iter().collect();
    let live: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT s FROM unnest($1::uuid[]) AS t(s)
         WHERE EXISTS (SELECT 1 FROM subject_keys k WHERE k.subject_id = s)
            OR EXISTS (SELECT 1 FROM message_keys m JOIN subject_keys a ON a.subject_id = m.author_id
                       WHERE m.message_id = s)",
    )
    .bind(&subjects)
    .fetch_all(&app.pool)
    .await?;
    let live: HashSet<Uuid> = live.into_iter().map(|(s,)| s).collect();
    for item in items.iter_mut() {
        for side in [&mut item.changes.before, &mut item.changes.after] {
            for v in side.values_mut() {
                walk_sealed(v, &mut |s| {
                    if subject_of(s).is_some_and(|subject| !live.contains(&subject)) {
                        *s = ERASED.to_string();
                    }
                });
            }
        }
    }
    Ok(())
}

/// The subject whose key a sealed value (`sealed:v1:<subject>:<body>`) is sealed under.
fn subject_of(text: &str) -> Option<Uuid> {
    let rest = text.strip_prefix(Sealed::PREFIX)?;
    let (subject, _) = rest.split_once(':')?;
    Uuid::parse_str(subject).ok()
}

/// Calls `f` on every sealed string inside `v`, however deeply nested.
fn walk_sealed(v: &mut Value, f: &mut impl FnMut(&mut String)) {
    match v {
        Value::String(s) if s.starts_with(Sealed::PREFIX) => f(s),
        Value::Array(items) => items.iter_mut().for_each(|i| walk_sealed(i, f)),
        Value::Object(fields) => fields.values_mut().for_each(|i| walk_sealed(i, f)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn changes_keep_only_changed_fields_and_null_the_missing_side() {
        let before = object(json!({"a": 1, "b": "same", "gone": true}));
        let after = object(json!({"a": 2, "b": "same", "new": [1], "none": null}));
        let c = changes(&before, &after);
        assert_eq!(
            Value::Object(c.before),
            json!({"a": 1, "gone": true, "new": null})
        );
        assert_eq!(
            Value::Object(c.after),
            json!({"a": 2, "gone": null, "new": [1]})
        );
    }

    #[test]
    fn lists_and_objects_show_only_what_changed_in_them() {
        let before = object(json!({
            "readers": ["a", "b", "d"],
            "tags": ["x", "x", "y"],
            "order": [1, 2],
            "members": {"u1": {"role": "member"}, "u2": {"role": "admin"}, "u3": 1},
        }));
        let after = object(json!({
            "readers": ["a", "b", "c", "d"],
            "tags": ["x", "y"],
            "order": [2, 1],
            "members": {"u1": {"role": "owner"}, "u2": {"role": "admin"}, "u4": 2},
        }));
        let c = changes(&before, &after);
        assert_eq!(
            Value::Object(c.before),
            json!({
                "readers": [],
                "tags": ["x"],
                "order": [1, 2],
                "members": {"u1": {"role": "member"}, "u3": 1},
            })
        );
        assert_eq!(
            Value::Object(c.after),
            json!({
                "readers": ["c"],
                "tags": [],
                "order": [2, 1],
                "members": {"u1": {"role": "owner"}, "u4": 2},
            })
        );
    }

    #[test]
    fn values_count_themselves_and_all_they_hold() {
        assert_eq!(values_in(&json!(1)), 1);
        assert_eq!(values_in(&json!([1, [2, 3], {"a": null}])), 7);
    }

    #[test]
    fn sealed_strings_are_found_at_any_depth() {
        let subject = Uuid::new_v4();
        let sealed = format!("sealed:v1:{subject}:AAAA");
        let mut v = json!({"x": [{"file_name": sealed}], "y": "sealed:v1:not-a-uuid:AAAA", "z": 3});
        let mut found = Vec::new();
        walk_sealed(&mut v, &mut |s| found.push(subject_of(s)));
        found.sort();
        assert_eq!(found, vec![None, Some(subject)]);
    }

    #[test]
    fn unknown_entity_types_are_a_400() {
        assert_eq!(EntityType::parse("api_key").unwrap(), EntityType::ApiKey);
        let e = EntityType::parse("ApiKey").unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
    }
}
