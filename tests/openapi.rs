//! The OpenAPI document against the running server: each route's request body and query are
//! the ones its handler reads, and real answers (and the bodies a client sends) validate
//! against the schemas the document gives for them.

mod common;

use common::{assert_error_says, concrete, Response, TestApp};
use ledgerline::api::ROUTES;
use reqwest::Method;
use serde_json::{json, Value};

/// The document as a client fetches it.
async fn document(t: &TestApp) -> Value {
    let r = t.get("/v1/openapi.json", &t.admin_key).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// The route table's path that `path` (with ids, maybe a query) is an instance of: literal
/// segments must match, and the one with the most literal segments wins.
fn template(method: &str, path: &str) -> &'static str {
    let path = path.split('?').next().unwrap();
    let segments: Vec<&str> = path.split('/').collect();
    ROUTES
        .iter()
        .filter(|r| r.method == method)
        .filter_map(|r| {
            let parts: Vec<&str> = r.path.split('/').collect();
            if parts.len() != segments.len() {
                return None;
            }
            let mut literal = 0;
            for (p, s) in parts.iter().zip(&segments) {
                if p.starts_with('{') {
                    continue;
                }
                if p != s {
                    return None;
                }
                literal += 1;
            }
            Some((literal, r.path))
        })
        .max()
        .unwrap_or_else(|| panic!("{method} {path} is in the route table"))
        .1
}

/// Validates instances against schemas of one document, `$ref`s resolved within it. Every
/// object schema of `components` is closed (`additionalProperties: false`) here, so that an
/// answer carrying a field the document does not name fails as well.
struct Checker {
    doc: Value,
    closed: Value,
}

impl Checker {
    fn new(doc: Value) -> Self {
        let mut schemas = doc["components"]["schemas"].clone();
        for schema in schemas
            .as_object_mut()
            .expect("components/schemas")
            .values_mut()
        {
            if schema.get("properties").is_some() && schema.get("additionalProperties").is_none() {
                schema["additionalProperties"] = json!(false);
            }
        }
        Self {
            doc,
            closed: json!({"schemas": schemas}),
        }
    }

    fn operation(&self, method: &str, path: &str) -> &Value {
        let op = &self.doc["paths"][template(method, path)][method.to_lowercase()];
        assert!(op.is_object(), "{method} {path} is documented");
        op
    }

    /// The errors of `instance` against `schema` (which may refer into `components`).
    fn errors(&self, schema: &Value, instance: &Value) -> Vec<String> {
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": self.closed,
            "allOf": [schema],
        });
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("{schema} is a schema: {e}"));
        validator
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect()
    }

    fn assert_valid(&self, what: &str, schema: &Value, instance: &Value) {
        let errors = self.errors(schema, instance);
        assert!(
            errors.is_empty(),
            "{what} does not match the document: {errors:?}\nschema: {schema}\ninstance: {instance}"
        );
    }

    /// The schema of the JSON body `method path` takes.
    fn request_schema(&self, method: &str, path: &str) -> &Value {
        let schema =
            &self.operation(method, path)["requestBody"]["content"]["application/json"]["schema"];
        assert!(schema.is_object(), "{method} {path} documents its body");
        schema
    }

    /// The schema of the answer `method path` gives with `status`.
    fn answer_schema(&self, method: &str, path: &str, status: u16) -> Option<&Value> {
        let responses = &self.operation(method, path)["responses"];
        let documented = &responses[status.to_string()];
        let response = if documented.is_object() {
            documented
        } else {
            assert!(status >= 400, "{method} {path} documents its {status}");
            &responses["default"]
        };
        let content = response.get("content")?;
        Some(&content["application/json"]["schema"])
    }

    fn check_request(&self, method: &str, path: &str, body: &Value) {
        let schema = self.request_schema(method, path);
        self.assert_valid(&format!("the body of {method} {path}"), schema, body);
    }

    fn check_answer(&self, method: &str, path: &str, r: &Response) {
        let what = format!("the {} answer of {method} {path}", r.status);
        match self.answer_schema(method, path, r.status) {
            Some(schema) => self.assert_valid(&what, schema, &r.body),
            None => assert_eq!(r.body, Value::Null, "{what} has no content"),
        }
    }
}

/// A client of the test app that checks every body it sends and every answer it gets.
struct Client<'a> {
    t: &'a TestApp,
    check: Checker,
}

impl Client<'_> {
    async fn call(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> Response {
        if let Some(b) = &body {
            self.check.check_request(method, path, b);
        }
        let r = self
            .t
            .call(method.parse().unwrap(), path, Some(key), body)
            .await;
        self.check.check_answer(method, path, &r);
        r
    }

    async fn get(&self, path: &str, key: &str) -> Response {
        let r = self.call("GET", path, key, None).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Value,
        status: u16,
    ) -> Response {
        let r = self.call(method, path, key, Some(body)).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        r
    }
}

fn id(r: &Response) -> String {
    r.body["id"].as_str().expect("an id").to_string()
}

#[tokio::test]
async fn real_answers_and_bodies_match_the_document() {
    let t = TestApp::spawn().await;
    let c = Client {
        t: &t,
        check: Checker::new(document(&t).await),
    };
    let admin = t.admin_key.as_str();

    c.get("/healthz", admin).await;
    c.get("/readyz", admin).await;
    c.get("/v1/me", admin).await;

    let org = id(&c
        .send(
            "POST",
            "/v1/organizations",
            admin,
            json!({"name": "Acme", "slug": "acme", "country_code": "DE", "settings": {"theme": "dark"}}),
            201,
        )
        .await);
    let o = format!("/v1/organizations/{org}");
    c.get("/v1/organizations", admin).await;
    let view = c.get(&o, admin).await;
    assert_eq!(
        view.body["domain"],
        Value::Null,
        "an absent field is answered as null"
    );
    c.send(
        "PATCH",
        &o,
        admin,
        json!({"country_code": null, "domain": "acme.example"}),
        200,
    )
    .await;

    let user = id(&c
        .send(
            "POST",
            &format!("{o}/users"),
            admin,
            json!({"email": "ada@example.com", "full_name": "Ada Lovelace"}),
            201,
        )
        .await);
    c.get(&format!("{o}/users"), admin).await;
    c.get(&format!("{o}/users/{user}"), admin).await;
    c.send(
        "PATCH",
        &format!("{o}/users/{user}"),
        admin,
        json!({"full_name": "Ada King"}),
        200,
    )
    .await;

    let role = id(&c
        .send(
            "POST",
            &format!("{o}/roles"),
            admin,
            json!({"name": "support", "permissions": ["users:read", "audit:read"]}),
            201,
        )
        .await);
    c.get(&format!("{o}/roles"), admin).await;
    c.get(&format!("{o}/roles/{role}"), admin).await;
    c.send(
        "PATCH",
        &format!("{o}/roles/{role}"),
        admin,
        json!({"description": "On call", "parent_role_id": null}),
        200,
    )
    .await;
    c.send(
        "PUT",
        &format!("{o}/users/{user}/roles/{role}"),
        admin,
        json!({"reason": "on call", "expires_at": "2999-01-01T00:00:00Z"}),
        200,
    )
    .await;
    c.get(&format!("{o}/users/{user}/roles"), admin).await;

    let issued = c
        .send(
            "POST",
            &format!("{o}/api-keys"),
            admin,
            json!({"label": "ada laptop", "permissions": ["users:read"], "user_id": user}),
            201,
        )
        .await;
    let key = id(&issued);
    c.get(&format!("{o}/api-keys"), admin).await;
    c.get(&format!("{o}/api-keys/{key}"), admin).await;
    let ada = issued.body["secret"].as_str().unwrap().to_string();
    c.get("/v1/me", &ada).await;

    // A conversation between two members, each acting through a key of their own.
    let (alice, alice_key) = t
        .member_with_key(org.parse().unwrap(), "member", "alice@example.com")
        .await;
    let (bob, _) = t
        .member_with_key(org.parse().unwrap(), "member", "bob@example.com")
        .await;
    let conversation = id(&c
        .send(
            "POST",
            &format!("{o}/conversations"),
            &alice_key,
            json!({"kind": "group", "title": "Launch", "participants": [bob]}),
            201,
        )
        .await);
    let cv = format!("{o}/conversations/{conversation}");
    c.get(&format!("{o}/conversations"), &alice_key).await;
    c.get(&format!("{o}/conversations"), admin).await;
    c.get(&cv, &alice_key).await;
    c.send(
        "PATCH",
        &cv,
        &alice_key,
        json!({"title": "Launch v2", "description": null}),
        200,
    )
    .await;
    c.send(
        "PATCH",
        &format!("{cv}/participants/{alice}"),
        &alice_key,
        json!({"muted": true}),
        200,
    )
    .await;

    let digest = blake3::hash(b"the plan").to_hex().to_string();
    let message = id(&c
        .send(
            "POST",
            &format!("{cv}/messages"),
            &alice_key,
            json!({"content": "hello", "attachments": [
                {"file_name": "plan.pdf", "mime_type": "application/pdf", "size_bytes": 8, "blake3": digest}
            ]}),
            201,
        )
        .await);
    let reply = id(&c
        .send(
            "POST",
            &format!("{cv}/messages"),
            admin,
            json!({"content": "hi", "parent_message_id": message, "author_id": bob}),
            201,
        )
        .await);
    let m = format!("{cv}/messages/{message}");
    let r = c
        .call(
            "PUT",
            &format!("{m}/reactions/%F0%9F%91%8D"),
            &alice_key,
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    c.send(
        "PATCH",
        &m,
        &alice_key,
        json!({"content": "hello, all"}),
        200,
    )
    .await;
    let page = c.get(&format!("{cv}/messages?limit=1"), &alice_key).await;
    assert!(page.body["next_cursor"].is_i64(), "{}", page.body);
    c.get(&format!("{cv}/messages?thread={message}"), &alice_key)
        .await;
    c.get(&m, &alice_key).await;
    c.send(
        "POST",
        &format!("{cv}/read"),
        &alice_key,
        json!({"message_id": reply}),
        200,
    )
    .await;
    let r = c
        .call("DELETE", &format!("{cv}/messages/{reply}"), admin, None)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    c.get(&format!("{cv}/messages"), &alice_key).await;

    let audit = c
        .get(&format!("{o}/audit-events?limit=2&order=asc"), admin)
        .await;
    assert!(audit.body["next_cursor"].is_i64(), "{}", audit.body);
    c.get(&format!("{o}/audit-events?event_type=UserInvited"), admin)
        .await;
    c.get(&format!("{o}/history/organization/{org}"), admin)
        .await;
    c.get(&format!("{o}/history/message/{message}"), admin)
        .await;
    c.get(&format!("{o}/ledger/events?limit=3"), admin).await;
    // The keyset lists' cursors are strings: a page that names one is checked against the
    // document too (a list of one item has none to name).
    let mut named = 0;
    for list in [
        "/v1/organizations".to_string(),
        format!("{o}/users"),
        format!("{o}/roles"),
        format!("{o}/users/{user}/roles"),
        format!("{o}/api-keys"),
        format!("{o}/conversations"),
    ] {
        let all = c.get(&list, admin).await.body["items"]
            .as_array()
            .map_or(0, Vec::len);
        let first = c.get(&format!("{list}?limit=1"), admin).await;
        let cursor = &first.body["next_cursor"];
        assert_eq!(cursor.is_string(), all > 1, "{list}: {}", first.body);
        named += usize::from(all > 1);
    }
    assert!(named >= 3, "most lists named a cursor");
    c.get("/v1/ledger/head", admin).await;
    c.get("/v1/ledger/public-key", admin).await;

    c.send(
        "POST",
        &format!("{o}/api-keys/{key}/revoke"),
        admin,
        json!({"reason": "lost"}),
        200,
    )
    .await;
    let r = c
        .call("POST", &format!("{o}/users/{user}/erase"), admin, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["email"], Value::Null, "{}", r.body);

    // Errors have the one shape too.
    let r = c
        .call("GET", &format!("{o}/users/{org}"), admin, None)
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = c
        .call(
            "POST",
            &format!("{cv}/messages"),
            &alice_key,
            Some(json!({"content": " "})),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
}

/// The checks above can fail: a real answer with a field taken away, of the wrong type, or
/// one the document does not name, does not pass.
#[tokio::test]
async fn the_checker_refuses_what_the_document_does_not_promise() {
    let t = TestApp::spawn().await;
    let check = Checker::new(document(&t).await);
    let org = t.create_org("Initech").await;
    let path = format!("/v1/organizations/{org}");
    let real = t.get(&path, &t.admin_key).await;
    check.check_answer("GET", &path, &real);
    let schema = check.answer_schema("GET", &path, 200).unwrap();
    let broken = |change: &dyn Fn(&mut Value)| {
        let mut body = real.body.clone();
        change(&mut body);
        body
    };
    for (what, body) in [
        (
            "a missing field",
            broken(&|b| drop(b.as_object_mut().unwrap().remove("status"))),
        ),
        (
            "a null where a string is promised",
            broken(&|b| b["name"] = Value::Null),
        ),
        ("a number for a string", broken(&|b| b["slug"] = json!(7))),
        (
            "a malformed uuid",
            broken(&|b| b["id"] = json!("not-a-uuid")),
        ),
        (
            "a malformed time",
            broken(&|b| b["created_at"] = json!("yesterday")),
        ),
        (
            "a field the document does not name",
            broken(&|b| b["secret"] = json!("x")),
        ),
    ] {
        assert!(!check.errors(schema, &body).is_empty(), "{what} is refused");
    }
    // A creation's answer: a view with a field missing is neither the view nor its id alone.
    let created = check
        .answer_schema("POST", "/v1/organizations", 201)
        .unwrap();
    assert!(check.errors(created, &real.body).is_empty());
    assert!(check.errors(created, &json!({"id": org})).is_empty());
    let mut partial = real.body.clone();
    partial.as_object_mut().unwrap().remove("slug");
    assert!(!check.errors(created, &partial).is_empty());
    // A body with an unknown or mistyped field is refused by the request schema as by the
    // server.
    let body = check.request_schema("POST", "/v1/organizations");
    assert!(check
        .errors(body, &json!({"name": "A", "slug": "a"}))
        .is_empty());
    assert!(!check
        .errors(body, &json!({"name": "A", "slug": "a", "color": "red"}))
        .is_empty());
    assert!(!check.errors(body, &json!({"name": "A"})).is_empty());
}

/// What a probe's error says about the route's extractors: the struct its body is read into
/// (serde names it when the body is of the wrong type), or the fields its query takes.
fn expected_struct(r: &Response) -> Option<String> {
    let message = r.body["error"]["message"].as_str()?;
    let rest = message.split("expected struct ").nth(1)?;
    Some(
        rest.split(|c: char| !c.is_alphanumeric() && c != '_')
            .next()?
            .to_string(),
    )
}

/// The fields a query struct takes, from serde's refusal of an unknown one; `None` when the
/// route reads no query.
fn query_fields(r: &Response) -> Option<Vec<String>> {
    let message = r.body["error"]["message"].as_str()?;
    let rest = message.split("unknown field `zzz`").nth(1)?;
    if rest.contains("there are no fields") {
        return Some(Vec::new());
    }
    let mut fields: Vec<String> = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    fields.sort();
    Some(fields)
}

fn ref_name(schema: &Value) -> &str {
    schema["$ref"]
        .as_str()
        .and_then(|r| r.rsplit('/').next())
        .unwrap_or_else(|| panic!("{schema} refers to a named schema"))
}

/// Probes every route with a body of the wrong type, with no body, and with an unknown query
/// parameter (fresh ids in its path, so nothing is found and nothing changes), and compares
/// what the extractors say with what the document says.
#[tokio::test]
async fn every_route_documents_the_body_and_query_its_handler_reads() {
    let t = TestApp::spawn().await;
    let doc = document(&t).await;
    let before = t.head().await;
    let mut bodies = 0;
    let mut queries = 0;
    let mut uuids = 0;
    for route in ROUTES {
        let method: Method = route.method.parse().unwrap();
        let name = format!("{} {}", route.method, route.path);
        let op = &doc["paths"][route.path][route.method.to_lowercase()];
        let path = concrete(route.path);

        let wrong = t
            .raw(
                method.clone(),
                &path,
                &t.admin_key,
                "application/json",
                b"true".to_vec(),
            )
            .await;
        let documented = &op["requestBody"];
        match expected_struct(&wrong).as_deref() {
            None | Some("Nothing") => {
                assert!(
                    documented.is_null(),
                    "{name} reads no body but documents {documented}"
                )
            }
            Some(read) => {
                let schema = &documented["content"]["application/json"]["schema"];
                assert_eq!(ref_name(schema), read, "{name}: the body it reads");
                bodies += 1;
                // `Json` refuses a request without one; `OptionalJson` does not.
                let none = t
                    .call(method.clone(), &path, Some(&t.admin_key), None)
                    .await;
                assert_eq!(
                    documented["required"] == true,
                    none.status == 415,
                    "{name}: required is {}, and without a body: {} {}",
                    documented["required"],
                    none.status,
                    none.body
                );
            }
        }

        // A path parameter documented as a UUID is read as one: anything else is a 400 that
        // names the path.
        for param in op["parameters"].as_array().unwrap() {
            let p = param["name"].as_str().unwrap();
            if param["in"] != "path" || param["schema"]["format"] != "uuid" {
                continue;
            }
            let bad = concrete(&route.path.replace(&format!("{{{p}}}"), "not-a-uuid"));
            let r = t.call(method.clone(), &bad, Some(&t.admin_key), None).await;
            assert_error_says(&r, 400, "path");
            uuids += 1;
        }

        let probe = t
            .call(method, &format!("{path}?zzz=1"), Some(&t.admin_key), None)
            .await;
        let mut documented: Vec<String> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect();
        documented.sort();
        let read = query_fields(&probe).unwrap_or_default();
        assert_eq!(
            documented, read,
            "{name}: the query it reads ({})",
            probe.body
        );
        queries += usize::from(!read.is_empty());
    }
    assert!(bodies >= 18, "the probe finds the bodies ({bodies})");
    assert!(queries >= 7, "the probe finds the queries ({queries})");
    assert!(uuids >= 80, "the probe finds the UUIDs in paths ({uuids})");
    assert_eq!(t.head().await, before, "the probes changed nothing");
}

/// Every field of every PATCH body either clears on `null`, and the document types it nullable
/// and says so, or refuses `null` (422, naming it, before the handler looks at anything), and
/// the document types it not nullable: `null` is never quietly read as absent. (What clearing
/// gives is checked per resource in tests/bad_input.rs.)
#[tokio::test]
async fn a_patch_field_clears_on_null_or_refuses_it_as_documented() {
    let t = TestApp::spawn().await;
    let check = Checker::new(document(&t).await);
    let before = t.head().await;
    let (mut cleared, mut refused) = (Vec::new(), Vec::new());
    for route in ROUTES.iter().filter(|r| r.method == "PATCH") {
        let body = check.request_schema("PATCH", route.path);
        let body = &check.doc["components"]["schemas"][ref_name(body)];
        let required = body["required"].as_array().cloned().unwrap_or_default();
        for (field, schema) in body["properties"].as_object().unwrap() {
            if required.contains(&json!(field)) {
                continue;
            }
            let name = format!("PATCH {} {field}", route.path);
            let said = schema["description"].as_str().unwrap_or_default();
            if check.errors(schema, &Value::Null).is_empty() {
                assert!(said.contains("null: cleared"), "{name}: {said:?}");
                cleared.push(name);
                continue;
            }
            assert!(said.contains("null is refused"), "{name}: {said:?}");
            let path = concrete(route.path);
            let r = t
                .call(
                    Method::PATCH,
                    &path,
                    Some(&t.admin_key),
                    Some(json!({ field: null })),
                )
                .await;
            common::assert_error_says(&r, 422, &format!("{field}: cannot be null"));
            refused.push(name);
        }
    }
    assert!(cleared.len() >= 8, "nullable: {cleared:?}");
    assert!(refused.len() >= 7, "refusing null: {refused:?}");
    assert_eq!(t.head().await, before, "the refusals changed nothing");
}
