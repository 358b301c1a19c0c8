//! Real `ledgerline serve` processes for the multi-process and crash tests: keys made by
//! the binary itself (`keygen`, `bootstrap`), each server on a port of its own, its log in
//! a file, stopped with SIGTERM or SIGKILL.
#![allow(dead_code)] // each test binary uses its own part

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ledgerline::crypto::MasterKey;
use reqwest::Method;
use serde_json::Value;
use tokio::process::{Child, Command};
use uuid::Uuid;

pub const BIN: &str = env!("CARGO_BIN_EXE_ledgerline");

/// The in-process tests' command runner and wait, shared.
pub use crate::common::{eventually, ledgerline};

/// What every server of one database is started with, and the operator's key.
pub struct Setup {
    pub url: String,
    pub master_key: String,
    pub signing_key: String,
    pub admin_key: String,
}

impl Setup {
    /// Makes a signing key with `keygen`, a master key, and the operator key with
    /// `bootstrap`, as an operator would.
    pub async fn new(url: &str) -> Self {
        let (code, out, err) = ledgerline(url, &["keygen"]).await;
        assert_eq!(code, 0, "keygen: {err}");
        let keys: Value = serde_json::from_str(&out).expect("keygen prints JSON");
        let (code, out, err) = ledgerline(url, &["bootstrap"]).await;
        assert_eq!(code, 0, "bootstrap: {err}");
        let boot: Value = serde_json::from_str(&out).expect("bootstrap prints JSON");
        Self {
            url: url.to_string(),
            master_key: MasterKey::generate().to_hex(),
            signing_key: keys["signing_key"].as_str().unwrap().to_string(),
            admin_key: boot["api_key"].as_str().unwrap().to_string(),
        }
    }
}

/// One `ledgerline serve` child process.
pub struct Server {
    child: Child,
    pub pid: u32,
    pub base: String,
    pub log: PathBuf,
}

impl Server {
    /// Starts a server with lease TTL `lease_ttl_secs` and projection poll `poll_ms`, and
    /// waits until it answers `/healthz`.
    pub async fn start(setup: &Setup, lease_ttl_secs: u64, poll_ms: u64) -> Server {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().unwrap().port()
        };
        let log = std::env::temp_dir().join(format!("ll-serve-{}.log", Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(BIN)
            .arg("serve")
            .env("LEDGERLINE_DATABASE_URL", &setup.url)
            .env("LEDGERLINE_LISTEN", format!("127.0.0.1:{port}"))
            .env("LEDGERLINE_MASTER_KEY", &setup.master_key)
            .env("LEDGERLINE_SIGNING_KEY", &setup.signing_key)
            .env("LEDGERLINE_LEASE_TTL_SECS", lease_ttl_secs.to_string())
            .env("LEDGERLINE_PROJECTION_POLL_MS", poll_ms.to_string())
            .env("LEDGERLINE_CHECKPOINT_INTERVAL_SECS", "1")
            .env("LEDGERLINE_DB_POOL", "8")
            // Lease changes are logged at info: the tests read them.
            .env("RUST_LOG", "warn,ledgerline_projections::lease=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("start ledgerline serve");
        let pid = child.id().expect("running");
        let mut server = Server {
            child,
            pid,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{}/healthz", server.base)).send().await {
                if r.status().is_success() {
                    return server;
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("serve exited with {status}: {}", server.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "serve did not come up: {}",
                server.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`: no shutdown code runs, leases stay until they expire.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        self.child.wait().await.expect("reaped");
    }

    /// SIGTERM, then waits for the exit code.
    pub async fn terminate(&mut self) -> i32 {
        self.send_term();
        self.exit_within(Duration::from_secs(30))
            .await
            .expect("serve stops within 30 s of SIGTERM")
    }

    /// SIGTERM, without waiting.
    pub fn send_term(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }

    /// The exit code, if the process ends within `limit`.
    pub async fn exit_within(&mut self, limit: Duration) -> Option<i32> {
        let exit = tokio::time::timeout(limit, self.child.wait()).await.ok()?;
        Some(exit.expect("reaped").code().unwrap_or(-1))
    }

    /// Whether a lease holder id (`hostname:pid:random`) is this process's.
    pub fn holds(&self, holder: &str) -> bool {
        holder.split(':').nth(1) == Some(self.pid.to_string().as_str())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Kept when a test fails, for its log; `kill_on_drop` stops the process.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// An HTTP answer: status and JSON body (Null when empty).
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

/// One request; `Err` when no answer came (the server is gone).
pub async fn call(
    client: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> Result<Answer, reqwest::Error> {
    let mut req = client
        .request(method, format!("{base}{path}"))
        .bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let text = res.text().await?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Ok(Answer { status, body })
}

/// The id in a 201's body.
pub fn id_of(a: &Answer) -> Uuid {
    a.body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an id in {}", a.body))
        .parse()
        .unwrap()
}

/// The ledger's head, and whether positions are exactly 1..=head.
pub async fn positions(pool: &sqlx::PgPool) -> (i64, bool) {
    let (count, min, max, distinct): (i64, Option<i64>, Option<i64>, i64) = sqlx::query_as(
        "SELECT count(*), min(position), max(position), count(DISTINCT position) FROM events",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let head = max.unwrap_or(0);
    (
        head,
        count == head && distinct == head && min.unwrap_or(1) == 1,
    )
}

/// Every lease: (name, holder, unexpired).
pub async fn leases(pool: &sqlx::PgPool) -> Vec<(String, String, bool)> {
    sqlx::query_as("SELECT name, holder, expires_at > now() FROM leases ORDER BY name")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The leases a server takes: one per projection and the log maintainer's.
pub fn lease_names() -> Vec<String> {
    let mut names: Vec<String> = ledgerline_projections::names()
        .into_iter()
        .map(|n| format!("projection:{n}"))
        .collect();
    names.push("log-maintainer".into());
    names.sort();
    names
}

/// Whether every projection has reached `head` (see `ProjectionStatus::position`).
pub async fn projections_at(pool: &sqlx::PgPool, head: i64) -> bool {
    // What each has reached: a projection records its checkpoint past events it does not
    // read only at its next batch.
    ledgerline_projections::status(pool)
        .await
        .unwrap()
        .iter()
        .all(|s| s.position == head)
}
