//! What erasing or deactivating a user does to their conversations: an erased user leaves
//! every one, and a conversation whose owner is erased or deactivated passes to the
//! longest-standing active participant (admins first), each step an event of the
//! Conversation attributed to whoever erased or deactivated them; an interrupted run is
//! finished by a retry or at start, never appending anything twice.

mod common;

use common::{Response, TestApp};
use ledgerline::api::departures;
use ledgerline::app::Actor;
use ledgerline_aggregates::conversation::{ConversationCommand, Departure};
use ledgerline_aggregates::user::UserCommand;
use serde_json::{json, Value};
use uuid::Uuid;

/// An organization with an owner (`boss`, who erases and deactivates), four members with
/// keys that may chat, and a service key that moderates conversations.
struct Org {
    t: TestApp,
    org: Uuid,
    boss: (Uuid, String),
    alice: (Uuid, String),
    bob: (Uuid, String),
    carol: (Uuid, String),
    dave: (Uuid, String),
    service: String,
}

async fn org() -> Org {
    let t = TestApp::spawn().await;
    let org = t.create_org("Departures Ltd").await;
    let boss = t.member_with_key(org, "owner", "boss@dep.example").await;
    let mut members = Vec::new();
    for name in ["alice", "bob", "carol", "dave"] {
        let email = format!("{name}@dep.example");
        members.push(t.member_with_key(org, "member", &email).await);
    }
    let r = t
        .post(
            &format!("/v1/organizations/{org}/api-keys"),
            &t.admin_key,
            json!({"label": "moderator", "permissions": ["conversations:read", "conversations:write"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let service = r.body["secret"].as_str().unwrap().to_string();
    let [alice, bob, carol, dave] = <[_; 4]>::try_from(members).unwrap();
    Org {
        t,
        org,
        boss,
        alice,
        bob,
        carol,
        dave,
        service,
    }
}

impl Org {
    fn path(&self, rest: &str) -> String {
        format!("/v1/organizations/{}{rest}", self.org)
    }

    /// A conversation of `kind` created by `key`'s user with `others`.
    async fn open(&self, key: &str, kind: &str, others: &[Uuid]) -> Uuid {
        let mut body = json!({"kind": kind, "participants": others});
        if kind != "direct" {
            body["title"] = json!("Plans");
        }
        let r = self.t.post(&self.path("/conversations"), key, body).await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["id"].as_str().unwrap().parse().unwrap()
    }

    /// `POST /users/{user}/{what}` (erase, deactivate, reactivate) by the owner.
    async fn user_status(&self, user: Uuid, what: &str) -> Response {
        self.t
            .post(
                &self.path(&format!("/users/{user}/{what}")),
                &self.boss.1,
                json!({}),
            )
            .await
    }

    /// (user, role) of each participant, as the service key reads them.
    async fn participants(&self, conv: Uuid) -> Vec<(Uuid, String)> {
        let r = self
            .t
            .get(&self.path(&format!("/conversations/{conv}")), &self.service)
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let mut all: Vec<(Uuid, String)> = r.body["participants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let user = p["user_id"].as_str().unwrap().parse().unwrap();
                (user, p["role"].as_str().unwrap().to_string())
            })
            .collect();
        all.sort();
        all
    }

    /// Asserts that conversation `conv`'s participants are `expected` (user, role).
    async fn has(&self, conv: Uuid, expected: &[(Uuid, &str)]) {
        let mut expected: Vec<(Uuid, String)> =
            expected.iter().map(|(u, r)| (*u, r.to_string())).collect();
        expected.sort();
        assert_eq!(self.participants(conv).await, expected);
    }

    /// `user` added to `conv` as `role` by Alice, its owner.
    async fn add(&self, conv: Uuid, user: Uuid, role: &str) {
        let r = self
            .t
            .post(
                &self.path(&format!("/conversations/{conv}/participants")),
                &self.alice.1,
                json!({"user_id": user, "role": role}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }

    /// The audit trail of aggregate `id`, oldest first.
    async fn trail(&self, id: Uuid) -> Vec<Value> {
        let r = self
            .t
            .get(
                &self.path(&format!("/audit-events?aggregate_id={id}&order=asc")),
                &self.t.admin_key,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["items"].as_array().unwrap().clone()
    }

    /// The events of conversation `conv`'s trail after the first `skip`, as (type, data).
    async fn changes(&self, conv: Uuid, skip: usize) -> Vec<(String, Value)> {
        self.trail(conv)
            .await
            .iter()
            .skip(skip)
            .map(|e| {
                let kind = e["event_type"].as_str().unwrap().to_string();
                (kind.clone(), e["event_data"][kind].clone())
            })
            .collect()
    }
}

#[tokio::test]
async fn an_erased_owner_leaves_and_the_longest_standing_admin_owns_the_group() {
    let o = org().await;
    // Bob and Carol join with the group, Dave later as an admin.
    let conv = o.open(&o.alice.1, "group", &[o.bob.0, o.carol.0]).await;
    o.add(conv, o.dave.0, "admin").await;
    let seen = o.trail(conv).await.len();

    let r = o.user_status(o.alice.0, "erase").await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Alice is gone and Dave, the admin, owns it.
    o.has(
        conv,
        &[
            (o.bob.0, "member"),
            (o.carol.0, "member"),
            (o.dave.0, "owner"),
        ],
    )
    .await;
    assert_eq!(
        o.changes(conv, seen).await,
        [
            (
                "ParticipantRemoved".to_string(),
                json!({"user_id": o.alice.0, "by": o.boss.0})
            ),
            (
                "ParticipantRoleChanged".to_string(),
                json!({"user_id": o.dave.0, "before": "admin", "after": "owner"})
            ),
        ]
    );
    // Why: the system appended them as part of the erasure's request, for whoever erased.
    let erased = o.trail(o.alice.0).await.pop().unwrap();
    assert_eq!(erased["event_type"], "UserErased");
    for event in &o.trail(conv).await[seen..] {
        assert_eq!(event["actor_kind"], "system:erasure", "{event}");
        assert_eq!(event["actor_user_id"], json!(o.boss.0), "{event}");
        assert_eq!(event["actor_key_id"], erased["actor_key_id"], "{event}");
        assert_eq!(event["request_id"], erased["request_id"], "{event}");
        assert_eq!(event["client_ip"], erased["client_ip"], "{event}");
        assert_eq!(event["user_agent"], erased["user_agent"], "{event}");
    }
    // The conversation's history names what changed: who takes part and who owns it.
    let r =
        o.t.get(
            &o.path(&format!("/history/conversation/{conv}")),
            &o.t.admin_key,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let items = r.body["items"].as_array().unwrap();
    let removal = &items[items.len() - 2]["changes"];
    let fields: Vec<&String> = removal["after"].as_object().unwrap().keys().collect();
    assert_eq!(fields, ["owner", "participants"], "{removal}");
    assert_eq!(removal["after"]["owner"], Value::Null, "{removal}");
    assert_eq!(
        items[items.len() - 1]["changes"]["after"]["owner"],
        json!(o.dave.0)
    );
    assert_eq!(items[items.len() - 1]["actor"]["kind"], "system:erasure");
    assert_eq!(
        items[items.len() - 1]["actor"]["key_prefix"],
        json!(o.boss.1[..15]),
        "the erasing request's secret"
    );
    // The new owner manages it.
    let r =
        o.t.patch(
            &o.path(&format!("/conversations/{conv}")),
            &o.dave.1,
            json!({"title": "Dave's plans"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn with_no_active_admin_the_longest_standing_active_member_owns_it() {
    let o = org().await;
    let conv = o
        .open(&o.alice.1, "group", &[o.bob.0, o.carol.0, o.dave.0])
        .await;
    assert_eq!(o.user_status(o.bob.0, "deactivate").await.status, 200);
    // Dave left and came back: he stands from his return, after Carol.
    let dave = o.path(&format!("/conversations/{conv}/participants/{}", o.dave.0));
    assert_eq!(o.t.delete(&dave, &o.alice.1).await.status, 204);
    o.add(conv, o.dave.0, "member").await;

    assert_eq!(o.user_status(o.alice.0, "erase").await.status, 200);
    // Bob, deactivated, is passed over.
    o.has(
        conv,
        &[
            (o.bob.0, "member"),
            (o.carol.0, "owner"),
            (o.dave.0, "member"),
        ],
    )
    .await;
}

#[tokio::test]
async fn an_erased_user_leaves_a_direct_conversation_to_the_other() {
    let o = org().await;
    let conv = o.open(&o.alice.1, "direct", &[o.bob.0]).await;
    let r =
        o.t.post(
            &o.path(&format!("/conversations/{conv}/messages")),
            &o.alice.1,
            json!({"content": "see you"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // Alice takes part in Bob's group too, as a member.
    let group = o.open(&o.bob.1, "group", &[o.alice.0, o.carol.0]).await;

    assert_eq!(o.user_status(o.alice.0, "erase").await.status, 200);
    o.has(conv, &[(o.bob.0, "owner")]).await;
    o.has(group, &[(o.bob.0, "owner"), (o.carol.0, "member")])
        .await;
    // Bob still has the conversation and its history (Alice's words erased).
    let r = o.t.get(&o.path("/conversations"), &o.bob.1).await;
    let listed: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert!(listed.contains(&conv.to_string().as_str()), "{}", r.body);
    let r =
        o.t.get(
            &o.path(&format!("/conversations/{conv}/messages")),
            &o.bob.1,
        )
        .await;
    assert_eq!(r.body["items"][0]["content_status"], "erased", "{}", r.body);
}

/// With no other active participant, the erased owner still leaves and the conversation
/// is left without an owner: a service key gives it one once someone can act.
#[tokio::test]
async fn with_no_one_able_to_take_over_the_conversation_is_left_without_an_owner() {
    let o = org().await;
    let conv = o.open(&o.alice.1, "group", &[o.bob.0]).await;
    let alone = o.open(&o.alice.1, "channel", &[]).await;
    assert_eq!(o.user_status(o.bob.0, "deactivate").await.status, 200);

    assert_eq!(o.user_status(o.alice.0, "erase").await.status, 200);
    o.has(conv, &[(o.bob.0, "member")]).await;
    assert_eq!(o.participants(alone).await, []);

    assert_eq!(o.user_status(o.bob.0, "reactivate").await.status, 200);
    let r =
        o.t.patch(
            &o.path(&format!("/conversations/{conv}/participants/{}", o.bob.0)),
            &o.service,
            json!({"role": "owner"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    o.has(conv, &[(o.bob.0, "owner")]).await;
}

/// A deactivated user may come back: they stay a participant, and hand on only ownership
/// (becoming an admin), which reactivation does not take back. With no one to take it,
/// they keep it.
#[tokio::test]
async fn a_deactivated_owner_stays_as_an_admin_and_hands_ownership_on() {
    let o = org().await;
    let conv = o.open(&o.alice.1, "group", &[o.bob.0, o.carol.0]).await;
    let direct = o.open(&o.alice.1, "direct", &[o.dave.0]).await;
    let dave_alone = o.open(&o.dave.1, "group", &[o.alice.0]).await;
    let seen = o.trail(conv).await.len();

    assert_eq!(o.user_status(o.alice.0, "deactivate").await.status, 200);
    o.has(
        conv,
        &[
            (o.alice.0, "admin"),
            (o.bob.0, "owner"),
            (o.carol.0, "member"),
        ],
    )
    .await;
    o.has(direct, &[(o.alice.0, "admin"), (o.dave.0, "owner")])
        .await;
    let trail = o.trail(conv).await;
    for event in &trail[seen..] {
        assert_eq!(event["actor_kind"], "system:deactivation", "{event}");
        assert_eq!(event["actor_user_id"], json!(o.boss.0), "{event}");
    }
    assert_eq!(
        trail.len(),
        seen + 2,
        "the new owner, and Alice stepping down"
    );

    assert_eq!(o.user_status(o.alice.0, "reactivate").await.status, 200);
    o.has(
        conv,
        &[
            (o.alice.0, "admin"),
            (o.bob.0, "owner"),
            (o.carol.0, "member"),
        ],
    )
    .await;

    // Dave's group has no one else who can act: deactivating him appends his deactivation
    // only, and he keeps it.
    assert_eq!(o.user_status(o.alice.0, "deactivate").await.status, 200);
    let head = o.t.head().await;
    assert_eq!(o.user_status(o.dave.0, "deactivate").await.status, 200);
    assert_eq!(o.t.head().await, head + 1, "UserDeactivated alone");
    o.has(dave_alone, &[(o.alice.0, "member"), (o.dave.0, "owner")])
        .await;
}

/// An erasure appended by a command whose handler stopped before the rest (a crash, as
/// `erasure_destroys_the_key_even_while_the_projection_cannot` makes one).
async fn erasure_cut_off(o: &Org, user: Uuid) {
    let by = Actor {
        kind: "api_key".into(),
        user_id: Some(o.boss.0),
        request_id: Uuid::new_v4().to_string(),
        ..Actor::default()
    };
    o.t.app
        .execute(
            &o.t.app.cqrs.users,
            user,
            Some(o.org),
            &by,
            UserCommand::Erase,
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_retried_erasure_finishes_what_was_cut_off_and_appends_nothing_twice() {
    let o = org().await;
    let owned = o.open(&o.alice.1, "group", &[o.bob.0, o.carol.0]).await;
    let joined = o.open(&o.bob.1, "group", &[o.alice.0]).await;
    erasure_cut_off(&o, o.alice.0).await;
    // The run got as far as Alice's own group.
    o.t.app
        .execute(
            &o.t.app.cqrs.conversations,
            owned,
            Some(o.org),
            &Actor::cli("test"),
            ConversationCommand::Withdraw {
                user_id: o.alice.0,
                departure: Departure::Erased { by: Some(o.boss.0) },
                able: [o.bob.0, o.carol.0].into(),
            },
        )
        .await
        .unwrap();
    let counts = || async {
        let mut counts = Vec::new();
        for conv in [owned, joined] {
            let changes = o.changes(conv, 0).await;
            let removed = changes
                .iter()
                .filter(|(kind, data)| {
                    kind == "ParticipantRemoved" && data["user_id"] == json!(o.alice.0)
                })
                .count();
            let owners = changes
                .iter()
                .filter(|(kind, data)| kind == "ParticipantRoleChanged" && data["after"] == "owner")
                .count();
            counts.push((removed, owners));
        }
        counts
    };
    let alice_in = |list: Vec<(Uuid, String)>| list.iter().any(|(u, _)| *u == o.alice.0);
    assert!(alice_in(o.participants(joined).await));

    // The retry is refused as already done, and finishes the rest.
    let r = o.user_status(o.alice.0, "erase").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(!alice_in(o.participants(owned).await));
    assert!(!alice_in(o.participants(joined).await));
    assert_eq!(counts().await, [(1, 1), (1, 0)]);
    o.has(owned, &[(o.bob.0, "owner"), (o.carol.0, "member")])
        .await;

    // Again, and at start: nothing more.
    let head = o.t.head().await;
    assert_eq!(o.user_status(o.alice.0, "erase").await.status, 409);
    assert_eq!(departures::settle_all(&o.t.app).await.unwrap(), 0);
    assert_eq!(o.t.head().await, head);
    assert_eq!(counts().await, [(1, 1), (1, 0)]);
}

/// Erasures and deactivations nobody retried (cut off, or made before this rule) are
/// settled when `serve` starts.
#[tokio::test]
async fn serve_settles_what_no_one_retried() {
    let o = org().await;
    let owned = o.open(&o.alice.1, "group", &[o.bob.0, o.carol.0]).await;
    let dave_owns = o.open(&o.dave.1, "group", &[o.carol.0]).await;
    erasure_cut_off(&o, o.alice.0).await;
    let by = Actor::cli("test");
    o.t.app
        .execute(
            &o.t.app.cqrs.users,
            o.dave.0,
            Some(o.org),
            &by,
            UserCommand::Deactivate { reason: None },
        )
        .await
        .unwrap();
    assert_eq!(departures::settle_all(&o.t.app).await.unwrap(), 2);
    o.has(owned, &[(o.bob.0, "owner"), (o.carol.0, "member")])
        .await;
    o.has(dave_owns, &[(o.carol.0, "owner"), (o.dave.0, "admin")])
        .await;
    let head = o.t.head().await;
    assert_eq!(departures::settle_all(&o.t.app).await.unwrap(), 0);
    assert_eq!(o.t.head().await, head);
}
