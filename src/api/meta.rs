//! Health, readiness, metrics, the caller's own identity, and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use ledgerline_aggregates::Permission;
use schemars::JsonSchema;
use serde::Serialize;
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::organizations::OrganizationView;
use crate::app::App;

/// Liveness and readiness: a failure is an error answer instead.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Status {
    /// `ok` (alive) or `ready`.
    #[schemars(extend("enum" = ["ok", "ready"]))]
    pub status: &'static str,
}

pub async fn healthz() -> axum::Json<Status> {
    axum::Json(Status { status: "ok" })
}

/// Ready when the database answers and no projection is stopped on a failure.
pub async fn readyz(State(app): State<App>) -> ApiResult<axum::Json<Status>> {
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
    let stopped: Vec<String> = statuses
        .iter()
        .filter_map(|s| {
            let f = s.failures.first()?;
            Some(format!("{} at position {}", s.name, f.position))
        })
        .collect();
    // Each part points to where its cause is shown: a projection's failure is stored and
    // `projections status` prints it; the maintainer's halt lives in this process alone (and
    // its log), so no command can show it, but `verify` can check what it would have signed.
    let mut parts = Vec::new();
    if !stopped.is_empty() {
        parts.push(format!(
            "{} (`ledgerline projections status` shows why)",
            stopped.join(", ")
        ));
    }
    if let Some(why) = app.log_halted() {
        // Commands still append (the log is the record), but nothing more is signed.
        let check = if app.log_signer().and_then(|s| s.anchor_file()).is_some() {
            "`ledgerline verify --since` with the server's checkpoint anchor file \
             (LEDGERLINE_CHECKPOINT_ANCHOR_FILE) and --public-key checks the log against what \
             it signed"
        } else {
            "`ledgerline verify --public-key` checks the log against the database's checkpoints"
        };
        parts.push(format!(
            "the log maintainer ({why}; nothing more is signed; the server's log says why, \
             and {check})"
        ));
    }
    if !parts.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stopped on a failure: {}", parts.join("; ")),
        ));
    }
    Ok(axum::Json(Status { status: "ready" }))
}

/// Prometheus text (see `crate::metrics`). Unauthenticated like `/readyz`: it carries counts,
/// positions and projection names, never a tenant's id or data.
pub async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(&app.pool, app.log_halted().is_some()).await,
    )
}

/// The calling key as `/v1/me` shows it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct MeView {
    pub key: KeyIdentity,
    /// The user the key acts as; `null` for a service or platform key.
    pub user_id: Option<Uuid>,
    /// The key's organization; `null` for a platform key.
    pub organization: Option<OrganizationView>,
    /// What a request with this key may do: the key's permissions, cut down to its user's
    /// current roles.
    pub permissions: Vec<Permission>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct KeyIdentity {
    pub id: Uuid,
    /// The prefix of the secret this request was made with.
    pub prefix: String,
    /// Set when that secret was rotated away and is in the grace period the rotation gave
    /// it: when it stops working (move to the new one before).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_valid_until: Option<DateTime<Utc>>,
}

pub async fn me(State(app): State<App>, caller: Caller) -> ApiResult<axum::Json<MeView>> {
    let organization = match caller.organization_id {
        Some(org) => Some(super::organizations::find(&app, org).await?),
        None => None,
    };
    Ok(axum::Json(MeView {
        key: KeyIdentity {
            id: caller.key_id,
            prefix: caller.prefix,
            secret_valid_until: caller.secret_valid_until,
        },
        user_id: caller.user_id,
        organization,
        permissions: caller.permissions.into_iter().collect(),
    }))
}

/// The OpenAPI 3.1 document (see [`super::openapi`]), serialised once: each request then
/// shares the bytes instead of cloning and writing the whole tree again.
pub async fn openapi() -> impl IntoResponse {
    static BYTES: std::sync::LazyLock<axum::body::Bytes> = std::sync::LazyLock::new(|| {
        serde_json::to_vec(super::openapi::document())
            .expect("a JSON value always serialises")
            .into()
    });
    ([(header::CONTENT_TYPE, "application/json")], BYTES.clone())
}
