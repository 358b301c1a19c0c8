//! How conversations and messages land in the `messaging` read model: each event's effect on
//! its tables, read marks that only move forward, deletion and erasure destroying message
//! keys, inconsistent events stopping the projection, and a rebuild reproducing every table
//! while leaving `message_keys` alone.

mod common;

use chrono::{DateTime, Utc};
use common::{checkpoint, hash_hex, recorded_at, rows, sealed, Actor, Ledger, TestDb};
use ledgerline_aggregates::conversation::{
    ConversationEvent, ConversationKind, ConversationSpec, Member, ParticipantRole,
};
use ledgerline_aggregates::message::{Attachment, MessageEvent};
use ledgerline_aggregates::user::UserEvent;
use ledgerline_projections::{catch_up, reset, Projection, RunError};
use sqlx::PgPool;
use uuid::Uuid;

type Ts = DateTime<Utc>;

const TABLES: [&str; 6] = [
    "conversations",
    "conversation_participants",
    "messages",
    "message_attachments",
    "message_reactions",
    "message_reads",
];

/// An organization with three users, writing to the ledger through a service key.
struct Chat {
    db: TestDb,
    ledger: Ledger,
    actor: Actor,
    org: Uuid,
    alice: Uuid,
    bob: Uuid,
    carol: Uuid,
}

impl Chat {
    async fn new() -> Chat {
        let db = TestDb::new().await;
        let ledger = Ledger::new(&db.pool);
        let org = Uuid::new_v4();
        Chat {
            db,
            ledger,
            actor: Actor::api(org, None, Uuid::new_v4()),
            org,
            alice: Uuid::new_v4(),
            bob: Uuid::new_v4(),
            carol: Uuid::new_v4(),
        }
    }

    fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    async fn conversation(&mut self, id: Uuid, event: ConversationEvent) -> i64 {
        self.ledger
            .append("Conversation", id, &event, &self.actor)
            .await
    }

    async fn message(&mut self, id: Uuid, event: MessageEvent) -> i64 {
        self.ledger.append("Message", id, &event, &self.actor).await
    }

    /// A group owned by alice with bob as a member; returns its id.
    async fn group(&mut self) -> Uuid {
        let id = Uuid::new_v4();
        let created = ConversationEvent::ConversationCreated {
            conversation_id: id,
            organization_id: self.org,
            kind: ConversationKind::Group,
            spec: ConversationSpec {
                title: Some("launch".into()),
                description: Some("all about it".into()),
            },
            created_by: self.alice,
            participants: vec![
                member(self.alice, ParticipantRole::Owner),
                member(self.bob, ParticipantRole::Member),
            ],
        };
        self.conversation(id, created).await;
        id
    }

    /// A direct conversation `conversation_id` created by alice (the event only).
    fn direct(&self, conversation_id: Uuid, participants: Vec<Member>) -> ConversationEvent {
        ConversationEvent::ConversationCreated {
            conversation_id,
            organization_id: self.org,
            kind: ConversationKind::Direct,
            spec: ConversationSpec {
                title: None,
                description: None,
            },
            created_by: self.alice,
            participants,
        }
    }

    /// Posts a message without attachments; returns its id and position.
    async fn post(
        &mut self,
        conversation: Uuid,
        author: Uuid,
        parent: Option<Uuid>,
    ) -> (Uuid, i64) {
        let id = Uuid::new_v4();
        let position = self
            .message(
                id,
                posted(id, conversation, self.org, author, parent, vec![]),
            )
            .await;
        (id, position)
    }

    async fn read(&mut self, conversation: Uuid, message: Uuid, user: Uuid) -> i64 {
        let read = MessageEvent::MessageRead {
            conversation_id: conversation,
            user_id: user,
        };
        self.message(message, read).await
    }

    async fn add_message_key(&self, message: Uuid, author: Uuid) {
        sqlx::query(
            "INSERT INTO message_keys (message_id, author_id, organization_id, wrapped_key) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(message)
        .bind(author)
        .bind(self.org)
        .bind(vec![9u8; 48])
        .execute(self.pool())
        .await
        .unwrap();
    }

    /// An answer the API keeps for an `Idempotency-Key` replay, naming `subject`; its key.
    async fn kept_answer_naming(&self, subject: Uuid) -> String {
        let key = Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO idempotency_keys (api_key_id, key, fingerprint, method, path, \
             request_id, since_position, state, status, body, subjects) \
             VALUES ($1, $2, $3, 'POST', '/', 'r', 0, 'done', 201, 'sealed', ARRAY[$4])",
        )
        .bind(Uuid::new_v4())
        .bind(&key)
        .bind(vec![0u8; 32])
        .bind(subject)
        .execute(self.pool())
        .await
        .unwrap();
        key
    }

    async fn answer_kept(&self, key: &str) -> bool {
        sqlx::query_scalar("SELECT body IS NOT NULL FROM idempotency_keys WHERE key = $1")
            .bind(key)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    async fn message_keys(&self) -> Vec<Uuid> {
        sqlx::query_scalar("SELECT message_id FROM message_keys ORDER BY message_id")
            .fetch_all(self.pool())
            .await
            .unwrap()
    }
}

fn member(user_id: Uuid, role: ParticipantRole) -> Member {
    Member { user_id, role }
}

fn posted(
    id: Uuid,
    conversation: Uuid,
    org: Uuid,
    author: Uuid,
    parent: Option<Uuid>,
    attachments: Vec<Attachment>,
) -> MessageEvent {
    MessageEvent::MessagePosted {
        message_id: id,
        conversation_id: conversation,
        organization_id: org,
        author_id: author,
        content: sealed(id, "Ym9keQ"),
        parent_message_id: parent,
        thread_root_id: parent,
        attachments,
    }
}

fn attachment(message: Uuid, name: &str, mime: &str, size: i64) -> Attachment {
    Attachment {
        file_name: sealed(message, name),
        mime_type: mime.into(),
        size_bytes: size,
        blake3: hash_hex(),
    }
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct ConversationRow {
    organization_id: Uuid,
    kind: String,
    title: Option<String>,
    description: Option<String>,
    created_by: Uuid,
    status: String,
    archived_at: Option<Ts>,
    last_message_at: Option<Ts>,
    message_count: i64,
    created_at: Ts,
    updated_at: Ts,
    version: i64,
}

async fn conversation(pool: &PgPool, id: Uuid) -> ConversationRow {
    sqlx::query_as(
        "SELECT organization_id, kind, title, description, created_by, status, archived_at, \
         last_message_at, message_count, created_at, updated_at, version \
         FROM conversations WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct ParticipantRow {
    user_id: Uuid,
    organization_id: Uuid,
    role: String,
    muted: bool,
    joined_at: Ts,
    last_read_message_id: Option<Uuid>,
    last_read_position: i64,
    last_read_at: Option<Ts>,
}

async fn participants(pool: &PgPool, conversation: Uuid) -> Vec<ParticipantRow> {
    sqlx::query_as(
        "SELECT user_id, organization_id, role, muted, joined_at, last_read_message_id, \
         last_read_position, last_read_at FROM conversation_participants \
         WHERE conversation_id = $1 ORDER BY joined_at, role",
    )
    .bind(conversation)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct MessageRow {
    conversation_id: Uuid,
    organization_id: Uuid,
    author_id: Uuid,
    parent_message_id: Option<Uuid>,
    thread_root_id: Option<Uuid>,
    content_sealed: Option<String>,
    message_type: String,
    position: i64,
    created_at: Ts,
    edited_at: Option<Ts>,
    deleted_at: Option<Ts>,
    deleted_by: Option<Uuid>,
    version: i64,
}

async fn message(pool: &PgPool, id: Uuid) -> MessageRow {
    sqlx::query_as(
        "SELECT conversation_id, organization_id, author_id, parent_message_id, thread_root_id, \
         content_sealed, message_type, position, created_at, edited_at, deleted_at, deleted_by, \
         version FROM messages WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

type AttachmentRow = (i32, Uuid, Option<String>, String, i64, String, Ts);

async fn attachments(pool: &PgPool, message: Uuid) -> Vec<AttachmentRow> {
    sqlx::query_as(
        "SELECT ordinal, organization_id, file_name_sealed, mime_type, size_bytes, blake3, \
         created_at FROM message_attachments WHERE message_id = $1 ORDER BY ordinal",
    )
    .bind(message)
    .fetch_all(pool)
    .await
    .unwrap()
}

fn failed_at(result: Result<(), RunError>) -> (&'static str, i64) {
    match result {
        Err(RunError::Failed { name, position, .. }) => (name, position),
        other => panic!("expected a stopped projection, got {other:?}"),
    }
}

#[tokio::test]
async fn conversations_and_participants_follow_every_conversation_event() {
    let mut chat = Chat::new().await;
    let (alice, bob, carol) = (chat.alice, chat.bob, chat.carol);
    let c = chat.group().await;
    let spec = |title: &str| ConversationSpec {
        title: Some(title.into()),
        description: None,
    };
    let updated = ConversationEvent::ConversationUpdated {
        before: spec("launch"),
        after: spec("launch week"),
    };
    chat.conversation(c, updated).await;
    let added = ConversationEvent::ParticipantAdded {
        user_id: carol,
        role: ParticipantRole::Member,
    };
    let carol_joined = chat.conversation(c, added).await;
    let promoted = ConversationEvent::ParticipantRoleChanged {
        user_id: bob,
        before: ParticipantRole::Member,
        after: ParticipantRole::Admin,
    };
    chat.conversation(c, promoted).await;
    chat.conversation(c, ConversationEvent::ParticipantMuted { user_id: carol })
        .await;
    let archived = chat
        .conversation(c, ConversationEvent::ConversationArchived {})
        .await;
    catch_up(chat.pool()).await.unwrap();

    let row = conversation(chat.pool(), c).await;
    assert_eq!(
        row,
        ConversationRow {
            organization_id: chat.org,
            kind: "group".into(),
            title: Some("launch week".into()),
            description: None,
            created_by: alice,
            status: "archived".into(),
            archived_at: Some(recorded_at(archived)),
            last_message_at: None,
            message_count: 0,
            created_at: recorded_at(1),
            updated_at: recorded_at(archived),
            version: 6,
        }
    );
    let org = chat.org;
    let joined = |user_id, role: &str, muted, at| ParticipantRow {
        user_id,
        organization_id: org,
        role: role.into(),
        muted,
        joined_at: recorded_at(at),
        last_read_message_id: None,
        last_read_position: 0,
        last_read_at: None,
    };
    assert_eq!(
        participants(chat.pool(), c).await,
        vec![
            joined(bob, "admin", false, 1),
            joined(alice, "owner", false, 1),
            joined(carol, "member", true, carol_joined),
        ]
    );

    chat.conversation(c, ConversationEvent::ConversationUnarchived {})
        .await;
    chat.conversation(c, ConversationEvent::ParticipantUnmuted { user_id: carol })
        .await;
    let removed = ConversationEvent::ParticipantRemoved {
        user_id: bob,
        by: Some(alice),
    };
    let last = chat.conversation(c, removed).await;
    catch_up(chat.pool()).await.unwrap();
    let row = conversation(chat.pool(), c).await;
    assert_eq!(
        (
            row.status.as_str(),
            row.archived_at,
            row.updated_at,
            row.version
        ),
        ("active", None, recorded_at(last), 9)
    );
    assert_eq!(
        participants(chat.pool(), c).await,
        vec![
            joined(alice, "owner", false, 1),
            joined(carol, "member", false, carol_joined),
        ]
    );
}

#[tokio::test]
async fn posts_land_with_their_attachments_and_leave_the_conversation_version_alone() {
    let mut chat = Chat::new().await;
    let (alice, bob) = (chat.alice, chat.bob);
    let c = chat.group().await;
    let first = Uuid::new_v4();
    let files = vec![
        attachment(first, "cGxhbi5wZGY", "application/pdf", 48_213),
        attachment(first, "bWFwLnBuZw", "image/png", 0),
    ];
    let first_at = chat
        .message(
            first,
            posted(first, c, chat.org, alice, None, files.clone()),
        )
        .await;
    let (reply, reply_at) = chat.post(c, bob, Some(first)).await;
    let edited = MessageEvent::MessageEdited {
        conversation_id: c,
        content: sealed(first, "ZWRpdGVk"),
    };
    let edited_at = chat.message(first, edited).await;
    catch_up(chat.pool()).await.unwrap();

    assert_eq!(
        message(chat.pool(), first).await,
        MessageRow {
            conversation_id: c,
            organization_id: chat.org,
            author_id: alice,
            parent_message_id: None,
            thread_root_id: None,
            content_sealed: Some(format!("sealed:v1:{first}:ZWRpdGVk")),
            message_type: "text".into(),
            position: first_at,
            created_at: recorded_at(first_at),
            edited_at: Some(recorded_at(edited_at)),
            deleted_at: None,
            deleted_by: None,
            version: 2,
        }
    );
    let reply_row = message(chat.pool(), reply).await;
    assert_eq!(
        (
            reply_row.author_id,
            reply_row.parent_message_id,
            reply_row.thread_root_id,
            reply_row.position,
            reply_row.content_sealed,
            reply_row.version
        ),
        (
            bob,
            Some(first),
            Some(first),
            reply_at,
            Some(format!("sealed:v1:{reply}:Ym9keQ")),
            1
        )
    );
    let stored: Vec<AttachmentRow> = files
        .iter()
        .enumerate()
        .map(|(i, a)| {
            (
                i as i32,
                chat.org,
                Some(a.file_name.0.clone()),
                a.mime_type.clone(),
                a.size_bytes,
                a.blake3.clone(),
                recorded_at(first_at),
            )
        })
        .collect();
    assert_eq!(attachments(chat.pool(), first).await, stored);
    assert!(attachments(chat.pool(), reply).await.is_empty());

    let row = conversation(chat.pool(), c).await;
    assert_eq!(
        (row.message_count, row.last_message_at),
        (2, Some(recorded_at(reply_at)))
    );
    assert_eq!(
        (row.version, row.updated_at),
        (1, recorded_at(1)),
        "posts are not events of the conversation"
    );
    // Newest first, by position: what the conversation's pages are read by.
    let page: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM messages WHERE conversation_id = $1 ORDER BY position DESC",
    )
    .bind(c)
    .fetch_all(chat.pool())
    .await
    .unwrap();
    assert_eq!(page, vec![reply, first]);
}

#[tokio::test]
async fn reactions_are_added_and_removed_and_move_the_message_version() {
    let mut chat = Chat::new().await;
    let (alice, bob) = (chat.alice, chat.bob);
    let c = chat.group().await;
    let (m, _) = chat.post(c, alice, None).await;
    let react = |user_id, emoji: &str| MessageEvent::ReactionAdded {
        conversation_id: c,
        user_id,
        emoji: emoji.into(),
    };
    let bob_at = chat.message(m, react(bob, "🎉")).await;
    chat.message(m, react(bob, "👀")).await;
    let alice_at = chat.message(m, react(alice, "🎉")).await;
    let unreact = MessageEvent::ReactionRemoved {
        conversation_id: c,
        user_id: bob,
        emoji: "👀".into(),
    };
    chat.message(m, unreact).await;
    catch_up(chat.pool()).await.unwrap();

    let reactions: Vec<(Uuid, String, Uuid, Uuid, Ts)> = sqlx::query_as(
        "SELECT user_id, emoji, conversation_id, organization_id, created_at \
         FROM message_reactions WHERE message_id = $1 ORDER BY created_at",
    )
    .bind(m)
    .fetch_all(chat.pool())
    .await
    .unwrap();
    assert_eq!(
        reactions,
        vec![
            (bob, "🎉".into(), c, chat.org, recorded_at(bob_at)),
            (alice, "🎉".into(), c, chat.org, recorded_at(alice_at)),
        ]
    );
    assert_eq!(message(chat.pool(), m).await.version, 5);
}

#[tokio::test]
async fn read_marks_only_move_forward_and_skip_users_who_left() {
    let mut chat = Chat::new().await;
    let (alice, bob, carol) = (chat.alice, chat.bob, chat.carol);
    let c = chat.group().await;
    let added = ConversationEvent::ParticipantAdded {
        user_id: carol,
        role: ParticipantRole::Member,
    };
    chat.conversation(c, added).await;
    let (first, _) = chat.post(c, alice, None).await;
    let (second, second_at) = chat.post(c, alice, None).await;
    let (third, _) = chat.post(c, alice, None).await;
    let later_read = chat.read(c, second, bob).await;
    let earlier_read = chat.read(c, first, bob).await;
    let removed = ConversationEvent::ParticipantRemoved {
        user_id: carol,
        by: Some(carol),
    };
    chat.conversation(c, removed).await;
    let after_leaving = chat.read(c, third, carol).await;
    catch_up(chat.pool()).await.unwrap();

    let bob_row = participants(chat.pool(), c)
        .await
        .into_iter()
        .find(|p| p.user_id == bob)
        .unwrap();
    assert_eq!(
        (
            bob_row.last_read_message_id,
            bob_row.last_read_position,
            bob_row.last_read_at
        ),
        (Some(second), second_at, Some(recorded_at(later_read))),
        "reading an older message does not move the mark back"
    );
    assert!(participants(chat.pool(), c)
        .await
        .iter()
        .all(|p| p.user_id != carol));
    let reads: Vec<(Uuid, Uuid, Uuid, Ts, Uuid)> = sqlx::query_as(
        "SELECT message_id, user_id, conversation_id, read_at, organization_id \
         FROM message_reads ORDER BY read_at",
    )
    .fetch_all(chat.pool())
    .await
    .unwrap();
    let org = chat.org;
    assert_eq!(
        reads,
        vec![
            (second, bob, c, recorded_at(later_read), org),
            (first, bob, c, recorded_at(earlier_read), org),
            (third, carol, c, recorded_at(after_leaving), org),
        ],
        "every receipt is kept"
    );
    for (m, version) in [(first, 2), (second, 2), (third, 2)] {
        assert_eq!(message(chat.pool(), m).await.version, version);
    }

    // Unread counts come from the mark at read time: bob has one left, alice three.
    let unread: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT p.user_id, count(m.id) FROM conversation_participants p \
         LEFT JOIN messages m ON m.conversation_id = p.conversation_id \
         AND m.position > p.last_read_position AND m.deleted_at IS NULL \
         WHERE p.conversation_id = $1 GROUP BY p.user_id",
    )
    .bind(c)
    .fetch_all(chat.pool())
    .await
    .unwrap();
    let mut unread = unread;
    unread.sort();
    let mut expected = vec![(alice, 3), (bob, 1)];
    expected.sort();
    assert_eq!(unread, expected);
}

#[tokio::test]
async fn deleting_a_message_clears_its_content_file_names_and_key() {
    let mut chat = Chat::new().await;
    let (alice, bob) = (chat.alice, chat.bob);
    let c = chat.group().await;
    let doomed = Uuid::new_v4();
    let files = vec![attachment(doomed, "c2VjcmV0", "text/plain", 12)];
    let doomed_at = chat
        .message(
            doomed,
            posted(doomed, c, chat.org, alice, None, files.clone()),
        )
        .await;
    let (kept, _) = chat.post(c, bob, None).await;
    let (moderated, moderated_at) = chat.post(c, bob, None).await;
    chat.add_message_key(doomed, alice).await;
    chat.add_message_key(kept, bob).await;
    chat.add_message_key(moderated, bob).await;
    let (doomed_answer, kept_answer) = (
        chat.kept_answer_naming(doomed).await,
        chat.kept_answer_naming(kept).await,
    );
    let deleted = MessageEvent::MessageDeleted {
        conversation_id: c,
        by: Some(alice),
    };
    let deleted_at = chat.message(doomed, deleted).await;
    // A service key deletes without a user.
    let by_service = MessageEvent::MessageDeleted {
        conversation_id: c,
        by: None,
    };
    chat.message(moderated, by_service).await;
    catch_up(chat.pool()).await.unwrap();

    let row = message(chat.pool(), doomed).await;
    assert_eq!(
        (
            row.content_sealed,
            row.deleted_at,
            row.deleted_by,
            row.version
        ),
        (None, Some(recorded_at(deleted_at)), Some(alice), 2)
    );
    let row = message(chat.pool(), moderated).await;
    assert_eq!((row.content_sealed, row.deleted_by), (None, None));
    let a = &files[0];
    assert_eq!(
        attachments(chat.pool(), doomed).await,
        vec![(
            0,
            chat.org,
            None,
            a.mime_type.clone(),
            a.size_bytes,
            a.blake3.clone(),
            recorded_at(doomed_at)
        )],
        "the name goes, the description stays"
    );
    assert_eq!(chat.message_keys().await, vec![kept], "crypto-shredded");
    assert!(message(chat.pool(), kept).await.content_sealed.is_some());
    // With the key, the answers kept for replays that showed the message.
    assert!(!chat.answer_kept(&doomed_answer).await);
    assert!(chat.answer_kept(&kept_answer).await);
    let row = conversation(chat.pool(), c).await;
    assert_eq!(
        (row.message_count, row.last_message_at),
        (1, Some(recorded_at(moderated_at))),
        "deleted messages are not counted; the last activity stays"
    );
}

#[tokio::test]
async fn erasing_a_user_destroys_the_keys_of_their_messages_only() {
    let mut chat = Chat::new().await;
    let (alice, bob) = (chat.alice, chat.bob);
    let c = chat.group().await;
    let (a1, _) = chat.post(c, alice, None).await;
    let (a2, _) = chat.post(c, alice, None).await;
    let (b1, _) = chat.post(c, bob, None).await;
    for (m, author) in [(a1, alice), (a2, alice), (b1, bob)] {
        chat.add_message_key(m, author).await;
    }
    // Malformed User events that are not erasures are none of this projection's business.
    chat.ledger
        .append_raw(
            "User",
            &bob.to_string(),
            "UserInvited",
            "1",
            r#"{"UserInvited":{}}"#,
            &chat.actor,
        )
        .await;
    let erased = UserEvent::UserErased {
        email_blind_index: "bi-alice".into(),
    };
    let head = chat
        .ledger
        .append("User", alice, &erased, &chat.actor)
        .await;
    assert_eq!(failed_at(catch_up(chat.pool()).await).0, "users");
    assert_eq!(checkpoint(chat.pool(), "messaging").await, head);

    assert_eq!(chat.message_keys().await, vec![b1]);
    let sealed_left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM messages WHERE content_sealed IS NOT NULL")
            .fetch_one(chat.pool())
            .await
            .unwrap();
    assert_eq!(
        sealed_left, 3,
        "the ciphertext stays; without its key it is noise"
    );
}

#[tokio::test]
async fn events_that_do_not_fit_the_read_model_stop_the_projection() {
    // A post into a conversation the read model never saw.
    let mut chat = Chat::new().await;
    let (_, at) = chat.post(Uuid::new_v4(), chat.alice, None).await;
    assert_eq!(failed_at(catch_up(chat.pool()).await), ("messaging", at));
    assert!(
        rows(chat.pool(), "messages").await.is_empty(),
        "the insert is rolled back with the failed update"
    );

    // A reaction that names another conversation than the message's.
    let mut chat = Chat::new().await;
    let c = chat.group().await;
    let (m, _) = chat.post(c, chat.alice, None).await;
    let react = MessageEvent::ReactionAdded {
        conversation_id: Uuid::new_v4(),
        user_id: chat.bob,
        emoji: "🎉".into(),
    };
    let at = chat.message(m, react).await;
    assert_eq!(failed_at(catch_up(chat.pool()).await), ("messaging", at));

    // A creation event naming another conversation than its aggregate.
    let mut chat = Chat::new().await;
    let created = chat.direct(
        Uuid::new_v4(),
        vec![
            member(chat.alice, ParticipantRole::Owner),
            member(chat.bob, ParticipantRole::Member),
        ],
    );
    let at = chat.conversation(Uuid::new_v4(), created).await;
    assert_eq!(failed_at(catch_up(chat.pool()).await), ("messaging", at));
    let error: String = sqlx::query_scalar("SELECT error FROM projection_failures")
        .fetch_one(chat.pool())
        .await
        .unwrap();
    assert!(error.contains("ConversationCreated names"), "{error}");
}

/// The multi-row path must stop where the per-event code does, also when the conversation
/// a message names is created later in the same batch.
#[tokio::test]
async fn a_post_before_its_conversation_exists_stops_the_projection_in_a_batch_too() {
    let mut chat = Chat::new().await;
    let c = chat.group().await;
    let early = Uuid::new_v4();
    let (_, at) = chat.post(early, chat.alice, None).await;
    let created = chat.direct(early, vec![member(chat.alice, ParticipantRole::Owner)]);
    chat.conversation(early, created).await;
    // Enough events for one batch to take the multi-row path.
    for _ in 0..8 {
        chat.post(c, chat.bob, None).await;
    }
    assert_eq!(failed_at(catch_up(chat.pool()).await), ("messaging", at));
    // Applied up to the event before the post (the group's creation), and nothing after it.
    assert_eq!(checkpoint(chat.pool(), "messaging").await, at - 1);
    let conversations: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM conversations")
        .fetch_all(chat.pool())
        .await
        .unwrap();
    assert_eq!(conversations, vec![c]);
    assert!(rows(chat.pool(), "messages").await.is_empty());
}

/// A message posted in a batch is folded there with its later events (messaging_batch.rs);
/// what the per-event code fails on must stop the projection at the same event, applied up
/// to the event before it, also among the folded events.
#[tokio::test]
async fn what_a_posts_own_batch_cannot_apply_stops_the_projection_there() {
    let react = |conversation_id, user_id| MessageEvent::ReactionAdded {
        conversation_id,
        user_id,
        emoji: "🎉".into(),
    };
    for case in [
        "a reaction added twice",
        "a reaction removed that is not there",
        "a message deleted twice",
        "a message read twice by one user",
        "a reaction naming another conversation",
    ] {
        let mut chat = Chat::new().await;
        let c = chat.group().await;
        // Enough events before for the batch to take the multi-row path.
        for _ in 0..8 {
            chat.post(c, chat.bob, None).await;
        }
        let (m, _) = chat.post(c, chat.alice, None).await;
        let bob = chat.bob;
        let bad = match case {
            "a reaction added twice" => {
                chat.message(m, react(c, bob)).await;
                react(c, bob)
            }
            "a reaction removed that is not there" => MessageEvent::ReactionRemoved {
                conversation_id: c,
                user_id: bob,
                emoji: "🎉".into(),
            },
            "a message deleted twice" => {
                let delete = MessageEvent::MessageDeleted {
                    conversation_id: c,
                    by: Some(chat.alice),
                };
                chat.message(m, delete.clone()).await;
                delete
            }
            "a message read twice by one user" => {
                chat.read(c, m, bob).await;
                MessageEvent::MessageRead {
                    conversation_id: c,
                    user_id: bob,
                }
            }
            _ => react(Uuid::new_v4(), bob),
        };
        let at = chat.message(m, bad).await;
        chat.post(c, chat.bob, None).await;
        assert_eq!(
            failed_at(catch_up(chat.pool()).await),
            ("messaging", at),
            "{case}"
        );
        assert_eq!(checkpoint(chat.pool(), "messaging").await, at - 1, "{case}");
    }
}

#[tokio::test]
async fn a_rebuild_reproduces_the_messaging_tables_and_keeps_message_keys() {
    let mut chat = Chat::new().await;
    let (alice, bob, carol) = (chat.alice, chat.bob, chat.carol);
    let c = chat.group().await;
    let added = ConversationEvent::ParticipantAdded {
        user_id: carol,
        role: ParticipantRole::Member,
    };
    chat.conversation(c, added).await;
    let root = Uuid::new_v4();
    let files = vec![attachment(root, "YS50eHQ", "text/plain", 3)];
    chat.message(root, posted(root, c, chat.org, alice, None, files))
        .await;
    let (reply, _) = chat.post(c, bob, Some(root)).await;
    let (gone, _) = chat.post(c, carol, Some(root)).await;
    chat.read(c, reply, carol).await;
    chat.read(c, root, bob).await;
    let react = MessageEvent::ReactionAdded {
        conversation_id: c,
        user_id: carol,
        emoji: "🎉".into(),
    };
    chat.message(reply, react).await;
    let deleted = MessageEvent::MessageDeleted {
        conversation_id: c,
        by: Some(alice),
    };
    chat.message(gone, deleted).await;
    chat.conversation(c, ConversationEvent::ParticipantMuted { user_id: bob })
        .await;
    chat.add_message_key(root, alice).await;
    chat.add_message_key(reply, bob).await;
    catch_up(chat.pool()).await.unwrap();

    let snapshot = |pool: PgPool| async move {
        let mut all = Vec::new();
        for table in TABLES {
            all.push((table, rows(&pool, table).await));
        }
        all
    };
    let before = snapshot(chat.pool().clone()).await;
    assert!(
        before.iter().all(|(_, rows)| !rows.is_empty()),
        "{before:?}"
    );
    let keys = rows(chat.pool(), "message_keys").await;
    assert_eq!(keys.len(), 2);

    reset(chat.pool(), Some(&["messaging"])).await.unwrap();
    for table in TABLES {
        assert!(rows(chat.pool(), table).await.is_empty(), "{table} emptied");
    }
    assert_eq!(
        rows(chat.pool(), "message_keys").await,
        keys,
        "keys untouched"
    );
    catch_up(chat.pool()).await.unwrap();
    assert_eq!(snapshot(chat.pool().clone()).await, before);

    reset(chat.pool(), None).await.unwrap();
    catch_up(chat.pool()).await.unwrap();
    assert_eq!(snapshot(chat.pool().clone()).await, before);
    assert_eq!(rows(chat.pool(), "message_keys").await, keys);
}

#[tokio::test]
async fn messaging_is_a_projection_of_its_own_six_tables() {
    assert_eq!(
        Projection::from_name("messaging"),
        Some(Projection::Messaging)
    );
    assert!(Projection::ALL.contains(&Projection::Messaging));
    assert_eq!(Projection::Messaging.tables(), TABLES);
    let all: Vec<&str> = Projection::ALL
        .iter()
        .flat_map(|p| p.tables().iter().copied())
        .collect();
    assert!(
        !all.contains(&"message_keys"),
        "a rebuild must never truncate message keys"
    );
}
