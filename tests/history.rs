//! Per-entity history for auditors: every change to one organization, user, role, key,
//! conversation or message in order, with actor, time, event type and the fields before and
//! after; sealed fields sealed, or `erased` once their key is destroyed; tenancy, input and
//! permission errors; and the built-in `auditor` role, which reads but commands nothing.

mod common;

use std::collections::BTreeSet;

use common::{assert_error, assert_error_says, Response, TestApp};
use ledgerline::api::ROUTES;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn org_path(org: Uuid, rest: &str) -> String {
    format!("/v1/organizations/{org}{rest}")
}

fn history_path(org: Uuid, entity_type: &str, id: Uuid) -> String {
    org_path(org, &format!("/history/{entity_type}/{id}"))
}

fn id_of(r: &Response) -> Uuid {
    r.body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an id in {}", r.body))
        .parse()
        .unwrap()
}

/// The history of one entity, which must answer 200; returns its items.
async fn history(t: &TestApp, key: &str, org: Uuid, entity_type: &str, id: Uuid) -> Vec<Value> {
    let r = t.get(&history_path(org, entity_type, id), key).await;
    assert_eq!(r.status, 200, "history of {entity_type} {id}: {}", r.body);
    assert_eq!(r.body["entity_type"], json!(entity_type), "{}", r.body);
    assert_eq!(r.body["id"], json!(id), "{}", r.body);
    let items = r.body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("items in {}", r.body))
        .clone();
    // In order: sequences 1, 2, 3... at rising ledger positions.
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["sequence"], json!(i + 1), "sequence of {item}");
    }
    for pair in items.windows(2) {
        assert!(
            pair[0]["position"].as_i64().unwrap() < pair[1]["position"].as_i64().unwrap(),
            "positions rise: {pair:?}"
        );
    }
    items
}

fn event_types(items: &[Value]) -> Vec<&str> {
    items
        .iter()
        .map(|i| i["event_type"].as_str().unwrap())
        .collect()
}

/// The names of the fields an entry reports as changed (the same on both sides).
fn changed(item: &Value) -> BTreeSet<String> {
    let before: BTreeSet<String> = item["changes"]["before"]
        .as_object()
        .unwrap_or_else(|| panic!("changes.before in {item}"))
        .keys()
        .cloned()
        .collect();
    let after: BTreeSet<String> = item["changes"]["after"]
        .as_object()
        .unwrap_or_else(|| panic!("changes.after in {item}"))
        .keys()
        .cloned()
        .collect();
    assert_eq!(before, after, "both sides name the same fields: {item}");
    before
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn is_sealed_under(v: &Value, subject: Uuid) -> bool {
    v.as_str()
        .is_some_and(|s| s.starts_with(&format!("sealed:v1:{subject}:")))
}

/// The id of the key whose secret is `secret`, as /v1/me reports it.
async fn key_id(t: &TestApp, secret: &str) -> Uuid {
    let me = t.get("/v1/me", secret).await;
    assert_eq!(me.status, 200, "{}", me.body);
    me.body["key"]["id"].as_str().unwrap().parse().unwrap()
}

/// A request with the caller's own `x-request-id`.
async fn with_request_id(
    t: &TestApp,
    method: Method,
    path: &str,
    key: &str,
    body: Value,
    request_id: &str,
) -> u16 {
    t.client
        .request(method, format!("{}{path}", t.base))
        .bearer_auth(key)
        .header("x-request-id", request_id)
        .json(&body)
        .send()
        .await
        .expect("request sent")
        .status()
        .as_u16()
}

/// An organization with an owner (who acts) and an auditor (who reads), each a user with a
/// key of that built-in role.
struct Audited {
    t: TestApp,
    org: Uuid,
    owner: Uuid,
    owner_key: String,
    owner_key_id: Uuid,
    auditor: Uuid,
    auditor_key: String,
}

async fn audited(name: &str) -> Audited {
    let t = TestApp::spawn().await;
    let org = t.create_org(name).await;
    let (owner, owner_key) = t
        .member_with_key(org, "owner", "owner@audited.example")
        .await;
    let owner_key_id = key_id(&t, &owner_key).await;
    let (auditor, auditor_key) = t
        .member_with_key(org, "auditor", "auditor@audited.example")
        .await;
    Audited {
        t,
        org,
        owner,
        owner_key,
        owner_key_id,
        auditor,
        auditor_key,
    }
}

impl Audited {
    fn path(&self, rest: &str) -> String {
        org_path(self.org, rest)
    }

    async fn history(&self, entity_type: &str, id: Uuid) -> Vec<Value> {
        history(&self.t, &self.auditor_key, self.org, entity_type, id).await
    }

    /// The whole answer as text, to look for what must never appear in it.
    async fn history_text(&self, entity_type: &str, id: Uuid) -> String {
        let r = self
            .t
            .get(&history_path(self.org, entity_type, id), &self.auditor_key)
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body.to_string()
    }

    async fn invite(&self, email: &str, full_name: &str) -> Uuid {
        let r = self
            .t
            .post(
                &self.path("/users"),
                &self.owner_key,
                json!({"email": email, "full_name": full_name}),
            )
            .await;
        assert_eq!(r.status, 201, "invite: {}", r.body);
        id_of(&r)
    }

    /// A group conversation the owner opens with `participants`; its id.
    async fn open_group(&self, title: &str, participants: Value) -> Uuid {
        let r = self
            .t
            .post(
                &self.path("/conversations"),
                &self.owner_key,
                json!({"kind": "group", "title": title, "participants": participants}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        id_of(&r)
    }

    fn assert_owner_acted(&self, item: &Value) {
        assert_eq!(item["actor"]["kind"], "api_key", "{item}");
        assert_eq!(item["actor"]["user_id"], json!(self.owner), "{item}");
        assert_eq!(item["actor"]["key_id"], json!(self.owner_key_id), "{item}");
        assert_eq!(
            item["actor"]["key_prefix"],
            json!(self.owner_key[..15]),
            "{item}"
        );
        assert!(
            item["request_id"].as_str().is_some_and(|r| !r.is_empty()),
            "{item}"
        );
        assert!(
            item["recorded_at"]
                .as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                .is_some(),
            "{item}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Users
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn user_history_shows_every_change_with_its_fields_and_actor() {
    let a = audited("User History").await;
    let user = a.invite("ada@audited.example", "Ada Lovelace").await;
    let member = a.t.role_id(a.org, "member").await;
    let status = with_request_id(
        &a.t,
        Method::PATCH,
        &a.path(&format!("/users/{user}")),
        &a.owner_key,
        json!({"full_name": "Ada King"}),
        "history-test-request",
    )
    .await;
    assert_eq!(status, 200);
    let r =
        a.t.put(
            &a.path(&format!("/users/{user}/roles/{member}")),
            &a.owner_key,
            json!({"reason": "joins the team"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for step in ["deactivate", "reactivate"] {
        let r =
            a.t.post(
                &a.path(&format!("/users/{user}/{step}")),
                &a.owner_key,
                json!({}),
            )
            .await;
        assert_eq!(r.status, 200, "{step}: {}", r.body);
    }

    let items = a.history("user", user).await;
    assert_eq!(
        event_types(&items),
        [
            "UserInvited",
            "UserProfileUpdated",
            "UserRoleAssigned",
            "UserDeactivated",
            "UserReactivated"
        ]
    );
    for item in &items {
        a.assert_owner_acted(item);
    }

    let invited = &items[0];
    let (before, after) = (&invited["changes"]["before"], &invited["changes"]["after"]);
    assert_eq!(before["status"], Value::Null, "{invited}");
    assert_eq!(after["status"], "active", "{invited}");
    assert_eq!(after["id"], json!(user), "{invited}");
    assert_eq!(after["organization_id"], json!(a.org), "{invited}");
    assert_eq!(before["email"], Value::Null, "{invited}");
    assert!(is_sealed_under(&after["email"], user), "{invited}");
    assert!(is_sealed_under(&after["full_name"], user), "{invited}");
    assert!(
        !changed(invited).contains("roles"),
        "no roles yet: {invited}"
    );

    let updated = &items[1];
    assert_eq!(
        changed(updated),
        names(&["full_name"]),
        "only the name changed: {updated}"
    );
    assert_eq!(
        updated["changes"]["before"]["full_name"], after["full_name"],
        "before is what the invitation set"
    );
    assert!(is_sealed_under(
        &updated["changes"]["after"]["full_name"],
        user
    ));
    assert_ne!(
        updated["changes"]["after"]["full_name"],
        updated["changes"]["before"]["full_name"]
    );
    assert_eq!(updated["request_id"], "history-test-request");

    let assigned = &items[2];
    assert_eq!(changed(assigned), names(&["roles"]), "{assigned}");
    assert_eq!(assigned["changes"]["before"]["roles"], json!({}));
    assert_eq!(
        assigned["changes"]["after"]["roles"][member.to_string()]["reason"],
        "joins the team",
        "{assigned}"
    );

    let deactivated = &items[3];
    assert_eq!(changed(deactivated), names(&["status"]), "{deactivated}");
    assert_eq!(deactivated["changes"]["before"]["status"], "active");
    assert_eq!(deactivated["changes"]["after"]["status"], "deactivated");
    let reactivated = &items[4];
    assert_eq!(changed(reactivated), names(&["status"]), "{reactivated}");
    assert_eq!(reactivated["changes"]["before"]["status"], "deactivated");
    assert_eq!(reactivated["changes"]["after"]["status"], "active");

    let text = a.history_text("user", user).await;
    for clear in ["ada@audited.example", "Ada Lovelace", "Ada King"] {
        assert!(!text.contains(clear), "`{clear}` is never opened: {text}");
    }
}

#[tokio::test]
async fn an_erased_users_sealed_fields_read_erased() {
    let a = audited("Erasures").await;
    let user = a.invite("grace@audited.example", "Grace Hopper").await;
    let kept = a.invite("kept@audited.example", "Kept Person").await;
    let r =
        a.t.patch(
            &a.path(&format!("/users/{user}")),
            &a.owner_key,
            json!({"email": "grace.h@audited.example"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Before the erasure the fields are ciphertext.
    let items = a.history("user", user).await;
    assert!(is_sealed_under(
        &items[0]["changes"]["after"]["email"],
        user
    ));
    assert!(is_sealed_under(
        &items[1]["changes"]["after"]["email"],
        user
    ));

    let r =
        a.t.post(
            &a.path(&format!("/users/{user}/erase")),
            &a.owner_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let items = a.history("user", user).await;
    assert_eq!(
        event_types(&items),
        ["UserInvited", "UserProfileUpdated", "UserErased"]
    );
    let invited = &items[0]["changes"]["after"];
    assert_eq!(invited["email"], "erased", "{invited}");
    assert_eq!(invited["full_name"], "erased", "{invited}");
    let updated = &items[1]["changes"];
    assert_eq!(updated["before"]["email"], "erased", "{updated}");
    assert_eq!(updated["after"]["email"], "erased", "{updated}");
    let erased = &items[2];
    a.assert_owner_acted(erased);
    assert_eq!(erased["changes"]["before"]["status"], "active");
    assert_eq!(erased["changes"]["after"]["status"], "erased");
    assert_eq!(erased["changes"]["before"]["email"], "erased");
    assert_eq!(erased["changes"]["before"]["full_name"], "erased");
    assert_eq!(erased["changes"]["after"]["email"], Value::Null);
    assert_eq!(erased["changes"]["after"]["full_name"], Value::Null);
    let text = a.history_text("user", user).await;
    assert!(
        !text.contains("sealed:v1:"),
        "nothing sealed is left: {text}"
    );

    // Only the erased subject's fields: another user's stay sealed.
    let other = a.history("user", kept).await;
    assert!(is_sealed_under(
        &other[0]["changes"]["after"]["email"],
        kept
    ));
}

// ---------------------------------------------------------------------------------------------
// Roles and keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn role_history_shows_the_permission_change() {
    let a = audited("Role History").await;
    let r =
        a.t.post(
            &a.path("/roles"),
            &a.owner_key,
            json!({"name": "readers", "description": "read only", "permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let role = id_of(&r);
    let r =
        a.t.patch(
            &a.path(&format!("/roles/{role}")),
            &a.owner_key,
            json!({"permissions": ["users:read", "roles:read"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        a.t.delete(&a.path(&format!("/roles/{role}")), &a.owner_key)
            .await
            .status,
        204
    );

    let items = a.history("role", role).await;
    assert_eq!(
        event_types(&items),
        ["RoleCreated", "RoleUpdated", "RoleDeleted"]
    );
    for item in &items {
        a.assert_owner_acted(item);
    }
    let created = &items[0]["changes"];
    assert_eq!(created["before"]["spec"], Value::Null);
    assert_eq!(created["after"]["spec"]["name"], "readers");
    assert_eq!(
        created["after"]["spec"]["permissions"],
        json!(["users:read"])
    );

    let updated = &items[1];
    assert_eq!(changed(updated), names(&["spec"]), "{updated}");
    let (before, after) = (
        &updated["changes"]["before"]["spec"],
        &updated["changes"]["after"]["spec"],
    );
    assert_eq!(before["permissions"], json!(["users:read"]), "{updated}");
    let after_permissions: BTreeSet<&str> = after["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        after_permissions,
        BTreeSet::from(["users:read", "roles:read"]),
        "{updated}"
    );
    assert_eq!(before["name"], after["name"], "the name stayed");

    let deleted = &items[2];
    assert_eq!(changed(deleted), names(&["deleted"]), "{deleted}");
    assert_eq!(deleted["changes"]["before"]["deleted"], false);
    assert_eq!(deleted["changes"]["after"]["deleted"], true);
}

#[tokio::test]
async fn api_key_history_shows_issue_rotation_and_revocation() {
    let a = audited("Key History").await;
    let r =
        a.t.post(
            &a.path("/api-keys"),
            &a.owner_key,
            json!({"label": "exporter", "permissions": ["users:read"], "user_id": a.owner}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let key = id_of(&r);
    let first_secret = r.body["secret"].as_str().unwrap().to_string();
    let r =
        a.t.post(
            &a.path(&format!("/api-keys/{key}/rotate")),
            &a.owner_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let second_secret = r.body["secret"].as_str().unwrap().to_string();
    let r =
        a.t.post(
            &a.path(&format!("/api-keys/{key}/revoke")),
            &a.owner_key,
            json!({"reason": "leaked"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let items = a.history("api_key", key).await;
    assert_eq!(
        event_types(&items),
        ["ApiKeyIssued", "ApiKeyRotated", "ApiKeyRevoked"]
    );
    for item in &items {
        a.assert_owner_acted(item);
    }
    let issued = &items[0]["changes"];
    assert_eq!(issued["before"]["status"], Value::Null);
    assert_eq!(issued["after"]["status"], "active");
    assert_eq!(issued["after"]["label"], "exporter");
    assert_eq!(issued["after"]["permissions"], json!(["users:read"]));
    let first_prefix = issued["after"]["prefix"].clone();
    assert!(first_prefix.is_string(), "{issued}");

    let rotated = &items[1];
    assert!(changed(rotated).contains("prefix"), "{rotated}");
    assert!(!changed(rotated).contains("status"), "{rotated}");
    assert_eq!(rotated["changes"]["before"]["prefix"], first_prefix);
    assert_ne!(rotated["changes"]["after"]["prefix"], first_prefix);
    assert_eq!(
        rotated["changes"]["after"]["retired_prefixes"],
        json!([first_prefix])
    );

    let revoked = &items[2];
    assert_eq!(changed(revoked), names(&["status"]), "{revoked}");
    assert_eq!(revoked["changes"]["before"]["status"], "active");
    assert_eq!(revoked["changes"]["after"]["status"], "revoked");

    let text = a.history_text("api_key", key).await;
    for secret in [&first_secret, &second_secret] {
        assert!(!text.contains(secret.as_str()), "no secret in {text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Conversations and messages
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn conversation_history_shows_creation_and_rename() {
    let a = audited("Conversation History").await;
    let bob = a.invite("bob@audited.example", "Bob").await;
    let conversation = a.open_group("Launch", json!([bob])).await;
    let r =
        a.t.patch(
            &a.path(&format!("/conversations/{conversation}")),
            &a.owner_key,
            json!({"title": "Liftoff"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let items = a.history("conversation", conversation).await;
    assert_eq!(
        event_types(&items),
        ["ConversationCreated", "ConversationUpdated"]
    );
    for item in &items {
        a.assert_owner_acted(item);
    }
    let created = &items[0]["changes"];
    assert_eq!(created["before"]["spec"], Value::Null);
    assert_eq!(created["after"]["spec"]["title"], "Launch");
    assert_eq!(created["after"]["kind"], "group");
    assert_eq!(created["after"]["owner"], json!(a.owner));
    let participants = created["after"]["participants"].as_object().unwrap();
    assert_eq!(participants.len(), 2, "{created}");
    assert_eq!(participants[&a.owner.to_string()]["role"], "owner");
    assert_eq!(participants[&bob.to_string()]["role"], "member");

    let renamed = &items[1];
    assert_eq!(changed(renamed), names(&["spec"]), "{renamed}");
    assert_eq!(renamed["changes"]["before"]["spec"]["title"], "Launch");
    assert_eq!(renamed["changes"]["after"]["spec"]["title"], "Liftoff");
}

#[tokio::test]
async fn message_history_shows_sealed_edits_and_erased_content_after_deletion() {
    let a = audited("Message History").await;
    let bob = a.invite("bob@audited.example", "Bob").await;
    let conversation = a.open_group("Launch", json!([bob])).await;
    let messages = a.path(&format!("/conversations/{conversation}/messages"));
    let r =
        a.t.post(
            &messages,
            &a.owner_key,
            json!({
                "content": "the launch is on friday",
                "attachments": [{
                    "file_name": "plan.pdf",
                    "mime_type": "application/pdf",
                    "size_bytes": 1234,
                    "blake3": "ab".repeat(32),
                }],
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let message = id_of(&r);
    let one = format!("{messages}/{message}");
    let r =
        a.t.patch(
            &one,
            &a.owner_key,
            json!({"content": "the launch is on monday"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let items = a.history("message", message).await;
    assert_eq!(event_types(&items), ["MessagePosted", "MessageEdited"]);
    for item in &items {
        a.assert_owner_acted(item);
    }
    let posted = &items[0]["changes"];
    assert_eq!(posted["before"]["content"], Value::Null);
    assert!(
        is_sealed_under(&posted["after"]["content"], message),
        "{posted}"
    );
    assert_eq!(posted["after"]["author_id"], json!(a.owner));
    assert_eq!(posted["after"]["conversation_id"], json!(conversation));
    let attachment = &posted["after"]["attachments"][0];
    assert!(
        is_sealed_under(&attachment["file_name"], message),
        "{posted}"
    );
    assert_eq!(attachment["size_bytes"], 1234);
    assert!(
        !changed(&items[0]).contains("parent_message_id"),
        "a root message has no parent to report: {posted}"
    );
    let edited = &items[1];
    assert_eq!(changed(edited), names(&["content"]), "{edited}");
    assert_eq!(
        edited["changes"]["before"]["content"],
        posted["after"]["content"]
    );
    assert!(is_sealed_under(
        &edited["changes"]["after"]["content"],
        message
    ));
    assert_ne!(
        edited["changes"]["after"]["content"],
        edited["changes"]["before"]["content"]
    );
    let text = a.history_text("message", message).await;
    for clear in ["friday", "monday", "plan.pdf"] {
        assert!(!text.contains(clear), "`{clear}` is never opened: {text}");
    }

    assert_eq!(a.t.delete(&one, &a.owner_key).await.status, 204);
    let items = a.history("message", message).await;
    assert_eq!(
        event_types(&items),
        ["MessagePosted", "MessageEdited", "MessageDeleted"]
    );
    let posted = &items[0]["changes"]["after"];
    assert_eq!(posted["content"], "erased", "{posted}");
    assert_eq!(posted["attachments"][0]["file_name"], "erased", "{posted}");
    assert_eq!(posted["attachments"][0]["mime_type"], "application/pdf");
    let edited = &items[1]["changes"];
    assert_eq!(edited["before"]["content"], "erased", "{edited}");
    assert_eq!(edited["after"]["content"], "erased", "{edited}");
    let deleted = &items[2];
    a.assert_owner_acted(deleted);
    assert_eq!(changed(deleted), names(&["deleted"]), "{deleted}");
    assert_eq!(deleted["changes"]["before"]["deleted"], false);
    assert_eq!(deleted["changes"]["after"]["deleted"], true);
    let text = a.history_text("message", message).await;
    assert!(
        !text.contains("sealed:v1:"),
        "nothing sealed is left: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// The organization itself
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn organization_history_shows_its_own_changes() {
    let a = audited("Org History").await;
    let r =
        a.t.patch(
            &a.path(""),
            &a.owner_key,
            json!({"name": "Org History Renamed"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r =
        a.t.post(
            &a.path("/suspend"),
            &a.t.admin_key,
            json!({"reason": "unpaid"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r =
        a.t.post(&a.path("/reactivate"), &a.t.admin_key, json!({}))
            .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let items = a.history("organization", a.org).await;
    assert_eq!(
        event_types(&items),
        [
            "OrganizationCreated",
            "OrganizationUpdated",
            "OrganizationSuspended",
            "OrganizationReactivated"
        ]
    );
    let operator_key = key_id(&a.t, &a.t.admin_key).await;
    let created = &items[0];
    assert_eq!(created["actor"]["kind"], "api_key");
    assert_eq!(created["actor"]["key_id"], json!(operator_key));
    assert_eq!(
        created["actor"]["key_prefix"],
        Value::Null,
        "a platform key's prefix stays out of the tenant's log"
    );
    assert_eq!(created["actor"]["user_id"], Value::Null);
    assert_eq!(created["changes"]["before"]["status"], Value::Null);
    assert_eq!(created["changes"]["after"]["status"], "active");
    assert_eq!(
        created["changes"]["after"]["profile"]["name"],
        "Org History"
    );

    let updated = &items[1];
    a.assert_owner_acted(updated);
    assert_eq!(changed(updated), names(&["profile"]), "{updated}");
    assert_eq!(
        updated["changes"]["before"]["profile"]["name"],
        "Org History"
    );
    assert_eq!(
        updated["changes"]["after"]["profile"]["name"],
        "Org History Renamed"
    );
    assert_eq!(
        updated["changes"]["before"]["profile"]["slug"],
        updated["changes"]["after"]["profile"]["slug"]
    );

    let suspended = &items[2];
    assert_eq!(suspended["actor"]["key_id"], json!(operator_key));
    assert_eq!(
        changed(suspended),
        names(&["status", "suspension_reason"]),
        "{suspended}"
    );
    assert_eq!(suspended["changes"]["after"]["status"], "suspended");
    assert_eq!(suspended["changes"]["after"]["suspension_reason"], "unpaid");
    let reactivated = &items[3]["changes"];
    assert_eq!(reactivated["before"]["status"], "suspended");
    assert_eq!(reactivated["after"]["status"], "active");
    assert_eq!(reactivated["after"]["suspension_reason"], Value::Null);
}

// ---------------------------------------------------------------------------------------------
// Tenancy, input and permissions
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn another_tenants_entity_is_404() {
    let a = audited("Home Tenant").await;
    let other_org = a.t.create_org("Other Tenant").await;
    let r =
        a.t.post(
            &org_path(other_org, "/users"),
            &a.t.admin_key,
            json!({"email": "stranger@other.example", "full_name": "Stranger"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let stranger = id_of(&r);
    let mine = a.invite("mine@audited.example", "Mine").await;

    // The control: each entity is readable where it lives.
    history(&a.t, &a.t.admin_key, other_org, "user", stranger).await;
    history(&a.t, &a.auditor_key, a.org, "user", mine).await;

    // Another tenant's user through this tenant's path, for this tenant's auditor and even
    // for the platform operator: the entity is not this organization's.
    for key in [&a.auditor_key, &a.t.admin_key] {
        assert_error(
            &a.t.get(&history_path(a.org, "user", stranger), key).await,
            404,
        );
    }
    // Another organization's path with this tenant's key: the organization is not found.
    assert_error(
        &a.t.get(&history_path(other_org, "user", stranger), &a.auditor_key)
            .await,
        404,
    );
    // An organization's history only under its own path.
    assert_error(
        &a.t.get(
            &history_path(a.org, "organization", other_org),
            &a.t.admin_key,
        )
        .await,
        404,
    );
    // A user id asked for as another type, and an id that names nothing.
    assert_error(
        &a.t.get(&history_path(a.org, "role", mine), &a.auditor_key)
            .await,
        404,
    );
    assert_error(
        &a.t.get(&history_path(a.org, "user", Uuid::new_v4()), &a.auditor_key)
            .await,
        404,
    );
}

#[tokio::test]
async fn unknown_entity_type_is_400() {
    let a = audited("Types").await;
    let user = a.invite("typed@audited.example", "Typed").await;
    history(&a.t, &a.auditor_key, a.org, "user", user).await;
    for bad in ["users", "User", "widget", "apikey"] {
        let r =
            a.t.get(&history_path(a.org, bad, user), &a.auditor_key)
                .await;
        assert_error(&r, 400);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("api_key"),
            "the message lists the types: {}",
            r.body
        );
    }
    let r =
        a.t.get(&org_path(a.org, "/history/user/not-a-uuid"), &a.auditor_key)
            .await;
    assert_error(&r, 400);
}

#[tokio::test]
async fn history_needs_audit_read() {
    let a = audited("Permissions").await;
    let user = a.invite("watched@audited.example", "Watched").await;
    let (_, member_key) =
        a.t.member_with_key(a.org, "member", "m@audited.example")
            .await;
    let path = history_path(a.org, "user", user);
    assert_error(&a.t.get(&path, &member_key).await, 403);
    // A service key with everything an auditor has but audit:read.
    let r =
        a.t.post(
            &a.path("/api-keys"),
            &a.t.admin_key,
            json!({"label": "almost", "permissions": ["users:read", "roles:read", "keys:read", "ledger:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let almost = r.body["secret"].as_str().unwrap().to_string();
    assert_error(&a.t.get(&path, &almost).await, 403);
    assert_error(&a.t.with_authorization(Method::GET, &path, None).await, 401);
    // The control: audit:read alone is enough.
    let r =
        a.t.post(
            &a.path("/api-keys"),
            &a.t.admin_key,
            json!({"label": "audit only", "permissions": ["audit:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let audit_only = r.body["secret"].as_str().unwrap().to_string();
    assert_eq!(a.t.get(&path, &audit_only).await.status, 200);
}

/// Appends `count` events of entity `id` straight into the log (the harness connects as a
/// superuser), after the head and its `from_sequence - 1` events, each with the payload the
/// SQL expression `payload` makes: far quicker than as many commands, and enough for the
/// history's limits, which care for the events, not their hashes.
async fn append_raw_events(
    t: &TestApp,
    org: Uuid,
    (aggregate_type, id): (&str, Uuid),
    (event_type, payload): (&str, &str),
    from_sequence: i64,
    count: i64,
) {
    sqlx::query(&format!(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, position, organization_id, recorded_at, prev_hash, hash,
                             hash_version)
         SELECT $5, $1, $2 + s, $6, '1', {payload}, '{{}}',
                (SELECT coalesce(max(position), 0) FROM events) + s, $3, now(),
                decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'), 2
         FROM generate_series(1, $4) AS s"
    ))
    .bind(id.to_string())
    .bind(from_sequence - 1)
    .bind(org)
    .bind(count)
    .bind(aggregate_type)
    .bind(event_type)
    .execute(t.pool())
    .await
    .expect("raw events appended");
}

/// `count` reactivations of a made-up user (see [`append_raw_events`]).
async fn append_raw_user_events(
    t: &TestApp,
    org: Uuid,
    user: Uuid,
    from_sequence: i64,
    count: i64,
) {
    let payload = r#"'{"UserReactivated":{}}'"#;
    let event = ("UserReactivated", payload);
    append_raw_events(t, org, ("User", user), event, from_sequence, count).await;
}

#[tokio::test]
async fn a_history_longer_than_the_cap_is_422() {
    let a = audited("Long Streams").await;
    let other_org = a.t.create_org("Elsewhere").await;
    let user = Uuid::new_v4();
    append_raw_user_events(&a.t, a.org, user, 1, 10_000).await;
    let items = a.history("user", user).await;
    assert_eq!(items.len(), 10_000, "exactly the cap is still shown");

    append_raw_user_events(&a.t, a.org, user, 10_001, 1).await;
    let r =
        a.t.get(&history_path(a.org, "user", user), &a.auditor_key)
            .await;
    assert_error(&r, 422);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("10000"),
        "the message names the cap: {}",
        r.body
    );
    // Tenancy first: through another organization's path it is simply not found.
    let r =
        a.t.get(&history_path(other_org, "user", user), &a.t.admin_key)
            .await;
    assert_error(&r, 404);
}

/// `count` reads of `message` by made-up users (see [`append_raw_events`]).
async fn append_raw_reads(
    t: &TestApp,
    org: Uuid,
    conversation: Uuid,
    message: Uuid,
    from_sequence: i64,
    count: i64,
) {
    let payload = format!(
        "json_build_object('MessageRead', json_build_object(\
             'conversation_id', '{conversation}', 'user_id', gen_random_uuid()))"
    );
    let event = ("MessageRead", payload.as_str());
    append_raw_events(t, org, ("Message", message), event, from_sequence, count).await;
}

/// A set or map an event adds to shows only what the event changed in it: a message read by
/// thousands answers in proportion to its events, not to their square (a whole `readers`
/// set on each side of each read would make 2,000 reads some 150 MB). A replay whose states
/// hold too much in all is refused, as a long one is.
#[tokio::test]
async fn a_collection_shows_only_what_each_event_changed_in_it() {
    let a = audited("Widely Read").await;
    let conversation = a.open_group("All hands", json!([a.auditor])).await;
    let r =
        a.t.post(
            &a.path(&format!("/conversations/{conversation}/messages")),
            &a.owner_key,
            json!({"content": "all hands at noon"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let message = id_of(&r);
    append_raw_reads(&a.t, a.org, conversation, message, 2, 2_000).await;

    let path = history_path(a.org, "message", message);
    let r = a.t.get(&path, &a.auditor_key).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let size = r.body.to_string().len();
    assert!(size < 2_000_000, "the answer is {size} bytes");
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2_001);
    let mut readers = BTreeSet::new();
    for item in &items[1..] {
        assert_eq!(changed(item), names(&["readers"]), "{item}");
        assert_eq!(item["changes"]["before"]["readers"], json!([]), "{item}");
        let added = item["changes"]["after"]["readers"].as_array().unwrap();
        assert_eq!(added.len(), 1, "{item}");
        assert!(
            readers.insert(added[0].as_str().unwrap().to_string()),
            "each read adds its reader once"
        );
    }
    assert_eq!(readers.len(), 2_000);

    // 5,000 reads: the replay's states would hold some 12.5 million values in all.
    append_raw_reads(&a.t, a.org, conversation, message, 2_002, 3_000).await;
    let r = a.t.get(&path, &a.auditor_key).await;
    assert_error(&r, 422);
    let text = r.body["error"]["message"].as_str().unwrap();
    assert!(
        text.contains("10000000") && text.contains(&format!("aggregate_id={message}")),
        "the message names the limit and where to read the events: {text}"
    );
}

#[tokio::test]
async fn the_history_route_is_documented_with_audit_read() {
    let route = ROUTES
        .iter()
        .find(|r| r.path == "/v1/organizations/{org}/history/{entity_type}/{id}")
        .expect("the history route is in the route table");
    assert_eq!(route.method, "GET");
    assert_eq!(route.permission, Some("audit:read"));
    assert_eq!(route.success, 200);
}

// ---------------------------------------------------------------------------------------------
// The built-in auditor role
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn auditor_reads_audit_events_ledger_and_history() {
    let a = audited("Auditor Reads").await;
    let user = a.invite("subject@audited.example", "Subject").await;
    let (_, member_key) =
        a.t.member_with_key(a.org, "member", "m@audited.example")
            .await;

    // An id is an id however it is written: upper case finds the same events, and what is
    // no id at all is refused rather than answered with an empty trail.
    for id in [user.to_string(), user.to_string().to_uppercase()] {
        let r =
            a.t.get(
                &a.path(&format!("/audit-events?aggregate_id={id}")),
                &a.auditor_key,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.body["items"][0]["event_type"], "UserInvited",
            "{id}: {}",
            r.body
        );
    }
    let r =
        a.t.get(&a.path("/audit-events?aggregate_id=abc"), &a.auditor_key)
            .await;
    assert_error(&r, 400);

    // The entity type filter takes the history path's name or the stored one, and an
    // unknown one is refused rather than answered with an empty trail.
    for name in ["user", "User"] {
        let path = format!("/audit-events?aggregate_type={name}&aggregate_id={user}");
        let r = a.t.get(&a.path(&path), &a.auditor_key).await;
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        assert_eq!(
            r.body["items"][0]["event_type"], "UserInvited",
            "{name}: {}",
            r.body
        );
    }
    let r =
        a.t.get(
            &a.path("/audit-events?aggregate_type=users"),
            &a.auditor_key,
        )
        .await;
    assert_error_says(
        &r,
        400,
        "unknown aggregate_type `users`; expected one of: organization (Organization)",
    );

    let r =
        a.t.get(&a.path("/ledger/events?limit=1000"), &a.auditor_key)
            .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ledger = r.body["items"].as_array().unwrap();
    assert!(
        ledger
            .iter()
            .any(|e| e["aggregate_id"] == json!(user) && e["event_type"] == "UserInvited"),
        "{}",
        r.body
    );

    let items = a.history("user", user).await;
    assert_eq!(event_types(&items), ["UserInvited"]);
    // The history's positions are the ledger's.
    let in_ledger = ledger
        .iter()
        .find(|e| e["aggregate_id"] == json!(user))
        .unwrap();
    assert_eq!(items[0]["position"], in_ledger["position"]);

    // The same reads are refused to a member: the role is what grants them.
    for path in [
        a.path("/audit-events"),
        a.path("/ledger/events"),
        history_path(a.org, "user", user),
    ] {
        assert_error(&a.t.get(&path, &member_key).await, 403);
    }
}

/// The `x-request-id` an answer gives back is the one its events record, so that
/// `audit-events?request_id=` finds them by it: one the server will not keep whole (too long,
/// or not visible ASCII) is replaced by one of its own, on both.
#[tokio::test]
async fn the_request_id_an_answer_gives_is_the_one_its_events_record() {
    let a = audited("Request Ids").await;
    let too_long = "r".repeat(600);
    let not_ascii = reqwest::header::HeaderValue::from_bytes(b"caf\xe9-request").unwrap();
    let given = [
        reqwest::header::HeaderValue::from_str(&too_long).unwrap(),
        not_ascii,
        reqwest::header::HeaderValue::from_static("kept-as-sent"),
    ];
    for (i, request_id) in given.into_iter().enumerate() {
        let r =
            a.t.client
                .post(format!("{}{}", a.t.base, a.path("/users")))
                .bearer_auth(&a.owner_key)
                .header("x-request-id", request_id.clone())
                .json(&json!({"email": format!("r{i}@audited.example"), "full_name": "Req"}))
                .send()
                .await
                .expect("request sent");
        assert_eq!(r.status().as_u16(), 201);
        let answered = r
            .headers()
            .get("x-request-id")
            .expect("an x-request-id in the answer")
            .to_str()
            .expect("visible ASCII")
            .to_string();
        if i == 2 {
            assert_eq!(answered, "kept-as-sent");
        } else {
            assert!(
                answered.as_bytes() != request_id.as_bytes(),
                "{i}: the server made its own, {answered}"
            );
        }
        let found =
            a.t.get(
                &a.path(&format!("/audit-events?request_id={answered}")),
                &a.auditor_key,
            )
            .await;
        assert_eq!(found.status, 200, "{}", found.body);
        let items = found.body["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{i}: {}", found.body);
        assert_eq!(items[0]["event_type"], "UserInvited", "{}", found.body);
        assert_eq!(items[0]["request_id"], json!(answered), "{}", found.body);
    }
}

/// What a key did is asked of its id (`actor_key`), a service key's too, which acts for no
/// user and so matches no `actor`. A key's id given as `actor`, or a user's as `actor_key`,
/// is refused naming the right filter: an empty trail would read as "it did nothing".
#[tokio::test]
async fn audit_events_filter_by_the_acting_key() {
    let a = &audited("Key Actor").await;
    let audit = |query: String| async move {
        a.t.get(&a.path(&format!("/audit-events?{query}")), &a.auditor_key)
            .await
    };
    let items = |r: Response| {
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["items"].as_array().unwrap().clone()
    };
    let r =
        a.t.post(
            &a.path("/api-keys"),
            &a.t.admin_key,
            json!({"label": "sync", "permissions": ["users:read", "users:write"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let service_id = id_of(&r);
    let service = r.body["secret"].as_str().unwrap().to_string();
    let mut invited = Vec::new();
    for i in 0..3 {
        let r =
            a.t.post(
                &a.path("/users"),
                &service,
                json!({"email": format!("s{i}@audited.example"), "full_name": "Synced"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        invited.push(json!(id_of(&r)));
    }
    let by_owner = a.invite("o@audited.example", "By Owner").await;

    // Every event of the service key, in pages of two, and nothing else.
    let mut seen = Vec::new();
    let mut query = format!("actor_key={service_id}&order=asc&limit=2");
    for pages in 1.. {
        let r = audit(query.clone()).await;
        let next = r.body["next_cursor"].as_i64();
        for item in items(r) {
            assert_eq!(item["actor_key_id"], json!(service_id), "{item}");
            assert_eq!(item["actor_user_id"], Value::Null, "{item}");
            assert_eq!(item["event_type"], "UserInvited", "{item}");
            seen.push(item["aggregate_id"].clone());
        }
        match next {
            Some(c) => query = format!("{query}&cursor={c}"),
            None => {
                assert_eq!(pages, 2, "three events in pages of two");
                break;
            }
        }
    }
    assert_eq!(seen, invited);

    // The owner's key: the owner's invitation, none of the service key's; with `actor`
    // too, both must match.
    let owners = items(audit(format!("actor_key={}", a.owner_key_id)).await);
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(owners[0]["aggregate_id"], json!(by_owner));
    let both = audit(format!("actor={}&actor_key={service_id}", a.owner)).await;
    assert_eq!(items(both), Vec::<Value>::new());

    // A key's id as `actor`: the organization's own keys, and the platform operator's key,
    // which is no organization's but acted in this one (it made it).
    let admin_key_id = key_id(&a.t, &a.t.admin_key).await;
    for key in [service_id, a.owner_key_id, admin_key_id] {
        let r = audit(format!("actor={key}")).await;
        assert_error_says(&r, 400, &format!("is an API key's: use actor_key={key}"));
    }
    // A user's id as `actor_key`; as `actor`, it still answers that user's events.
    let r = audit(format!("actor_key={}", a.owner)).await;
    assert_error_says(&r, 400, &format!("is a user's: use actor={}", a.owner));
    assert_eq!(items(audit(format!("actor={}", a.owner)).await).len(), 1);
    // An id the organization does not know is no one's here: an empty trail.
    let unknown = audit(format!("actor_key={}", Uuid::new_v4())).await;
    assert_eq!(items(unknown), Vec::<Value>::new());
}

/// Routes of others' work in progress (checkpoints, proofs, exports) are left to them.
fn owned_elsewhere(path: &str) -> bool {
    ["checkpoint", "proof", "export"]
        .iter()
        .any(|w| path.contains(w))
}

#[tokio::test]
async fn auditor_can_issue_no_command() {
    let a = audited("Auditor Commands").await;
    let t = &a.t;
    let org = a.org;
    let (bob, bob_key) = t
        .member_with_key(org, "member", "bob@audited.example")
        .await;
    let auditor_user = a.auditor;
    let r = t
        .post(
            &a.path("/roles"),
            &a.owner_key,
            json!({"name": "custom", "permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let custom = id_of(&r);
    let r = t
        .post(
            &a.path("/api-keys"),
            &t.admin_key,
            json!({"label": "service", "permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let service_key = id_of(&r);
    let r = t
        .post(
            &a.path("/conversations"),
            &bob_key,
            json!({"kind": "group", "title": "Ops", "participants": [a.owner]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let conversation = id_of(&r);
    let r = t
        .post(
            &a.path(&format!("/conversations/{conversation}/messages")),
            &bob_key,
            json!({"content": "hello"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let message = id_of(&r);

    // A valid body for every command route, so that a refusal can only be the permission's.
    let body_for = |method: &str, path: &str| -> Option<Value> {
        let b = match (method, path) {
            ("POST", "/v1/organizations") => json!({"name": "Mine", "slug": "mine"}),
            ("PATCH", "/v1/organizations/{org}") => json!({"name": "Renamed"}),
            ("POST", "/v1/organizations/{org}/users") => {
                json!({"email": "new@audited.example", "full_name": "New"})
            }
            ("PATCH", "/v1/organizations/{org}/users/{user}") => json!({"full_name": "Changed"}),
            ("PUT", "/v1/organizations/{org}/users/{user}/roles/{role}") => json!({}),
            ("POST", "/v1/organizations/{org}/roles") => {
                json!({"name": "new role", "permissions": ["users:read"]})
            }
            ("PATCH", "/v1/organizations/{org}/roles/{role}") => json!({"description": "changed"}),
            ("POST", "/v1/organizations/{org}/api-keys") => {
                json!({"label": "mine", "permissions": ["users:read"]})
            }
            ("POST", "/v1/organizations/{org}/conversations") => {
                json!({"kind": "group", "title": "Mine", "participants": [bob], "owner_id": auditor_user})
            }
            ("PATCH", "/v1/organizations/{org}/conversations/{id}") => json!({"title": "Mine"}),
            ("POST", "/v1/organizations/{org}/conversations/{id}/participants") => {
                json!({"user_id": auditor_user})
            }
            ("PATCH", "/v1/organizations/{org}/conversations/{id}/participants/{user}") => {
                json!({"role": "admin"})
            }
            ("POST", "/v1/organizations/{org}/conversations/{id}/messages") => {
                json!({"content": "from the auditor", "author_id": auditor_user})
            }
            ("PATCH", "/v1/organizations/{org}/conversations/{id}/messages/{msg}") => {
                json!({"content": "edited"})
            }
            ("POST", "/v1/organizations/{org}/conversations/{id}/read") => {
                json!({"message_id": message})
            }
            ("DELETE", _) => return None,
            // Suspend, reactivate, deactivate, erase, revoke, rotate, archive, reactions.
            _ => json!({}),
        };
        Some(b)
    };
    let fill = |path: &str| -> String {
        path.split('/')
            .map(|seg| match seg {
                "{org}" => org.to_string(),
                "{user}" => bob.to_string(),
                "{role}" => custom.to_string(),
                "{key}" => service_key.to_string(),
                "{id}" => conversation.to_string(),
                "{msg}" => message.to_string(),
                "{emoji}" => "%F0%9F%91%8D".to_string(),
                s if s.starts_with('{') => Uuid::new_v4().to_string(),
                s => s.to_string(),
            })
            .collect::<Vec<_>>()
            .join("/")
    };

    let mut tried = 0;
    for route in ROUTES {
        if route.method == "GET" || owned_elsewhere(route.path) {
            continue;
        }
        let before = t.head().await;
        let method: Method = route.method.parse().unwrap();
        let path = fill(route.path);
        let r = t
            .call(
                method,
                &path,
                Some(&a.auditor_key),
                body_for(route.method, route.path),
            )
            .await;
        assert_eq!(
            r.status, 403,
            "{} {} by the auditor: {}",
            route.method, route.path, r.body
        );
        assert_error(&r, 403);
        assert_eq!(
            t.head().await,
            before,
            "{} {} by the auditor appended nothing",
            route.method,
            route.path
        );
        tried += 1;
    }
    assert!(tried >= 30, "every command route was tried ({tried})");

    // The control: the owner's key, with the same ids and bodies, does command.
    let before = t.head().await;
    let path = fill("/v1/organizations/{org}/roles/{role}");
    let r = t
        .patch(
            &path,
            &a.owner_key,
            body_for("PATCH", "/v1/organizations/{org}/roles/{role}").unwrap(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(t.head().await > before);
    assert_eq!(
        t.get("/v1/me", &a.auditor_key).await.status,
        200,
        "the auditor's key still works"
    );
}
