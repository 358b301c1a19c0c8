//! `/v1/organizations/{org}/conversations/{id}/messages`: post, page through (newest first,
//! optionally one thread), edit, delete, react, and mark read.
//!
//! Content is sealed under a key of the message's own, wrapped by its author's key, before
//! it reaches an event; it is opened only on the way out. Every message command is decided
//! against the conversation's version and guarded by it, so a post cannot slip in after its
//! author was removed or the conversation archived; a stale guard is retried here.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use ledgerline_aggregates::message::{
    Message, MessageActor, MessageCommand, MessageError, MessageEvent, NewAttachment, ParentFacts,
    MAX_CONTENT_BYTES,
};
use ledgerline_aggregates::{validate, Permission};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sqlx::types::Json as SqlJson;
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::answers::PageOf;
use super::auth::Caller;
use super::conversations::{access, access_for, require_active_members, Access, UNREAD};
use super::error::{ApiError, ApiResult};
use super::extract::{Json, Path, Query};
use super::page;
use crate::app::{App, CommandError, Created};
use crate::crypto::DataKey;
use crate::ledger::Appended;

/// How often a message command is decided again when its conversation changed meanwhile.
const STALE_RETRIES: usize = 3;
/// How often a command on a message is decided again when another command on that message
/// took the sequence number first (read marks and reactions: many people at once on a
/// popular message). Within a process they take turns (`aggregate_locks`), so this is mostly
/// for commands through other `serve` processes: one of those racing lands in each commit, so
/// this many can land together; past it, the rest are 409.
const CONFLICT_RETRIES: usize = 64;
/// The longest pause before the n-th of those is n times this (ms), each drawn at random.
const CONFLICT_PAUSE_MS: u64 = 2;
const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;

#[derive(Debug, Deserialize)]
struct AttachmentRow {
    file_name: Option<String>,
    mime_type: String,
    size_bytes: i64,
    blake3: String,
}

#[derive(Debug, Deserialize)]
struct ReactionRow {
    emoji: String,
    user_id: Uuid,
}

#[derive(Debug, sqlx::FromRow)]
struct MessageRow {
    id: Uuid,
    conversation_id: Uuid,
    author_id: Uuid,
    parent_message_id: Option<Uuid>,
    thread_root_id: Option<Uuid>,
    content_sealed: Option<String>,
    position: i64,
    created_at: DateTime<Utc>,
    edited_at: Option<DateTime<Utc>>,
    deleted_at: Option<DateTime<Utc>>,
    attachments: SqlJson<Vec<AttachmentRow>>,
    reactions: SqlJson<Vec<ReactionRow>>,
    /// The message's wrapped key and its author's; absent once deleted or erased.
    message_key: Option<Vec<u8>>,
    key_author: Option<Uuid>,
    author_key: Option<Vec<u8>>,
}

/// One page's rows with their attachments, reactions and keys, in one statement.
const SELECT: &str = "SELECT m.id, m.conversation_id, m.author_id, m.parent_message_id, \
     m.thread_root_id, m.content_sealed, m.position, m.created_at, m.edited_at, m.deleted_at, \
     COALESCE((SELECT json_agg(json_build_object('file_name', a.file_name_sealed, \
        'mime_type', a.mime_type, 'size_bytes', a.size_bytes, 'blake3', a.blake3) ORDER BY a.ordinal) \
        FROM message_attachments a WHERE a.message_id = m.id), '[]') AS attachments, \
     COALESCE((SELECT json_agg(json_build_object('emoji', r.emoji, 'user_id', r.user_id) \
        ORDER BY r.created_at, r.user_id) \
        FROM message_reactions r WHERE r.message_id = m.id), '[]') AS reactions, \
     mk.wrapped_key AS message_key, mk.author_id AS key_author, sk.wrapped_key AS author_key \
     FROM messages m LEFT JOIN message_keys mk ON mk.message_id = m.id \
     LEFT JOIN subject_keys sk ON sk.subject_id = mk.author_id";

#[derive(Debug, Serialize, JsonSchema)]
pub struct AttachmentView {
    /// `null` once the message is deleted or its author erased.
    pub file_name: Option<String>,
    pub mime_type: String,
    pub size_bytes: i64,
    pub blake3: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ReactionView {
    pub emoji: String,
    pub count: usize,
    pub user_ids: Vec<Uuid>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct MessageView {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub author_id: Uuid,
    pub parent_message_id: Option<Uuid>,
    pub thread_root_id: Option<Uuid>,
    /// `null` unless `content_status` is `present`.
    pub content: Option<String>,
    /// `present`, `deleted` (the message was deleted) or `erased` (its author was).
    #[schemars(extend("enum" = ["present", "deleted", "erased"]))]
    pub content_status: &'static str,
    pub attachments: Vec<AttachmentView>,
    pub reactions: Vec<ReactionView>,
    /// The message's ledger position: the conversation's order and the page cursor.
    pub position: i64,
    pub created_at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
}

fn attachment_field(index: usize) -> String {
    format!("attachment:{index}:file_name")
}

/// Opens a page of rows with the keys read with them.
fn open(app: &App, mut rows: Vec<MessageRow>) -> Vec<MessageView> {
    let keys: HashMap<Uuid, DataKey> =
        app.vault.open_message_keys(rows.iter_mut().filter_map(|r| {
            Some((
                r.id,
                r.message_key.take()?,
                r.key_author?,
                r.author_key.take()?,
            ))
        }));
    rows.into_iter()
        .map(|r| {
            let content = r
                .content_sealed
                .as_deref()
                .and_then(|s| app.vault.open(&keys, "content", s));
            let content_status = match (&r.deleted_at, &content) {
                (Some(_), _) => "deleted",
                (None, Some(_)) => "present",
                (None, None) => "erased",
            };
            let mut reactions: Vec<ReactionView> = Vec::new();
            for ReactionRow { emoji, user_id } in r.reactions.0 {
                match reactions.iter_mut().find(|v| v.emoji == emoji) {
                    Some(v) => {
                        v.count += 1;
                        v.user_ids.push(user_id);
                    }
                    None => reactions.push(ReactionView {
                        emoji,
                        count: 1,
                        user_ids: vec![user_id],
                    }),
                }
            }
            MessageView {
                attachments: r
                    .attachments
                    .0
                    .into_iter()
                    .enumerate()
                    .map(|(i, a)| AttachmentView {
                        file_name: a
                            .file_name
                            .and_then(|s| app.vault.open(&keys, &attachment_field(i), &s)),
                        mime_type: a.mime_type,
                        size_bytes: a.size_bytes,
                        blake3: a.blake3,
                    })
                    .collect(),
                id: r.id,
                conversation_id: r.conversation_id,
                author_id: r.author_id,
                parent_message_id: r.parent_message_id,
                thread_root_id: r.thread_root_id,
                content,
                content_status,
                reactions,
                position: r.position,
                created_at: r.created_at,
                edited_at: r.edited_at,
                deleted_at: r.deleted_at,
            }
        })
        .collect()
}

/// A change's answer ([`super::changed_answer`]): the message as it now is, or its id alone
/// to a key that may change it but not read it (nor, so, its text or who reacted).
async fn changed(
    app: &App,
    caller: &Caller,
    (org, conversation, id): (Uuid, Uuid, Uuid),
) -> ApiResult<Response> {
    let found = async {
        caller.require_in(org, Permission::ConversationsRead)?;
        find(app, conversation, id).await
    };
    super::changed_answer(StatusCode::OK, found.await, id)
}

/// The message `id` of conversation `conversation`, or a 404.
async fn find(app: &App, conversation: Uuid, id: Uuid) -> ApiResult<MessageView> {
    let row: MessageRow = sqlx::query_as(&format!(
        "{SELECT} WHERE m.id = $1 AND m.conversation_id = $2"
    ))
    .bind(id)
    .bind(conversation)
    .fetch_optional(&app.pool)
    .await?
    .ok_or_else(|| ApiError::not_found("message"))?;
    Ok(open(app, vec![row]).remove(0))
}

/// After a post: when it failed but the message exists after all (its commit went through
/// and only the answer was lost), it is a success; otherwise the message never came to be
/// and its key, which protects nothing, goes.
async fn settle<T>(
    app: &App,
    org: Uuid,
    id: Uuid,
    outcome: ApiResult<Option<T>>,
) -> ApiResult<Option<T>> {
    if outcome.is_ok() {
        return outcome;
    }
    if super::created(&app.pool, Message::TYPE, id, org).await? {
        // The writer may not have published the head of a commit whose answer it lost.
        app.await_ledger_for_answer().await;
        return Ok(None);
    }
    app.vault.destroy_message_key(&app.pool, id).await?;
    outcome
}

/// Which message a command is for.
#[derive(Clone, Copy)]
struct Target {
    org: Uuid,
    conversation: Uuid,
    message: Uuid,
    /// `message` is a post's, its id made by this request: there are no events to load.
    fresh: bool,
}

/// Decides and appends one message command against the handler's read of its conversation
/// (`first`); when the conversation (or the message) changed in between, reads it again and
/// decides again. For a post (`fresh`), what it appended.
async fn run(
    app: &App,
    caller: &Caller,
    Target {
        org,
        conversation,
        message,
        fresh,
    }: Target,
    permission: Permission,
    on_behalf: Option<Uuid>,
    first: Access,
    mut make: impl FnMut(&Access) -> ApiResult<MessageCommand>,
) -> ApiResult<Option<Created<Message>>> {
    // The guard catches any change to the conversation since `first` was read.
    let mut access = first;
    let (mut attempt, mut conflicts) = (0, 0);
    loop {
        let command = make(&access)?;
        let (actor, guard) = (&caller.actor, Some(access.guard()));
        let outcome = if fresh {
            app.execute_fresh(message, Some(org), actor, guard, command)
                .await
                .map(Some)
        } else {
            app.execute_guarded(
                &app.cqrs.messages,
                message,
                Some(org),
                actor,
                guard,
                command,
            )
            .await
            .map(|()| None)
        };
        match outcome {
            // A post's id taken (a conflict) stays taken: not retried.
            taken @ Err(CommandError::Conflict) if fresh => return taken.map_err(ApiError::from),
            // Only the message moved (its conversation did not, or the guard would say so),
            // usually through another process, or through a request of this one dropped
            // mid-append, which let its turn go: decided again on the message as the log now
            // holds it, after a random pause that grows with the losses, so that those who
            // lost do not all come back to the same commit (each reload reads the message's
            // whole stream).
            Err(CommandError::Conflict) if conflicts < CONFLICT_RETRIES => {
                conflicts += 1;
                let most = CONFLICT_PAUSE_MS * conflicts as u64;
                let pause = rand::Rng::gen_range(&mut rand::thread_rng(), 0..=most);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
            Err(CommandError::Stale(_)) if attempt < STALE_RETRIES => {
                attempt += 1;
                app.await_ledger().await;
                access = access_for(app, caller, org, conversation, permission, on_behalf).await?;
            }
            // Another request (a second device, say) marked it first: what was asked holds.
            Err(CommandError::Rejected(MessageError::AlreadyRead)) => return Ok(None),
            other => return other.map_err(ApiError::from),
        }
    }
}

/// The acting user of a command only a user can give (react, read, edit).
fn user_only(access: &Access, what: &str) -> ApiResult<Uuid> {
    match access.user_id() {
        Some(u) => Ok(u),
        None => Err(ApiError::forbidden(format!(
            "{what} belongs to a user: use the user's own key, not a service key"
        ))),
    }
}

/// A message's text, before it is sealed: its size, then [`validate::message_text`].
fn check_content(content: &str) -> ApiResult<()> {
    if content.len() > MAX_CONTENT_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "message content is {} bytes; the limit is {MAX_CONTENT_BYTES} bytes",
                content.len()
            ),
        ));
    }
    validate::message_text(content).map_err(ApiError::invalid)
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAttachmentBody {
    file_name: String,
    mime_type: String,
    size_bytes: i64,
    blake3: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostMessage {
    /// The text; empty only when `attachments` are given.
    content: String,
    parent_message_id: Option<Uuid>,
    #[serde(default)]
    attachments: Vec<NewAttachmentBody>,
    /// Required for a service key, which posts on a participant's behalf; a user key posts
    /// as its own user.
    author_id: Option<Uuid>,
}

pub async fn post(
    State(app): State<App>,
    caller: Caller,
    Path((org, conversation)): Path<(Uuid, Uuid)>,
    Json(body): Json<PostMessage>,
) -> ApiResult<Response> {
    let author = match (caller.user_id, body.author_id) {
        (Some(user), None) => Ok(user),
        (Some(user), Some(a)) if a == user => Ok(user),
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "author_id: a user key posts as its own user",
        )),
        (None, Some(a)) => Ok(a),
        (None, None) => Err(ApiError::invalid(
            "author_id is required when a service key posts",
        )),
    };
    // Read as the author's, so that it serves as the post's first decision too; a missing
    // conversation and an oversized content are reported before a bad author, as they were
    // when this read came first. The author's data key is read beside it, one round trip
    // fewer in a queue for the database (discarded when the post is refused); not before
    // the key may act in this organization at all.
    caller.require_in(org, Permission::ConversationsWrite)?;
    let (first, author_key) = tokio::join!(
        access_for(
            &app,
            &caller,
            org,
            conversation,
            Permission::ConversationsWrite,
            author.as_ref().ok().copied(),
        ),
        async {
            match author.as_ref() {
                Ok(&a) => app.vault.author_key(&app.pool, a, org).await,
                Err(_) => Ok(None),
            }
        }
    );
    let first = first?;
    check_content(&body.content)?;
    let author = author?;
    let author_key = author_key?;
    // A service key's author must be an active user. A user key's is: its key passed
    // authentication, which refuses inactive users, and `access_for` found it taking part.
    if caller.user_id.is_none() {
        require_active_members(&app, org, &[author]).await?;
    }
    let names = body
        .attachments
        .iter()
        .map(|a| validate::name("attachment file_name", &a.file_name))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::invalid)?;
    let parent = match body.parent_message_id {
        None => None,
        Some(p) => {
            // Looked up within this conversation only: whether a message exists elsewhere
            // is not the caller's to learn.
            let found: Option<(Uuid, Option<Uuid>)> = sqlx::query_as(
                "SELECT conversation_id, thread_root_id FROM messages \
                 WHERE id = $1 AND conversation_id = $2",
            )
            .bind(p)
            .bind(conversation)
            .fetch_optional(&app.pool)
            .await?;
            let (conversation_id, thread_root_id) = found.ok_or_else(|| {
                ApiError::invalid("parent_message_id must be a message of this conversation")
            })?;
            Some(ParentFacts {
                message_id: p,
                conversation_id,
                thread_root_id,
            })
        }
    };
    // Time-ordered (version 7): a new id lands beside the last ones in the indexes keyed by it
    // (the log's primary key, as the aggregate's id, and those of messages, keys, attachments,
    // reactions, receipts and the audit view), where a random one lands anywhere, costing page
    // reads and splits on every post and in every rebuild. The time it carries is about the
    // message's `created_at`, shown anyway; it is no secret (every read checks the conversation).
    let id = Uuid::now_v7();
    // From the key's creation to its fate, in a task of its own: a client hanging up must not
    // stop the handler halfway and leave a key behind that protects nothing.
    let task = {
        let (app, caller) = (app.clone(), caller.clone());
        super::to_the_end(async move {
            let erased = || ApiError::conflict("the author's data key is gone (erased)");
            let author_key = author_key.ok_or_else(erased)?;
            let key = app
                .vault
                .store_message_key(&app.pool, id, author, &author_key, org)
                .await?
                .ok_or_else(erased)?;
            let target = Target {
                org,
                conversation,
                message: id,
                fresh: true,
            };
            let outcome = run(
                &app,
                &caller,
                target,
                Permission::ConversationsWrite,
                Some(author),
                first,
                |access| {
                    Ok(MessageCommand::Post {
                        message_id: id,
                        conversation: access.facts(),
                        author_id: author,
                        content: app.vault.seal(&key, id, "content", &body.content),
                        content_bytes: body.content.len(),
                        parent: parent.clone(),
                        attachments: body
                            .attachments
                            .iter()
                            .zip(&names)
                            .enumerate()
                            .map(|(i, (a, name))| NewAttachment {
                                file_name: app.vault.seal(&key, id, &attachment_field(i), name),
                                mime_type: a.mime_type.clone(),
                                size_bytes: a.size_bytes,
                                blake3: a.blake3.clone(),
                            })
                            .collect(),
                    })
                },
            )
            .await;
            let created = settle(&app, org, id, outcome).await?;
            // Once the read models show the post, a read of it would show what it appended
            // and the text it sealed: the answer is made from those, without the read.
            Ok(created
                .filter(|c| app.read_models_show(c.appended.position))
                .and_then(|c| posted(c, body.content, names)))
        })
    };
    match task.await? {
        Some(view) => super::created_answer(Ok(view), id),
        // The read models do not show it (yet: 202), or its answer was lost on the way.
        None => super::created_answer(find(&app, conversation, id).await, id),
    }
}

/// The view a read of a post's message gives while nothing has happened to it since: from
/// the `MessagePosted` it appended (its one event, so the position is its own), its text and
/// its attachments' names (as sealed in it). Like any command's answer it is the message as
/// the command left it: an edit or deletion by someone else in the moment between the read
/// models showing the post and this answer is not in it, as it was not in the answer read
/// back once that read was done.
fn posted(created: Created<Message>, content: String, names: Vec<String>) -> Option<MessageView> {
    let Appended {
        position,
        recorded_at,
    } = created.appended;
    let [MessageEvent::MessagePosted {
        message_id,
        conversation_id,
        author_id,
        parent_message_id,
        thread_root_id,
        attachments,
        ..
    }] = <[MessageEvent; 1]>::try_from(created.events).ok()?
    else {
        return None;
    };
    Some(MessageView {
        id: message_id,
        conversation_id,
        author_id,
        parent_message_id,
        thread_root_id,
        content: Some(content),
        content_status: "present",
        attachments: attachments
            .into_iter()
            .zip(names)
            .map(|(a, name)| AttachmentView {
                file_name: Some(name),
                mime_type: a.mime_type,
                size_bytes: a.size_bytes,
                blake3: a.blake3,
            })
            .collect(),
        reactions: Vec::new(),
        position,
        created_at: recorded_at,
        edited_at: None,
        deleted_at: None,
    })
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// The `next_cursor` of the previous page: only messages older than it.
    cursor: Option<i64>,
    limit: Option<i64>,
    /// One thread: its root message and every reply in it.
    thread: Option<Uuid>,
}

/// Newest first, `limit` at a time, from an index on (conversation, position).
pub async fn list(
    State(app): State<App>,
    caller: Caller,
    Path((org, conversation)): Path<(Uuid, Uuid)>,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<PageOf<MessageView>>> {
    access(
        &app,
        &caller,
        org,
        conversation,
        Permission::ConversationsRead,
    )
    .await?;
    let limit = page::limit(q.limit, DEFAULT_PAGE, MAX_PAGE)?;
    // Only the conditions in use, so that each shape gets a plan that uses its index (a
    // cached generic plan for "$2 IS NULL OR position < $2" would scan from the newest row).
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(SELECT);
    sql.push(" WHERE m.conversation_id = ")
        .push_bind(conversation);
    if let Some(cursor) = q.cursor {
        sql.push(" AND m.position < ").push_bind(cursor);
    }
    if let Some(root) = q.thread {
        // From the thread's own index, not by filtering the whole conversation.
        sql.push(" AND m.id IN (SELECT t.id FROM messages t WHERE t.thread_root_id = ")
            .push_bind(root)
            .push(" UNION ALL SELECT ")
            .push_bind(root)
            .push(")");
    }
    sql.push(" ORDER BY m.position DESC LIMIT ")
        .push_bind(limit + 1);
    let mut rows: Vec<MessageRow> = sql.build_query_as().fetch_all(&app.pool).await?;
    // Cut before opening: the extra row is not decrypted.
    let next_cursor = page::cut(&mut rows, limit, |m| m.position);
    Ok(page::answer(open(&app, rows), next_cursor))
}

pub async fn get(
    State(app): State<App>,
    caller: Caller,
    Path((org, conversation, message)): Path<(Uuid, Uuid, Uuid)>,
) -> ApiResult<axum::Json<MessageView>> {
    access(
        &app,
        &caller,
        org,
        conversation,
        Permission::ConversationsRead,
    )
    .await?;
    Ok(axum::Json(find(&app, conversation, message).await?))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EditMessage {
    /// The new text; empty only in a message with attachments.
    content: String,
}

/// The author edits; the content is sealed again under the message's key.
pub async fn edit(
    State(app): State<App>,
    caller: Caller,
    Path((org, conversation, message)): Path<(Uuid, Uuid, Uuid)>,
    Json(body): Json<EditMessage>,
) -> ApiResult<Response> {
    let first = access(
        &app,
        &caller,
        org,
        conversation,
        Permission::ConversationsWrite,
    )
    .await?;
    let current = find(&app, conversation, message).await?;
    check_content(&body.content)?;
    // Only here, with the content opened, can an edit that changes nothing be told apart.
    let unchanged = current.content.as_deref() == Some(body.content.as_str());
    let key = app
        .vault
        .message_keys(&app.pool, &[message])
        .await?
        .remove(&message)
        .ok_or_else(|| ApiError::conflict("the message's content is gone (deleted or erased)"))?;
    run(
        &app,
        &caller,
        Target {
            org,
            conversation,
            message,
            fresh: false,
        },
        Permission::ConversationsWrite,
        None,
        first,
        |access| {
            Ok(MessageCommand::Edit {
                conversation: access.facts(),
                editor_id: user_only(access, "editing a message")?,
                content: app.vault.seal(&key, message, "content", &body.content),
                content_bytes: body.content.len(),
                unchanged,
            })
        },
    )
    .await?;
    changed(&app, &caller, (org, conversation, message)).await
}

/// The author, a conversation owner or admin, or a service key deletes: the message's key
/// is destroyed, so its content is unrecoverable while its events stay in the chain.
pub async fn delete(
    State(app): State<App>,
    caller: Caller,
    Path((org, conversation, message)): Path<(Uuid, Uuid, Uuid)>,
    _: super::NoBody,
) -> ApiResult<StatusCode> {
    let first = access(
        &app,
        &caller,
        org,
        conversation,
        Permission::ConversationsWrite,
    )
    .await?;
    find(&app, conversation, message).await?;
    // From the append to the key's end in a task of its own, so a client hanging up cannot
    // leave a deleted message's key in place.
    let task = {
        let app = app.clone();
        super::to_the_end(async move {
            let target = Target {
                org,
                conversation,
                message,
                fresh: false,
            };
            let outcome = run(
                &app,
                &caller,
                target,
                Permission::ConversationsWrite,
                None,
                first,
                |access| {
                    Ok(MessageCommand::Delete {
                        conversation: access.facts(),
                        actor: match access.user_id() {
                            Some(u) => MessageActor::User(u),
                            None => MessageActor::Service,
                        },
                    })
                },
            )
            .await;
            // Also here, so the content is gone even while the projection is behind or
            // stopped; and whenever the ledger holds the deletion, so that a retry ("already
            // deleted") finishes a deletion whose answer was lost or whose handler stopped.
            if outcome.is_ok()
                || super::recorded(&app, Message::TYPE, message, "MessageDeleted").await?
            {
                app.vault.destroy_message_key(&app.pool, message).await?;
                super::idempotency::forget_answers_naming(&app.pool, message, &caller).await?;
            }
            outcome.map(drop)
        })
    };
    task.await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn reaction(
    app: &App,
    caller: &Caller,
    (org, conversation, message, emoji): (Uuid, Uuid, Uuid, String),
    add: bool,
) -> ApiResult<Response> {
    let first = access(
        app,
        caller,
        org,
        conversation,
        Permission::ConversationsWrite,
    )
    .await?;
    find(app, conversation, message).await?;
    run(
        app,
        caller,
        Target {
            org,
            conversation,
            message,
            fresh: false,
        },
        Permission::ConversationsWrite,
        None,
        first,
        |access| {
            let user_id = user_only(access, "a reaction")?;
            let conversation = access.facts();
            let emoji = emoji.clone();
            Ok(if add {
                MessageCommand::React {
                    conversation,
                    user_id,
                    emoji,
                }
            } else {
                MessageCommand::Unreact {
                    conversation,
                    user_id,
                    emoji,
                }
            })
        },
    )
    .await?;
    changed(app, caller, (org, conversation, message)).await
}

pub async fn react(
    State(app): State<App>,
    caller: Caller,
    Path(path): Path<(Uuid, Uuid, Uuid, String)>,
    _: super::NoBody,
) -> ApiResult<Response> {
    reaction(&app, &caller, path, true).await
}

pub async fn unreact(
    State(app): State<App>,
    caller: Caller,
    Path(path): Path<(Uuid, Uuid, Uuid, String)>,
    _: super::NoBody,
) -> ApiResult<Response> {
    reaction(&app, &caller, path, false).await
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkRead {
    /// Everything up to and including this message is read.
    message_id: Uuid,
}

#[derive(Debug, Serialize, JsonSchema, sqlx::FromRow)]
pub struct ReadState {
    pub conversation_id: Uuid,
    pub last_read_message_id: Option<Uuid>,
    pub last_read_at: Option<DateTime<Utc>>,
    pub unread_count: i64,
}

async fn read_state(app: &App, conversation: Uuid, user: Uuid) -> ApiResult<ReadState> {
    sqlx::query_as(&format!(
        "SELECT p.conversation_id, p.last_read_message_id, p.last_read_at, \
             {UNREAD} AS unread_count \
             FROM conversation_participants p WHERE p.conversation_id = $1 AND p.user_id = $2"
    ))
    .bind(conversation)
    .bind(user)
    .fetch_optional(&app.pool)
    .await?
    .ok_or_else(|| ApiError::not_found("conversation"))
}

/// Marks the conversation read up to a message. Marking a message at or before the current
/// mark changes nothing and appends nothing: the answer is the current state.
pub async fn mark_read(
    State(app): State<App>,
    caller: Caller,
    Path((org, conversation)): Path<(Uuid, Uuid)>,
    Json(body): Json<MarkRead>,
) -> ApiResult<axum::Json<ReadState>> {
    let first = access(
        &app,
        &caller,
        org,
        conversation,
        Permission::ConversationsRead,
    )
    .await?;
    let user = user_only(&first, "a read mark")?;
    let marks: Option<(i64, i64)> = sqlx::query_as(
        "SELECT m.position, p.last_read_position FROM messages m \
         JOIN conversation_participants p ON p.conversation_id = m.conversation_id AND p.user_id = $3 \
         WHERE m.id = $1 AND m.conversation_id = $2",
    )
    .bind(body.message_id)
    .bind(conversation)
    .bind(user)
    .fetch_optional(&app.pool)
    .await?;
    let (position, last_read) = marks
        .ok_or_else(|| ApiError::invalid("message_id must be a message of this conversation"))?;
    if position > last_read {
        run(
            &app,
            &caller,
            Target {
                org,
                conversation,
                message: body.message_id,
                fresh: false,
            },
            Permission::ConversationsRead,
            None,
            first,
            |access| {
                Ok(MessageCommand::MarkRead {
                    conversation: access.facts(),
                    user_id: user_only(access, "a read mark")?,
                })
            },
        )
        .await?;
    }
    Ok(axum::Json(read_state(&app, conversation, user).await?))
}
