//! How each event lands in its read model: one test per projection, driven by real domain
//! events written to the ledger and applied with `catch_up`.

mod common;

use chrono::{DateTime, Utc};
use common::{checkpoint, populate, recorded_at, rows, sealed, settings, Actor, Ledger, TestDb};
use ledgerline_aggregates::api_key::ApiKeyEvent;
use ledgerline_aggregates::organization::{OrganizationEvent, OrganizationProfile};
use ledgerline_aggregates::role::{RoleEvent, RoleSpec};
use ledgerline_aggregates::user::UserEvent;
use ledgerline_aggregates::{Permission as P, PermissionSet};
use ledgerline_projections::{catch_up, names, Projection};
use serde_json::{json, Value};
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

type Ts = DateTime<Utc>;

fn spec(name: &str, permissions: &[P], parent: Option<Uuid>) -> RoleSpec {
    RoleSpec {
        name: name.into(),
        description: format!("{name} description"),
        permissions: permissions.iter().copied().collect::<PermissionSet>(),
        parent_role_id: parent,
    }
}

async fn role_permissions(pool: &PgPool, role: Uuid) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT permission FROM role_permissions WHERE role_id = $1 ORDER BY permission",
    )
    .bind(role)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_permission_catalogue_matches_the_domain() {
    let db = TestDb::new().await;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT name, description FROM permissions ORDER BY name")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let mut expected: Vec<(String, String)> = P::ALL
        .iter()
        .map(|p| (p.as_str().to_string(), p.description().to_string()))
        .collect();
    expected.sort();
    assert_eq!(rows, expected);
}

/// The log partitioned by organization (docs/scaling.md) needs every table it distributes
/// to name its tenant. Only platform rows (platform keys, platform events' audit rows) have
/// none; `organizations` is keyed by the tenant itself. `message_reads` and
/// `role_permissions` got theirs in 0008, nullable while older servers may still insert
/// without it (the projections' tests check that every row written now has it).
#[tokio::test]
async fn every_read_model_table_names_its_tenant() {
    let db = TestDb::new().await;
    for projection in Projection::ALL {
        for &table in projection.tables() {
            if table == "organizations" {
                continue;
            }
            let nullable: Option<String> = sqlx::query_scalar(
                "SELECT is_nullable::text FROM information_schema.columns \
                 WHERE table_schema = 'public' AND table_name = $1 \
                 AND column_name = 'organization_id'",
            )
            .bind(table)
            .fetch_optional(&db.pool)
            .await
            .unwrap();
            let nullable_now = [
                "api_keys",
                "audit_events",
                "message_reads",
                "role_permissions",
            ]
            .contains(&table);
            let expected = if nullable_now { "YES" } else { "NO" };
            assert_eq!(
                nullable.as_deref(),
                Some(expected),
                "{table}.organization_id"
            );
        }
    }
}

#[tokio::test]
async fn organizations_are_created_updated_suspended_and_reactivated() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let org = Uuid::new_v4();
    let actor = Actor::api(org, None, Uuid::new_v4());
    let profile = OrganizationProfile {
        name: "Acme".into(),
        slug: "acme".into(),
        country_code: Some("FR".into()),
        domain: None,
        settings: settings(json!({"locale": "fr-FR"})),
    };
    let created = OrganizationEvent::OrganizationCreated {
        organization_id: org,
        profile: profile.clone(),
    };
    ledger.append("Organization", org, &created, &actor).await;
    let after = OrganizationProfile {
        name: "Acme Corp".into(),
        slug: "acme-corp".into(),
        country_code: None,
        domain: Some("acme.example".into()),
        settings: settings(json!({"locale": "en-GB", "mfa": true})),
    };
    let updated = OrganizationEvent::OrganizationUpdated {
        before: profile,
        after,
    };
    ledger.append("Organization", org, &updated, &actor).await;
    let suspended = OrganizationEvent::OrganizationSuspended {
        reason: Some("unpaid".into()),
    };
    let suspended_at = ledger.append("Organization", org, &suspended, &actor).await;
    catch_up(&db.pool).await.unwrap();

    type Row = (
        String,
        String,
        Option<String>,
        Option<String>,
        Json<Value>,
        String,
        Option<Ts>,
        Option<String>,
        Ts,
        Ts,
        i64,
    );
    let select = "SELECT name, slug, country_code::text, domain, settings, status, suspended_at, \
                  suspension_reason, created_at, updated_at, version FROM organizations \
                  WHERE id = $1";
    let row: Row = sqlx::query_as(select)
        .bind(org)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(row.0, "Acme Corp");
    assert_eq!(row.1, "acme-corp");
    assert_eq!(row.2, None);
    assert_eq!(row.3.as_deref(), Some("acme.example"));
    assert_eq!(row.4 .0, json!({"locale": "en-GB", "mfa": true}));
    assert_eq!(row.5, "suspended");
    assert_eq!(row.6, Some(recorded_at(suspended_at)));
    assert_eq!(row.7.as_deref(), Some("unpaid"));
    assert_eq!(row.8, recorded_at(1));
    assert_eq!(row.9, recorded_at(suspended_at));
    assert_eq!(row.10, 3);

    let reactivated = OrganizationEvent::OrganizationReactivated {};
    let at = ledger
        .append("Organization", org, &reactivated, &actor)
        .await;
    catch_up(&db.pool).await.unwrap();
    let row: Row = sqlx::query_as(select)
        .bind(org)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!((row.5.as_str(), row.6, row.7), ("active", None, None));
    assert_eq!((row.9, row.10), (recorded_at(at), 4));
}

#[tokio::test]
async fn users_are_invited_updated_deactivated_and_erased_with_their_key() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let (org, user, other) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for subject in [user, other] {
        sqlx::query("INSERT INTO subject_keys (subject_id, organization_id, wrapped_key) VALUES ($1, $2, $3)")
            .bind(subject)
            .bind(org)
            .bind(vec![7u8; 48])
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let actor = Actor::api(org, Some(other), Uuid::new_v4());
    let invited = UserEvent::UserInvited {
        user_id: user,
        organization_id: org,
        email: sealed(user, "ZW1haWw"),
        full_name: sealed(user, "bmFtZQ"),
        email_blind_index: "bi-1".into(),
    };
    ledger.append("User", user, &invited, &actor).await;
    let renamed = UserEvent::UserProfileUpdated {
        email: None,
        email_blind_index: None,
        previous_email_blind_index: None,
        full_name: Some(sealed(user, "bmV3")),
    };
    ledger.append("User", user, &renamed, &actor).await;
    let deactivated = UserEvent::UserDeactivated {
        reason: Some("left".into()),
    };
    let deactivated_at = ledger.append("User", user, &deactivated, &actor).await;
    catch_up(&db.pool).await.unwrap();

    type Row = (
        Uuid,
        Option<String>,
        Option<String>,
        Option<String>,
        String,
        Option<String>,
    );
    type Times = (Ts, Ts, Option<Ts>, Option<Ts>, i64);
    let select = "SELECT organization_id, email_sealed, full_name_sealed, email_blind_index, \
                  status, deactivation_reason FROM users WHERE id = $1";
    let times = "SELECT created_at, updated_at, deactivated_at, erased_at, version FROM users \
                 WHERE id = $1";
    let row: Row = sqlx::query_as(select)
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(row.0, org);
    assert_eq!(
        row.1.as_deref(),
        Some(format!("sealed:v1:{user}:ZW1haWw").as_str())
    );
    assert_eq!(
        row.2.as_deref(),
        Some(format!("sealed:v1:{user}:bmV3").as_str())
    );
    assert_eq!(row.3.as_deref(), Some("bi-1"));
    assert_eq!(
        (row.4.as_str(), row.5.as_deref()),
        ("deactivated", Some("left"))
    );
    let t: Times = sqlx::query_as(times)
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let deactivated_ts = recorded_at(deactivated_at);
    assert_eq!(
        t,
        (
            recorded_at(1),
            deactivated_ts,
            Some(deactivated_ts),
            None,
            3
        )
    );

    ledger
        .append("User", user, &UserEvent::UserReactivated {}, &actor)
        .await;
    let erased = UserEvent::UserErased {
        email_blind_index: "bi-1".into(),
    };
    let erased_at = ledger.append("User", user, &erased, &actor).await;
    catch_up(&db.pool).await.unwrap();

    let row: Row = sqlx::query_as(select)
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (row.1, row.2, row.3),
        (None, None, None),
        "sealed data is gone"
    );
    assert_eq!((row.4.as_str(), row.5), ("erased", None));
    let t: Times = sqlx::query_as(times)
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!((t.2, t.3, t.4), (None, Some(recorded_at(erased_at)), 5));
    let keys: Vec<Uuid> = sqlx::query_scalar("SELECT subject_id FROM subject_keys")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(keys, vec![other], "only the erased user's key is destroyed");
}

#[tokio::test]
async fn roles_are_created_updated_and_deleted_with_their_own_permissions() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let (org, parent, child) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let actor = Actor::api(org, None, Uuid::new_v4());
    let parent_spec = spec("admin", &[P::UsersRead, P::UsersWrite], None);
    let created = RoleEvent::RoleCreated {
        role_id: parent,
        organization_id: org,
        spec: parent_spec,
        built_in: true,
    };
    ledger.append("Role", parent, &created, &actor).await;
    let child_spec = spec("ops", &[P::RolesRead, P::KeysRead], Some(parent));
    let created = RoleEvent::RoleCreated {
        role_id: child,
        organization_id: org,
        spec: child_spec.clone(),
        built_in: false,
    };
    ledger.append("Role", child, &created, &actor).await;
    let after = RoleSpec {
        name: "operations".into(),
        ..spec("x", &[P::KeysRead, P::AuditRead], None)
    };
    let updated = RoleEvent::RoleUpdated {
        before: child_spec,
        after,
    };
    let updated_at = ledger.append("Role", child, &updated, &actor).await;
    catch_up(&db.pool).await.unwrap();

    type Row = (Uuid, String, String, Option<Uuid>, bool, Ts, Ts, i64);
    let select = "SELECT organization_id, name, description, parent_role_id, is_built_in, \
                  created_at, updated_at, version FROM roles WHERE id = $1";
    let row: Row = sqlx::query_as(select)
        .bind(child)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        row,
        (
            org,
            "operations".into(),
            "x description".into(),
            None,
            false,
            recorded_at(2),
            recorded_at(updated_at),
            2
        )
    );
    let row: Row = sqlx::query_as(select)
        .bind(parent)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(row.4, "built-in");
    assert_eq!(
        role_permissions(&db.pool, child).await,
        ["audit:read", "keys:read"]
    );
    assert_eq!(
        role_permissions(&db.pool, parent).await,
        ["users:read", "users:write"]
    );
    let tenants: Vec<Uuid> =
        sqlx::query_scalar("SELECT DISTINCT organization_id FROM role_permissions")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        tenants,
        [org],
        "each permission row names the role's tenant"
    );

    ledger
        .append(
            "Role",
            child,
            &RoleEvent::RoleDeleted {
                name: "operations".into(),
            },
            &actor,
        )
        .await;
    catch_up(&db.pool).await.unwrap();
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM roles")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, vec![parent]);
    assert!(role_permissions(&db.pool, child).await.is_empty());
    assert_eq!(role_permissions(&db.pool, parent).await.len(), 2);
}

#[tokio::test]
async fn role_assignments_follow_assign_revoke_and_role_deletion() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let (org, user, admin_user, admin_key) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let (ops, audit) = (Uuid::new_v4(), Uuid::new_v4());
    let actor = Actor::api(org, Some(admin_user), admin_key);
    let invited = UserEvent::UserInvited {
        user_id: user,
        organization_id: org,
        email: sealed(user, "ZQ"),
        full_name: sealed(user, "bg"),
        email_blind_index: "bi".into(),
    };
    ledger.append("User", user, &invited, &actor).await;
    for (role, name) in [(ops, "ops"), (audit, "audit")] {
        let created = RoleEvent::RoleCreated {
            role_id: role,
            organization_id: org,
            spec: spec(name, &[P::AuditRead], None),
            built_in: false,
        };
        ledger.append("Role", role, &created, &actor).await;
    }
    let expires = recorded_at(86_400);
    let assign = UserEvent::UserRoleAssigned {
        role_id: ops,
        expires_at: Some(expires),
        reason: Some("on call".into()),
    };
    let assigned_at = ledger.append("User", user, &assign, &actor).await;
    let assign = UserEvent::UserRoleAssigned {
        role_id: audit,
        expires_at: None,
        reason: None,
    };
    ledger
        .append("User", user, &assign, &Actor::cli_in(org))
        .await;
    catch_up(&db.pool).await.unwrap();

    type Row = (
        Uuid,
        Uuid,
        Option<Uuid>,
        Option<Uuid>,
        Option<String>,
        Option<Ts>,
        Ts,
    );
    let select = "SELECT role_id, organization_id, assigned_by_user_id, assigned_by_key_id, \
                  reason, expires_at, assigned_at FROM user_roles WHERE user_id = $1 \
                  ORDER BY assigned_at";
    let assigned: Vec<Row> = sqlx::query_as(select)
        .bind(user)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        assigned,
        vec![
            (
                ops,
                org,
                Some(admin_user),
                Some(admin_key),
                Some("on call".into()),
                Some(expires),
                recorded_at(assigned_at)
            ),
            (
                audit,
                org,
                None,
                None,
                None,
                None,
                recorded_at(assigned_at + 1)
            ),
        ]
    );

    let revoke = UserEvent::UserRoleRevoked {
        role_id: audit,
        reason: Some("done".into()),
    };
    ledger.append("User", user, &revoke, &actor).await;
    let again = UserEvent::UserRoleAssigned {
        role_id: ops,
        expires_at: None,
        reason: Some("permanent".into()),
    };
    let again_at = ledger
        .append("User", user, &again, &Actor::cli_in(org))
        .await;
    catch_up(&db.pool).await.unwrap();
    let assigned: Vec<Row> = sqlx::query_as(select)
        .bind(user)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        assigned,
        vec![(
            ops,
            org,
            None,
            None,
            Some("permanent".into()),
            None,
            recorded_at(again_at)
        )],
        "revoked role gone, re-assignment replaces the old terms"
    );

    ledger
        .append(
            "Role",
            ops,
            &RoleEvent::RoleDeleted { name: "ops".into() },
            &actor,
        )
        .await;
    catch_up(&db.pool).await.unwrap();
    assert!(
        rows(&db.pool, "user_roles").await.is_empty(),
        "a deleted role grants nothing"
    );
    let version: i64 = sqlx::query_scalar("SELECT version FROM users WHERE id = $1")
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(version, 5, "assignments move the user's version");
}

#[tokio::test]
async fn api_keys_are_issued_rotated_and_revoked_as_hashes_only() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let (org, user, key, platform_key) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let (h0, h1, h2) = (common::hash_hex(), common::hash_hex(), common::hash_hex());
    let bootstrap = ApiKeyEvent::ApiKeyIssued {
        key_id: platform_key,
        organization_id: None,
        user_id: None,
        label: "platform".into(),
        permissions: [P::PlatformAdmin].into(),
        expires_at: None,
        prefix: "ll_p".into(),
        secret_hash: h0.clone(),
        bootstrap: true,
    };
    ledger
        .append("ApiKey", platform_key, &bootstrap, &Actor::cli())
        .await;
    let issued = ApiKeyEvent::ApiKeyIssued {
        key_id: key,
        organization_id: Some(org),
        user_id: Some(user),
        label: "ci".into(),
        permissions: [P::UsersRead, P::KeysRead].into(),
        expires_at: Some(recorded_at(1_000)),
        prefix: "ll_a".into(),
        secret_hash: h1,
        bootstrap: false,
    };
    let actor = Actor::api(org, None, platform_key);
    ledger.append("ApiKey", key, &issued, &actor).await;
    let rotated = ApiKeyEvent::ApiKeyRotated {
        prefix: "ll_b".into(),
        secret_hash: h2.clone(),
        previous_prefix: "ll_a".into(),
        previous_valid_until: None,
    };
    let rotated_at = ledger.append("ApiKey", key, &rotated, &actor).await;
    let revoked = ApiKeyEvent::ApiKeyRevoked {
        reason: Some("leaked".into()),
    };
    let revoked_at = ledger.append("ApiKey", key, &revoked, &actor).await;
    catch_up(&db.pool).await.unwrap();

    let select = "SELECT organization_id, user_id, label, prefix, key_hash, permissions, status, \
                  expires_at, created_at, revoked_at, revocation_reason, rotated_at, \
                  created_by_key_id, version FROM api_keys WHERE id = $1";
    let row: KeyRow = sqlx::query_as(select)
        .bind(key)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        row,
        KeyRow {
            organization_id: Some(org),
            user_id: Some(user),
            label: "ci".into(),
            prefix: "ll_b".into(),
            key_hash: h2,
            permissions: vec!["users:read".into(), "keys:read".into()],
            status: "revoked".into(),
            expires_at: Some(recorded_at(1_000)),
            created_at: recorded_at(2),
            revoked_at: Some(recorded_at(revoked_at)),
            revocation_reason: Some("leaked".into()),
            rotated_at: Some(recorded_at(rotated_at)),
            created_by_key_id: Some(platform_key),
            version: 3,
        }
    );
    let row: KeyRow = sqlx::query_as(select)
        .bind(platform_key)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!((row.organization_id, row.user_id), (None, None));
    assert_eq!(
        (row.prefix.as_str(), row.key_hash.as_str()),
        ("ll_p", h0.as_str())
    );
    assert_eq!(
        (row.status.as_str(), row.created_by_key_id),
        ("active", None)
    );
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct KeyRow {
    organization_id: Option<Uuid>,
    user_id: Option<Uuid>,
    label: String,
    prefix: String,
    key_hash: String,
    permissions: Vec<String>,
    status: String,
    expires_at: Option<Ts>,
    created_at: Ts,
    revoked_at: Option<Ts>,
    revocation_reason: Option<String>,
    rotated_at: Option<Ts>,
    created_by_key_id: Option<Uuid>,
    version: i64,
}

#[tokio::test]
async fn audit_events_mirror_every_event_with_who_and_how() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let story = populate(&mut ledger).await;
    // An aggregate type no domain projection reads: mirrored, ignored elsewhere.
    let invoice = Actor::api(story.org, Some(story.alice), story.alice_key);
    ledger
        .append_raw(
            "Invoice",
            "inv-1",
            "InvoiceSent",
            "1",
            r#"{"InvoiceSent":{"total":12}}"#,
            &invoice,
        )
        .await;
    catch_up(&db.pool).await.unwrap();
    for name in names() {
        assert_eq!(
            checkpoint(&db.pool, name).await,
            ledger.head(),
            "{name} is at the head"
        );
    }

    let mirrored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events a JOIN events e USING (position) \
         WHERE a.event_data = e.payload::jsonb AND a.aggregate_type = e.aggregate_type \
         AND a.aggregate_id = e.aggregate_id AND a.sequence = e.sequence \
         AND a.event_type = e.event_type AND a.event_version = e.event_version \
         AND a.recorded_at = e.recorded_at \
         AND a.organization_id IS NOT DISTINCT FROM e.organization_id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(mirrored, ledger.head(), "one faithful row per event");

    type Row = (
        Option<Uuid>,
        Option<String>,
        Option<Uuid>,
        Option<Uuid>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let select = "SELECT organization_id, actor_kind, actor_user_id, actor_key_id, request_id, \
                  client_ip, user_agent FROM audit_events WHERE position = $1";
    let last: Row = sqlx::query_as(select)
        .bind(ledger.head())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        last,
        (
            Some(story.org),
            Some("api_key".into()),
            Some(story.alice),
            Some(story.alice_key),
            Some(format!("req-{}", ledger.head())),
            Some("203.0.113.7".into()),
            Some("ledgerline-tests/1.0".into())
        )
    );
    let first: Row = sqlx::query_as(select)
        .bind(1i64)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (first.0, first.1.as_deref(), first.2, first.3),
        (None, Some("cli:bootstrap"), None, None)
    );

    // Personal data stays sealed in the audit trail, also after erasure.
    let invited: Value = sqlx::query_scalar(
        "SELECT event_data FROM audit_events WHERE aggregate_id = $1 AND event_type = 'UserInvited'",
    )
    .bind(story.bob.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let email = invited["UserInvited"]["email"].as_str().unwrap();
    assert!(
        email.starts_with(&format!("sealed:v1:{}:", story.bob)),
        "{email}"
    );

    let by_actor: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE organization_id = $1 AND actor_user_id = $2",
    )
    .bind(story.org)
    .bind(story.alice)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        by_actor, 3,
        "rotation, erasure and the invoice were alice's"
    );
}

#[tokio::test]
async fn projection_names_are_stable_and_own_distinct_tables() {
    assert_eq!(
        names(),
        [
            "organizations",
            "users",
            "roles",
            "user_roles",
            "api_keys",
            "messaging",
            "audit_events"
        ]
    );
    let mut tables: Vec<&str> = Projection::ALL
        .iter()
        .flat_map(|p| p.tables().iter().copied())
        .collect();
    let count = tables.len();
    tables.sort();
    tables.dedup();
    assert_eq!(tables.len(), count, "no table belongs to two projections");
    assert!(!tables.contains(&"permissions") && !tables.contains(&"subject_keys"));
}
