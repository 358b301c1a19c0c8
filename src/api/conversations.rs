//! `/v1/organizations/{org}/conversations`: create, list, read, rename, archive, and manage
//! participants. A user key acts as its user and sees only the conversations it takes part
//! in (any other is a 404); a service key of the organization sees all and moderates.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use ledgerline_aggregates::conversation::{
    Conversation, ConversationActor, ConversationCommand, ConversationKind, ParticipantRole,
};
use ledgerline_aggregates::message::ConversationFacts;
use ledgerline_aggregates::Permission;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::answers::PageOf;
use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::extract::{Json, Path, Query};
use super::page::{self, Page, PageQuery};
use super::{absent_or_null, double_option, organizations};
use crate::app::{App, Guard};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConversationRow {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub kind: String,
    pub title: Option<String>,
    pub description: Option<String>,
    pub created_by: Uuid,
    pub status: String,
    pub archived_at: Option<DateTime<Utc>>,
    pub last_message_at: Option<DateTime<Utc>>,
    pub message_count: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The Conversation aggregate's last sequence: the guard of every message command.
    pub version: i64,
}

/// The columns of a [`ConversationRow`] of `conversations c`.
macro_rules! columns {
    () => {
        "c.id, c.organization_id, c.kind, c.title, c.description, c.created_by, \
         c.status, c.archived_at, c.last_message_at, c.message_count, c.created_at, \
         c.updated_at, c.version"
    };
}

const SELECT: &str = concat!("SELECT ", columns!(), " FROM conversations c");

#[derive(Debug, Clone, Serialize, JsonSchema, sqlx::FromRow)]
pub struct ParticipantView {
    pub user_id: Uuid,
    pub role: String,
    pub muted: bool,
    pub joined_at: DateTime<Utc>,
    pub last_read_message_id: Option<Uuid>,
    pub last_read_at: Option<DateTime<Utc>>,
}

/// The calling user's own standing in a conversation.
#[derive(Debug, Clone, Serialize, JsonSchema, sqlx::FromRow)]
pub struct MyState {
    pub role: String,
    pub muted: bool,
    pub last_read_message_id: Option<Uuid>,
    /// Messages of others after the last one read, deleted ones not counted; at most
    /// [`MAX_UNREAD`].
    pub unread_count: i64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationView {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub kind: String,
    pub title: Option<String>,
    pub description: Option<String>,
    pub created_by: Uuid,
    pub status: String,
    pub archived_at: Option<DateTime<Utc>>,
    pub last_message_at: Option<DateTime<Utc>>,
    pub message_count: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Present for a user key: its role, mute and unread count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub me: Option<MyState>,
    /// Present when one conversation is read; lists leave it out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participants: Option<Vec<ParticipantView>>,
}

impl ConversationView {
    fn new(row: ConversationRow, me: Option<MyState>) -> Self {
        Self {
            id: row.id,
            organization_id: row.organization_id,
            kind: row.kind,
            title: row.title,
            description: row.description,
            created_by: row.created_by,
            status: row.status,
            archived_at: row.archived_at,
            last_message_at: row.last_message_at,
            message_count: row.message_count,
            created_at: row.created_at,
            updated_at: row.updated_at,
            me,
            participants: None,
        }
    }
}

/// Unread counts stop at this many: past it a client shows "10,000+", and the count, made
/// at read time, stays cheap however long a participant has not read.
pub const MAX_UNREAD: i64 = 10_000;

/// The unread count of participant `p` (SQL alias): messages of others after the last one
/// read, deleted ones not counted, at most [`MAX_UNREAD`]. An index-only scan of
/// `messages_conversation_position`.
pub const UNREAD: &str = "(SELECT count(*) FROM (SELECT 1 FROM messages m \
     WHERE m.conversation_id = p.conversation_id AND m.position > p.last_read_position \
     AND m.deleted_at IS NULL AND m.author_id <> p.user_id LIMIT 10000) unread)";

/// A conversation as one caller may act on it.
pub struct Access {
    pub conversation: ConversationRow,
    /// The acting user's role: the calling user's, or for a service key acting on a user's
    /// behalf that user's; `None` when there is no such user or it does not take part.
    pub role: Option<ParticipantRole>,
    pub actor: ConversationActor,
}

impl Access {
    pub fn user_id(&self) -> Option<Uuid> {
        match self.actor {
            ConversationActor::User(u) => Some(u),
            ConversationActor::Service => None,
        }
    }

    /// The conversation's version, which a message command is decided against.
    pub fn guard(&self) -> Guard {
        Guard {
            aggregate_type: "Conversation",
            aggregate_id: self.conversation.id,
            sequence: self.conversation.version,
        }
    }

    /// The facts a message command is decided on.
    pub fn facts(&self) -> ConversationFacts {
        ConversationFacts {
            conversation_id: self.conversation.id,
            organization_id: self.conversation.organization_id,
            archived: self.conversation.status == "archived",
            role: self.role,
        }
    }
}

pub fn parse_role(text: &str) -> Option<ParticipantRole> {
    match text {
        "owner" => Some(ParticipantRole::Owner),
        "admin" => Some(ParticipantRole::Admin),
        "member" => Some(ParticipantRole::Member),
        _ => None,
    }
}

/// A conversation and the role in it of the user a command acts for.
#[derive(sqlx::FromRow)]
struct AccessRow {
    #[sqlx(flatten)]
    conversation: ConversationRow,
    acting_role: Option<String>,
    acting_removed: bool,
}

/// Whether the log removes `user` (an SQL expression) from conversation `c` beyond what the
/// read model shows. `messaging` may lag, or be stopped at an event it cannot apply, and a
/// removed participant must not read on meanwhile; the newest pending change of the user's
/// membership decides (removed and added again is a participant). Commands need no such
/// check: the conversation's version guards them.
fn removed_in_log(user: &str) -> String {
    format!(
        "coalesce((SELECT e.event_type = 'ParticipantRemoved' FROM events e \
                   WHERE e.aggregate_type = 'Conversation' AND e.aggregate_id = c.id::text \
                     AND e.sequence > c.version \
                     AND e.event_type IN ('ParticipantAdded', 'ParticipantRemoved') \
                     AND e.payload -> e.event_type ->> 'user_id' = {user}::text \
                   ORDER BY e.sequence DESC LIMIT 1), false)"
    )
}

/// The conversation `id` of `org` as `caller` may see it: a 404 for another tenant's, and
/// for a user key that does not take part in it.
pub async fn access(
    app: &App,
    caller: &Caller,
    org: Uuid,
    id: Uuid,
    permission: Permission,
) -> ApiResult<Access> {
    access_for(app, caller, org, id, permission, None).await
}

/// [`access`], where a service key acts on behalf of user `on_behalf`: the access then
/// carries that user's role (`None` when the user does not take part).
pub async fn access_for(
    app: &App,
    caller: &Caller,
    org: Uuid,
    id: Uuid,
    permission: Permission,
    on_behalf: Option<Uuid>,
) -> ApiResult<Access> {
    caller.require_in(org, permission)?;
    // In one round trip: every message read and command starts here.
    let acting = caller.user_id.or(on_behalf);
    let AccessRow {
        conversation,
        acting_role,
        acting_removed,
    } = sqlx::query_as(&format!(
        "SELECT {}, (SELECT p.role FROM conversation_participants p \
              WHERE p.conversation_id = c.id AND p.user_id = $3) AS acting_role, \
              {} AS acting_removed \
         FROM conversations c WHERE c.id = $1 AND c.organization_id = $2",
        columns!(),
        removed_in_log("$3")
    ))
    .bind(id)
    .bind(org)
    .bind(acting)
    .fetch_optional(&app.pool)
    .await?
    .ok_or_else(|| ApiError::not_found("conversation"))?;
    // A removal the read model does not show yet is as good as shown: the event is in the log.
    let role = acting_role
        .as_deref()
        .and_then(parse_role)
        .filter(|_| !acting_removed);
    match (caller.user_id, on_behalf) {
        (Some(user), _) => Ok(Access {
            conversation,
            role: Some(role.ok_or_else(|| ApiError::not_found("conversation"))?),
            actor: ConversationActor::User(user),
        }),
        (None, Some(_)) => Ok(Access {
            role,
            conversation,
            actor: ConversationActor::Service,
        }),
        (None, None) => Ok(Access {
            conversation,
            role: None,
            actor: ConversationActor::Service,
        }),
    }
}

/// The full view of one conversation, as `caller` sees it.
async fn view(app: &App, caller: &Caller, org: Uuid, id: Uuid) -> ApiResult<ConversationView> {
    let access = access(app, caller, org, id, Permission::ConversationsRead).await?;
    let me = match access.user_id() {
        Some(user) => {
            sqlx::query_as::<_, MyState>(&format!(
                "SELECT p.role, p.muted, p.last_read_message_id, {UNREAD} AS unread_count \
             FROM conversation_participants p WHERE p.conversation_id = $1 AND p.user_id = $2"
            ))
            .bind(id)
            .bind(user)
            .fetch_optional(&app.pool)
            .await?
        }
        None => None,
    };
    let participants: Vec<ParticipantView> = sqlx::query_as(
        "SELECT user_id, role, muted, joined_at, last_read_message_id, last_read_at \
         FROM conversation_participants WHERE conversation_id = $1 \
         ORDER BY CASE role WHEN 'owner' THEN 0 WHEN 'admin' THEN 1 ELSE 2 END, joined_at, user_id",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await?;
    let mut view = ConversationView::new(access.conversation, me);
    view.participants = Some(participants);
    Ok(view)
}

/// Every user in `users` must be an active user of `org`: 422 naming the first that is not.
pub async fn require_active_members(app: &App, org: Uuid, users: &[Uuid]) -> ApiResult<()> {
    let found: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM users WHERE id = ANY($1) AND organization_id = $2 AND status = 'active'",
    )
    .bind(users)
    .bind(org)
    .fetch_all(&app.pool)
    .await?;
    match users.iter().find(|u| !found.iter().any(|(f,)| f == *u)) {
        Some(missing) => Err(ApiError::invalid(format!(
            "user {missing} is not an active user of this organization"
        ))),
        None => Ok(()),
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConversation {
    kind: ConversationKind,
    title: Option<String>,
    description: Option<String>,
    /// The other participants; the creator joins as owner.
    #[serde(default)]
    participants: Vec<Uuid>,
    /// Who owns it: a service key must name the owner; a user key owns what it creates.
    owner_id: Option<Uuid>,
}

pub async fn create(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    Json(body): Json<CreateConversation>,
) -> ApiResult<axum::response::Response> {
    caller.require_in(org, Permission::ConversationsWrite)?;
    organizations::require_exists(&app, &caller, org).await?;
    let owner_id = match (caller.user_id, body.owner_id) {
        (Some(user), None) => user,
        (Some(user), Some(owner)) if owner == user => user,
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "owner_id: a user key creates conversations as its own user",
            ))
        }
        (None, Some(owner)) => owner,
        (None, None) => {
            return Err(ApiError::invalid(
                "owner_id is required when a service key creates a conversation",
            ))
        }
    };
    let everyone: Vec<Uuid> = std::iter::once(owner_id)
        .chain(body.participants.iter().copied())
        .collect();
    require_active_members(&app, org, &everyone).await?;
    let direct_exists = |existing: Uuid| {
        ApiError::conflict(format!(
            "a direct conversation between these two users exists: {existing}"
        ))
    };
    let (id, direct) = match body.participants.as_slice() {
        [other] if body.kind == ConversationKind::Direct && *other != owner_id => {
            let id = direct_id(org, owner_id, *other);
            if let Some(existing) = direct_between(&app, org, id, owner_id, *other).await? {
                return Err(direct_exists(existing));
            }
            (id, true)
        }
        // Any other shape of a direct conversation the aggregate refuses, naming why.
        _ => (Uuid::new_v4(), false),
    };
    let command = ConversationCommand::Create {
        conversation_id: id,
        organization_id: org,
        kind: body.kind,
        title: body.title,
        description: body.description,
        owner_id,
        members: body.participants,
    };
    let outcome = app
        .execute_fresh::<Conversation>(id, Some(org), &caller.actor, None, command)
        .await;
    // Another request opened the same pair's conversation since the check above.
    if outcome.is_err() && direct && super::created(&app.pool, Conversation::TYPE, id, org).await? {
        return Err(direct_exists(id));
    }
    outcome?;
    // The creator may be a service key, which sees it too.
    super::created_answer(view(&app, &caller, org, id).await, id)
}

/// A direct conversation's id comes from its organization and its two participants, in
/// either order: two requests racing to open the same one make the same aggregate, and the
/// second is refused as already created.
fn direct_id(org: Uuid, a: Uuid, b: Uuid) -> Uuid {
    let (low, high) = if a < b { (a, b) } else { (b, a) };
    Uuid::new_v5(&org, format!("ledgerline:direct:{low}:{high}").as_bytes())
}

/// The direct conversation between `a` and `b`, if there is one: `id` in the log (which the
/// read models may not show yet), or one made before ids were derived (in the read models).
async fn direct_between(
    app: &App,
    org: Uuid,
    id: Uuid,
    a: Uuid,
    b: Uuid,
) -> ApiResult<Option<Uuid>> {
    if super::created(&app.pool, Conversation::TYPE, id, org).await? {
        return Ok(Some(id));
    }
    Ok(sqlx::query_scalar(
        "SELECT c.id FROM conversation_participants p \
         JOIN conversations c ON c.id = p.conversation_id \
         WHERE p.user_id = $2 AND c.organization_id = $1 AND c.kind = 'direct' \
           AND EXISTS (SELECT 1 FROM conversation_participants q \
                       WHERE q.conversation_id = c.id AND q.user_id = $3) \
         ORDER BY c.created_at LIMIT 1",
    )
    .bind(org)
    .bind(a)
    .bind(b)
    .fetch_optional(&app.pool)
    .await?)
}

#[derive(Debug, sqlx::FromRow)]
struct ListedRow {
    #[sqlx(flatten)]
    conversation: ConversationRow,
    #[sqlx(flatten)]
    me: MyState,
}

/// The list's order is by last activity: `COALESCE` puts conversations without a message
/// last, as `NULLS LAST` did, in an expression that a row-value comparison can bound and an
/// index (migration 0011) serves. Ties go by creation, newest first, then by id.
const ACTIVITY: &str = "COALESCE(c.last_message_at, '-infinity')";

/// A conversation's place in the list: (last_message_at, created_at, id).
type ListKey = (Option<DateTime<Utc>>, DateTime<Utc>, Uuid);

/// Ends `sql`, whose `WHERE` is open, with this page: the conversations after the cursor,
/// lower on (activity, creation), both descending, or level with it and of a greater id.
/// Activity only grows (`GREATEST` in the projection), so a conversation that got a
/// message while a client paged moves ahead of the cursor: not shown twice, and left out
/// of the walk if it had not been shown yet (it is on a fresh first page).
fn push_page(sql: &mut QueryBuilder<'_, Postgres>, page: &Page<ListKey>) {
    if let Some((last_message_at, created_at, id)) = page.after {
        // The cursor's (activity, creation), written out twice: once as the bound an index
        // range starts at, once to leave out its ties up to its id.
        let place = |sql: &mut QueryBuilder<'_, Postgres>, compare: &str| {
            sql.push(format_args!(
                "({ACTIVITY}, c.created_at) {compare} (COALESCE("
            ))
            .push_bind(last_message_at)
            .push("::timestamptz, '-infinity'), ")
            .push_bind(created_at)
            .push(")");
        };
        sql.push(" AND ");
        place(sql, "<=");
        sql.push(" AND (");
        place(sql, "<");
        sql.push(" OR c.id > ").push_bind(id).push(")");
    }
    sql.push(format_args!(
        " ORDER BY {ACTIVITY} DESC, c.created_at DESC, c.id LIMIT "
    ))
    .push_bind(page.fetch());
}

/// A user key lists the conversations it takes part in, each with its unread count; a
/// service key lists all of the organization's.
pub async fn list(
    State(app): State<App>,
    caller: Caller,
    Path(org): Path<Uuid>,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<PageOf<ConversationView, String>>> {
    caller.require_in(org, Permission::ConversationsRead)?;
    let page = q.page::<ListKey>("conversations")?;
    organizations::require_exists(&app, &caller, org).await?;
    let key = |c: &ConversationRow| (c.last_message_at, c.created_at, c.id);
    let (items, next_cursor) = match caller.user_id {
        Some(user) => {
            let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(format!(
                "{SELECT_LISTED} JOIN conversation_participants p ON p.conversation_id = c.id \
                 WHERE p.user_id = ",
                SELECT_LISTED = SELECT.replace(
                    " FROM conversations c",
                    &format!(
                        ", p.role, p.muted, p.last_read_message_id, {UNREAD} AS unread_count \
                         FROM conversations c"
                    ),
                ),
            ));
            // The user is $1, which `removed_in_log` names.
            sql.push_bind(user)
                .push(" AND c.organization_id = ")
                .push_bind(org)
                .push(format_args!(" AND NOT {}", removed_in_log("$1")));
            push_page(&mut sql, &page);
            let mut rows: Vec<ListedRow> = sql.build_query_as().fetch_all(&app.pool).await?;
            let next_cursor = page.cut(&mut rows, |r| key(&r.conversation));
            let items: Vec<ConversationView> = rows
                .into_iter()
                .map(|r| ConversationView::new(r.conversation, Some(r.me)))
                .collect();
            (items, next_cursor)
        }
        None => {
            let mut sql: QueryBuilder<Postgres> =
                QueryBuilder::new(format!("{SELECT} WHERE c.organization_id = "));
            sql.push_bind(org);
            push_page(&mut sql, &page);
            let mut rows: Vec<ConversationRow> = sql.build_query_as().fetch_all(&app.pool).await?;
            let next_cursor = page.cut(&mut rows, key);
            let items = rows
                .into_iter()
                .map(|r| ConversationView::new(r, None))
                .collect();
            (items, next_cursor)
        }
    };
    Ok(page::answer(items, next_cursor))
}

pub async fn get(
    State(app): State<App>,
    caller: Caller,
    Path((org, id)): Path<(Uuid, Uuid)>,
) -> ApiResult<axum::Json<ConversationView>> {
    Ok(axum::Json(view(&app, &caller, org, id).await?))
}

/// Runs one Conversation command for a caller that may write and see the conversation,
/// then answers with the conversation as the caller now sees it ([`changed`]).
async fn command(
    app: &App,
    caller: &Caller,
    org: Uuid,
    id: Uuid,
    make: impl FnOnce(ConversationActor) -> ConversationCommand,
) -> ApiResult<Response> {
    let access = access(app, caller, org, id, Permission::ConversationsWrite).await?;
    command_as(app, caller, org, id, access, StatusCode::OK, make).await
}

/// [`command`] with the caller's access already read, for handlers that check it before
/// anything else, answering with `answer`.
async fn command_as(
    app: &App,
    caller: &Caller,
    org: Uuid,
    id: Uuid,
    access: Access,
    answer: StatusCode,
    make: impl FnOnce(ConversationActor) -> ConversationCommand,
) -> ApiResult<Response> {
    let command = make(access.actor);
    app.execute(
        &app.cqrs.conversations,
        id,
        Some(org),
        &caller.actor,
        command,
    )
    .await?;
    changed(app, caller, org, id, answer).await
}

/// A change's answer: the view after it, or the id alone to a key that may not read it.
async fn changed(
    app: &App,
    caller: &Caller,
    org: Uuid,
    id: Uuid,
    status: StatusCode,
) -> ApiResult<Response> {
    super::changed_answer(status, view(app, caller, org, id).await, id)
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateConversation {
    #[serde(default, deserialize_with = "double_option")]
    #[schemars(transform = absent_or_null)]
    title: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schemars(transform = absent_or_null)]
    description: Option<Option<String>>,
}

pub async fn update(
    State(app): State<App>,
    caller: Caller,
    Path((org, id)): Path<(Uuid, Uuid)>,
    Json(body): Json<UpdateConversation>,
) -> ApiResult<Response> {
    command(&app, &caller, org, id, |actor| {
        ConversationCommand::Update {
            title: body.title,
            description: body.description,
            actor,
        }
    })
    .await
}

pub async fn archive(
    State(app): State<App>,
    caller: Caller,
    Path((org, id)): Path<(Uuid, Uuid)>,
    _: super::NoBody,
) -> ApiResult<Response> {
    command(&app, &caller, org, id, |actor| {
        ConversationCommand::Archive { actor }
    })
    .await
}

pub async fn unarchive(
    State(app): State<App>,
    caller: Caller,
    Path((org, id)): Path<(Uuid, Uuid)>,
    _: super::NoBody,
) -> ApiResult<Response> {
    command(&app, &caller, org, id, |actor| {
        ConversationCommand::Unarchive { actor }
    })
    .await
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddParticipant {
    user_id: Uuid,
    #[serde(default = "member")]
    role: ParticipantRole,
}

fn member() -> ParticipantRole {
    ParticipantRole::Member
}

pub async fn add_participant(
    State(app): State<App>,
    caller: Caller,
    Path((org, id)): Path<(Uuid, Uuid)>,
    Json(body): Json<AddParticipant>,
) -> ApiResult<Response> {
    // Access first: a conversation the caller cannot see is a 404 whatever the body says.
    let access = access(&app, &caller, org, id, Permission::ConversationsWrite).await?;
    require_active_members(&app, org, &[body.user_id]).await?;
    let answer = StatusCode::CREATED;
    command_as(&app, &caller, org, id, access, answer, |actor| {
        ConversationCommand::AddParticipant {
            user_id: body.user_id,
            role: body.role,
            actor,
        }
    })
    .await
}

/// Removes a participant; removing oneself is leaving.
pub async fn remove_participant(
    State(app): State<App>,
    caller: Caller,
    Path((org, id, user)): Path<(Uuid, Uuid, Uuid)>,
    _: super::NoBody,
) -> ApiResult<StatusCode> {
    let access = access(&app, &caller, org, id, Permission::ConversationsWrite).await?;
    let command = ConversationCommand::RemoveParticipant {
        user_id: user,
        actor: access.actor,
    };
    app.execute(
        &app.cqrs.conversations,
        id,
        Some(org),
        &caller.actor,
        command,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateParticipant {
    #[serde(default, deserialize_with = "super::not_null")]
    #[schemars(transform = super::absent_not_null)]
    role: Option<ParticipantRole>,
    #[serde(default, deserialize_with = "super::not_null")]
    #[schemars(transform = super::absent_not_null)]
    muted: Option<bool>,
}

/// Changes a participant's role (the owner's right; an active user's only), or mutes or
/// unmutes (one's own).
pub async fn update_participant(
    State(app): State<App>,
    caller: Caller,
    Path((org, id, user)): Path<(Uuid, Uuid, Uuid)>,
    Json(body): Json<UpdateParticipant>,
) -> ApiResult<Response> {
    // Access first: a conversation the caller cannot see is a 404 whatever the body says.
    let access = access(&app, &caller, org, id, Permission::ConversationsWrite).await?;
    // Two commands would be two appends: the first could stand while the second is refused.
    if body.role.is_some() == body.muted.is_some() {
        return Err(ApiError::invalid(
            "give either a role (the owner's right) or muted (one's own), one per request",
        ));
    }
    if body.muted.is_some() && access.user_id() != Some(user) {
        return Err(ApiError::forbidden(
            "muting is personal: a user key mutes only its own user",
        ));
    }
    if let Some(role) = body.role {
        // A role is given as adding gives one, to an active user only, whatever the role:
        // an owner or admin who cannot act would leave the conversation without a working
        // one, and an inactive participant needs no say in it (remove it instead).
        require_active_members(&app, org, &[user]).await?;
        let command = ConversationCommand::ChangeRole {
            user_id: user,
            role,
            actor: access.actor,
        };
        app.execute(
            &app.cqrs.conversations,
            id,
            Some(org),
            &caller.actor,
            command,
        )
        .await?;
    }
    if let Some(muted) = body.muted {
        let command = if muted {
            ConversationCommand::Mute { user_id: user }
        } else {
            ConversationCommand::Unmute { user_id: user }
        };
        app.execute(
            &app.cqrs.conversations,
            id,
            Some(org),
            &caller.actor,
            command,
        )
        .await?;
    }
    changed(&app, &caller, org, id, StatusCode::OK).await
}
