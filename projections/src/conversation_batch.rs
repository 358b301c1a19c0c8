//! A segment's conversation events, held back by `messaging_batch` like its message events
//! and applied before them with a few multi-row statements, instead of one or two round
//! trips each (57,000 of them in a million-event chat log, 483 statements now): the
//! conversations created are inserted with their first participants, each other
//! conversation's row is updated once, as its events in the segment leave it, and the
//! participants' changes go in waves (wave k holds the k-th change of each (conversation,
//! user)), one statement per kind of change in a wave.
//!
//! Why this gives the tables one event at a time gives:
//! - A conversation's row: every such event sets its `updated_at` and `version` (the last
//!   one's stay), an update its title and description, archiving and unarchiving its status
//!   and `archived_at` (together, so every row on the way meets the table's check, and the
//!   folded row is one of them). Nothing else in the segment reads those columns: a
//!   newcomer's row reads only the conversation's organization.
//! - Participants: the changes of one (conversation, user) keep their order; changes of
//!   different ones touch different rows. A newcomer's read mark is computed as
//!   `messaging::apply_conversation_event` computes it in this path: from the messages
//!   table, which holds none of the segment's posts yet, and the newest post held back
//!   before the addition (`unwritten`), so that it starts where one by one starts it.
//! - Both are applied where the segment's message events are, before them, as the per-event
//!   code applied them before the held-back message events (see `messaging_batch`).
//! - Every event must touch exactly its row (the conversation's, the participant's; a
//!   newcomer's must be new): a statement touching another number of rows, or failing,
//!   gives up, and the per-event code says what is wrong. A creation of a conversation that
//!   has held-back changes gives up too (one by one, either those changes fail, the
//!   conversation not being there yet, or the creation does, it being there already). Creations
//!   come first: a conversation's other events follow its creation in the log.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ledgerline_aggregates::conversation::ConversationEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::give_up::{self, exactly, GiveUp};
use crate::{decode, StoredEvent};

/// The held-back changes of a segment.
#[derive(Default)]
pub(crate) struct Held {
    /// Conversations created, with their first participants.
    created: Created,
    /// Per conversation, its row as the held events leave it.
    rows: HashMap<Uuid, Row>,
    /// Per (conversation, user), its changes in order.
    participants: HashMap<(Uuid, Uuid), Vec<Change>>,
}

struct Row {
    /// Title and description, if an update set them.
    spec: Option<(Option<String>, Option<String>)>,
    /// `archived_at` (`None`: active), if archiving or unarchiving set the status.
    archived: Option<Option<DateTime<Utc>>>,
    updated_at: DateTime<Utc>,
    version: i64,
}

enum Change {
    Added {
        role: &'static str,
        at: DateTime<Utc>,
        unwritten: i64,
    },
    Removed,
    Role(&'static str),
    Muted(bool),
}

/// Conversations created in the segment, as columns.
#[derive(Default)]
struct Created {
    id: Vec<Uuid>,
    organization: Vec<Uuid>,
    kind: Vec<&'static str>,
    title: Vec<Option<String>>,
    description: Vec<Option<String>>,
    created_by: Vec<Uuid>,
    at: Vec<DateTime<Utc>>,
    version: Vec<i64>,
    participants: Joined,
}

/// The first participants of the conversations created, as columns.
#[derive(Default)]
struct Joined {
    conversation: Vec<Uuid>,
    user: Vec<Uuid>,
    organization: Vec<Uuid>,
    role: Vec<&'static str>,
    at: Vec<DateTime<Utc>>,
}

impl Held {
    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.created.id.is_empty()
    }

    /// Whether changes of `conversation` are held (not counting its creation).
    pub(crate) fn holds(&self, conversation: Uuid) -> bool {
        self.rows.contains_key(&conversation)
    }

    /// Holds a conversation's creation; the caller has checked that no change of it is held
    /// ([`Held::holds`]).
    pub(crate) fn create(&mut self, event: &StoredEvent) -> Result<(), GiveUp> {
        let id = decode::aggregate_id(event)?;
        let ConversationEvent::ConversationCreated {
            conversation_id,
            organization_id,
            kind,
            spec,
            created_by,
            participants,
        } = give_up::payload::<ConversationEvent>(event)?
        else {
            return Err(GiveUp::Uncovered);
        };
        if conversation_id != id {
            return Err(GiveUp::Uncovered);
        }
        let (c, at) = (&mut self.created, event.recorded_at);
        c.id.push(id);
        c.organization.push(organization_id);
        c.kind.push(kind.as_str());
        c.title.push(spec.title);
        c.description.push(spec.description);
        c.created_by.push(created_by);
        c.at.push(at);
        c.version.push(event.sequence);
        let p = &mut c.participants;
        for member in participants {
            p.conversation.push(id);
            p.user.push(member.user_id);
            p.organization.push(organization_id);
            p.role.push(member.role.as_str());
            p.at.push(at);
        }
        Ok(())
    }

    /// Holds a conversation event other than a creation. `unwritten`: the position of the
    /// conversation's newest post held back before it (0 if none).
    pub(crate) fn hold(&mut self, event: &StoredEvent, unwritten: i64) -> Result<(), GiveUp> {
        let id = decode::aggregate_id(event)?;
        let at = event.recorded_at;
        let row = self.rows.entry(id).or_insert(Row {
            spec: None,
            archived: None,
            updated_at: at,
            version: event.sequence,
        });
        (row.updated_at, row.version) = (at, event.sequence);
        let (user, change) = match give_up::payload::<ConversationEvent>(event)? {
            ConversationEvent::ConversationCreated { .. } => return Err(GiveUp::Uncovered),
            ConversationEvent::ConversationUpdated { after, .. } => {
                row.spec = Some((after.title, after.description));
                return Ok(());
            }
            ConversationEvent::ConversationArchived {} => {
                row.archived = Some(Some(at));
                return Ok(());
            }
            ConversationEvent::ConversationUnarchived {} => {
                row.archived = Some(None);
                return Ok(());
            }
            ConversationEvent::ParticipantAdded { user_id, role } => (
                user_id,
                Change::Added {
                    role: role.as_str(),
                    at,
                    unwritten,
                },
            ),
            ConversationEvent::ParticipantRemoved { user_id, .. } => (user_id, Change::Removed),
            ConversationEvent::ParticipantRoleChanged { user_id, after, .. } => {
                (user_id, Change::Role(after.as_str()))
            }
            ConversationEvent::ParticipantMuted { user_id } => (user_id, Change::Muted(true)),
            ConversationEvent::ParticipantUnmuted { user_id } => (user_id, Change::Muted(false)),
        };
        self.participants
            .entry((id, user))
            .or_default()
            .push(change);
        Ok(())
    }

    /// Writes what is held: the conversations created, the rows changed, then the
    /// participants' changes wave by wave.
    pub(crate) async fn write(self, conn: &mut PgConnection) -> Result<(), GiveUp> {
        if self.is_empty() {
            return Ok(());
        }
        self.created.write(conn).await?;
        update_rows(conn, self.rows).await?;
        let mut waves: Vec<Wave> = Vec::new();
        for ((conversation, user), changes) in self.participants {
            for (k, change) in changes.into_iter().enumerate() {
                if waves.len() <= k {
                    waves.push(Wave::default());
                }
                waves[k].push(conversation, user, change);
            }
        }
        for wave in waves {
            wave.write(conn).await?;
        }
        Ok(())
    }
}

impl Created {
    /// As `messaging::apply_conversation_event` does for one.
    async fn write(self, conn: &mut PgConnection) -> Result<(), GiveUp> {
        if self.id.is_empty() {
            return Ok(());
        }
        let done = sqlx::query(
            "INSERT INTO conversations (id, organization_id, kind, title, description, \
             created_by, status, created_at, updated_at, version) \
             SELECT t.id, t.organization_id, t.kind, t.title, t.description, t.created_by, \
             'active', t.at, t.at, t.version \
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
             $6::uuid[], $7::timestamptz[], $8::bigint[]) \
             AS t(id, organization_id, kind, title, description, created_by, at, version)",
        )
        .bind(&self.id)
        .bind(&self.organization)
        .bind(&self.kind)
        .bind(&self.title)
        .bind(&self.description)
        .bind(&self.created_by)
        .bind(&self.at)
        .bind(&self.version)
        .execute(&mut *conn)
        .await?;
        exactly(self.id.len(), done.rows_affected() as i64)?;
        let p = self.participants;
        let done = sqlx::query(
            "INSERT INTO conversation_participants (conversation_id, user_id, \
             organization_id, role, joined_at) \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], \
             $5::timestamptz[])",
        )
        .bind(&p.conversation)
        .bind(&p.user)
        .bind(&p.organization)
        .bind(&p.role)
        .bind(&p.at)
        .execute(&mut *conn)
        .await?;
        exactly(p.conversation.len(), done.rows_affected() as i64)
    }
}

async fn update_rows(conn: &mut PgConnection, rows: HashMap<Uuid, Row>) -> Result<(), GiveUp> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let (mut id, mut set_spec, mut title, mut description) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut status, mut archived_at, mut updated_at, mut version) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (conversation, row) in rows {
        id.push(conversation);
        set_spec.push(row.spec.is_some());
        let (t, d) = row.spec.unwrap_or_default();
        title.push(t);
        description.push(d);
        status.push(
            row.archived
                .map(|a| if a.is_some() { "archived" } else { "active" }),
        );
        archived_at.push(row.archived.flatten());
        updated_at.push(row.updated_at);
        version.push(row.version);
    }
    let done = sqlx::query(
        "UPDATE conversations c SET \
         title = CASE WHEN t.set_spec THEN t.title ELSE c.title END, \
         description = CASE WHEN t.set_spec THEN t.description ELSE c.description END, \
         status = COALESCE(t.status, c.status), \
         archived_at = CASE WHEN t.status IS NULL THEN c.archived_at ELSE t.archived_at END, \
         updated_at = t.updated_at, version = t.version \
         FROM unnest($1::uuid[], $2::bool[], $3::text[], $4::text[], $5::text[], \
         $6::timestamptz[], $7::timestamptz[], $8::bigint[]) \
         AS t(id, set_spec, title, description, status, archived_at, updated_at, version) \
         WHERE c.id = t.id",
    )
    .bind(&id)
    .bind(&set_spec)
    .bind(&title)
    .bind(&description)
    .bind(&status)
    .bind(&archived_at)
    .bind(&updated_at)
    .bind(&version)
    .execute(&mut *conn)
    .await?;
    exactly(n, done.rows_affected() as i64)
}

/// One wave's changes, by kind; each (conversation, user) appears once.
#[derive(Default)]
struct Wave {
    added: Keys,
    added_role: Vec<&'static str>,
    added_at: Vec<DateTime<Utc>>,
    added_unwritten: Vec<i64>,
    removed: Keys,
    /// Role changes and mutes, each with the other column `None`.
    settings: Keys,
    role: Vec<Option<&'static str>>,
    muted: Vec<Option<bool>>,
}

#[derive(Default)]
struct Keys {
    conversation: Vec<Uuid>,
    user: Vec<Uuid>,
}

impl Keys {
    fn push(&mut self, conversation: Uuid, user: Uuid) {
        self.conversation.push(conversation);
        self.user.push(user);
    }
}

impl Wave {
    fn push(&mut self, conversation: Uuid, user: Uuid, change: Change) {
        match change {
            Change::Added {
                role,
                at,
                unwritten,
            } => {
                self.added.push(conversation, user);
                self.added_role.push(role);
                self.added_at.push(at);
                self.added_unwritten.push(unwritten);
            }
            Change::Removed => self.removed.push(conversation, user),
            Change::Role(role) => {
                self.settings.push(conversation, user);
                self.role.push(Some(role));
                self.muted.push(None);
            }
            Change::Muted(muted) => {
                self.settings.push(conversation, user);
                self.role.push(None);
                self.muted.push(Some(muted));
            }
        }
    }

    async fn write(self, conn: &mut PgConnection) -> Result<(), GiveUp> {
        if !self.removed.conversation.is_empty() {
            let done = sqlx::query(
                "DELETE FROM conversation_participants p \
                 USING unnest($1::uuid[], $2::uuid[]) AS t(conversation_id, user_id) \
                 WHERE p.conversation_id = t.conversation_id AND p.user_id = t.user_id",
            )
            .bind(&self.removed.conversation)
            .bind(&self.removed.user)
            .execute(&mut *conn)
            .await?;
            exactly(self.removed.conversation.len(), done.rows_affected() as i64)?;
        }
        if !self.added.conversation.is_empty() {
            // As `messaging::apply_conversation_event` does for one.
            let done = sqlx::query(
                "INSERT INTO conversation_participants (conversation_id, user_id, \
                 organization_id, role, joined_at, last_read_position) \
                 SELECT c.id, t.user_id, c.organization_id, t.role, t.at, \
                 GREATEST(t.unwritten, COALESCE(( \
                 SELECT max(m.position) FROM messages m WHERE m.conversation_id = c.id), 0)) \
                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], \
                 $5::bigint[]) AS t(conversation_id, user_id, role, at, unwritten) \
                 JOIN conversations c ON c.id = t.conversation_id",
            )
            .bind(&self.added.conversation)
            .bind(&self.added.user)
            .bind(&self.added_role)
            .bind(&self.added_at)
            .bind(&self.added_unwritten)
            .execute(&mut *conn)
            .await?;
            exactly(self.added.conversation.len(), done.rows_affected() as i64)?;
        }
        if !self.settings.conversation.is_empty() {
            // A role change or a mute, one per row: the other column is left as it is.
            let done = sqlx::query(
                "UPDATE conversation_participants p SET role = COALESCE(t.role, p.role), \
                 muted = COALESCE(t.muted, p.muted) \
                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bool[]) \
                 AS t(conversation_id, user_id, role, muted) \
                 WHERE p.conversation_id = t.conversation_id AND p.user_id = t.user_id",
            )
            .bind(&self.settings.conversation)
            .bind(&self.settings.user)
            .bind(&self.role)
            .bind(&self.muted)
            .execute(&mut *conn)
            .await?;
            exactly(
                self.settings.conversation.len(),
                done.rows_affected() as i64,
            )?;
        }
        Ok(())
    }
}
