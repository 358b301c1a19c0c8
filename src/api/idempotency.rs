//! `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header, as Stripe's): a command sent
//! again with the key of one already carried out is answered with the first one's answer
//! (`Idempotent-Replayed: true`) instead of being carried out twice.
//!
//! Every command (POST, PUT, PATCH, DELETE) takes the header; reads ignore it (they change
//! nothing). A key is 1 to 255 printable ASCII characters (400 otherwise), the field's value
//! as sent (the draft's quoted form works as it is), and belongs to the API key that sent it:
//! another API key's requests never see it. The first request with a key takes a `running`
//! row, runs (on a task of its own, so that a client hanging up or the 30 s time limit does
//! not cut it short) and keeps its answer for 24 hours, sealed ([`KEPT_FOR`]). Again with the
//! same key: another request (method, path and query, body) is a 422; one still running a 409;
//! the same one, done, the answer again.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use futures::FutureExt;
use ledgerline_aggregates::metadata;
use serde_json::Value;
use sqlx::PgPool;
use tracing::Instrument;
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use crate::app::App;

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// The answer header of a replay: `true`.
pub const REPLAYED: &str = "idempotent-replayed";
/// How long a key's answer is kept; after it, the key is free again.
pub const KEPT_FOR: Duration = Duration::from_secs(24 * 60 * 60);
/// A request still `running` after this long is taken as lost (its server stopped between
/// taking the key and keeping the answer): far beyond the 30 s a client waits, which does
/// not stop a request sent with a key.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(120);
/// The longest key taken.
pub const MAX_KEY_CHARS: usize = 255;

/// The refusals kept like successes: they depend on what the fingerprint covers alone
/// (malformed, too large, invalid), so a retry would get them again. Other refusals (401,
/// 403, 404, 409: access may be granted, a resource shown, a conflict pass; 415: it depends
/// on the `Content-Type` header, which the fingerprint does not cover, so a client that
/// mends the header gets its request carried out) and failures are not kept: the key is let
/// go and a retry runs again, which cannot do anything twice, as they appended nothing
/// (checked in the log: see [`settle`]).
const KEPT_REFUSALS: [StatusCode; 3] = [
    StatusCode::BAD_REQUEST,
    StatusCode::PAYLOAD_TOO_LARGE,
    StatusCode::UNPROCESSABLE_ENTITY,
];

/// Set on an answer that shows a secret once (an API key issued or rotated). Its body is never
/// kept, not even sealed: the secret would then live on in the database for a day, readable
/// with its dump and the master key, where only the key's hash is ever kept. A replay answers
/// 409 naming the key instead: its secret was shown once, and rotating it gives a new one.
#[derive(Debug, Clone, Copy)]
pub struct SecretShownOnce {
    pub organization_id: Uuid,
    pub key_id: Uuid,
    /// Rotated (a new secret for an existing key), not issued.
    pub rotated: bool,
}

impl SecretShownOnce {
    fn replay(&self) -> ApiError {
        let done = if self.rotated {
            "gave API key {id} a new secret"
        } else {
            "issued API key {id}"
        }
        .replace("{id}", &self.key_id.to_string());
        ApiError::conflict(format!(
            "the request with this Idempotency-Key {done}; its secret is shown only once, in \
             that request's answer, and is not kept: for a new secret, rotate the key \
             (POST /v1/organizations/{}/api-keys/{}/rotate, with a new Idempotency-Key)",
            self.organization_id, self.key_id
        ))
    }
}

/// The layer: commands carrying the header go through [`idempotent`], everything else
/// straight on.
pub async fn layer(State(app): State<App>, req: Request, next: Next) -> Response {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if safe || !req.headers().contains_key(HEADER) {
        return next.run(req).await;
    }
    idempotent(app, req, next)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// One request sent with a key: what it is, and whose.
struct Claim {
    api_key: Uuid,
    key: String,
    fingerprint: [u8; 32],
    method: String,
    /// Path and query.
    target: String,
    request_id: String,
}

impl Claim {
    /// What a kept answer is sealed to: this row alone.
    fn binding(&self) -> Vec<u8> {
        [self.api_key.as_bytes().as_slice(), self.key.as_bytes()].concat()
    }
}

async fn idempotent(app: App, req: Request, next: Next) -> ApiResult<Response> {
    let (mut parts, body) = req.into_parts();
    // The key is the caller's: authenticated first (the handler reuses it), so that nothing
    // is said about a key to whoever cannot use it.
    let mut caller = Caller::from_request_parts(&mut parts, &app).await?;
    let key = key_of(&parts.headers)?;
    // The request's events carry the key: what `settle` finds them by.
    caller.actor.idempotency_key = Some(key.clone());
    parts.extensions.insert(caller.clone());
    let body = super::extract::body(Request::from_parts(parts.clone(), body), &()).await?;
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |p| p.as_str())
        .to_string();
    let claim = Claim {
        api_key: caller.key_id,
        fingerprint: fingerprint(&parts.method, &target, &body),
        method: parts.method.to_string(),
        target,
        // As the request's events record it.
        request_id: caller.actor.request_id.clone(),
        key,
    };
    let since = match take(&app.pool, &claim).await? {
        Taken::Ours { since } => since,
        Taken::Before(kept) => return Ok(answer_again(&app, &claim, kept)),
    };
    let req = Request::from_parts(parts, Body::from(body));
    let work = run(app, claim, since, next, req).instrument(tracing::Span::current());
    super::to_the_end(work.map(Ok::<_, ApiError>)).await
}

/// The key the header holds: one field line of 1 to 255 printable ASCII characters.
fn key_of(headers: &HeaderMap) -> ApiResult<String> {
    let mut values = headers.get_all(HEADER).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(ApiError::bad_request(
            "send one Idempotency-Key header, not several",
        ));
    };
    let bytes = value.as_bytes();
    if bytes.is_empty()
        || bytes.len() > MAX_KEY_CHARS
        || !bytes.iter().all(|b| (b' '..=b'~').contains(b))
    {
        return Err(ApiError::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable ASCII characters \
             (a random UUID, say)"
        )));
    }
    Ok(String::from_utf8(bytes.to_vec()).expect("ASCII"))
}

/// BLAKE3 of the method, the path and query, and the body, each length-prefixed.
fn fingerprint(method: &Method, target: &str, body: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("ledgerline 2026 idempotency fingerprint v1");
    for part in [method.as_str().as_bytes(), target.as_bytes(), body] {
        hasher.update(&(part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    *hasher.finalize().as_bytes()
}

/// A key's row as kept.
#[derive(sqlx::FromRow)]
struct Kept {
    fingerprint: Vec<u8>,
    method: String,
    path: String,
    request_id: String,
    state: String,
    status: Option<i16>,
    content_type: Option<String>,
    body: Option<Vec<u8>>,
    created_at: DateTime<Utc>,
    /// Running for longer than [`ABANDONED_AFTER`], by the database's clock (which every
    /// process shares).
    abandoned: bool,
}

enum Taken {
    /// This request runs; the ledger head when it began.
    Ours { since: i64 },
    /// An earlier request took the key.
    Before(Kept),
}

/// Takes the key for `claim`, or reads what took it before. An expired row is taken over.
async fn take(pool: &PgPool, claim: &Claim) -> ApiResult<Taken> {
    prune_now_and_then(pool);
    let kept_for = KEPT_FOR.as_secs_f64();
    // A row deleted between the two statements (its request failed and let it go) is
    // tried again; a row cannot keep vanishing, so a few attempts are plenty.
    for _ in 0..3 {
        let ours: Option<i64> = sqlx::query_scalar(
            "INSERT INTO idempotency_keys AS k \
                 (api_key_id, key, fingerprint, method, path, request_id, since_position, state) \
             VALUES ($1, $2, $3, $4, $5, $6, \
                     (SELECT coalesce(max(position), 0) FROM events), 'running') \
             ON CONFLICT (api_key_id, key) DO UPDATE SET \
                 fingerprint = EXCLUDED.fingerprint, method = EXCLUDED.method, \
                 path = EXCLUDED.path, request_id = EXCLUDED.request_id, \
                 since_position = EXCLUDED.since_position, state = 'running', status = NULL, \
                 content_type = NULL, body = NULL, subjects = '{}', created_at = now() \
               WHERE k.created_at <= now() - make_interval(secs => $7) \
             RETURNING since_position",
        )
        .bind(claim.api_key)
        .bind(&claim.key)
        .bind(claim.fingerprint.as_slice())
        .bind(&claim.method)
        .bind(&claim.target)
        .bind(&claim.request_id)
        .bind(kept_for)
        .fetch_optional(pool)
        .await?;
        if let Some(since) = ours {
            return Ok(Taken::Ours { since });
        }
        let kept: Option<Kept> = sqlx::query_as(
            "SELECT fingerprint, method, path, request_id, state, status, content_type, body, \
                    created_at, \
                    state = 'running' AND created_at <= now() - make_interval(secs => $3) \
                        AS abandoned \
             FROM idempotency_keys \
             WHERE api_key_id = $1 AND key = $2 \
               AND created_at > now() - make_interval(secs => $4)",
        )
        .bind(claim.api_key)
        .bind(&claim.key)
        .bind(ABANDONED_AFTER.as_secs_f64())
        .bind(kept_for)
        .fetch_optional(pool)
        .await?;
        if let Some(kept) = kept {
            return Ok(Taken::Before(kept));
        }
    }
    Err(in_progress(None))
}

fn in_progress(since: Option<(DateTime<Utc>, &str)>) -> ApiError {
    let detail = since
        .map(|(at, request)| format!(" (since {}, request id {request})", time(at)))
        .unwrap_or_default();
    ApiError::conflict(format!(
        "a request with this Idempotency-Key is in progress{detail}; retry later"
    ))
}

fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The answer to a request whose key an earlier request took.
fn answer_again(app: &App, claim: &Claim, kept: Kept) -> Response {
    if kept.fingerprint != claim.fingerprint {
        let what = if kept.method == claim.method && kept.path == claim.target {
            "the same method and path with another body".to_string()
        } else {
            format!("{} {}", kept.method, kept.path)
        };
        return ApiError::invalid(format!(
            "this Idempotency-Key was used at {} for another request ({what}): a key names one \
             request, so send this one with a new key",
            time(kept.created_at)
        ))
        .into_response();
    }
    if kept.state == "running" && !kept.abandoned {
        return in_progress(Some((kept.created_at, &kept.request_id))).into_response();
    }
    if kept.state == "running" {
        return ApiError::conflict(format!(
            "the request with this Idempotency-Key began at {} (request id {}) and has not \
             answered in {} s: the server running it most likely stopped, so whether it took \
             effect is not known. Its events, if any, carry its request id: look for them in \
             the audit view ({}?request_id={}), or read the resource. This key answers so until \
             it expires, {} h after the request began; if the request did not take effect, \
             send it again with a new key",
            time(kept.created_at),
            kept.request_id,
            ABANDONED_AFTER.as_secs(),
            audit_view_of(&kept.path),
            kept.request_id,
            KEPT_FOR.as_secs() / 3600,
        ))
        .into_response();
    }
    let status = kept
        .status
        .and_then(|s| StatusCode::from_u16(u16::try_from(s).ok()?).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let opened = kept
        .body
        .as_deref()
        .map(|sealed| app.vault.open_answer(&claim.binding(), sealed));
    let mut answer = match opened {
        Some(Some(body)) => {
            let mut answer = Response::new(Body::from(body));
            *answer.status_mut() = status;
            if let Some(ct) = kept
                .content_type
                .and_then(|c| HeaderValue::from_str(&c).ok())
            {
                answer.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            answer
        }
        // Forgotten (an erasure or deletion), or sealed under another master key.
        forgotten => {
            if forgotten.is_some() {
                tracing::error!("a kept answer could not be opened: another master key?");
            }
            ApiError::conflict(format!(
                "the request with this Idempotency-Key was carried out at {} and answered {}, \
                 but its answer is no longer kept (a user or message it showed was erased or \
                 deleted since): read the resource instead",
                time(kept.created_at),
                status.as_u16()
            ))
            .into_response()
        }
    };
    answer
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    // The first request's id, which its events record: the one to look them up by (the
    // retry's own id, had it kept it, would find nothing).
    if let Ok(id) = HeaderValue::from_str(&kept.request_id) {
        answer.headers_mut().insert("x-request-id", id);
    }
    answer
}

/// Where the audit view of the organization a request's path names is, if it names one.
fn audit_view_of(path: &str) -> String {
    path.strip_prefix("/v1/organizations/")
        .and_then(|rest| rest.split(['/', '?']).next())
        .and_then(|org| org.parse::<Uuid>().ok())
        .map_or_else(
            || "the audit events of the organization it concerned".to_string(),
            |org| format!("/v1/organizations/{org}/audit-events"),
        )
}

/// Runs the request and keeps its answer (or lets the key go). Never cut short by the
/// client: [`idempotent`] runs it on a task of its own.
async fn run(app: App, claim: Claim, since: i64, next: Next, req: Request) -> Response {
    let answer = match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(answer) => answer,
        // A panic must not leave the key `running`, and is a 500 like any failure.
        Err(_) => ApiError::internal("the request's handler panicked").into_response(),
    };
    let (parts, body) = answer.into_parts();
    let (parts, body) = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => (parts, body),
        Err(e) => {
            let (parts, _) = ApiError::internal(e).into_response().into_parts();
            (parts, Default::default())
        }
    };
    if let Err(e) = settle(&app, &claim, since, &parts, &body).await {
        // The answer stands; a retry finds the key running, later abandoned.
        tracing::warn!(error = %e, "could not keep the answer of a request's Idempotency-Key");
    }
    Response::from_parts(parts, Body::from(body))
}

/// Keeps the answer for replays, or lets the key go so that a retry runs again.
async fn settle(
    app: &App,
    claim: &Claim,
    since: i64,
    parts: &axum::http::response::Parts,
    body: &[u8],
) -> sqlx::Result<()> {
    let status = parts.status;
    let shown_once = parts.extensions.get::<SecretShownOnce>();
    if let Some(shown) = shown_once.filter(|_| status.is_success()) {
        return keep(app, claim, &shown.replay()).await;
    }
    if status.is_success() || KEPT_REFUSALS.contains(&status) {
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        return keep_answer(app, claim, status, content_type, body).await;
    }
    // Not an answer to keep. A failure can come after a commit, though (the database lost
    // between the append and the read of the answer, a lost COMMIT's outcome): then running
    // the request again would do it twice, so the key answers what the log shows instead.
    // Its events are found by the key, which only this request of its API key holds, not by
    // the request id: a client may send one `x-request-id` with many requests.
    let first: Option<(i64, String, String, String)> = sqlx::query_as(
        "SELECT position, event_type, aggregate_type, aggregate_id FROM events \
         WHERE position > $1 AND metadata->>$2 = $3 AND metadata->>$4 = $5 \
         ORDER BY position LIMIT 1",
    )
    .bind(since)
    .bind(metadata::IDEMPOTENCY_KEY)
    .bind(&claim.key)
    .bind(metadata::ACTOR_KEY_ID)
    .bind(claim.api_key.to_string())
    .fetch_optional(&app.pool)
    .await?;
    let Some((position, event_type, aggregate_type, aggregate_id)) = first else {
        sqlx::query(
            "DELETE FROM idempotency_keys \
             WHERE api_key_id = $1 AND key = $2 AND state = 'running'",
        )
        .bind(claim.api_key)
        .bind(&claim.key)
        .execute(&app.pool)
        .await?;
        return Ok(());
    };
    let said = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(|m| format!(": {m}")))
        .unwrap_or_default();
    let answer = ApiError::conflict(format!(
        "the request with this Idempotency-Key took effect, at least in part (the log holds \
         its {event_type} of {aggregate_type} {aggregate_id}, at position {position}), but \
         answered {}{said}. It is not carried out again under this key: read the resource, or \
         the request's events in the audit view (?request_id={})",
        status.as_u16(),
        claim.request_id
    ));
    keep(app, claim, &answer).await
}

/// [`keep_answer`] of an error made here.
async fn keep(app: &App, claim: &Claim, answer: &ApiError) -> sqlx::Result<()> {
    let body = answer.json_body();
    keep_answer(app, claim, answer.status, Some("application/json"), &body).await
}

/// Keeps `body`, sealed, with every id it names: an erasure or deletion of one forgets it.
///
/// An answer may have been read before an erasure of a user it shows and be kept only after
/// that erasure's forgetting ran: the forgetting then added the user's id to the `subjects`
/// of this row, still `running`, and the answer is kept without its body if it names one of
/// them. One at a time on the row: whichever of the two updates comes second reads the
/// other's.
async fn keep_answer(
    app: &App,
    claim: &Claim,
    status: StatusCode,
    content_type: Option<&str>,
    body: &[u8],
) -> sqlx::Result<()> {
    let mut subjects = Vec::new();
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        ids_in(&value, &mut subjects);
    }
    sqlx::query(
        "UPDATE idempotency_keys \
         SET state = 'done', status = $3, content_type = $4, \
             body = CASE WHEN subjects && $6 THEN NULL ELSE $5 END, subjects = $6 \
         WHERE api_key_id = $1 AND key = $2 AND state = 'running'",
    )
    .bind(claim.api_key)
    .bind(&claim.key)
    .bind(status.as_u16() as i16)
    .bind(content_type)
    .bind(app.vault.seal_answer(&claim.binding(), body))
    .bind(subjects)
    .execute(&app.pool)
    .await?;
    Ok(())
}

/// Every string in `value` that is a UUID.
fn ids_in(value: &Value, found: &mut Vec<Uuid>) {
    match value {
        Value::String(s) => {
            if let Ok(id) = s.parse::<Uuid>() {
                if !found.contains(&id) {
                    found.push(id);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| ids_in(v, found)),
        Value::Object(fields) => fields.values().for_each(|v| ids_in(v, found)),
        _ => {}
    }
}

/// Forgets the kept answers that name `subject` (a user erased, a message deleted), as its
/// key's destruction makes what they showed of it unreadable everywhere else. The keys stay
/// taken: a replay says the request was carried out, and its answer is no longer kept.
///
/// Called once the key is destroyed, so a request that begins later cannot read what it
/// sealed; one still running may have, before: its row takes `subject` into its `subjects`,
/// and [`keep_answer`] then keeps no body that names it. Not the row of `by`, the request
/// that erases or deletes, whose answer is read after the key is gone.
pub async fn forget_answers_naming(pool: &PgPool, subject: Uuid, by: &Caller) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE idempotency_keys SET body = NULL, \
             subjects = CASE WHEN state = 'running' THEN array_append(subjects, $1) \
                             ELSE subjects END \
         WHERE (state = 'running' OR (subjects @> ARRAY[$1::uuid] AND body IS NOT NULL)) \
           AND (api_key_id, key) IS DISTINCT FROM ($2, $3)",
    )
    .bind(subject)
    .bind(by.key_id)
    .bind(by.actor.idempotency_key.as_deref())
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes the rows older than [`KEPT_FOR`]; returns how many.
pub async fn prune(pool: &PgPool) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at <= now() - make_interval(secs => $1)",
    )
    .bind(KEPT_FOR.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
}

/// Unix seconds of this process's last [`prune`].
static LAST_PRUNED: AtomicI64 = AtomicI64::new(0);

/// Prunes on a task of its own, at most once a minute per process: expired rows are also
/// taken over where they stand, so pruning only keeps the table from growing.
fn prune_now_and_then(pool: &PgPool) {
    let now = Utc::now().timestamp();
    let last = LAST_PRUNED.load(Ordering::Relaxed);
    if now - last < 60
        || LAST_PRUNED
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    let pool = pool.clone();
    tokio::spawn(async move {
        if let Err(e) = prune(&pool).await {
            tracing::warn!(error = %e, "could not prune expired idempotency keys");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_printable_ascii_of_1_to_255() {
        let key = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(HEADER, HeaderValue::from_bytes(v).unwrap());
            key_of(&h)
        };
        assert_eq!(key(b"a").unwrap(), "a");
        assert_eq!(key(b"\"8e03978e\"").unwrap(), "\"8e03978e\"");
        assert_eq!(key(&[b'k'; 255]).unwrap().len(), 255);
        assert!(key(&[b'k'; 256]).is_err());
        assert!(key(b"").is_err());
        assert!(key(b"caf\xc3\xa9").is_err());
        assert!(key(b"tab\there").is_err());
        let mut two = HeaderMap::new();
        two.append(HEADER, HeaderValue::from_static("a"));
        two.append(HEADER, HeaderValue::from_static("a"));
        assert!(key_of(&two).is_err());
    }

    #[test]
    fn the_fingerprint_tells_method_target_and_body_apart() {
        let base = fingerprint(&Method::POST, "/a", b"{}");
        assert_eq!(base, fingerprint(&Method::POST, "/a", b"{}"));
        assert_ne!(base, fingerprint(&Method::PATCH, "/a", b"{}"));
        assert_ne!(base, fingerprint(&Method::POST, "/a?x=1", b"{}"));
        assert_ne!(base, fingerprint(&Method::POST, "/a", b"{ }"));
        // Length prefixes: moving bytes from the target to the body is another request.
        assert_ne!(
            fingerprint(&Method::POST, "/ab", b"c"),
            fingerprint(&Method::POST, "/a", b"bc")
        );
    }

    #[test]
    fn the_audit_view_is_named_from_the_path() {
        let org = Uuid::new_v4();
        assert_eq!(
            audit_view_of(&format!("/v1/organizations/{org}/users")),
            format!("/v1/organizations/{org}/audit-events")
        );
        assert!(audit_view_of("/v1/organizations").starts_with("the audit events"));
    }
}
