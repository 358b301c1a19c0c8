//! The `messaging` read model: conversations and their participants, messages with their
//! attachments, reactions and read marks. Deleting a message, or erasing its author, also
//! destroys message keys (crypto-shredding), in the same transaction as the checkpoint.
//!
//! Posts, reactions and read marks are the traffic, so each is applied with one statement:
//! data-modifying CTEs write every table it touches (moving the message's version and
//! yielding the facts the rest needs), and the final part's row count says whether the
//! message, or for a post its conversation, was there at all. Deletion is rare and takes one
//! statement per table, so that a mismatch names its table.

use ledgerline_aggregates::conversation::ConversationEvent;
use ledgerline_aggregates::message::{Attachment, MessageEvent};
use ledgerline_aggregates::user::UserEvent;
use sqlx::postgres::PgQueryResult;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::decode::{self, one_row};
use crate::{ProjectionError, StoredEvent};

pub const NAME: &str = "messaging";
/// What a rebuild empties. Not `message_keys`: the service layer writes it and this
/// projection only ever deletes from it, so a rebuild must neither empty it nor could it
/// bring back a destroyed key.
pub const TABLES: &[&str] = &[
    "conversations",
    "conversation_participants",
    "messages",
    "message_attachments",
    "message_reactions",
    "message_reads",
];

pub async fn apply(conn: &mut PgConnection, event: &StoredEvent) -> Result<(), ProjectionError> {
    match event.aggregate_type.as_str() {
        "Conversation" => apply_conversation_event(conn, event, 0).await,
        "Message" => apply_message_event(conn, event).await,
        // Of a user's events only erasure matters here; the others are not even decoded, so
        // that one this projection has no use for cannot stop it.
        "User" if event.event_type == "UserErased" => {
            if let UserEvent::UserErased { .. } = decode::payload::<UserEvent>(event)? {
                // The author's data key is gone already (users projection), so their
                // messages are unreadable; no wrapped message key should outlive it.
                sqlx::query("DELETE FROM message_keys WHERE author_id = $1")
                    .bind(decode::aggregate_id(event)?)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Applies a Conversation event. `unwritten_newest` is the position of the conversation's
/// newest post that comes before this event in the log but is not in `messages` yet (the
/// multi-row path holds posts back; 0 when there is none): a newcomer's read mark starts
/// there when it is past every written message.
pub(crate) async fn apply_conversation_event(
    conn: &mut PgConnection,
    event: &StoredEvent,
    unwritten_newest: i64,
) -> Result<(), ProjectionError> {
    let id = decode::aggregate_id(event)?;
    let at = event.recorded_at;
    let seq = event.sequence;
    let (result, table) = match decode::payload::<ConversationEvent>(event)? {
        ConversationEvent::ConversationCreated {
            conversation_id,
            organization_id,
            kind,
            spec,
            created_by,
            participants,
        } => {
            if conversation_id != id {
                return Err(ProjectionError::inconsistent(
                    event.position,
                    format!("ConversationCreated names {conversation_id} in aggregate {id}"),
                ));
            }
            sqlx::query(
                "INSERT INTO conversations (id, organization_id, kind, title, description, \
                 created_by, status, created_at, updated_at, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $7, $8)",
            )
            .bind(id)
            .bind(organization_id)
            .bind(kind.as_str())
            .bind(&spec.title)
            .bind(&spec.description)
            .bind(created_by)
            .bind(at)
            .bind(seq)
            .execute(&mut *conn)
            .await?;
            let (users, roles): (Vec<Uuid>, Vec<&str>) = participants
                .iter()
                .map(|m| (m.user_id, m.role.as_str()))
                .unzip();
            sqlx::query(
                "INSERT INTO conversation_participants (conversation_id, user_id, \
                 organization_id, role, joined_at) \
                 SELECT $1, p.user_id, $2, p.role, $3 \
                 FROM unnest($4::uuid[], $5::text[]) AS p(user_id, role)",
            )
            .bind(id)
            .bind(organization_id)
            .bind(at)
            .bind(users)
            .bind(roles)
            .execute(&mut *conn)
            .await?;
            return Ok(());
        }
        ConversationEvent::ConversationUpdated { after, .. } => {
            let result = sqlx::query(
                "UPDATE conversations SET title = $2, description = $3, updated_at = $4, \
                 version = $5 WHERE id = $1",
            )
            .bind(id)
            .bind(&after.title)
            .bind(&after.description)
            .bind(at)
            .bind(seq)
            .execute(&mut *conn)
            .await?;
            (result, "conversations")
        }
        ConversationEvent::ConversationArchived {} => {
            let result = sqlx::query(
                "UPDATE conversations SET status = 'archived', archived_at = $2, \
                 updated_at = $2, version = $3 WHERE id = $1",
            )
            .bind(id)
            .bind(at)
            .bind(seq)
            .execute(&mut *conn)
            .await?;
            (result, "conversations")
        }
        ConversationEvent::ConversationUnarchived {} => {
            let result = sqlx::query(
                "UPDATE conversations SET status = 'active', archived_at = NULL, \
                 updated_at = $2, version = $3 WHERE id = $1",
            )
            .bind(id)
            .bind(at)
            .bind(seq)
            .execute(&mut *conn)
            .await?;
            (result, "conversations")
        }
        ConversationEvent::ParticipantAdded { user_id, role } => {
            touch_conversation(conn, event, id).await?;
            // A newcomer starts with the history behind it read, so that joining a long
            // channel does not show (and count) its whole past as unread. The newest message
            // is known from this projection's own table, as of this event: rebuilds agree.
            let result = sqlx::query(
                "INSERT INTO conversation_participants (conversation_id, user_id, \
                 organization_id, role, joined_at, last_read_position) \
                 SELECT c.id, $2, c.organization_id, $3, $4, GREATEST($5, COALESCE(( \
                 SELECT max(m.position) FROM messages m WHERE m.conversation_id = c.id), 0)) \
                 FROM conversations c WHERE c.id = $1",
            )
            .bind(id)
            .bind(user_id)
            .bind(role.as_str())
            .bind(at)
            .bind(unwritten_newest)
            .execute(&mut *conn)
            .await?;
            (result, "conversation_participants")
        }
        ConversationEvent::ParticipantRemoved { user_id, .. } => {
            touch_conversation(conn, event, id).await?;
            let result = sqlx::query(
                "DELETE FROM conversation_participants \
                 WHERE conversation_id = $1 AND user_id = $2",
            )
            .bind(id)
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
            (result, "conversation_participants")
        }
        ConversationEvent::ParticipantRoleChanged { user_id, after, .. } => {
            touch_conversation(conn, event, id).await?;
            let result = sqlx::query(
                "UPDATE conversation_participants SET role = $3 \
                 WHERE conversation_id = $1 AND user_id = $2",
            )
            .bind(id)
            .bind(user_id)
            .bind(after.as_str())
            .execute(&mut *conn)
            .await?;
            (result, "conversation_participants")
        }
        ConversationEvent::ParticipantMuted { user_id } => {
            touch_conversation(conn, event, id).await?;
            set_muted(conn, id, user_id, true).await?
        }
        ConversationEvent::ParticipantUnmuted { user_id } => {
            touch_conversation(conn, event, id).await?;
            set_muted(conn, id, user_id, false).await?
        }
    };
    one_row(event, result, table)
}

/// Moves the conversation's version and update time, as every Conversation event does: the
/// version is what a message command's guard compares against.
async fn touch_conversation(
    conn: &mut PgConnection,
    event: &StoredEvent,
    id: Uuid,
) -> Result<(), ProjectionError> {
    let result =
        sqlx::query("UPDATE conversations SET updated_at = $2, version = $3 WHERE id = $1")
            .bind(id)
            .bind(event.recorded_at)
            .bind(event.sequence)
            .execute(&mut *conn)
            .await?;
    one_row(event, result, "conversations")
}

async fn set_muted(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    user_id: Uuid,
    muted: bool,
) -> Result<(PgQueryResult, &'static str), ProjectionError> {
    let result = sqlx::query(
        "UPDATE conversation_participants SET muted = $3 \
         WHERE conversation_id = $1 AND user_id = $2",
    )
    .bind(conversation_id)
    .bind(user_id)
    .bind(muted)
    .execute(&mut *conn)
    .await?;
    Ok((result, "conversation_participants"))
}

async fn apply_message_event(
    conn: &mut PgConnection,
    event: &StoredEvent,
) -> Result<(), ProjectionError> {
    let id = decode::aggregate_id(event)?;
    let at = event.recorded_at;
    let seq = event.sequence;
    let (result, table) = match decode::payload::<MessageEvent>(event)? {
        MessageEvent::MessagePosted {
            message_id,
            conversation_id,
            organization_id,
            author_id,
            content,
            parent_message_id,
            thread_root_id,
            attachments,
        } => {
            if message_id != id {
                return Err(ProjectionError::inconsistent(
                    event.position,
                    format!("MessagePosted names {message_id} in aggregate {id}"),
                ));
            }
            let columns = Columns::of(&attachments);
            // The conversation's version and updated_at are left alone: they are the
            // Conversation aggregate's, and a post is not one of its events.
            let result = sqlx::query(
                "WITH message AS ( \
                     INSERT INTO messages (id, conversation_id, organization_id, author_id, \
                     parent_message_id, thread_root_id, content_sealed, position, created_at, \
                     version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ), attachments AS ( \
                     INSERT INTO message_attachments (message_id, ordinal, organization_id, \
                     file_name_sealed, mime_type, size_bytes, blake3, created_at) \
                     SELECT $1, (a.ordinal - 1)::int, $3, a.file_name, a.mime_type, \
                     a.size_bytes, a.blake3, $9 \
                     FROM unnest($11::text[], $12::text[], $13::bigint[], $14::text[]) \
                     WITH ORDINALITY AS a(file_name, mime_type, size_bytes, blake3, ordinal) \
                 ) \
                 UPDATE conversations SET message_count = message_count + 1, \
                 last_message_at = GREATEST(last_message_at, $9) WHERE id = $2",
            )
            .bind(id)
            .bind(conversation_id)
            .bind(organization_id)
            .bind(author_id)
            .bind(parent_message_id)
            .bind(thread_root_id)
            .bind(content.0)
            .bind(event.position)
            .bind(at)
            .bind(seq)
            .bind(columns.file_names)
            .bind(columns.mime_types)
            .bind(columns.sizes)
            .bind(columns.blake3s)
            .execute(&mut *conn)
            .await?;
            (result, "conversations")
        }
        MessageEvent::MessageEdited {
            conversation_id,
            content,
        } => {
            let result = sqlx::query(
                "UPDATE messages SET content_sealed = $3, edited_at = $4, version = $5 \
                 WHERE id = $1 AND conversation_id = $2",
            )
            .bind(id)
            .bind(conversation_id)
            .bind(content.0)
            .bind(at)
            .bind(seq)
            .execute(&mut *conn)
            .await?;
            (result, "messages")
        }
        MessageEvent::MessageDeleted {
            conversation_id,
            by,
        } => {
            let result = sqlx::query(
                "UPDATE messages SET content_sealed = NULL, deleted_at = $3, deleted_by = $4, \
                 version = $5 WHERE id = $1 AND conversation_id = $2 AND deleted_at IS NULL",
            )
            .bind(id)
            .bind(conversation_id)
            .bind(at)
            .bind(by)
            .bind(seq)
            .execute(&mut *conn)
            .await?;
            one_row(event, result, "messages")?;
            sqlx::query(
                "UPDATE message_attachments SET file_name_sealed = NULL WHERE message_id = $1",
            )
            .bind(id)
            .execute(&mut *conn)
            .await?;
            // Crypto-shredding, in the transaction that moves the checkpoint past the event
            // (see users.rs): the content's copies in the log and audit_events go dark with
            // it. A rebuild replays it as a no-op.
            let forgotten = [crate::Forgotten::of(id, event)?];
            crate::destroy_keys_and_forget(conn, crate::MESSAGE_KEYS, &forgotten).await?;
            let result = sqlx::query(
                "UPDATE conversations SET message_count = message_count - 1 WHERE id = $1",
            )
            .bind(conversation_id)
            .execute(&mut *conn)
            .await?;
            (result, "conversations")
        }
        MessageEvent::ReactionAdded {
            conversation_id,
            user_id,
            emoji,
        } => {
            let result = sqlx::query(
                "WITH message AS ( \
                     UPDATE messages SET version = $3 WHERE id = $1 AND conversation_id = $2 \
                     RETURNING organization_id \
                 ) \
                 INSERT INTO message_reactions (message_id, user_id, emoji, conversation_id, \
                 organization_id, created_at) \
                 SELECT $1, $4, $5, $2, organization_id, $6 FROM message",
            )
            .bind(id)
            .bind(conversation_id)
            .bind(seq)
            .bind(user_id)
            .bind(emoji)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            (result, "message_reactions")
        }
        MessageEvent::ReactionRemoved {
            conversation_id,
            user_id,
            emoji,
        } => {
            let result = sqlx::query(
                "WITH message AS ( \
                     UPDATE messages SET version = $3 WHERE id = $1 AND conversation_id = $2 \
                     RETURNING id \
                 ) \
                 DELETE FROM message_reactions r USING message \
                 WHERE r.message_id = message.id AND r.user_id = $4 AND r.emoji = $5",
            )
            .bind(id)
            .bind(conversation_id)
            .bind(seq)
            .bind(user_id)
            .bind(emoji)
            .execute(&mut *conn)
            .await?;
            (result, "message_reactions")
        }
        // The read mark only moves forward, and not at all for a user who has left since:
        // both are normal, so the mark's row count is not checked, the receipt's is.
        MessageEvent::MessageRead {
            conversation_id,
            user_id,
        } => {
            let result = sqlx::query(
                "WITH message AS ( \
                     UPDATE messages SET version = $3 WHERE id = $1 AND conversation_id = $2 \
                     RETURNING position, organization_id \
                 ), mark AS ( \
                     UPDATE conversation_participants p SET last_read_message_id = $1, \
                     last_read_position = message.position, last_read_at = $5 FROM message \
                     WHERE p.conversation_id = $2 AND p.user_id = $4 \
                     AND p.last_read_position < message.position \
                 ) \
                 INSERT INTO message_reads (message_id, user_id, conversation_id, read_at, \
                 organization_id) SELECT $1, $4, $2, $5, organization_id FROM message",
            )
            .bind(id)
            .bind(conversation_id)
            .bind(seq)
            .bind(user_id)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            (result, "message_reads")
        }
    };
    one_row(event, result, table)
}

/// A message's attachments as one array per column, for `unnest`.
struct Columns<'a> {
    file_names: Vec<&'a str>,
    mime_types: Vec<&'a str>,
    sizes: Vec<i64>,
    blake3s: Vec<&'a str>,
}

impl<'a> Columns<'a> {
    fn of(attachments: &'a [Attachment]) -> Self {
        Self {
            file_names: attachments.iter().map(|a| a.file_name.0.as_str()).collect(),
            mime_types: attachments.iter().map(|a| a.mime_type.as_str()).collect(),
            sizes: attachments.iter().map(|a| a.size_bytes).collect(),
            blake3s: attachments.iter().map(|a| a.blake3.as_str()).collect(),
        }
    }
}
