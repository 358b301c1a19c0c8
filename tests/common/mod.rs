//! Test harness: a fresh, migrated database per test and the app served in-process on
//! 127.0.0.1:0, with the platform bootstrapped. The database is dropped when the harness is.
#![allow(dead_code)] // each test binary uses its own part of the harness

use std::net::SocketAddr;

use std::sync::Arc;

use ledgerline::app::App;
use ledgerline::crypto::{MasterKey, Vault};
use ledgerline::ledger::checkpoint::LogSigner;
use ledgerline::ledger::hash::{event_hash, EventFields};
use ledgerline::ledger::tree::CheckpointPolicy;
use ledgerline::ledger::verify::{verify_database, Report};
use ledgerline_projections::{Projector, StoredEvent, STORED_EVENT_COLUMNS};
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

/// The server every test database is created on; trust auth as the `postgres` superuser.
pub fn admin_url() -> String {
    std::env::var("LEDGERLINE_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn db_url(name: &str) -> String {
    let admin = admin_url();
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

/// A fresh database, migrated, dropped on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> Self {
        let db = Self::unmigrated().await;
        ledgerline::db::migrate(&db.pool)
            .await
            .expect("migrations apply");
        db
    }

    /// A fresh database with no migration applied.
    pub async fn unmigrated() -> Self {
        let name = format!("ll_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .expect("PostgreSQL is reachable (see README)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        admin.close().await.ok();
        let url = db_url(&name);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await
            .expect("connect test database");
        Self { name, url, pool }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context guarantees; a helper thread with its own runtime
        // can always run the DROP.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Checkpoints as `serve` signs them by default, sooner: tests also sign on demand.
pub const POLICY: CheckpointPolicy = CheckpointPolicy {
    every_events: 1000,
    interval: std::time::Duration::from_secs(1),
};

/// The ledger's append lock (`writer::APPEND_LOCK`): every appender holds it until commit.
pub const APPEND_LOCK: i64 = 0x6c65_6467_6572;

/// A connection of its own holding the append lock: appends wait until [`release_appends`].
pub async fn hold_appends(pool: &PgPool) -> PgConnection {
    let mut holder = pool.acquire().await.unwrap().detach();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut holder)
        .await
        .unwrap();
    holder
}

/// Lets go of the append lock [`hold_appends`] took.
pub async fn release_appends(holder: &mut PgConnection) {
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(APPEND_LOCK)
        .execute(holder)
        .await
        .unwrap();
}

/// Waits until `n` sessions of this test's database wait for the append lock.
pub async fn wait_for_appenders(pool: &PgPool, n: i64) {
    for _ in 0..1_000 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND ((classid::bigint << 32) | objid::bigint) = $1",
        )
        .bind(APPEND_LOCK)
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{n} session(s) never waited for the append lock");
}

/// Stands in for a second `serve` process on the test's database: an app of its own in this
/// process (its own writer; no projector, no log maintainer) answering HTTP at the returned
/// base address until the task is aborted.
pub async fn second_process(t: &TestApp) -> (String, tokio::task::JoinHandle<()>) {
    let app = App::with_projector(t.pool().clone(), t.app.vault.clone(), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = ledgerline::api::router(app);
    let server = tokio::spawn(async move {
        let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        axum::serve(listener, service).await.unwrap();
    });
    (base, server)
}

/// Sends `change` through the test's app and then `decided` (method, path, key and body)
/// through a second process, with appends held back until both wait for the lock: `decided`
/// was decided on the state before `change`, and is appended after it (the database grants
/// the lock in the order it was asked for).
pub async fn decided_before_appended(
    t: &TestApp,
    change: impl std::future::Future<Output = Response>,
    (method, path, key, body): (reqwest::Method, &str, &str, Option<serde_json::Value>),
) -> (Response, Response) {
    let (base, second) = second_process(t).await;
    let mut request = t
        .client
        .request(method, format!("{base}{path}"))
        .bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let mut holder = hold_appends(t.pool()).await;
    let after = async {
        wait_for_appenders(t.pool(), 1).await;
        let release = async {
            wait_for_appenders(t.pool(), 2).await;
            release_appends(&mut holder).await;
        };
        tokio::join!(answer(request), release).0
    };
    let answers = tokio::join!(change, after);
    second.abort();
    answers
}

/// Whether a session of this test's database waits for a lock: advisory lock 4242 (`on`), or
/// any other (the cluster holds other tests' databases, whose sessions may wait too).
pub async fn waits_on_4242(t: &TestApp, on: bool) -> bool {
    sessions_waiting_on_4242(t, on).await > 0
}

/// How many sessions of this test's database wait for a lock: advisory lock 4242 (`on`), or
/// any other.
pub async fn sessions_waiting_on_4242(t: &TestApp, on: bool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE NOT granted \
         AND (locktype = 'advisory' AND classid = 0 AND objid = 4242) = $1 \
         AND pid IN (SELECT pid FROM pg_stat_activity WHERE datname = current_database())",
    )
    .bind(on)
    .fetch_one(t.pool())
    .await
    .unwrap()
}

/// Makes the rows `when` names (a trigger's timing and event: `BEFORE INSERT ON t FOR EACH
/// ROW`, with a `WHEN` if need be) wait for advisory lock 4242, which the connection
/// returned holds until it unlocks it or is dropped ([`waits_on_4242`] tells when a session
/// waits). Called again, it replaces the trigger (one of that name per table).
pub async fn hold_on_4242(t: &TestApp, when: &str) -> sqlx::pool::PoolConnection<Postgres> {
    for s in [
        "CREATE OR REPLACE FUNCTION wait_for_the_test() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             PERFORM pg_advisory_lock_shared(4242); PERFORM pg_advisory_unlock_shared(4242); \
             RETURN NEW; END $$"
            .to_string(),
        format!("CREATE OR REPLACE TRIGGER wait_for_the_test {when} EXECUTE FUNCTION wait_for_the_test()"),
    ] {
        sqlx::query(&s).execute(t.pool()).await.unwrap();
    }
    let mut holder = t.pool().acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

/// Waits up to `within` for `done` to hold; false if it never did.
pub async fn eventually<F, Fut>(within: std::time::Duration, mut done: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if done().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Whether, within a minute, a rebuild's session waits for a lock: its swap's, on a
/// checkpoint row the test holds ([`hold_checkpoint`]). Until then, a projector batch that
/// came to the held row after it was taken (the one the listener's subscription runs can
/// come that late; seen in CI) is ended: blocked by the holder, its snapshot, older than the
/// copies, would keep the rebuild waiting for it instead of going on to its swap. Its
/// projector retries the batch at its next wake-up. The rebuild's own sessions
/// (`ledgerline-rebuild`, `ledgerline_rebuild_<schema>`: `_` matches either) are left alone.
pub async fn at_the_swap(pool: &PgPool) -> bool {
    eventually(std::time::Duration::from_secs(60), || async {
        let there: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE 'ledgerline\\_rebuild\\_%' AND wait_event_type = 'Lock')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if !there {
            sqlx::query(
                "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a \
                 WHERE a.datname = current_database() AND a.wait_event_type = 'Lock' \
                 AND a.application_name NOT LIKE 'ledgerline_rebuild%' \
                 AND EXISTS (SELECT 1 FROM pg_stat_activity h \
                     WHERE h.pid = ANY (pg_blocking_pids(a.pid)) \
                     AND h.state = 'idle in transaction')",
            )
            .execute(pool)
            .await
            .unwrap();
        }
        there
    })
    .await
}

/// Runs the built `ledgerline` binary against `url`: exit code, stdout, stderr.
pub async fn ledgerline(url: &str, args: &[&str]) -> (i32, String, String) {
    run_ledgerline(Some(url), args, "warn").await
}

/// [`ledgerline`] with the log filter `log` (the log goes to stderr).
pub async fn ledgerline_logging(url: &str, args: &[&str], log: &str) -> (i32, String, String) {
    run_ledgerline(Some(url), args, log).await
}

/// [`ledgerline`] with no database configured at all (not even one from the environment):
/// the auditor's offline commands, and what the others say without one.
pub async fn ledgerline_offline(args: &[&str]) -> (i32, String, String) {
    run_ledgerline(None, args, "warn").await
}

/// Awaited, not waited for: the test's app runs on the test's own thread, and a task of it
/// frozen in the middle of a transaction (the log maintainer holding `merkle_state`, a
/// projector its checkpoint) would hold up the child that needs the same row, for ever.
async fn run_ledgerline(url: Option<&str>, args: &[&str], log: &str) -> (i32, String, String) {
    const URL: &str = "LEDGERLINE_DATABASE_URL";
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ledgerline"));
    // The log's name comes from the arguments, or from the database's checkpoints.
    command
        .args(args)
        .env("RUST_LOG", log)
        .env_remove("LEDGERLINE_LOG_ORIGIN");
    match url {
        Some(url) => command.env(URL, url),
        None => command.env_remove(URL),
    };
    let out = command.output().await.expect("run ledgerline");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub struct TestApp {
    pub db: TestDb,
    pub app: App,
    /// Signs this app's checkpoints (the maintainer runs in every test app).
    pub signer: Arc<LogSigner>,
    pub base: String,
    pub admin_key: String,
    pub client: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub struct Response {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Projector::default()).await
    }

    /// [`TestApp::spawn`] whose projectors run a batch only when told of new events, never
    /// on a poll: for a test that holds a projection's checkpoint row ([`hold_checkpoint`])
    /// while a rebuild reaches its swap. A poll's batch would block on the held row, and its
    /// statement's snapshot counts as older than the rebuild's copies (its xmin is the held
    /// transaction's id), so the rebuild would wait for it instead of reaching the swap:
    /// seen when the rebuild was slow (tests in parallel) and the poll came first.
    pub async fn spawn_without_polls() -> Self {
        Self::spawn_with(Projector {
            poll_interval: std::time::Duration::from_secs(3600),
            ..Projector::default()
        })
        .await
    }

    /// [`TestApp::spawn`] with the projector's settings.
    pub async fn spawn_with(projector: Projector) -> Self {
        let db = TestDb::new().await;
        let pool = db.pool.clone();
        Self::spawn_on(db, pool, projector).await
    }

    /// The app on `db` reached through `pool` (which may take another way to the same
    /// database).
    pub async fn spawn_on(db: TestDb, pool: PgPool, projector: Projector) -> Self {
        let signer = Arc::new(LogSigner::generate("ledgerline.test/log").expect("a signer"));
        Self::spawn_signed(db, pool, projector, signer).await
    }

    /// [`TestApp::spawn_on`] whose log maintainer signs with `signer` (the key that signed
    /// the database's checkpoints so far).
    pub async fn spawn_signed(
        db: TestDb,
        pool: PgPool,
        projector: Projector,
        signer: Arc<LogSigner>,
    ) -> Self {
        let app = App::with_projector(pool, Vault::new(&MasterKey::generate()), Some(projector));
        app.start_log(signer.clone(), POLICY);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = ledgerline::api::router(app.clone());
        let server = tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .expect("serve");
        });
        let (_, admin_key) = ledgerline::cli::bootstrap_key(&app, "test operator")
            .await
            .expect("bootstrap");
        Self {
            db,
            app,
            signer,
            base: format!("http://{addr}"),
            admin_key,
            client: reqwest::Client::new(),
            server,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Response {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        answer(req).await
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        key: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Response {
        let res = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request sent");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.expect("body");
        Response {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        }
    }

    pub async fn get(&self, path: &str, key: &str) -> Response {
        self.call(Method::GET, path, Some(key), None).await
    }
    pub async fn post(&self, path: &str, key: &str, body: Value) -> Response {
        self.call(Method::POST, path, Some(key), Some(body)).await
    }
    pub async fn patch(&self, path: &str, key: &str, body: Value) -> Response {
        self.call(Method::PATCH, path, Some(key), Some(body)).await
    }
    pub async fn put(&self, path: &str, key: &str, body: Value) -> Response {
        self.call(Method::PUT, path, Some(key), Some(body)).await
    }
    pub async fn delete(&self, path: &str, key: &str) -> Response {
        self.call(Method::DELETE, path, Some(key), None).await
    }

    /// Creates an organization as the platform operator; returns its id.
    pub async fn create_org(&self, name: &str) -> Uuid {
        let slug: String = name
            .to_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let r = self
            .post(
                "/v1/organizations",
                &self.admin_key,
                json!({"name": name, "slug": slug}),
            )
            .await;
        assert_eq!(r.status, 201, "create org: {}", r.body);
        r.body["id"].as_str().unwrap().parse().unwrap()
    }

    /// The id of a built-in role of `org`.
    pub async fn role_id(&self, org: Uuid, name: &str) -> Uuid {
        let r = self
            .get(&format!("/v1/organizations/{org}/roles"), &self.admin_key)
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let role = r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .expect("role exists");
        role["id"].as_str().unwrap().parse().unwrap()
    }

    /// Creates a custom role in `org` as the platform operator, inheriting from `parent`
    /// when given; returns its id.
    pub async fn create_role(
        &self,
        org: Uuid,
        name: &str,
        permissions: &[&str],
        parent: Option<Uuid>,
    ) -> Uuid {
        let mut body = json!({"name": name, "permissions": permissions});
        if let Some(parent) = parent {
            body["parent_role_id"] = json!(parent);
        }
        let r = self
            .post(
                &format!("/v1/organizations/{org}/roles"),
                &self.admin_key,
                body,
            )
            .await;
        assert_eq!(r.status, 201, "create role {name}: {}", r.body);
        r.body["id"].as_str().unwrap().parse().unwrap()
    }

    /// An invitation of `email` to `org` sent with `key`, answered as it is.
    pub async fn invite_by(&self, org: Uuid, key: &str, email: &str, name: &str) -> Response {
        self.post(
            &format!("/v1/organizations/{org}/users"),
            key,
            json!({"email": email, "full_name": name}),
        )
        .await
    }

    /// Invites a user into `org`; returns its id.
    pub async fn invite(&self, org: Uuid, email: &str, name: &str) -> Uuid {
        let r = self.invite_by(org, &self.admin_key, email, name).await;
        assert_eq!(r.status, 201, "invite: {}", r.body);
        r.body["id"].as_str().unwrap().parse().unwrap()
    }

    /// Assigns role `role` to user `user` of `org`, with no expiry, as the platform operator.
    pub async fn assign(&self, org: Uuid, user: Uuid, role: Uuid) {
        self.assign_with(org, user, role, json!({})).await
    }

    /// Assigns as [`Self::assign`] does, until `expires_at`.
    pub async fn assign_until(
        &self,
        org: Uuid,
        user: Uuid,
        role: Uuid,
        expires_at: chrono::DateTime<chrono::Utc>,
    ) {
        let body = json!({ "expires_at": expires_at });
        self.assign_with(org, user, role, body).await
    }

    async fn assign_with(&self, org: Uuid, user: Uuid, role: Uuid, body: Value) {
        let r = self
            .put(
                &format!("/v1/organizations/{org}/users/{user}/roles/{role}"),
                &self.admin_key,
                body,
            )
            .await;
        assert_eq!(r.status, 200, "assign: {}", r.body);
    }

    /// Revokes role `role` of user `user` of `org`, as the platform operator.
    pub async fn revoke_role(&self, org: Uuid, user: Uuid, role: Uuid) {
        let r = self
            .delete(
                &format!("/v1/organizations/{org}/users/{user}/roles/{role}"),
                &self.admin_key,
            )
            .await;
        assert_eq!(r.status, 204, "revoke: {}", r.body);
    }

    /// Deactivates user `user` of `org`, as the platform operator.
    pub async fn deactivate(&self, org: Uuid, user: Uuid) {
        let r = self
            .post(
                &format!("/v1/organizations/{org}/users/{user}/deactivate"),
                &self.admin_key,
                json!({}),
            )
            .await;
        assert_eq!(r.status, 200, "deactivate: {}", r.body);
    }

    /// A user holding the built-in role `role`, and a key of theirs with every permission
    /// of that role. Returns (user id, key secret).
    pub async fn member_with_key(&self, org: Uuid, role: &str, email: &str) -> (Uuid, String) {
        let user = self.invite(org, email, "Test Person").await;
        self.assign(org, user, self.role_id(org, role).await).await;
        let perms = ledgerline_aggregates::organization::built_in_roles::permissions(role).unwrap();
        let r = self
            .post(
                &format!("/v1/organizations/{org}/api-keys"),
                &self.admin_key,
                json!({"label": format!("{role} key"), "permissions": perms, "user_id": user}),
            )
            .await;
        assert_eq!(r.status, 201, "issue: {}", r.body);
        (user, r.body["secret"].as_str().unwrap().to_string())
    }

    pub async fn head(&self) -> i64 {
        let (max,): (Option<i64>,) = sqlx::query_as("SELECT max(position) FROM events")
            .fetch_one(self.pool())
            .await
            .unwrap();
        max.unwrap_or(0)
    }

    /// Stops projection `name` as an event it cannot apply would: a recorded failure just
    /// past the head, which its next batch reads and stops at, applying nothing more.
    pub async fn stop_projection(&self, name: &str) {
        sqlx::query(
            "INSERT INTO projection_failures (name, position, error) \
             VALUES ($1, $2, 'stopped by the test')",
        )
        .bind(name)
        .bind(self.head().await + 1)
        .execute(self.pool())
        .await
        .unwrap();
    }

    /// Clears the failure [`TestApp::stop_projection`] made; the projector then catches up on
    /// its own.
    pub async fn resume_projection(&self, name: &str) {
        assert_eq!(
            ledgerline_projections::retry(self.pool(), name)
                .await
                .unwrap(),
            1
        );
    }

    pub async fn verify(&self) -> Report {
        verify_database(self.pool(), 2).await.expect("verify runs")
    }
}

/// `path` with every `{param}` replaced by a fresh UUID.
pub fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg.starts_with('{') && seg.ends_with('}') {
                Uuid::new_v4().to_string()
            } else {
                seg.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The `code` the one error shape carries for an HTTP status (see src/api/error.rs).
pub fn error_code(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "invalid",
        503 => "unavailable",
        _ => "internal",
    }
}

/// Asserts `r` is an error of `status` in the one JSON shape
/// `{"error": {"status": N, "code": "...", "message": "..."}}`, with nothing else beside it.
#[track_caller]
/// [`assert_error`], and its message says `text`.
pub fn assert_error_says(r: &Response, status: u16, text: &str) {
    assert_error(r, status);
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains(text),
        "the message says {text:?}: {}",
        r.body
    );
}

pub fn assert_error(r: &Response, status: u16) {
    assert_eq!(
        r.status, status,
        "expected {status}, got {}: {}",
        r.status, r.body
    );
    let top = r
        .body
        .as_object()
        .unwrap_or_else(|| panic!("error body is not a JSON object: {}", r.body));
    assert_eq!(top.len(), 1, "only `error` at the top level: {}", r.body);
    let e = &r.body["error"];
    assert_eq!(
        e.as_object().map(|o| o.len()),
        Some(3),
        "status, code and message only: {}",
        r.body
    );
    assert_eq!(
        e["status"],
        json!(status),
        "error.status matches the HTTP status: {}",
        r.body
    );
    assert_eq!(
        e["code"],
        json!(error_code(status)),
        "error.code: {}",
        r.body
    );
    assert!(
        e["message"].as_str().is_some_and(|m| !m.trim().is_empty()),
        "a message: {}",
        r.body
    );
}

impl TestApp {
    /// A request whose `Authorization` header is exactly `authorization` (or absent).
    pub async fn with_authorization(
        &self,
        method: Method,
        path: &str,
        authorization: Option<&str>,
    ) -> Response {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        answer(req).await
    }
}

/// Sends `req`; its answer, the body as JSON (text if it is not; null if empty).
pub async fn answer(req: reqwest::RequestBuilder) -> Response {
    let res = req.send().await.expect("request sent");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let text = res.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Response {
        status,
        body,
        headers,
    }
}

/// Every row of every table of the public schema as text, with the table's name.
pub async fn every_row(t: &TestApp) -> Vec<(String, String)> {
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name",
    )
    .fetch_all(t.pool())
    .await
    .unwrap();
    assert!(
        tables.len() >= 10,
        "the schema's tables are found: {tables:?}"
    );
    let mut rows = Vec::new();
    for (table,) in tables {
        let texts: Vec<(String,)> = sqlx::query_as(&format!("SELECT t::text FROM \"{table}\" t"))
            .fetch_all(t.pool())
            .await
            .unwrap();
        rows.extend(texts.into_iter().map(|(text,)| (table.clone(), text)));
    }
    // The log's JSON columns on their own too, in case a row's text form escapes them.
    let events: Vec<(String, String)> =
        sqlx::query_as("SELECT payload::text, metadata::text FROM events")
            .fetch_all(t.pool())
            .await
            .unwrap();
    for (payload, metadata) in events {
        rows.push(("events.payload".into(), payload));
        rows.push(("events.metadata".into(), metadata));
    }
    rows
}

// ---------------------------------------------------------------------------------------
// Tampering as a superuser would.

/// Begins a transaction holding projection `name`'s checkpoint row, which a rebuild's swap
/// and the projector's batches lock. The row is made first if the projector has not made it
/// yet: locking a row that does not exist would hold nothing (seen under load).
pub async fn hold_checkpoint(pool: &PgPool, name: &str) -> Transaction<'static, Postgres> {
    sqlx::query("INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let held = sqlx::query("SELECT 1 FROM projection_checkpoints WHERE name = $1 FOR UPDATE")
        .bind(name)
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(held, 1, "the checkpoint row of {name} is held");
    tx
}

/// Checks from the log alone, as `verify --actors` does, that no request's command was
/// recorded after its actor lost its standing: what the writer wrote always passes, so this
/// holds the writer's guards and the auditor's check to each other.
pub async fn assert_actors_guarded(pool: &PgPool) {
    let head: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events")
        .fetch_one(pool)
        .await
        .unwrap();
    let report = ledgerline::ledger::standing::check_database(pool, head)
        .await
        .expect("the actors check runs");
    assert_eq!(report.unguarded, 0, "{report}");
    assert!(
        report.checked > 0,
        "requests' commands were checked: {report}"
    );
}

/// Sets `column` (`payload` or `metadata`) of event `k` to `edit` of its text and recomputes
/// every later link and hash, and runs `also` in the same transaction.
pub async fn rewrite_json_from(
    t: &TestApp,
    k: i64,
    column: &str,
    edit: impl Fn(&str) -> String,
    also: &[&str],
) {
    let n = t.head().await;
    let mut tx = superuser_tx(t.pool()).await;
    let mut prev = event_at(t.pool(), k - 1).await.hash;
    for p in k..=n {
        let mut e = event_at(t.pool(), p).await;
        if p == k {
            let text = match column {
                "payload" => &mut e.payload,
                "metadata" => &mut e.metadata,
                other => panic!("not a JSON column of events: {other}"),
            };
            *text = edit(text);
            sqlx::query(&format!(
                "UPDATE events SET {column} = $2::text::json WHERE position = $1"
            ))
            .bind(p)
            .bind(&*text)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        e.prev_hash = prev;
        e.hash = hash_of(&e.prev_hash, &e);
        set_hashes(&mut tx, p, &e.prev_hash, &e.hash).await;
        prev = e.hash;
    }
    for s in also {
        sqlx::query(s).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
}

/// A transaction in which the append-only triggers do not fire (superuser only).
pub async fn superuser_tx(pool: &PgPool) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Runs `statements` with the triggers off, and commits.
pub async fn tamper(pool: &PgPool, statements: &[String]) {
    let mut tx = superuser_tx(pool).await;
    for s in statements {
        sqlx::query(s)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    tx.commit().await.unwrap();
}

pub async fn event_at(pool: &PgPool, position: i64) -> StoredEvent {
    sqlx::query_as(&format!(
        "SELECT {STORED_EVENT_COLUMNS} FROM events WHERE position = $1"
    ))
    .bind(position)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("event at {position}: {e}"))
}

/// Sets the hashes of the event at `position` (triggers off).
pub async fn set_hashes(
    tx: &mut Transaction<'_, Postgres>,
    position: i64,
    prev_hash: &[u8],
    hash: &[u8],
) {
    sqlx::query("UPDATE events SET prev_hash = $2, hash = $3 WHERE position = $1")
        .bind(position)
        .bind(prev_hash)
        .bind(hash)
        .execute(&mut **tx)
        .await
        .unwrap();
}

/// The hash our algorithm gives `e` on top of `prev` (what a forger who read the docs computes).
pub fn hash_of(prev: &[u8], e: &StoredEvent) -> Vec<u8> {
    event_hash(&prev.try_into().unwrap(), &EventFields::of(e)).to_vec()
}
