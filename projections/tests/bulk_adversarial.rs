//! The multi-row path of `messaging` against one event at a time, over logs the per-event
//! code accepts but `bulk.rs`'s chat log never makes: reads and reactions by users who are
//! not participants and on deleted messages, participants removed and added back again and
//! again, erasures, archiving, conversations created mid-log; and over logs with one event
//! the per-event code fails on (it must fail at the same event, with the same error and
//! checkpoint). Written by a review of the fold (messaging_batch.rs); its own test binary,
//! as the fallback count is process-wide.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{
    hash_hex, key_every_post, message_keys, run_until_failure, sealed, snapshot, Actor, Ledger,
    Rng, TestDb,
};
use ledgerline_aggregates::conversation::{
    ConversationEvent, ConversationKind, ConversationSpec, Member, ParticipantRole,
};
use ledgerline_aggregates::message::{Attachment, MessageEvent};
use ledgerline_aggregates::user::UserEvent;
use ledgerline_projections::{bulk_fallbacks, reset, Projection};
use sqlx::PgPool;
use uuid::Uuid;

struct Msg {
    id: Uuid,
    conversation: Uuid,
    deleted: bool,
}

fn created(id: Uuid, org: Uuid, members: &BTreeSet<Uuid>) -> ConversationEvent {
    ConversationEvent::ConversationCreated {
        conversation_id: id,
        organization_id: org,
        kind: ConversationKind::Group,
        spec: ConversationSpec {
            title: Some("t".into()),
            description: None,
        },
        created_by: *members.iter().next().unwrap(),
        participants: members
            .iter()
            .map(|&user_id| Member {
                user_id,
                role: ParticipantRole::Member,
            })
            .collect(),
    }
}

/// A log the per-event code accepts, but adversarial: reads by non-members, reactions and
/// reads on deleted messages, many participant removals and re-additions, erasures,
/// conversations created mid-log.
async fn adversarial_log(ledger: &mut Ledger, seed: u64, steps: usize) {
    let org = Uuid::new_v4();
    let actor = Actor::api(org, None, Uuid::new_v4());
    let users: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let mut rng = Rng(seed);
    let mut members: BTreeMap<Uuid, BTreeSet<Uuid>> = BTreeMap::new();
    let mut convs: Vec<Uuid> = Vec::new();
    let mut msgs: Vec<Msg> = Vec::new();
    let mut reactions: BTreeSet<(usize, Uuid, &str)> = BTreeSet::new();
    let mut reads: BTreeSet<(usize, Uuid)> = BTreeSet::new();
    let mut archived: BTreeSet<Uuid> = BTreeSet::new();
    for _ in 0..steps {
        let roll = rng.below(100);
        if convs.is_empty() || roll < 3 {
            let id = Uuid::new_v4();
            let first: BTreeSet<Uuid> = users[..2 + rng.below(2)].iter().copied().collect();
            ledger
                .append("Conversation", id, &created(id, org, &first), &actor)
                .await;
            members.insert(id, first);
            convs.push(id);
            continue;
        }
        let user = users[rng.below(users.len())];
        if roll < 30 || msgs.is_empty() {
            let c = convs[rng.below(convs.len())];
            let id = Uuid::new_v4();
            let attachments = (0..rng.below(2))
                .map(|i| Attachment {
                    file_name: sealed(id, &format!("f{i}")),
                    mime_type: "text/plain".into(),
                    size_bytes: 1,
                    blake3: hash_hex(),
                })
                .collect();
            let e = MessageEvent::MessagePosted {
                message_id: id,
                conversation_id: c,
                organization_id: org,
                author_id: user,
                content: sealed(id, "Ym9keQ"),
                parent_message_id: None,
                thread_root_id: None,
                attachments,
            };
            ledger.append("Message", id, &e, &actor).await;
            msgs.push(Msg {
                id,
                conversation: c,
                deleted: false,
            });
            continue;
        }
        // Prefer recent messages, so that many events meet their post's batch.
        let i = if rng.below(2) == 0 {
            msgs.len() - 1 - rng.below(msgs.len().min(6))
        } else {
            rng.below(msgs.len())
        };
        let (mid, c) = (msgs[i].id, msgs[i].conversation);
        let emoji = ["a", "b"][rng.below(2)];
        let event = match roll {
            30..=44 if !reactions.contains(&(i, user, emoji)) => {
                reactions.insert((i, user, emoji));
                MessageEvent::ReactionAdded {
                    conversation_id: c,
                    user_id: user,
                    emoji: emoji.into(),
                }
            }
            45..=52 if reactions.contains(&(i, user, emoji)) => {
                reactions.remove(&(i, user, emoji));
                MessageEvent::ReactionRemoved {
                    conversation_id: c,
                    user_id: user,
                    emoji: emoji.into(),
                }
            }
            30..=64 if !reads.contains(&(i, user)) => {
                reads.insert((i, user));
                MessageEvent::MessageRead {
                    conversation_id: c,
                    user_id: user,
                }
            }
            65..=70 if !msgs[i].deleted => MessageEvent::MessageEdited {
                conversation_id: c,
                content: sealed(mid, &format!("ZWRpdA{}", rng.below(9))),
            },
            71..=74 if !msgs[i].deleted => {
                msgs[i].deleted = true;
                MessageEvent::MessageDeleted {
                    conversation_id: c,
                    by: Some(user),
                }
            }
            75..=95 => {
                let conv = convs[rng.below(convs.len())];
                let change = if members[&conv].contains(&user) {
                    match rng.below(4) {
                        0 | 1 => {
                            members.get_mut(&conv).unwrap().remove(&user);
                            ConversationEvent::ParticipantRemoved {
                                user_id: user,
                                by: None,
                            }
                        }
                        2 => ConversationEvent::ParticipantMuted { user_id: user },
                        // Beside mutes, removals and re-additions in one batch.
                        _ => ConversationEvent::ParticipantRoleChanged {
                            user_id: user,
                            before: ParticipantRole::Member,
                            after: [
                                ParticipantRole::Owner,
                                ParticipantRole::Admin,
                                ParticipantRole::Member,
                            ][rng.below(3)],
                        },
                    }
                } else {
                    members.get_mut(&conv).unwrap().insert(user);
                    ConversationEvent::ParticipantAdded {
                        user_id: user,
                        role: ParticipantRole::Member,
                    }
                };
                ledger.append("Conversation", conv, &change, &actor).await;
                continue;
            }
            96..=97 => {
                let conv = convs[rng.below(convs.len())];
                let e = if archived.remove(&conv) {
                    ConversationEvent::ConversationUnarchived {}
                } else {
                    archived.insert(conv);
                    ConversationEvent::ConversationArchived {}
                };
                ledger.append("Conversation", conv, &e, &actor).await;
                continue;
            }
            98..=99 => {
                let e = UserEvent::UserErased {
                    email_blind_index: "x".into(),
                };
                ledger.append("User", user, &e, &actor).await;
                continue;
            }
            _ => continue,
        };
        ledger.append("Message", mid, &event, &actor).await;
    }
}

/// Applies the log one event at a time, then in batches of each of `sizes`: the same
/// outcome, tables and message keys each time.
async fn compare(pool: &PgPool, sizes: &[i64]) {
    reset(pool, Some(&["messaging"])).await.unwrap();
    key_every_post(pool).await;
    let one = run_until_failure(pool, Projection::Messaging, 1).await;
    let snap1 = snapshot(pool).await;
    let keys1 = message_keys(pool).await;
    for &size in sizes {
        reset(pool, Some(&["messaging"])).await.unwrap();
        key_every_post(pool).await;
        let got = run_until_failure(pool, Projection::Messaging, size).await;
        assert_eq!(got, one, "outcome with batches of {size}");
        let snap = snapshot(pool).await;
        for ((table, a), (_, b)) in snap1.iter().zip(&snap) {
            if a != b {
                let only_a: Vec<_> = a.iter().filter(|r| !b.contains(r)).collect();
                let only_b: Vec<_> = b.iter().filter(|r| !a.contains(r)).collect();
                panic!(
                    "{table} differs with batches of {size}:\n one by one only: {only_a:#?}\n \
                     multi-row only: {only_b:#?}"
                );
            }
        }
        assert_eq!(message_keys(pool).await, keys1, "keys, size {size}");
    }
}

/// One test, so that the fallbacks the failing logs cause come after the count that must be
/// zero over the valid ones.
#[tokio::test]
async fn the_multi_row_path_agrees_with_one_event_at_a_time() {
    the_multi_row_path_agrees_over_logs_bulk_rs_does_not_make().await;
    the_multi_row_path_fails_where_one_by_one_does().await;
}

async fn the_multi_row_path_agrees_over_logs_bulk_rs_does_not_make() {
    for seed in [1u64, 7, 42, 99, 12345, 0xdead_beef] {
        let db = TestDb::new().await;
        let mut ledger = Ledger::new(&db.pool);
        adversarial_log(&mut ledger, seed, 1200).await;
        compare(&db.pool, &[5000, 301, 64, 8]).await;
        assert_eq!(
            bulk_fallbacks(),
            0,
            "every batch of 8 or more was multi-row"
        );
    }
}

async fn last(pool: &PgPool, event_type: &str) -> (Uuid, Uuid) {
    let (id, c): (String, String) = sqlx::query_as(
        "SELECT aggregate_id, payload::jsonb -> event_type ->> 'conversation_id' FROM events \
         WHERE event_type = $1 ORDER BY position DESC LIMIT 1",
    )
    .bind(event_type)
    .fetch_one(pool)
    .await
    .unwrap();
    (id.parse().unwrap(), c.parse().unwrap())
}

/// Each case puts one event the per-event code fails on into the middle of a log.
async fn the_multi_row_path_fails_where_one_by_one_does() {
    for case in 0..13 {
        let db = TestDb::new().await;
        let mut ledger = Ledger::new(&db.pool);
        adversarial_log(&mut ledger, 1000 + case, 500).await;
        let actor = Actor::api(Uuid::new_v4(), None, Uuid::new_v4());
        let (post, pc) = last(&db.pool, "MessagePosted").await;
        let (gone, gc) = last(&db.pool, "MessageDeleted").await;
        let conv: String = sqlx::query_scalar(
            "SELECT aggregate_id FROM events WHERE event_type = 'ConversationCreated' \
             ORDER BY position LIMIT 1",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let conv: Uuid = conv.parse().unwrap();
        let newcomer = Uuid::new_v4();
        match case {
            0 => {
                let e = MessageEvent::MessageEdited {
                    conversation_id: gc,
                    content: sealed(gone, "eA"),
                };
                ledger.append("Message", gone, &e, &actor).await;
            }
            1 => {
                let e = MessageEvent::ReactionRemoved {
                    conversation_id: pc,
                    user_id: newcomer,
                    emoji: "zzz".into(),
                };
                ledger.append("Message", post, &e, &actor).await;
            }
            2 => {
                let e = ConversationEvent::ParticipantRemoved {
                    user_id: newcomer,
                    by: None,
                };
                ledger.append("Conversation", conv, &e, &actor).await;
            }
            3 => {
                let e = ConversationEvent::ParticipantAdded {
                    user_id: newcomer,
                    role: ParticipantRole::Member,
                };
                ledger.append("Conversation", conv, &e, &actor).await;
                ledger.append("Conversation", conv, &e, &actor).await;
            }
            4 => {
                let e = MessageEvent::MessageDeleted {
                    conversation_id: pc,
                    by: None,
                };
                ledger.append("Message", post, &e, &actor).await;
                ledger.append("Message", post, &e, &actor).await;
            }
            5 => {
                let e = MessageEvent::MessageRead {
                    conversation_id: pc,
                    user_id: newcomer,
                };
                ledger.append("Message", post, &e, &actor).await;
                ledger.append("Message", post, &e, &actor).await;
            }
            6 => {
                let e = MessageEvent::MessageEdited {
                    conversation_id: Uuid::new_v4(),
                    content: sealed(post, "eA"),
                };
                ledger.append("Message", post, &e, &actor).await;
            }
            7 => {
                // A read of a message that is never posted.
                let e = MessageEvent::MessageRead {
                    conversation_id: pc,
                    user_id: newcomer,
                };
                ledger.append("Message", Uuid::new_v4(), &e, &actor).await;
            }
            8 => {
                // A participant's change in a conversation created afterwards.
                let c = Uuid::new_v4();
                let e = ConversationEvent::ParticipantMuted { user_id: newcomer };
                ledger.append("Conversation", c, &e, &actor).await;
                let only = created(c, Uuid::new_v4(), &[newcomer].into_iter().collect());
                ledger.append("Conversation", c, &only, &actor).await;
            }
            9 => {
                let e = ConversationEvent::ParticipantUnmuted { user_id: newcomer };
                ledger.append("Conversation", conv, &e, &actor).await;
            }
            11 => {
                // A conversation that was never created archived.
                let e = ConversationEvent::ConversationArchived {};
                ledger
                    .append("Conversation", Uuid::new_v4(), &e, &actor)
                    .await;
            }
            10 => {
                // A creation naming another conversation than its aggregate.
                let e = created(
                    Uuid::new_v4(),
                    Uuid::new_v4(),
                    &[newcomer].into_iter().collect(),
                );
                ledger
                    .append("Conversation", Uuid::new_v4(), &e, &actor)
                    .await;
            }
            _ => {
                // A post into a conversation created afterwards.
                let c = Uuid::new_v4();
                let id = Uuid::new_v4();
                let e = MessageEvent::MessagePosted {
                    message_id: id,
                    conversation_id: c,
                    organization_id: Uuid::new_v4(),
                    author_id: newcomer,
                    content: sealed(id, "Ym9keQ"),
                    parent_message_id: None,
                    thread_root_id: None,
                    attachments: vec![],
                };
                ledger.append("Message", id, &e, &actor).await;
                let only = created(c, Uuid::new_v4(), &[newcomer].into_iter().collect());
                ledger.append("Conversation", c, &only, &actor).await;
            }
        }
        adversarial_log(&mut ledger, 2000 + case, 150).await;
        compare(&db.pool, &[5000, 301, 64, 8]).await;
    }
}
