//! The lists that grow with a tenant (organizations, users, roles, a user's roles, API keys,
//! conversations) come in pages: walking them by `next_cursor` shows every item once, in
//! the order of one large page, the last page names no cursor, a cursor still works once
//! the row it came from is gone, and a limit out of range or a cursor the list did not give
//! is a 400.

mod common;

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use common::{assert_error, TestApp};
use futures::future::join_all;
use serde_json::{json, Value};
use uuid::Uuid;

/// The page size of every walk here: each list below holds more than two pages of it.
const PAGE: usize = 2;

fn org_path(org: Uuid, rest: &str) -> String {
    format!("/v1/organizations/{org}{rest}")
}

/// POSTs `body` to `path` with `key`: what was made (a 201).
async fn created(t: &TestApp, path: &str, key: &str, body: Value) -> Value {
    let r = t.post(path, key, body).await;
    assert_eq!(r.status, 201, "{path}: {}", r.body);
    r.body
}

/// The secret of a new service key of `org` labelled `label` with `permissions`.
async fn key_of(t: &TestApp, org: Uuid, label: &str, permissions: &[&str]) -> String {
    let body = json!({"label": label, "permissions": permissions});
    let key = created(t, &org_path(org, "/api-keys"), &t.admin_key, body).await;
    id(&key, "secret")
}

fn id(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
        .to_string()
}

fn time(v: &Value, field: &str) -> Option<DateTime<Utc>> {
    v[field].as_str().map(|s| s.parse().expect("a time"))
}

/// A new role of `org` named `name`: its id.
async fn role(t: &TestApp, org: Uuid, name: &str) -> Uuid {
    let body = json!({"name": name, "permissions": ["users:read"]});
    let role = created(t, &org_path(org, "/roles"), &t.admin_key, body).await;
    id(&role, "id").parse().unwrap()
}

/// Gives every row of `org` in `table` one creation time, as rows written in one commit
/// share: only the tie-break (the id) then orders them, so the test does not rest on how
/// the commits fell.
async fn one_creation_time(t: &TestApp, table: &str, org: Uuid) {
    sqlx::query(&format!(
        "UPDATE {table} SET created_at = (SELECT min(created_at) FROM {table} \
         WHERE organization_id = $1) WHERE organization_id = $1"
    ))
    .bind(org)
    .execute(t.pool())
    .await
    .unwrap();
}

fn items(body: &Value) -> Vec<Value> {
    body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("items in {body}"))
        .clone()
}

/// `list` at one page of `query`.
async fn page(t: &TestApp, list: &str, key: &str, query: &str) -> Value {
    let r = t.get(&format!("{list}?{query}"), key).await;
    assert_eq!(r.status, 200, "{list}?{query}: {}", r.body);
    assert!(
        r.body.get("next_cursor").is_some(),
        "a page names its next cursor, or null: {}",
        r.body
    );
    r.body
}

/// Every page of `list` from `cursor` (the start when `None`), [`PAGE`] at a time: each page
/// before the last is full and names a cursor, the last names none and is not empty.
async fn walk_from(t: &TestApp, list: &str, key: &str, mut cursor: Option<String>) -> Vec<Value> {
    let mut walked = Vec::new();
    loop {
        let query = match &cursor {
            None => format!("limit={PAGE}"),
            Some(c) => format!("limit={PAGE}&cursor={c}"),
        };
        let body = page(t, list, key, &query).await;
        let these = items(&body);
        walked.extend(these.iter().cloned());
        match body["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(these.len(), PAGE, "{list}: a page before the last is full");
                cursor = Some(next.to_string());
            }
            None => {
                assert!(body["next_cursor"].is_null(), "{body}");
                assert!(
                    !these.is_empty() || walked.is_empty(),
                    "{list}: the page before named a cursor, yet nothing follows"
                );
                return walked;
            }
        }
        assert!(walked.len() < 1000, "{list}: the walk does not end");
    }
}

/// What every paged list does, at `list` read with `key`, whose items `field` tells apart:
/// the walk is exactly one large page (each item once, in its order), which is also what
/// the list answers with no query at all; bad limits and cursors are refused. Answers the
/// items in order.
async fn pages_through(t: &TestApp, list: &str, key: &str, field: &str) -> Vec<Value> {
    let whole = page(t, list, key, "limit=500").await;
    assert!(whole["next_cursor"].is_null(), "{whole}");
    let whole = items(&whole);
    assert!(
        whole.len() > 2 * PAGE,
        "{list}: more than two pages to walk, {} items",
        whole.len()
    );
    // The default page is larger than these lists: it is the whole list, as before paging.
    let r = t.get(list, key).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(items(&r.body), whole, "{list}: the default first page");
    assert!(r.body["next_cursor"].is_null());

    let walked = walk_from(t, list, key, None).await;
    let ids: Vec<String> = walked.iter().map(|v| id(v, field)).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "{list}: an item shown twice: {ids:?}"
    );
    assert_eq!(walked, whole, "{list}: the walk and one large page differ");
    // A page that holds exactly the rest is the last: no cursor to an empty page.
    let exact = page(t, list, key, &format!("limit={}", whole.len())).await;
    assert_eq!(items(&exact), whole);
    assert!(exact["next_cursor"].is_null(), "{list}: {exact}");

    for limit in ["0", "501", "-1"] {
        let r = t.get(&format!("{list}?limit={limit}"), key).await;
        assert_error(&r, 400);
        assert_eq!(
            r.body["error"]["message"], "limit must be between 1 and 500",
            "{list}?limit={limit}"
        );
    }
    let r = t.get(&format!("{list}?limit=x"), key).await;
    assert_error(&r, 400);
    // Not base64, base64 of no JSON ("not json"), a cursor cut short, an empty one.
    let first = page(t, list, key, "limit=1").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    for bad in [
        "not a cursor!",
        "bm90IGpzb24",
        &cursor[..cursor.len() - 3],
        "",
    ] {
        let r = t.get(&format!("{list}?cursor={bad}"), key).await;
        assert_error(&r, 400);
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("cursor is malformed"),
            "{list}?cursor={bad}: {message}"
        );
    }
    whole
}

/// Asserts `items` are in ascending order of (`time`, `tie`).
fn assert_ascending(items: &[Value], time_field: &str, tie: &str) {
    let keys: Vec<(Option<DateTime<Utc>>, String)> = items
        .iter()
        .map(|v| (time(v, time_field), id(v, tie)))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "in order of ({time_field}, {tie})");
}

#[tokio::test]
async fn organizations_come_in_pages_oldest_first() {
    let t = TestApp::spawn().await;
    let mut orgs = Vec::new();
    for name in ["Acme", "Globex", "Initech", "Umbrella", "Hooli"] {
        orgs.push(t.create_org(name).await);
    }
    let all = pages_through(&t, "/v1/organizations", &t.admin_key, "id").await;
    assert_ascending(&all, "created_at", "id");
    let ids: Vec<String> = all.iter().map(|o| id(o, "id")).collect();
    let made: Vec<String> = orgs.iter().map(Uuid::to_string).collect();
    assert_eq!(ids, made, "created one after the other, listed so");

    // A tenant key's list is its own organization: one page, whatever the limit.
    let tenant = key_of(&t, orgs[2], "reader", &["organizations:read"]).await;
    let own = page(&t, "/v1/organizations", &tenant, "limit=1").await;
    assert_eq!(items(&own).len(), 1);
    assert_eq!(own["items"][0]["id"], json!(orgs[2]));
    assert!(own["next_cursor"].is_null());
}

#[tokio::test]
async fn users_come_in_pages_oldest_first() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    // Invited at once, several may land in one commit and share a creation time: the id
    // orders them.
    let emails: Vec<String> = (0..7).map(|i| format!("user{i}@acme.example")).collect();
    join_all(emails.iter().map(|e| t.invite(org, e, "Someone"))).await;
    one_creation_time(&t, "users", org).await;
    let all = pages_through(&t, &org_path(org, "/users"), &t.admin_key, "id").await;
    assert_eq!(all.len(), 7);
    assert_ascending(&all, "created_at", "id");
    assert!(
        all.iter().all(|u| u["email"].is_string()),
        "opened on every page"
    );
}

#[tokio::test]
async fn api_keys_come_in_pages_oldest_first() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let path = org_path(org, "/api-keys");
    let labels: Vec<String> = (0..7).map(|i| format!("key {i}")).collect();
    join_all(labels.iter().map(|l| key_of(&t, org, l, &["users:read"]))).await;
    one_creation_time(&t, "api_keys", org).await;
    let all = pages_through(&t, &path, &t.admin_key, "id").await;
    assert_eq!(all.len(), 7);
    assert_ascending(&all, "created_at", "id");
}

#[tokio::test]
async fn roles_come_in_pages_oldest_first_and_a_cursor_outlives_its_role() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let path = org_path(org, "/roles");
    for name in ["zulu", "alpha", "mike", "bravo"] {
        role(&t, org, name).await;
    }
    let all = pages_through(&t, &path, &t.admin_key, "id").await;
    assert_eq!(all.len(), 8, "four built-in roles and four made");
    assert_ascending(&all, "created_at", "name");
    let names: Vec<String> = all[4..].iter().map(|r| id(r, "name")).collect();
    assert_eq!(names, ["zulu", "alpha", "mike", "bravo"]);

    // The first page ends at "alpha", which is then deleted: its cursor still goes on
    // from where it stood.
    let first = page(&t, &path, &t.admin_key, "limit=6").await;
    assert_eq!(first["items"][5]["name"], "alpha");
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    let r = t
        .delete(&format!("{path}/{}", id(&all[5], "id")), &t.admin_key)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let rest = walk_from(&t, &path, &t.admin_key, Some(cursor)).await;
    assert_eq!(
        rest,
        all[6..].to_vec(),
        "the roles after the deleted one, once each"
    );
}

#[tokio::test]
async fn a_users_roles_come_in_pages_by_name() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let user = t.invite(org, "ada@acme.example", "Ada").await;
    for name in ["echo", "alpha", "delta", "bravo", "charlie"] {
        t.assign(org, user, role(&t, org, name).await).await;
    }
    let list = org_path(org, &format!("/users/{user}/roles"));
    let all = pages_through(&t, &list, &t.admin_key, "role_id").await;
    let names: Vec<String> = all.iter().map(|a| id(a, "role_name")).collect();
    assert_eq!(names, ["alpha", "bravo", "charlie", "delta", "echo"]);
}

/// A user key lists its own conversations, a service key all of the organization's, each
/// in the same order: most recently active first, then those without a message, newest
/// first, ties by id.
#[tokio::test]
async fn conversations_come_in_pages_most_recently_active_first() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Chat Co").await;
    let (_, alice) = t.member_with_key(org, "member", "alice@chat.example").await;
    let (bob, _) = t.member_with_key(org, "member", "bob@chat.example").await;
    let service = key_of(&t, org, "bot", &["conversations:read"]).await;
    let list = org_path(org, "/conversations");
    // Created at once, several may share a creation time: the id orders them.
    let made: Vec<String> = join_all((0..7).map(|i| {
        let body = json!({"kind": "group", "title": format!("group {i}"), "participants": [bob]});
        created(&t, &list, &alice, body)
    }))
    .await
    .iter()
    .map(|c| id(c, "id"))
    .collect();
    let say = |conversation: &String, text: &str| {
        let path = format!("{list}/{conversation}/messages");
        let body = json!({"content": text});
        let (t, alice) = (&t, &alice);
        async move {
            created(t, &path, alice, body).await;
        }
    };
    one_creation_time(&t, "conversations", org).await;
    // Activity in 1, then 4, then 2: those three first, the newest message first.
    for i in [1, 4, 2] {
        say(&made[i], "hello").await;
    }
    let mut order = Vec::new();
    for key in [&alice, &service] {
        let all = pages_through(&t, &list, key, "id").await;
        let mut sorted = all.clone();
        sorted.sort_by(|a, b| {
            time(b, "last_message_at")
                .cmp(&time(a, "last_message_at"))
                .then(time(b, "created_at").cmp(&time(a, "created_at")))
                .then(id(a, "id").cmp(&id(b, "id")))
        });
        assert_eq!(all, sorted, "most recently active first");
        order = all.iter().map(|c| id(c, "id")).collect::<Vec<_>>();
        assert_eq!(
            order[..3],
            [&made[2], &made[4], &made[1]].map(String::clone)
        );
    }

    // While a client pages, a message moves its conversation ahead of the cursor: one
    // already shown (the third) is not shown again, one not shown yet (the sixth) is left
    // out of the rest of this walk (a fresh first page shows both); the others follow as
    // they were.
    let first = page(&t, &list, &alice, "limit=3").await;
    let shown: Vec<String> = items(&first).iter().map(|c| id(c, "id")).collect();
    assert_eq!(shown, order[..3]);
    let (seen, unseen) = (order[2].clone(), order[5].clone());
    say(&unseen, "again").await;
    say(&seen, "again").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    let rest = walk_from(&t, &list, &alice, Some(cursor)).await;
    let rest: Vec<String> = rest.iter().map(|c| id(c, "id")).collect();
    assert_eq!(rest, [&order[3], &order[4], &order[6]].map(String::clone));
    let fresh = page(&t, &list, &alice, "limit=2").await;
    let fresh: Vec<String> = items(&fresh).iter().map(|c| id(c, "id")).collect();
    assert_eq!(fresh, [seen, unseen]);
}

/// Each list's cursor is its own: one list's, given to another, is refused rather than
/// read as a place in it.
#[tokio::test]
async fn a_cursor_works_only_for_its_own_list() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    for i in 0..2 {
        t.invite(org, &format!("u{i}@acme.example"), "Someone")
            .await;
        key_of(&t, org, &format!("key {i}"), &["users:read"]).await;
    }
    let users = page(&t, &org_path(org, "/users"), &t.admin_key, "limit=1").await;
    let cursor = users["next_cursor"].as_str().unwrap();
    let r = t
        .get(
            &org_path(org, &format!("/api-keys?cursor={cursor}")),
            &t.admin_key,
        )
        .await;
    assert_error(&r, 400);
    let r = t
        .get(
            &org_path(org, &format!("/users?cursor={cursor}")),
            &t.admin_key,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(items(&r.body).len(), 1);
}
