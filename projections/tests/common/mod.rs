//! Test support: a fresh, migrated database per test, and a writer of ledger rows that
//! stands in for the ledger store (the hash chain is not under test here).
#![allow(dead_code)] // each test binary uses a different part of it

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::DomainEvent;
use serde::Serialize;
use serde_json::{json, Map, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

/// The server, without a database name: `LEDGERLINE_TEST_ADMIN_URL` (as the app's tests
/// and `scripts/test` read it) with its database cut off.
fn admin_url() -> String {
    let admin = std::env::var("LEDGERLINE_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    match admin.rsplit_once('/') {
        Some((server, _)) if !server.ends_with('/') => server.to_string(),
        _ => admin,
    }
}

/// A database of its own, dropped (best effort) when the value goes out of scope, even when
/// the test panics.
pub struct TestDb {
    pub pool: PgPool,
    name: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!("ll_proj_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&format!("{}/postgres", admin_url()))
            .await
            .expect("connect to the test PostgreSQL");
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create the test database");
        admin.close().await.ok();
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect(&format!("{}/{name}", admin_url()))
            .await
            .expect("connect to the test database");
        sqlx::migrate!("../migrations")
            .run(&pool)
            .await
            .expect("migrate");
        TestDb { pool, name }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread
        // with a runtime of its own. FORCE ends the pool's connections.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut admin = PgConnection::connect(&format!("{}/postgres", admin_url()))
                    .await
                    .ok()?;
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                admin.execute(sql.as_str()).await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// Who did it and how: the metadata the service writes with each event.
#[derive(Debug, Clone)]
pub struct Actor {
    pub organization_id: Option<Uuid>,
    pub kind: &'static str,
    pub user_id: Option<Uuid>,
    pub key_id: Option<Uuid>,
}

impl Actor {
    /// A request authenticated by `key_id`, a key of `user_id` in `organization_id`.
    pub fn api(organization_id: Uuid, user_id: Option<Uuid>, key_id: Uuid) -> Actor {
        Actor {
            organization_id: Some(organization_id),
            kind: "api_key",
            user_id,
            key_id: Some(key_id),
        }
    }

    /// `ledgerline bootstrap`, acting for the platform (no organization).
    pub fn cli() -> Actor {
        Actor {
            organization_id: None,
            kind: "cli:bootstrap",
            user_id: None,
            key_id: None,
        }
    }

    /// The CLI acting inside an organization.
    pub fn cli_in(organization_id: Uuid) -> Actor {
        Actor {
            organization_id: Some(organization_id),
            ..Actor::cli()
        }
    }
}

/// The time the ledger records for the event at `position`: one second apart.
pub fn recorded_at(position: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(position)
}

/// Appends rows to `events` directly, numbering positions and sequences itself.
pub struct Ledger {
    pool: PgPool,
    position: i64,
    sequences: HashMap<(String, String), i64>,
}

impl Ledger {
    pub fn new(pool: &PgPool) -> Ledger {
        Ledger {
            pool: pool.clone(),
            position: 0,
            sequences: HashMap::new(),
        }
    }

    pub fn head(&self) -> i64 {
        self.position
    }

    /// Appends a real domain event, serialized as the ledger store does; returns its position.
    pub async fn append<E: Serialize + DomainEvent>(
        &mut self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        event: &E,
        actor: &Actor,
    ) -> i64 {
        let payload = serde_json::to_string(event).unwrap();
        let event_type = event.event_type();
        let version = event.event_version();
        self.append_raw(
            aggregate_type,
            &aggregate_id.to_string(),
            &event_type,
            &version,
            &payload,
            actor,
        )
        .await
    }

    /// Appends whatever text it is given, for events the projections must refuse.
    pub async fn append_raw(
        &mut self,
        aggregate_type: &str,
        aggregate_id: &str,
        event_type: &str,
        event_version: &str,
        payload: &str,
        actor: &Actor,
    ) -> i64 {
        self.position += 1;
        let key = (aggregate_type.to_string(), aggregate_id.to_string());
        let sequence = self.sequences.entry(key).or_insert(0);
        *sequence += 1;
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata, position, organization_id, recorded_at, \
             prev_hash, hash, hash_version) \
             VALUES ($1, $2, $3, $4, $5, $6::json, $7::json, $8, $9, $10, $11, $11, 2)",
        )
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(*sequence)
        .bind(event_type)
        .bind(event_version)
        .bind(payload)
        .bind(metadata(actor, self.position).to_string())
        .bind(self.position)
        .bind(actor.organization_id)
        .bind(recorded_at(self.position))
        .bind(vec![0u8; 32])
        .execute(&self.pool)
        .await
        .expect("append an event");
        self.position
    }
}

/// The metadata of the event at `position`, as the service would write it.
pub fn metadata(actor: &Actor, position: i64) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            m.insert(k.to_string(), Value::String(v));
        }
    };
    use ledgerline_aggregates::metadata as keys;
    put(
        keys::ORGANIZATION_ID,
        actor.organization_id.map(|u| u.to_string()),
    );
    put(keys::ACTOR_KIND, Some(actor.kind.to_string()));
    put(keys::ACTOR_USER_ID, actor.user_id.map(|u| u.to_string()));
    put(keys::ACTOR_KEY_ID, actor.key_id.map(|u| u.to_string()));
    put(keys::REQUEST_ID, Some(format!("req-{position}")));
    put(keys::CLIENT_IP, Some("203.0.113.7".to_string()));
    put(keys::USER_AGENT, Some("ledgerline-tests/1.0".to_string()));
    Value::Object(m)
}

/// A sealed value of the right shape (the projections never open it).
pub fn sealed(subject: Uuid, body: &str) -> ledgerline_aggregates::Sealed {
    ledgerline_aggregates::Sealed(format!("sealed:v1:{subject}:{body}"))
}

/// A 64-hex-digit stand-in for a BLAKE3 hash of a secret.
pub fn hash_hex() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

/// Every row of a table, as sorted JSON texts: what "identical contents" compares.
pub async fn rows(pool: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "SELECT to_jsonb(t)::text FROM {table} t ORDER BY 1"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The event types the log holds at least 5 of, sorted: that a generated log exercises
/// every kind of event a projection reads.
pub async fn frequent_event_types(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT event_type FROM events GROUP BY 1 HAVING count(*) >= 5 ORDER BY 1")
        .fetch_all(pool)
        .await
        .unwrap()
}

pub async fn checkpoint(pool: &PgPool, name: &str) -> i64 {
    sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .unwrap()
        .unwrap_or(0)
}

pub fn settings(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("settings must be an object"),
    }
}

pub fn empty_settings() -> Map<String, Value> {
    settings(json!({}))
}

/// The ids of the story [`populate`] writes.
#[derive(Debug, Clone, Copy)]
pub struct Story {
    pub org: Uuid,
    pub platform_key: Uuid,
    pub alice: Uuid,
    pub bob: Uuid,
    pub alice_key: Uuid,
    pub ops_role: Uuid,
    pub temp_role: Uuid,
    pub conversation: Uuid,
    /// Alice's first message: the root of a thread, with an attachment and bob's reaction.
    pub message: Uuid,
}

/// A story touching every projection and most event types: an organization with roles,
/// users (one erased), assignments, keys and a conversation between the two users.
pub async fn populate(ledger: &mut Ledger) -> Story {
    use ledgerline_aggregates::api_key::ApiKeyEvent;
    use ledgerline_aggregates::organization::{OrganizationEvent, OrganizationProfile};
    use ledgerline_aggregates::role::{RoleEvent, RoleSpec};
    use ledgerline_aggregates::user::UserEvent;
    use ledgerline_aggregates::Permission as P;

    let s = Story {
        org: Uuid::new_v4(),
        platform_key: Uuid::new_v4(),
        alice: Uuid::new_v4(),
        bob: Uuid::new_v4(),
        alice_key: Uuid::new_v4(),
        ops_role: Uuid::new_v4(),
        temp_role: Uuid::new_v4(),
        conversation: Uuid::new_v4(),
        message: Uuid::new_v4(),
    };
    let platform = Actor::cli();
    let admin = Actor::api(s.org, None, s.platform_key);
    let issued = ApiKeyEvent::ApiKeyIssued {
        key_id: s.platform_key,
        organization_id: None,
        user_id: None,
        label: "platform".into(),
        permissions: [P::PlatformAdmin].into(),
        expires_at: None,
        prefix: "ll_plat".into(),
        secret_hash: hash_hex(),
        bootstrap: true,
    };
    ledger
        .append("ApiKey", s.platform_key, &issued, &platform)
        .await;
    let profile = OrganizationProfile {
        name: "Acme".into(),
        slug: "acme".into(),
        country_code: Some("FR".into()),
        domain: Some("acme.example".into()),
        settings: settings(json!({"locale": "fr-FR", "retention_days": 400})),
    };
    let created = OrganizationEvent::OrganizationCreated {
        organization_id: s.org,
        profile: profile.clone(),
    };
    ledger.append("Organization", s.org, &created, &admin).await;
    let updated = OrganizationEvent::OrganizationUpdated {
        before: profile.clone(),
        after: OrganizationProfile {
            name: "Acme Corp".into(),
            ..profile
        },
    };
    ledger.append("Organization", s.org, &updated, &admin).await;

    for (role, name, perms) in [
        (s.ops_role, "ops", vec![P::UsersRead, P::KeysRead]),
        (s.temp_role, "temp", vec![P::AuditRead]),
    ] {
        let ev = RoleEvent::RoleCreated {
            role_id: role,
            organization_id: s.org,
            spec: RoleSpec {
                name: name.into(),
                description: format!("the {name} role"),
                permissions: perms.into_iter().collect(),
                parent_role_id: None,
            },
            built_in: false,
        };
        ledger.append("Role", role, &ev, &admin).await;
    }

    for (user, body) in [(s.alice, "YWxpY2U"), (s.bob, "Ym9i")] {
        let ev = UserEvent::UserInvited {
            user_id: user,
            organization_id: s.org,
            email: sealed(user, &format!("e-{body}")),
            full_name: sealed(user, &format!("n-{body}")),
            email_blind_index: format!("bi-{body}"),
        };
        ledger.append("User", user, &ev, &admin).await;
    }
    let assign = |role| UserEvent::UserRoleAssigned {
        role_id: role,
        expires_at: None,
        reason: Some("on call".into()),
    };
    ledger
        .append("User", s.alice, &assign(s.ops_role), &admin)
        .await;
    ledger
        .append("User", s.bob, &assign(s.temp_role), &admin)
        .await;
    ledger
        .append(
            "Role",
            s.temp_role,
            &RoleEvent::RoleDeleted {
                name: "temp".into(),
            },
            &admin,
        )
        .await;

    let alice_key = ApiKeyEvent::ApiKeyIssued {
        key_id: s.alice_key,
        organization_id: Some(s.org),
        user_id: Some(s.alice),
        label: "alice's laptop".into(),
        permissions: [P::UsersRead].into(),
        expires_at: Some(recorded_at(10_000)),
        prefix: "ll_alice1".into(),
        secret_hash: hash_hex(),
        bootstrap: false,
    };
    ledger
        .append("ApiKey", s.alice_key, &alice_key, &admin)
        .await;
    let rotated = ApiKeyEvent::ApiKeyRotated {
        prefix: "ll_alice2".into(),
        secret_hash: hash_hex(),
        previous_prefix: "ll_alice1".into(),
        previous_valid_until: None,
    };
    let as_alice = Actor::api(s.org, Some(s.alice), s.alice_key);
    ledger
        .append("ApiKey", s.alice_key, &rotated, &as_alice)
        .await;
    converse(ledger, &s, &admin).await;
    ledger
        .append(
            "User",
            s.bob,
            &UserEvent::UserErased {
                email_blind_index: "bi-Ym9i".into(),
            },
            &as_alice,
        )
        .await;
    ledger
        .append(
            "Organization",
            s.org,
            &OrganizationEvent::OrganizationSuspended {
                reason: Some("unpaid".into()),
            },
            &Actor::cli_in(s.org),
        )
        .await;
    s
}

/// Alice and bob talk (through the organization's service key, which acts for them): every
/// messaging table gets rows, and every kind of change to them happens at least once.
async fn converse(ledger: &mut Ledger, s: &Story, actor: &Actor) {
    use ledgerline_aggregates::conversation::{
        ConversationEvent as C, ConversationKind, ConversationSpec, Member, ParticipantRole,
    };
    use ledgerline_aggregates::message::{Attachment, MessageEvent as M};

    let spec = ConversationSpec {
        title: Some("launch".into()),
        description: None,
    };
    let created = C::ConversationCreated {
        conversation_id: s.conversation,
        organization_id: s.org,
        kind: ConversationKind::Group,
        spec: spec.clone(),
        created_by: s.alice,
        participants: vec![
            Member {
                user_id: s.alice,
                role: ParticipantRole::Owner,
            },
            Member {
                user_id: s.bob,
                role: ParticipantRole::Member,
            },
        ],
    };
    let updated = C::ConversationUpdated {
        before: spec,
        after: ConversationSpec {
            title: Some("launch week".into()),
            description: Some("everything about the launch".into()),
        },
    };
    for event in [created, updated, C::ParticipantMuted { user_id: s.bob }] {
        ledger
            .append("Conversation", s.conversation, &event, actor)
            .await;
    }

    let (reply, gone) = (Uuid::new_v4(), Uuid::new_v4());
    let post = |id: Uuid, author: Uuid, parent: Option<Uuid>, attachments: Vec<Attachment>| {
        M::MessagePosted {
            message_id: id,
            conversation_id: s.conversation,
            organization_id: s.org,
            author_id: author,
            content: sealed(id, "Ym9keQ"),
            parent_message_id: parent,
            thread_root_id: parent,
            attachments,
        }
    };
    let attachment = Attachment {
        file_name: sealed(s.message, "cGxhbi5wZGY"),
        mime_type: "application/pdf".into(),
        size_bytes: 48_213,
        blake3: hash_hex(),
    };
    let c = s.conversation;
    for (id, event) in [
        (s.message, post(s.message, s.alice, None, vec![attachment])),
        (reply, post(reply, s.bob, Some(s.message), vec![])),
        (gone, post(gone, s.alice, None, vec![])),
        (
            s.message,
            M::ReactionAdded {
                conversation_id: c,
                user_id: s.bob,
                emoji: "🎉".into(),
            },
        ),
        (
            s.message,
            M::MessageRead {
                conversation_id: c,
                user_id: s.bob,
            },
        ),
        (
            reply,
            M::MessageEdited {
                conversation_id: c,
                content: sealed(reply, "ZWRpdGVk"),
            },
        ),
        (
            gone,
            M::MessageDeleted {
                conversation_id: c,
                by: Some(s.alice),
            },
        ),
    ] {
        ledger.append("Message", id, &event, actor).await;
    }
}

/// Every read-model table, as [`rows`] sees it.
pub async fn snapshot(pool: &PgPool) -> Vec<(String, Vec<String>)> {
    let mut all = Vec::new();
    for table in [
        "organizations",
        "users",
        "roles",
        "role_permissions",
        "user_roles",
        "api_keys",
        "audit_events",
        "conversations",
        "conversation_participants",
        "messages",
        "message_attachments",
        "message_reactions",
        "message_reads",
    ] {
        all.push((table.to_string(), rows(pool, table).await));
    }
    all
}

/// xorshift64*: a log's choices follow a fixed seed (the ids are random, and with them the
/// order of the sets picked from).
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// A key for every message posted (the service layer writes them; the projection destroys
/// those of deleted messages), none for the others: run before each way of applying a log.
pub async fn key_every_post(pool: &PgPool) {
    sqlx::query("DELETE FROM message_keys")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO message_keys (message_id, author_id, organization_id, wrapped_key) \
         SELECT aggregate_id::uuid, (payload::jsonb #>> '{MessagePosted,author_id}')::uuid, \
         organization_id, '\\x00' FROM events WHERE event_type = 'MessagePosted'",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// The messages whose keys are left, in order.
pub async fn message_keys(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT message_id FROM message_keys ORDER BY message_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Runs `projection` to the head, `size` events per transaction; panics on a failure.
pub async fn run_to_head(pool: &PgPool, projection: ledgerline_projections::Projection, size: i64) {
    use ledgerline_projections::{run_batch, BatchOutcome};
    loop {
        match run_batch(pool, projection, size).await.unwrap() {
            BatchOutcome::Applied { applied, .. } if (applied as i64) < size => break,
            BatchOutcome::Applied { .. } => {}
            BatchOutcome::Failed { failure, .. } => panic!("{failure:?}"),
        }
    }
}

/// Runs `projection` to the head or to its first failure, `size` events per transaction:
/// (the failure's position and error, the checkpoint).
pub async fn run_until_failure(
    pool: &PgPool,
    projection: ledgerline_projections::Projection,
    size: i64,
) -> (Option<(i64, String)>, i64) {
    use ledgerline_projections::{run_batch, BatchOutcome};
    loop {
        match run_batch(pool, projection, size).await.unwrap() {
            BatchOutcome::Applied {
                applied,
                checkpoint,
            } if (applied as i64) < size => return (None, checkpoint),
            BatchOutcome::Applied { .. } => {}
            BatchOutcome::Failed {
                failure,
                checkpoint,
            } => return (Some((failure.position, failure.error)), checkpoint),
        }
    }
}

/// Applies `projection` from scratch one event at a time, then in batches of each of
/// `sizes`: the same outcome (failing event and error, checkpoint) and the same rows of its
/// tables each time. Returns the outcome's failure.
pub async fn agrees_in_batches(
    pool: &PgPool,
    projection: ledgerline_projections::Projection,
    sizes: &[i64],
) -> Option<(i64, String)> {
    let name = projection.name();
    let tables = || async {
        let mut all = Vec::new();
        for table in projection.tables() {
            all.push(rows(pool, table).await);
        }
        all
    };
    ledgerline_projections::reset(pool, Some(&[name]))
        .await
        .unwrap();
    let one = run_until_failure(pool, projection, 1).await;
    let left = tables().await;
    for &size in sizes {
        ledgerline_projections::reset(pool, Some(&[name]))
            .await
            .unwrap();
        assert_eq!(
            run_until_failure(pool, projection, size).await,
            one,
            "{name}: outcome with batches of {size}"
        );
        assert_eq!(
            tables().await,
            left,
            "{name}: tables with batches of {size}"
        );
    }
    one.0
}
