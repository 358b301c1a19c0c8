//! The OpenAPI 3.1 document (`GET /v1/openapi.json`), made from the route table: each route's
//! request body, query parameters and success answer are JSON Schemas (2020-12) that schemars
//! derives from the very types its handler reads and answers, so the two cannot drift apart.
//! Named types go to `components/schemas` and are referred to with `$ref`.

use std::sync::LazyLock;

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{json, Map, Value};

use super::answers::{CreatedId, Recorded};
use super::error::ErrorBody;
use super::{RouteDoc, ROUTES};

/// Makes the schema of one type: a `$ref` into `components/schemas` for a named type.
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// The [`SchemaFn`] of `T`.
pub fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// What a route reads from the request's body.
#[derive(Clone, Copy)]
pub enum Body {
    /// Nothing: its handler takes [`NoBody`](super::NoBody) or reads no body.
    None,
    /// `Json<T>`: a body of this schema is required.
    Required(SchemaFn),
    /// `OptionalJson<T>`: a body of this schema, or none.
    Optional(SchemaFn),
}

/// What a route answers on success.
#[derive(Clone, Copy)]
pub enum Answer {
    /// Not said yet; a test refuses it in the route table.
    Unsaid,
    /// No content (204).
    NoContent,
    /// JSON of this schema.
    Json(SchemaFn),
    /// A creation's ([`super::created_answer`]): 201 with the view of this schema, or with
    /// its id alone to a key that may create but not read; 202 with its id while the read
    /// models do not show it.
    Created(SchemaFn),
    /// A change's ([`super::changed_answer`]): the view of this schema, or its id alone to a
    /// key that may change but not read it.
    Changed(SchemaFn),
    /// An answer no type describes: its media type and what it holds.
    Described {
        media_type: &'static str,
        description: &'static str,
    },
}

/// The document, made once.
pub fn document() -> &'static Value {
    static DOCUMENT: LazyLock<Value> = LazyLock::new(make);
    &DOCUMENT
}

/// A path parameter's schema: the ids are UUIDs (their extractors refuse anything else with a
/// 400), an entity type is one of the history's names, an emoji any text.
fn path_schema(name: &str) -> Value {
    match name {
        "org" | "id" | "key" | "msg" | "role" | "user" => {
            json!({"type": "string", "format": "uuid"})
        }
        "entity_type" => json!({"type": "string", "enum": super::history::ENTITY_TYPES}),
        _ => json!({"type": "string"}),
    }
}

fn settings() -> SchemaSettings {
    SchemaSettings::draft2020_12().with(|s| s.definitions_path = "/components/schemas".into())
}

fn make() -> Value {
    // A request body is described as it is read, an answer as it is written: an `Option`
    // field may be left out of a body, but an answer always carries it (as `null`).
    let mut requests = settings().for_deserialize().into_generator();
    let mut answers = settings().for_serialize().into_generator();
    // Parameters are flat: nothing of theirs goes to `components`.
    let mut queries = settings()
        .for_deserialize()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let error = answers.subschema_for::<ErrorBody>();
    let mut paths = Map::new();
    for route in ROUTES {
        let op = operation(route, &mut requests, &mut answers, &mut queries, &error);
        paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("a path item is an object")
            .insert(route.method.to_lowercase(), op);
    }
    let mut schemas = answers.take_definitions(true);
    for (name, schema) in requests.take_definitions(true) {
        match schemas.get(&name) {
            Some(known) if *known != schema => {
                panic!("`{name}` is read and written with different schemas: rename one of them")
            }
            _ => schemas.insert(name, schema),
        };
    }
    json!({
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {"title": "ledgerline", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        }
    })
}

/// The answer [`super::changed_answer`] gives: the view of `view`'s schema, or the id alone.
fn view_or_id(view: SchemaFn, answers: &mut SchemaGenerator) -> Value {
    json!({"anyOf": [view(answers), answers.subschema_for::<CreatedId>()]})
}

fn operation(
    r: &RouteDoc,
    requests: &mut SchemaGenerator,
    answers: &mut SchemaGenerator,
    queries: &mut SchemaGenerator,
    error: &Schema,
) -> Value {
    let mut parameters: Vec<Value> = r
        .path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": path_schema(name)}))
        .collect();
    if let Some(query) = r.query {
        parameters.extend(query_parameters(query(queries)));
    }
    let command = r.method != "GET";
    if command {
        parameters.push(idempotency_key());
    }
    let mut op = json!({
        "summary": r.summary,
        "operationId": format!("{}_{}", r.method.to_lowercase(), r.path.trim_start_matches('/').replace(['/', '{', '}', '-', '.'], "_")),
        "parameters": parameters,
        "responses": {"default": {"description": "error", "content": json_content(error.clone())}},
    });
    let (required, body) = match r.body {
        Body::None => (false, None),
        Body::Required(f) => (true, Some(f)),
        Body::Optional(f) => (false, Some(f)),
    };
    if let Some(body) = body {
        op["requestBody"] = json!({"required": required, "content": json_content(body(requests))});
    }
    let success = r.success.to_string();
    let responses = &mut op["responses"];
    match r.answer {
        Answer::Unsaid => responses[success] = json!({"description": "success"}),
        Answer::NoContent => responses[success] = json!({"description": "success, no content"}),
        Answer::Json(f) => {
            responses[success] =
                json!({"description": "success", "content": json_content(f(answers))})
        }
        Answer::Created(f) => {
            responses[success] = json!({
                "description": "created: its view, or its id alone to a key that may create but not read it",
                "content": json_content(view_or_id(f, answers)),
            });
            responses["202"] = json!({
                "description": "recorded in the log, not yet shown by the read models \
                                (header `ledgerline-read-models: behind`)",
                "content": json_content(answers.subschema_for::<Recorded>()),
            });
        }
        Answer::Changed(f) => {
            responses[success] = json!({
                "description": "changed: its view, or its id alone to a key that may change but not read it",
                "content": json_content(view_or_id(f, answers)),
            });
        }
        Answer::Described {
            media_type,
            description,
        } => {
            let kind = if media_type == "application/json" {
                "object"
            } else {
                "string"
            };
            responses[success] = json!({
                "description": description,
                "content": {media_type: {"schema": {"type": kind, "description": description}}},
            });
        }
    }
    if command {
        let replayed = json!({
            "description": "`true` on the answer of an earlier request sent with the same \
                            Idempotency-Key, given again",
            "schema": {"type": "string", "enum": ["true"]},
        });
        for (_, answer) in op["responses"]
            .as_object_mut()
            .expect("responses")
            .iter_mut()
        {
            answer["headers"] = json!({"Idempotent-Replayed": replayed});
        }
    }
    if let Some(p) = r.permission {
        op["security"] = json!([{ "bearer": [] }]);
        op["x-permission"] = json!(p);
    }
    op
}

/// The `Idempotency-Key` header every command takes (`super::idempotency`).
fn idempotency_key() -> Value {
    json!({
        "name": "Idempotency-Key",
        "in": "header",
        "required": false,
        "description": "Makes a retry safe: a request sent again with the key of one already \
            carried out is answered with that one's answer (header `Idempotent-Replayed: \
            true`; an API key's secret is not kept: 409 naming the key), for 24 hours. \
            The key belongs to the API key that sends it. With another method, path, query or \
            body: 422; while the first is running: 409.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7E]+$"},
    })
}

fn json_content(schema: impl serde::Serialize) -> Value {
    json!({"application/json": {"schema": schema}})
}

/// The query parameters of a query struct's (inlined) schema: one per field.
fn query_parameters(query: Schema) -> Vec<Value> {
    let required: Vec<&str> = query
        .get("required")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(properties) = query.get("properties").and_then(Value::as_object) else {
        return Vec::new();
    };
    properties
        .iter()
        .map(|(name, schema)| {
            let mut schema = schema.clone();
            let description = schema.as_object_mut().and_then(|s| s.remove("description"));
            not_null(&mut schema);
            let mut parameter = json!({
                "name": name,
                "in": "query",
                "required": required.contains(&name.as_str()),
                "schema": schema,
            });
            if let Some(d) = description {
                parameter["description"] = d;
            }
            parameter
        })
        .collect()
}

/// A query string has no `null`: an `Option` field is a parameter that may be left out.
fn not_null(schema: &mut Value) {
    if let Some(Value::Array(types)) = schema.get_mut("type") {
        types.retain(|t| t != "null");
        if let [only] = types.as_slice() {
            schema["type"] = only.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in `value`.
    fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
        match value {
            Value::Object(fields) => {
                if let Some(Value::String(r)) = fields.get("$ref") {
                    found.push(r);
                }
                fields.values().for_each(|v| refs(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let mut found = Vec::new();
        refs(doc, &mut found);
        assert!(found.len() > 20, "the document refers to its schemas");
        for r in found {
            let pointer = r
                .strip_prefix('#')
                .expect("a reference within the document");
            assert!(doc.pointer(pointer).is_some(), "{r} resolves");
        }
    }

    #[test]
    fn every_route_says_what_it_takes_and_answers() {
        let doc = document();
        for r in ROUTES {
            let op = &doc["paths"][r.path][r.method.to_lowercase()];
            let answer = &op["responses"][r.success.to_string()];
            match r.answer {
                Answer::Unsaid => panic!("{} {} does not say what it answers", r.method, r.path),
                Answer::NoContent => {
                    assert_eq!(r.success, 204, "{} {}", r.method, r.path);
                    assert!(answer.get("content").is_none());
                }
                Answer::Created(_) => {
                    assert_eq!(r.success, 201, "{} {}", r.method, r.path);
                    assert!(op["responses"]["202"]["content"].is_object());
                }
                Answer::Json(_) | Answer::Changed(_) | Answer::Described { .. } => {
                    assert_ne!(r.success, 204, "{} {}", r.method, r.path)
                }
            }
            if r.success != 204 {
                let content = answer["content"].as_object().expect("content");
                assert!(
                    content.values().all(|c| c["schema"].is_object()),
                    "{} {}: {answer}",
                    r.method,
                    r.path
                );
            }
            // Only commands read a body.
            if r.method == "GET" {
                assert!(matches!(r.body, Body::None), "{} {}", r.method, r.path);
            }
        }
    }

    #[test]
    fn a_cleared_field_is_not_a_default_and_may_be_null() {
        let doc = document();
        let parent = &doc["components"]["schemas"]["UpdateRole"]["properties"]["parent_role_id"];
        assert!(parent.get("default").is_none(), "{parent}");
        assert_eq!(parent["type"], json!(["string", "null"]), "{parent}");
        let required = &doc["components"]["schemas"]["UpdateRole"]["required"];
        assert!(
            required.is_null(),
            "nothing of a PATCH is required: {required}"
        );
    }

    #[test]
    fn commands_document_the_idempotency_key_and_reads_do_not() {
        let doc = document();
        for r in ROUTES {
            let op = &doc["paths"][r.path][r.method.to_lowercase()];
            let header = op["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["in"] == "header" && p["name"] == "Idempotency-Key");
            assert_eq!(
                header.is_some(),
                r.method != "GET",
                "{} {}",
                r.method,
                r.path
            );
            let replayed =
                &op["responses"][r.success.to_string()]["headers"]["Idempotent-Replayed"];
            assert_eq!(
                replayed.is_object(),
                r.method != "GET",
                "{} {}",
                r.method,
                r.path
            );
        }
    }

    #[test]
    fn query_parameters_come_from_the_query_struct() {
        let doc = document();
        let params = doc["paths"]["/v1/organizations/{org}/audit-events"]["get"]["parameters"]
            .as_array()
            .unwrap();
        let mut names: Vec<&str> = params.iter().map(|p| p["name"].as_str().unwrap()).collect();
        names[1..].sort_unstable();
        assert_eq!(
            names,
            [
                "org",
                "actor",
                "actor_key",
                "aggregate_id",
                "aggregate_type",
                "cursor",
                "event_type",
                "from",
                "limit",
                "order",
                "request_id",
                "to"
            ]
        );
        let order = params.iter().find(|p| p["name"] == "order").unwrap();
        assert_eq!(order["required"], false);
        assert_eq!(order["schema"]["enum"], json!(["desc", "asc"]), "{order}");
        let limit = params.iter().find(|p| p["name"] == "limit").unwrap();
        assert_eq!(limit["schema"]["type"], "integer", "{limit}");
    }
}
