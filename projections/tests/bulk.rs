//! The multi-row paths (`messaging`, `audit_events`) give exactly the tables that applying
//! one event at a time gives, over a long random chat log with every kind of event, in
//! batches cut at many different places; and they are really taken (no batch of a valid
//! log falls back to one by one). Its own test binary, so that the process-wide fallback
//! count is this test's alone.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::{
    hash_hex, key_every_post, message_keys, rows, run_to_head, sealed, snapshot, Actor, Ledger,
    Rng, TestDb,
};
use ledgerline_aggregates::conversation::{
    ConversationEvent, ConversationKind, ConversationSpec, Member, ParticipantRole,
};
use ledgerline_aggregates::message::{Attachment, MessageEvent};
use ledgerline_aggregates::metadata as keys;
use ledgerline_projections::{bulk_fallbacks, reset, run_batch, BatchOutcome, Projection};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

struct Message {
    conversation: Uuid,
    author: Uuid,
    deleted: bool,
}

/// Writes a chat log the projection applies without failing: messages and memberships as
/// the aggregates would accept them, tracked here; conversation settings (archiving,
/// muting, roles) set without regard to what they were, which the aggregates would refuse
/// but the projection takes as it comes.
async fn chat_log(ledger: &mut Ledger, steps: usize) {
    let org = Uuid::new_v4();
    let actor = Actor::api(org, None, Uuid::new_v4());
    let users: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut members: BTreeMap<Uuid, BTreeSet<Uuid>> = BTreeMap::new();
    // Enough conversations that a participant change often meets a batch with nothing
    // pending in its own conversation (the multi-row path then goes on past it).
    for _ in 0..8 {
        let id = Uuid::new_v4();
        let first: BTreeSet<Uuid> = users[..4].iter().copied().collect();
        let created = ConversationEvent::ConversationCreated {
            conversation_id: id,
            organization_id: org,
            kind: ConversationKind::Group,
            spec: ConversationSpec {
                title: Some("t".into()),
                description: None,
            },
            created_by: users[0],
            participants: first
                .iter()
                .map(|&user_id| Member {
                    user_id,
                    role: if user_id == users[0] {
                        ParticipantRole::Owner
                    } else {
                        ParticipantRole::Member
                    },
                })
                .collect(),
        };
        ledger.append("Conversation", id, &created, &actor).await;
        members.insert(id, first);
    }
    let conversations: Vec<Uuid> = members.keys().copied().collect();
    let mut messages: Vec<(Uuid, Message)> = Vec::new();
    let mut reactions: BTreeSet<(usize, Uuid, &str)> = BTreeSet::new();
    let mut reads: BTreeSet<(usize, Uuid)> = BTreeSet::new();
    for _ in 0..steps {
        let roll = rng.below(100);
        let live: Vec<usize> = (0..messages.len())
            .filter(|&i| !messages[i].1.deleted)
            .collect();
        if roll < 40 || live.is_empty() {
            let conversation = conversations[rng.below(conversations.len())];
            let in_it: Vec<Uuid> = members[&conversation].iter().copied().collect();
            let author = in_it[rng.below(in_it.len())];
            let id = Uuid::new_v4();
            let parent = messages
                .iter()
                .filter(|(_, m)| m.conversation == conversation)
                .map(|(id, _)| *id)
                .nth(rng.below(8))
                .filter(|_| rng.below(4) == 0);
            let attachments = (0..rng.below(3))
                .map(|i| Attachment {
                    file_name: sealed(id, &format!("f{i}")),
                    mime_type: "text/plain".into(),
                    size_bytes: 10 + i as i64,
                    blake3: hash_hex(),
                })
                .collect();
            let posted = MessageEvent::MessagePosted {
                message_id: id,
                conversation_id: conversation,
                organization_id: org,
                author_id: author,
                content: sealed(id, "Ym9keQ"),
                parent_message_id: parent,
                thread_root_id: parent,
                attachments,
            };
            ledger.append("Message", id, &posted, &actor).await;
            messages.push((
                id,
                Message {
                    conversation,
                    author,
                    deleted: false,
                },
            ));
            continue;
        }
        let i = live[rng.below(live.len())];
        let (id, conversation, author) = (
            messages[i].0,
            messages[i].1.conversation,
            messages[i].1.author,
        );
        let in_it: Vec<Uuid> = members[&conversation].iter().copied().collect();
        let user = in_it[rng.below(in_it.len())];
        let emoji = ["👍", "🎉", "❤"][rng.below(3)];
        let event = match roll {
            40..=54 if !reactions.contains(&(i, user, emoji)) => {
                reactions.insert((i, user, emoji));
                MessageEvent::ReactionAdded {
                    conversation_id: conversation,
                    user_id: user,
                    emoji: emoji.into(),
                }
            }
            55..=62 if !reactions.is_empty() => {
                // One of the reactions there are, wherever it is.
                let taken: Vec<(usize, Uuid, &str)> = reactions
                    .iter()
                    .copied()
                    .filter(|(m, ..)| !messages[*m].1.deleted)
                    .collect();
                let Some(&(m, user, emoji)) = taken.get(rng.below(taken.len().max(1))) else {
                    continue;
                };
                reactions.remove(&(m, user, emoji));
                let event = MessageEvent::ReactionRemoved {
                    conversation_id: messages[m].1.conversation,
                    user_id: user,
                    emoji: emoji.into(),
                };
                ledger
                    .append("Message", messages[m].0, &event, &actor)
                    .await;
                continue;
            }
            40..=77 if !reads.contains(&(i, user)) => {
                reads.insert((i, user));
                MessageEvent::MessageRead {
                    conversation_id: conversation,
                    user_id: user,
                }
            }
            78..=88 => MessageEvent::MessageEdited {
                conversation_id: conversation,
                content: sealed(id, &format!("ZWRpdA{}", rng.below(9))),
            },
            89..=91 => {
                messages[i].1.deleted = true;
                MessageEvent::MessageDeleted {
                    conversation_id: conversation,
                    by: Some(author),
                }
            }
            92..=99 => {
                let outside: Vec<Uuid> = users
                    .iter()
                    .copied()
                    .filter(|u| !members[&conversation].contains(u))
                    .collect();
                // A description given and taken away again: an update sets both columns.
                let spec = |title: String, described: bool| ConversationSpec {
                    title: Some(title),
                    description: described.then(|| "d".to_string()),
                };
                let change = match rng.below(4) {
                    0 if !outside.is_empty() => {
                        let user = outside[rng.below(outside.len())];
                        members.get_mut(&conversation).unwrap().insert(user);
                        ConversationEvent::ParticipantAdded {
                            user_id: user,
                            role: ParticipantRole::Member,
                        }
                    }
                    1 if user != users[0] => {
                        members.get_mut(&conversation).unwrap().remove(&user);
                        ConversationEvent::ParticipantRemoved {
                            user_id: user,
                            by: Some(users[0]),
                        }
                    }
                    _ => match rng.below(6) {
                        0 => ConversationEvent::ParticipantMuted { user_id: user },
                        1 => ConversationEvent::ParticipantUnmuted { user_id: user },
                        2 if user != users[0] => ConversationEvent::ParticipantRoleChanged {
                            user_id: user,
                            before: ParticipantRole::Member,
                            after: [ParticipantRole::Admin, ParticipantRole::Member][rng.below(2)],
                        },
                        3 => ConversationEvent::ConversationArchived {},
                        4 => ConversationEvent::ConversationUnarchived {},
                        _ => ConversationEvent::ConversationUpdated {
                            before: spec("t".into(), false),
                            after: spec(format!("t{}", rng.below(9)), rng.below(2) == 0),
                        },
                    },
                };
                ledger
                    .append("Conversation", conversation, &change, &actor)
                    .await;
                continue;
            }
            _ => continue,
        };
        ledger.append("Message", id, &event, &actor).await;
    }
}

/// Runs the two multi-row projections to the head, `size` events per transaction.
async fn run_in_batches(pool: &PgPool, size: i64) {
    for projection in [Projection::Messaging, Projection::AuditEvents] {
        run_to_head(pool, projection, size).await;
    }
}

#[tokio::test]
async fn the_multi_row_paths_give_the_tables_of_one_event_at_a_time() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    chat_log(&mut ledger, 1500).await;
    let kinds: Vec<(String, i64)> =
        sqlx::query_as("SELECT event_type, count(*) FROM events GROUP BY 1 ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for kind in [
        "MessagePosted",
        "ReactionAdded",
        "ReactionRemoved",
        "MessageRead",
        "MessageEdited",
        "MessageDeleted",
        "ParticipantAdded",
        "ParticipantRemoved",
        "ParticipantMuted",
        "ParticipantUnmuted",
        "ParticipantRoleChanged",
        "ConversationUpdated",
        "ConversationArchived",
        "ConversationUnarchived",
    ] {
        assert!(
            kinds.iter().any(|(k, n)| k == kind && *n >= 3),
            "the log has {kind}s: {kinds:?}"
        );
    }
    let names = ["messaging", "audit_events"];

    // One event per transaction: the per-event code, the definition.
    key_every_post(&db.pool).await;
    run_in_batches(&db.pool, 1).await;
    let one_by_one = snapshot(&db.pool).await;
    let keys_left = message_keys(&db.pool).await;
    assert!(
        one_by_one
            .iter()
            .any(|(t, rows)| t == "messages" && rows.len() > 400),
        "the log posted messages"
    );
    assert_eq!(bulk_fallbacks(), 0);

    for size in [1000, 97, 8] {
        reset(&db.pool, Some(&names)).await.unwrap();
        key_every_post(&db.pool).await;
        run_in_batches(&db.pool, size).await;
        let bulk = snapshot(&db.pool).await;
        for ((table, a), (_, b)) in one_by_one.iter().zip(&bulk) {
            assert_eq!(a, b, "{table} differs with batches of {size}");
        }
        assert_eq!(
            message_keys(&db.pool).await,
            keys_left,
            "the keys of deleted messages are destroyed with batches of {size}"
        );
        assert_eq!(bulk_fallbacks(), 0, "batches of {size} stayed multi-row");
    }
}

/// A projection reset or added to a running system catches up in long batches on pooled
/// connections, where PostgreSQL may switch a prepared statement to a generic plan after
/// five executions; one made while the tables were small assumes a hundred rows per array
/// and scanned `messages` whole on every batch as it grew (a catch-up of a million events
/// slowed to hundreds per second). The multi-row path plans each execution for its arrays.
#[tokio::test]
async fn the_multi_row_path_plans_every_batch_for_its_own_arrays() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    chat_log(&mut ledger, 3000).await;
    // One connection: every batch runs the same prepared statements.
    let one = PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*db.pool.connect_options()).clone())
        .await
        .unwrap();
    loop {
        match run_batch(&one, Projection::Messaging, 300).await.unwrap() {
            BatchOutcome::Applied { applied, .. } if applied < 300 => break,
            BatchOutcome::Applied { .. } => {}
            BatchOutcome::Failed { failure, .. } => panic!("{failure:?}"),
        }
    }
    let plans: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT left(statement, 60), custom_plans, generic_plans FROM pg_prepared_statements \
         WHERE statement LIKE '%unnest(%' AND statement NOT LIKE '%pg_prepared_statements%' \
         ORDER BY statement",
    )
    .fetch_all(&one)
    .await
    .unwrap();
    assert!(
        plans.iter().any(|(_, custom, _)| *custom > 5),
        "the multi-row statements ran more than five times: {plans:?}"
    );
    assert!(
        plans.iter().all(|(_, _, generic)| *generic == 0),
        "{plans:?}"
    );
    assert_eq!(bulk_fallbacks(), 0);
}

/// `audit_events`' `COPY` encodes every column itself: it must land what the per-event
/// statement's bound parameters land, also for the values a chat log does not hold: times
/// before 2000 and between seconds, far back and far ahead; no tenant and no metadata at all
/// (every nullable column NULL) beside empty texts; text beyond ASCII; a payload that `jsonb`
/// rewrites (a repeated key, key order, spacing, an escape).
#[tokio::test]
async fn the_copy_path_writes_every_kind_of_value_as_one_event_at_a_time_does() {
    let db = TestDb::new().await;
    let times: [DateTime<Utc>; 5] = [
        Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap() + Duration::microseconds(999_999),
        Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap() + Duration::microseconds(1),
        Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap() + Duration::microseconds(123_457),
        Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap() + Duration::microseconds(999_999),
        Utc.with_ymd_and_hms(2026, 7, 4, 12, 30, 5).unwrap() + Duration::microseconds(42),
    ];
    let head = 12;
    for position in 1..=head {
        let (org, user, key) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let (organization_id, metadata) = match position % 3 {
            0 => (None, json!({})),
            1 => (
                Some(org),
                json!({
                    keys::ORGANIZATION_ID: org.to_string(),
                    keys::ACTOR_KIND: "api_key",
                    keys::ACTOR_USER_ID: user.to_string(),
                    keys::ACTOR_KEY_ID: key.to_string(),
                    keys::REQUEST_ID: format!("réq-{position}-👍"),
                    keys::CLIENT_IP: "2001:db8::7",
                    keys::USER_AGENT: "Ünïcødé/1.0 (\"quoted\")",
                }),
            ),
            _ => (
                Some(org),
                json!({ keys::ACTOR_KIND: "", keys::REQUEST_ID: "", keys::USER_AGENT: "" }),
            ),
        };
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata, position, organization_id, recorded_at, \
             prev_hash, hash, hash_version) \
             VALUES ('Invoice', $1, $2, 'InvoiceSent', '1', $3::json, $4::json, $5, $6, $7, \
             $8, $8, 2)",
        )
        .bind(format!("inv-é-{}", position % 4))
        .bind(position)
        .bind(format!(
            r#"{{ "b": 1, "a": [1.50, "\u00e9", null, {{}}], "b": {position}, "t": "\t👍" }}"#
        ))
        .bind(metadata.to_string())
        .bind(position)
        .bind(organization_id)
        .bind(times[position as usize % times.len()])
        .bind(vec![0u8; 32])
        .execute(&db.pool)
        .await
        .unwrap();
    }

    run_to_head(&db.pool, Projection::AuditEvents, 1).await;
    let one_by_one = rows(&db.pool, "audit_events").await;
    assert_eq!(one_by_one.len(), head as usize);
    reset(&db.pool, Some(&["audit_events"])).await.unwrap();
    run_to_head(&db.pool, Projection::AuditEvents, 100).await;
    assert_eq!(bulk_fallbacks(), 0, "the batch was copied");
    assert_eq!(rows(&db.pool, "audit_events").await, one_by_one);
    let faithful: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events a JOIN events e USING (position) \
         WHERE a.recorded_at = e.recorded_at AND a.event_data = e.payload::jsonb \
         AND a.organization_id IS NOT DISTINCT FROM e.organization_id \
         AND a.aggregate_id = e.aggregate_id AND a.sequence = e.sequence",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(faithful, head);
    let nulls: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE organization_id IS NULL AND actor_kind IS NULL \
         AND actor_user_id IS NULL AND actor_key_id IS NULL AND request_id IS NULL \
         AND client_ip IS NULL AND user_agent IS NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        nulls,
        head / 3,
        "the events with no metadata have NULLs, not empty texts"
    );
}
