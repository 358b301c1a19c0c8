//! A command whose COMMIT reached the database but whose answer was lost (the connection
//! dropped, the server restarted): its caller hears what the log holds. The app talks to
//! PostgreSQL through a TCP relay that cuts the writer's connection at its COMMIT, either
//! after the server answered (it committed) or before the server saw it (it did not). And a
//! command whose caller stopped waiting before the writer took it up is not appended.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use common::{TestApp, TestDb, APPEND_LOCK};
use ledgerline::ledger::WRITER_APPLICATION_NAME;
use ledgerline_projections::notify::HEAD_CHANNEL;
use ledgerline_projections::Projector;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

/// What the relay does to the next COMMIT of the writer (`pg_notify(<head channel>, ..);
/// COMMIT`), then it passes everything again.
const PASS: u8 = 0;
/// Pass the COMMIT on, drop the server's answer, and cut the connection.
const CUT_ANSWER: u8 = 1;
/// Cut the connection instead of passing the COMMIT on.
const CUT_COMMIT: u8 = 2;
/// Swallow the COMMIT and pass nothing more, keeping the connection open: a server that
/// stopped answering.
const FREEZE_COMMIT: u8 = 3;

/// A relay on 127.0.0.1 to the test server's PostgreSQL.
struct Relay {
    port: u16,
    mode: Arc<AtomicU8>,
    /// Take the writer's next connection and never answer it.
    hold_writer: Arc<AtomicBool>,
}

impl Relay {
    async fn start(upstream: (String, u16)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let hold_writer = Arc::new(AtomicBool::new(false));
        let (shared, hold) = (mode.clone(), hold_writer.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (mode, hold, upstream) = (shared.clone(), hold.clone(), upstream.clone());
                tokio::spawn(async move {
                    if let Some((client, startup)) = unless_held(client, &hold).await {
                        let mut server = TcpStream::connect(&upstream).await.unwrap();
                        if server.write_all(&startup).await.is_ok() {
                            relay(client, server, mode).await;
                        }
                    }
                });
            }
        });
        Self {
            port,
            mode,
            hold_writer,
        }
    }

    fn arm(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn armed(&self) -> bool {
        self.mode.load(Ordering::SeqCst) != PASS
    }
}

/// The client's startup message (clear text: TLS is off), or `None` when it is the writer's
/// and `hold` is armed: then it is read and dropped until the client gives up, never answered.
async fn unless_held(mut client: TcpStream, hold: &AtomicBool) -> Option<(TcpStream, Vec<u8>)> {
    let mut startup = vec![0u8; 8 * 1024];
    let n = client.read(&mut startup).await.ok()?;
    startup.truncate(n);
    let writer = contains(&startup, WRITER_APPLICATION_NAME.as_bytes());
    if writer && hold.swap(false, Ordering::SeqCst) {
        let mut sink = [0u8; 1024];
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
        return None;
    }
    Some((client, startup))
}

/// One connection both ways; it ends (both sockets closed) when either way ends.
async fn relay(client: TcpStream, server: TcpStream, mode: Arc<AtomicU8>) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let cutting = Arc::new(AtomicU8::new(0));
    let commit = format!("pg_notify('{HEAD_CHANNEL}'");
    let seen = cutting.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let is_commit = contains(chunk, commit.as_bytes()) && contains(chunk, b"COMMIT");
            if is_commit {
                match mode.swap(PASS, Ordering::SeqCst) {
                    CUT_COMMIT => return,
                    CUT_ANSWER => seen.store(1, Ordering::SeqCst),
                    FREEZE_COMMIT => {
                        seen.store(2, Ordering::SeqCst);
                        while matches!(from_client.read(&mut buf).await, Ok(n) if n > 0) {}
                        return;
                    }
                    _ => {}
                }
            }
            if to_server.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            // A frozen server says nothing more, not even that it ended the session (here
            // its idle limit does, after 10 s).
            if cutting.load(Ordering::SeqCst) == 2 {
                std::future::pending::<()>().await;
            }
            if n == 0 {
                return;
            }
            // The answer to a COMMIT cut after it went through: dropped with the connection.
            if cutting.load(Ordering::SeqCst) == 1 {
                return;
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The app with every connection (the writer's included) through a relay.
async fn app_through_relay() -> (TestApp, Relay) {
    let db = TestDb::new().await;
    let direct: PgConnectOptions = db.url.parse().unwrap();
    let relay = Relay::start((direct.get_host().to_string(), direct.get_port())).await;
    // In clear, so that the relay can see the COMMIT.
    let options = direct
        .host("127.0.0.1")
        .port(relay.port)
        .ssl_mode(PgSslMode::Disable);
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect_with(options)
        .await
        .unwrap();
    (
        TestApp::spawn_on(db, pool, Projector::default()).await,
        relay,
    )
}

async fn events_of(t: &TestApp, aggregate_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(aggregate_id.to_string())
        .fetch_one(t.pool())
        .await
        .unwrap()
}

/// Issues a key through an app whose writer's next COMMIT the relay cuts as `mode` says, and
/// checks what the caller must hear either way: 201, the key in the log exactly once, the
/// chain intact. Returns the app, the organization and the answer.
async fn issue_a_key_through_a_cut(mode: u8) -> (TestApp, Uuid, common::Response) {
    issue_a_key_through(mode, false).await
}

/// [`issue_a_key_through_a_cut`]; with `hold_reconnect`, the writer's next connection (made
/// after the cut) is taken and never answered.
async fn issue_a_key_through(mode: u8, hold_reconnect: bool) -> (TestApp, Uuid, common::Response) {
    let (t, relay) = app_through_relay().await;
    let org = t.create_org("Lost Answers").await;
    let before = t.head().await;

    relay.hold_writer.store(hold_reconnect, Ordering::SeqCst);
    relay.arm(mode);
    let r = t
        .post(
            &format!("/v1/organizations/{org}/api-keys"),
            &t.admin_key,
            json!({"label": "svc", "permissions": ["users:read"]}),
        )
        .await;
    assert!(!relay.armed(), "the writer's COMMIT went through the relay");
    assert!(
        !relay.hold_writer.load(Ordering::SeqCst),
        "the writer connected again"
    );
    assert_eq!(r.status, 201, "the key was issued: {}", r.body);
    let id: Uuid = r.body["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(events_of(&t, id).await, 1, "in the log once");
    assert_eq!(t.head().await, before + 1);
    assert!(t.verify().await.intact());
    (t, org, r)
}

#[tokio::test]
async fn a_command_whose_commit_answer_was_lost_is_answered_as_committed() {
    let (t, org, r) = issue_a_key_through_a_cut(CUT_ANSWER).await;
    let secret = r.body["secret"].as_str().unwrap();
    assert_eq!(
        t.get(&format!("/v1/organizations/{org}/users"), secret)
            .await
            .status,
        200,
        "the secret the caller was given works"
    );
}

/// The other way a lost COMMIT can have gone: it never arrived, so the batch is retried
/// (as it was before the writer learnt outcomes from the log); guards against the lookup
/// answering "committed" for it.
#[tokio::test]
async fn a_command_whose_commit_never_arrived_is_appended_once_by_its_retry() {
    issue_a_key_through_a_cut(CUT_COMMIT).await;
}

/// A database that stops answering the writer mid-transaction (its COMMIT swallowed, the
/// connection left open) holds it for a time limit, not for as long as TCP keeps the socket:
/// the writer then learns from the log that the batch did not commit and retries it, inside
/// the request's own time limit (30 s).
#[tokio::test]
async fn a_database_that_stops_answering_the_writer_stalls_it_for_a_limited_time() {
    issue_a_key_through(FREEZE_COMMIT, false).await;
}

/// The same for a connection that is taken but never answered (a half-dead proxy), made
/// when the writer reconnects after a cut.
#[tokio::test]
async fn a_connection_the_database_never_answers_stalls_the_writer_for_a_limited_time() {
    issue_a_key_through(CUT_COMMIT, true).await;
}

fn create_org(id: Uuid) -> ledgerline_aggregates::organization::OrganizationCommand {
    ledgerline_aggregates::organization::OrganizationCommand::Create {
        organization_id: id,
        name: format!("Org {id}"),
        slug: format!("org-{}", id.simple()),
        country_code: None,
        domain: None,
        settings: Default::default(),
    }
}

#[tokio::test]
async fn a_command_whose_caller_stopped_waiting_before_the_writer_took_it_is_not_appended() {
    use ledgerline::app::Actor;
    let t = TestApp::spawn().await;
    // The writer's next transaction waits for the append lock, held here.
    let mut holder = t.pool().acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut *holder)
        .await
        .unwrap();
    let app = t.app.clone();
    let (first, abandoned) = (Uuid::new_v4(), Uuid::new_v4());
    let blocked = tokio::spawn(async move {
        app.execute(
            &app.cqrs.organizations,
            first,
            Some(first),
            &Actor::cli("test"),
            create_org(first),
        )
        .await
        .map_err(|e| e.to_string())
    });
    // The writer has taken it up: its transaction waits for the lock.
    assert!(
        common::eventually(std::time::Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
            )
            .fetch_one(t.pool())
            .await
            .unwrap()
                == 1
        })
        .await,
        "the writer waits for the append lock"
    );
    // Queued behind it, and given up on (as a request's time limit or a hang-up does).
    let gave_up = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        t.app.execute(
            &t.app.cqrs.organizations,
            abandoned,
            Some(abandoned),
            &Actor::cli("test"),
            create_org(abandoned),
        ),
    )
    .await;
    assert!(gave_up.is_err(), "the writer was held");
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut *holder)
        .await
        .unwrap();
    blocked
        .await
        .unwrap()
        .expect("the command already in a transaction goes on");
    // A later command is appended after the abandoned one would have been.
    let later = Uuid::new_v4();
    t.app
        .execute(
            &t.app.cqrs.organizations,
            later,
            Some(later),
            &Actor::cli("test"),
            create_org(later),
        )
        .await
        .unwrap();
    assert_eq!(events_of(&t, first).await, 1);
    assert_eq!(events_of(&t, later).await, 1);
    assert_eq!(events_of(&t, abandoned).await, 0, "not appended");
    assert!(t.verify().await.intact());
}
