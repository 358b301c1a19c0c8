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
//! folded in memory, its row written once as its events leave it, with its attachments,
//! reactions and receipts, by binary `COPY` (a message's reactions, edits and reads mostly
//! come soon after its post: in a seeded chat log, 34% of them in the post's batch of 2,000
//! and 72% in its batch of 20,000); the events of older messages go in "waves" (the first
//! event of every such message in the segment, then the second, ...), the events of one
//! wave applied by kind, one statement each, each moving the message's version.
//!
//! User erasures are applied where they come; conversation events are held back too and
//! applied before the message events, a few multi-row statements in all
//! (`conversation_batch`). Either way they take effect ahead of the held-back message
//! events. Most write nothing a message event writes (the settings,
//! status, version, a participant's role or muting; key rows). Participant changes share the
//! read mark, and come out the same: a newcomer's mark starts at the conversation's newest
//! message as of the addition, held-back posts included (`unwritten_newest`), so a held-back
//! read of an earlier message cannot move it, as it could not have one by one; a removed
//! participant's row is gone, so a held-back read of theirs marks nothing, and what it
//! would have marked one by one was deleted with the row. Receipts do not depend on who
//! takes part. (This path once cut the batch at every participant change in a conversation
//! with held-back events: 567 segments in the 63 batches of 2,000 of a seeded chat log,
//! and 1,170 waves against 276 now, each wave a statement per kind of event.)
//!
//! Anything unexpected (an event that does not decode, a statement that fails or touches
//! fewer rows than it must) undoes the bulk work to a savepoint and applies the batch one
//! event at a time, so a failure is reported at exactly the event and with exactly the
//! error the per-event code gives.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use ledgerline_aggregates::message::MessageEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::copy_in::{self, BinaryCopy, Field};
use crate::give_up::{self, exactly, GiveUp};
use crate::{conversation_batch, decode, messaging, StoredEvent};

/// Applies a batch of 8 events or more with multi-row statements; `Err` when it gave up,
/// its writes undone.
pub(crate) async fn bulk(conn: &mut PgConnection, events: &[StoredEvent]) -> Result<(), GiveUp> {
    // Each statement planned for its own parameters, for the rest of the caller's
    // transaction, where sequential scans are on: on a pooled connection a generic plan,
    // made once the first executions found the tables small (a projection reset or added
    // to a running system), would go on scanning them whole as they grow. A rebuild's
    // connections have them off (`build::schema_pool`), and there planning each of the
    // many one-row statements would cost more than running them; only the statements that
    // take arrays are planned for their own there (`waves`).
    let plans: String = sqlx::query_scalar(
        "SELECT set_config('plan_cache_mode', CASE current_setting('enable_seqscan') \
         WHEN 'off' THEN current_setting('plan_cache_mode') ELSE 'force_custom_plan' END, true)",
    )
    .fetch_one(&mut *conn)
    .await?;
    give_up::under_savepoint(conn, async |conn| segments(conn, events, &plans).await).await
}

/// A message event that can go in a wave, decoded.
struct Item<'e> {
    event: &'e StoredEvent,
    message: Uuid,
    kind: MessageEvent,
}

/// `plans`: the transaction's `plan_cache_mode`, which `waves` returns to.
async fn segments(
    conn: &mut PgConnection,
    events: &[StoredEvent],
    plans: &str,
) -> Result<(), GiveUp> {
    let mut segment: Vec<Item> = Vec::new();
    let mut held = conversation_batch::Held::default();
    // The conversations with message events in `segment`, each with the position of its
    // newest post there (0 if none).
    let mut pending: HashMap<Uuid, i64> = HashMap::new();
    for event in events {
        match event.aggregate_type.as_str() {
            "Message" => {
                let kind = give_up::payload::<MessageEvent>(event)?;
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
            // by one, not find the conversation the later creation made; so must a held-back
            // change of it (`conversation_batch`).
            "Conversation" if event.event_type == "ConversationCreated" => {
                let id = decode::aggregate_id(event)?;
                if held.holds(id) {
                    return Err(GiveUp::Uncovered);
                }
                if pending.contains_key(&id) {
                    let segment = std::mem::take(&mut segment);
                    waves(conn, std::mem::take(&mut held), segment, plans).await?;
                    pending.clear();
                }
                held.create(event)?;
            }
            // The other conversation events commute with the held-back message events (see
            // the module's comment) and are held back too, applied before them; a
            // newcomer's mark starts past the held-back posts.
            "Conversation" => {
                let unwritten = pending
                    .get(&decode::aggregate_id(event)?)
                    .copied()
                    .unwrap_or(0);
                held.hold(event, unwritten)?;
            }
            // Erasing a user only deletes key rows.
            "User" if event.event_type == "UserErased" => messaging::apply(conn, event).await?,
            // Nothing else reaches this projection's tables.
            _ => {}
        }
    }
    waves(conn, held, segment, plans).await
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

/// Applies a segment's held-back conversation changes (`conversation_batch`), then its
/// message events: the messages posted in the segment are folded (each written once, as its
/// events there leave it), the others wave by wave: wave k holds the k-th event of each
/// message.
async fn waves(
    conn: &mut PgConnection,
    held: conversation_batch::Held,
    segment: Vec<Item<'_>>,
    plans: &str,
) -> Result<(), GiveUp> {
    if segment.is_empty() && held.is_empty() {
        return Ok(());
    }
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
    // A generic plan assumes a hundred rows per array; one cached while the tables were
    // small could join them whole (with sequential scans off, by a full index scan).
    sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan")
        .execute(&mut *conn)
        .await?;
    held.write(conn).await?;
    folded.write(conn).await?;
    for wave in waves {
        apply_wave(conn, wave).await?;
    }
    sqlx::query("SELECT set_config('plan_cache_mode', $1, true)")
        .bind(plans)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The messages posted in a segment, each as its later events in the segment leave it: the
/// row is written once, final, and their reactions and receipts are plain inserts, all by
/// binary `COPY` (`copy_in`). What one by one would fail on (an event naming another
/// conversation, a second deletion, a reaction added twice or removed when absent, a message
/// read twice by one user, a post repeated) gives up, so that the one-by-one path reports it.
#[derive(Default)]
struct Folded {
    messages: BinaryCopy,
    attachments: BinaryCopy,
    reactions: BinaryCopy,
    reads: BinaryCopy,
    /// Per conversation: the posts still there (deletions in the segment taken off) and the
    /// latest post's time, as the per-event statements add them up.
    conversations: HashMap<Uuid, (i64, DateTime<Utc>)>,
    /// Per reader (conversation, user): the furthest message read, its position and when.
    marks: HashMap<(Uuid, Uuid), (Uuid, i64, DateTime<Utc>)>,
    /// Messages deleted in the segment: their keys are destroyed (see messaging.rs).
    deleted: Vec<crate::Forgotten>,
}

const COPY_MESSAGES: &str = "COPY messages (id, conversation_id, organization_id, author_id, \
     parent_message_id, thread_root_id, content_sealed, position, created_at, version, \
     edited_at, deleted_at, deleted_by) FROM STDIN (FORMAT binary)";
const COPY_ATTACHMENTS: &str = "COPY message_attachments (message_id, ordinal, \
     organization_id, file_name_sealed, mime_type, size_bytes, blake3, created_at) \
     FROM STDIN (FORMAT binary)";
const COPY_REACTIONS: &str = "COPY message_reactions (message_id, user_id, emoji, \
     conversation_id, organization_id, created_at) FROM STDIN (FORMAT binary)";
const COPY_READS: &str = "COPY message_reads (message_id, user_id, conversation_id, read_at, \
     organization_id) FROM STDIN (FORMAT binary)";

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
        let (message, position) = (post.message, post.event.position);
        let created_at = post.event.recorded_at;
        let mut content = Some(content.0);
        let mut version = post.event.sequence;
        let (mut edited_at, mut deleted_at, mut deleted_by) = (None, None, None);
        let mut forgotten = None;
        // The reactions present, (user, emoji) to when added, and the readers so far: sets,
        // as a popular message can gather thousands of each in one batch.
        let mut reactions: HashMap<(Uuid, String), DateTime<Utc>> = HashMap::new();
        let mut readers: HashSet<Uuid> = HashSet::new();
        for item in items {
            let at = item.event.recorded_at;
            if conversation_of(&item.kind) != conversation {
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
                    forgotten = Some(crate::Forgotten::of(message, item.event)?);
                }
                MessageEvent::ReactionAdded { user_id, emoji, .. } => {
                    match reactions.entry((user_id, emoji)) {
                        Entry::Occupied(_) => return Err(GiveUp::Uncovered),
                        Entry::Vacant(v) => v.insert(at),
                    };
                }
                MessageEvent::ReactionRemoved { user_id, emoji, .. } => {
                    reactions
                        .remove(&(user_id, emoji))
                        .ok_or(GiveUp::Uncovered)?;
                }
                MessageEvent::MessageRead { user_id, .. } => {
                    if !readers.insert(user_id) {
                        return Err(GiveUp::Uncovered);
                    }
                    self.reads.row(&[
                        Field::Uuid(message),
                        Field::Uuid(user_id),
                        Field::Uuid(conversation),
                        Field::Timestamptz(at),
                        Field::Uuid(organization),
                    ])?;
                    // A reader's mark moves to the furthest message they read, if further
                    // than it is (see mark_read).
                    let mark = self
                        .marks
                        .entry((conversation, user_id))
                        .or_insert((message, position, at));
                    if mark.1 < position {
                        *mark = (message, position, at);
                    }
                }
            }
        }
        for ((user, emoji), at) in &reactions {
            self.reactions.row(&[
                Field::Uuid(message),
                Field::Uuid(*user),
                Field::Text(emoji),
                Field::Uuid(conversation),
                Field::Uuid(organization),
                Field::Timestamptz(*at),
            ])?;
        }
        for (ordinal, a) in attachments.iter().enumerate() {
            self.attachments.row(&[
                Field::Uuid(message),
                Field::Int(i32::try_from(ordinal).map_err(|_| GiveUp::Uncovered)?),
                Field::Uuid(organization),
                // A deletion clears the file names with the content.
                Field::or_null(deleted_at.is_none().then_some(Field::Text(&a.file_name.0))),
                Field::Text(&a.mime_type),
                Field::Bigint(a.size_bytes),
                Field::Text(&a.blake3),
                Field::Timestamptz(created_at),
            ])?;
        }
        let uuid = |id: Option<Uuid>| Field::or_null(id.map(Field::Uuid));
        let time = |t: Option<DateTime<Utc>>| Field::or_null(t.map(Field::Timestamptz));
        self.messages.row(&[
            Field::Uuid(message),
            Field::Uuid(conversation),
            Field::Uuid(organization),
            Field::Uuid(author_id),
            uuid(parent_message_id),
            uuid(thread_root_id),
            Field::or_null(content.as_deref().map(Field::Text)),
            Field::Bigint(position),
            Field::Timestamptz(created_at),
            Field::Bigint(version),
            time(edited_at),
            time(deleted_at),
            uuid(deleted_by),
        ])?;
        let counted = self
            .conversations
            .entry(conversation)
            .or_insert((0, created_at));
        counted.0 += i64::from(deleted_at.is_none());
        counted.1 = counted.1.max(created_at);
        if let Some(forgotten) = forgotten {
            self.deleted.push(forgotten);
        }
        Ok(())
    }

    async fn write(self, conn: &mut PgConnection) -> Result<(), GiveUp> {
        if self.messages.rows() == 0 {
            return Ok(());
        }
        let copies = [
            (COPY_MESSAGES, self.messages),
            (COPY_ATTACHMENTS, self.attachments),
            (COPY_REACTIONS, self.reactions),
            (COPY_READS, self.reads),
        ];
        for (statement, data) in copies {
            let rows = data.rows();
            if rows > 0 {
                let copied = copy_in::copy(conn, statement, data).await?;
                exactly(rows as usize, copied as i64)?;
            }
        }
        // The conversations must exist: one row each.
        let (mut ids, mut counts, mut latest) = (Vec::new(), Vec::new(), Vec::new());
        for (id, (n, at)) in self.conversations {
            ids.push(id);
            counts.push(n);
            latest.push(at);
        }
        let updated = sqlx::query(
            "UPDATE conversations c SET message_count = c.message_count + x.n, \
             last_message_at = GREATEST(c.last_message_at, x.latest) \
             FROM unnest($1::uuid[], $2::bigint[], $3::timestamptz[]) AS x(id, n, latest) \
             WHERE c.id = x.id",
        )
        .bind(&ids)
        .bind(&counts)
        .bind(&latest)
        .execute(&mut *conn)
        .await?;
        exactly(ids.len(), updated.rows_affected() as i64)?;
        if !self.marks.is_empty() {
            let mut m = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((conversation, user), (message, position, at)) in self.marks {
                m.0.push(conversation);
                m.1.push(user);
                m.2.push(message);
                m.3.push(position);
                m.4.push(at);
            }
            // Not checked: a reader who has left since has no mark to move (see messaging.rs).
            sqlx::query(
                "UPDATE conversation_participants p SET last_read_message_id = f.message_id, \
                 last_read_position = f.position, last_read_at = f.at \
                 FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], \
                 $5::timestamptz[]) AS f(conversation_id, user_id, message_id, position, at) \
                 WHERE p.conversation_id = f.conversation_id AND p.user_id = f.user_id \
                 AND p.last_read_position < f.position",
            )
            .bind(&m.0)
            .bind(&m.1)
            .bind(&m.2)
            .bind(&m.3)
            .bind(&m.4)
            .execute(&mut *conn)
            .await?;
        }
        if !self.deleted.is_empty() {
            crate::destroy_keys_and_forget(conn, crate::MESSAGE_KEYS, &self.deleted).await?;
        }
        Ok(())
    }
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

/// Deleted messages (with the requests that deleted them), who deleted them, when.
#[derive(Default)]
struct Deletes {
    forgotten: Vec<crate::Forgotten>,
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
                deletes
                    .forgotten
                    .push(crate::Forgotten::of(item.message, e)?);
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
    if d.forgotten.is_empty() {
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
         ), conversation AS ( \
             UPDATE conversations c SET message_count = c.message_count - x.n \
             FROM (SELECT conversation_id, count(*) AS n FROM t GROUP BY conversation_id) x \
             WHERE c.id = x.conversation_id RETURNING c.id \
         ) \
         SELECT (SELECT count(*) FROM m), (SELECT count(DISTINCT conversation_id) FROM t), \
                (SELECT count(*) FROM conversation)",
    )
    .bind(crate::Forgotten::subjects(&d.forgotten))
    .bind(&d.conversation)
    .bind(&d.version)
    .bind(&d.by)
    .bind(&d.at)
    .fetch_one(&mut *conn)
    .await?;
    exactly(d.forgotten.len(), deleted)?;
    exactly(
        usize::try_from(conversations).map_err(|_| GiveUp::Uncovered)?,
        lowered,
    )?;
    // Every message of `d` was deleted here (counted above): their keys go.
    crate::destroy_keys_and_forget(conn, crate::MESSAGE_KEYS, &d.forgotten).await?;
    Ok(())
}
