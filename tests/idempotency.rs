//! `Idempotency-Key`: a command sent again with the key of one already carried out gets its
//! answer again and appends nothing; the key is the API key's own; another request under it is
//! a 422, one still running a 409; failures let the key go unless the log shows an effect; a
//! key's secret is never kept. And a name, slug or address that is taken names its holder to a
//! caller who may read it, never across tenants.

mod common;

use common::{
    answer, assert_error, assert_error_says, hold_on_4242, waits_on_4242, Response, TestApp,
};
use ledgerline::app::Actor;
use ledgerline_aggregates::user::UserCommand;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

/// `method path` with `key` and, if given, the `Idempotency-Key` header `idem` (raw bytes).
async fn send(
    t: &TestApp,
    method: Method,
    path: &str,
    key: &str,
    idem: Option<&[u8]>,
    body: Option<Value>,
) -> Response {
    let mut req = t
        .client
        .request(method, format!("{}{path}", t.base))
        .bearer_auth(key);
    if let Some(idem) = idem {
        req = req.header(
            "Idempotency-Key",
            reqwest::header::HeaderValue::from_bytes(idem).unwrap(),
        );
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    answer(req).await
}

async fn post(t: &TestApp, path: &str, key: &str, idem: &str, body: Value) -> Response {
    send(
        t,
        Method::POST,
        path,
        key,
        Some(idem.as_bytes()),
        Some(body),
    )
    .await
}

/// A POST without a body, as the platform operator, under the idempotency key `idem`.
async fn bare(t: &TestApp, path: &str, idem: &str) -> Response {
    send(
        t,
        Method::POST,
        path,
        &t.admin_key,
        Some(idem.as_bytes()),
        None,
    )
    .await
}

/// Invites `email` into `org` with `key`, under the idempotency key `idem`.
async fn invite(t: &TestApp, org: Uuid, key: &str, idem: &str, email: &str) -> Response {
    let body = json!({"email": email, "full_name": "Someone"});
    post(t, &org_path(org, "/users"), key, idem, body).await
}

fn replayed(r: &Response) -> bool {
    r.headers
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

fn org_path(org: Uuid, rest: &str) -> String {
    format!("/v1/organizations/{org}{rest}")
}

#[tokio::test]
async fn a_retried_invite_is_answered_again_and_invites_once() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let users = org_path(org, "/users");
    let first = invite(&t, org, &t.admin_key, "invite-ada-1", "ada@example.com").await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(!replayed(&first), "the first answer is no replay");
    let head = t.head().await;

    let again = invite(&t, org, &t.admin_key, "invite-ada-1", "ada@example.com").await;
    assert_eq!(again.status, 201, "{}", again.body);
    assert!(replayed(&again), "{:?}", again.headers);
    assert_eq!(again.body, first.body, "the same answer, the same id");
    assert_eq!(t.head().await, head, "the retry appended nothing");
    let list = t.get(&users, &t.admin_key).await;
    assert_eq!(
        list.body["items"].as_array().unwrap().len(),
        1,
        "{}",
        list.body
    );

    // Without the header, the same request is carried out again (and the address is taken).
    let ada = json!({"email": "ada@example.com", "full_name": "Someone"});
    let without = t.post(&users, &t.admin_key, ada).await;
    assert_error(&without, 409);
}

#[tokio::test]
async fn a_retried_message_is_posted_once() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let (_, ada_key) = t.member_with_key(org, "member", "ada@example.com").await;
    let bob = t.invite(org, "bob@example.com", "Bob").await;
    let conv = t
        .post(
            &org_path(org, "/conversations"),
            &ada_key,
            json!({"kind": "direct", "participants": [bob]}),
        )
        .await;
    assert_eq!(conv.status, 201, "{}", conv.body);
    let messages = org_path(
        org,
        &format!(
            "/conversations/{}/messages",
            conv.body["id"].as_str().unwrap()
        ),
    );
    let hello = json!({"content": "Hello Bob"});
    let first = post(&t, &messages, &ada_key, "msg-1", hello.clone()).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let head = t.head().await;
    let again = post(&t, &messages, &ada_key, "msg-1", hello).await;
    assert_eq!(again.status, 201, "{}", again.body);
    assert!(replayed(&again));
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(again.body["content"], "Hello Bob");
    assert_eq!(t.head().await, head, "one message, one event");
    let page = t.get(&messages, &ada_key).await;
    assert_eq!(
        page.body["items"].as_array().unwrap().len(),
        1,
        "{}",
        page.body
    );
}

/// What the table keeps for `idem` of the API key that used it, opened as a replay would.
async fn kept_answer(t: &TestApp, idem: &str) -> Option<String> {
    let (api_key, sealed): (Uuid, Option<Vec<u8>>) =
        sqlx::query_as("SELECT api_key_id, body FROM idempotency_keys WHERE key = $1")
            .bind(idem)
            .fetch_one(t.pool())
            .await
            .unwrap();
    let binding = [api_key.as_bytes().as_slice(), idem.as_bytes()].concat();
    sealed
        .map(|s| String::from_utf8(t.app.vault.open_answer(&binding, &s).expect("opens")).unwrap())
}

#[tokio::test]
async fn a_retried_key_issue_issues_one_key_and_never_keeps_its_secret() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let keys = org_path(org, "/api-keys");
    let body = json!({"label": "ci", "permissions": ["users:read"]});
    let first = post(&t, &keys, &t.admin_key, "issue-1", body.clone()).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let id = first.body["id"].as_str().unwrap().to_string();
    let secret = first.body["secret"].as_str().unwrap().to_string();
    let head = t.head().await;

    let again = post(&t, &keys, &t.admin_key, "issue-1", body).await;
    assert_error_says(&again, 409, &format!("issued API key {id}"));
    assert_error_says(&again, 409, "rotate");
    assert!(replayed(&again));
    assert_eq!(t.head().await, head, "no second key");
    let list = t.get(&keys, &t.admin_key).await;
    assert_eq!(
        list.body["items"].as_array().unwrap().len(),
        1,
        "{}",
        list.body
    );
    let kept = kept_answer(&t, "issue-1").await.expect("an answer is kept");
    assert!(!kept.contains(&secret), "the secret is not kept: {kept}");
    assert!(kept.contains(&id), "{kept}");

    // A rotation alike: its new secret is shown once.
    let rotate = org_path(org, &format!("/api-keys/{id}/rotate"));
    let first = bare(&t, &rotate, "rot-1").await;
    assert_eq!(first.status, 200, "{}", first.body);
    let secret = first.body["secret"].as_str().unwrap().to_string();
    let head = t.head().await;
    let again = bare(&t, &rotate, "rot-1").await;
    assert_error_says(&again, 409, &format!("gave API key {id} a new secret"));
    assert_eq!(t.head().await, head, "rotated once");
    let kept = kept_answer(&t, "rot-1").await.unwrap();
    assert!(!kept.contains(&secret), "{kept}");
    // The secret the first rotation gave works.
    assert_eq!(t.get("/v1/me", &secret).await.status, 200);
}

#[tokio::test]
async fn another_request_under_the_same_key_is_422_and_changes_nothing() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let users = org_path(org, "/users");
    let first = invite(&t, org, &t.admin_key, "k", "ada@example.com").await;
    assert_eq!(first.status, 201, "{}", first.body);
    let head = t.head().await;
    let other_body = invite(&t, org, &t.admin_key, "k", "bob@example.com").await;
    assert_error_says(
        &other_body,
        422,
        "the same method and path with another body",
    );
    assert!(!replayed(&other_body));
    let other_path = post(
        &t,
        &org_path(org, "/roles"),
        &t.admin_key,
        "k",
        json!({"name": "ops"}),
    )
    .await;
    assert_error_says(&other_path, 422, &format!("POST {users}"));
    assert_eq!(t.head().await, head, "neither was carried out");
}

#[tokio::test]
async fn another_api_keys_same_idempotency_key_is_its_own() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let (_, admin) = t.member_with_key(org, "admin", "root@example.com").await;
    let a = invite(&t, org, &t.admin_key, "same", "ada@example.com").await;
    assert_eq!(a.status, 201, "{}", a.body);
    // Another API key, the same idempotency key: not a mismatch, not a replay, its own request.
    let b = invite(&t, org, &admin, "same", "bob@example.com").await;
    assert_eq!(b.status, 201, "{}", b.body);
    assert!(!replayed(&b));
    assert_ne!(a.body["id"], b.body["id"]);
    // And each replays its own.
    let b2 = invite(&t, org, &admin, "same", "bob@example.com").await;
    assert!(replayed(&b2));
    assert_eq!(b2.body["id"], b.body["id"]);
}

#[tokio::test]
async fn a_request_still_running_is_409_and_a_lost_one_names_its_request_id() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let first = invite(&t, org, &t.admin_key, "slow", "ada@example.com").await;
    assert_eq!(first.status, 201, "{}", first.body);
    // As it was while it ran: taken, no answer yet.
    sqlx::query(
        "UPDATE idempotency_keys SET state = 'running', status = NULL, body = NULL \
         WHERE key = 'slow'",
    )
    .execute(t.pool())
    .await
    .unwrap();
    let head = t.head().await;
    let r = invite(&t, org, &t.admin_key, "slow", "ada@example.com").await;
    assert_error_says(
        &r,
        409,
        "a request with this Idempotency-Key is in progress",
    );
    assert_error_says(&r, 409, "retry later");
    // Another request under it is still a 422.
    let other = invite(&t, org, &t.admin_key, "slow", "bob@example.com").await;
    assert_error(&other, 422);

    // Its server stopped before keeping the answer: after a while the outcome is not known,
    // and the answer names the request id its events carry, which the audit view finds.
    sqlx::query(
        "UPDATE idempotency_keys SET created_at = now() - interval '10 minutes' WHERE key = 'slow'",
    )
    .execute(t.pool())
    .await
    .unwrap();
    let (request_id,): (String,) =
        sqlx::query_as("SELECT request_id FROM idempotency_keys WHERE key = 'slow'")
            .fetch_one(t.pool())
            .await
            .unwrap();
    let r = invite(&t, org, &t.admin_key, "slow", "ada@example.com").await;
    assert_error_says(&r, 409, "whether it took effect is not known");
    assert_error_says(&r, 409, &format!("audit-events?request_id={request_id}"));
    assert_eq!(t.head().await, head, "nothing was carried out again");
    let audit = t
        .get(
            &org_path(org, &format!("/audit-events?request_id={request_id}")),
            &t.admin_key,
        )
        .await;
    assert_eq!(audit.status, 200, "{}", audit.body);
    let events: Vec<&str> = audit.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["UserInvited"], "{}", audit.body);
}

/// Makes every statement that fires trigger `name` (`when`: `BEFORE INSERT ON table`) fail.
async fn fail(t: &TestApp, name: &str, when: &str) {
    for s in [
        format!(
            "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
        ),
        format!("CREATE TRIGGER {name} {when} FOR EACH ROW EXECUTE FUNCTION {name}()"),
    ] {
        sqlx::query(&s).execute(t.pool()).await.unwrap();
    }
}

#[tokio::test]
async fn a_failure_lets_the_key_go_and_a_retry_runs_again() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let users = org_path(org, "/users");
    // The invite's data key cannot be stored: a 500 before anything is appended.
    fail(&t, "refuse_keys", "BEFORE INSERT ON subject_keys").await;
    let ada = json!({"email": "ada@example.com", "full_name": "Ada"});
    let head = t.head().await;
    let failed = post(&t, &users, &t.admin_key, "retry-me", ada.clone()).await;
    assert_error(&failed, 500);
    assert_eq!(t.head().await, head);
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(t.pool())
        .await
        .unwrap();
    assert_eq!(kept, 0, "a failure is not kept");
    sqlx::query("DROP TRIGGER refuse_keys ON subject_keys")
        .execute(t.pool())
        .await
        .unwrap();
    let retry = post(&t, &users, &t.admin_key, "retry-me", ada).await;
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert!(!replayed(&retry), "it ran again");
}

#[tokio::test]
async fn a_failure_after_the_commit_is_not_carried_out_again() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let ada = t.invite(org, "ada@example.com", "Ada").await;
    // The erasure is appended, then destroying the user's key fails: a 500 after the commit.
    fail(&t, "keep_keys", "BEFORE DELETE ON subject_keys").await;
    let erase = org_path(org, &format!("/users/{ada}/erase"));
    let failed = bare(&t, &erase, "erase-1").await;
    assert_error(&failed, 500);
    let head = t.head().await;
    let again = bare(&t, &erase, "erase-1").await;
    assert_error_says(&again, 409, "took effect");
    assert_error_says(&again, 409, &format!("UserErased of User {ada}"));
    assert_error_says(&again, 409, "answered 500");
    assert!(replayed(&again));
    assert_eq!(t.head().await, head);
}

#[tokio::test]
async fn an_invalid_key_is_400_and_changes_nothing() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let users = org_path(org, "/users");
    let head = t.head().await;
    let long = vec![b'k'; 256];
    for bad in [&b""[..], &long, b"caf\xc3\xa9", b"a\tb"] {
        let r = send(
            &t,
            Method::POST,
            &users,
            &t.admin_key,
            Some(bad),
            Some(json!({"email": "ada@example.com", "full_name": "Ada"})),
        )
        .await;
        assert_error_says(&r, 400, "Idempotency-Key must be 1 to 255 printable ASCII");
    }
    // Two of them.
    let r = t
        .client
        .post(format!("{}{users}", t.base))
        .bearer_auth(&t.admin_key)
        .header("Idempotency-Key", "a")
        .header("Idempotency-Key", "b")
        .json(&json!({"email": "ada@example.com", "full_name": "Ada"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(t.head().await, head, "nothing was carried out");
    // The longest key is taken; a read ignores the header.
    let r = send(
        &t,
        Method::POST,
        &users,
        &t.admin_key,
        Some(&[b'k'; 255]),
        Some(json!({"email": "ada@example.com", "full_name": "Ada"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = send(&t, Method::GET, &users, &t.admin_key, Some(b""), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // An unauthenticated request learns nothing of keys: 401 first.
    let r = send(&t, Method::POST, &users, "nope", Some(b""), Some(json!({}))).await;
    assert_error(&r, 401);
}

#[tokio::test]
async fn a_patch_is_answered_again_rather_than_refused_as_changing_nothing() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let ada = t.invite(org, "ada@example.com", "Ada").await;
    let path = org_path(org, &format!("/users/{ada}"));
    let rename = json!({"full_name": "Ada King"});
    let patch = || {
        let body = Some(rename.clone());
        send(&t, Method::PATCH, &path, &t.admin_key, Some(b"p"), body)
    };
    let first = patch().await;
    assert_eq!(first.status, 200, "{}", first.body);
    let head = t.head().await;
    let again = patch().await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(replayed(&again));
    assert_eq!(again.body, first.body);
    assert_eq!(t.head().await, head);
    // Without the key: "already so".
    assert_error(&t.patch(&path, &t.admin_key, rename).await, 422);
}

#[tokio::test]
async fn an_erasure_forgets_the_answers_that_showed_the_user() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let first = invite(&t, org, &t.admin_key, "inv", "ada@example.com").await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(kept_answer(&t, "inv")
        .await
        .unwrap()
        .contains("ada@example.com"));
    let id = first.body["id"].as_str().unwrap();
    let r = t
        .post(
            &org_path(org, &format!("/users/{id}/erase")),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(kept_answer(&t, "inv").await, None, "forgotten");
    let head = t.head().await;
    let again = invite(&t, org, &t.admin_key, "inv", "ada@example.com").await;
    assert_error_says(&again, 409, "no longer kept");
    assert!(replayed(&again));
    assert_eq!(t.head().await, head, "not invited again");
}

/// Makes keeping an answer (`running` becoming `done`) wait for advisory lock 4242, which the
/// connection returned holds.
async fn hold_keeping(t: &TestApp) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    hold_on_4242(
        t,
        "BEFORE UPDATE ON idempotency_keys FOR EACH ROW \
         WHEN (OLD.state = 'running' AND NEW.state = 'done')",
    )
    .await
}

/// Ada in Acme, with keeping an answer held on lock 4242 (see [`hold_keeping`]), for a keyed
/// rename of her to be kept only once the test releases it.
struct Held {
    t: TestApp,
    org: Uuid,
    ada: Uuid,
    path: String,
}

impl Held {
    async fn new() -> (Self, sqlx::pool::PoolConnection<sqlx::Postgres>) {
        let t = TestApp::spawn().await;
        let org = t.create_org("Acme").await;
        let ada = t.invite(org, "ada@example.com", "Ada").await;
        let holder = hold_keeping(&t).await;
        let path = org_path(org, &format!("/users/{ada}"));
        (Held { t, org, ada, path }, holder)
    }

    async fn rename(&self) -> Response {
        let body = Some(json!({"full_name": "Ada King"}));
        let key = &self.t.admin_key;
        send(
            &self.t,
            Method::PATCH,
            &self.path,
            key,
            Some(b"rename"),
            body,
        )
        .await
    }
}

/// An answer read before an erasure of the user it shows, and kept only after the erasure
/// forgot the answers naming them (the request slow to settle: its keeping held on a lock the
/// test holds), is not kept with what it showed of them.
#[tokio::test]
async fn an_answer_kept_after_an_erasure_of_who_it_shows_is_forgotten() {
    let (h, mut holder) = Held::new().await;
    let (t, path) = (&h.t, &h.path);
    let rename = || h.rename();
    let erase = async {
        let kept_waits = || waits_on_4242(t, true);
        assert!(common::eventually(std::time::Duration::from_secs(30), kept_waits).await);
        let erase_path = format!("{path}/erase");
        let erase = t.post(&erase_path, &t.admin_key, json!({}));
        tokio::pin!(erase);
        // The erasure runs until it is done, or until it waits for the answer being kept.
        let erased = tokio::select! {
            erased = &mut erase => Some(erased),
            _ = async {
                while !waits_on_4242(t, false).await {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            } => None,
        };
        sqlx::query("SELECT pg_advisory_unlock(4242)")
            .execute(&mut *holder)
            .await
            .unwrap();
        match erased {
            Some(erased) => erased,
            None => erase.await,
        }
    };
    let (patched, erased) = tokio::join!(rename(), erase);
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert!(
        patched.body.to_string().contains("Ada King"),
        "{}",
        patched.body
    );
    assert_eq!(erased.status, 200, "{}", erased.body);
    assert_eq!(kept_answer(t, "rename").await, None, "forgotten");
    assert_error_says(&rename().await, 409, "no longer kept");
}

/// An erasure whose request stopped right after its append (a crash) never forgot the answers
/// itself: the users projection does, in the transaction that destroys the key.
#[tokio::test]
async fn an_erasure_cut_off_before_it_forgot_the_answers_still_forgets_them() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let first = invite(&t, org, &t.admin_key, "inv", "ada@example.com").await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(kept_answer(&t, "inv").await.is_some());
    let ada: Uuid = first.body["id"].as_str().unwrap().parse().unwrap();
    erase_cut_off(&t, org, ada).await;
    t.app.await_projections().await;
    assert_eq!(kept_answer(&t, "inv").await, None, "forgotten");
}

/// The same, when the request that erased stopped right after its append: the projection
/// that destroys the key marks the requests still running, as the erasing request would
/// have, so that one that read the user before cannot keep what it showed of them.
#[tokio::test]
async fn an_answer_kept_after_a_cut_off_erasure_of_who_it_shows_is_forgotten() {
    let (h, mut holder) = Held::new().await;
    let (t, org, ada) = (&h.t, h.org, h.ada);
    let rename = || h.rename();
    let erase = async {
        let kept_waits = || waits_on_4242(t, true);
        assert!(common::eventually(std::time::Duration::from_secs(30), kept_waits).await);
        erase_cut_off(t, org, ada).await;
        let erased = t.head().await;
        // Until the users projection is past the erasure, or waits for the rename's row.
        let settled = || async {
            let reached: i64 = sqlx::query_scalar(
                "SELECT position FROM projection_checkpoints WHERE name = 'users'",
            )
            .fetch_one(t.pool())
            .await
            .unwrap();
            reached >= erased || waits_on_4242(t, false).await
        };
        assert!(common::eventually(std::time::Duration::from_secs(30), settled).await);
        sqlx::query("SELECT pg_advisory_unlock(4242)")
            .execute(&mut *holder)
            .await
            .unwrap();
    };
    let (patched, ()) = tokio::join!(rename(), erase);
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert!(
        patched.body.to_string().contains("Ada King"),
        "{}",
        patched.body
    );
    t.app.await_projections().await;
    assert_eq!(kept_answer(t, "rename").await, None, "forgotten");
    assert_error_says(&rename().await, 409, "no longer kept");
}

/// Erases `ada` as a request that stopped right after its append would have: the command
/// alone, none of the handler's own forgetting.
async fn erase_cut_off(t: &TestApp, org: Uuid, ada: Uuid) {
    let by = Actor {
        kind: "api_key".into(),
        request_id: Uuid::new_v4().to_string(),
        ..Actor::default()
    };
    t.app
        .execute(&t.app.cqrs.users, ada, Some(org), &by, UserCommand::Erase)
        .await
        .unwrap();
}

/// The erasure's own answer is read once the key is gone: its forgetting leaves it kept, and
/// a retry is answered with it again, also after the erasure is applied again (a check or a
/// rebuild of the users projection).
#[tokio::test]
async fn a_keyed_erasure_is_answered_again() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let ada = t.invite(org, "ada@example.com", "Ada").await;
    let erase = org_path(org, &format!("/users/{ada}/erase"));
    let first = bare(&t, &erase, "erase-ada").await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(!first.body.to_string().contains("ada@example.com"));
    let head = t.head().await;
    let (code, out, err) = common::ledgerline(&t.db.url, &["projections", "check", "users"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let again = bare(&t, &erase, "erase-ada").await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(replayed(&again));
    assert_eq!(again.body, first.body);
    assert_eq!(t.head().await, head);
    // The replay gives back the first request's id, by which its events are found.
    let id = &first.headers["x-request-id"];
    assert_eq!(&again.headers["x-request-id"], id);
    let path = org_path(
        org,
        &format!("/audit-events?request_id={}", id.to_str().unwrap()),
    );
    let found = t.get(&path, &t.admin_key).await;
    assert_eq!(
        found.body["items"][0]["event_type"], "UserErased",
        "{}",
        found.body
    );
}

/// A client may send one `x-request-id` with many requests: a keyed request that failed is
/// not taken for one that took effect because another request with that id appended while it
/// ran (it waited for its organization's turn, which the test held).
#[tokio::test]
async fn a_failure_is_not_taken_for_another_requests_effect_under_the_same_request_id() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let owner_role = t.role_id(org, "owner").await;
    let (owner, _) = t.member_with_key(org, "owner", "owner@acme.example").await;
    let mut turn = t.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || $2, 0))")
        .bind("ledgerline owners ")
        .bind(org.to_string())
        .execute(&mut *turn)
        .await
        .unwrap();
    let request = |method: Method, path: String| {
        t.client
            .request(method, format!("{}{path}", t.base))
            .bearer_auth(&t.admin_key)
            .header("x-request-id", "one-id-for-all")
    };
    // Taking the only owner's role away: refused, once it has its turn.
    let revoke = org_path(org, &format!("/users/{owner}/roles/{owner_role}"));
    let refused =
        answer(request(Method::DELETE, revoke.clone()).header("Idempotency-Key", "revoke"));
    let other = async {
        let waiting = || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(t.pool())
            .await
            .unwrap()
                > 0
        };
        assert!(common::eventually(std::time::Duration::from_secs(30), waiting).await);
        let invited = answer(
            request(Method::POST, org_path(org, "/users"))
                .json(&json!({"email": "bea@acme.example", "full_name": "Bea"})),
        )
        .await;
        turn.rollback().await.unwrap();
        invited
    };
    let (refused, invited) = tokio::join!(refused, other);
    assert_eq!(invited.status, 201, "{}", invited.body);
    assert_error_says(&refused, 409, "without an active owner");
    // The key was let go, as the request appended nothing: a retry runs again.
    let retry = answer(request(Method::DELETE, revoke).header("Idempotency-Key", "revoke")).await;
    assert!(!replayed(&retry), "{}", retry.body);
    assert_error_says(&retry, 409, "without an active owner");
}

#[tokio::test]
async fn an_expired_key_is_free_again_and_pruned() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let first = invite(&t, org, &t.admin_key, "old", "ada@example.com").await;
    assert_eq!(first.status, 201, "{}", first.body);
    let expire = "UPDATE idempotency_keys SET created_at = now() - interval '25 hours'";
    sqlx::query(expire).execute(t.pool()).await.unwrap();
    // Another request under the expired key: carried out, not a 422.
    let bob = invite(&t, org, &t.admin_key, "old", "bob@example.com").await;
    assert_eq!(bob.status, 201, "{}", bob.body);
    assert!(!replayed(&bob));
    assert_eq!(
        ledgerline::api::idempotency::prune(t.pool()).await.unwrap(),
        0,
        "the row was taken over"
    );
    sqlx::query(expire).execute(t.pool()).await.unwrap();
    // Pruned: by this call, or by the one a keyed request starts now and then on a task of
    // its own (bob's may be this process's first), which can come to it first.
    let pruned = ledgerline::api::idempotency::prune(t.pool()).await.unwrap();
    assert!(pruned <= 1, "{pruned}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(t.pool())
        .await
        .unwrap();
    assert_eq!(left, 0, "the expired row is gone");
}

// ---------------------------------------------------------------------------------------
// A name, slug or address that is taken names its holder, to whoever may read it.

#[tokio::test]
async fn a_taken_address_or_role_name_names_its_holder_within_the_tenant() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let ada = t.invite(org, "ada@example.com", "Ada").await;
    let bob = t.invite(org, "bob@example.com", "Bob").await;
    let roles = org_path(org, "/roles");
    let support = t
        .post(&roles, &t.admin_key, json!({"name": "support"}))
        .await;
    let support = support.body["id"].as_str().unwrap().to_string();
    let ops = t.post(&roles, &t.admin_key, json!({"name": "ops"})).await;
    let ops = ops.body["id"].as_str().unwrap().to_string();
    let issue = |permissions: Value| {
        let t = &t;
        async move {
            let body = json!({"label": "svc", "permissions": permissions});
            let r = t
                .post(&org_path(org, "/api-keys"), &t.admin_key, body)
                .await;
            assert_eq!(r.status, 201, "{}", r.body);
            r.body["secret"].as_str().unwrap().to_string()
        }
    };
    let writer = issue(json!(["users:write", "roles:write"])).await;
    let reader = issue(json!(["users:write", "users:read"])).await;
    let users = org_path(org, "/users");
    let again = json!({"email": "ADA@example.com", "full_name": "Ada again"});
    let head = t.head().await;
    // Inviting again, changing another user's address onto it, creating or renaming a role
    // onto a taken name: each names the holder to a key that may read it.
    for (method, path, key, body, said) in [
        (
            Method::POST,
            &users,
            &t.admin_key,
            &again,
            format!("user email is already taken by user {ada}"),
        ),
        (
            Method::POST,
            &users,
            &reader,
            &again,
            format!("by user {ada}"),
        ),
        (
            Method::PATCH,
            &org_path(org, &format!("/users/{bob}")),
            &t.admin_key,
            &json!({"email": "ada@example.com"}),
            format!("by user {ada}"),
        ),
        (
            Method::POST,
            &roles,
            &t.admin_key,
            &json!({"name": "Support"}),
            format!("role name is already taken by role {support}"),
        ),
        (
            Method::POST,
            &roles,
            &t.admin_key,
            &json!({"name": "SUPPORT"}),
            format!("by role {support}"),
        ),
        (
            Method::PATCH,
            &org_path(org, &format!("/roles/{ops}")),
            &t.admin_key,
            &json!({"name": "support"}),
            format!("by role {support}"),
        ),
    ] {
        let r = t.call(method, path, Some(key), Some(body.clone())).await;
        assert_error_says(&r, 409, &said);
    }
    // A key that may invite (or make roles) but not read users (roles) learns only that it is
    // taken.
    for (path, body) in [(&users, &again), (&roles, &json!({"name": "support"}))] {
        let r = t.post(path, &writer, body.clone()).await;
        assert_error_says(&r, 409, "is already taken");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(!message.contains(" by "), "{message}");
    }
    assert_eq!(t.head().await, head, "nothing was appended");
}

#[tokio::test]
async fn a_taken_organization_name_is_named_to_the_platform_operator_only() {
    let t = TestApp::spawn().await;
    let acme = t.create_org("Acme").await;
    for (body, taken) in [
        (
            json!({"name": "ACME", "slug": "acme-2"}),
            "organization name",
        ),
        (
            json!({"name": "Acme Two", "slug": "acme"}),
            "organization slug",
        ),
    ] {
        let r = t.post("/v1/organizations", &t.admin_key, body).await;
        let said = format!("{taken} is already taken by organization {acme}");
        assert_error_says(&r, 409, &said);
    }
    // Another tenant's owner renaming its organization onto Acme's name or slug: taken, and
    // nothing of Acme's.
    let globex = t.create_org("Globex").await;
    let (_, owner) = t.member_with_key(globex, "owner", "boss@globex.test").await;
    for change in [json!({"name": "acme"}), json!({"slug": "acme"})] {
        let head = t.head().await;
        let r = t.patch(&org_path(globex, ""), &owner, change).await;
        assert_error_says(&r, 409, "is already taken");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(!message.contains(&acme.to_string()), "{message}");
        assert!(!message.contains(" by "), "{message}");
        assert_eq!(t.head().await, head);
    }
}

/// A 415 depends on the `Content-Type` header, which the fingerprint does not cover: it is
/// not kept, so the same request with the header mended, under the same key, is carried out.
#[tokio::test]
async fn a_request_refused_for_its_media_type_runs_once_the_header_is_mended() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let users = format!("{}{}", t.base, org_path(org, "/users"));
    let body = json!({"email": "ada@example.com", "full_name": "Ada"}).to_string();
    let send = |content_type: &'static str| {
        t.client
            .post(&users)
            .bearer_auth(&t.admin_key)
            .header("Idempotency-Key", "mended")
            .header("content-type", content_type)
            .body(body.clone())
    };
    let r = answer(send("text/plain")).await;
    assert_error(&r, 415);
    let r = answer(send("application/json")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(!replayed(&r));
}
