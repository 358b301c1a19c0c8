//! The HTTP API: the router, its route table (which the OpenAPI document is generated from),
//! and the extractors and middleware every route shares.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::Router;
use ledgerline_aggregates::{Permission, PermissionSet};
use serde::{Deserialize, Deserializer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use uuid::Uuid;

use crate::app::App;
use answers::{CreatedId, List, PageOf, Recorded};
use error::{ApiError, ApiResult};
pub use extract::{NoBody, Nothing, OptionalJson};
use openapi::{schema, Answer, Body, SchemaFn};

pub mod answers;
pub mod api_keys;
pub mod audit;
pub mod auth;
pub mod conversations;
pub mod departures;
pub mod error;
pub mod extract;
pub mod history;
pub mod idempotency;
pub mod ledger;
pub mod messages;
pub mod meta;
pub mod openapi;
pub mod organizations;
pub mod owners;
pub mod page;
pub mod proofs;
pub mod role_tree;
pub mod roles;
pub mod turns;
pub mod users;

/// Request bodies over this many bytes get a 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// One route as documented: the router below must serve every entry (a test checks it), and
/// what it reads and answers are the schemas of its handler's types (`tests/openapi.rs` checks
/// the bodies and queries against the handlers, and real answers against the schemas).
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub permission: Option<&'static str>,
    pub success: u16,
    pub summary: &'static str,
    /// The JSON body its handler reads.
    pub body: Body,
    /// The struct its handler reads the query into (its fields are the parameters), if any
    /// but [`Nothing`].
    pub query: Option<SchemaFn>,
    /// What it answers on success.
    pub answer: Answer,
}

const fn r(
    method: &'static str,
    path: &'static str,
    permission: Option<&'static str>,
    success: u16,
    summary: &'static str,
) -> RouteDoc {
    RouteDoc {
        method,
        path,
        permission,
        success,
        summary,
        body: Body::None,
        query: None,
        answer: Answer::Unsaid,
    }
}

impl RouteDoc {
    /// Reads a `Json` of this schema.
    const fn body(self, schema: SchemaFn) -> Self {
        Self {
            body: Body::Required(schema),
            ..self
        }
    }

    /// Reads an `OptionalJson` of this schema.
    const fn optional_body(self, schema: SchemaFn) -> Self {
        Self {
            body: Body::Optional(schema),
            ..self
        }
    }

    /// Reads a `Query` of this schema.
    const fn query(self, schema: SchemaFn) -> Self {
        Self {
            query: Some(schema),
            ..self
        }
    }

    /// Answers JSON of this schema.
    const fn answers(self, schema: SchemaFn) -> Self {
        Self {
            answer: Answer::Json(schema),
            ..self
        }
    }

    /// Answers with [`created_answer`], the view being of this schema.
    const fn creates(self, schema: SchemaFn) -> Self {
        Self {
            answer: Answer::Created(schema),
            ..self
        }
    }

    /// Answers with [`changed_answer`], the view being of this schema.
    const fn changes(self, schema: SchemaFn) -> Self {
        Self {
            answer: Answer::Changed(schema),
            ..self
        }
    }

    /// Answers no content.
    const fn no_content(self) -> Self {
        Self {
            answer: Answer::NoContent,
            ..self
        }
    }

    /// Answers what no type describes.
    const fn described(self, media_type: &'static str, description: &'static str) -> Self {
        Self {
            answer: Answer::Described {
                media_type,
                description,
            },
            ..self
        }
    }
}

const ORG: &str = "/v1/organizations/{org}";

pub const ROUTES: &[RouteDoc] = &[
    r("GET", "/healthz", None, 200, "Liveness").answers(schema::<meta::Status>),
    r(
        "GET",
        "/readyz",
        None,
        200,
        "Readiness: database up, no projection failed",
    ).answers(schema::<meta::Status>),
    r(
        "GET",
        "/metrics",
        None,
        200,
        "Prometheus metrics (text format 0.0.4); no tenant data",
    ).described("text/plain; version=0.0.4", "Prometheus text exposition format"),
    r("GET", "/v1/openapi.json", None, 200, "This document").described("application/json", "This OpenAPI 3.1 document"),
    r(
        "GET",
        "/v1/me",
        Some("any"),
        200,
        "The calling key, its organization and effective permissions",
    ).answers(schema::<meta::MeView>),
    r(
        "POST",
        "/v1/organizations",
        Some("platform:admin"),
        201,
        "Create an organization with its built-in roles",
    ).body(schema::<organizations::CreateOrganization>).creates(schema::<organizations::OrganizationView>),
    r(
        "GET",
        "/v1/organizations",
        Some("organizations:read"),
        200,
        "List organizations, oldest first (a tenant key: its own): ?cursor=&limit= (max 500)",
    )
    .query(schema::<page::PageQuery>)
    .answers(schema::<PageOf<organizations::OrganizationView, String>>),
    r(
        "GET",
        "/v1/organizations/{org}",
        Some("organizations:read"),
        200,
        "Read an organization",
    ).answers(schema::<organizations::OrganizationView>),
    r(
        "PATCH",
        "/v1/organizations/{org}",
        Some("organizations:write"),
        200,
        "Update an organization",
    ).body(schema::<organizations::UpdateOrganization>).answers(schema::<organizations::OrganizationView>),
    r(
        "POST",
        "/v1/organizations/{org}/suspend",
        Some("platform:admin"),
        200,
        "Suspend: every key of the organization stops working",
    ).optional_body(schema::<organizations::Reason>).answers(schema::<organizations::OrganizationView>),
    r(
        "POST",
        "/v1/organizations/{org}/reactivate",
        Some("platform:admin"),
        200,
        "Reactivate a suspended organization",
    ).answers(schema::<organizations::OrganizationView>),
    r(
        "POST",
        "/v1/organizations/{org}/users",
        Some("users:write"),
        201,
        "Invite a user",
    ).body(schema::<users::InviteUser>).creates(schema::<users::UserView>),
    r(
        "GET",
        "/v1/organizations/{org}/users",
        Some("users:read"),
        200,
        "List users, oldest first: ?cursor=&limit= (max 500)",
    )
    .query(schema::<page::PageQuery>)
    .answers(schema::<PageOf<users::UserView, String>>),
    r(
        "GET",
        "/v1/organizations/{org}/users/{user}",
        Some("users:read"),
        200,
        "Read a user",
    ).answers(schema::<users::UserView>),
    r(
        "PATCH",
        "/v1/organizations/{org}/users/{user}",
        Some("users:write"),
        200,
        "Update a user's e-mail or name",
    ).body(schema::<users::UpdateUser>).answers(schema::<users::UserView>),
    r(
        "POST",
        "/v1/organizations/{org}/users/{user}/deactivate",
        Some("users:write"),
        200,
        "Deactivate a user",
    ).optional_body(schema::<organizations::Reason>).answers(schema::<users::UserView>),
    r(
        "POST",
        "/v1/organizations/{org}/users/{user}/reactivate",
        Some("users:write"),
        200,
        "Reactivate a user",
    ).answers(schema::<users::UserView>),
    r(
        "POST",
        "/v1/organizations/{org}/users/{user}/erase",
        Some("users:erase"),
        200,
        "Erase a user's personal data (crypto-shredding)",
    ).answers(schema::<users::UserView>),
    r(
        "GET",
        "/v1/organizations/{org}/users/{user}/roles",
        Some("roles:read"),
        200,
        "List a user's role assignments by role name: ?cursor=&limit= (max 500)",
    )
    .query(schema::<page::PageQuery>)
    .answers(schema::<PageOf<roles::AssignmentView, String>>),
    r(
        "PUT",
        "/v1/organizations/{org}/users/{user}/roles/{role}",
        Some("roles:write"),
        200,
        "Assign a role, optionally until a time",
    ).optional_body(schema::<roles::Assign>).answers(schema::<List<roles::AssignmentView>>),
    r(
        "DELETE",
        "/v1/organizations/{org}/users/{user}/roles/{role}",
        Some("roles:write"),
        204,
        "Revoke a role assignment",
    ).no_content(),
    r(
        "POST",
        "/v1/organizations/{org}/roles",
        Some("roles:write"),
        201,
        "Create a role",
    ).body(schema::<roles::CreateRole>).creates(schema::<roles::RoleView>),
    r(
        "GET",
        "/v1/organizations/{org}/roles",
        Some("roles:read"),
        200,
        "List roles, oldest first: ?cursor=&limit= (max 500)",
    )
    .query(schema::<page::PageQuery>)
    .answers(schema::<PageOf<roles::RoleView, String>>),
    r(
        "GET",
        "/v1/organizations/{org}/roles/{role}",
        Some("roles:read"),
        200,
        "Read a role with its effective permissions",
    ).answers(schema::<roles::RoleView>),
    r(
        "PATCH",
        "/v1/organizations/{org}/roles/{role}",
        Some("roles:write"),
        200,
        "Change a role",
    ).body(schema::<roles::UpdateRole>).answers(schema::<roles::RoleView>),
    r(
        "DELETE",
        "/v1/organizations/{org}/roles/{role}",
        Some("roles:write"),
        204,
        "Delete a role (not a built-in one)",
    ).no_content(),
    r(
        "POST",
        "/v1/organizations/{org}/api-keys",
        Some("keys:write"),
        201,
        "Issue an API key; the secret is answered once",
    ).body(schema::<api_keys::IssueKey>).answers(schema::<api_keys::IssuedKey>),
    r(
        "GET",
        "/v1/organizations/{org}/api-keys",
        Some("keys:read"),
        200,
        "List API keys (never their secrets), oldest first: ?cursor=&limit= (max 500)",
    )
    .query(schema::<page::PageQuery>)
    .answers(schema::<PageOf<api_keys::ApiKeyView, String>>),
    r(
        "GET",
        "/v1/organizations/{org}/api-keys/{key}",
        Some("keys:read"),
        200,
        "Read an API key",
    ).answers(schema::<api_keys::ApiKeyView>),
    r(
        "POST",
        "/v1/organizations/{org}/api-keys/{key}/revoke",
        Some("keys:write"),
        200,
        "Revoke an API key, effective on the next request",
    ).optional_body(schema::<organizations::Reason>).answers(schema::<api_keys::ApiKeyView>),
    r(
        "POST",
        "/v1/organizations/{org}/api-keys/{key}/rotate",
        Some("keys:write"),
        200,
        "Give a key a new secret; the old one stops working, at once or after the grace period asked for",
    ).optional_body(schema::<api_keys::RotateKey>).answers(schema::<api_keys::IssuedKey>),
    r(
        "GET",
        "/v1/organizations/{org}/audit-events",
        Some("audit:read"),
        200,
        "The audit view, filtered and paged",
    ).query(schema::<audit::AuditQuery>).answers(schema::<PageOf<audit::AuditEventView>>),
    r(
        "GET",
        "/v1/organizations/{org}/history/{entity_type}/{id}",
        Some("audit:read"),
        200,
        "One entity's changes in order (organization, user, role, api_key, conversation, message): actor, time, event, fields before and after",
    ).answers(schema::<history::HistoryView>),
    r(
        "GET",
        "/v1/organizations/{org}/ledger/events",
        Some("ledger:read"),
        200,
        "The tenant's raw ledger events with hashes",
    ).query(schema::<ledger::EventsQuery>).answers(schema::<PageOf<ledger::LedgerEventView>>),
    r(
        "GET",
        "/v1/organizations/{org}/ledger/export",
        Some("ledger:read"),
        200,
        "Export file (JSON Lines): the tenant's events in full, other positions as stubs; ?from=&to=",
    ).query(schema::<ledger::ExportQuery>).described("application/x-ndjson", "The export file: a header line, then one line per position of the range (docs/ledger-format.md, \"Export files\")"),
    r(
        "GET",
        "/v1/ledger/head",
        Some("ledger:read"),
        200,
        "The ledger head: position and hash",
    ).answers(schema::<ledger::LedgerHead>),
    r(
        "POST",
        "/v1/organizations/{org}/conversations",
        Some("conversations:write"),
        201,
        "Create a conversation (direct, group or channel); the creator owns it",
    ).body(schema::<conversations::CreateConversation>).creates(schema::<conversations::ConversationView>),
    r(
        "GET",
        "/v1/organizations/{org}/conversations",
        Some("conversations:read"),
        200,
        "List conversations, most recently active first: a user key its own with unread counts, a service key all; ?cursor=&limit= (max 500)",
    )
    .query(schema::<page::PageQuery>)
    .answers(schema::<PageOf<conversations::ConversationView, String>>),
    r(
        "GET",
        "/v1/organizations/{org}/conversations/{id}",
        Some("conversations:read"),
        200,
        "Read a conversation with its participants",
    ).answers(schema::<conversations::ConversationView>),
    r(
        "PATCH",
        "/v1/organizations/{org}/conversations/{id}",
        Some("conversations:write"),
        200,
        "Rename or re-describe (owner or admin)",
    ).body(schema::<conversations::UpdateConversation>).changes(schema::<conversations::ConversationView>),
    r(
        "POST",
        "/v1/organizations/{org}/conversations/{id}/archive",
        Some("conversations:write"),
        200,
        "Archive: no new messages (owner or admin)",
    ).changes(schema::<conversations::ConversationView>),
    r(
        "POST",
        "/v1/organizations/{org}/conversations/{id}/unarchive",
        Some("conversations:write"),
        200,
        "Unarchive (owner or admin)",
    ).changes(schema::<conversations::ConversationView>),
    r(
        "POST",
        "/v1/organizations/{org}/conversations/{id}/participants",
        Some("conversations:write"),
        201,
        "Add a participant (owner or admin)",
    ).body(schema::<conversations::AddParticipant>).changes(schema::<conversations::ConversationView>),
    r(
        "PATCH",
        "/v1/organizations/{org}/conversations/{id}/participants/{user}",
        Some("conversations:write"),
        200,
        "Change a participant's role (owner) or mute/unmute oneself",
    ).body(schema::<conversations::UpdateParticipant>).changes(schema::<conversations::ConversationView>),
    r(
        "DELETE",
        "/v1/organizations/{org}/conversations/{id}/participants/{user}",
        Some("conversations:write"),
        204,
        "Remove a participant (owner or admin), or leave",
    ).no_content(),
    r(
        "POST",
        "/v1/organizations/{org}/conversations/{id}/messages",
        Some("conversations:write"),
        201,
        "Post a message (16 KiB of text), optionally in a thread, with attachment descriptions",
    ).body(schema::<messages::PostMessage>).creates(schema::<messages::MessageView>),
    r(
        "GET",
        "/v1/organizations/{org}/conversations/{id}/messages",
        Some("conversations:read"),
        200,
        "Messages newest first: ?cursor=&limit= (max 200), ?thread= for one thread",
    ).query(schema::<messages::PageQuery>).answers(schema::<PageOf<messages::MessageView>>),
    r(
        "GET",
        "/v1/organizations/{org}/conversations/{id}/messages/{msg}",
        Some("conversations:read"),
        200,
        "Read one message",
    ).answers(schema::<messages::MessageView>),
    r(
        "PATCH",
        "/v1/organizations/{org}/conversations/{id}/messages/{msg}",
        Some("conversations:write"),
        200,
        "Edit a message (author only)",
    ).body(schema::<messages::EditMessage>).changes(schema::<messages::MessageView>),
    r(
        "DELETE",
        "/v1/organizations/{org}/conversations/{id}/messages/{msg}",
        Some("conversations:write"),
        204,
        "Delete a message: its content is destroyed (author, owner, admin)",
    ).no_content(),
    r(
        "PUT",
        "/v1/organizations/{org}/conversations/{id}/messages/{msg}/reactions/{emoji}",
        Some("conversations:write"),
        200,
        "React with an emoji (once per user, message and emoji)",
    ).changes(schema::<messages::MessageView>),
    r(
        "DELETE",
        "/v1/organizations/{org}/conversations/{id}/messages/{msg}/reactions/{emoji}",
        Some("conversations:write"),
        200,
        "Take a reaction back",
    ).changes(schema::<messages::MessageView>),
    r(
        "POST",
        "/v1/organizations/{org}/conversations/{id}/read",
        Some("conversations:read"),
        200,
        "Mark read up to a message (at or before the current mark: 200, nothing changes); answers the unread count",
    ).body(schema::<messages::MarkRead>).answers(schema::<messages::ReadState>),
    r(
        "GET",
        "/v1/ledger/checkpoints/latest",
        Some("ledger:read"),
        200,
        "The newest signed checkpoint (C2SP tlog-checkpoint note)",
    ).answers(schema::<proofs::CheckpointView>),
    r(
        "GET",
        "/v1/ledger/checkpoints",
        Some("ledger:read"),
        200,
        "Signed checkpoints, newest first: ?before_size=&tree_size=&limit=",
    ).query(schema::<proofs::CheckpointsQuery>).answers(schema::<PageOf<proofs::CheckpointView>>),
    r(
        "GET",
        "/v1/ledger/proofs/inclusion",
        Some("ledger:read"),
        200,
        "Merkle inclusion proof: ?position=&tree_size= (an organization key: its own events)",
    ).query(schema::<proofs::InclusionQuery>).answers(schema::<proofs::InclusionProof>),
    r(
        "GET",
        "/v1/ledger/proofs/consistency",
        Some("ledger:read"),
        200,
        "Merkle consistency proof: ?from_size=&to_size=",
    ).query(schema::<proofs::ConsistencyQuery>).answers(schema::<proofs::ConsistencyProof>),
    r(
        "GET",
        "/v1/ledger/public-key",
        Some("ledger:read"),
        200,
        "The checkpoint signing key (signed-note verifier key)",
    ).answers(schema::<proofs::PublicKeyView>),
];

pub fn router(app: App) -> Router {
    let x_request_id = HeaderName::from_static("x-request-id");
    let o = |p: &str| format!("{ORG}{p}");
    Router::new()
        .route("/healthz", get(meta::healthz))
        .route("/readyz", get(meta::readyz))
        .route("/metrics", get(meta::metrics))
        .route("/v1/openapi.json", get(meta::openapi))
        .route("/v1/me", get(meta::me))
        .route("/v1/organizations", post(organizations::create).get(organizations::list))
        .route(ORG, get(organizations::get).patch(organizations::update))
        .route(&o("/suspend"), post(organizations::suspend))
        .route(&o("/reactivate"), post(organizations::reactivate))
        .route(&o("/users"), post(users::invite).get(users::list))
        .route(&o("/users/{user}"), get(users::get).patch(users::update))
        .route(&o("/users/{user}/deactivate"), post(users::deactivate))
        .route(&o("/users/{user}/reactivate"), post(users::reactivate))
        .route(&o("/users/{user}/erase"), post(users::erase))
        .route(&o("/users/{user}/roles"), get(roles::list_assignments))
        .route(&o("/users/{user}/roles/{role}"), put(roles::assign).delete(roles::revoke))
        .route(&o("/roles"), post(roles::create).get(roles::list))
        .route(&o("/roles/{role}"), get(roles::get).patch(roles::update).delete(roles::delete))
        .route(&o("/api-keys"), post(api_keys::issue).get(api_keys::list))
        .route(&o("/api-keys/{key}"), get(api_keys::get))
        .route(&o("/api-keys/{key}/revoke"), post(api_keys::revoke))
        .route(&o("/api-keys/{key}/rotate"), post(api_keys::rotate))
        .route(&o("/conversations"), post(conversations::create).get(conversations::list))
        .route(&o("/conversations/{id}"), get(conversations::get).patch(conversations::update))
        .route(&o("/conversations/{id}/archive"), post(conversations::archive))
        .route(&o("/conversations/{id}/unarchive"), post(conversations::unarchive))
        .route(&o("/conversations/{id}/participants"), post(conversations::add_participant))
        .route(&o("/conversations/{id}/participants/{user}"), patch(conversations::update_participant).delete(conversations::remove_participant))
        .route(&o("/conversations/{id}/messages"), post(messages::post).get(messages::list))
        .route(&o("/conversations/{id}/messages/{msg}"), get(messages::get).patch(messages::edit).delete(messages::delete))
        .route(&o("/conversations/{id}/messages/{msg}/reactions/{emoji}"), put(messages::react).delete(messages::unreact))
        .route(&o("/conversations/{id}/read"), post(messages::mark_read))
        .route(&o("/audit-events"), get(audit::list))
        .route(&o("/history/{entity_type}/{id}"), get(history::get))
        .route(&o("/ledger/events"), get(ledger::events))
        .route(&o("/ledger/export"), get(ledger::export))
        .route("/v1/ledger/head", get(ledger::head))
        .route("/v1/ledger/checkpoints/latest", get(proofs::latest))
        .route("/v1/ledger/checkpoints", get(proofs::list))
        .route("/v1/ledger/proofs/inclusion", get(proofs::inclusion))
        .route("/v1/ledger/proofs/consistency", get(proofs::consistency))
        .route("/v1/ledger/public-key", get(proofs::public_key))
        // Routes only: inside the time limit (a request sent with a key runs on after a 408,
        // and keeps its answer), after the request id (which its events and rows record).
        .route_layer(middleware::from_fn_with_state(app.clone(), idempotency::layer))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(refuse_large_bodies))
        .layer(middleware::from_fn(mark_answers_behind))
        .layer(middleware::from_fn_with_state(REQUEST_TIME_LIMIT, time_limit))
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path())
        }))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .layer(middleware::from_fn(drop_unkept_request_ids))
        .with_state(app)
}

/// The longest `x-request-id` kept as the client sent it.
pub const MAX_REQUEST_ID_CHARS: usize = 512;

/// An `x-request-id` that events could not record as sent (longer than
/// [`MAX_REQUEST_ID_CHARS`], empty, or not visible ASCII) is dropped before the server makes
/// its own: the answer then gives back the id the events record, which
/// `audit-events?request_id=` finds.
async fn drop_unkept_request_ids(mut req: Request, next: Next) -> Response {
    let kept = |v: &header::HeaderValue| {
        v.to_str()
            .is_ok_and(|s| !s.is_empty() && s.len() <= MAX_REQUEST_ID_CHARS)
    };
    let headers = req.headers_mut();
    if !headers.get_all("x-request-id").iter().all(kept) {
        headers.remove("x-request-id");
    }
    next.run(req).await
}

/// How long a request may take before it is answered 408.
pub const REQUEST_TIME_LIMIT: Duration = Duration::from_secs(30);

/// Answers 408, in the API's one error shape, a request that takes longer than `limit`. Its
/// handler is dropped; work it handed to a task of its own (`to_the_end`: a command, once
/// sent) runs on, so a command may still take effect.
async fn time_limit(
    axum::extract::State(limit): axum::extract::State<Duration>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(answer) => answer,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request took longer than {} s and was answered without its outcome: a \
                 command it began may still take effect. {}",
                limit.as_secs_f64(),
                error::LOOK_FOR_IT
            ),
        )
        .into_response(),
    }
}

/// `DefaultBodyLimit` only limits extractors; a declared length over the limit is refused up
/// front, before any extractor reads the body.
async fn refuse_large_bodies(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than 1 MiB",
        )
        .into_response();
    }
    next.run(req).await
}

/// Starts `work` on a task of its own, so that it runs to its end even if the client hangs
/// up (axum drops the handler then): work that makes a key and settles its fate, or appends
/// an event and destroys a key, must not stop halfway. Await the result for the answer; a
/// panic in the work is a 500.
pub(crate) fn to_the_end<T: Send + 'static>(
    work: impl std::future::Future<Output = ApiResult<T>> + Send + 'static,
) -> impl std::future::Future<Output = ApiResult<T>> {
    // In the request's span, so that what the work logs (an internal error's cause) names
    // the request.
    let task = tokio::spawn(tracing::Instrument::in_current_span(answer_marks(work)));
    async move {
        let (answer, behind) = task.await.map_err(ApiError::internal)?;
        if behind {
            read_models_behind();
        }
        answer
    }
}

/// The response header that says a command's answer may not show its effect: it is in the
/// log, but the read models did not show it within the wait (a projection stopped or far
/// behind), and the views in the answer are as they were.
pub const READ_MODELS_BEHIND: &str = "ledgerline-read-models";

tokio::task_local! {
    /// Set while a request is handled when a command of it was answered before the read
    /// models showed it.
    static BEHIND: std::cell::Cell<bool>;
}

/// Marks the request being handled (if any) as answered before the read models showed it.
pub(crate) fn read_models_behind() {
    let _ = BEHIND.try_with(|b| b.set(true));
}

/// Runs `work` and tells whether it marked its answer with [`read_models_behind`].
async fn answer_marks<T>(work: impl std::future::Future<Output = T>) -> (T, bool) {
    BEHIND
        .scope(std::cell::Cell::new(false), async {
            let out = work.await;
            (out, BEHIND.with(std::cell::Cell::get))
        })
        .await
}

/// Adds [`READ_MODELS_BEHIND`]`: behind` to the answer of a request marked so.
async fn mark_answers_behind(req: Request, next: Next) -> Response {
    let (mut response, behind) = answer_marks(next.run(req)).await;
    if behind {
        response.headers_mut().insert(
            READ_MODELS_BEHIND,
            axum::http::HeaderValue::from_static("behind"),
        );
    }
    response
}

/// The answer to a command that created `id`: 201 with its view; 201 with its id alone when
/// the caller may create but not read it; or, when the read models do not show it yet (a
/// projection stopped or far behind; the answer carries [`READ_MODELS_BEHIND`]), 202 with its
/// id. The command stands either way (it is in the log): a 403 or 404 would send a client to
/// create it again.
pub(crate) fn created_answer<T: serde::Serialize>(
    found: ApiResult<T>,
    id: Uuid,
) -> ApiResult<Response> {
    match found {
        Err(e) if e.status == StatusCode::NOT_FOUND => Ok((
            StatusCode::ACCEPTED,
            axum::Json(Recorded {
                id,
                read_models: "behind",
            }),
        )
            .into_response()),
        found => changed_answer(StatusCode::CREATED, found, id),
    }
}

/// A change's answer with `status`: the changed resource's view, or its id alone to a key
/// that may change it but not read it (the change is in the log: a 403 would say it was
/// refused, and a retry would meet "already so").
pub(crate) fn changed_answer<T: serde::Serialize>(
    status: StatusCode,
    found: ApiResult<T>,
    id: Uuid,
) -> ApiResult<Response> {
    match found {
        Ok(view) => Ok((status, axum::Json(view)).into_response()),
        Err(e) if e.status == StatusCode::FORBIDDEN => {
            Ok((status, axum::Json(CreatedId { id })).into_response())
        }
        Err(e) => Err(e),
    }
}

/// Whether aggregate `id` of `aggregate_type` was created in `org`: its first event is in
/// the ledger. After a command that creates an aggregate failed, this tells whether it
/// failed for good or committed with only its answer lost (the writer learns a lost COMMIT's
/// outcome from the log, but answers an error when it cannot read the log in time).
/// `export --org` asks it too, so that an organization the log never created is refused.
pub(crate) async fn created(
    pool: &sqlx::PgPool,
    aggregate_type: &str,
    id: Uuid,
    org: Uuid,
) -> sqlx::Result<bool> {
    let found: Option<(i64,)> = sqlx::query_as(
        "SELECT sequence FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
         AND sequence = 1 AND organization_id = $3",
    )
    .bind(aggregate_type)
    .bind(id.to_string())
    .bind(org)
    .fetch_optional(pool)
    .await?;
    Ok(found.is_some())
}

/// Whether the ledger holds an event of `event_type` for aggregate `id`: after a command
/// whose answer was an error, whether its effect (or an earlier one's) stands anyway.
pub(crate) async fn recorded(
    app: &App,
    aggregate_type: &str,
    id: Uuid,
    event_type: &str,
) -> ApiResult<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
         AND event_type = $3)",
    )
    .bind(aggregate_type)
    .bind(id.to_string())
    .bind(event_type)
    .fetch_one(&app.pool)
    .await?)
}

/// For PATCH fields where absent means "leave it" and `null` means "clear it".
pub fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The schema of a [`double_option`] field (`#[schemars(transform = absent_or_null)]`): its
/// value or `null`, and no `default` (absent and `null` mean different things).
pub fn absent_or_null(schema: &mut schemars::Schema) {
    schema.remove("default");
    say(schema, "Absent: left as it is; null: cleared.");
}

/// A list of permissions in a body: each once, as its schema's `uniqueItems` says. One listed
/// twice is refused (422, serde names the field) rather than folded into the set: the client
/// may have meant another.
pub fn permission_set<'de, D: Deserializer<'de>>(d: D) -> Result<PermissionSet, D::Error> {
    once(Vec::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// [`permission_set`] for a PATCH field that `null` clears ([`double_option`]).
pub fn permission_set_or_null<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<PermissionSet>>, D::Error> {
    Option::<Vec<Permission>>::deserialize(d)?
        .map(once)
        .transpose()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn once(listed: Vec<Permission>) -> Result<PermissionSet, String> {
    let mut set = PermissionSet::new();
    for p in listed {
        if !set.insert(p) {
            return Err(format!("`{p}` is listed twice"));
        }
    }
    Ok(set)
}

/// For PATCH fields that cannot be cleared (a name, an address): absent leaves the value, and
/// `null` is refused (422, serde names the field) rather than read as absent, which would
/// keep what the client meant to clear.
pub fn not_null<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    match Option::<T>::deserialize(d)? {
        Some(value) => Ok(Some(value)),
        None => Err(serde::de::Error::custom(
            "cannot be null: leave it out to keep it",
        )),
    }
}

/// The schema of a [`not_null`] field (`#[schemars(transform = absent_not_null)]`): its value
/// only (the `Option`'s `null` taken out), and no `default`.
pub fn absent_not_null(schema: &mut schemars::Schema) {
    use serde_json::Value;
    schema.remove("default");
    if let Some(Value::Array(types)) = schema.get_mut("type") {
        types.retain(|t| t != "null");
        if let [only] = types.as_slice() {
            let only = only.clone();
            schema.insert("type".into(), only);
        }
    }
    if let Some(Value::Array(choices)) = schema.remove("anyOf") {
        let mut kept: Vec<Value> = choices
            .into_iter()
            .filter(|c| c.get("type").and_then(Value::as_str) != Some("null"))
            .collect();
        match (kept.pop(), kept.is_empty()) {
            (Some(Value::Object(only)), true) => {
                for (key, value) in only {
                    schema.insert(key, value);
                }
            }
            (last, _) => {
                kept.extend(last);
                schema.insert("anyOf".into(), kept.into());
            }
        }
    }
    say(schema, "Absent: left as it is; null is refused.");
}

/// Appends `what` to a schema's description.
fn say(schema: &mut schemars::Schema, what: &str) {
    let said = schema
        .get("description")
        .and_then(serde_json::Value::as_str)
        .map(|d| format!("{d} "))
        .unwrap_or_default();
    schema.insert("description".into(), format!("{said}{what}").into());
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// A request over the time limit is answered 408 in the API's one error shape, saying
    /// that a command it began may still take effect; one within it passes untouched.
    #[tokio::test]
    async fn a_request_over_the_time_limit_is_a_408_in_the_error_shape() {
        let router = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    "late"
                }),
            )
            .route("/fast", get(|| async { "soon" }))
            .layer(middleware::from_fn_with_state(
                Duration::from_millis(50),
                time_limit,
            ));
        let call = |path: &'static str| {
            let request = axum::http::Request::get(path)
                .body(axum::body::Body::empty())
                .unwrap();
            router.clone().oneshot(request)
        };
        let answer = call("/slow").await.unwrap();
        assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT);
        let body = axum::body::to_bytes(answer.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["status"], 408, "{body}");
        assert_eq!(body["error"]["code"], "timeout", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("may still take effect"), "{message}");
        let answer = call("/fast").await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
    }
}
