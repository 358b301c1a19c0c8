//! The `messaging` projection applied a batch at a time, with a few multi-row statements
//! instead of one or more per event: what makes a rebuild of a chat-heavy log fast. The
//! per-event code in `messaging.rs` stays the definition; this must give the same tables
//! (`projections/tests/messaging.rs` applies the same logs both ways and compares).
//!
//! Why reordering is safe: message events are held back and applied at the end of the batch
//! (or of a segment, cut only where a conversation with held-back events is created, which
//! must fail as it does one by one). Message events of different messages touch disjoint
//! rows, except for what they add up in common rows, and those sums commute: a
//! conversation's `message_count` (+1 per post, -1 per deletion), its `last_message_at` (the
//! greatest) and a participant's read mark (only moves forward, to the greatest position
//! read). So each message's events keep their order: a message posted in the segment is
//! folded in memory, its row written once as its events leave it, with its reactions and
//! receipts as plain inserts (a message's reactions, edits and reads mostly come soon after
//! its post: in a seeded chat log, 34% of them in the post's batch of 2,000 and 72% in its
//! batch of 20,000); the events of older messages go in "waves" (the first event of every
//! such message in the segment, then the second, ...), the events of one wave applied by
//! kind, one statement each, each moving the message's version.
//!
//! Conversation events and user erasures are applied where they come, ahead of the
//! held-back message events. Most write nothing a message event writes (the settings,
//! status, version, a participant's role or muting; key rows). Participant changes share the
//! read mark, and come out the same: a newcomer's mark starts at the conversation's newest
//! message as of the addition, held-back posts included (`unwritten_newest`), so a held-back
//! read of an earlier message cannot move it, as it could not have one by one; a removed
//! participant's row is gone, so a held-back read of theirs marks nothing, and what it
//! would have marked one by one was deleted with the row. Receipts do not depend on who
//! takes part. (Cutting the batch at every participant change instead, as this path once
//! did, cut a chat log's batches into segments of a few hundred events, each costing its
//! waves' statements.)
//!
//! Anything unexpected (an event that does not decode, a statement that fails or touches
//! fewer rows than it must) undoes the bulk work to a savepoint and applies the batch one
//! event at a time, so a failure is reported at exactly the event and with exactly the
//! error the per-event code gives.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ledgerline_aggregates::message::MessageEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{decode, messaging, ProjectionError, StoredEvent};

/// Batches shorter than this (the live projector's usual few events) go one by one: the
/// savepoint would cost more than the statements it saves.
const BULK_FROM: usize = 8;

pub async fn apply_many(
    conn: &mut PgConnection,
    events: &[StoredEvent],
) -> Result<(), (usize, ProjectionError)> {
    if events.len() >= BULK_FROM {
        match bulk(conn, events).await {
            Ok(()) => return Ok(()),
            Err(why) => crate::note_bulk_fallback(messaging::NAME, &why),
        }
    }
    one_by_one(conn, events).await
}

async fn one_by_one(
    conn: &mut PgConnection,
    events: &[StoredEvent],
) -> Result<(), (usize, ProjectionError)> {
    for (index, event) in events.iter().enumerate() {
        messaging::apply(conn, event)
            .await
            .map_err(|e| (index, e))?;
    }
    Ok(())
}

/// Why the bulk path gave up; the per-event path then says what is wrong, if anything.
#[derive(Debug)]
enum GiveUp {
    Sql(sqlx::Error),
    Event(ProjectionError),
    /// A statement touched another number of rows than the events it applied.
    Rows {
        expected: usize,
        touched: i64,
    },
    /// An event the multi-row statements do not cover (or that names another message).
    Uncovered,
}

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GiveUp::Sql(e) => write!(f, "{e}"),
            GiveUp::Event(e) => write!(f, "{e}"),
            GiveUp::Rows { expected, touched } => {
                write!(
                    f,
                    "a statement touched {touched} rows for {expected} events"
                )
            }
            GiveUp::Uncovered => write!(f, "an event the multi-row path does not cover"),
        }
    }
}

impl From<sqlx::Error> for GiveUp {
    fn from(e: sqlx::Error) -> Self {
        GiveUp::Sql(e)
    }
}

impl From<ProjectionError> for GiveUp {
    fn from(e: ProjectionError) -> Self {
        GiveUp::Event(e)
    }
}

async fn bulk(conn: &mut PgConnection, events: &[StoredEvent]) -> Result<(), GiveUp> {
    // Each statement planned for its own arrays, for the rest of the caller's transaction:
    // on a pooled connection a generic plan, made once the first executions found the
    // tables small (a projection reset or added to a running system), assumes a hundred
    // rows per array and goes on scanning `messages` whole as it grows.
    sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SAVEPOINT messaging_bulk")
        .execute(&mut *conn)
        .await?;
    let result = segments(conn, events).await;
    let end = if result.is_ok() {
        "RELEASE SAVEPOINT messaging_bulk"
    } else {
        "ROLLBACK TO SAVEPOINT messaging_bulk"
    };
    sqlx::query(end).execute(&mut *conn).await?;
    result
}

/// A message event that can go in a wave, decoded.
struct Item<'e> {
    event: &'e StoredEvent,
    message: Uuid,
    kind: MessageEvent,
}

async fn segments(conn: &mut PgConnection, events: &[StoredEvent]) -> Result<(), GiveUp> {
    let mut segment: Vec<Item> = Vec::new();
    // The conversations with message events in `segment`, each with the position of its
    // newest post there (0 if none).
    let mut pending: HashMap<Uuid, i64> = HashMap::new();
    for event in events {
        match event.aggregate_type.as_str() {
            "Message" => {
                let kind = decode::payload::<MessageEvent>(event)?;
                let newest = pending.entry(conversation_of(&kind)).or_insert(0);
                if matches!(kind, MessageEvent::MessagePosted { .. }) {
                    *newest = event.position;
                }
                segment.push(Item {
                    event,
                    message: decode::aggregate_id(event)?,
                    kind,
                });
            }
            // A message event before its conversation was created must fail as it does one
            // by one, not find the conversation the later creation made.
            "Conversation" if event.event_type == "ConversationCreated" => {
                if pending.contains_key(&decode::aggregate_id(event)?) {
                    waves(conn, std::mem::take(&mut segment)).await?;
                    pending.clear();
                }
                messaging::apply(conn, event).await?;
            }
            // The other conversation events commute with the held-back message events (see
            // the module's comment); a newcomer's mark starts past the held-back posts.
            "Conversation" => {
                let unwritten = pending
                    .get(&decode::aggregate_id(event)?)
                    .copied()
                    .unwrap_or(0);
                messaging::apply_conversation_event(conn, event, unwritten).await?;
            }
            // Erasing a user only deletes key rows.
            "User" if event.event_type == "UserErased" => messaging::apply(conn, event).await?,
            // Nothing else reaches this projection's tables.
            _ => {}
        }
    }
    waves(conn, segment).await
}

/// The conversation a message event belongs to.
fn conversation_of(kind: &MessageEvent) -> Uuid {
    match kind {
        MessageEvent::MessagePosted {
            conversation_id, ..
        }
        | MessageEvent::ReactionAdded {
            conversation_id, ..
        }
        | MessageEvent::ReactionRemoved {
            conversation_id, ..
        }
        | MessageEvent::MessageRead {
            conversation_id, ..
        }
        | MessageEvent::MessageEdited {
            conversation_id, ..
        }
        | MessageEvent::MessageDeleted {
            conversation_id, ..
        } => *conversation_id,
    }
}

/// Applies a segment's message events: the messages posted in the segment are folded
/// (each written once, as its events there leave it), the others wave by wave: wave k holds
/// the k-th event of each message.
async fn waves(conn: &mut PgConnection, segment: Vec<Item<'_>>) -> Result<(), GiveUp> {
    let mut groups: Vec<Vec<Item>> = Vec::new();
    let mut group_of: HashMap<Uuid, usize> = HashMap::new();
    for item in segment {
        let next = groups.len();
        let g = *group_of.entry(item.message).or_insert(next);
        if g == next {
            groups.push(Vec::new());
        }
        groups[g].push(item);
    }
    let mut folded = Folded::default();
    let mut waves: Vec<Vec<Item>> = Vec::new();
    for group in groups {
        if matches!(group[0].kind, MessageEvent::MessagePosted { .. }) {
            folded.fold(group)?;
            continue;
        }
        for (k, item) in group.into_iter().enumerate() {
            if waves.len() <= k {
                waves.push(Vec::new());
            }
            waves[k].push(item);
        }
    }
    folded.write(conn).await?;
    for wave in waves {
        apply_wave(conn, wave).await?;
    }
    Ok(())
}

/// The messages posted in a segment, each as its later events in the segment leave it: the
/// row is written once, final, and their reactions and receipts are plain inserts. What one
/// by one would fail on (an event naming another conversation, a second deletion, a reaction
/// added twice or removed when absent, a message read twice by one user, a post repeated)
/// gives up, so that the one-by-one path reports it.
#[derive(Default)]
struct Folded {
    posts: Posts,
    reactions: Reactions,
    /// Receipts, with the message's position for its reader's mark.
    reads: Reads,
    /// Messages deleted in the segment: their keys are destroyed (see messaging.rs).
    deleted: Vec<Uuid>,
}

#[derive(Default)]
struct Reactions {
    message: Vec<Uuid>,
    user: Vec<Uuid>,
    emoji: Vec<String>,
    conversation: Vec<Uuid>,
    organization: Vec<Uuid>,
    at: Vec<DateTime<Utc>>,
}

#[derive(Default)]
struct Reads {
    message: Vec<Uuid>,
    user: Vec<Uuid>,
    conversation: Vec<Uuid>,
    organization: Vec<Uuid>,
    position: Vec<i64>,
    at: Vec<DateTime<Utc>>,
}

impl Folded {
    /// Folds one message's events, its post first, into the rows they leave.
    fn fold(&mut self, group: Vec<Item<'_>>) -> Result<(), GiveUp> {
        let mut items = group.into_iter();
        let post = items.next().ok_or(GiveUp::Uncovered)?;
        let MessageEvent::MessagePosted {
            message_id,
            conversation_id: conversation,
            organization_id: organization,
            author_id,
            content,
            parent_message_id,
            thread_root_id,
            attachments,
        } = post.kind
        else {
            return Err(GiveUp::Uncovered);
        };
        if message_id != post.message {
            return Err(GiveUp::Uncovered);
        }
        let message = post.message;
        let mut content = Some(content.0);
        let mut version = post.event.sequence;
        let (mut edited_at, mut deleted_at, mut deleted_by) = (None, None, None);
        // (user, emoji, when added) of the reactions present.
        let mut reactions: Vec<(Uuid, String, DateTime<Utc>)> = Vec::new();
        let mut readers: Vec<Uuid> = Vec::new();
        for item in items {
            let (at, in_conversation) = (item.event.recorded_at, conversation_of(&item.kind));
            if in_conversation != conversation {
                return Err(GiveUp::Uncovered);
            }
            version = item.event.sequence;
            match item.kind {
                MessageEvent::MessagePosted { .. } => return Err(GiveUp::Uncovered),
                MessageEvent::MessageEdited { content: new, .. } => {
                    // As one by one: an edit sets the content, deleted or not.
                    content = Some(new.0);
                    edited_at = Some(at);
                }
                MessageEvent::MessageDeleted { by, .. } => {
                    if deleted_at.is_some() {
                        return Err(GiveUp::Uncovered);
                    }
                    content = None;
                    deleted_at = Some(at);
                    deleted_by = by;
                }
                MessageEvent::ReactionAdded { user_id, emoji, .. } => {
                    if reactions
                        .iter()
                        .any(|(u, e, _)| *u == user_id && *e == emoji)
                    {
                        return Err(GiveUp::Uncovered);
                    }
                    reactions.push((user_id, emoji, at));
                }
                MessageEvent::ReactionRemoved { user_id, emoji, .. } => {
                    let present = reactions
                        .iter()
                        .position(|(u, e, _)| *u == user_id && *e == emoji)
                        .ok_or(GiveUp::Uncovered)?;
                    reactions.remove(present);
                }
                MessageEvent::MessageRead { user_id, .. } => {
                    if readers.contains(&user_id) {
                        return Err(GiveUp::Uncovered);
                    }
                    readers.push(user_id);
                    let r = &mut self.reads;
                    r.message.push(message);
                    r.user.push(user_id);
                    r.conversation.push(conversation);
                    r.organization.push(organization);
                    r.position.push(post.event.position);
                    r.at.push(at);
                }
            }
        }
        for (user, emoji, at) in reactions {
            let r = &mut self.reactions;
            r.message.push(message);
            r.user.push(user);
            r.emoji.push(emoji);
            r.conversation.push(conversation);
            r.organization.push(organization);
            r.at.push(at);
        }
        if deleted_at.is_some() {
            self.deleted.push(message);
        }
        let p = &mut self.posts;
        let created_at = post.event.recorded_at;
        for (ordinal, a) in attachments.into_iter().enumerate() {
            p.a_message.push(message);
            p.a_ordinal
                .push(i32::try_from(ordinal).map_err(|_| GiveUp::Uncovered)?);
            p.a_organization.push(organization);
            // A deletion clears the file names with the content.
            p.a_file_name
                .push(deleted_at.is_none().then_some(a.file_name.0));
            p.a_mime_type.push(a.mime_type);
            p.a_size.push(a.size_bytes);
            p.a_blake3.push(a.blake3);
            p.a_at.push(created_at);
        }
        p.id.push(message);
        p.conversation.push(conversation);
        p.organization.push(organization);
        p.author.push(author_id);
        p.parent.push(parent_message_id);
        p.thread_root.push(thread_root_id);
        p.content.push(content);
        p.position.push(post.event.position);
        p.at.push(created_at);
        p.version.push(version);
        p.edited_at.push(edited_at);
        p.deleted_at.push(deleted_at);
        p.deleted_by.push(deleted_by);
        Ok(())
    }

    async fn write(&self, conn: &mut PgConnection) -> Result<(), GiveUp> {
        insert_posts(conn, &self.posts).await?;
        let r = &self.reactions;
        if !r.message.is_empty() {
            let done = sqlx::query(
                "INSERT INTO message_reactions (message_id, user_id, emoji, conversation_id, \
                 organization_id, created_at) \
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], \
                 $5::uuid[], $6::timestamptz[])",
            )
            .bind(&r.message)
            .bind(&r.user)
            .bind(&r.emoji)
            .bind(&r.conversation)
            .bind(&r.organization)
            .bind(&r.at)
            .execute(&mut *conn)
            .await?;
            exactly(r.message.len(), done.rows_affected() as i64)?;
        }
        let r = &self.reads;
        if !r.message.is_empty() {
            // Every read gets its receipt; a reader's mark moves to the furthest message
            // they read, if further than it is (see mark_read).
            let done = sqlx::query(
                "WITH r AS ( \
                     SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], \
                     $5::bigint[], $6::timestamptz[]) \
                     AS r(message_id, user_id, conversation_id, organization_id, position, at) \
                 ), furthest AS ( \
                     SELECT DISTINCT ON (conversation_id, user_id) * FROM r \
                     ORDER BY conversation_id, user_id, position DESC \
                 ), mark AS ( \
                     UPDATE conversation_participants p SET last_read_message_id = f.message_id, \
                     last_read_position = f.position, last_read_at = f.at FROM furthest f \
                     WHERE p.conversation_id = f.conversation_id AND p.user_id = f.user_id \
                     AND p.last_read_position < f.position \
                 ) \
                 INSERT INTO message_reads (message_id, user_id, conversation_id, read_at, \
                 organization_id) \
                 SELECT message_id, user_id, conversation_id, at, organization_id FROM r",
            )
            .bind(&r.message)
            .bind(&r.user)
            .bind(&r.conversation)
            .bind(&r.organization)
            .bind(&r.position)
            .bind(&r.at)
            .execute(&mut *conn)
            .await?;
            exactly(r.message.len(), done.rows_affected() as i64)?;
        }
        if !self.deleted.is_empty() {
            sqlx::query("DELETE FROM message_keys WHERE message_id = ANY($1)")
                .bind(&self.deleted)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Posts {
    id: Vec<Uuid>,
    conversation: Vec<Uuid>,
    organization: Vec<Uuid>,
    author: Vec<Uuid>,
    parent: Vec<Option<Uuid>>,
    thread_root: Vec<Option<Uuid>>,
    content: Vec<Option<String>>,
    position: Vec<i64>,
    at: Vec<DateTime<Utc>>,
    version: Vec<i64>,
    edited_at: Vec<Option<DateTime<Utc>>>,
    deleted_at: Vec<Option<DateTime<Utc>>>,
    deleted_by: Vec<Option<Uuid>>,
    // One entry per attachment.
    a_message: Vec<Uuid>,
    a_ordinal: Vec<i32>,
    a_organization: Vec<Uuid>,
    a_file_name: Vec<Option<String>>,
    a_mime_type: Vec<String>,
    a_size: Vec<i64>,
    a_blake3: Vec<String>,
    a_at: Vec<DateTime<Utc>>,
}

/// Reactions added or removed, read marks and edits: a message, its conversation, the new
/// version, who, and what.
#[derive(Default)]
struct Touches {
    message: Vec<Uuid>,
    conversation: Vec<Uuid>,
    version: Vec<i64>,
    user: Vec<Uuid>,
    text: Vec<String>,
    at: Vec<DateTime<Utc>>,
}

impl Touches {
    fn push(&mut self, item: &Item, conversation: Uuid, user: Uuid, text: String) {
        self.message.push(item.message);
        self.conversation.push(conversation);
        self.version.push(item.event.sequence);
        self.user.push(user);
        self.text.push(text);
        self.at.push(item.event.recorded_at);
    }
}

/// Deleted messages: who deleted them, when.
#[derive(Default)]
struct Deletes {
    message: Vec<Uuid>,
    conversation: Vec<Uuid>,
    version: Vec<i64>,
    by: Vec<Option<Uuid>>,
    at: Vec<DateTime<Utc>>,
}

async fn apply_wave(conn: &mut PgConnection, wave: Vec<Item<'_>>) -> Result<(), GiveUp> {
    let mut added = Touches::default();
    let mut removed = Touches::default();
    let mut reads = Touches::default();
    let mut edits = Touches::default();
    let mut deletes = Deletes::default();
    for item in &wave {
        let e = item.event;
        match &item.kind {
            // Posts are folded (`Folded`); one here follows other events of its message in
            // the segment, which one by one fail on, or repeats a post.
            MessageEvent::MessagePosted { .. } => return Err(GiveUp::Uncovered),
            MessageEvent::ReactionAdded {
                conversation_id,
                user_id,
                emoji,
            } => added.push(item, *conversation_id, *user_id, emoji.clone()),
            MessageEvent::ReactionRemoved {
                conversation_id,
                user_id,
                emoji,
            } => removed.push(item, *conversation_id, *user_id, emoji.clone()),
            MessageEvent::MessageRead {
                conversation_id,
                user_id,
            } => reads.push(item, *conversation_id, *user_id, String::new()),
            MessageEvent::MessageEdited {
                conversation_id,
                content,
            } => edits.push(item, *conversation_id, Uuid::nil(), content.0.clone()),
            MessageEvent::MessageDeleted {
                conversation_id,
                by,
            } => {
                deletes.message.push(item.message);
                deletes.conversation.push(*conversation_id);
                deletes.version.push(e.sequence);
                deletes.by.push(*by);
                deletes.at.push(e.recorded_at);
            }
        }
    }
    add_reactions(conn, &added).await?;
    remove_reactions(conn, &removed).await?;
    mark_read(conn, &reads).await?;
    edit(conn, &edits).await?;
    delete(conn, &deletes).await?;
    Ok(())
}

/// Fails (to the one-by-one path) unless a statement touched exactly `expected` rows.
fn exactly(expected: usize, touched: i64) -> Result<(), GiveUp> {
    if i64::try_from(expected).is_ok_and(|n| n == touched) {
        Ok(())
    } else {
        Err(GiveUp::Rows { expected, touched })
    }
}

async fn insert_posts(conn: &mut PgConnection, p: &Posts) -> Result<(), GiveUp> {
    if p.id.is_empty() {
        return Ok(());
    }
    // As the per-event statements: the message, then the conversation's count (of the
    // messages not deleted since) and latest time, which must exist (one row per distinct
    // conversation).
    let (inserted, conversations, updated): (i64, i64, i64) = sqlx::query_as(
        "WITH p AS ( \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[], \
             $6::uuid[], $7::text[], $8::bigint[], $9::timestamptz[], $10::bigint[], \
             $11::timestamptz[], $12::timestamptz[], $13::uuid[]) \
             AS p(id, conversation_id, organization_id, author_id, parent_message_id, \
             thread_root_id, content_sealed, position, created_at, version, edited_at, \
             deleted_at, deleted_by) \
         ), message AS ( \
             INSERT INTO messages (id, conversation_id, organization_id, author_id, \
             parent_message_id, thread_root_id, content_sealed, position, created_at, version, \
             edited_at, deleted_at, deleted_by) \
             SELECT * FROM p RETURNING conversation_id \
         ), conversation AS ( \
             UPDATE conversations c SET message_count = c.message_count + x.n, \
             last_message_at = GREATEST(c.last_message_at, x.latest) \
             FROM (SELECT conversation_id, count(*) FILTER (WHERE deleted_at IS NULL) AS n, \
                   max(created_at) AS latest FROM p GROUP BY conversation_id) x \
             WHERE c.id = x.conversation_id RETURNING c.id \
         ) \
         SELECT (SELECT count(*) FROM message), \
                (SELECT count(DISTINCT conversation_id) FROM p), \
                (SELECT count(*) FROM conversation)",
    )
    .bind(&p.id)
    .bind(&p.conversation)
    .bind(&p.organization)
    .bind(&p.author)
    .bind(&p.parent)
    .bind(&p.thread_root)
    .bind(&p.content)
    .bind(&p.position)
    .bind(&p.at)
    .bind(&p.version)
    .bind(&p.edited_at)
    .bind(&p.deleted_at)
    .bind(&p.deleted_by)
    .fetch_one(&mut *conn)
    .await?;
    exactly(p.id.len(), inserted)?;
    exactly(
        usize::try_from(conversations).map_err(|_| GiveUp::Uncovered)?,
        updated,
    )?;
    if !p.a_message.is_empty() {
        let attached = sqlx::query(
            "INSERT INTO message_attachments (message_id, ordinal, organization_id, \
             file_name_sealed, mime_type, size_bytes, blake3, created_at) \
             SELECT * FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::text[], $5::text[], \
             $6::bigint[], $7::text[], $8::timestamptz[])",
        )
        .bind(&p.a_message)
        .bind(&p.a_ordinal)
        .bind(&p.a_organization)
        .bind(&p.a_file_name)
        .bind(&p.a_mime_type)
        .bind(&p.a_size)
        .bind(&p.a_blake3)
        .bind(&p.a_at)
        .execute(&mut *conn)
        .await?;
        exactly(p.a_message.len(), attached.rows_affected() as i64)?;
    }
    Ok(())
}

/// The rows of a wave's touches as a CTE `t`, and `m`: the touched messages, their version
/// moved (one message appears once per wave).
const TOUCHED: &str = "WITH t AS ( \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::uuid[], $5::text[], \
         $6::timestamptz[]) AS t(message_id, conversation_id, version, user_id, text, at) \
     ), m AS ( \
         UPDATE messages SET version = t.version FROM t \
         WHERE messages.id = t.message_id AND messages.conversation_id = t.conversation_id \
         RETURNING messages.id, messages.organization_id, messages.position \
     ) ";

async fn touch(conn: &mut PgConnection, t: &Touches, statement: &str) -> Result<(), GiveUp> {
    if t.message.is_empty() {
        return Ok(());
    }
    let done = sqlx::query(&format!("{TOUCHED}{statement}"))
        .bind(&t.message)
        .bind(&t.conversation)
        .bind(&t.version)
        .bind(&t.user)
        .bind(&t.text)
        .bind(&t.at)
        .execute(&mut *conn)
        .await?;
    exactly(t.message.len(), done.rows_affected() as i64)
}

async fn add_reactions(conn: &mut PgConnection, t: &Touches) -> Result<(), GiveUp> {
    touch(
        conn,
        t,
        "INSERT INTO message_reactions (message_id, user_id, emoji, conversation_id, \
         organization_id, created_at) \
         SELECT t.message_id, t.user_id, t.text, t.conversation_id, m.organization_id, t.at \
         FROM t JOIN m ON m.id = t.message_id",
    )
    .await
}

async fn remove_reactions(conn: &mut PgConnection, t: &Touches) -> Result<(), GiveUp> {
    touch(
        conn,
        t,
        "DELETE FROM message_reactions r USING t JOIN m ON m.id = t.message_id \
         WHERE r.message_id = t.message_id AND r.user_id = t.user_id AND r.emoji = t.text",
    )
    .await
}

/// A participant's mark moves to the furthest message they read in the wave, if that is
/// further than it is (what reading them one by one gives); every read gets its receipt.
async fn mark_read(conn: &mut PgConnection, t: &Touches) -> Result<(), GiveUp> {
    touch(
        conn,
        t,
        ", furthest AS ( \
             SELECT DISTINCT ON (t.conversation_id, t.user_id) t.conversation_id, t.user_id, \
             t.message_id, m.position, t.at FROM t JOIN m ON m.id = t.message_id \
             ORDER BY t.conversation_id, t.user_id, m.position DESC \
         ), mark AS ( \
             UPDATE conversation_participants p SET last_read_message_id = f.message_id, \
             last_read_position = f.position, last_read_at = f.at FROM furthest f \
             WHERE p.conversation_id = f.conversation_id AND p.user_id = f.user_id \
             AND p.last_read_position < f.position \
         ) \
         INSERT INTO message_reads (message_id, user_id, conversation_id, read_at, \
         organization_id) SELECT t.message_id, t.user_id, t.conversation_id, t.at, \
         m.organization_id FROM t JOIN m ON m.id = t.message_id",
    )
    .await
}

/// Not through [`TOUCHED`]: a statement may not update the same row twice.
async fn edit(conn: &mut PgConnection, t: &Touches) -> Result<(), GiveUp> {
    if t.message.is_empty() {
        return Ok(());
    }
    let done = sqlx::query(
        "UPDATE messages SET content_sealed = t.text, edited_at = t.at, version = t.version \
         FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::timestamptz[]) \
         AS t(message_id, conversation_id, version, text, at) \
         WHERE messages.id = t.message_id AND messages.conversation_id = t.conversation_id",
    )
    .bind(&t.message)
    .bind(&t.conversation)
    .bind(&t.version)
    .bind(&t.text)
    .bind(&t.at)
    .execute(&mut *conn)
    .await?;
    exactly(t.message.len(), done.rows_affected() as i64)
}

/// As the per-event code: the content and file names cleared, the message key destroyed
/// (crypto-shredding, see messaging.rs), the conversation's count lowered. Each message must
/// have been there and not deleted, each conversation there.
async fn delete(conn: &mut PgConnection, d: &Deletes) -> Result<(), GiveUp> {
    if d.message.is_empty() {
        return Ok(());
    }
    let (deleted, conversations, lowered): (i64, i64, i64) = sqlx::query_as(
        "WITH t AS ( \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::uuid[], \
             $5::timestamptz[]) AS t(message_id, conversation_id, version, by, at) \
         ), m AS ( \
             UPDATE messages SET content_sealed = NULL, deleted_at = t.at, deleted_by = t.by, \
             version = t.version FROM t \
             WHERE messages.id = t.message_id AND messages.conversation_id = t.conversation_id \
             AND messages.deleted_at IS NULL RETURNING messages.id, messages.conversation_id \
         ), attachments AS ( \
             UPDATE message_attachments a SET file_name_sealed = NULL FROM m \
             WHERE a.message_id = m.id \
         ), keys AS ( \
             DELETE FROM message_keys k USING m WHERE k.message_id = m.id \
         ), conversation AS ( \
             UPDATE conversations c SET message_count = c.message_count - x.n \
             FROM (SELECT conversation_id, count(*) AS n FROM t GROUP BY conversation_id) x \
             WHERE c.id = x.conversation_id RETURNING c.id \
         ) \
         SELECT (SELECT count(*) FROM m), (SELECT count(DISTINCT conversation_id) FROM t), \
                (SELECT count(*) FROM conversation)",
    )
    .bind(&d.message)
    .bind(&d.conversation)
    .bind(&d.version)
    .bind(&d.by)
    .bind(&d.at)
    .fetch_one(&mut *conn)
    .await?;
    exactly(d.message.len(), deleted)?;
    exactly(
        usize::try_from(conversations).map_err(|_| GiveUp::Uncovered)?,
        lowered,
    )
}
