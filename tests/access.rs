//! Who may do what: 401 for bad credentials, 403 for missing permissions, 404 across tenants,
//! no privilege escalation, keys cut by revocation, expiry, suspension and role changes, and
//! an OpenAPI document that matches the router.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{
    assert_actors_guarded, assert_error, assert_error_says, concrete, eventually, hold_on_4242,
    sessions_waiting_on_4242, Response, TestApp,
};
use ledgerline::api::ROUTES;
use ledgerline_aggregates::organization::built_in_roles;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn org_path(org: Uuid, rest: &str) -> String {
    format!("/v1/organizations/{org}{rest}")
}

/// The wire names of a built-in role's permissions, in the order the API lists them.
fn role_permissions(role: &str) -> Vec<String> {
    built_in_roles::permissions(role)
        .unwrap()
        .into_iter()
        .map(String::from)
        .collect()
}

fn permissions_of(me: &Response) -> Vec<String> {
    me.body["permissions"]
        .as_array()
        .unwrap_or_else(|| panic!("permissions in /v1/me: {}", me.body))
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

/// Issues a key in `org` with `issuer`'s key; returns the raw answer.
async fn issue_key(t: &TestApp, org: Uuid, issuer: &str, body: Value) -> Response {
    t.post(&org_path(org, "/api-keys"), issuer, body).await
}

/// Issues a key in `org` as the platform operator; returns (key id, secret).
async fn issued(t: &TestApp, org: Uuid, body: Value) -> (Uuid, String) {
    let r = issue_key(t, org, &t.admin_key, body).await;
    assert_eq!(r.status, 201, "issue: {}", r.body);
    (
        r.body["id"].as_str().unwrap().parse().unwrap(),
        r.body["secret"].as_str().unwrap().to_string(),
    )
}

/// The id of the key whose secret is `secret`, as /v1/me reports it.
async fn key_id(t: &TestApp, secret: &str) -> Uuid {
    let me = t.get("/v1/me", secret).await;
    assert_eq!(me.status, 200, "{}", me.body);
    me.body["key"]["id"].as_str().unwrap().parse().unwrap()
}

/// Creates a custom role in `org` as the platform operator; returns its id.
async fn create_role(t: &TestApp, org: Uuid, name: &str, permissions: &[&str]) -> Uuid {
    t.create_role(org, name, permissions, None).await
}

/// A user holding `role` (by id) and a key of theirs with `permissions`.
async fn user_with_role_and_key(
    t: &TestApp,
    org: Uuid,
    email: &str,
    role: Uuid,
    permissions: &[&str],
) -> (Uuid, String) {
    let user = t.invite(org, email, "Role Holder").await;
    let r = t
        .put(
            &org_path(org, &format!("/users/{user}/roles/{role}")),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "assign: {}", r.body);
    let (_, secret) = issued(
        t,
        org,
        json!({"label": "custom", "permissions": permissions, "user_id": user}),
    )
    .await;
    (user, secret)
}

/// A time `s` seconds from now. The expiries the tests below wait out leave room for the
/// commands and reads before them on a machine the rest of the suite keeps busy.
fn in_seconds(s: i64) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::seconds(s)
}

/// A time the API answered (RFC 3339).
fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap().parse().unwrap()
}

/// Sleeps until `at` has passed by a little.
async fn sleep_past(at: DateTime<Utc>) {
    let left = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    tokio::time::sleep(left + Duration::from_millis(600)).await;
}

/// A string of the shape of a key (`ll_<12 hex>_<43 base64url>`) that was never issued.
fn unknown_key() -> String {
    format!(
        "ll_{}_{}",
        &Uuid::new_v4().simple().to_string()[..12],
        "A".repeat(43)
    )
}

// ---------------------------------------------------------------------------------------------
// 401: no, malformed, unknown, revoked, expired, rotated-away and suspended keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_authorization_header_is_401() {
    let t = TestApp::spawn().await;
    for path in ["/v1/me", "/v1/organizations", "/v1/ledger/head"] {
        let r = t.with_authorization(Method::GET, path, None).await;
        assert_error(&r, 401);
    }
    let before = t.head().await;
    let r = t
        .call(
            Method::POST,
            "/v1/organizations",
            None,
            Some(json!({"name": "Nope", "slug": "nope"})),
        )
        .await;
    assert_error(&r, 401);
    assert_eq!(t.head().await, before);
}

#[tokio::test]
async fn malformed_authorization_headers_are_401() {
    let t = TestApp::spawn().await;
    let admin = t.admin_key.clone();
    let cases = [
        "Basic x".to_string(),
        "Basic dXNlcjpwYXNz".to_string(),
        "Bearer".to_string(),
        "Bearer ".to_string(),
        "garbage".to_string(),
        admin.clone(), // the right key without its scheme
        format!("Token {admin}"),
        "Bearer not-a-key".to_string(),
        format!("Bearer {}", &admin[..admin.len() - 1]), // truncated
        format!("Bearer {admin}x"),                      // too long
    ];
    for header in &cases {
        let r = t
            .with_authorization(Method::GET, "/v1/me", Some(header))
            .await;
        assert_error(&r, 401);
    }
    // The control: the same key, properly presented, works.
    let r = t
        .with_authorization(Method::GET, "/v1/me", Some(&format!("Bearer {admin}")))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn unknown_key_of_the_right_shape_is_401() {
    let t = TestApp::spawn().await;
    let r = t.get("/v1/me", &unknown_key()).await;
    assert_error(&r, 401);
}

#[tokio::test]
async fn known_prefix_with_a_wrong_secret_is_401() {
    let t = TestApp::spawn().await;
    let admin = &t.admin_key;
    let last = admin.chars().last().unwrap();
    let forged = format!(
        "{}{}",
        &admin[..admin.len() - 1],
        if last == 'A' { 'B' } else { 'A' }
    );
    let r = t.get("/v1/me", &forged).await;
    assert_error(&r, 401);
}

#[tokio::test]
async fn revoked_key_is_refused_on_its_very_next_request() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Revokers").await;
    let (id, secret) = issued(
        &t,
        org,
        json!({"label": "svc", "permissions": ["users:read"]}),
    )
    .await;
    assert_eq!(t.get("/v1/me", &secret).await.status, 200);
    let r = t
        .post(
            &org_path(org, &format!("/api-keys/{id}/revoke")),
            &t.admin_key,
            json!({"reason": "leaked"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "revoked");
    let r = t.get(&org_path(org, "/users"), &secret).await;
    assert_error(&r, 401);
    assert_error(&t.get("/v1/me", &secret).await, 401);
}

#[tokio::test]
async fn a_key_can_revoke_itself_and_is_then_refused() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Self Revokers").await;
    let (id, secret) = issued(
        &t,
        org,
        json!({"label": "svc", "permissions": ["keys:write", "keys:read"]}),
    )
    .await;
    let r = t
        .post(
            &org_path(org, &format!("/api-keys/{id}/revoke")),
            &secret,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_error(&t.get(&org_path(org, "/api-keys"), &secret).await, 401);
}

#[tokio::test]
async fn expired_key_is_401() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Expirers").await;
    let expires_at = in_seconds(8);
    let (_, secret) = issued(
        &t,
        org,
        json!({"label": "short", "permissions": ["users:read"], "expires_at": expires_at}),
    )
    .await;
    let r = t.get(&org_path(org, "/users"), &secret).await;
    assert_eq!(r.status, 200, "works before it expires: {}", r.body);
    sleep_past(expires_at).await;
    assert_error(&t.get(&org_path(org, "/users"), &secret).await, 401);
    assert_error(&t.get("/v1/me", &secret).await, 401);
}

#[tokio::test]
async fn rotated_key_old_secret_is_401_and_new_secret_works() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Rotators").await;
    let (id, old) = issued(
        &t,
        org,
        json!({"label": "svc", "permissions": ["users:read", "users:write"]}),
    )
    .await;
    let r = t
        .post(
            &org_path(org, &format!("/api-keys/{id}/rotate")),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let new = r.body["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(r.body["id"], json!(id), "the same key, a new secret");
    assert_eq!(r.body["prefix"].as_str().unwrap(), &new[..15]);
    // The old secret is told it was rotated away; a made-up secret under its prefix (which
    // lists and logs show) learns nothing of the key.
    assert_error_says(&t.get("/v1/me", &old).await, 401, "secret has been rotated");
    let forged = |secret: &str| format!("{}{}", &secret[..16], "A".repeat(43));
    let r = t.get("/v1/me", &forged(&old)).await;
    assert_error(&r, 401);
    assert_eq!(r.body["error"]["message"], json!("invalid API key"));
    // A prefix no key ever had stays plainly invalid.
    let unknown = format!("ll_{}{}", "0".repeat(12), &old[15..]);
    let r = t.get("/v1/me", &unknown).await;
    assert_error(&r, 401);
    assert_eq!(r.body["error"]["message"], json!("invalid API key"));
    let me = t.get("/v1/me", &new).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["key"]["id"], json!(id));
    assert_eq!(t.get(&org_path(org, "/users"), &new).await.status, 200);
    // Its commands go on under the new secret: the version they are guarded by moved with
    // the rotation.
    let invite = json!({"email": "after@example.com", "full_name": "After"});
    let r = t.post(&org_path(org, "/users"), &new, invite).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = t
        .post(
            &org_path(org, &format!("/api-keys/{id}/revoke")),
            &t.admin_key,
            json!({"reason": "done"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_error_says(&t.get("/v1/me", &old).await, 401, "revoked or rotated");
    for secret in [&old, &new] {
        let r = t.get("/v1/me", &forged(secret)).await;
        assert_error(&r, 401);
        assert_eq!(r.body["error"]["message"], json!("invalid API key"));
    }
}

/// A rotation may keep the old secret working for a while: a client that rotates its own
/// key and loses the answer rotates again with the old secret, instead of being locked out.
/// What the old secret does is the key's, but nothing it issues outlives its grace; only the
/// newest rotation's grace counts, a revocation ends every secret, and the grace ends on
/// time. While `api_keys` does not show the rotation yet, the old secret is told to retry.
#[tokio::test]
async fn a_rotation_may_give_the_old_secret_a_grace_period() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Rollers").await;
    let (id, first) = issued(
        &t,
        org,
        json!({"label": "svc", "permissions": ["users:read", "users:write", "keys:write"]}),
    )
    .await;
    let rotate = |secret: String, grace: Value| {
        let t = &t;
        async move {
            t.post(
                &org_path(org, &format!("/api-keys/{id}/rotate")),
                &secret,
                grace,
            )
            .await
        }
    };
    let me = |secret: String| {
        let t = &t;
        async move { t.get("/v1/me", &secret).await }
    };
    let for_secs = |secs: u32| json!({ "previous_secret_valid_for_seconds": secs });
    let head = t.head().await;
    for (body, says) in [
        (for_secs(0), "from 1 to 86400"),
        (for_secs(86_401), "from 1 to 86400"),
        (
            json!({"previous_secret_valid_for_seconds": -5}),
            "previous_secret_valid_for_seconds",
        ),
        (
            json!({"previous_secret_valid_for_seconds": null}),
            "cannot be null",
        ),
        (json!({"previous_secret_ttl": 5}), "previous_secret_ttl"),
    ] {
        assert_error_says(&rotate(first.clone(), body).await, 422, says);
    }
    assert_eq!(t.head().await, head, "a refused rotation appends nothing");

    // The key rotates itself with an hour's grace, and the answer is "lost"; until
    // `api_keys` shows the rotation, the old secret is told to retry, not refused.
    t.stop_projection("api_keys").await;
    let before = Utc::now();
    let r = rotate(first.clone(), for_secs(3600)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let until = time(&r.body["previous_secret_valid_until"]);
    let hour = chrono::TimeDelta::hours(1);
    assert!(until >= before + hour - chrono::TimeDelta::seconds(1) && until <= Utc::now() + hour);
    let lost = r.body["secret"].as_str().unwrap().to_string();
    assert_error_says(&me(first.clone()).await, 503, "retry shortly");
    t.resume_projection("api_keys").await;
    let shown = eventually(Duration::from_secs(30), || async {
        me(first.clone()).await.status == 200
    });
    assert!(
        shown.await,
        "the old secret works once the rotation is shown"
    );
    // It acts as the key, says until when, and what it does is recorded in the key's name.
    let r = me(first.clone()).await;
    assert_eq!(r.body["key"]["id"], json!(id));
    assert_eq!(r.body["key"]["prefix"].as_str().unwrap(), &first[..15]);
    assert_eq!(time(&r.body["key"]["secret_valid_until"]), until);
    let r = me(lost.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body["key"].get("secret_valid_until").is_none(),
        "{}",
        r.body
    );
    // The log says which of its secrets acted.
    for (secret, email) in [(&first, "grace@example.com"), (&lost, "lost@example.com")] {
        let r = t.invite_by(org, secret, email, "Grace").await;
        assert_eq!(r.status, 201, "{}", r.body);
        let actor: (Option<String>, Option<String>) = sqlx::query_as(
            "SELECT metadata::jsonb ->> 'actor_key_id', metadata::jsonb ->> 'actor_key_prefix' \
             FROM events WHERE event_type = 'UserInvited' AND aggregate_id = $1",
        )
        .bind(r.body["id"].as_str().unwrap())
        .fetch_one(t.pool())
        .await
        .unwrap();
        assert_eq!(
            actor,
            (Some(id.to_string()), Some(secret[..15].to_string()))
        );
    }
    // Nothing it issues outlives its grace.
    let r = t
        .post(
            &org_path(org, "/api-keys"),
            &first,
            json!({"label": "escape", "permissions": ["users:read"]}),
        )
        .await;
    assert_error_says(&r, 403, "grace period) stops working at");

    // Rotated again with the old secret: the newest rotation's grace is the only one, so the
    // first secret stops, the lost one is now in grace, and the newest works (once shown).
    let r = rotate(first.clone(), for_secs(120)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let newest = r.body["secret"].as_str().unwrap().to_string();
    let works = |secret: &str| {
        let secret = secret.to_string();
        eventually(Duration::from_secs(30), move || {
            let secret = secret.clone();
            async move { me(secret).await.status == 200 }
        })
    };
    assert!(works(&newest).await);
    assert!(works(&lost).await, "in the newest rotation's grace");
    assert_error_says(&me(first.clone()).await, 401, "rotated again since");
    // A grace ends on time (given one second here, and not tried within it).
    let r = rotate(newest.clone(), for_secs(1)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ends = time(&r.body["previous_secret_valid_until"]);
    let replaced = newest;
    let newest = r.body["secret"].as_str().unwrap().to_string();
    sleep_past(ends).await;
    assert!(works(&newest).await);
    assert_error_says(
        &me(replaced).await,
        401,
        "grace period the rotation gave it ended at",
    );
    assert_error_says(&me(lost).await, 401, "rotated again since");

    // A revocation stops a secret in its grace, also one `api_keys` does not show yet.
    let r = rotate(newest.clone(), for_secs(600)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let last = r.body["secret"].as_str().unwrap().to_string();
    assert!(works(&last).await);
    assert!(works(&newest).await, "in its grace");
    t.stop_projection("api_keys").await;
    let r = t
        .post(
            &org_path(org, &format!("/api-keys/{id}/revoke")),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for secret in [newest.clone(), last.clone()] {
        assert_error_says(&me(secret).await, 401, "revoked");
    }
    t.resume_projection("api_keys").await;
    let shown = eventually(Duration::from_secs(30), || async {
        me(last.clone()).await.status == 401 && me(newest.clone()).await.status == 401
    });
    assert!(
        shown.await,
        "both stay refused once the revocation is shown"
    );
}

#[tokio::test]
async fn suspended_organization_keys_are_401_until_reactivated() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Suspendables").await;
    let (_, owner_key) = t
        .member_with_key(org, "owner", "owner@suspendables.example")
        .await;
    let (_, service_key) = issued(
        &t,
        org,
        json!({"label": "svc", "permissions": ["users:read"]}),
    )
    .await;
    let other = t.create_org("Bystanders").await;
    let (_, bystander) = t
        .member_with_key(other, "member", "member@bystanders.example")
        .await;

    let r = t
        .post(
            &org_path(org, "/suspend"),
            &t.admin_key,
            json!({"reason": "unpaid"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "suspended");
    for key in [&owner_key, &service_key] {
        assert_error(&t.get("/v1/me", key).await, 401);
        assert_error(&t.get(&org_path(org, "/users"), key).await, 401);
    }
    assert_eq!(
        t.get("/v1/me", &bystander).await.status,
        200,
        "other tenants are unaffected"
    );

    let r = t
        .post(&org_path(org, "/reactivate"), &t.admin_key, json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "active");
    for key in [&owner_key, &service_key] {
        assert_eq!(t.get(&org_path(org, "/users"), key).await.status, 200);
    }
}

// ---------------------------------------------------------------------------------------------
// Keys cut by what happens to their user
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn revoking_the_users_role_cuts_the_users_key() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Role Cutters").await;
    let (user, key) = t
        .member_with_key(org, "admin", "admin@cutters.example")
        .await;
    let me = t.get("/v1/me", &key).await;
    assert_eq!(permissions_of(&me), role_permissions("admin"));
    assert_eq!(t.get(&org_path(org, "/api-keys"), &key).await.status, 200);

    let admin_role = t.role_id(org, "admin").await;
    let r = t
        .delete(
            &org_path(org, &format!("/users/{user}/roles/{admin_role}")),
            &t.admin_key,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);

    let me = t.get("/v1/me", &key).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(
        permissions_of(&me),
        Vec::<String>::new(),
        "no role, no permissions"
    );
    // The refusal names the user's roles, not the key, as what is missing.
    assert_error_says(
        &t.get(&org_path(org, "/api-keys"), &key).await,
        403,
        "its user's roles do not grant it",
    );
    let before = t.head().await;
    let r = t
        .post(
            &org_path(org, "/users"),
            &key,
            json!({"email": "x@cutters.example", "full_name": "X"}),
        )
        .await;
    assert_error(&r, 403);
    assert_eq!(t.head().await, before);
}

#[tokio::test]
async fn deactivating_the_user_cuts_the_users_key_and_reactivating_restores_it() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Deactivators").await;
    let (user, key) = t
        .member_with_key(org, "member", "member@deactivators.example")
        .await;
    assert_eq!(t.get(&org_path(org, "/users"), &key).await.status, 200);

    let r = t
        .post(
            &org_path(org, &format!("/users/{user}/deactivate")),
            &t.admin_key,
            json!({"reason": "left"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_error(&t.get(&org_path(org, "/users"), &key).await, 401);
    assert_error(&t.get("/v1/me", &key).await, 401);

    let r = t
        .post(
            &org_path(org, &format!("/users/{user}/reactivate")),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(t.get(&org_path(org, "/users"), &key).await.status, 200);
}

#[tokio::test]
async fn expired_role_assignment_grants_nothing() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Temporaries").await;
    let user = t
        .invite(org, "temp@temporaries.example", "Temp Worker")
        .await;
    let member = t.role_id(org, "member").await;
    let expires_at = in_seconds(10);
    let r = t
        .put(
            &org_path(org, &format!("/users/{user}/roles/{member}")),
            &t.admin_key,
            json!({"expires_at": expires_at, "reason": "trial"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, key) = issued(
        &t,
        org,
        json!({"label": "temp", "permissions": role_permissions("member"), "user_id": user}),
    )
    .await;

    let me = t.get("/v1/me", &key).await;
    assert_eq!(
        permissions_of(&me),
        role_permissions("member"),
        "granted while the assignment lasts"
    );
    assert_eq!(t.get(&org_path(org, "/users"), &key).await.status, 200);

    sleep_past(expires_at).await;
    let me = t.get("/v1/me", &key).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(
        permissions_of(&me),
        Vec::<String>::new(),
        "an expired assignment grants nothing"
    );
    assert_error(&t.get(&org_path(org, "/users"), &key).await, 403);
    let r = t
        .get(
            &org_path(org, &format!("/users/{user}/roles")),
            &t.admin_key,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["items"][0]["active"], json!(false), "{}", r.body);
}

#[tokio::test]
async fn user_key_permissions_are_the_intersection_of_key_and_role() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Intersections").await;
    let (user, _) = t
        .member_with_key(org, "member", "member@intersections.example")
        .await;
    // The key asks for more than the member role grants; the role cuts it down.
    let (_, key) = issued(&t, org, json!({"label": "wide", "permissions": ["users:read", "users:write", "keys:read"], "user_id": user})).await;
    let me = t.get("/v1/me", &key).await;
    assert_eq!(permissions_of(&me), vec!["users:read".to_string()]);
    assert_error(&t.get(&org_path(org, "/api-keys"), &key).await, 403);
    let before = t.head().await;
    let r = t
        .post(
            &org_path(org, "/users"),
            &key,
            json!({"email": "y@intersections.example", "full_name": "Y"}),
        )
        .await;
    assert_error(&r, 403);
    assert_eq!(t.head().await, before);
}

#[tokio::test]
async fn deleting_or_narrowing_a_role_cuts_its_holders_keys() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Role Shrinkers").await;
    let narrowed = create_role(&t, org, "narrowed", &["users:read", "keys:read"]).await;
    let deleted = create_role(&t, org, "deleted", &["roles:read"]).await;
    let user = t.invite(org, "holder@shrinkers.example", "Holder").await;
    for role in [narrowed, deleted] {
        let r = t
            .put(
                &org_path(org, &format!("/users/{user}/roles/{role}")),
                &t.admin_key,
                json!({}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let (_, key) = issued(&t, org, json!({"label": "k", "permissions": ["users:read", "roles:read", "keys:read"], "user_id": user})).await;
    assert_eq!(
        permissions_of(&t.get("/v1/me", &key).await),
        vec!["users:read", "roles:read", "keys:read"]
    );

    let r = t
        .patch(
            &org_path(org, &format!("/roles/{narrowed}")),
            &t.admin_key,
            json!({"permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        permissions_of(&t.get("/v1/me", &key).await),
        vec!["users:read", "roles:read"]
    );
    assert_error(&t.get(&org_path(org, "/api-keys"), &key).await, 403);

    let r = t
        .delete(&org_path(org, &format!("/roles/{deleted}")), &t.admin_key)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        permissions_of(&t.get("/v1/me", &key).await),
        vec!["users:read"]
    );
    assert_error(&t.get(&org_path(org, "/roles"), &key).await, 403);
}

// ---------------------------------------------------------------------------------------------
// Keys cut while the read models do not show it yet (a projection stopped at an event it
// could not apply, or behind): the log decides
// ---------------------------------------------------------------------------------------------

/// The answer's `ledgerline-read-models` header, if any.
fn behind(r: &Response) -> Option<&str> {
    r.headers
        .get("ledgerline-read-models")
        .map(|v| v.to_str().unwrap())
}

/// A column of one read-model row, as text.
async fn read_model(t: &TestApp, sql: &str, id: Uuid) -> String {
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(t.pool())
        .await
        .unwrap()
}

/// After a command that `projection` (stopped) does not show: `status_sql` still reads
/// `before` for `id`, `key` is refused with `message` all the same, and once the projection
/// resumes it reads `after` and `key` stays refused.
async fn refused_before_it_is_shown(
    t: &TestApp,
    org: Uuid,
    key: &str,
    projection: &str,
    (status_sql, id): (&str, Uuid),
    (before, after): (&str, &str),
    message: &str,
) {
    assert_eq!(read_model(t, status_sql, id).await, before);
    let r = t.get(&org_path(org, "/users"), key).await;
    assert_error(&r, 401);
    assert_eq!(r.body["error"]["message"], message);
    t.resume_projection(projection).await;
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            read_model(t, status_sql, id).await == after
        })
        .await,
        "{projection} shows it once resumed"
    );
    assert_error(&t.get(&org_path(org, "/users"), key).await, 401);
}

#[tokio::test]
async fn a_key_revoked_or_rotated_while_api_keys_is_stopped_is_refused_at_once() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Stalled Keys").await;
    let perms = json!({"label": "svc", "permissions": ["users:read"]});
    let (revoked, revoked_secret) = issued(&t, org, perms.clone()).await;
    let r = issue_key(&t, org, &t.admin_key, perms).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(behind(&r), None, "shown at once: nothing to say");
    let (rotated, old_secret) = (
        r.body["id"].as_str().unwrap().parse::<Uuid>().unwrap(),
        r.body["secret"].as_str().unwrap().to_string(),
    );
    t.stop_projection("api_keys").await;

    let r = t
        .post(
            &org_path(org, &format!("/api-keys/{revoked}/revoke")),
            &t.admin_key,
            json!({"reason": "leaked"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        behind(&r),
        Some("behind"),
        "the answer says its view does not show the revocation yet"
    );
    let r = t
        .post(
            &org_path(org, &format!("/api-keys/{rotated}/rotate")),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let new_secret = r.body["secret"].as_str().unwrap().to_string();
    let status = "SELECT status FROM api_keys WHERE id = $1";
    assert_eq!(
        read_model(&t, status, revoked).await,
        "active",
        "the read model does not show the revocation"
    );
    assert!(old_secret
        .starts_with(&read_model(&t, "SELECT prefix FROM api_keys WHERE id = $1", rotated).await));

    for secret in [&revoked_secret, &old_secret] {
        let r = t.get(&org_path(org, "/users"), secret).await;
        assert_error(&r, 401);
        assert_eq!(
            r.body["error"]["message"],
            "this API key has been revoked or rotated"
        );
    }
    // Not yet in the read model, so not yet usable: refused, not let through, and told to
    // retry rather than that the secret is wrong; a made-up secret under the new prefix is
    // simply wrong.
    assert_error_says(
        &t.get(&org_path(org, "/users"), &new_secret).await,
        503,
        "the read models do not show it yet",
    );
    let forged = format!("{}{}", &new_secret[..16], "A".repeat(43));
    let r = t.get(&org_path(org, "/users"), &forged).await;
    assert_error(&r, 401);
    assert_eq!(r.body["error"]["message"], json!("invalid API key"));
    // A key issued meanwhile: its secret is in the answer, which the read model cannot give.
    let r = issue_key(
        &t,
        org,
        &t.admin_key,
        json!({"label": "later", "permissions": ["users:read"]}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(behind(&r), Some("behind"));
    let later_secret = r.body["secret"].as_str().unwrap().to_string();
    // Told to retry too, as the rotated secret is: the client keeps a key the server will
    // take, not one it called invalid.
    assert_error_says(
        &t.get(&org_path(org, "/users"), &later_secret).await,
        503,
        "the read models do not show it yet",
    );

    t.resume_projection("api_keys").await;
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            t.get(&org_path(org, "/users"), &new_secret).await.status == 200
        })
        .await,
        "the rotated key works once api_keys catches up"
    );
    assert_eq!(read_model(&t, status, revoked).await, "revoked");
    assert_eq!(
        t.get(&org_path(org, "/users"), &later_secret).await.status,
        200
    );
    for secret in [&revoked_secret, &old_secret] {
        assert_error(&t.get(&org_path(org, "/users"), secret).await, 401);
    }
}

#[tokio::test]
async fn a_user_deactivated_while_users_is_stopped_loses_their_keys_at_once() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Stalled Users").await;
    let (user, key) = t
        .member_with_key(org, "member", "member@stalled-users.example")
        .await;
    assert_eq!(t.get(&org_path(org, "/users"), &key).await.status, 200);
    t.stop_projection("users").await;

    let r = t
        .post(
            &org_path(org, &format!("/users/{user}/deactivate")),
            &t.admin_key,
            json!({"reason": "left"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    refused_before_it_is_shown(
        &t,
        org,
        &key,
        "users",
        ("SELECT status FROM users WHERE id = $1", user),
        ("active", "deactivated"),
        "this key's user is not active",
    )
    .await;
}

#[tokio::test]
async fn an_organization_suspended_while_organizations_is_stopped_loses_its_keys_at_once() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Stalled Tenants").await;
    let (_, key) = issued(
        &t,
        org,
        json!({"label": "svc", "permissions": ["users:read"]}),
    )
    .await;
    t.stop_projection("organizations").await;

    let r = t
        .post(
            &org_path(org, "/suspend"),
            &t.admin_key,
            json!({"reason": "unpaid"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    refused_before_it_is_shown(
        &t,
        org,
        &key,
        "organizations",
        ("SELECT status FROM organizations WHERE id = $1", org),
        ("active", "suspended"),
        "this key's organization is suspended",
    )
    .await;
}

#[tokio::test]
async fn a_role_change_the_read_models_do_not_show_yet_is_503_not_a_grant() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Stalled Roles").await;
    let perms = ["users:read", "keys:read"];
    let revoked = create_role(&t, org, "revoked", &perms).await;
    let narrowed = create_role(&t, org, "narrowed", &perms).await;
    let (user, revoked_key) =
        user_with_role_and_key(&t, org, "a@stalled-roles.example", revoked, &perms).await;
    let (_, narrowed_key) =
        user_with_role_and_key(&t, org, "b@stalled-roles.example", narrowed, &perms).await;
    for key in [&revoked_key, &narrowed_key] {
        assert_eq!(permissions_of(&t.get("/v1/me", key).await), perms);
    }

    // A role taken from the user, with `user_roles` stopped.
    t.stop_projection("user_roles").await;
    let r = t
        .delete(
            &org_path(org, &format!("/users/{user}/roles/{revoked}")),
            &t.admin_key,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let assigned: i64 = sqlx::query_scalar("SELECT count(*) FROM user_roles WHERE user_id = $1")
        .bind(user)
        .fetch_one(t.pool())
        .await
        .unwrap();
    assert_eq!(assigned, 1, "the read model still shows the assignment");
    assert_error(&t.get(&org_path(org, "/api-keys"), &revoked_key).await, 503);
    assert_eq!(
        permissions_of(&t.get("/v1/me", &narrowed_key).await),
        perms,
        "another user's roles are not in question"
    );

    // A role narrowed, with `roles` stopped.
    t.stop_projection("roles").await;
    // A role made meanwhile is in the log, not yet in the read model: 202 and its id, not a
    // 404 that would have the client make it again.
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "meanwhile", "permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(behind(&r), Some("behind"));
    let meanwhile: Uuid = r.body["id"].as_str().unwrap().parse().unwrap();
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{narrowed}")),
            &t.admin_key,
            json!({"permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_error(
        &t.get(&org_path(org, "/api-keys"), &narrowed_key).await,
        503,
    );

    t.resume_projection("user_roles").await;
    t.resume_projection("roles").await;
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            t.get("/v1/me", &narrowed_key).await.status == 200
                && t.get("/v1/me", &revoked_key).await.status == 200
        })
        .await,
        "both keys work again once the read models caught up"
    );
    assert_eq!(
        permissions_of(&t.get("/v1/me", &revoked_key).await),
        Vec::<String>::new()
    );
    assert_eq!(
        permissions_of(&t.get("/v1/me", &narrowed_key).await),
        vec!["users:read"]
    );
    assert_error(
        &t.get(&org_path(org, "/api-keys"), &narrowed_key).await,
        403,
    );
    let r = t
        .get(&org_path(org, &format!("/roles/{meanwhile}")), &t.admin_key)
        .await;
    assert_eq!(
        r.status, 200,
        "made once, and shown once caught up: {}",
        r.body
    );
}

/// Assigning a role again replaces the assignment (a nearer expiry, say): with `user_roles`
/// stopped, the old, open-ended assignment it shows is not what the log says.
#[tokio::test]
async fn a_role_assigned_again_while_user_roles_is_stopped_is_503_until_shown() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Stalled Expiries").await;
    let perms = ["users:read"];
    let role = create_role(&t, org, "boxed", &perms).await;
    let (user, key) =
        user_with_role_and_key(&t, org, "c@stalled-expiries.example", role, &perms).await;
    assert_eq!(t.get(&org_path(org, "/users"), &key).await.status, 200);
    t.stop_projection("user_roles").await;
    let r = t
        .put(
            &org_path(org, &format!("/users/{user}/roles/{role}")),
            &t.admin_key,
            json!({"expires_at": in_seconds(3600)}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_error(&t.get(&org_path(org, "/users"), &key).await, 503);
    t.resume_projection("user_roles").await;
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            t.get(&org_path(org, "/users"), &key).await.status == 200
        })
        .await
    );
}

#[tokio::test]
async fn a_roles_parent_permissions_are_granted_through_it() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Inheritors").await;
    let member = t.role_id(org, "member").await;
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "member plus", "permissions": ["keys:read"], "parent_role_id": member}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let child: Uuid = r.body["id"].as_str().unwrap().parse().unwrap();
    let (_, key) = user_with_role_and_key(
        &t,
        org,
        "heir@inheritors.example",
        child,
        &["users:read", "keys:read", "roles:read"],
    )
    .await;
    assert_eq!(
        permissions_of(&t.get("/v1/me", &key).await),
        vec!["users:read", "roles:read", "keys:read"]
    );
    assert_eq!(
        t.get(&org_path(org, "/roles"), &key).await.status,
        200,
        "roles:read comes from the parent"
    );
}

// ---------------------------------------------------------------------------------------------
// 403: a valid key without the permission
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn member_key_cannot_invite_read_keys_audit_or_ledger() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Members Only").await;
    let (_, key) = t
        .member_with_key(org, "member", "member@members.example")
        .await;
    assert_eq!(
        t.get(&org_path(org, "/users"), &key).await.status,
        200,
        "members read the directory"
    );
    assert_eq!(t.get(&org_path(org, "/roles"), &key).await.status, 200);
    let before = t.head().await;
    let r = t
        .post(
            &org_path(org, "/users"),
            &key,
            json!({"email": "new@members.example", "full_name": "New Person"}),
        )
        .await;
    assert_error(&r, 403);
    assert_error(&t.get(&org_path(org, "/api-keys"), &key).await, 403);
    assert_error(&t.get(&org_path(org, "/audit-events"), &key).await, 403);
    assert_error(&t.get(&org_path(org, "/ledger/events"), &key).await, 403);
    assert_error(&t.get("/v1/ledger/head", &key).await, 403);
    assert_eq!(t.head().await, before);
}

#[tokio::test]
async fn auditor_key_reads_audit_and_ledger_but_issues_no_command() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Audited").await;
    let (auditor, key) = t
        .member_with_key(org, "auditor", "auditor@audited.example")
        .await;
    let other = t.invite(org, "other@audited.example", "Other Person").await;
    let custom = create_role(&t, org, "readers", &["users:read"]).await;
    let member = t.role_id(org, "member").await;
    let own_key = key_id(&t, &key).await;

    for path in [
        org_path(org, "/audit-events"),
        org_path(org, "/ledger/events"),
        "/v1/ledger/head".into(),
        org_path(org, "/users"),
        org_path(org, "/api-keys"),
    ] {
        let r = t.get(&path, &key).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }

    let before = t.head().await;
    let commands: Vec<(Method, String, Value)> = vec![
        (
            Method::POST,
            "/v1/organizations".into(),
            json!({"name": "Mine", "slug": "mine"}),
        ),
        (Method::PATCH, org_path(org, ""), json!({"name": "Renamed"})),
        (Method::POST, org_path(org, "/suspend"), json!({})),
        (Method::POST, org_path(org, "/reactivate"), json!({})),
        (
            Method::POST,
            org_path(org, "/users"),
            json!({"email": "new@audited.example", "full_name": "New"}),
        ),
        (
            Method::PATCH,
            org_path(org, &format!("/users/{other}")),
            json!({"full_name": "Changed"}),
        ),
        (
            Method::POST,
            org_path(org, &format!("/users/{other}/deactivate")),
            json!({}),
        ),
        (
            Method::POST,
            org_path(org, &format!("/users/{other}/reactivate")),
            json!({}),
        ),
        (
            Method::POST,
            org_path(org, &format!("/users/{other}/erase")),
            json!({}),
        ),
        (
            Method::PUT,
            org_path(org, &format!("/users/{other}/roles/{member}")),
            json!({}),
        ),
        (
            Method::DELETE,
            org_path(
                org,
                &format!("/users/{auditor}/roles/{}", t.role_id(org, "auditor").await),
            ),
            Value::Null,
        ),
        (
            Method::POST,
            org_path(org, "/roles"),
            json!({"name": "new role", "permissions": ["users:read"]}),
        ),
        (
            Method::PATCH,
            org_path(org, &format!("/roles/{custom}")),
            json!({"description": "changed"}),
        ),
        (
            Method::DELETE,
            org_path(org, &format!("/roles/{custom}")),
            Value::Null,
        ),
        (
            Method::POST,
            org_path(org, "/api-keys"),
            json!({"label": "mine", "permissions": ["users:read"]}),
        ),
        (
            Method::POST,
            org_path(org, &format!("/api-keys/{own_key}/rotate")),
            json!({}),
        ),
        (
            Method::POST,
            org_path(org, &format!("/api-keys/{own_key}/revoke")),
            json!({}),
        ),
    ];
    for (method, path, body) in commands {
        let body = (!body.is_null()).then_some(body);
        let r = t.call(method.clone(), &path, Some(&key), body).await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        assert_error(&r, 403);
    }
    assert_eq!(
        t.head().await,
        before,
        "no command of the auditor changed anything"
    );
    assert_eq!(
        t.get("/v1/me", &key).await.status,
        200,
        "the auditor's key still works"
    );
}

#[tokio::test]
async fn admin_key_cannot_erase_users() {
    let t = TestApp::spawn().await;
    let org = t.create_org("No Erasers").await;
    let (_, admin) = t
        .member_with_key(org, "admin", "admin@noerasers.example")
        .await;
    let user = t.invite(org, "victim@noerasers.example", "Victim").await;
    let before = t.head().await;
    assert_error(
        &t.post(
            &org_path(org, &format!("/users/{user}/erase")),
            &admin,
            json!({}),
        )
        .await,
        403,
    );
    assert_eq!(t.head().await, before);
    let r = t
        .get(&org_path(org, &format!("/users/{user}")), &admin)
        .await;
    assert_eq!(r.body["email"], "victim@noerasers.example");
}

#[tokio::test]
async fn only_the_platform_operator_creates_organizations() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Tenant").await;
    let (_, owner) = t
        .member_with_key(org, "owner", "owner@tenant.example")
        .await;
    let before = t.head().await;
    let r = t
        .post(
            "/v1/organizations",
            &owner,
            json!({"name": "Owner's Own", "slug": "owners-own"}),
        )
        .await;
    assert_error(&r, 403);
    assert_eq!(t.head().await, before);
    let r = t
        .post(
            "/v1/organizations",
            &t.admin_key,
            json!({"name": "Owner's Own", "slug": "owners-own"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test]
async fn only_the_platform_operator_suspends_even_its_own_organization() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Self Suspenders").await;
    let (_, owner) = t
        .member_with_key(org, "owner", "owner@selfsuspenders.example")
        .await;
    let before = t.head().await;
    assert_error(
        &t.post(&org_path(org, "/suspend"), &owner, json!({})).await,
        403,
    );
    assert_eq!(t.head().await, before);
}

#[tokio::test]
async fn org_key_lists_only_its_own_organization() {
    let t = TestApp::spawn().await;
    let a = t.create_org("Listed A").await;
    let b = t.create_org("Listed B").await;
    let (_, key) = t.member_with_key(a, "member", "member@a.example").await;
    let r = t.get("/v1/organizations", &key).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ids: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![a.to_string()]);
    let r = t.get("/v1/organizations", &t.admin_key).await;
    let ids: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&a.to_string().as_str()) && ids.contains(&b.to_string().as_str()),
        "{}",
        r.body
    );
}

// ---------------------------------------------------------------------------------------------
// 404 across tenants
// ---------------------------------------------------------------------------------------------

/// Two organizations, each with an owner (key), a member and a custom role.
struct TwoTenants {
    a: Uuid,
    a_owner_key: String,
    a_member: Uuid,
    b: Uuid,
    b_member: Uuid,
    b_role: Uuid,
    b_key: Uuid,
}

async fn two_tenants(t: &TestApp) -> TwoTenants {
    let a = t.create_org("Tenant A").await;
    let b = t.create_org("Tenant B").await;
    let (_, a_owner_key) = t.member_with_key(a, "owner", "owner@a.example").await;
    let a_member = t.invite(a, "member@a.example", "A Member").await;
    let (b_member, b_secret) = t.member_with_key(b, "member", "member@b.example").await;
    let b_role = create_role(t, b, "b readers", &["users:read"]).await;
    let b_key = key_id(t, &b_secret).await;
    TwoTenants {
        a,
        a_owner_key,
        a_member,
        b,
        b_member,
        b_role,
        b_key,
    }
}

#[tokio::test]
async fn cross_tenant_reads_are_404() {
    let t = TestApp::spawn().await;
    let x = two_tenants(&t).await;
    let (b, user, role, key) = (x.b, x.b_member, x.b_role, x.b_key);
    let paths = [
        org_path(b, ""),
        org_path(b, "/users"),
        org_path(b, &format!("/users/{user}")),
        org_path(b, &format!("/users/{user}/roles")),
        org_path(b, "/roles"),
        org_path(b, &format!("/roles/{role}")),
        org_path(b, "/api-keys"),
        org_path(b, &format!("/api-keys/{key}")),
        org_path(b, "/audit-events"),
        org_path(b, "/ledger/events"),
        // B's resources named under A's own organization are not A's either.
        org_path(x.a, &format!("/users/{user}")),
        org_path(x.a, &format!("/users/{user}/roles")),
        org_path(x.a, &format!("/roles/{role}")),
        org_path(x.a, &format!("/api-keys/{key}")),
    ];
    for path in paths {
        let r = t.get(&path, &x.a_owner_key).await;
        assert_eq!(r.status, 404, "GET {path}: {}", r.body);
        assert_error(&r, 404);
    }
}

#[tokio::test]
async fn cross_tenant_commands_are_404_and_change_nothing() {
    let t = TestApp::spawn().await;
    let x = two_tenants(&t).await;
    let (a, b, user, role, key) = (x.a, x.b, x.b_member, x.b_role, x.b_key);
    let b_member_role = t.role_id(b, "member").await;
    let before = t.head().await;
    let commands: Vec<(Method, String, Value)> = vec![
        (
            Method::PATCH,
            org_path(b, ""),
            json!({"name": "Taken Over"}),
        ),
        (
            Method::POST,
            org_path(b, "/users"),
            json!({"email": "spy@a.example", "full_name": "Spy"}),
        ),
        (
            Method::PATCH,
            org_path(b, &format!("/users/{user}")),
            json!({"full_name": "Renamed"}),
        ),
        (
            Method::POST,
            org_path(b, &format!("/users/{user}/deactivate")),
            json!({}),
        ),
        (
            Method::POST,
            org_path(b, &format!("/users/{user}/reactivate")),
            json!({}),
        ),
        (
            Method::POST,
            org_path(b, &format!("/users/{user}/erase")),
            json!({}),
        ),
        (
            Method::PUT,
            org_path(b, &format!("/users/{user}/roles/{role}")),
            json!({}),
        ),
        (
            Method::DELETE,
            org_path(b, &format!("/users/{user}/roles/{b_member_role}")),
            Value::Null,
        ),
        (
            Method::POST,
            org_path(b, "/roles"),
            json!({"name": "spies", "permissions": ["users:read"]}),
        ),
        (
            Method::PATCH,
            org_path(b, &format!("/roles/{role}")),
            json!({"description": "mine now"}),
        ),
        (
            Method::DELETE,
            org_path(b, &format!("/roles/{role}")),
            Value::Null,
        ),
        (
            Method::POST,
            org_path(b, "/api-keys"),
            json!({"label": "spy", "permissions": ["users:read"]}),
        ),
        (
            Method::POST,
            org_path(b, &format!("/api-keys/{key}/revoke")),
            json!({}),
        ),
        (
            Method::POST,
            org_path(b, &format!("/api-keys/{key}/rotate")),
            json!({}),
        ),
        // B's resources named under A's own organization.
        (
            Method::PATCH,
            org_path(a, &format!("/users/{user}")),
            json!({"full_name": "Renamed"}),
        ),
        (
            Method::POST,
            org_path(a, &format!("/users/{user}/deactivate")),
            json!({}),
        ),
        (
            Method::POST,
            org_path(a, &format!("/users/{user}/erase")),
            json!({}),
        ),
        (
            Method::PUT,
            org_path(a, &format!("/users/{user}/roles/{role}")),
            json!({}),
        ),
        (
            Method::PUT,
            org_path(a, &format!("/users/{}/roles/{role}", x.a_member)),
            json!({}),
        ),
        (
            Method::DELETE,
            org_path(a, &format!("/users/{}/roles/{role}", x.a_member)),
            Value::Null,
        ),
        (
            Method::PATCH,
            org_path(a, &format!("/roles/{role}")),
            json!({"description": "mine now"}),
        ),
        (
            Method::DELETE,
            org_path(a, &format!("/roles/{role}")),
            Value::Null,
        ),
        (
            Method::POST,
            org_path(a, &format!("/api-keys/{key}/revoke")),
            json!({}),
        ),
        (
            Method::POST,
            org_path(a, &format!("/api-keys/{key}/rotate")),
            json!({}),
        ),
    ];
    for (method, path, body) in commands {
        let body = (!body.is_null()).then_some(body);
        let r = t
            .call(method.clone(), &path, Some(&x.a_owner_key), body)
            .await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
        assert_error(&r, 404);
    }
    assert_eq!(t.head().await, before);
}

#[tokio::test]
async fn organization_keys_cannot_reach_the_platform_key() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Platform Probers").await;
    let (_, owner) = t
        .member_with_key(org, "owner", "owner@probers.example")
        .await;
    let platform_key = key_id(&t, &t.admin_key).await;
    let before = t.head().await;
    assert_error(
        &t.get(&org_path(org, &format!("/api-keys/{platform_key}")), &owner)
            .await,
        404,
    );
    for action in ["revoke", "rotate"] {
        let r = t
            .post(
                &org_path(org, &format!("/api-keys/{platform_key}/{action}")),
                &owner,
                json!({}),
            )
            .await;
        assert_error(&r, 404);
    }
    assert_eq!(t.head().await, before);
    assert_eq!(t.get("/v1/me", &t.admin_key).await.status, 200);
}

#[tokio::test]
async fn cross_tenant_suspend_and_reactivate_are_404() {
    let t = TestApp::spawn().await;
    let x = two_tenants(&t).await;
    let before = t.head().await;
    for action in ["/suspend", "/reactivate"] {
        let r = t
            .post(&org_path(x.b, action), &x.a_owner_key, json!({}))
            .await;
        assert_error(&r, 404);
    }
    assert_eq!(t.head().await, before);
}

#[tokio::test]
async fn cross_tenant_404_is_indistinguishable_from_a_missing_organization() {
    let t = TestApp::spawn().await;
    let x = two_tenants(&t).await;
    let real = t.get(&org_path(x.b, "/users"), &x.a_owner_key).await;
    let missing = t
        .get(&org_path(Uuid::new_v4(), "/users"), &x.a_owner_key)
        .await;
    assert_error(&real, 404);
    assert_eq!(real.body, missing.body);
}

// ---------------------------------------------------------------------------------------------
// No privilege escalation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn key_issuance_beyond_the_issuers_permissions_is_403() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Key Managers").await;
    let role = create_role(
        &t,
        org,
        "key manager",
        &["keys:write", "keys:read", "users:read"],
    )
    .await;
    let (km, key) = user_with_role_and_key(
        &t,
        org,
        "km@keymanagers.example",
        role,
        &["keys:write", "keys:read", "users:read"],
    )
    .await;

    let before = t.head().await;
    for wanted in [
        json!(["roles:write"]),
        json!(["users:read", "roles:write"]),
        json!(["users:erase"]),
    ] {
        let r = issue_key(
            &t,
            org,
            &key,
            json!({"label": "escalated", "permissions": wanted, "user_id": km}),
        )
        .await;
        assert_error_says(&r, 403, "you cannot grant permissions you do not hold");
    }
    assert_eq!(t.head().await, before);
    // The control: a subset of its own is fine.
    let r = issue_key(
        &t,
        org,
        &key,
        json!({"label": "reader", "permissions": ["users:read"], "user_id": km}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

/// A user key acts for its user: a key it issues or rotates is that user's own. A key of
/// another user would act (and be audited) as them, and assign this user's roles; a service
/// key would outlive this user's roles and deactivation, and see every conversation.
#[tokio::test]
async fn a_user_key_issues_and_rotates_only_its_own_users_keys() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Scoped Keys").await;
    let (admin, admin_key) = t
        .member_with_key(org, "admin", "admin@scoped.example")
        .await;
    let (owner, _) = t
        .member_with_key(org, "owner", "owner@scoped.example")
        .await;
    let before = t.head().await;
    for body in [
        json!({"label": "bot", "permissions": ["users:read"]}),
        json!({"label": "bot", "permissions": ["conversations:read"]}),
        json!({"label": "as owner", "permissions": ["users:read"], "user_id": owner}),
        json!({"label": "as owner", "permissions": ["roles:write"], "user_id": owner}),
    ] {
        let r = issue_key(&t, org, &admin_key, body.clone()).await;
        assert_error_says(&r, 403, "a user key may issue only keys of its own user");
    }
    assert_eq!(t.head().await, before);
    // The controls: its own user's key, and the platform operator's service key and key of
    // another user.
    let mut issued = Vec::new();
    for (issuer, body) in [
        (
            &admin_key,
            json!({"label": "mine", "permissions": ["conversations:read"], "user_id": admin}),
        ),
        (
            &t.admin_key,
            json!({"label": "bot", "permissions": ["users:read"]}),
        ),
        (
            &t.admin_key,
            json!({"label": "theirs", "permissions": ["users:read"], "user_id": owner}),
        ),
    ] {
        let r = issue_key(&t, org, issuer, body).await;
        assert_eq!(r.status, 201, "{}", r.body);
        issued.push(r.body["id"].as_str().unwrap().to_string());
    }

    // Rotating is holding: a fresh secret of the service key, or of another user's key, is
    // as good as a new one. Its own user's key it may rotate.
    let rotate = |id: &str| org_path(org, &format!("/api-keys/{id}/rotate"));
    let before = t.head().await;
    for id in [&issued[1], &issued[2]] {
        let r = t.post(&rotate(id), &admin_key, json!({})).await;
        assert_error_says(&r, 403, "a user key may rotate only keys of its own user");
    }
    assert_eq!(t.head().await, before);
    let r = t.post(&rotate(&issued[0]), &admin_key, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Revoking takes away what the key holds: only a key that holds it all may (a user's own
/// keys are theirs to revoke), so an admin cannot lock the owner out key by key.
#[tokio::test]
async fn revoking_a_key_that_holds_more_than_the_revoker_is_403() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Revokers").await;
    let (_, admin_key) = t
        .member_with_key(org, "admin", "admin@revokers.example")
        .await;
    let (owner, owner_key) = t
        .member_with_key(org, "owner", "owner@revokers.example")
        .await;
    let owners = key_id(&t, &owner_key).await;
    let (_, keys_only) = issued(
        &t,
        org,
        json!({"label": "key desk", "permissions": ["keys:write", "keys:read"]}),
    )
    .await;
    let revoke = |id: Uuid| org_path(org, &format!("/api-keys/{id}/revoke"));
    let before = t.head().await;
    for revoker in [&admin_key, &keys_only] {
        let r = t.post(&revoke(owners), revoker, json!({})).await;
        assert_error_says(
            &r,
            403,
            "cannot revoke a key that holds permissions this key does not",
        );
    }
    assert_eq!(t.head().await, before);
    assert_eq!(t.get("/v1/me", &owner_key).await.status, 200);
    // A user's own keys are theirs to revoke: a key of the owner's listing only `keys:write`
    // revokes the owner's full key (a leak cut by its holder), though not the admin's.
    let (_, narrow) = issued(
        &t,
        org,
        json!({"label": "owner's key desk", "permissions": ["keys:write"], "user_id": owner}),
    )
    .await;
    let admins = key_id(&t, &admin_key).await;
    let r = t.post(&revoke(admins), &narrow, json!({})).await;
    assert_error_says(
        &r,
        403,
        "cannot revoke a key that holds permissions this key does not",
    );
    let r = t.post(&revoke(owners), &narrow, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_error(&t.get("/v1/me", &owner_key).await, 401);
    // The control: a key holding all another lists revokes it.
    let (_, owner_key) = t
        .member_with_key(org, "owner", "owner2@revokers.example")
        .await;
    let r = t.post(&revoke(admins), &owner_key, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A key for a user acts as them: its commands are recorded as theirs, and it revokes their
/// keys as their own. So only a key holding everything a user's roles grant (inheritance
/// included) issues or rotates one of theirs: else a service key with an admin's permissions,
/// refused the owner's key itself, would mint an owner's key listing `keys:write` and revoke
/// the owner's key with it, in the owner's name.
#[tokio::test]
async fn only_a_key_holding_all_a_users_roles_grant_issues_or_rotates_their_keys() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Provisioners").await;
    let (olga, olga_key) = t
        .member_with_key(org, "owner", "olga@provisioners.example")
        .await;
    let olgas = key_id(&t, &olga_key).await;
    let (_, svc) = issued(
        &t,
        org,
        json!({"label": "admin desk", "permissions": role_permissions("admin")}),
    )
    .await;
    let (_, narrow) = issued(
        &t,
        org,
        json!({"label": "olga's key desk", "permissions": ["keys:write"], "user_id": olga}),
    )
    .await;
    let narrows = key_id(&t, &narrow).await;
    // Olga's deputy holds nothing but what the owner role gives the role she holds.
    let owner_role = t.role_id(org, "owner").await;
    let deputy_role = t.create_role(org, "deputy", &[], Some(owner_role)).await;
    let deputy = t.invite(org, "dora@provisioners.example", "Dora").await;
    t.assign(org, deputy, deputy_role).await;
    let revoke = |id: Uuid| org_path(org, &format!("/api-keys/{id}/revoke"));
    let rotate = |id: Uuid| org_path(org, &format!("/api-keys/{id}/rotate"));
    let r = t.post(&revoke(olgas), &svc, json!({})).await;
    assert_error_says(
        &r,
        403,
        "cannot revoke a key that holds permissions this key does not",
    );

    let before = t.head().await;
    for user in [olga, deputy] {
        let r = issue_key(
            &t,
            org,
            &svc,
            json!({"label": "as olga", "permissions": ["keys:write", "keys:read"], "user_id": user}),
        )
        .await;
        assert_error_says(
            &r,
            403,
            &format!(
                "cannot issue a key for user {user}: their roles grant permissions this key \
                 does not hold: organizations:write, users:erase, ledger:read"
            ),
        );
    }
    // Rotating hands over a fresh secret: of Olga's key that lists only what the admin holds,
    // it would be a key acting as Olga all the same.
    let r = t.post(&rotate(narrows), &svc, json!({})).await;
    assert_error_says(&r, 403, &format!("cannot rotate a key for user {olga}"));
    assert_eq!(t.head().await, before, "a refusal appends nothing");
    for key in [&olga_key, &narrow] {
        assert_eq!(t.get("/v1/me", key).await.status, 200, "Olga's keys work");
    }

    // The controls: the admin's key provisions and rotates a member's keys; a service key
    // with the owner's permissions, and the platform operator's, provision Olga's.
    let mia = t.invite(org, "mia@provisioners.example", "Mia").await;
    t.assign(org, mia, t.role_id(org, "member").await).await;
    let r = issue_key(
        &t,
        org,
        &svc,
        json!({"label": "mia chat", "permissions": role_permissions("member"), "user_id": mia}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let mias = r.body["id"].as_str().unwrap().parse().unwrap();
    let r = t.post(&rotate(mias), &svc, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, owner_desk) = issued(
        &t,
        org,
        json!({"label": "owner desk", "permissions": role_permissions("owner")}),
    )
    .await;
    for issuer in [&owner_desk, &t.admin_key] {
        let r = issue_key(
            &t,
            org,
            issuer,
            json!({"label": "olga's", "permissions": ["keys:write", "keys:read"], "user_id": olga}),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    // Olga's own key, however narrow, makes her keys: it acts as her already.
    let r = issue_key(
        &t,
        org,
        &narrow,
        json!({"label": "olga's spare", "permissions": ["keys:write"], "user_id": olga}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let spare = r.body["id"].as_str().unwrap().parse().unwrap();
    let r = t.post(&rotate(spare), &narrow, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t.post(&rotate(narrows), &owner_desk, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// As a user key never assigns its own user's roles, it never changes what a role its user
/// holds grants (its permissions, its parent), directly or through inheritance: else a role
/// given until a date could be copied into one held for good.
#[tokio::test]
async fn a_user_key_cannot_change_what_its_own_users_roles_grant() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Temporary Admins").await;
    let root = create_role(&t, org, "root", &["organizations:read"]).await;
    let base = create_role(&t, org, "base", &["organizations:read"]).await;
    let other = create_role(&t, org, "other", &["organizations:read"]).await;
    let role_path = |r: Uuid| org_path(org, &format!("/roles/{r}"));
    let r = t
        .patch(
            &role_path(base),
            &t.admin_key,
            json!({"parent_role_id": root}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let bob = t.invite(org, "bob@temporary.example", "Bob").await;
    t.assign(org, bob, base).await;
    let admin = t.role_id(org, "admin").await;
    let until = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let r = t
        .put(
            &org_path(org, &format!("/users/{bob}/roles/{admin}")),
            &t.admin_key,
            json!({"expires_at": until, "reason": "on call"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, key) = issued(
        &t,
        org,
        json!({"label": "bob", "permissions": role_permissions("admin"), "user_id": bob}),
    )
    .await;

    let before = t.head().await;
    let widened = json!({"permissions": ["organizations:read", "users:read", "roles:write"]});
    for (role, body) in [
        (base, widened.clone()),
        (base, json!({"parent_role_id": admin})),
        (root, widened.clone()),
        (admin, json!({"permissions": role_permissions("admin")})),
    ] {
        let r = t.patch(&role_path(role), &key, body).await;
        assert_error_says(
            &r,
            403,
            "cannot change the permissions or parent of a role its own user",
        );
    }
    assert_eq!(t.head().await, before);
    // The controls: a role bob does not hold, and base's name.
    let r = t.patch(&role_path(other), &key, widened).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t
        .patch(&role_path(base), &key, json!({"name": "baseline"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A key that expires issues or rotates no key, and assigns no role, that outlives it.
#[tokio::test]
async fn a_key_that_expires_makes_no_key_or_assignment_that_outlives_it() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Short Keys").await;
    let (bob, _) = t.member_with_key(org, "admin", "bob@short.example").await;
    let (lasting, _) = issued(
        &t,
        org,
        json!({"label": "laptop", "permissions": ["users:read"], "user_id": bob}),
    )
    .await;
    // Whole seconds, as the database keeps them to the microsecond.
    let hour =
        chrono::SubsecRound::trunc_subsecs(chrono::Utc::now() + chrono::Duration::hours(1), 0);
    let (_, short) = issued(
        &t,
        org,
        json!({"label": "short", "permissions": ["keys:write", "users:read", "roles:write",
               "organizations:read", "roles:read", "conversations:read", "conversations:write"],
               "user_id": bob,
               "expires_at": hour.to_rfc3339()}),
    )
    .await;
    let before = t.head().await;
    for expiry in [None, Some(hour + chrono::Duration::minutes(1))] {
        let mut body = json!({"label": "forever", "permissions": ["users:read"], "user_id": bob});
        if let Some(e) = expiry {
            body["expires_at"] = json!(e.to_rfc3339());
        }
        let r = issue_key(&t, org, &short, body).await;
        assert_error_says(&r, 403, "a key it may issue must expire by then");
    }
    let r = t
        .post(
            &org_path(org, &format!("/api-keys/{lasting}/rotate")),
            &short,
            json!({}),
        )
        .await;
    assert_error_says(&r, 403, "a key it may rotate must expire by then");
    let mia = t.invite(org, "mia@short.example", "Mia").await;
    let assign = org_path(
        org,
        &format!("/users/{mia}/roles/{}", t.role_id(org, "member").await),
    );
    for body in [
        json!({}),
        json!({"expires_at": (hour + chrono::Duration::minutes(1)).to_rfc3339()}),
    ] {
        let r = t.put(&assign, &short, body).await;
        assert_error_says(&r, 403, "a role it assigns must expire by then");
    }
    assert_eq!(t.head().await, before + 1, "only Mia's invitation");
    let r = t
        .put(&assign, &short, json!({"expires_at": hour.to_rfc3339()}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The control: a key expiring with it.
    let r = issue_key(
        &t,
        org,
        &short,
        json!({"label": "brief", "permissions": ["users:read"], "user_id": bob,
               "expires_at": hour.to_rfc3339()}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test]
async fn admin_key_cannot_issue_a_key_with_owner_only_permissions() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Admins Issuing").await;
    let (_, admin) = t
        .member_with_key(org, "admin", "admin@issuing.example")
        .await;
    let before = t.head().await;
    let r = issue_key(
        &t,
        org,
        &admin,
        json!({"label": "eraser", "permissions": ["users:erase"]}),
    )
    .await;
    assert_error(&r, 403);
    let r = issue_key(
        &t,
        org,
        &admin,
        json!({"label": "owner", "permissions": role_permissions("owner")}),
    )
    .await;
    assert_error(&r, 403);
    assert_eq!(t.head().await, before);
}

#[tokio::test]
async fn admin_key_cannot_rotate_a_key_holding_more_than_it_does() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Admins Rotating").await;
    let (_, admin) = t
        .member_with_key(org, "admin", "admin@rotating.example")
        .await;
    let (_, owner) = t
        .member_with_key(org, "owner", "owner@rotating.example")
        .await;
    let owner_key = key_id(&t, &owner).await;
    let before = t.head().await;
    let r = t
        .post(
            &org_path(org, &format!("/api-keys/{owner_key}/rotate")),
            &admin,
            json!({}),
        )
        .await;
    assert_error(&r, 403);
    assert_eq!(t.head().await, before);
    assert_eq!(
        t.get("/v1/me", &owner).await.status,
        200,
        "the owner's secret still works"
    );
}

#[tokio::test]
async fn admin_key_cannot_create_a_role_granting_more_than_it_holds() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Role Makers").await;
    let (_, admin) = t
        .member_with_key(org, "admin", "admin@rolemakers.example")
        .await;
    let owner_role = t.role_id(org, "owner").await;
    let before = t.head().await;
    let r = t
        .post(
            &org_path(org, "/roles"),
            &admin,
            json!({"name": "erasers", "permissions": ["users:erase"]}),
        )
        .await;
    assert_error(&r, 403);
    // Inheriting from a role that holds more is the same escalation.
    let r = t
        .post(
            &org_path(org, "/roles"),
            &admin,
            json!({"name": "heirs", "permissions": [], "parent_role_id": owner_role}),
        )
        .await;
    assert_error(&r, 403);
    assert_eq!(t.head().await, before);
    let r = t
        .post(
            &org_path(org, "/roles"),
            &admin,
            json!({"name": "readers", "permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "the control: {}", r.body);
}

#[tokio::test]
async fn admin_key_cannot_widen_a_role_beyond_what_it_holds() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Role Wideners").await;
    let (_, admin) = t
        .member_with_key(org, "admin", "admin@rolewideners.example")
        .await;
    let readers = create_role(&t, org, "readers", &["users:read"]).await;
    let admin_role = t.role_id(org, "admin").await;
    let owner_role = t.role_id(org, "owner").await;
    let before = t.head().await;
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{readers}")),
            &admin,
            json!({"permissions": ["users:read", "users:erase"]}),
        )
        .await;
    assert_error(&r, 403);
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{readers}")),
            &admin,
            json!({"parent_role_id": owner_role}),
        )
        .await;
    assert_error(&r, 403);
    let mut more = role_permissions("admin");
    more.push("ledger:read".into());
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{admin_role}")),
            &admin,
            json!({"permissions": more}),
        )
        .await;
    assert_error(&r, 403);
    assert_eq!(t.head().await, before);
}

#[tokio::test]
async fn admin_key_cannot_assign_the_owner_role() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Role Assigners").await;
    let (admin_user, admin) = t
        .member_with_key(org, "admin", "admin@assigners.example")
        .await;
    let other = t
        .invite(org, "other@assigners.example", "Other Person")
        .await;
    let owner_role = t.role_id(org, "owner").await;
    let before = t.head().await;
    for user in [other, admin_user] {
        let r = t
            .put(
                &org_path(org, &format!("/users/{user}/roles/{owner_role}")),
                &admin,
                json!({}),
            )
            .await;
        assert_error(&r, 403);
    }
    assert_eq!(t.head().await, before);
    let member_role = t.role_id(org, "member").await;
    let r = t
        .put(
            &org_path(org, &format!("/users/{other}/roles/{member_role}")),
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "the control: {}", r.body);
}

/// What a user key may do with roles goes no further than what it could grant: not its own
/// roles (assigning again would lift an expiry another administrator set), not taking away a
/// role it could not give, and not granting a role whose change the read models do not show
/// yet.
#[tokio::test]
async fn role_changes_by_a_user_key_go_no_further_than_it_could_grant() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Bounded Admins").await;
    let (admin_user, admin) = t
        .member_with_key(org, "admin", "admin@bounded.example")
        .await;
    let (owner_user, _) = t
        .member_with_key(org, "owner", "owner@bounded.example")
        .await;
    let other = t.invite(org, "other@bounded.example", "Other Person").await;
    let assignment = |user: Uuid, role: Uuid| org_path(org, &format!("/users/{user}/roles/{role}"));
    let (member, owner) = (
        t.role_id(org, "member").await,
        t.role_id(org, "owner").await,
    );
    let before = t.head().await;
    let r = t
        .put(&assignment(admin_user, member), &admin, json!({}))
        .await;
    assert_error(&r, 403);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("its own user"));
    let r = t.delete(&assignment(owner_user, owner), &admin).await;
    assert_error(&r, 403);
    assert_eq!(t.head().await, before, "refused, nothing appended");
    // The controls: another user's role the admin may give, given and taken away.
    let r = t.put(&assignment(other, member), &admin, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t.delete(&assignment(other, member), &admin).await;
    assert_eq!(r.status, 204, "{}", r.body);

    // A role widened while `roles` is stopped: its tables still show the narrower role.
    let support = create_role(&t, org, "support", &["users:read"]).await;
    t.stop_projection("roles").await;
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{support}")),
            &t.admin_key,
            json!({"permissions": ["users:read", "users:erase"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let path = assignment(other, support);
    let r = unsure_until_shown(&t, "roles", || t.put(&path, &admin, json!({}))).await;
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("the role is being changed"), "{message}");
}

/// `request` answers 503 while `projection` (stopped) does not show what the log holds; once
/// resumed and shown, 403; and it appends nothing either way. Returns the 503.
async fn unsure_until_shown<F, Fut>(t: &TestApp, projection: &str, request: F) -> Response
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let before = t.head().await;
    let unsure = request().await;
    assert_error(&unsure, 503);
    assert_eq!(t.head().await, before);
    t.resume_projection(projection).await;
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            request().await.status == 403
        })
        .await,
        "{projection} shown: refused"
    );
    assert_eq!(t.head().await, before);
    unsure
}

/// Taking power away needs holding it: an admin cannot deactivate the owner, narrow the
/// owner role, or delete a role that grants what the admin does not hold.
#[tokio::test]
async fn an_admin_cannot_take_away_what_it_could_not_give() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Kept Owners").await;
    let (_, admin) = t.member_with_key(org, "admin", "admin@kept.example").await;
    let (owner_user, _) = t.member_with_key(org, "owner", "owner@kept.example").await;
    let (member_user, _) = t
        .member_with_key(org, "member", "member@kept.example")
        .await;
    let owner = t.role_id(org, "owner").await;
    let eraser = create_role(&t, org, "eraser", &["users:erase"]).await;
    let readers = create_role(&t, org, "readers", &["users:read"]).await;
    let before = t.head().await;
    let deactivate = |user: Uuid| org_path(org, &format!("/users/{user}/deactivate"));
    assert_error(
        &t.post(&deactivate(owner_user), &admin, json!({})).await,
        403,
    );
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{owner}")),
            &admin,
            json!({"permissions": ["users:read"]}),
        )
        .await;
    assert_error(&r, 403);
    assert_error(
        &t.delete(&org_path(org, &format!("/roles/{eraser}")), &admin)
            .await,
        403,
    );
    assert_eq!(t.head().await, before, "refused, nothing appended");
    // A role inheriting the owner's: cutting it loose takes the owner's permissions away.
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "deputy", "permissions": [], "parent_role_id": owner}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let deputy = r.body["id"].as_str().unwrap().to_string();
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{deputy}")),
            &admin,
            json!({"parent_role_id": null}),
        )
        .await;
    assert_error(&r, 403);
    // Nor bring back an owner another deactivated (while a second owner keeps the
    // organization owned).
    t.member_with_key(org, "owner", "second@kept.example").await;
    let reactivate = |user: Uuid| org_path(org, &format!("/users/{user}/reactivate"));
    let r = t
        .post(&deactivate(owner_user), &t.admin_key, json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let before = t.head().await;
    assert_error(
        &t.post(&reactivate(owner_user), &admin, json!({})).await,
        403,
    );
    assert_eq!(t.head().await, before, "refused, nothing appended");
    // The controls.
    let r = t.post(&deactivate(member_user), &admin, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t.post(&reactivate(member_user), &admin, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t
        .delete(&org_path(org, &format!("/roles/{readers}")), &admin)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
}

/// What a user's roles grant is weighed with the log's pending assignments in view: a user
/// just made owner, while `user_roles` does not show it yet, is not the admin's to deactivate.
#[tokio::test]
async fn a_deactivation_weighs_the_roles_the_read_models_do_not_show_yet() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Fresh Owners").await;
    let (_, admin) = t.member_with_key(org, "admin", "admin@fresh.example").await;
    let (member_user, _) = t
        .member_with_key(org, "member", "member@fresh.example")
        .await;
    let owner = t.role_id(org, "owner").await;
    t.stop_projection("user_roles").await;
    let r = t
        .put(
            &org_path(org, &format!("/users/{member_user}/roles/{owner}")),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let deactivate = org_path(org, &format!("/users/{member_user}/deactivate"));
    unsure_until_shown(&t, "user_roles", || t.post(&deactivate, &admin, json!({}))).await;
}

/// Erasing takes away more than deactivating: a key that may erase, but holds less than the
/// owner, cannot erase the owner.
#[tokio::test]
async fn a_key_that_may_erase_cannot_erase_someone_holding_more() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Careful Erasers").await;
    let gdpr = create_role(&t, org, "gdpr", &["users:read", "users:erase"]).await;
    let (_, eraser) = user_with_role_and_key(
        &t,
        org,
        "eraser@careful.example",
        gdpr,
        &["users:read", "users:erase"],
    )
    .await;
    let (owner_user, _) = t
        .member_with_key(org, "owner", "owner@careful.example")
        .await;
    let (member_user, _) = t
        .member_with_key(org, "member", "member@careful.example")
        .await;
    let erase = |user: Uuid| org_path(org, &format!("/users/{user}/erase"));
    let before = t.head().await;
    assert_error(&t.post(&erase(owner_user), &eraser, json!({})).await, 403);
    assert_eq!(t.head().await, before, "refused, nothing appended");
    let r = t.post(&erase(member_user), &eraser, json!({})).await;
    assert_eq!(
        r.status, 403,
        "the member's roles grant conversations:*, which it lacks: {}",
        r.body
    );
    let plain = t.invite(org, "plain@careful.example", "Plain Person").await;
    let r = t.post(&erase(plain), &eraser, json!({})).await;
    assert_eq!(r.status, 200, "the control: {}", r.body);
}

#[tokio::test]
async fn organization_keys_can_never_hold_platform_admin() {
    let t = TestApp::spawn().await;
    let org = t.create_org("No Platform").await;
    let before = t.head().await;
    let r = issue_key(
        &t,
        org,
        &t.admin_key,
        json!({"label": "god", "permissions": ["platform:admin"]}),
    )
    .await;
    assert!(
        r.status == 403 || r.status == 422,
        "refused: {} {}",
        r.status,
        r.body
    );
    assert_error(&r, r.status);
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "gods", "permissions": ["platform:admin"]}),
        )
        .await;
    assert!(
        r.status == 403 || r.status == 422,
        "refused: {} {}",
        r.status,
        r.body
    );
    assert_error(&r, r.status);
    assert_eq!(t.head().await, before);
}

// ---------------------------------------------------------------------------------------------
// /v1/me, health, readiness and the OpenAPI document
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn me_describes_a_user_key() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Selves").await;
    let (user, key) = t
        .member_with_key(org, "auditor", "auditor@selves.example")
        .await;
    let me = t.get("/v1/me", &key).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["key"]["prefix"].as_str().unwrap(), &key[..15]);
    assert!(me.body["key"]["id"]
        .as_str()
        .unwrap()
        .parse::<Uuid>()
        .is_ok());
    assert_eq!(me.body["user_id"], json!(user));
    assert_eq!(me.body["organization"]["id"], json!(org));
    assert_eq!(me.body["organization"]["name"], "Selves");
    assert_eq!(me.body["organization"]["status"], "active");
    assert_eq!(permissions_of(&me), role_permissions("auditor"));
    let text = me.body.to_string();
    assert!(!text.contains(&key), "/v1/me never repeats the secret");
}

#[tokio::test]
async fn me_describes_a_service_key_and_the_platform_key() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Services").await;
    let (id, key) = issued(
        &t,
        org,
        json!({"label": "svc", "permissions": ["users:read", "audit:read"]}),
    )
    .await;
    let me = t.get("/v1/me", &key).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["key"]["id"], json!(id));
    assert_eq!(me.body["user_id"], Value::Null);
    assert_eq!(me.body["organization"]["id"], json!(org));
    assert_eq!(
        permissions_of(&me),
        vec!["users:read".to_string(), "audit:read".to_string()]
    );

    let me = t.get("/v1/me", &t.admin_key).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["organization"], Value::Null);
    assert_eq!(me.body["user_id"], Value::Null);
    assert_eq!(permissions_of(&me), vec!["platform:admin".to_string()]);
}

#[tokio::test]
async fn health_readiness_and_openapi_need_no_key() {
    let t = TestApp::spawn().await;
    let r = t.with_authorization(Method::GET, "/healthz", None).await;
    assert_eq!((r.status, &r.body), (200, &json!({"status": "ok"})));
    let r = t.with_authorization(Method::GET, "/readyz", None).await;
    assert_eq!((r.status, &r.body), (200, &json!({"status": "ready"})));
    let r = t
        .with_authorization(Method::GET, "/v1/openapi.json", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["openapi"], "3.1.0");
}

#[tokio::test]
async fn openapi_documents_every_route_and_nothing_else() {
    let t = TestApp::spawn().await;
    let doc = t
        .with_authorization(Method::GET, "/v1/openapi.json", None)
        .await
        .body;
    let paths = doc["paths"].as_object().expect("paths");
    for route in ROUTES {
        let op = &doc["paths"][route.path][route.method.to_lowercase()];
        assert!(
            op.is_object(),
            "{} {} is documented",
            route.method,
            route.path
        );
        assert!(
            op["responses"][route.success.to_string()].is_object(),
            "{} {} success code",
            route.method,
            route.path
        );
        match route.permission {
            Some(p) => assert_eq!(
                op["x-permission"],
                json!(p),
                "{} {}",
                route.method,
                route.path
            ),
            None => assert!(
                op.get("security").is_none(),
                "{} {} needs no key",
                route.method,
                route.path
            ),
        }
    }
    let documented: usize = paths
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(
        documented,
        ROUTES.len(),
        "no operation beyond the route table"
    );
}

fn is_router_miss(r: &Response) -> bool {
    r.status == 405 || (r.status == 404 && r.body["error"]["message"] == "no such route")
}

#[tokio::test]
async fn router_serves_every_documented_route() {
    let t = TestApp::spawn().await;
    // The discriminator works: an undocumented path and a wrong method are router misses.
    let miss = t.get("/v1/nothing-here", &t.admin_key).await;
    assert_error(&miss, 404);
    assert!(is_router_miss(&miss), "{}", miss.body);
    let wrong_method = t.delete("/v1/organizations", &t.admin_key).await;
    assert_error(&wrong_method, 405);

    let before = t.head().await;
    for route in ROUTES {
        let method: Method = route.method.parse().unwrap();
        let path = concrete(route.path);
        let body = matches!(route.method, "POST" | "PUT" | "PATCH").then(|| json!({}));
        let r = t.call(method, &path, Some(&t.admin_key), body).await;
        assert!(
            !is_router_miss(&r),
            "{} {} is not served: {} {}",
            route.method,
            route.path,
            r.status,
            r.body
        );
        if r.status == 404 {
            assert!(
                r.body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .ends_with("not found"),
                "{} {}: {}",
                route.method,
                route.path,
                r.body
            );
        }
    }
    assert_eq!(
        t.head().await,
        before,
        "probing with unknown ids changed nothing"
    );
}

// ---------------------------------------------------------------------------------------------
// Command paths: a lost answer, an update that changes nothing, database errors, revocation
// ---------------------------------------------------------------------------------------------

/// The number of data keys in the database.
async fn subject_keys(t: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM subject_keys")
        .fetch_one(t.pool())
        .await
        .unwrap()
}

/// A TCP proxy in front of PostgreSQL that, once armed, passes the ledger writer's next
/// `SELECT pg_notify(...); COMMIT` on and then cuts the connection instead of bringing the
/// answer back: the commit holds, but the writer never learns it did.
struct AnswerCutter {
    port: u16,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl AnswerCutter {
    async fn start(upstream: String) -> Self {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let a = armed.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if let Ok(server) = tokio::net::TcpStream::connect(&upstream).await {
                    tokio::spawn(Self::pipe(client, server, a.clone()));
                }
            }
        });
        Self { port, armed }
    }

    async fn pipe(
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
        armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let commit = format!(
            "pg_notify('{}'",
            ledgerline_projections::notify::HEAD_CHANNEL
        );
        let (mut client_in, mut client_out) = client.into_split();
        let (mut server_in, mut server_out) = server.into_split();
        let cut = AtomicBool::new(false);
        let up = async {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = client_in.read(&mut buf).await {
                let chunk = &buf[..n];
                let text = String::from_utf8_lossy(chunk);
                if text.contains(&commit) && text.contains("; COMMIT") && armed.swap(false, SeqCst)
                {
                    cut.store(true, SeqCst);
                }
                if server_out.write_all(chunk).await.is_err() {
                    break;
                }
            }
        };
        let down = async {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = server_in.read(&mut buf).await {
                // The writer waits for each answer before it sends more, so what follows the
                // COMMIT is its answer: dropped, and the connection with it.
                if cut.load(SeqCst) || client_out.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = up => {}
            _ = down => {}
        }
    }
}

#[tokio::test]
async fn an_invite_whose_commit_answer_was_lost_keeps_its_user_and_key() {
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
    use std::str::FromStr;

    let db = common::TestDb::new().await;
    let direct = PgConnectOptions::from_str(&db.url).unwrap();
    let cutter = AnswerCutter::start(format!("{}:{}", direct.get_host(), direct.get_port())).await;
    // Everything the app does goes through the proxy, in clear text so it can be read.
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(
            direct
                .clone()
                .host("127.0.0.1")
                .port(cutter.port)
                .ssl_mode(PgSslMode::Disable),
        )
        .await
        .unwrap();
    let app = ledgerline::app::App::new(
        pool,
        ledgerline::crypto::Vault::new(&ledgerline::crypto::MasterKey::generate()),
        true,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = ledgerline::api::router(app.clone());
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let (_, admin) = ledgerline::cli::bootstrap_key(&app, "test operator")
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let post = |path: String, body: Value| {
        let req = client
            .post(format!("{base}{path}"))
            .bearer_auth(&admin)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = post(
        "/v1/organizations".into(),
        json!({"name": "Lost Answers", "slug": "lost-answers"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let org: Uuid = body["id"].as_str().unwrap().parse().unwrap();

    cutter
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = post(
        org_path(org, "/users"),
        json!({"email": "kept@lost.example", "full_name": "Kept Person"}),
    )
    .await;
    assert!(
        !cutter.armed.load(std::sync::atomic::Ordering::SeqCst),
        "the invite's COMMIT went through the proxy and its answer was cut"
    );
    // The user is in the log: the invite succeeded, and the user's data stays readable.
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["email"], "kept@lost.example");
    assert_eq!(body["full_name"], "Kept Person");
    let user: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let invited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'User' AND aggregate_id = $1",
    )
    .bind(user.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(invited, 1);
    let key: i64 = sqlx::query_scalar("SELECT count(*) FROM subject_keys WHERE subject_id = $1")
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(key, 1, "the user's data key is kept");
    // A refused invite, by contrast, leaves no key behind.
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM subject_keys")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let (status, body) = post(
        org_path(org, "/users"),
        json!({"email": "kept@lost.example", "full_name": "Second Person"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM subject_keys")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(after, keys, "a refused invite leaves no key behind");
    server.abort();
    app.shutdown().await;
}

#[tokio::test]
async fn a_profile_update_that_changes_nothing_is_422_and_appends_nothing() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Still Same").await;
    let user = t.invite(org, "same@still.example", "Same Person").await;
    let path = org_path(org, &format!("/users/{user}"));
    let head = t.head().await;
    for body in [
        json!({"full_name": "Same Person"}),
        json!({"full_name": "  Same Person "}),
        json!({"email": "same@still.example"}),
        json!({"email": "same@still.example", "full_name": "Same Person"}),
    ] {
        let r = t.patch(&path, &t.admin_key, body.clone()).await;
        assert_error(&r, 422);
        assert_eq!(
            r.body["error"]["message"], "nothing to change: the update leaves the user as it is",
            "{body}"
        );
        assert_eq!(
            t.head().await,
            head,
            "{body}: a refused update appends nothing"
        );
    }
    // A real change beside an unchanged field records the change alone.
    let r = t
        .patch(
            &path,
            &t.admin_key,
            json!({"email": "same@still.example", "full_name": "New Name"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["full_name"], "New Name");
    assert_eq!(r.body["email"], "same@still.example");
    assert_eq!(t.head().await, head + 1);
    let (payload,): (Value,) = sqlx::query_as(
        "SELECT payload::jsonb FROM events WHERE aggregate_type = 'User' AND aggregate_id = $1 \
         AND event_type = 'UserProfileUpdated'",
    )
    .bind(user.to_string())
    .fetch_one(t.pool())
    .await
    .unwrap();
    let updated = &payload["UserProfileUpdated"];
    assert!(updated["email"].is_null(), "{payload}");
    assert!(updated["full_name"].is_string(), "{payload}");
}

#[tokio::test]
async fn database_errors_behind_a_lookup_are_500_not_422() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Broken Lookups").await;
    let user = t.invite(org, "looked@up.example", "Looked Up").await;
    let parent = create_role(&t, org, "parent", &["users:read"]).await;
    let head = t.head().await;
    let keys = subject_keys(&t).await;

    // The user is found, but opening it fails.
    tamper_table(&t, "subject_keys", "subject_keys_gone").await;
    let r = issue_key(
        &t,
        org,
        &t.admin_key,
        json!({"label": "k", "permissions": ["users:read"], "user_id": user}),
    )
    .await;
    tamper_table(&t, "subject_keys_gone", "subject_keys").await;
    assert_error(&r, 500);
    assert_eq!(r.body["error"]["message"], "internal error");

    tamper_table(&t, "roles", "roles_gone").await;
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "child", "parent_role_id": parent}),
        )
        .await;
    tamper_table(&t, "roles_gone", "roles").await;
    assert_error(&r, 500);
    assert_eq!(t.head().await, head);
    assert_eq!(subject_keys(&t).await, keys);

    // And with the tables back, what is missing is still a 422.
    let r = issue_key(
        &t,
        org,
        &t.admin_key,
        json!({"label": "k", "permissions": ["users:read"], "user_id": Uuid::new_v4()}),
    )
    .await;
    assert_error(&r, 422);
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "child", "parent_role_id": Uuid::new_v4()}),
        )
        .await;
    assert_error(&r, 422);
    assert_eq!(t.head().await, head);
}

/// Renames a read-model table, so that queries naming it fail as a database error would.
async fn tamper_table(t: &TestApp, from: &str, to: &str) {
    sqlx::query(&format!("ALTER TABLE {from} RENAME TO {to}"))
        .execute(t.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn revoking_a_role_of_another_organization_or_none_is_404() {
    let t = TestApp::spawn().await;
    let x = two_tenants(&t).await;
    let (a, user) = (x.a, x.a_member);
    let head = t.head().await;
    for role in [x.b_role, Uuid::new_v4()] {
        let path = org_path(a, &format!("/users/{user}/roles/{role}"));
        let r = t.delete(&path, &x.a_owner_key).await;
        assert_error(&r, 404);
        assert_eq!(r.body["error"]["message"], "role not found");
        let r = t.put(&path, &x.a_owner_key, json!({})).await;
        assert_error(&r, 404);
    }
    // A role of this organization that the user does not hold is a 409, as before.
    let member = t.role_id(a, "member").await;
    let r = t
        .delete(
            &org_path(a, &format!("/users/{user}/roles/{member}")),
            &x.a_owner_key,
        )
        .await;
    assert_error(&r, 409);
    assert_eq!(t.head().await, head);
}

#[tokio::test]
async fn a_role_deleted_while_assigned_can_still_be_revoked() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Role Leftovers").await;
    let role = create_role(&t, org, "short-lived", &["users:read"]).await;
    let user = t.invite(org, "left@over.example", "Left Over").await;
    let path = org_path(org, &format!("/users/{user}/roles/{role}"));
    let r = t.put(&path, &t.admin_key, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t
        .delete(&org_path(org, &format!("/roles/{role}")), &t.admin_key)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    // The role is gone: it can no longer be assigned, but its assignment can be revoked.
    assert_error(&t.put(&path, &t.admin_key, json!({})).await, 404);
    let head = t.head().await;
    let r = t.delete(&path, &t.admin_key).await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(t.head().await, head + 1);
    let r = t.delete(&path, &t.admin_key).await;
    assert_error(&r, 409);
    assert_eq!(t.head().await, head + 1);
}

// ---------------------------------------------------------------------------------------------
// An organization keeps an active owner
// ---------------------------------------------------------------------------------------------

/// Refused with 409, naming the rule, and nothing appended.
async fn refused_for_the_last_owner(t: &TestApp, r: Response, before: i64) {
    assert_error_says(&r, 409, "without an active owner");
    assert_eq!(t.head().await, before, "a refused command appends nothing");
}

#[tokio::test]
async fn the_last_owner_can_be_neither_demoted_nor_deactivated_nor_erased() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Kept Owned").await;
    let owner_role = t.role_id(org, "owner").await;
    let (first, first_key) = t.member_with_key(org, "owner", "first@kept.example").await;
    let user = |u: Uuid, rest: &str| org_path(org, &format!("/users/{u}{rest}"));

    let before = t.head().await;
    // Not even the platform operator, nor the owner themselves.
    for key in [&t.admin_key, &first_key] {
        let r = t
            .delete(&user(first, &format!("/roles/{owner_role}")), key)
            .await;
        refused_for_the_last_owner(&t, r, before).await;
        let r = t.post(&user(first, "/deactivate"), key, json!({})).await;
        refused_for_the_last_owner(&t, r, before).await;
        let r = t.post(&user(first, "/erase"), key, json!({})).await;
        refused_for_the_last_owner(&t, r, before).await;
    }
    let r = t.get(&user(first, ""), &t.admin_key).await;
    assert_eq!(r.body["status"], "active", "{}", r.body);

    // With a second owner, the first may go; then the second is the last.
    let (second, _) = t.member_with_key(org, "owner", "second@kept.example").await;
    let r = t
        .delete(&user(first, &format!("/roles/{owner_role}")), &first_key)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let before = t.head().await;
    let r = t
        .post(&user(second, "/deactivate"), &t.admin_key, json!({}))
        .await;
    refused_for_the_last_owner(&t, r, before).await;

    // A deactivated owner is no owner: the rule does not count them.
    t.assign(org, first, owner_role).await;
    let r = t
        .post(&user(first, "/deactivate"), &t.admin_key, json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t
        .post(&user(second, "/erase"), &t.admin_key, json!({}))
        .await;
    refused_for_the_last_owner(&t, r, before + 2).await;
    // Reactivating is never refused.
    let r = t
        .post(&user(first, "/reactivate"), &t.admin_key, json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t
        .post(&user(second, "/erase"), &t.admin_key, json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn an_organization_without_an_owner_is_left_to_the_platform_operator() {
    // Created by the platform operator and given no owner for good: nothing to keep, nothing
    // refused.
    let t = TestApp::spawn().await;
    let org = t.create_org("Unowned").await;
    let (admin, _) = t
        .member_with_key(org, "admin", "admin@unowned.example")
        .await;
    let admin_role = t.role_id(org, "admin").await;
    let r = t
        .delete(
            &org_path(org, &format!("/users/{admin}/roles/{admin_role}")),
            &t.admin_key,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = t
        .post(
            &org_path(org, &format!("/users/{admin}/deactivate")),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Nor one given owners only until a date: it is left with none when they lapse.
    let interim = t.invite(org, "interim@unowned.example", "Interim").await;
    let owner_role = t.role_id(org, "owner").await;
    let path = org_path(org, &format!("/users/{interim}/roles/{owner_role}"));
    let r = t
        .put(&path, &t.admin_key, json!({"expires_at": in_seconds(3600)}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t.delete(&path, &t.admin_key).await;
    assert_eq!(r.status, 204, "{}", r.body);
}

#[tokio::test]
async fn the_owner_role_loses_no_permission() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Whole Owner").await;
    let owner_role = t.role_id(org, "owner").await;
    let (_, owner) = t.member_with_key(org, "owner", "o@whole.example").await;
    let mut fewer = role_permissions("owner");
    fewer.retain(|p| p != "ledger:read");
    let before = t.head().await;
    // An owner's own key is refused by the rule on one's own roles, the platform's by this one.
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{owner_role}")),
            &owner,
            json!({"permissions": fewer}),
        )
        .await;
    assert_error(&r, 403);
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{owner_role}")),
            &t.admin_key,
            json!({"permissions": fewer}),
        )
        .await;
    assert_error_says(&r, 409, "owner role cannot lose a permission");
    assert_eq!(t.head().await, before);
    // Its description stays the organization's to word.
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{owner_role}")),
            &t.admin_key,
            json!({"description": "Runs Whole Owner"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Makes `co-owner`, a role inheriting from the owner role; returns its id.
async fn co_owner_role(t: &TestApp, org: Uuid, owner_role: Uuid) -> Uuid {
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "co-owner", "permissions": [], "parent_role_id": owner_role}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_role_inheriting_from_owner_counts_and_cannot_be_cut_from_the_last_owner() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Heirs").await;
    let owner_role = t.role_id(org, "owner").await;
    let (first, _) = t.member_with_key(org, "owner", "first@heirs.example").await;
    let co_owner = co_owner_role(&t, org, owner_role).await;
    let heir = t.invite(org, "heir@heirs.example", "Heir").await;
    t.assign(org, heir, co_owner).await;
    // The heir owns through co-owner, so the first owner may go.
    let r = t
        .delete(
            &org_path(org, &format!("/users/{first}/roles/{owner_role}")),
            &t.admin_key,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);

    let before = t.head().await;
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{co_owner}")),
            &t.admin_key,
            json!({"parent_role_id": null}),
        )
        .await;
    refused_for_the_last_owner(&t, r, before).await;
    let r = t
        .delete(&org_path(org, &format!("/roles/{co_owner}")), &t.admin_key)
        .await;
    refused_for_the_last_owner(&t, r, before).await;
    let r = t
        .delete(
            &org_path(org, &format!("/users/{heir}/roles/{co_owner}")),
            &t.admin_key,
        )
        .await;
    refused_for_the_last_owner(&t, r, before).await;
    // Renaming it cuts nothing.
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{co_owner}")),
            &t.admin_key,
            json!({"name": "deputy"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn two_owners_removing_each_other_at_once_leave_one() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Duel").await;
    let owner_role = t.role_id(org, "owner").await;
    let (a, a_key) = t.member_with_key(org, "owner", "a@duel.example").await;
    let (b, b_key) = t.member_with_key(org, "owner", "b@duel.example").await;
    for round in 0..3 {
        let (a_path, b_path) = if round % 2 == 0 {
            (
                org_path(org, &format!("/users/{b}/deactivate")),
                org_path(org, &format!("/users/{a}/deactivate")),
            )
        } else {
            (
                org_path(org, &format!("/users/{b}/roles/{owner_role}")),
                org_path(org, &format!("/users/{a}/roles/{owner_role}")),
            )
        };
        let (by_a, by_b) = if round % 2 == 0 {
            tokio::join!(
                t.post(&a_path, &a_key, json!({})),
                t.post(&b_path, &b_key, json!({})),
            )
        } else {
            tokio::join!(t.delete(&a_path, &a_key), t.delete(&b_path, &b_key),)
        };
        let passed = [by_a.status, by_b.status]
            .iter()
            .filter(|s| (200..300).contains(*s))
            .count();
        // The other is refused: 409 by this rule, or 401/403 when the winner's change had
        // already cut the loser's key when its request came in.
        assert_eq!(
            passed, 1,
            "round {round}: one passes: {} {} / {} {}",
            by_a.status, by_a.body, by_b.status, by_b.body
        );
        assert_eq!(
            permanent_owners(&t, org).await,
            1,
            "round {round}: one owner is left"
        );
        // Put things back for the next round, as the platform operator (what is already so
        // is refused as a no-op: 409 or 422).
        for u in [a, b] {
            let r = t
                .post(
                    &org_path(org, &format!("/users/{u}/reactivate")),
                    &t.admin_key,
                    json!({}),
                )
                .await;
            assert!(matches!(r.status, 200 | 409 | 422), "{}", r.body);
            let r = t
                .put(
                    &org_path(org, &format!("/users/{u}/roles/{owner_role}")),
                    &t.admin_key,
                    json!({}),
                )
                .await;
            assert!(matches!(r.status, 200 | 409 | 422), "{}", r.body);
        }
    }
}

/// The organization's active users holding the built-in owner role without an expiry, as
/// the read models show them.
async fn permanent_owners(t: &TestApp, org: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM user_roles ur JOIN users u ON u.id = ur.user_id \
         WHERE ur.role_id = $1 AND u.status = 'active' AND ur.expires_at IS NULL",
    )
    .bind(built_in_roles::role_id(org, built_in_roles::OWNER))
    .fetch_one(t.pool())
    .await
    .unwrap()
}

/// A new organization whose users `owners` (e-mail addresses) hold the owner role for good:
/// the app, the organization, the owners' ids, the owner role's id, and the path of a
/// user's assignment of it.
async fn owned_org(
    name: &str,
    owners: &[&str],
) -> (TestApp, Uuid, Vec<Uuid>, Uuid, impl Fn(Uuid) -> String) {
    let t = TestApp::spawn().await;
    let org = t.create_org(name).await;
    let owner_role = t.role_id(org, "owner").await;
    let mut ids = Vec::new();
    for email in owners {
        ids.push(t.member_with_key(org, "owner", email).await.0);
    }
    let assignment = move |u: Uuid| org_path(org, &format!("/users/{u}/roles/{owner_role}"));
    (t, org, ids, owner_role, assignment)
}

#[tokio::test]
async fn an_owner_given_until_a_date_does_not_keep_the_organization_owned() {
    let (t, org, owners, owner_role, assignment) =
        owned_org("Lapsing", &["first@lapsing.example"]).await;
    let first = owners[0];
    let second = t.invite(org, "second@lapsing.example", "Second").await;
    let until = json!({"expires_at": in_seconds(3600), "reason": "cover"});

    // The only owner for good, given the role again until a date: the organization would be
    // left with no owner once it passed, with no command to refuse.
    let before = t.head().await;
    let r = t.put(&assignment(first), &t.admin_key, until.clone()).await;
    refused_for_the_last_owner(&t, r, before).await;
    // An expiry already past is bad input, as ever.
    let r = t
        .put(
            &assignment(first),
            &t.admin_key,
            json!({"expires_at": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_error(&r, 422);
    assert_eq!(t.head().await, before);

    // A second owner until a date is welcome beside one for good, but does not count as one:
    // the first may neither lose the role nor leave.
    let r = t
        .put(&assignment(second), &t.admin_key, until.clone())
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let before = t.head().await;
    let r = t.delete(&assignment(first), &t.admin_key).await;
    refused_for_the_last_owner(&t, r, before).await;
    let r = t
        .post(
            &org_path(org, &format!("/users/{first}/deactivate")),
            &t.admin_key,
            json!({}),
        )
        .await;
    refused_for_the_last_owner(&t, r, before).await;
    // Nor through a role inheriting from owner, given until a date.
    let co_owner = co_owner_role(&t, org, owner_role).await;
    let path = org_path(org, &format!("/users/{second}/roles/{co_owner}"));
    let r = t.put(&path, &t.admin_key, until.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let before = t.head().await;
    let r = t.delete(&assignment(first), &t.admin_key).await;
    refused_for_the_last_owner(&t, r, before).await;

    // Once the second holds the role for good, the first may hold it until a date, and the
    // second is then the one kept.
    let r = t.put(&assignment(second), &t.admin_key, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t.put(&assignment(first), &t.admin_key, until.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let before = t.head().await;
    let r = t
        .put(&assignment(second), &t.admin_key, until.clone())
        .await;
    refused_for_the_last_owner(&t, r, before).await;
    let r = t.delete(&assignment(second), &t.admin_key).await;
    refused_for_the_last_owner(&t, r, before).await;
    assert_eq!(permanent_owners(&t, org).await, 1);
}

/// Past a stopped projection, the owners are counted from read models that may no longer be
/// so: an owner with a change pending in the log is not counted as staying, and when that
/// leaves none the answer is 503 (not a guess either way) until the read models show it.
#[tokio::test]
async fn owners_with_a_change_the_read_models_do_not_show_are_not_counted_on() {
    let emails = ["a@stale.example", "b@stale.example", "c@stale.example"];
    let (t, org, owners, _, assignment) = owned_org("Stale Owners", &emails).await;
    t.stop_projection("user_roles").await;
    // `user_roles` stops at this revocation and shows `a` an owner still.
    let r = t.delete(&assignment(owners[0]), &t.admin_key).await;
    assert_eq!(r.status, 204, "{}", r.body);
    // `c` stays for sure: `b` may go.
    let r = t.delete(&assignment(owners[1]), &t.admin_key).await;
    assert_eq!(r.status, 204, "{}", r.body);
    // Now only `a` and `b` are shown beside `c`, each with a change pending.
    let before = t.head().await;
    let r = t.delete(&assignment(owners[2]), &t.admin_key).await;
    assert_error_says(&r, 503, "do not show it yet");
    assert_eq!(t.head().await, before, "a refused command appends nothing");
    let r = t
        .post(
            &org_path(org, &format!("/users/{}/deactivate", owners[2])),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_error(&r, 503);
    assert_eq!(t.head().await, before);

    t.resume_projection("user_roles").await;
    let caught_up = common::eventually(Duration::from_secs(20), || async {
        permanent_owners(&t, org).await == 1
    })
    .await;
    assert!(caught_up, "user_roles shows both revocations once resumed");
    let r = t.delete(&assignment(owners[2]), &t.admin_key).await;
    refused_for_the_last_owner(&t, r, before).await;
    assert_eq!(permanent_owners(&t, org).await, 1);
}

/// Read models that show no owner while changes of the organization's users or roles are
/// pending do not prove it has none: its first owner's role, given but not shown yet, is not
/// taken away again on them (503, as when they show owners with changes pending), and once
/// shown is kept by the rule.
#[tokio::test]
async fn a_first_owner_the_read_models_do_not_show_yet_is_not_removed_unseen() {
    let t = TestApp::spawn().await;
    let org = t.create_org("First Owner").await;
    let ada = t.invite(org, "ada@first.example", "Ada").await;
    let owner_role = t.role_id(org, "owner").await;
    t.stop_projection("user_roles").await;
    t.assign(org, ada, owner_role).await;
    let before = t.head().await;
    let revoke = org_path(org, &format!("/users/{ada}/roles/{owner_role}"));
    let r = t.delete(&revoke, &t.admin_key).await;
    assert_error_says(&r, 503, "do not show it yet");
    assert_eq!(t.head().await, before, "a refused command appends nothing");

    t.resume_projection("user_roles").await;
    let shown = common::eventually(Duration::from_secs(20), || async {
        permanent_owners(&t, org).await == 1
    })
    .await;
    assert!(shown, "user_roles shows the owner once resumed");
    let r = t.delete(&revoke, &t.admin_key).await;
    refused_for_the_last_owner(&t, r, before).await;
}

/// In an organization with no owner, changes pending that cannot make one (invitations,
/// while `users` is stopped) do not hold a removal up: it is not the owner rule's to refuse
/// (seen in CI as 503s for deactivations beside a burst of invitations).
#[tokio::test]
async fn a_removal_where_no_owner_can_appear_does_not_wait_for_other_changes() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Ownerless").await;
    let ada = t.invite(org, "ada@ownerless.example", "Ada").await;
    t.stop_projection("users").await;
    let bea = json!({"email": "bea@ownerless.example", "full_name": "Bea"});
    let r = t.post(&org_path(org, "/users"), &t.admin_key, bea).await;
    assert_eq!(r.status, 202, "taken, not shown yet: {}", r.body);
    let deactivate = org_path(org, &format!("/users/{ada}/deactivate"));
    let r = t.post(&deactivate, &t.admin_key, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A client hanging up on a removal ends neither it nor the organization's turn: the next
/// removal is not answered while the read models do not show the first, and is then decided
/// on them. (Ended at the hang-up, the first's turn would let the second in while the read
/// models lag, to a 503 once its own wait for them ran out.)
#[tokio::test]
async fn a_removal_whose_client_hung_up_holds_the_turn_until_the_read_models_show_it() {
    let emails = ["a@hungup.example", "b@hungup.example"];
    let (t, org, owners, _, assignment) = owned_org("Hung Up", &emails).await;
    let (a, b) = (owners[0], owners[1]);
    // `user_roles` cannot commit a batch while this holds its checkpoint: it falls behind,
    // without stopping.
    let hold = common::hold_checkpoint(t.pool(), "user_roles").await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let sent = tokio::time::Instant::now();
    let gone = impatient
        .delete(format!("{}{}", t.base, assignment(a)))
        .bearer_auth(&t.admin_key)
        .send()
        .await;
    assert!(
        gone.as_ref().is_err_and(|e| e.is_timeout()),
        "the client gave up waiting: {gone:?}"
    );

    let b_owner = assignment(b);
    let second = t.delete(&b_owner, &t.admin_key);
    tokio::pin!(second);
    // Past the first removal's own wait for the read models (5 s), its turn holds: the
    // second is not answered (waiting for the turn; without it, it would answer 503 once its
    // own wait for the changes it cannot tell had passed).
    let early = tokio::time::timeout_at(sent + Duration::from_secs(7), &mut second).await;
    assert!(
        early.is_err(),
        "the second removal waits for the first's turn, answered {:?}",
        early.map(|r| (r.status, r.body))
    );
    hold.rollback().await.unwrap();
    let second = second.await;
    // Decided on read models that show the first: `b` is the last owner.
    assert_error_says(&second, 409, "without an active owner");
    assert_eq!(permanent_owners(&t, org).await, 1);
}

/// A check that cannot tell for want of read models waits a moment for them: the owner just
/// given the role, not shown yet, lets the first one go once shown.
#[tokio::test]
async fn a_removal_waits_a_moment_for_the_read_models_to_show_a_new_owner() {
    let (t, org, owners, _, assignment) = owned_org("Handover", &["first@handover.example"]).await;
    let first = owners[0];
    let next = t.invite(org, "next@handover.example", "Next").await;
    let hold = common::hold_checkpoint(t.pool(), "user_roles").await;
    let r = t.put(&assignment(next), &t.admin_key, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers[ledgerline::api::READ_MODELS_BEHIND], "behind");

    let first_owner = assignment(first);
    let removal = t.delete(&first_owner, &t.admin_key);
    let shown_soon = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        hold.rollback().await.unwrap();
    };
    let (r, ()) = tokio::join!(removal, shown_soon);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(permanent_owners(&t, org).await, 1);
}

/// At the smallest pool `serve` runs with (`MIN_SERVE_POOL`), bursts of both kinds of turns
/// in ten organizations at once (deactivations take the owners' turns; roles created under a
/// parent, the role tree's) go through with invitations beside them, which take no turn:
/// the turns hold at most six of the eight connections, so their commands, and everyone
/// else's, still get one. (Turns holding the whole pool would leave their own commands
/// waiting for a connection until the pool's 10 s wait ran out: 500s.) Ten organizations, as
/// turns are striped 64 ways by organization and two on one stripe take turns: ten fill
/// the four owners' and two role tree's places at once in all but a tiny share of runs.
#[tokio::test]
async fn both_kinds_of_turns_at_the_smallest_serve_pool_leave_room_for_other_commands() {
    let db = common::TestDb::new().await;
    let pool = ledgerline::db::connect(&db.url, ledgerline::config::MIN_SERVE_POOL)
        .await
        .unwrap();
    let t = TestApp::spawn_on(db, pool, Default::default()).await;
    let mut requests = Vec::new();
    for n in 0..10 {
        let org = t.create_org(&format!("Offboarding {n}")).await;
        let member = t.role_id(org, "member").await;
        let emails: Vec<String> = (0..3)
            .map(|i| format!("leaver{i}@{}.example", org.simple()))
            .collect();
        let leavers =
            futures::future::join_all(emails.iter().map(|e| t.invite(org, e, "Leaver"))).await;
        for user in leavers {
            let path = org_path(org, &format!("/users/{user}/deactivate"));
            requests.push((path, json!({}), 200));
        }
        for i in 0..2 {
            let role =
                json!({"name": format!("team {i}"), "permissions": [], "parent_role_id": member});
            requests.push((org_path(org, "/roles"), role, 201));
        }
        for i in 0..3 {
            let email = format!("joiner{i}@{}.example", org.simple());
            let user = json!({"email": email, "full_name": "Joiner"});
            requests.push((org_path(org, "/users"), user, 201));
        }
    }
    let burst = futures::future::join_all(
        requests
            .iter()
            .map(|(path, body, _)| t.post(path, &t.admin_key, body.clone())),
    );
    // Only against a hang: each request is answered within its 30 s.
    let answers = tokio::time::timeout(Duration::from_secs(120), burst)
        .await
        .expect("the burst ends");
    for ((path, _, expected), r) in requests.iter().zip(answers) {
        assert_eq!(r.status, *expected, "{path}: {}", r.body);
    }
}

/// More commands taking one organization's owners' turn at once than the pool has
/// connections (an offboarding in bulk) all go through: waiters queue in the process
/// holding no connection, so the turn's holder can still run its command.
#[tokio::test]
async fn a_burst_of_owner_turns_does_not_starve_the_pool() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Bulk Offboarding").await;
    let emails: Vec<String> = (0..24).map(|i| format!("leaver{i}@bulk.example")).collect();
    let users = futures::future::join_all(emails.iter().map(|e| t.invite(org, e, "Leaver"))).await;
    let paths: Vec<String> = users
        .iter()
        .map(|user| org_path(org, &format!("/users/{user}/deactivate")))
        .collect();
    let answers =
        futures::future::join_all(paths.iter().map(|p| t.post(p, &t.admin_key, json!({})))).await;
    for r in answers {
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

/// Runs an invitation of a new user by `secret` that waits (for its new user's data key to
/// be stored, held on a lock the test holds) while `meanwhile` runs, and answers it.
async fn invite_while(
    t: &TestApp,
    org: Uuid,
    secret: &str,
    meanwhile: impl std::future::Future<Output = ()>,
) -> Response {
    let mut answers = invites_while(t, org, &[secret], meanwhile).await;
    answers.pop().expect("one answer")
}

/// [`invite_while`] for an invitation by each of `secrets` at once, each of its own user;
/// answered in the same order. `meanwhile` runs once every invitation waits or was already
/// answered (refused before it could wait, say: the answers then tell).
async fn invites_while(
    t: &TestApp,
    org: Uuid,
    secrets: &[&str],
    meanwhile: impl std::future::Future<Output = ()>,
) -> Vec<Response> {
    let mut holder = hold_on_4242(t, "BEFORE INSERT ON subject_keys FOR EACH ROW").await;
    let answered = std::sync::atomic::AtomicI64::new(0);
    let invites = futures::future::join_all(secrets.iter().enumerate().map(|(i, secret)| {
        let answered = &answered;
        async move {
            let email = format!("invitee{i}@example.com");
            let answer = t.invite_by(org, secret, &email, "Invitee").await;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            answer
        }
    }));
    let then_release = async {
        let all_wait = eventually(Duration::from_secs(30), || async {
            let waiting = sessions_waiting_on_4242(t, true).await;
            waiting + answered.load(std::sync::atomic::Ordering::SeqCst) >= secrets.len() as i64
        });
        assert!(
            all_wait.await,
            "every invitation waits to store its user's key"
        );
        meanwhile.await;
        sqlx::query("SELECT pg_advisory_unlock(4242)")
            .execute(&mut *holder)
            .await
            .unwrap();
    };
    tokio::join!(invites, then_release).0
}

/// A service key's issue that may invite users.
fn hr_key() -> Value {
    json!({"label": "hr", "permissions": ["users:read", "users:write"]})
}

/// How many events the log holds whose metadata gives `key` as `value`.
async fn events_with(t: &TestApp, key: &str, value: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE metadata::jsonb ->> $1 = $2")
        .bind(key)
        .bind(value)
        .fetch_one(t.pool())
        .await
        .unwrap()
}

/// A key revoked while one of its requests waits records nothing in its name after the
/// revocation: the append is refused on the key's changed version, and the request answered
/// 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_revoked_while_its_request_waits_records_nothing_in_its_name() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let keys = format!("/v1/organizations/{org}/api-keys");
    let (key, secret) = issued(&t, org, hr_key()).await;
    let invited = invite_while(&t, org, &secret, async {
        let r = t
            .post(&format!("{keys}/{key}/revoke"), &t.admin_key, json!({}))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    })
    .await;
    assert_error_says(&invited, 401, "revoked or rotated while the request");
    assert_eq!(
        events_with(&t, "actor_key_id", &key.to_string()).await,
        0,
        "no event in the revoked key's name"
    );
    assert_actors_guarded(t.pool()).await;
}

/// `answer`, to a request of `user`'s key (`secret`), refused for `why` while it waited (409,
/// "send it again"), with nothing recorded in the user's name; sent again, it is decided on
/// what the user's roles grant now: too little (403).
async fn refused_then_forbidden(
    t: &TestApp,
    org: Uuid,
    user: Uuid,
    secret: &str,
    answer: &Response,
    why: &str,
) {
    assert_error_says(answer, 409, why);
    assert_error_says(answer, 409, "send it again");
    assert_eq!(
        events_with(t, "actor_user_id", &user.to_string()).await,
        0,
        "nothing recorded in the user's name"
    );
    let sent_again = t.invite_by(org, secret, "grace@example.com", "Grace").await;
    assert_error(&sent_again, 403);
}

/// A user deactivated, or stripped of the role that let them act, while one of their key's
/// requests waits: nothing is recorded in their name after it (409, sent again it is
/// decided on what holds now: a 401, a 403). A change of the user that takes nothing away
/// (a new name) lets the request land.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_stopped_while_their_request_waits_records_nothing_in_their_name() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let admin_role = t.role_id(org, "admin").await;
    let t = &t;
    let (ada, secret) = t.member_with_key(org, "admin", "ada@example.com").await;
    let invited = invite_while(t, org, &secret, t.deactivate(org, ada)).await;
    assert_error_says(
        &invited,
        409,
        "this key's user was deactivated, erased, or given or lost a role",
    );
    assert_error_says(&invited, 409, "send it again");
    let (bob, secret) = t.member_with_key(org, "admin", "bob@example.com").await;
    let invited = invite_while(t, org, &secret, t.revoke_role(org, bob, admin_role)).await;
    refused_then_forbidden(t, org, bob, &secret, &invited, "lost a role").await;
    assert_eq!(
        events_with(t, "actor_user_id", &ada.to_string()).await,
        0,
        "no event in the deactivated user's name"
    );

    let (cy, secret) = t.member_with_key(org, "admin", "cy@example.com").await;
    let renamed = invite_while(t, org, &secret, async {
        let r = t
            .patch(
                &org_path(org, &format!("/users/{cy}")),
                &t.admin_key,
                json!({"full_name": "Cy Renamed"}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    })
    .await;
    assert_eq!(renamed.status, 201, "{}", renamed.body);
    assert_actors_guarded(t.pool()).await;
}

/// Why a request whose user's role changed while it waited is refused.
const ROLE_CHANGED: &str =
    "one of the roles this key's user held (or inherited) was changed or deleted";

/// A new user of `org` holding `roles`, and the secret of a key of theirs issued with `key`
/// (its label and permissions).
async fn holder_of(
    t: &TestApp,
    org: Uuid,
    email: &str,
    roles: &[Uuid],
    mut key: Value,
) -> (Uuid, String) {
    let user = t.invite(org, email, "Holder").await;
    for role in roles {
        t.assign(org, user, *role).await;
    }
    key["user_id"] = json!(user);
    (user, issued(t, org, key).await.1)
}

/// `PATCH` of role `role` of `org` with `key`.
async fn change_role(t: &TestApp, org: Uuid, role: Uuid, key: &str, body: Value) -> Response {
    t.patch(&org_path(org, &format!("/roles/{role}")), key, body)
        .await
}

/// A role its user holds, or inherits from, changed while one of their key's requests waits:
/// nothing is recorded on the role's old authority (409; sent again, it is decided on what
/// the role grants now: a 403 once it grants too little). Any change of the role counts, a new
/// name too; a change of a role the user does not hold (or no more: its assignment expired)
/// lets the request land, and its events name the roles it acted under and their versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_changed_while_its_holders_request_waits_records_nothing_on_its_old_authority() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let t = &t;
    let inviting = ["users:read", "users:write"];
    let holder = |email: &'static str, role: Uuid| async move {
        holder_of(t, org, email, &[role], hr_key()).await
    };
    let change = |role: Uuid, body: Value| async move {
        let r = change_role(t, org, role, &t.admin_key, body).await;
        assert_eq!(r.status, 200, "{}", r.body);
    };

    // Narrowed: the role itself, and the parent a role inherits from.
    let narrowed = t.create_role(org, "narrowed", &inviting, None).await;
    let parent = t.create_role(org, "parent", &inviting, None).await;
    let child = t.create_role(org, "child", &[], Some(parent)).await;
    for (email, held, narrowing) in [
        ("ada@example.com", narrowed, narrowed),
        ("bob@example.com", child, parent),
    ] {
        let (user, secret) = holder(email, held).await;
        let narrow = change(narrowing, json!({"permissions": ["users:read"]}));
        let answer = invite_while(t, org, &secret, narrow).await;
        refused_then_forbidden(t, org, user, &secret, &answer, ROLE_CHANGED).await;
    }

    // Renamed: nothing taken away, refused all the same; sent again, it lands.
    let renamed = t.create_role(org, "renamed", &inviting, None).await;
    let (cy, cy_secret) = holder("cy@example.com", renamed).await;
    let answer = invite_while(t, org, &cy_secret, change(renamed, json!({"name": "new"}))).await;
    assert_error_says(&answer, 409, ROLE_CHANGED);
    let sent_again = t
        .invite_by(org, &cy_secret, "grace@example.com", "Grace")
        .await;
    assert_eq!(sent_again.status, 201, "{}", sent_again.body);

    // A change of a role the user does not hold, or holds no more (its assignment expired),
    // does not touch the holder's request, whose events say what it acted under.
    let held = t.create_role(org, "held", &inviting, None).await;
    let lapsed = t.create_role(org, "lapsed", &inviting, None).await;
    let (dee, dee_secret) = holder("dee@example.com", held).await;
    let ends = in_seconds(8);
    t.assign_until(org, dee, lapsed, ends).await;
    sleep_past(ends).await;
    let answer = invite_while(t, org, &dee_secret, async {
        change(renamed, json!({"permissions": []})).await;
        change(lapsed, json!({"permissions": []})).await;
    })
    .await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let acted = events_with(t, "actor_user_id", &dee.to_string()).await;
    assert!(acted > 0);
    assert_eq!(
        events_with(t, "actor_role_sequences", &format!("{held}@1")).await,
        acted,
        "the events name the role the request acted under, at its version, and no other"
    );
    assert_eq!(
        events_with(t, "actor_user_id", &cy.to_string()).await,
        events_with(t, "actor_role_sequences", &format!("{renamed}@2")).await,
        "the sent-again request acted under the renamed role"
    );
    assert_actors_guarded(t.pool()).await;
}

/// The other ways a role goes while its holder's request waits (deleted; re-parented under a
/// role that grants less) refuse it too (409; sent again, 403). A holder's own change of a
/// role they hold lands, refusing only their requests authenticated before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_deleted_or_re_parented_refuses_its_holders_requests_and_only_roles_held_guard() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let t = &t;
    let inviting = ["users:read", "users:write"];
    let reading = t.create_role(org, "reading", &["users:read"], None).await;

    let deleted = t.create_role(org, "deleted", &inviting, None).await;
    let (_, ada_secret) = holder_of(t, org, "ada@example.com", &[deleted], hr_key()).await;
    let ada_answer = invite_while(t, org, &ada_secret, async {
        let r = t
            .delete(&org_path(org, &format!("/roles/{deleted}")), &t.admin_key)
            .await;
        assert_eq!(r.status, 204, "{}", r.body);
    })
    .await;
    let parent = t.create_role(org, "parent", &inviting, None).await;
    let child = t.create_role(org, "child", &[], Some(parent)).await;
    let (_, bob_secret) = holder_of(t, org, "bob@example.com", &[child], hr_key()).await;
    let bob_answer = invite_while(t, org, &bob_secret, async {
        let body = json!({"parent_role_id": reading});
        let r = change_role(t, org, child, &t.admin_key, body).await;
        assert_eq!(r.status, 200, "{}", r.body);
    })
    .await;
    for (answer, secret) in [(&ada_answer, &ada_secret), (&bob_answer, &bob_secret)] {
        assert_error_says(answer, 409, "send it again");
        let sent_again = t.invite_by(org, secret, "grace@example.com", "Grace").await;
        assert_error(&sent_again, 403);
    }
    for answer in [&ada_answer, &bob_answer] {
        assert_error_says(answer, 409, ROLE_CHANGED);
    }

    // A holder renames a role they hold: their change lands, their invitation in flight
    // across it does not.
    let managing = ["users:read", "users:write", "roles:read", "roles:write"];
    let own = t.create_role(org, "own", &managing, None).await;
    let key = json!({"label": "own", "permissions": managing});
    let (cy, cy_secret) = holder_of(t, org, "cy@example.com", &[own], key).await;
    let answer = invite_while(t, org, &cy_secret, async {
        let body = json!({"name": "own renamed"});
        let r = change_role(t, org, own, &cy_secret, body).await;
        assert_eq!(r.status, 200, "{}", r.body);
    })
    .await;
    assert_error_says(&answer, 409, ROLE_CHANGED);
    assert_eq!(
        events_with(t, "actor_role_sequences", &format!("{own}@1")).await,
        1,
        "the rename, in the name of the role as it was"
    );
    assert_eq!(events_with(t, "actor_user_id", &cy.to_string()).await, 1);
    assert_actors_guarded(t.pool()).await;
}

/// An end made nearer while a request waits is seen too: a role its user holds given again
/// with an expiry (where it had none) refuses the request (409), whose events would otherwise
/// carry the end it had before (`actor_valid_until`: none). Sent again, it lands, carrying the
/// new end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_assignment_given_again_with_a_nearer_end_refuses_the_request_in_flight() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let t = &t;
    let admin = t.role_id(org, "admin").await;
    let (ada, secret) = t.member_with_key(org, "admin", "ada@example.com").await;
    let ends = in_seconds(3600);
    let invited = invite_while(t, org, &secret, t.assign_until(org, ada, admin, ends)).await;
    assert_error_says(&invited, 409, "given or lost a role");
    assert_eq!(events_with(t, "actor_user_id", &ada.to_string()).await, 0);
    let sent_again = t
        .invite_by(org, &secret, "grace@example.com", "Grace")
        .await;
    assert_eq!(sent_again.status, 201, "{}", sent_again.body);
    let written = ends.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    assert_eq!(
        events_with(t, "actor_valid_until", &written).await,
        events_with(t, "actor_user_id", &ada.to_string()).await,
        "what lands carries the nearer end"
    );
    assert_actors_guarded(t.pool()).await;
}

/// Where a user stood is read from the log, not from their `users` row, which can lag a
/// role revocation `user_roles` already shows: a request made after the revocation is
/// decided on the roles left, and lands, though the row is behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_after_a_role_revocation_lands_while_users_lags() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let (ada, secret) = t.member_with_key(org, "admin", "ada@example.com").await;
    let member = t.role_id(org, "member").await;
    t.assign(org, ada, member).await;
    t.stop_projection("users").await;
    t.revoke_role(org, ada, member).await;
    let r = t
        .post(
            &org_path(org, "/roles"),
            &secret,
            json!({"name": "ops", "permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

/// An organization suspended while one of its keys' requests waits: nothing is recorded in
/// the key's name after the suspension (409; sent again, 401).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_organization_suspended_while_its_keys_request_waits_records_nothing_in_its_name() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let (key, secret) = issued(&t, org, hr_key()).await;
    let invited = invite_while(&t, org, &secret, async {
        let r = t
            .post(&org_path(org, "/suspend"), &t.admin_key, json!({}))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    })
    .await;
    assert_error_says(&invited, 409, "this key's organization was suspended");
    assert_eq!(
        events_with(&t, "actor_key_id", &key.to_string()).await,
        0,
        "no event in the key's name after its organization's suspension"
    );
    let sent_again = t
        .invite_by(org, &secret, "grace@example.com", "Grace")
        .await;
    assert_error_says(&sent_again, 401, "suspended");
    assert_actors_guarded(t.pool()).await;
}

/// A key's end passing while one of its requests waits records nothing in its name after
/// it: the key's expiry, the end of a rotated-away secret's grace period, the expiry of a
/// role assignment of its user's, sooner than the key's own (409; sent again, answered on what
/// holds then). A key whose end is yet to come is not held back by it, and its events say when
/// that is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_whose_end_passes_while_its_request_waits_records_nothing_in_its_name() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let expiring = |expires_at: DateTime<Utc>| {
        let mut body = hr_key();
        body["expires_at"] = json!(expires_at);
        body
    };
    let later = in_seconds(3600);
    let (lasting, lasting_secret) = issued(&t, org, expiring(later)).await;
    let (rotated, old_secret) = issued(&t, org, hr_key()).await;
    let ada = t.invite(org, "ada@example.com", "Ada").await;
    let admin = t.role_id(org, "admin").await;
    let mut adas_key = expiring(later);
    adas_key["user_id"] = json!(ada);
    let (adas, adas_secret) = issued(&t, org, adas_key).await;

    // The ends, each within seconds: only what sets them is left to do before the requests.
    let ends = in_seconds(12);
    let (expired, expired_secret) = issued(&t, org, expiring(ends)).await;
    let r = t
        .put(
            &org_path(org, &format!("/users/{ada}/roles/{admin}")),
            &t.admin_key,
            json!({"expires_at": ends}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t
        .post(
            &org_path(org, &format!("/api-keys/{rotated}/rotate")),
            &t.admin_key,
            json!({"previous_secret_valid_for_seconds": 12}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let grace_ends = time(&r.body["previous_secret_valid_until"]);
    let secrets = [&expired_secret, &old_secret, &adas_secret, &lasting_secret];
    let answers = invites_while(&t, org, &secrets.map(String::as_str), async {
        let now = Utc::now();
        assert!(
            now < ends,
            "the requests waited only at {now}, after the ends"
        );
        sleep_past(ends.max(grace_ends)).await
    })
    .await;
    let [expired_answer, grace_answer, role_answer, lasting_answer] = &answers[..] else {
        panic!("four answers");
    };
    for answer in [expired_answer, grace_answer, role_answer] {
        assert_error_says(
            answer,
            409,
            "expired while the request was being carried out",
        );
        assert_error_says(answer, 409, "send it again");
    }
    assert_eq!(lasting_answer.status, 201, "{}", lasting_answer.body);
    for key in [expired, rotated, adas] {
        assert_eq!(
            events_with(&t, "actor_key_id", &key.to_string()).await,
            0,
            "no event in the name of a key past its end"
        );
    }
    let written = later.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    assert_eq!(
        events_with(&t, "actor_valid_until", &written).await,
        events_with(&t, "actor_key_id", &lasting.to_string()).await,
        "the lasting key's events say when it ends"
    );
    assert!(events_with(&t, "actor_key_id", &lasting.to_string()).await > 0);

    let t = &t;
    let again = |secret: String| async move {
        t.invite_by(org, &secret, "grace@example.com", "Grace")
            .await
    };
    assert_error_says(&again(expired_secret).await, 401, "expired");
    assert_error_says(
        &again(old_secret).await,
        401,
        "grace period the rotation gave it ended",
    );
    assert_error(&again(adas_secret).await, 403);
    assert_actors_guarded(t.pool()).await;
}
