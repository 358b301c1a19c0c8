//! Health, readiness, metrics, the caller's own identity, and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;

use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::ROUTES;
use crate::app::App;

pub async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(json!({ "status": "ok" }))
}

/// Ready when the database answers and no projection is stopped on a failure.
pub async fn readyz(State(app): State<App>) -> ApiResult<axum::Json<serde_json::Value>> {
    let statuses = ledgerline_projections::status(&app.pool)
        .await
        .map_err(|e| {
            // This answer needs no key: the cause (which can name hosts, databases and
            // roles) goes to the server's log only.
            tracing::warn!(error = %e, "readiness: the database did not answer");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database not ready (the server's log says why)",
            )
        })?;
    // The one error shape has no room for structure, so each stopped projection goes into
    // the message: "users at position 12, roles at position 9". Not the error itself: this
    // answer needs no key, and a decoding error can quote an event's fields.
    let mut stopped: Vec<String> = statuses
        .iter()
        .filter_map(|s| {
            let f = s.failures.first()?;
            Some(format!("{} at position {}", s.name, f.position))
        })
        .collect();
    if let Some(why) = app.log_halted() {
        // Commands still append (the log is the record), but nothing more is signed.
        stopped.push(format!(
            "the log maintainer ({why}; nothing more is signed)"
        ));
    }
    if !stopped.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stopped on a failure: {} (`ledgerline projections status` and `ledgerline \
                 verify` show why)",
                stopped.join(", ")
            ),
        ));
    }
    Ok(axum::Json(json!({ "status": "ready" })))
}

/// Prometheus text (see `crate::metrics`). Unauthenticated like `/readyz`: it carries counts,
/// positions and projection names, never a tenant's id or data.
pub async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(&app.pool, app.log_halted().is_some()).await,
    )
}

pub async fn me(
    State(app): State<App>,
    caller: Caller,
) -> ApiResult<axum::Json<serde_json::Value>> {
    let organization = match caller.organization_id {
        Some(org) => Some(super::organizations::find(&app, org).await?),
        None => None,
    };
    Ok(axum::Json(json!({
        "key": { "id": caller.key_id, "prefix": caller.prefix },
        "user_id": caller.user_id,
        "organization": organization,
        "permissions": caller.permissions,
    })))
}

/// The OpenAPI 3.1 document, generated from the same route table the router is checked against.
pub async fn openapi() -> axum::Json<serde_json::Value> {
    axum::Json(document())
}

pub fn document() -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    for r in ROUTES {
        let params: Vec<_> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": r.summary,
            "operationId": format!("{}_{}", r.method.to_lowercase(), r.path.trim_start_matches('/').replace(['/', '{', '}', '-'], "_")),
            "parameters": params,
            "responses": {
                "default": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        op["responses"][r.success.to_string()] = json!({"description": "success"});
        if r.success == 201 {
            op["responses"]["202"] = json!({"description":
                "recorded in the log, not yet shown by the read models (header \
                 `ledgerline-read-models: behind`): `{\"id\": ...}`"});
        }
        if let Some(p) = r.permission {
            op["security"] = json!([{ "bearer": [] }]);
            op["x-permission"] = json!(p);
        }
        paths
            .entry(r.path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(r.method.to_lowercase(), op);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "ledgerline", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {
                "type": "object",
                "properties": {"error": {"type": "object", "properties": {
                    "status": {"type": "integer"}, "code": {"type": "string"}, "message": {"type": "string"}
                }}}
            }}
        }
    })
}
