//! Bad input gets a clear 4xx in the one JSON error shape and changes nothing: after every
//! rejected request the ledger head is where it was.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{assert_error, assert_error_says, Response, TestApp};
use ledgerline::app::Actor;
use ledgerline_aggregates::organization::{built_in_roles, OrganizationCommand};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn org_path(org: Uuid, rest: &str) -> String {
    format!("/v1/organizations/{org}{rest}")
}

/// An organization with a user, a custom role and a service key to aim bad requests at.
struct Fixture {
    t: TestApp,
    org: Uuid,
    user: Uuid,
    role: Uuid,
    key: Uuid,
}

async fn fixture() -> Fixture {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let user = t.invite(org, "ada@example.com", "Ada Lovelace").await;
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "support", "permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let role = r.body["id"].as_str().unwrap().parse().unwrap();
    let r = t
        .post(
            &org_path(org, "/api-keys"),
            &t.admin_key,
            json!({"label": "svc", "permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let key = r.body["id"].as_str().unwrap().parse().unwrap();
    Fixture {
        t,
        org,
        user,
        role,
        key,
    }
}

/// Sends `body` as JSON with the platform key and asserts it is refused with `status`
/// in the error shape, leaving the ledger head where it was.
async fn refused(t: &TestApp, method: Method, path: &str, body: Value, status: u16) -> Response {
    let before = t.head().await;
    let r = t
        .call(method.clone(), path, Some(&t.admin_key), Some(body.clone()))
        .await;
    assert_eq!(r.status, status, "{method} {path} {body}: {}", r.body);
    assert_error(&r, status);
    assert_eq!(
        t.head().await,
        before,
        "{method} {path} {body} changed the ledger"
    );
    r
}

/// Like [`refused`], with raw bytes and a content type of the caller's choosing.
async fn refused_raw(
    t: &TestApp,
    method: Method,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
    status: u16,
) -> Response {
    let before = t.head().await;
    let r = t
        .raw(method.clone(), path, &t.admin_key, content_type, body)
        .await;
    assert_eq!(
        r.status, status,
        "{method} {path} ({content_type}): {}",
        r.body
    );
    assert_error(&r, status);
    assert_eq!(t.head().await, before, "{method} {path} changed the ledger");
    r
}

/// Like [`refused`] for a request without a body.
async fn refused_bodyless(t: &TestApp, method: Method, path: &str, status: u16) -> Response {
    let before = t.head().await;
    let r = t.call(method.clone(), path, Some(&t.admin_key), None).await;
    assert_eq!(r.status, status, "{method} {path}: {}", r.body);
    assert_error(&r, status);
    assert_eq!(t.head().await, before, "{method} {path} changed the ledger");
    r
}

async fn subject_keys(t: &TestApp) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM subject_keys")
        .fetch_one(t.pool())
        .await
        .unwrap();
    n
}

/// Every route that takes a JSON body, with a valid body for it.
fn json_routes(f: &Fixture) -> Vec<(Method, String, Value)> {
    let (org, user, role, key) = (f.org, f.user, f.role, f.key);
    let member = built_in_roles::role_id(org, "member");
    vec![
        (
            Method::POST,
            "/v1/organizations".into(),
            json!({"name": "Globex", "slug": "globex"}),
        ),
        (
            Method::PATCH,
            org_path(org, ""),
            json!({"name": "Acme Two"}),
        ),
        (
            Method::POST,
            org_path(org, "/suspend"),
            json!({"reason": "r"}),
        ),
        (
            Method::POST,
            org_path(org, "/users"),
            json!({"email": "bob@example.com", "full_name": "Bob"}),
        ),
        (
            Method::PATCH,
            org_path(org, &format!("/users/{user}")),
            json!({"full_name": "Ada King"}),
        ),
        (
            Method::POST,
            org_path(org, &format!("/users/{user}/deactivate")),
            json!({"reason": "r"}),
        ),
        (
            Method::PUT,
            org_path(org, &format!("/users/{user}/roles/{member}")),
            json!({"reason": "r"}),
        ),
        (
            Method::POST,
            org_path(org, "/roles"),
            json!({"name": "ops", "permissions": ["users:read"]}),
        ),
        (
            Method::PATCH,
            org_path(org, &format!("/roles/{role}")),
            json!({"description": "d"}),
        ),
        (
            Method::POST,
            org_path(org, "/api-keys"),
            json!({"label": "k", "permissions": ["users:read"]}),
        ),
        (
            Method::POST,
            org_path(org, &format!("/api-keys/{key}/revoke")),
            json!({"reason": "r"}),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Body syntax, shape, size and type
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_json_is_400() {
    let f = fixture().await;
    for (method, path, _) in json_routes(&f) {
        for bad in [
            &b"{"[..],
            b"{\"na",
            b"not json",
            b"{'name': 'single quotes'}",
            b"{,}",
        ] {
            refused_raw(
                &f.t,
                method.clone(),
                &path,
                "application/json",
                bad.to_vec(),
                400,
            )
            .await;
        }
    }
}

#[tokio::test]
async fn unknown_fields_are_422() {
    let f = fixture().await;
    for (method, path, mut body) in json_routes(&f) {
        body["unexpected"] = json!(1);
        let r = refused(&f.t, method, &path, body, 422).await;
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("unexpected"),
            "names the field: {}",
            r.body
        );
    }
}

#[tokio::test]
async fn wrong_json_types_are_422() {
    let f = fixture().await;
    let (t, org, user, role) = (&f.t, f.org, f.user, f.role);
    let member = t.role_id(org, "member").await;
    let cases: Vec<(Method, String, Value)> = vec![
        (
            Method::POST,
            "/v1/organizations".into(),
            json!({"name": 5, "slug": "five"}),
        ),
        (
            Method::POST,
            "/v1/organizations".into(),
            json!({"name": "Five", "slug": ["five"]}),
        ),
        (
            Method::POST,
            "/v1/organizations".into(),
            json!({"name": "Five", "slug": "five", "settings": [1, 2]}),
        ),
        (
            Method::POST,
            "/v1/organizations".into(),
            json!({"name": "Five", "slug": "five", "country_code": 49}),
        ),
        (
            Method::POST,
            "/v1/organizations".into(),
            json!(["name", "slug"]),
        ),
        (Method::POST, "/v1/organizations".into(), json!("Acme")),
        (Method::PATCH, org_path(org, ""), json!({"name": true})),
        (
            Method::PATCH,
            org_path(org, ""),
            json!({"settings": "none"}),
        ),
        (
            Method::POST,
            org_path(org, "/suspend"),
            json!({"reason": 7}),
        ),
        (
            Method::POST,
            org_path(org, "/users"),
            json!({"email": 1, "full_name": "Bob"}),
        ),
        (
            Method::POST,
            org_path(org, "/users"),
            json!({"email": "bob@example.com", "full_name": {"first": "Bob"}}),
        ),
        (
            Method::PATCH,
            org_path(org, &format!("/users/{user}")),
            json!({"email": ["ada@example.org"]}),
        ),
        (
            Method::POST,
            org_path(org, &format!("/users/{user}/deactivate")),
            json!({"reason": false}),
        ),
        (
            Method::PUT,
            org_path(org, &format!("/users/{user}/roles/{member}")),
            json!({"expires_at": 5}),
        ),
        (
            Method::PUT,
            org_path(org, &format!("/users/{user}/roles/{member}")),
            json!({"expires_at": "next tuesday"}),
        ),
        (
            Method::POST,
            org_path(org, "/roles"),
            json!({"name": "ops", "permissions": "users:read"}),
        ),
        (
            Method::POST,
            org_path(org, "/roles"),
            json!({"name": "ops", "parent_role_id": "not-a-uuid"}),
        ),
        (
            Method::PATCH,
            org_path(org, &format!("/roles/{role}")),
            json!({"permissions": [1]}),
        ),
        (
            Method::POST,
            org_path(org, "/api-keys"),
            json!({"label": "k", "permissions": ["users:read"], "expires_at": "tomorrow"}),
        ),
        (
            Method::POST,
            org_path(org, "/api-keys"),
            json!({"label": "k", "permissions": ["users:read"], "user_id": 42}),
        ),
        (
            Method::POST,
            org_path(org, "/api-keys"),
            json!({"label": 1, "permissions": ["users:read"]}),
        ),
    ];
    for (method, path, body) in cases {
        refused(t, method, &path, body, 422).await;
    }
}

#[tokio::test]
async fn missing_required_fields_are_422() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    let cases: Vec<(String, Value)> = vec![
        ("/v1/organizations".into(), json!({"slug": "globex"})),
        ("/v1/organizations".into(), json!({"name": "Globex"})),
        ("/v1/organizations".into(), json!({})),
        (org_path(org, "/users"), json!({"full_name": "Bob"})),
        (org_path(org, "/users"), json!({"email": "bob@example.com"})),
        (
            org_path(org, "/roles"),
            json!({"permissions": ["users:read"]}),
        ),
        (
            org_path(org, "/api-keys"),
            json!({"permissions": ["users:read"]}),
        ),
        (org_path(org, "/api-keys"), json!({"label": "k"})),
    ];
    for (path, body) in cases {
        let r = refused(t, Method::POST, &path, body, 422).await;
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("missing field"),
            "{}",
            r.body
        );
    }
}

#[tokio::test]
async fn bodies_over_one_mib_are_413() {
    let f = fixture().await;
    let (t, org, user) = (&f.t, f.org, f.user);
    let blob = "x".repeat(1024 * 1024 + 1024);
    let cases: Vec<(Method, String, Value)> = vec![
        (
            Method::POST,
            "/v1/organizations".into(),
            json!({"name": "Big", "slug": "big", "settings": {"blob": blob}}),
        ),
        (
            Method::PATCH,
            org_path(org, ""),
            json!({"settings": {"blob": blob}}),
        ),
        (
            Method::POST,
            org_path(org, "/users"),
            json!({"email": "big@example.com", "full_name": blob}),
        ),
        (
            Method::POST,
            org_path(org, &format!("/users/{user}/deactivate")),
            json!({"reason": blob}),
        ),
    ];
    for (method, path, body) in cases {
        let r = refused_raw(
            t,
            method,
            &path,
            "application/json",
            serde_json::to_vec(&body).unwrap(),
            413,
        )
        .await;
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("1 MiB"),
            "{}",
            r.body
        );
    }
}

#[tokio::test]
async fn bodies_over_one_mib_are_413_even_on_routes_that_take_no_body() {
    let f = fixture().await;
    let (t, org, user, key) = (&f.t, f.org, f.user, f.key);
    let big = serde_json::to_vec(&json!({"pad": "x".repeat(2 * 1024 * 1024)})).unwrap();
    for path in [
        org_path(org, &format!("/users/{user}/erase")),
        org_path(org, &format!("/api-keys/{key}/rotate")),
        org_path(org, "/reactivate"),
    ] {
        refused_raw(t, Method::POST, &path, "application/json", big.clone(), 413).await;
    }
    let r = t
        .get(&org_path(org, &format!("/users/{user}")), &t.admin_key)
        .await;
    assert_eq!(r.body["status"], "active", "the user was not erased");
}

/// A name that looks like another's through a character that shows nothing ("Acme" and
/// "Acme" with a zero-width space) is refused, so that the uniqueness of names holds to the eye.
#[tokio::test]
async fn names_with_invisible_characters_are_422() {
    let f = fixture().await;
    let says_why = |r: &Response| {
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("invisible formatting characters"),
            "{message}"
        );
    };
    // Every format character (a tag, interlinear annotation, musical formatting) and the
    // default-ignorable fillers and joiners that are not format characters.
    for name in [
        "Acme\u{200B}",
        "Acme\u{202E}x",
        "Acme\u{E0001}",
        "Acme\u{FFF9}",
        "Acme\u{1D173}",
        "Acme\u{115F}",
        "Acme\u{1160}",
        "Acme\u{3164}",
        "Acme\u{FFA0}",
        "Ac\u{034F}me",
        "Ac\u{17B4}me",
        "Ac\u{17B5}me",
    ] {
        let r = refused(
            &f.t,
            Method::POST,
            "/v1/organizations",
            json!({"name": name, "slug": "acme-look-alike"}),
            422,
        )
        .await;
        says_why(&r);
    }
    // The fixture's role "support" and one that only looks like it cannot both exist.
    // Joiners and variation selectors stay for the letters and emoji that need them: not
    // after a Latin letter, nor alone, nor as the whole name; a blank Braille cell neither.
    for name in [
        "support\u{E0041}",
        "support\u{FE0F}",
        "support\u{200D}",
        "sup\u{200C}port",
        "support\u{2800}",
        "\u{2800}",
        "\u{200C}",
        "\u{FE0F}",
    ] {
        says_why(&role_refused(&f, name).await);
    }
}

/// A role named `name` refused (422), appending nothing.
async fn role_refused(f: &Fixture, name: &str) -> Response {
    refused(
        &f.t,
        Method::POST,
        &org_path(f.org, "/roles"),
        json!({"name": name, "permissions": ["users:read"]}),
        422,
    )
    .await
}

/// The built-in roles' names are theirs, in any case: a role of one's own taking one would
/// read as the built-in role, and keep an organization whose creation was cut off from ever
/// getting it.
#[tokio::test]
async fn a_role_of_ones_own_cannot_take_a_built_in_name() {
    let f = fixture().await;
    for name in ["member", "Auditor", " owner "] {
        let r = role_refused(&f, name).await;
        assert_error_mentions(&r, "is reserved for the built-in role");
    }
    let r = refused(
        &f.t,
        Method::PATCH,
        &org_path(f.org, &format!("/roles/{}", f.role)),
        json!({"name": "ADMIN"}),
        422,
    )
    .await;
    assert_error_mentions(&r, "is reserved for the built-in role");
}

/// The paged lists take `limit` and `cursor` and refuse any other parameter rather than
/// ignore it: `?sort=name` or `?offset=100` would otherwise answer the first page in the
/// usual order, and the client would not know.
#[tokio::test]
async fn paged_lists_refuse_a_parameter_they_do_not_take() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    for list in [
        "/v1/organizations".to_string(),
        org_path(org, "/users"),
        org_path(org, "/roles"),
        org_path(org, "/api-keys"),
        org_path(org, "/conversations"),
        org_path(org, &format!("/users/{}/roles", f.user)),
    ] {
        for (query, unknown) in [("sort=name", "sort"), ("limit=1&offset=1", "offset")] {
            let r = refused_bodyless(t, Method::GET, &format!("{list}?{query}"), 400).await;
            let message = r.body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(&format!("unknown field `{unknown}`")),
                "{list}?{query}: {message}"
            );
        }
        let r = t.get(&format!("{list}?limit=1"), &t.admin_key).await;
        assert_eq!(r.status, 200, "{list}: {}", r.body);
        assert!(r.body["items"].as_array().unwrap().len() <= 1, "{}", r.body);
        // A cursor it gave is taken back (the user's roles may be too few to give one).
        if let Some(cursor) = r.body["next_cursor"].as_str() {
            let r = t
                .get(&format!("{list}?limit=1&cursor={cursor}"), &t.admin_key)
                .await;
            assert_eq!(r.status, 200, "{list}: {}", r.body);
        }
    }
}

/// A route that takes no body refuses one rather than carry the command out regardless: a
/// truncated document, or a field the command does not have (a reason an erasure does not
/// record), appends nothing. Blank and `{}` are what clients send for "nothing".
#[tokio::test]
async fn routes_that_take_no_body_refuse_one_and_change_nothing() {
    let f = fixture().await;
    let (t, org, user, role, key) = (&f.t, f.org, f.user, f.role, f.key);
    // The body is read before the handler looks at anything: a conversation and a message
    // that do not exist still meet the refusal first.
    let (c, m) = (Uuid::new_v4(), Uuid::new_v4());
    let thumbs = "%F0%9F%91%8D";
    let routes = [
        (Method::POST, org_path(org, &format!("/users/{user}/erase"))),
        (
            Method::POST,
            org_path(org, &format!("/users/{user}/reactivate")),
        ),
        (
            Method::POST,
            org_path(org, &format!("/api-keys/{key}/rotate")),
        ),
        (Method::POST, org_path(org, "/reactivate")),
        (Method::DELETE, org_path(org, &format!("/roles/{role}"))),
        (
            Method::DELETE,
            org_path(org, &format!("/users/{user}/roles/{role}")),
        ),
        (
            Method::POST,
            org_path(org, &format!("/conversations/{c}/archive")),
        ),
        (
            Method::POST,
            org_path(org, &format!("/conversations/{c}/unarchive")),
        ),
        (
            Method::DELETE,
            org_path(org, &format!("/conversations/{c}/participants/{user}")),
        ),
        (
            Method::DELETE,
            org_path(org, &format!("/conversations/{c}/messages/{m}")),
        ),
        (
            Method::PUT,
            org_path(
                org,
                &format!("/conversations/{c}/messages/{m}/reactions/{thumbs}"),
            ),
        ),
        (
            Method::DELETE,
            org_path(
                org,
                &format!("/conversations/{c}/messages/{m}/reactions/{thumbs}"),
            ),
        ),
    ];
    for (method, path) in &routes {
        for (bad, status) in [
            (&b"{\"reason\": \"x\"}"[..], 422),
            (b"\"text\"", 422),
            // An array is not an object, though serde takes one for a struct's fields.
            (b"[]", 422),
            (b" [\"x\"]", 422),
            // Cut short after a field it does not take: the field is what is said.
            (b"{\"reason\": \"x\\u0000\", \"zzz\": [1, 2", 422),
            (b"{\"zzz", 400),
            (b"garbage{", 400),
        ] {
            let r = refused_raw(
                t,
                method.clone(),
                path,
                "application/json",
                bad.to_vec(),
                status,
            )
            .await;
            if status == 422 {
                assert!(
                    r.body["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("invalid request body"),
                    "{}",
                    r.body
                );
            }
        }
    }
    let r = t
        .get(&org_path(org, &format!("/users/{user}")), &t.admin_key)
        .await;
    assert_eq!(r.body["status"], "active", "the user was not erased");
    let before = t.head().await;
    let r = t
        .post(
            &org_path(org, &format!("/users/{user}/erase")),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "an empty object is no body: {}", r.body);
    assert_eq!(t.head().await, before + 1);
}

/// Every body is an object: the same fields as an array, which serde's derived structs take
/// in order, are refused, saying what came, and change nothing.
#[tokio::test]
async fn a_body_that_is_an_array_of_fields_is_refused() {
    let f = fixture().await;
    let (t, org, user) = (&f.t, f.org, f.user);
    let requests = [
        (
            Method::POST,
            org_path(org, "/roles"),
            json!(["readers", "Reads", ["users:read"], null]),
        ),
        (
            Method::POST,
            org_path(org, "/users"),
            json!(["grace@example.com", "Grace Hopper"]),
        ),
        (
            Method::PATCH,
            org_path(org, &format!("/users/{user}")),
            json!([null, "Ada King"]),
        ),
        (
            Method::POST,
            org_path(org, "/conversations"),
            json!(["group", "made from an array", null, [], null]),
        ),
    ];
    for (method, path, body) in requests {
        let r = refused_raw(
            t,
            method,
            &path,
            "application/json",
            body.to_string().into_bytes(),
            422,
        )
        .await;
        assert_error_says(&r, 422, "expected a JSON object, found an array");
    }
    // Other values serde refuses itself, naming what it expected.
    let r = refused_raw(
        t,
        Method::PATCH,
        &org_path(org, ""),
        "application/json",
        b"null".to_vec(),
        422,
    )
    .await;
    assert_error_says(&r, 422, "expected struct");
}

/// A free-form value keeps its numbers exactly: an integer past 64 bits (which would be kept
/// as a rounded float) is refused, and one within them comes back as it was sent.
#[tokio::test]
async fn settings_keep_their_integers_exactly_or_are_refused() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    let r = refused_raw(
        t,
        Method::PATCH,
        &org_path(org, ""),
        "application/json",
        br#"{"settings": {"quota": 123456789012345678901234567890}}"#.to_vec(),
        422,
    )
    .await;
    assert_error_says(
        &r,
        422,
        "123456789012345678901234567890 does not fit in 64 bits",
    );
    let r = t
        .raw(
            Method::PATCH,
            &org_path(org, ""),
            &t.admin_key,
            "application/json",
            br#"{"settings": {"quota": 9007199254740993, "floor": -9223372036854775808}}"#.to_vec(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["settings"]["quota"].as_u64(), Some(9007199254740993));
    assert_eq!(r.body["settings"]["floor"].as_i64(), Some(i64::MIN));
}

#[tokio::test]
async fn body_just_under_one_mib_is_read() {
    let f = fixture().await;
    // Under the limit the body is parsed, so a bad field is a 422, not a 413.
    let blob = "x".repeat(1024 * 1024 - 1024);
    let body =
        json!({"name": "Big", "slug": "big", "settings": {"blob": blob}, "unexpected": true});
    refused(&f.t, Method::POST, "/v1/organizations", body, 422).await;
}

#[tokio::test]
async fn wrong_or_missing_content_type_is_415() {
    let f = fixture().await;
    let (t, org, user, role) = (&f.t, f.org, f.user, f.role);
    let cases: Vec<(Method, String, Value)> = vec![
        (
            Method::POST,
            "/v1/organizations".into(),
            json!({"name": "Globex", "slug": "globex"}),
        ),
        (
            Method::PATCH,
            org_path(org, ""),
            json!({"name": "Acme Two"}),
        ),
        (
            Method::POST,
            org_path(org, "/users"),
            json!({"email": "bob@example.com", "full_name": "Bob"}),
        ),
        (
            Method::PATCH,
            org_path(org, &format!("/users/{user}")),
            json!({"full_name": "Ada King"}),
        ),
        (
            Method::POST,
            org_path(org, "/roles"),
            json!({"name": "ops", "permissions": ["users:read"]}),
        ),
        (
            Method::PATCH,
            org_path(org, &format!("/roles/{role}")),
            json!({"description": "d"}),
        ),
        (
            Method::POST,
            org_path(org, "/api-keys"),
            json!({"label": "k", "permissions": ["users:read"]}),
        ),
    ];
    for (method, path, body) in cases {
        let bytes = serde_json::to_vec(&body).unwrap();
        for content_type in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/xml",
        ] {
            refused_raw(t, method.clone(), &path, content_type, bytes.clone(), 415).await;
        }
        refused_bodyless(t, method, &path, 415).await;
    }
}

#[tokio::test]
async fn non_json_content_type_is_415_on_routes_with_an_optional_body() {
    let f = fixture().await;
    let (t, org, user, key) = (&f.t, f.org, f.user, f.key);
    let member = t.role_id(org, "member").await;
    let cases: Vec<(Method, String, Value)> = vec![
        (
            Method::POST,
            org_path(org, "/suspend"),
            json!({"reason": "r"}),
        ),
        (
            Method::POST,
            org_path(org, &format!("/users/{user}/deactivate")),
            json!({"reason": "r"}),
        ),
        (
            Method::PUT,
            org_path(org, &format!("/users/{user}/roles/{member}")),
            json!({"reason": "r"}),
        ),
        (
            Method::POST,
            org_path(org, &format!("/api-keys/{key}/revoke")),
            json!({"reason": "r"}),
        ),
    ];
    for (method, path, body) in cases {
        refused_raw(
            t,
            method,
            &path,
            "text/plain",
            serde_json::to_vec(&body).unwrap(),
            415,
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Field rules
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn empty_or_overlong_names_are_422() {
    let f = fixture().await;
    let (t, org, user, role) = (&f.t, f.org, f.user, f.role);
    let long = "n".repeat(201);
    for bad in ["", "   ", long.as_str(), "tab\tinside"] {
        refused(
            t,
            Method::POST,
            "/v1/organizations",
            json!({"name": bad, "slug": "globex"}),
            422,
        )
        .await;
        refused(
            t,
            Method::PATCH,
            &org_path(org, ""),
            json!({"name": bad}),
            422,
        )
        .await;
        refused(
            t,
            Method::POST,
            &org_path(org, "/users"),
            json!({"email": "bob@example.com", "full_name": bad}),
            422,
        )
        .await;
        refused(
            t,
            Method::PATCH,
            &org_path(org, &format!("/users/{user}")),
            json!({"full_name": bad}),
            422,
        )
        .await;
        refused(
            t,
            Method::POST,
            &org_path(org, "/roles"),
            json!({"name": bad}),
            422,
        )
        .await;
        refused(
            t,
            Method::PATCH,
            &org_path(org, &format!("/roles/{role}")),
            json!({"name": bad}),
            422,
        )
        .await;
        refused(
            t,
            Method::POST,
            &org_path(org, "/api-keys"),
            json!({"label": bad, "permissions": ["users:read"]}),
            422,
        )
        .await;
    }
}

#[tokio::test]
async fn names_of_exactly_200_characters_are_accepted() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    let name = "n".repeat(200);
    let r = t
        .post(
            "/v1/organizations",
            &t.admin_key,
            json!({"name": name, "slug": "long"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = t
        .post(
            &org_path(org, "/users"),
            &t.admin_key,
            json!({"email": "long@example.com", "full_name": name}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["full_name"], json!(name));
}

#[tokio::test]
async fn overlong_descriptions_and_reasons_are_422() {
    let f = fixture().await;
    let (t, org, user, role, key) = (&f.t, f.org, f.user, f.role, f.key);
    let member = t.role_id(org, "member").await;
    let description = "d".repeat(2001);
    refused(
        t,
        Method::POST,
        &org_path(org, "/roles"),
        json!({"name": "ops", "description": description}),
        422,
    )
    .await;
    refused(
        t,
        Method::PATCH,
        &org_path(org, &format!("/roles/{role}")),
        json!({"description": description}),
        422,
    )
    .await;
    let reason = "r".repeat(501);
    refused(
        t,
        Method::POST,
        &org_path(org, "/suspend"),
        json!({"reason": reason}),
        422,
    )
    .await;
    refused(
        t,
        Method::POST,
        &org_path(org, &format!("/users/{user}/deactivate")),
        json!({"reason": reason}),
        422,
    )
    .await;
    refused(
        t,
        Method::PUT,
        &org_path(org, &format!("/users/{user}/roles/{member}")),
        json!({"reason": reason}),
        422,
    )
    .await;
    refused(
        t,
        Method::POST,
        &org_path(org, &format!("/api-keys/{key}/revoke")),
        json!({"reason": reason}),
        422,
    )
    .await;
    // The limit is on what is kept: a line break a text area adds, trimmed, is not counted.
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "ops", "description": format!("{}\n", "d".repeat(2000))}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["description"], json!("d".repeat(2000)), "{}", r.body);
}

/// PostgreSQL's `text` and `jsonb` cannot hold a NUL, so an event carrying one would be
/// appended (the ledger keeps `json` text) and then stop every projection that reads it, for
/// every tenant, with no way to take it out of the chain. The API refuses it in any string of
/// any body, naming where it is.
#[tokio::test]
async fn nul_characters_are_422_anywhere_in_a_body() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    let mut tried = 0;
    for (method, path, body) in json_routes(&f) {
        for (field, value) in body.as_object().unwrap() {
            if !value.is_string() {
                continue;
            }
            let mut bad = body.clone();
            bad[field] = json!(format!("{}\u{0}x", value.as_str().unwrap()));
            let r = refused(t, method.clone(), &path, bad, 422).await;
            let message = r.body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(&format!("/{field} must not contain the NUL character")),
                "{method} {path}: {message}"
            );
            tried += 1;
        }
    }
    assert!(tried >= 11, "only {tried} fields tried");
    // Inside an organization's free-form settings, as a value and as a key.
    let r = refused(
        t,
        Method::PATCH,
        &org_path(org, ""),
        json!({"settings": {"theme": {"name": "dark\u{0}"}}}),
        422,
    )
    .await;
    assert_error_mentions(
        &r,
        "/settings/theme/name must not contain the NUL character",
    );
    let r = refused(
        t,
        Method::PATCH,
        &org_path(org, ""),
        json!({"settings": {"a\u{0}": 1}}),
        422,
    )
    .await;
    assert_error_mentions(&r, "a key in /settings must not contain the NUL character");
    // A conversation's description and a message's content, with a member's own key.
    let (_, key) = t.member_with_key(org, "member", "grace@example.com").await;
    let conversations = org_path(org, "/conversations");
    let before = t.head().await;
    let r = t
        .post(
            &conversations,
            &key,
            json!({"kind": "group", "title": "x", "description": "a\u{0}b"}),
        )
        .await;
    assert_error(&r, 422);
    let r = t
        .post(&conversations, &key, json!({"kind": "group", "title": "x"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let conversation = r.body["id"].as_str().unwrap().to_string();
    let head = t.head().await;
    assert_eq!(head, before + 1);
    let r = t
        .post(
            &format!("{conversations}/{conversation}/messages"),
            &key,
            json!({"content": "hi\u{0}"}),
        )
        .await;
    assert_error(&r, 422);
    assert_eq!(t.head().await, head, "a refused post appended");
    // The text `\u0000` (a backslash, then `u0000`) is no NUL, and passes.
    let r = t
        .patch(
            &org_path(org, ""),
            &t.admin_key,
            json!({"settings": {"path": "C:\\u0000"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["settings"]["path"], json!("C:\\u0000"));
}

/// A message's text is free text, checked before it is sealed: a blank one or one with a
/// control character (a BEL, an escape) is refused, in a post and in an edit.
#[tokio::test]
async fn blank_or_control_character_messages_are_422() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    let (_, key) = t.member_with_key(org, "member", "grace@example.com").await;
    let conversations = org_path(org, "/conversations");
    let r = t
        .post(&conversations, &key, json!({"kind": "group", "title": "x"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let messages = format!(
        "{conversations}/{}/messages",
        r.body["id"].as_str().unwrap()
    );
    let r = t.post(&messages, &key, json!({"content": "hello"})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let message = format!("{messages}/{}", r.body["id"].as_str().unwrap());
    for (content, said) in [
        ("   \n\t", "content must not be blank"),
        ("ding\u{7}", "control characters"),
        ("\u{1b}[2Jgone", "control characters"),
    ] {
        let before = t.head().await;
        for r in [
            t.post(&messages, &key, json!({"content": content})).await,
            t.patch(&message, &key, json!({"content": content})).await,
        ] {
            assert_error(&r, 422);
            assert_error_mentions(&r, said);
        }
        assert_eq!(t.head().await, before, "{content:?} appended");
    }
}

/// The domain's own rule for free text: line breaks and tabs are text, other control
/// characters are not (the HTTP layer refuses NUL before the domain sees it).
#[tokio::test]
async fn control_characters_in_descriptions_and_reasons_are_422() {
    let f = fixture().await;
    let (t, org, user, role) = (&f.t, f.org, f.user, f.role);
    let r = refused(
        t,
        Method::PATCH,
        &org_path(org, &format!("/roles/{role}")),
        json!({"description": "bell\u{7}"}),
        422,
    )
    .await;
    assert_error_mentions(&r, "description must not contain control characters");
    let r = refused(
        t,
        Method::POST,
        &org_path(org, &format!("/users/{user}/deactivate")),
        json!({"reason": "\u{1b}[31mred"}),
        422,
    )
    .await;
    assert_error_mentions(&r, "reason must not contain control characters");
    let r = t
        .patch(
            &org_path(org, &format!("/roles/{role}")),
            &t.admin_key,
            json!({"description": "first line\r\n\tsecond line"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["description"], json!("first line\r\n\tsecond line"));
}

/// Whatever way a command comes in, the ledger itself refuses an event with a NUL, and the
/// projections go on: nothing reached them.
#[tokio::test]
async fn the_ledger_refuses_a_nul_that_got_past_the_api() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Acme").await;
    let before = t.head().await;
    let refused = t
        .app
        .execute(
            &t.app.cqrs.organizations,
            org,
            Some(org),
            &Actor::cli("test"),
            OrganizationCommand::Update {
                name: None,
                slug: None,
                country_code: None,
                domain: None,
                settings: json!({"theme": "dark\u{0}"}).as_object().cloned(),
            },
        )
        .await;
    let message = format!("{:?}", refused.expect_err("a NUL must not be appended"));
    assert!(message.contains("NUL"), "{message}");
    assert_eq!(t.head().await, before);
    let r = t
        .patch(
            &org_path(org, ""),
            &t.admin_key,
            json!({"name": "Acme Two"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["name"], json!("Acme Two"), "the read model moved on");
    let (failures,): (i64,) = sqlx::query_as("SELECT count(*) FROM projection_failures")
        .fetch_one(t.pool())
        .await
        .unwrap();
    assert_eq!(failures, 0);
}

fn assert_error_mentions(r: &Response, text: &str) {
    let message = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(text), "{text:?} not in {message:?}");
}

#[tokio::test]
async fn bad_slugs_are_422() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    let long = "a".repeat(64);
    for bad in [
        "",
        "Acme",
        "-acme",
        "acme-",
        "ac me",
        "acme_corp",
        "acmé",
        long.as_str(),
    ] {
        refused(
            t,
            Method::POST,
            "/v1/organizations",
            json!({"name": "Globex", "slug": bad}),
            422,
        )
        .await;
        refused(
            t,
            Method::PATCH,
            &org_path(org, ""),
            json!({"slug": bad}),
            422,
        )
        .await;
    }
}

#[tokio::test]
async fn bad_country_codes_are_422() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    for bad in ["XX", "DEU", "D", "", "ZZ", "1A"] {
        let r = refused(
            t,
            Method::POST,
            "/v1/organizations",
            json!({"name": "Globex", "slug": "globex", "country_code": bad}),
            422,
        )
        .await;
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("country"),
            "{}",
            r.body
        );
        refused(
            t,
            Method::PATCH,
            &org_path(org, ""),
            json!({"country_code": bad}),
            422,
        )
        .await;
    }
    // The control: a real code in lower case is accepted and stored upper-case.
    let r = t
        .patch(
            &org_path(org, ""),
            &t.admin_key,
            json!({"country_code": "de"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["country_code"], "DE");
}

#[tokio::test]
async fn bad_domains_are_422() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    for bad in [
        "localhost",
        "-bad.com",
        "bad-.com",
        "a..b",
        "spa ce.com",
        "",
    ] {
        refused(
            t,
            Method::POST,
            "/v1/organizations",
            json!({"name": "Globex", "slug": "globex", "domain": bad}),
            422,
        )
        .await;
        refused(
            t,
            Method::PATCH,
            &org_path(org, ""),
            json!({"domain": bad}),
            422,
        )
        .await;
    }
}

#[tokio::test]
async fn bad_emails_are_422_and_leave_no_data_key_behind() {
    let f = fixture().await;
    let (t, org, user) = (&f.t, f.org, f.user);
    let keys = subject_keys(t).await;
    let long = format!("{}@example.com", "a".repeat(250));
    for bad in [
        "",
        "ada",
        "ada@",
        "@example.com",
        "ada@example",
        "a da@example.com",
        "ada@@example.com",
        ".ada@example.com",
        "ada..l@example.com",
        long.as_str(),
    ] {
        refused(
            t,
            Method::POST,
            &org_path(org, "/users"),
            json!({"email": bad, "full_name": "Bob"}),
            422,
        )
        .await;
        refused(
            t,
            Method::PATCH,
            &org_path(org, &format!("/users/{user}")),
            json!({"email": bad}),
            422,
        )
        .await;
    }
    assert_eq!(
        subject_keys(t).await,
        keys,
        "no data key for a user that never was"
    );
}

#[tokio::test]
async fn unknown_permission_names_are_422() {
    let f = fixture().await;
    let (t, org, role) = (&f.t, f.org, f.role);
    for bad in ["users:delete", "USERS:READ", "", "*"] {
        let r = refused(
            t,
            Method::POST,
            &org_path(org, "/roles"),
            json!({"name": "ops", "permissions": ["users:read", bad]}),
            422,
        )
        .await;
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("unknown permission"),
            "{}",
            r.body
        );
        refused(
            t,
            Method::PATCH,
            &org_path(org, &format!("/roles/{role}")),
            json!({"permissions": [bad]}),
            422,
        )
        .await;
        refused(
            t,
            Method::POST,
            &org_path(org, "/api-keys"),
            json!({"label": "k", "permissions": [bad]}),
            422,
        )
        .await;
    }
}

/// A list of permissions is a set, and the document says so (`uniqueItems`): one listed twice
/// is refused, naming it, rather than folded away (the client may have meant another).
#[tokio::test]
async fn permissions_listed_twice_are_422() {
    let f = fixture().await;
    let (t, org, role) = (&f.t, f.org, f.role);
    let twice = json!(["audit:read", "users:read", "audit:read"]);
    for (method, path, body) in [
        (
            Method::POST,
            org_path(org, "/roles"),
            json!({"name": "ops", "permissions": twice}),
        ),
        (
            Method::PATCH,
            org_path(org, &format!("/roles/{role}")),
            json!({"permissions": twice}),
        ),
        (
            Method::POST,
            org_path(org, "/api-keys"),
            json!({"label": "k", "permissions": twice}),
        ),
    ] {
        let r = refused(t, method, &path, body, 422).await;
        assert_error_mentions(&r, "permissions: `audit:read` is listed twice");
    }
    // Each once, they are taken.
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "ops", "permissions": ["audit:read", "users:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["permissions"], json!(["users:read", "audit:read"]));
}

#[tokio::test]
async fn invalid_key_issuance_is_refused() {
    let f = fixture().await;
    let (t, org, user) = (&f.t, f.org, f.user);
    let path = org_path(org, "/api-keys");
    refused(
        t,
        Method::POST,
        &path,
        json!({"label": "k", "permissions": []}),
        422,
    )
    .await;
    refused(
        t,
        Method::POST,
        &path,
        json!({"label": "k", "permissions": ["users:read"], "expires_at": "2020-01-01T00:00:00Z"}),
        422,
    )
    .await;
    refused(
        t,
        Method::POST,
        &path,
        json!({"label": "k", "permissions": ["users:read"], "user_id": Uuid::new_v4()}),
        422,
    )
    .await;
    // A user of another organization is not a user of this one.
    let other = t.create_org("Other").await;
    let stranger = t.invite(other, "stranger@example.com", "Stranger").await;
    refused(
        t,
        Method::POST,
        &path,
        json!({"label": "k", "permissions": ["users:read"], "user_id": stranger}),
        422,
    )
    .await;
    // Only active users get keys.
    let r = t
        .post(
            &org_path(org, &format!("/users/{user}/deactivate")),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    refused(
        t,
        Method::POST,
        &path,
        json!({"label": "k", "permissions": ["users:read"], "user_id": user}),
        409,
    )
    .await;
}

#[tokio::test]
async fn invalid_role_assignment_is_refused() {
    let f = fixture().await;
    let (t, org, user, role) = (&f.t, f.org, f.user, f.role);
    let path = org_path(org, &format!("/users/{user}/roles/{role}"));
    refused(
        t,
        Method::PUT,
        &path,
        json!({"expires_at": "2020-01-01T00:00:00Z"}),
        422,
    )
    .await;
    let r = t
        .put(&path, &t.admin_key, json!({"reason": "on call"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The same assignment again would only add noise to the ledger.
    refused(t, Method::PUT, &path, json!({"reason": "on call"}), 422).await;
    // Revoking what is not assigned.
    let member = t.role_id(org, "member").await;
    refused_bodyless(
        t,
        Method::DELETE,
        &org_path(org, &format!("/users/{user}/roles/{member}")),
        409,
    )
    .await;
    // A role that does not exist, or is another organization's.
    refused(
        t,
        Method::PUT,
        &org_path(org, &format!("/users/{user}/roles/{}", Uuid::new_v4())),
        json!({}),
        404,
    )
    .await;
    let other = t.create_org("Other").await;
    let foreign = t.role_id(other, "member").await;
    refused(
        t,
        Method::PUT,
        &org_path(org, &format!("/users/{user}/roles/{foreign}")),
        json!({}),
        404,
    )
    .await;
}

/// The `expires_at` the log holds for `event_type` of aggregate `id` (its newest).
async fn logged_expiry(t: &TestApp, id: Uuid, event_type: &str) -> Value {
    let (payload,): (Value,) = sqlx::query_as(
        "SELECT payload::jsonb FROM events WHERE aggregate_id = $1 AND event_type = $2 \
         ORDER BY position DESC LIMIT 1",
    )
    .bind(id.to_string())
    .bind(event_type)
    .fetch_one(t.pool())
    .await
    .unwrap();
    payload[event_type]["expires_at"].clone()
}

fn instant(text: &Value) -> chrono::DateTime<chrono::Utc> {
    text.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .unwrap_or_else(|| panic!("a time: {text}"))
        .into()
}

/// An expiry differing from the assignment's only below the microsecond is the same expiry
/// (the read models, and so every answer, keep microseconds): assigning it again changes
/// nothing and is refused as the other no-ops are, and the log keeps what the answers show.
#[tokio::test]
async fn an_expiry_differing_only_in_nanoseconds_changes_nothing() {
    let f = fixture().await;
    let (t, org, user, role) = (&f.t, f.org, f.user, f.role);
    let path = org_path(org, &format!("/users/{user}/roles/{role}"));
    let r = t
        .put(
            &path,
            &t.admin_key,
            json!({"expires_at": "2030-06-01T07:00:00Z"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = refused(
        t,
        Method::PUT,
        &path,
        json!({"expires_at": "2030-06-01T07:00:00.000000001Z"}),
        422,
    )
    .await;
    assert_error_says(&r, 422, "nothing to change");

    // Sent with nanoseconds first, kept to the microsecond in the log too.
    let r = t
        .put(
            &path,
            &t.admin_key,
            json!({"expires_at": "2030-06-01T07:00:00.123456789Z"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let micros = instant(&json!("2030-06-01T07:00:00.123456Z"));
    assert_eq!(
        instant(&r.body["items"][0]["expires_at"]),
        micros,
        "{}",
        r.body
    );
    assert_eq!(
        instant(&logged_expiry(t, user, "UserRoleAssigned").await),
        micros
    );
    refused(
        t,
        Method::PUT,
        &path,
        json!({"expires_at": "2030-06-01T07:00:00.123456Z"}),
        422,
    )
    .await;
}

/// A key's expiry sent with nanoseconds is kept to the microsecond: the log holds the time
/// every answer shows, not a finer one.
#[tokio::test]
async fn a_key_expiry_is_kept_to_the_microsecond() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    let r = t
        .post(
            &org_path(org, "/api-keys"),
            &t.admin_key,
            json!({"label": "k", "permissions": ["users:read"],
                   "expires_at": "2030-06-01T07:00:00.123456789Z"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let key: Uuid = r.body["id"].as_str().unwrap().parse().unwrap();
    let micros = instant(&json!("2030-06-01T07:00:00.123456Z"));
    assert_eq!(instant(&r.body["expires_at"]), micros, "{}", r.body);
    assert_eq!(
        instant(&logged_expiry(t, key, "ApiKeyIssued").await),
        micros
    );
    let r = t
        .get(&org_path(org, &format!("/api-keys/{key}")), &t.admin_key)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(instant(&r.body["expires_at"]), micros, "{}", r.body);
}

#[tokio::test]
async fn updates_that_change_nothing_are_422() {
    let f = fixture().await;
    let (t, org, user, role) = (&f.t, f.org, f.user, f.role);
    refused(t, Method::PATCH, &org_path(org, ""), json!({}), 422).await;
    refused(
        t,
        Method::PATCH,
        &org_path(org, ""),
        json!({"name": "Acme", "slug": "acme"}),
        422,
    )
    .await;
    refused(
        t,
        Method::PATCH,
        &org_path(org, &format!("/users/{user}")),
        json!({}),
        422,
    )
    .await;
    refused(
        t,
        Method::PATCH,
        &org_path(org, &format!("/roles/{role}")),
        json!({}),
        422,
    )
    .await;
    refused(
        t,
        Method::PATCH,
        &org_path(org, &format!("/roles/{role}")),
        json!({"name": "support"}),
        422,
    )
    .await;
}

/// A PATCH field that cannot be cleared (a name, a slug, an address, a participant's role
/// or muting) refuses `null`, naming the field, rather than reading it as absent: the client
/// meant something the server would not do. The whole request is refused, also the fields
/// beside it, and nothing is appended.
#[tokio::test]
async fn null_for_a_field_that_cannot_be_cleared_is_422() {
    let f = fixture().await;
    let (t, org, user, role) = (&f.t, f.org, f.user, f.role);
    let conversation = Uuid::new_v4();
    let cases = [
        (org_path(org, ""), json!({"name": null}), "name"),
        (
            org_path(org, ""),
            json!({"slug": null, "country_code": "FR"}),
            "slug",
        ),
        (
            org_path(org, &format!("/roles/{role}")),
            json!({"name": null, "description": "changed"}),
            "name",
        ),
        (
            org_path(org, &format!("/users/{user}")),
            json!({"email": null}),
            "email",
        ),
        (
            org_path(org, &format!("/users/{user}")),
            json!({"full_name": null, "email": "grace@example.com"}),
            "full_name",
        ),
        (
            org_path(
                org,
                &format!("/conversations/{conversation}/participants/{user}"),
            ),
            json!({"role": null, "muted": true}),
            "role",
        ),
        (
            org_path(
                org,
                &format!("/conversations/{conversation}/participants/{user}"),
            ),
            json!({"muted": null}),
            "muted",
        ),
    ];
    for (path, body, field) in cases {
        let r = refused(t, Method::PATCH, &path, body, 422).await;
        assert_error_mentions(&r, &format!("{field}: cannot be null"));
        assert_error_mentions(&r, "leave it out to keep it");
    }
    let r = t.get(&org_path(org, ""), &t.admin_key).await;
    assert_eq!(
        (&r.body["name"], &r.body["slug"], &r.body["country_code"]),
        (&json!("Acme"), &json!("acme"), &Value::Null)
    );
    let r = t
        .get(&org_path(org, &format!("/roles/{role}")), &t.admin_key)
        .await;
    assert_eq!(
        (&r.body["name"], &r.body["description"]),
        (&json!("support"), &json!(""))
    );
    let r = t
        .get(&org_path(org, &format!("/users/{user}")), &t.admin_key)
        .await;
    assert_eq!(
        (&r.body["email"], &r.body["full_name"]),
        (&json!("ada@example.com"), &json!("Ada Lovelace"))
    );
}

/// A PATCH field that can be cleared clears on `null` to what a creation that leaves it out
/// gives: an organization's settings to `{}`, a role's description to `""` and its own
/// permissions to none.
#[tokio::test]
async fn null_clears_a_field_that_can_be_cleared() {
    let f = fixture().await;
    let (t, org, role) = (&f.t, f.org, f.role);
    let r = t
        .patch(
            &org_path(org, ""),
            &t.admin_key,
            json!({"settings": {"tier": "gold"}}),
        )
        .await;
    assert_eq!(r.body["settings"], json!({"tier": "gold"}), "{}", r.body);
    let before = t.head().await;
    let r = t
        .patch(
            &org_path(org, ""),
            &t.admin_key,
            json!({"settings": null, "name": "Acme Corp"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (&r.body["name"], &r.body["settings"]),
        (&json!("Acme Corp"), &json!({}))
    );
    assert_eq!(t.head().await, before + 1);
    // Cleared already: nothing to change.
    refused(
        t,
        Method::PATCH,
        &org_path(org, ""),
        json!({"settings": null}),
        422,
    )
    .await;

    let path = org_path(org, &format!("/roles/{role}"));
    let r = t
        .patch(&path, &t.admin_key, json!({"description": "first line"}))
        .await;
    assert_eq!(r.body["description"], json!("first line"), "{}", r.body);
    let r = t
        .patch(&path, &t.admin_key, json!({"description": null}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["description"], json!(""));
    assert_eq!(
        r.body["permissions"],
        json!(["users:read"]),
        "left as it was"
    );
    let before = t.head().await;
    let r = t
        .patch(&path, &t.admin_key, json!({"permissions": null}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["permissions"], json!([]));
    assert_eq!(t.head().await, before + 1);
    refused(
        t,
        Method::PATCH,
        &path,
        json!({"permissions": null, "description": null}),
        422,
    )
    .await;
}

#[tokio::test]
async fn state_transitions_that_do_not_apply_are_409() {
    let f = fixture().await;
    let (t, org, user, key) = (&f.t, f.org, f.user, f.key);
    refused(
        t,
        Method::POST,
        &org_path(org, "/reactivate"),
        json!({}),
        409,
    )
    .await;
    refused(
        t,
        Method::POST,
        &org_path(org, &format!("/users/{user}/reactivate")),
        json!({}),
        409,
    )
    .await;
    let r = t
        .post(
            &org_path(org, &format!("/api-keys/{key}/revoke")),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    refused(
        t,
        Method::POST,
        &org_path(org, &format!("/api-keys/{key}/revoke")),
        json!({}),
        409,
    )
    .await;
    refused(
        t,
        Method::POST,
        &org_path(org, &format!("/api-keys/{key}/rotate")),
        json!({}),
        409,
    )
    .await;
    let r = t
        .post(
            &org_path(org, &format!("/users/{user}/erase")),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    refused(
        t,
        Method::POST,
        &org_path(org, &format!("/users/{user}/erase")),
        json!({}),
        409,
    )
    .await;
    refused(
        t,
        Method::PATCH,
        &org_path(org, &format!("/users/{user}")),
        json!({"full_name": "Back Again"}),
        409,
    )
    .await;
    refused(
        t,
        Method::POST,
        &org_path(org, &format!("/users/{user}/deactivate")),
        json!({}),
        409,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Paths and query strings
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn invalid_uuids_in_paths_are_400() {
    let f = fixture().await;
    let (t, org, user, role, key) = (&f.t, f.org, f.user, f.role, f.key);
    let cases: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/v1/organizations/not-a-uuid".into(), None),
        (
            Method::PATCH,
            "/v1/organizations/123".into(),
            Some(json!({"name": "X"})),
        ),
        (
            Method::POST,
            "/v1/organizations/acme/suspend".into(),
            Some(json!({})),
        ),
        (Method::GET, "/v1/organizations/acme/users".into(), None),
        (
            Method::POST,
            "/v1/organizations/acme/users".into(),
            Some(json!({"email": "bob@example.com", "full_name": "Bob"})),
        ),
        (Method::GET, org_path(org, "/users/bob"), None),
        (
            Method::PATCH,
            org_path(org, "/users/bob"),
            Some(json!({"full_name": "Bob"})),
        ),
        (
            Method::POST,
            org_path(org, "/users/bob/erase"),
            Some(json!({})),
        ),
        (
            Method::PUT,
            org_path(org, &format!("/users/{user}/roles/admin")),
            Some(json!({})),
        ),
        (
            Method::DELETE,
            org_path(org, &format!("/users/bob/roles/{role}")),
            None,
        ),
        (Method::GET, org_path(org, "/roles/support"), None),
        (
            Method::DELETE,
            org_path(org, &format!("/roles/{}", &role.to_string()[..35])),
            None,
        ),
        (Method::GET, org_path(org, "/api-keys/ll_123"), None),
        (
            Method::POST,
            org_path(org, &format!("/api-keys/{key}x/revoke")),
            Some(json!({})),
        ),
        (
            Method::GET,
            "/v1/organizations/%00/audit-events".into(),
            None,
        ),
        (
            Method::GET,
            "/v1/organizations/acme/ledger/events".into(),
            None,
        ),
    ];
    for (method, path, body) in cases {
        let before = t.head().await;
        let r = t
            .call(method.clone(), &path, Some(&t.admin_key), body)
            .await;
        assert_eq!(r.status, 400, "{method} {path}: {}", r.body);
        assert_error(&r, 400);
        assert_eq!(t.head().await, before);
    }
}

#[tokio::test]
async fn bad_audit_query_params_are_400() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    let path = org_path(org, "/audit-events");
    for query in [
        "limit=0",
        "limit=501",
        "limit=-1",
        "limit=ten",
        "order=sideways",
        "cursor=abc",
        "actor=nobody",
        "aggregate_id=abc",
        "from=yesterday",
        "to=2024-13-01T00:00:00Z",
        "unknown=1",
    ] {
        refused_bodyless(t, Method::GET, &format!("{path}?{query}"), 400).await;
    }
    // The controls: the limits themselves are fine.
    for query in [
        "limit=1",
        "limit=500",
        "order=asc&limit=2&cursor=1",
        "actor=00000000-0000-0000-0000-000000000000",
    ] {
        let r = t.get(&format!("{path}?{query}"), &t.admin_key).await;
        assert_eq!(r.status, 200, "{query}: {}", r.body);
    }
}

/// A NUL character cannot reach PostgreSQL (`text` cannot hold one: the query would fail
/// with a 500), so every query string refuses one, naming the parameter, like a bad value.
#[tokio::test]
async fn nul_characters_in_query_parameters_are_400() {
    let f = fixture().await;
    let (t, org, user) = (&f.t, f.org, f.user);
    let audit = org_path(org, "/audit-events");
    for (query, parameter) in [
        ("event_type=%00", "event_type"),
        ("aggregate_id=%00abc", "aggregate_id"),
        ("aggregate_type=Us%00er", "aggregate_type"),
        ("order=asc&event_type=UserInvited%00", "event_type"),
    ] {
        let r = refused_bodyless(t, Method::GET, &format!("{audit}?{query}"), 400).await;
        assert_error_mentions(
            &r,
            &format!("invalid query: {parameter} must not contain the NUL character"),
        );
    }
    // The paged lists' cursor is a string too.
    for list in [
        "/v1/organizations".to_string(),
        org_path(org, "/users"),
        org_path(org, "/roles"),
        org_path(org, &format!("/users/{user}/roles")),
    ] {
        let r = refused_bodyless(t, Method::GET, &format!("{list}?cursor=ab%00c"), 400).await;
        assert_error_mentions(
            &r,
            "invalid query: cursor must not contain the NUL character",
        );
    }
    // Nor can a cursor made by hand carry one inside its encoding, to a list whose key
    // holds text (a role's name).
    for (list, key) in [
        (
            org_path(org, "/roles"),
            json!(["roles", ["2026-01-01T00:00:00Z", "a\u{0}"]]),
        ),
        (
            org_path(org, &format!("/users/{user}/roles")),
            json!(["user-roles", ["a\u{0}", Uuid::nil()]]),
        ),
    ] {
        let cursor = URL_SAFE_NO_PAD.encode(key.to_string());
        let r = refused_bodyless(t, Method::GET, &format!("{list}?cursor={cursor}"), 400).await;
        assert_error_mentions(&r, "invalid query: cursor is malformed");
    }
    // A path's only free strings (an entity type, an emoji) are checked against what they
    // may be before any query: the NUL is a 400 (the emoji's is in tests/messaging.rs).
    let r = refused_bodyless(
        t,
        Method::GET,
        &org_path(org, &format!("/history/us%00er/{user}")),
        400,
    )
    .await;
    assert_error_mentions(&r, "unknown entity type");
    // The controls: the same parameters without the NUL are read.
    let r = t
        .get(&format!("{audit}?event_type=UserInvited"), &t.admin_key)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["items"][0]["event_type"], json!("UserInvited"));
    for query in [
        format!("aggregate_id={user}"),
        "aggregate_type=User".to_string(),
    ] {
        let r = t.get(&format!("{audit}?{query}"), &t.admin_key).await;
        assert_eq!(r.status, 200, "{query}: {}", r.body);
    }
}

#[tokio::test]
async fn bad_ledger_query_params_are_400() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    let path = org_path(org, "/ledger/events");
    for query in ["limit=0", "limit=1001", "limit=x", "after=abc", "unknown=1"] {
        refused_bodyless(t, Method::GET, &format!("{path}?{query}"), 400).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Uniqueness and structural rules
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn duplicate_organization_name_or_slug_is_409() {
    let f = fixture().await;
    let t = &f.t;
    refused(
        t,
        Method::POST,
        "/v1/organizations",
        json!({"name": "Acme", "slug": "acme-2"}),
        409,
    )
    .await;
    refused(
        t,
        Method::POST,
        "/v1/organizations",
        json!({"name": "ACME", "slug": "acme-3"}),
        409,
    )
    .await;
    refused(
        t,
        Method::POST,
        "/v1/organizations",
        json!({"name": "Acme Two", "slug": "acme"}),
        409,
    )
    .await;
    // Renaming another organization onto a taken name or slug.
    let other = t.create_org("Globex").await;
    refused(
        t,
        Method::PATCH,
        &org_path(other, ""),
        json!({"name": "acme"}),
        409,
    )
    .await;
    refused(
        t,
        Method::PATCH,
        &org_path(other, ""),
        json!({"slug": "acme"}),
        409,
    )
    .await;
}

#[tokio::test]
async fn duplicate_email_in_an_organization_is_409_case_insensitively() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    let keys = subject_keys(t).await;
    for dup in [
        "ada@example.com",
        "ADA@EXAMPLE.COM",
        "Ada@Example.com",
        " ada@example.com ",
    ] {
        refused(
            t,
            Method::POST,
            &org_path(org, "/users"),
            json!({"email": dup, "full_name": "Another Ada"}),
            409,
        )
        .await;
    }
    assert_eq!(
        subject_keys(t).await,
        keys,
        "a refused invite leaves no data key behind"
    );
    // Changing another user's address onto a taken one.
    let bob = t.invite(org, "bob@example.com", "Bob").await;
    refused(
        t,
        Method::PATCH,
        &org_path(org, &format!("/users/{bob}")),
        json!({"email": "ADA@example.com"}),
        409,
    )
    .await;
    let r = t
        .get(&org_path(org, &format!("/users/{bob}")), &t.admin_key)
        .await;
    assert_eq!(r.body["email"], "bob@example.com");
}

#[tokio::test]
async fn the_same_email_in_another_organization_is_fine() {
    let f = fixture().await;
    let other = f.t.create_org("Globex").await;
    let r =
        f.t.post(
            &org_path(other, "/users"),
            &f.t.admin_key,
            json!({"email": "ada@example.com", "full_name": "Ada Elsewhere"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test]
async fn duplicate_role_name_is_409() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    // (A built-in role's name is refused before any claim: 422, see
    // `a_role_of_ones_own_cannot_take_a_built_in_name`.)
    for dup in ["support", "Support", "SUPPORT"] {
        refused(
            t,
            Method::POST,
            &org_path(org, "/roles"),
            json!({"name": dup}),
            409,
        )
        .await;
    }
    let r = t
        .post(
            &org_path(org, "/roles"),
            &t.admin_key,
            json!({"name": "ops"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let ops = r.body["id"].as_str().unwrap();
    refused(
        t,
        Method::PATCH,
        &org_path(org, &format!("/roles/{ops}")),
        json!({"name": "Support"}),
        409,
    )
    .await;
    // Another organization may use the name.
    let other = t.create_org("Globex").await;
    let r = t
        .post(
            &org_path(other, "/roles"),
            &t.admin_key,
            json!({"name": "support"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test]
async fn built_in_roles_cannot_be_deleted_or_renamed() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    for name in ["owner", "admin", "member", "auditor"] {
        let id = t.role_id(org, name).await;
        refused_bodyless(
            t,
            Method::DELETE,
            &org_path(org, &format!("/roles/{id}")),
            409,
        )
        .await;
        refused(
            t,
            Method::PATCH,
            &org_path(org, &format!("/roles/{id}")),
            json!({"name": format!("{name} 2")}),
            409,
        )
        .await;
    }
}

#[tokio::test]
async fn cycles_in_role_parents_are_422() {
    let f = fixture().await;
    let (t, org) = (&f.t, f.org);
    let create = |name: &'static str, parent: Option<String>| {
        let body = json!({"name": name, "permissions": ["users:read"], "parent_role_id": parent});
        async move {
            let r = t.post(&org_path(org, "/roles"), &t.admin_key, body).await;
            assert_eq!(r.status, 201, "{}", r.body);
            r.body["id"].as_str().unwrap().to_string()
        }
    };
    let a = create("a", None).await;
    let b = create("b", Some(a.clone())).await;
    let c = create("c", Some(b.clone())).await;
    for (role, parent) in [(&a, &a), (&a, &b), (&a, &c), (&b, &c)] {
        let r = refused(
            t,
            Method::PATCH,
            &org_path(org, &format!("/roles/{role}")),
            json!({"parent_role_id": parent}),
            422,
        )
        .await;
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("inherit"),
            "{}",
            r.body
        );
    }
}

#[tokio::test]
async fn role_parent_must_be_a_role_of_the_organization() {
    let f = fixture().await;
    let (t, org, role) = (&f.t, f.org, f.role);
    let other = t.create_org("Globex").await;
    let foreign = t.role_id(other, "member").await;
    for parent in [foreign, Uuid::new_v4()] {
        refused(
            t,
            Method::POST,
            &org_path(org, "/roles"),
            json!({"name": "ops", "parent_role_id": parent}),
            422,
        )
        .await;
        refused(
            t,
            Method::PATCH,
            &org_path(org, &format!("/roles/{role}")),
            json!({"parent_role_id": parent}),
            422,
        )
        .await;
    }
}

#[tokio::test]
async fn deleted_role_is_gone() {
    let f = fixture().await;
    let (t, org, role) = (&f.t, f.org, f.role);
    assert_eq!(
        t.delete(&org_path(org, &format!("/roles/{role}")), &t.admin_key)
            .await
            .status,
        204
    );
    refused_bodyless(
        t,
        Method::DELETE,
        &org_path(org, &format!("/roles/{role}")),
        404,
    )
    .await;
    refused(
        t,
        Method::PATCH,
        &org_path(org, &format!("/roles/{role}")),
        json!({"description": "back"}),
        404,
    )
    .await;
    refused(
        t,
        Method::PUT,
        &org_path(org, &format!("/users/{}/roles/{role}", f.user)),
        json!({}),
        404,
    )
    .await;
}
