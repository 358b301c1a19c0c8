//! Erasure (crypto-shredding): once a user is erased, no API answer and no database row holds
//! their e-mail or name in clear, their key stops working, the ledger still verifies, and
//! their address is free to be invited again.

mod common;

use common::{every_row, TestApp};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

/// What the user was invited with.
const EMAIL_1: &str = "zelda.unique@example.org";
const NAME_1: &str = "Zelda Quasimodo";
/// What the profile was changed to before erasure.
const EMAIL_2: &str = "zelda.relocated@example.net";
const NAME_2: &str = "Zelda Fitzquimby";
/// Every clear-text value that must be gone, matched case-insensitively.
const PERSONAL: [&str; 4] = [EMAIL_1, NAME_1, EMAIL_2, NAME_2];

const ORG_NAME: &str = "Hyrule Holdings";

struct Scenario {
    t: TestApp,
    org: Uuid,
    zelda: Uuid,
    zelda_key: String,
    owner_key: String,
    auditor_key: String,
}

fn org_path(org: Uuid, rest: &str) -> String {
    format!("/v1/organizations/{org}{rest}")
}

/// Zelda is invited, given a role and a key, and has her profile changed once.
async fn prepare() -> Scenario {
    let t = TestApp::spawn().await;
    let org = t.create_org(ORG_NAME).await;
    let (_, owner_key) = t
        .member_with_key(org, "owner", "owner@hyrule.example")
        .await;
    let (_, auditor_key) = t
        .member_with_key(org, "auditor", "auditor@hyrule.example")
        .await;
    let zelda = t.invite(org, EMAIL_1, NAME_1).await;
    let member = t.role_id(org, "member").await;
    let r = t
        .put(
            &org_path(org, &format!("/users/{zelda}/roles/{member}")),
            &t.admin_key,
            json!({"reason": "staff"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let perms = ledgerline_aggregates::organization::built_in_roles::permissions("member").unwrap();
    let r = t
        .post(
            &org_path(org, "/api-keys"),
            &t.admin_key,
            json!({"label": "laptop", "permissions": perms, "user_id": zelda}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let zelda_key = r.body["secret"].as_str().unwrap().to_string();
    assert_eq!(t.get("/v1/me", &zelda_key).await.status, 200);
    let r = t
        .patch(
            &org_path(org, &format!("/users/{zelda}")),
            &owner_key,
            json!({"email": EMAIL_2, "full_name": NAME_2}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    Scenario {
        t,
        org,
        zelda,
        zelda_key,
        owner_key,
        auditor_key,
    }
}

/// [`prepare`], then Zelda is erased by the owner.
async fn erased() -> Scenario {
    let s = prepare().await;
    erase(&s).await;
    s
}

/// Zelda erased by the owner.
async fn erase(s: &Scenario) {
    act_on_zelda(s, "erase").await;
}

/// `POST /users/{zelda}/{action}` by the owner, which must succeed.
async fn act_on_zelda(s: &Scenario, action: &str) {
    let r =
        s.t.post(
            &org_path(s.org, &format!("/users/{}/{action}", s.zelda)),
            &s.owner_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{action}: {}", r.body);
}

/// The personal values `text` mentions, case-insensitively.
fn mentions(text: &str) -> Vec<&'static str> {
    let lower = text.to_lowercase();
    PERSONAL
        .into_iter()
        .filter(|p| lower.contains(&p.to_lowercase()))
        .collect()
}

#[track_caller]
fn assert_mentions_none(what: &str, value: &Value) {
    let found = mentions(&value.to_string());
    assert!(found.is_empty(), "{what} still mentions {found:?}: {value}");
}

/// Every page of a cursor-paged listing, following `next_cursor` in `cursor_param`.
async fn all_pages(t: &TestApp, key: &str, path: &str, cursor_param: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<i64> = None;
    for _ in 0..1000 {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match cursor {
            Some(c) => format!("{path}{sep}{cursor_param}={c}"),
            None => path.to_string(),
        };
        let r = t.get(&url, key).await;
        assert_eq!(r.status, 200, "{url}: {}", r.body);
        items.extend(r.body["items"].as_array().unwrap().iter().cloned());
        match r.body["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => return items,
        }
    }
    panic!("{path} never ran out of pages");
}

async fn audit_events(s: &Scenario) -> Vec<Value> {
    all_pages(
        &s.t,
        &s.auditor_key,
        &org_path(s.org, "/audit-events?order=asc&limit=3"),
        "cursor",
    )
    .await
}

async fn ledger_events(s: &Scenario) -> Vec<Value> {
    all_pages(
        &s.t,
        &s.auditor_key,
        &org_path(s.org, "/ledger/events?limit=3"),
        "after",
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Before erasure: the data is there (so the checks below can fail), but only sealed in events
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn before_erasure_the_profile_reads_in_clear() {
    let s = prepare().await;
    let r =
        s.t.get(
            &org_path(s.org, &format!("/users/{}", s.zelda)),
            &s.owner_key,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["email"], EMAIL_2);
    assert_eq!(r.body["full_name"], NAME_2);
    assert_eq!(r.body["status"], "active");
    assert_eq!(
        mentions(&r.body.to_string()),
        vec![EMAIL_2, NAME_2],
        "the search finds what is there"
    );
    let list = s.t.get(&org_path(s.org, "/users"), &s.owner_key).await;
    assert_eq!(mentions(&list.body.to_string()), vec![EMAIL_2, NAME_2]);
}

#[tokio::test]
async fn before_erasure_events_carry_personal_data_only_sealed() {
    let s = prepare().await;
    let audit = audit_events(&s).await;
    let invited = audit
        .iter()
        .find(|e| e["event_type"] == "UserInvited" && e["aggregate_id"] == json!(s.zelda))
        .expect("Zelda's UserInvited is audited");
    let updated = audit
        .iter()
        .find(|e| e["event_type"] == "UserProfileUpdated" && e["aggregate_id"] == json!(s.zelda))
        .expect("Zelda's UserProfileUpdated is audited");
    for (event, name) in [(invited, "UserInvited"), (updated, "UserProfileUpdated")] {
        let data = &event["event_data"][name];
        for field in ["email", "full_name"] {
            let sealed = data[field]
                .as_str()
                .unwrap_or_else(|| panic!("{name}.{field}: {event}"));
            assert!(
                sealed.starts_with(&format!("sealed:v1:{}:", s.zelda)),
                "{name}.{field} is sealed: {sealed}"
            );
        }
        assert_mentions_none(name, event);
    }
    for e in ledger_events(&s).await {
        assert_mentions_none("a ledger event", &e);
    }
    for (table, row) in every_row(&s.t).await {
        assert!(
            mentions(&row).is_empty(),
            "{table} holds clear text even before erasure: {row}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// After erasure
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn erased_user_reads_as_erased_with_null_personal_data() {
    let s = erased().await;
    let r =
        s.t.get(
            &org_path(s.org, &format!("/users/{}", s.zelda)),
            &s.owner_key,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "erased");
    assert_eq!(r.body["email"], Value::Null);
    assert_eq!(r.body["full_name"], Value::Null);
    assert_eq!(r.body["id"], json!(s.zelda));
}

#[tokio::test]
async fn erased_users_key_is_401() {
    let s = erased().await;
    let r = s.t.get("/v1/me", &s.zelda_key).await;
    common::assert_error(&r, 401);
    let r = s.t.get(&org_path(s.org, "/users"), &s.zelda_key).await;
    common::assert_error(&r, 401);
    common::assert_actors_guarded(s.t.pool()).await;
}

#[tokio::test]
async fn erasure_destroys_the_users_data_key() {
    let s = erased().await;
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM subject_keys WHERE subject_id = $1")
        .bind(s.zelda)
        .fetch_one(s.t.pool())
        .await
        .unwrap();
    assert_eq!(n, 0, "the subject key row is gone");
    // And so the sealed copies in the log can no longer be opened.
    let keys = s.t.app.vault.keys(s.t.pool(), &[s.zelda]).await.unwrap();
    assert!(keys.is_empty());
    let (payload,): (String,) = sqlx::query_as(
        "SELECT payload::text FROM events WHERE aggregate_type = 'User' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(s.zelda.to_string())
    .fetch_one(s.t.pool())
    .await
    .unwrap();
    let payload: Value = serde_json::from_str(&payload).unwrap();
    let sealed = payload["UserInvited"]["email"].as_str().unwrap();
    assert_eq!(s.t.app.vault.open(&keys, "email", sealed), None);
}

#[tokio::test]
async fn no_api_answer_mentions_the_erased_user() {
    let s = erased().await;
    let (t, org, zelda) = (&s.t, s.org, s.zelda);
    for path in [
        org_path(org, "/users"),
        org_path(org, &format!("/users/{zelda}")),
        org_path(org, &format!("/users/{zelda}/roles")),
        org_path(org, "/api-keys"),
        org_path(org, "/roles"),
        org_path(org, ""),
        "/v1/organizations".to_string(),
    ] {
        let r = t.get(&path, &s.owner_key).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_mentions_none(&path, &r.body);
    }
    for key in [&s.owner_key, &s.auditor_key, &t.admin_key] {
        let me = t.get("/v1/me", key).await;
        assert_eq!(me.status, 200, "{}", me.body);
        assert_mentions_none("/v1/me", &me.body);
    }
    let audit = audit_events(&s).await;
    assert!(
        audit.iter().any(|e| e["event_type"] == "UserErased"),
        "the erasure itself is audited"
    );
    for e in &audit {
        assert_mentions_none("an audit event", e);
    }
    let ledger = ledger_events(&s).await;
    assert_eq!(ledger.len(), audit.len(), "every page of both was read");
    for e in &ledger {
        assert_mentions_none("a ledger event", e);
    }
}

/// An erased address's blind index stays in the log, and anyone who may invite users can
/// learn the index of an address of their choosing: the audit view and the history must not
/// show it, or a guessed address of an erased user could be tested against it.
#[tokio::test]
async fn the_audit_view_and_history_show_no_blind_index() {
    let s = erased().await;
    let (t, org, zelda) = (&s.t, s.org, s.zelda);
    let audit = audit_events(&s).await;
    assert!(audit.iter().any(|e| e["event_type"] == "UserErased"));
    for e in &audit {
        assert!(!e.to_string().contains("blind_index"), "{e}");
    }
    let history = t
        .get(
            &org_path(org, &format!("/history/user/{zelda}")),
            &s.auditor_key,
        )
        .await;
    assert_eq!(history.status, 200, "{}", history.body);
    assert!(history.body["items"].as_array().unwrap().len() >= 3);
    assert!(
        !history.body.to_string().contains("blind_index"),
        "{}",
        history.body
    );
    // The raw log keeps it: its hashes cover it.
    let ledger = ledger_events(&s).await;
    assert!(ledger.iter().any(|e| e.to_string().contains("blind_index")));
}

/// The network address (and browser) of an erased user's own requests are theirs too: the
/// audit view leaves them out once the user is erased, and keeps everyone else's.
#[tokio::test]
async fn the_audit_view_leaves_out_an_erased_users_network_address() {
    let s = prepare().await;
    let r =
        s.t.post(
            &org_path(s.org, "/conversations"),
            &s.zelda_key,
            json!({"kind": "group", "title": "Triforce"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let zelda = s.zelda.to_string();
    let addresses = |events: &[Value], hers: bool| -> Vec<Value> {
        events
            .iter()
            .filter(|e| (e["actor_user_id"] == zelda.as_str()) == hers)
            .filter(|e| e["actor_user_id"].is_string())
            .map(|e| e["client_ip"].clone())
            .collect()
    };
    let before = audit_events(&s).await;
    assert!(!addresses(&before, true).is_empty());
    assert!(addresses(&before, true).iter().all(|ip| ip == "127.0.0.1"));
    erase(&s).await;
    let after = audit_events(&s).await;
    let hers = addresses(&after, true);
    assert_eq!(hers.len(), addresses(&before, true).len());
    assert!(hers.iter().all(Value::is_null), "{hers:?}");
    for e in after
        .iter()
        .filter(|e| e["actor_user_id"] == zelda.as_str())
    {
        assert!(e["user_agent"].is_null(), "{e}");
    }
    let others = addresses(&after, false);
    assert!(
        !others.is_empty() && others.iter().all(|ip| ip == "127.0.0.1"),
        "{others:?}"
    );
}

#[tokio::test]
async fn no_database_table_holds_the_erased_users_data() {
    let s = erased().await;
    let rows = every_row(&s.t).await;
    // The control: the scan does see clear text that is meant to be there.
    assert!(
        rows.iter()
            .any(|(table, row)| table == "organizations" && row.contains(ORG_NAME)),
        "the scan finds the organization's name"
    );
    for (table, row) in &rows {
        let found = mentions(row);
        assert!(
            found.is_empty(),
            "table {table} still holds {found:?}: {row}"
        );
    }
    let (users,): (String,) = sqlx::query_as("SELECT u::text FROM users u WHERE id = $1")
        .bind(s.zelda)
        .fetch_one(s.t.pool())
        .await
        .unwrap();
    assert!(
        !users.contains("sealed:v1:"),
        "the users row keeps no ciphertext either: {users}"
    );
}

#[tokio::test]
async fn ledger_still_verifies_after_erasure() {
    let s = erased().await;
    let report = s.t.verify().await;
    assert!(report.intact(), "{:?}", report.first_bad);
    assert_eq!(report.events as i64, s.t.head().await);
}

#[tokio::test]
async fn erased_users_emails_can_be_invited_again_in_the_same_organization() {
    let s = erased().await;
    // The address held at erasure (its claim released by the erasure) and the first one
    // (released by the profile change), in another case for good measure.
    for email in [EMAIL_2, &EMAIL_1.to_uppercase()] {
        let r =
            s.t.post(
                &org_path(s.org, "/users"),
                &s.owner_key,
                json!({"email": email, "full_name": "Zelda Returns"}),
            )
            .await;
        assert_eq!(r.status, 201, "{email}: {}", r.body);
        assert_ne!(r.body["id"], json!(s.zelda), "a new user");
    }
}

#[tokio::test]
async fn erased_user_accepts_no_further_commands() {
    let s = erased().await;
    let (t, org, zelda) = (&s.t, s.org, s.zelda);
    let member = t.role_id(org, "member").await;
    let before = t.head().await;
    let commands: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::POST,
            org_path(org, &format!("/users/{zelda}/erase")),
            Some(json!({})),
        ),
        (
            Method::PATCH,
            org_path(org, &format!("/users/{zelda}")),
            Some(json!({"full_name": NAME_1})),
        ),
        (
            Method::POST,
            org_path(org, &format!("/users/{zelda}/reactivate")),
            Some(json!({})),
        ),
        (
            Method::PUT,
            org_path(org, &format!("/users/{zelda}/roles/{member}")),
            Some(json!({})),
        ),
        (
            Method::POST,
            org_path(org, "/api-keys"),
            Some(json!({"label": "again", "permissions": ["users:read"], "user_id": zelda})),
        ),
    ];
    for (method, path, body) in commands {
        // A user key issues only its own user's keys: another user's comes from a service key.
        let key = if path.ends_with("/api-keys") {
            &t.admin_key
        } else {
            &s.owner_key
        };
        let r = t.call(method.clone(), &path, Some(key), body).await;
        assert_eq!(r.status, 409, "{method} {path}: {}", r.body);
        common::assert_error(&r, 409);
    }
    assert_eq!(t.head().await, before);
    let r = t
        .get(&org_path(org, &format!("/users/{zelda}")), &s.owner_key)
        .await;
    assert_mentions_none("the erased user", &r.body);
}

async fn has_key(t: &TestApp, user: Uuid) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM subject_keys WHERE subject_id = $1)")
        .bind(user)
        .fetch_one(t.pool())
        .await
        .unwrap()
}

/// While the users projection cannot apply the erasure (held here by a lock; in life
/// stopped at a failure or behind), the handler's own destruction of the key is what makes
/// the data unreadable: the answer never shows it, and an erasure whose handler stopped
/// before that step (a lost answer, a crash) is finished by a retry, though the retry is
/// refused as "already erased".
#[tokio::test]
async fn erasure_destroys_the_key_even_while_the_projection_cannot() {
    let s = prepare().await;
    let t = &s.t;
    let other = t.invite(s.org, "ganon@hyrule.example", "Ganon Dorf").await;
    let mut hold = t.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE users IN SHARE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();

    let r = t
        .call(
            Method::POST,
            &org_path(s.org, &format!("/users/{}/erase", s.zelda)),
            Some(&s.owner_key),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(mentions(&r.body.to_string()).is_empty(), "{}", r.body);
    assert!(!has_key(t, s.zelda).await);

    // An erasure appended with no handler to destroy the key, as one cut off before it.
    let erasing = {
        let app = t.app.clone();
        tokio::spawn(async move {
            app.execute(
                &app.cqrs.users,
                other,
                Some(s.org),
                &ledgerline::app::Actor::cli("test"),
                ledgerline_aggregates::user::UserCommand::Erase,
            )
            .await
        })
    };
    let erased = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_id = $1 \
             AND event_type = 'UserErased')",
        )
        .bind(other.to_string())
        .fetch_one(t.pool())
        .await
        .unwrap()
    };
    assert!(common::eventually(std::time::Duration::from_secs(30), erased).await);
    assert!(has_key(t, other).await, "the projection has not run");
    let user = org_path(s.org, &format!("/users/{other}"));
    let r = t
        .call(
            Method::POST,
            &format!("{user}/erase"),
            Some(&s.owner_key),
            None,
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(!has_key(t, other).await, "the retry destroyed the key");
    let r = t.get(&user, &s.owner_key).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (&r.body["email"], &r.body["full_name"]),
        (&json!(null), &json!(null))
    );

    hold.rollback().await.unwrap();
    erasing.await.unwrap().unwrap();
}

/// Zelda's key as the keys list shows it, and whether her `member` assignment reads active.
async fn key_and_role(s: &Scenario) -> (Value, Value) {
    let keys = all_pages(&s.t, &s.owner_key, &org_path(s.org, "/api-keys"), "cursor").await;
    let key = keys
        .into_iter()
        .find(|k| k["user_id"] == json!(s.zelda))
        .expect("Zelda's key is listed");
    let r =
        s.t.get(
            &org_path(s.org, &format!("/users/{}/roles", s.zelda)),
            &s.owner_key,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    (key, r.body["items"][0]["active"].clone())
}

/// A console reading the views shows a departed user's key and roles as dead, not `active`.
#[tokio::test]
async fn a_departed_users_key_and_roles_read_as_unusable() {
    let s = prepare().await;
    let (key, role) = key_and_role(&s).await;
    assert_eq!(
        (
            &key["status"],
            &key["usable"],
            &key["unusable_because"],
            &role
        ),
        (&json!("active"), &json!(true), &Value::Null, &json!(true)),
        "{key}"
    );
    act_on_zelda(&s, "deactivate").await;
    let (key, role) = key_and_role(&s).await;
    assert_eq!(
        (
            &key["status"],
            &key["usable"],
            &key["unusable_because"],
            &role
        ),
        (
            &json!("active"),
            &json!(false),
            &json!("user deactivated"),
            &json!(false)
        ),
        "{key}"
    );
    erase(&s).await;
    let (key, role) = key_and_role(&s).await;
    assert_eq!(
        (&key["usable"], &key["unusable_because"], &role),
        (&json!(false), &json!("user erased"), &json!(false)),
        "{key}"
    );
    let id = key["id"].as_str().unwrap();
    let r =
        s.t.get(&org_path(s.org, &format!("/api-keys/{id}")), &s.owner_key)
            .await;
    assert_eq!(
        r.body["unusable_because"],
        json!("user erased"),
        "{}",
        r.body
    );
}
