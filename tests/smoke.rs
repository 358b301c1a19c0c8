//! The README walkthrough, end to end: bootstrap, organization, user, role, key, audit, verify.

mod common;

use common::TestApp;
use serde_json::json;

#[tokio::test]
async fn walkthrough() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let user = t.invite(org, "ada@example.com", "Ada Lovelace").await;
    let r = t
        .post(
            &format!("/v1/organizations/{org}/roles"),
            &t.admin_key,
            json!({"name": "support", "permissions": ["users:read", "audit:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let role = r.body["id"].as_str().unwrap().to_string();
    let r = t
        .put(
            &format!("/v1/organizations/{org}/users/{user}/roles/{role}"),
            &t.admin_key,
            json!({"reason": "on call"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t.post(&format!("/v1/organizations/{org}/api-keys"), &t.admin_key, json!({"label": "ada laptop", "permissions": ["users:read", "audit:read"], "user_id": user})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let key = r.body["secret"].as_str().unwrap().to_string();

    let me = t.get("/v1/me", &key).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["permissions"], json!(["users:read", "audit:read"]));
    let u = t
        .get(&format!("/v1/organizations/{org}/users/{user}"), &key)
        .await;
    assert_eq!(u.body["email"], "ada@example.com");
    assert_eq!(u.body["full_name"], "Ada Lovelace");

    let audit = t
        .get(
            &format!("/v1/organizations/{org}/audit-events?order=asc"),
            &key,
        )
        .await;
    assert_eq!(audit.status, 200, "{}", audit.body);
    let types: Vec<&str> = audit.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        &types[..6],
        [
            "OrganizationCreated",
            "RoleCreated",
            "RoleCreated",
            "RoleCreated",
            "RoleCreated",
            "UserInvited"
        ]
    );
    assert!(types.contains(&"ApiKeyIssued"));

    let report = t.verify().await;
    assert!(report.intact(), "{:?}", report.first_bad);
    assert_eq!(report.events as i64, t.head().await);
    common::assert_actors_guarded(t.pool()).await;
}
