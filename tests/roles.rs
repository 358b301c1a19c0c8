//! The tree of roles an organization's inheritance makes: never a cycle, never deeper than
//! `MAX_INHERITANCE_DEPTH`, also when changes race; and what a cycle or a longer chain left by
//! an older release still allows.

mod common;

use common::{assert_error_says, decided_before_appended, TestApp};
use ledgerline::app::Actor;
use ledgerline_aggregates::role::{RoleCommand, MAX_INHERITANCE_DEPTH};
use ledgerline_aggregates::PermissionSet;
use serde_json::json;
use uuid::Uuid;

const ROUNDS: usize = 10;

fn org_path(org: Uuid, rest: &str) -> String {
    format!("/v1/organizations/{org}{rest}")
}

fn role_path(org: Uuid, role: Uuid) -> String {
    org_path(org, &format!("/roles/{role}"))
}

async fn create_role(t: &TestApp, org: Uuid, name: &str, parent: Option<Uuid>) -> Uuid {
    t.create_role(org, name, &[], parent).await
}

/// `n` roles, each inheriting from the one before; the first grants `users:read`.
async fn chain(t: &TestApp, org: Uuid, prefix: &str, n: usize) -> Vec<Uuid> {
    let mut roles = vec![
        t.create_role(org, &format!("{prefix}-0"), &["users:read"], None)
            .await,
    ];
    for i in 1..n {
        let parent = roles.last().copied();
        roles.push(create_role(t, org, &format!("{prefix}-{i}"), parent).await);
    }
    roles
}

async fn set_parent(t: &TestApp, org: Uuid, role: Uuid, parent: Option<Uuid>) -> common::Response {
    t.patch(
        &role_path(org, role),
        &t.admin_key,
        json!({ "parent_role_id": parent }),
    )
    .await
}

fn effective(r: &common::Response) -> Vec<String> {
    r.body["effective_permissions"]
        .as_array()
        .unwrap_or_else(|| panic!("a role: {}", r.body))
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

/// Roles of `org` that the read model shows inheriting from themselves.
async fn roles_in_a_cycle(t: &TestApp, org: Uuid) -> i64 {
    sqlx::query_scalar(
        "WITH RECURSIVE up(start, id, depth) AS ( \
             SELECT id, parent_role_id, 1 FROM roles \
             WHERE organization_id = $1 AND parent_role_id IS NOT NULL \
           UNION ALL \
             SELECT u.start, r.parent_role_id, u.depth + 1 FROM up u JOIN roles r ON r.id = u.id \
             WHERE r.parent_role_id IS NOT NULL AND u.id <> u.start AND u.depth < 200) \
         SELECT count(DISTINCT start) FROM up WHERE id = start",
    )
    .bind(org)
    .fetch_one(t.pool())
    .await
    .unwrap()
}

/// Roles of `org` whose parent the read model does not hold.
async fn orphans(t: &TestApp, org: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM roles c WHERE c.organization_id = $1 \
           AND c.parent_role_id IS NOT NULL \
           AND NOT EXISTS (SELECT 1 FROM roles p WHERE p.id = c.parent_role_id)",
    )
    .bind(org)
    .fetch_one(t.pool())
    .await
    .unwrap()
}

fn passed(r: &common::Response) -> bool {
    (200..300).contains(&r.status)
}

#[tokio::test]
async fn two_roles_made_each_others_parent_at_once_never_both_pass() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Racing Parents").await;
    for round in 0..ROUNDS {
        let c = create_role(&t, org, &format!("c{round}"), None).await;
        let d = create_role(&t, org, &format!("d{round}"), None).await;
        let before = t.head().await;
        let (c_under_d, d_under_c) = tokio::join!(
            set_parent(&t, org, c, Some(d)),
            set_parent(&t, org, d, Some(c)),
        );
        assert!(
            passed(&c_under_d) != passed(&d_under_c),
            "round {round}: exactly one passes: {} {} / {} {}",
            c_under_d.status,
            c_under_d.body,
            d_under_c.status,
            d_under_c.body
        );
        let refused = if passed(&c_under_d) {
            d_under_c
        } else {
            c_under_d
        };
        assert_error_says(&refused, 422, "cannot inherit from itself");
        assert_eq!(
            t.head().await,
            before + 1,
            "round {round}: one event, the winner's"
        );
        assert_eq!(roles_in_a_cycle(&t, org).await, 0, "round {round}");
    }
}

#[tokio::test]
async fn a_role_deleted_while_one_is_created_under_it_leaves_no_orphan() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Racing Children").await;
    for round in 0..ROUNDS {
        let parent = create_role(&t, org, &format!("p{round}"), None).await;
        let before = t.head().await;
        let body = json!({"name": format!("child{round}"), "parent_role_id": parent});
        let (parent_path, roles_path) = (role_path(org, parent), org_path(org, "/roles"));
        let (deleted, created) = tokio::join!(
            t.delete(&parent_path, &t.admin_key),
            t.post(&roles_path, &t.admin_key, body),
        );
        assert!(
            passed(&deleted) != passed(&created),
            "round {round}: exactly one passes: {} {} / {} {}",
            deleted.status,
            deleted.body,
            created.status,
            created.body
        );
        if passed(&deleted) {
            assert_error_says(&created, 422, "parent_role_id is not a role");
        } else {
            assert_error_says(&deleted, 409, "1 role(s) inherit from this role");
        }
        assert_eq!(t.head().await, before + 1, "round {round}");
        assert_eq!(orphans(&t, org).await, 0, "round {round}");
    }
}

#[tokio::test]
async fn inheritance_is_capped_at_its_depth_limit_on_creation_and_re_parenting() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Deep").await;
    let too_deep = format!("at most {MAX_INHERITANCE_DEPTH} levels of ancestors");
    // The root and MAX below it: the last has MAX ancestors, and inherits from all of them.
    let roles = chain(&t, org, "chain", MAX_INHERITANCE_DEPTH + 1).await;
    let last = *roles.last().unwrap();
    let r = t.get(&role_path(org, last), &t.admin_key).await;
    assert_eq!(effective(&r), ["users:read"], "{}", r.body);

    let before = t.head().await;
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "one too many", "parent_role_id": last}),
        )
        .await;
    assert_error_says(&r, 422, &too_deep);

    // A role with one below it fits under a parent with MAX - 1 ancestors, not MAX.
    let x = create_role(&t, org, "x", None).await;
    let y = create_role(&t, org, "y", Some(x)).await;
    let before_moves = t.head().await;
    assert_eq!(
        before_moves,
        before + 2,
        "the refused creation appended nothing"
    );
    let r = set_parent(&t, org, x, Some(roles[MAX_INHERITANCE_DEPTH - 1])).await;
    assert_error_says(&r, 422, &too_deep);
    assert_eq!(t.head().await, before_moves);
    let r = set_parent(&t, org, x, Some(roles[MAX_INHERITANCE_DEPTH - 2])).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t.get(&role_path(org, y), &t.admin_key).await;
    assert_eq!(effective(&r), ["users:read"], "{}", r.body);

    // Closing the chain on itself: the walk up from its end sees its start.
    let before = t.head().await;
    for (role, parent) in [(roles[0], last), (roles[0], y), (x, y)] {
        let r = set_parent(&t, org, role, Some(parent)).await;
        assert_error_says(&r, 422, "cannot inherit from itself");
    }
    assert_eq!(t.head().await, before);
    assert_eq!(roles_in_a_cycle(&t, org).await, 0);
}

/// What a release without these rules could leave: `command` appended with whatever facts
/// the test hands in, as the aggregate trusts them.
async fn as_an_older_release(t: &TestApp, org: Uuid, role: Uuid, command: RoleCommand) {
    t.app
        .execute(
            &t.app.cqrs.roles,
            role,
            Some(org),
            &Actor::cli("test"),
            command,
        )
        .await
        .expect("appended");
}

#[tokio::test]
async fn a_cycle_left_by_an_older_release_stays_bounded_and_can_be_broken() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Old Cycle").await;
    let c = create_role(&t, org, "c", None).await;
    let d = t.create_role(org, "d", &["audit:read"], Some(c)).await;
    // c inherits from d, which inherits from c: the cycle two racing requests made before.
    as_an_older_release(
        &t,
        org,
        c,
        RoleCommand::Update {
            name: None,
            description: None,
            permissions: None,
            parent_role_id: Some(Some(d)),
            parent_ancestry: vec![d],
            inheriting_levels: 0,
            grantable: PermissionSet::new(),
        },
    )
    .await;
    assert_eq!(roles_in_a_cycle(&t, org).await, 2);
    // Its walks end: each grants both roles' permissions, and a holder's key works.
    for role in [c, d] {
        let r = t.get(&role_path(org, role), &t.admin_key).await;
        assert_eq!(effective(&r), ["audit:read"], "{}", r.body);
    }
    let user = t.invite(org, "cyclist@old.example", "Cyclist").await;
    t.assign(org, user, c).await;
    let r = t
        .post(
            &org_path(org, "/api-keys"),
            &t.admin_key,
            json!({"label": "cyclist", "permissions": ["audit:read"], "user_id": user}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let me = t.get("/v1/me", r.body["secret"].as_str().unwrap()).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["permissions"], json!(["audit:read"]));

    let before = t.head().await;
    let r = t.delete(&role_path(org, c), &t.admin_key).await;
    assert_error_says(&r, 409, "inherit from this role");
    let r = set_parent(&t, org, d, Some(c)).await;
    assert_error_says(&r, 422, "cannot inherit from itself");
    assert_eq!(t.head().await, before);
    // Removing a parent breaks it; then the roles go as any others do, children first.
    let r = set_parent(&t, org, c, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(roles_in_a_cycle(&t, org).await, 0);
    let r = t.delete(&role_path(org, c), &t.admin_key).await;
    assert_error_says(&r, 409, "1 role(s) inherit from this role");
    for role in [d, c] {
        let r = t.delete(&role_path(org, role), &t.admin_key).await;
        assert_eq!(r.status, 204, "{}", r.body);
    }
}

#[tokio::test]
async fn a_chain_deeper_than_the_limit_left_by_an_older_release_can_only_get_shallower() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Old Depth").await;
    let n = MAX_INHERITANCE_DEPTH + 4;
    let mut roles = chain(&t, org, "old", 2).await;
    for i in 2..n {
        let id = Uuid::new_v4();
        let parent = *roles.last().unwrap();
        // An older release walked no further than it checked.
        let command = RoleCommand::Create {
            role_id: id,
            organization_id: org,
            name: format!("old-{i}"),
            description: String::new(),
            permissions: PermissionSet::new(),
            parent_role_id: Some(parent),
            parent_ancestry: vec![parent],
            built_in: false,
            grantable: PermissionSet::new(),
        };
        as_an_older_release(&t, org, id, command).await;
        roles.push(id);
    }
    let last = roles[n - 1];
    // It grants what it granted: the walks' guard is further than this chain.
    let r = t.get(&role_path(org, last), &t.admin_key).await;
    assert_eq!(effective(&r), ["users:read"], "{}", r.body);
    // Other changes pass; a parent that keeps it deeper than the limit does not.
    let r = t
        .patch(
            &role_path(org, last),
            &t.admin_key,
            json!({"name": "deepest"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let before = t.head().await;
    // Closer to the root, but with all below it still too deep.
    for (role, parent) in [(last, roles[n - 2]), (roles[2], roles[0])] {
        let r = set_parent(&t, org, role, Some(parent)).await;
        assert_error_says(&r, 422, "levels of ancestors");
    }
    assert_eq!(t.head().await, before);
    // Cut it into pieces that fit, and join them again within the limit.
    let middle = roles[n / 2];
    let r = set_parent(&t, org, middle, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = set_parent(&t, org, middle, Some(roles[0])).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t.get(&role_path(org, last), &t.admin_key).await;
    assert_eq!(effective(&r), ["users:read"], "{}", r.body);
}

#[tokio::test]
async fn a_role_change_waits_for_role_events_the_read_models_do_not_show() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Lagging").await;
    let parent = create_role(&t, org, "parent", None).await;
    t.stop_projection("roles").await;
    // A child the read models do not show yet: counting them alone, the parent has none.
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "unseen", "parent_role_id": parent}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let before = t.head().await;
    let r = t.delete(&role_path(org, parent), &t.admin_key).await;
    assert_error_says(&r, 503, "roles are being changed");
    assert_eq!(t.head().await, before);
    t.resume_projection("roles").await;
    let shown = || async {
        let r = t.get(&org_path(org, "/roles"), &t.admin_key).await;
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "unseen")
    };
    assert!(
        common::eventually(std::time::Duration::from_secs(10), shown).await,
        "roles shows the child once resumed"
    );
    let r = t.delete(&role_path(org, parent), &t.admin_key).await;
    assert_error_says(&r, 409, "1 role(s) inherit from this role");
    assert_eq!(orphans(&t, org).await, 0);
}

/// `r` is the refusal of a command decided on a role that changed before its append.
fn refused_as_stale(r: &common::Response) {
    assert_error_says(
        r,
        409,
        "the role changed while the command was being decided",
    );
}

/// An organization with a role granting `users:read`, an admin's key, a user, and the path
/// of that user's assignment of the role: (org, role, admin's key, user, path).
async fn helpdesk(t: &TestApp, org_name: &str) -> (Uuid, Uuid, String, Uuid, String) {
    let org = t.create_org(org_name).await;
    let role = t.create_role(org, "helpdesk", &["users:read"], None).await;
    let domain = org_name.to_lowercase();
    let (_, admin) = t
        .member_with_key(org, "admin", &format!("admin@{domain}.example"))
        .await;
    let user = t.invite(org, &format!("u@{domain}.example"), "U").await;
    let assignment = org_path(org, &format!("/users/{user}/roles/{role}"));
    (org, role, admin, user, assignment)
}

/// An assignment decided on what a role grants is refused (appending nothing) when the role
/// changes before it is appended: else the log would show an administrator giving a role
/// that by then granted the owner's powers they do not hold.
#[tokio::test]
async fn a_role_widened_while_it_is_being_assigned_is_not_assigned() {
    let t = TestApp::spawn().await;
    let (org, role, admin, user, assignment) = helpdesk(&t, "Widening").await;
    let owner = t.role_id(org, "owner").await;
    let put = (
        reqwest::Method::PUT,
        assignment.as_str(),
        admin.as_str(),
        Some(json!({})),
    );
    let (moved, assigned) =
        decided_before_appended(&t, set_parent(&t, org, role, Some(owner)), put).await;
    assert_eq!(moved.status, 200, "{}", moved.body);
    refused_as_stale(&assigned);
    let assignments = org_path(org, &format!("/users/{user}/roles"));
    let r = t.get(&assignments, &t.admin_key).await;
    assert_eq!(r.body["items"], json!([]), "{}", r.body);
    // Asked again, the admin is refused for what the role grants now.
    let r = t.put(&assignment, &admin, json!({})).await;
    common::assert_error(&r, 403);
}

/// Taking a role away is decided on what it grants too: one moved under the owner role
/// while an admin revokes it stays assigned.
#[tokio::test]
async fn a_role_widened_while_it_is_being_revoked_stays_assigned() {
    let t = TestApp::spawn().await;
    let (org, role, admin, user, assignment) = helpdesk(&t, "Keeping").await;
    t.assign(org, user, role).await;
    let owner = t.role_id(org, "owner").await;
    let delete = (
        reqwest::Method::DELETE,
        assignment.as_str(),
        admin.as_str(),
        None,
    );
    let (moved, revoked) =
        decided_before_appended(&t, set_parent(&t, org, role, Some(owner)), delete).await;
    assert_eq!(moved.status, 200, "{}", moved.body);
    refused_as_stale(&revoked);
    let assignments = org_path(org, &format!("/users/{user}/roles"));
    let r = t.get(&assignments, &t.admin_key).await;
    assert_eq!(r.body["items"][0]["role_id"], json!(role), "{}", r.body);
}

/// An assignment of a role deleted before it is appended is refused: it would be kept in
/// the user's record and `user_roles` for a role no list shows. Asked again, the role is
/// gone (404).
#[tokio::test]
async fn a_role_deleted_while_it_is_being_assigned_is_not_assigned() {
    let t = TestApp::spawn().await;
    let (org, role, _, user, assignment) = helpdesk(&t, "Vanishing").await;
    let put = (
        reqwest::Method::PUT,
        assignment.as_str(),
        t.admin_key.as_str(),
        Some(json!({})),
    );
    let role_at = role_path(org, role);
    let delete = t.delete(&role_at, &t.admin_key);
    let (deleted, assigned) = decided_before_appended(&t, delete, put).await;
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    refused_as_stale(&assigned);
    let assignments: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'User' AND aggregate_id = $1 \
           AND event_type = 'UserRoleAssigned'",
    )
    .bind(user.to_string())
    .fetch_one(t.pool())
    .await
    .unwrap();
    assert_eq!(assignments, 0);
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_roles ur WHERE NOT EXISTS \
           (SELECT 1 FROM roles r WHERE r.id = ur.role_id)",
    )
    .fetch_one(t.pool())
    .await
    .unwrap();
    assert_eq!(orphans, 0);
    let r = t.put(&assignment, &t.admin_key, json!({})).await;
    assert_error_says(&r, 404, "role");
}
