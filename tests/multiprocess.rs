//! Two real `ledgerline serve` processes on one database: commands through both keep the
//! log gap-free and verifiable, each background job runs in exactly one of them (the
//! holder of its lease), a command through the other still reads its own writes, and when
//! the holder is killed the other takes its leases over and keeps projecting.

mod common;
mod server;

use std::time::{Duration, Instant};

use common::TestDb;
use reqwest::Method;
use serde_json::json;
use server::{
    call, eventually, id_of, lease_names, leases, ledgerline, positions, projections_at, Server,
    Setup,
};
use tokio::task::JoinSet;
use uuid::Uuid;

/// Short, so that a takeover after `kill -9` happens within the test; not shorter, so that
/// a holder slowed by the rest of the suite (four `serve` processes on two cores) still
/// renews in time.
const LEASE_TTL_SECS: u64 = 5;
/// Far longer than any wait here: whatever one process learns of another's work in this
/// test, it learns from notifications, never from a poll.
const NO_POLL_MS: u64 = 600_000;

/// Invites a user through `base` and reads it back at once through the same server;
/// returns (invite status, read status, user id, how long the invite took).
async fn invite_and_read(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    org: Uuid,
) -> (u16, u16, Uuid, Duration) {
    let email = format!("{}@multi.example", Uuid::new_v4().simple());
    let started = Instant::now();
    let r = call(
        client,
        base,
        Method::POST,
        &format!("/v1/organizations/{org}/users"),
        key,
        Some(json!({"email": email, "full_name": "Multi Person"})),
    )
    .await
    .expect("the server answers");
    let took = started.elapsed();
    if r.status != 201 {
        return (r.status, 0, Uuid::nil(), took);
    }
    let user = id_of(&r);
    let read = call(
        client,
        base,
        Method::GET,
        &format!("/v1/organizations/{org}/users/{user}"),
        key,
        None,
    )
    .await
    .expect("the server answers");
    (r.status, read.status, user, took)
}

/// Whether every lease exists, is unexpired and is held by `server`.
async fn all_leases_held_by(pool: &sqlx::PgPool, server: &Server) -> bool {
    let held = leases(pool).await;
    held.iter().map(|(n, ..)| n.clone()).collect::<Vec<_>>() == lease_names()
        && held.iter().all(|(_, h, live)| *live && server.holds(h))
}

async fn signed_size(pool: &sqlx::PgPool) -> i64 {
    let (size,): (Option<i64>,) = sqlx::query_as("SELECT max(tree_size) FROM checkpoints")
        .fetch_one(pool)
        .await
        .unwrap();
    size.unwrap_or(0)
}

#[tokio::test]
async fn two_servers_share_one_database_and_hand_over_leases() {
    let db = TestDb::new().await;
    let setup = Setup::new(&db.url).await;
    let mut a = Server::start(&setup, LEASE_TTL_SECS, NO_POLL_MS).await;
    assert!(
        eventually(Duration::from_secs(20), || all_leases_held_by(&db.pool, &a)).await,
        "the first server takes every lease: {:?}\n{}",
        leases(&db.pool).await,
        a.log_text()
    );
    let mut b = Server::start(&setup, LEASE_TTL_SECS, NO_POLL_MS).await;
    let client = reqwest::Client::new();
    let key = setup.admin_key.as_str();

    let r = call(
        &client,
        &b.base,
        Method::POST,
        "/v1/organizations",
        key,
        Some(json!({"name": "Two Processes", "slug": "two-processes"})),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let org = id_of(&r);

    // Concurrent commands through both servers, each read back at once where it was sent.
    let mut tasks = JoinSet::new();
    for task in 0..16 {
        let client = client.clone();
        let bases = [a.base.clone(), b.base.clone()];
        let key = setup.admin_key.clone();
        tasks.spawn(async move {
            let mut out = Vec::new();
            for i in 0..8 {
                let which = (task + i) % 2;
                let (created, read, _, _) =
                    invite_and_read(&client, &bases[which], &key, org).await;
                out.push((which, created, read));
            }
            out
        });
    }
    let results: Vec<(usize, u16, u16)> = tasks.join_all().await.into_iter().flatten().collect();
    assert_eq!(results.len(), 128);
    assert!(results.iter().any(|(w, ..)| *w == 1));
    for (which, created, read) in &results {
        assert_eq!(*created, 201, "invite through server {which}");
        assert_eq!(*read, 200, "read-your-writes through server {which}");
    }

    let (head, gap_free) = positions(&db.pool).await;
    assert!(gap_free, "positions are exactly 1..={head}");
    // The organization, its four built-in roles, 128 users, on top of the bootstrap key.
    assert!(head >= 1 + 5 + 128, "head {head}");
    assert!(
        projections_at(&db.pool, head).await,
        "every command waited for every projection, so all are at the head"
    );
    let (code, out, err) = ledgerline(&db.url, &["verify"]).await;
    assert_eq!(code, 0, "verify: {out}{err}");
    assert!(out.contains(&format!("{head} events verified")), "{out}");

    // B neither ran a projection nor the maintainer, yet read its own writes at once.
    assert!(
        all_leases_held_by(&db.pool, &a).await,
        "{:?}",
        leases(&db.pool).await
    );
    let mut quiet = Vec::new();
    for _ in 0..5 {
        let (created, read, _, took) = invite_and_read(&client, &b.base, key, org).await;
        assert_eq!((created, read), (201, 200), "a command through B alone");
        quiet.push(took);
    }
    println!("commands through the follower B took {quiet:?}");
    let b_log = b.log_text();
    assert!(
        !b_log.contains("lease acquired"),
        "B took no lease while A held them:\n{b_log}"
    );
    assert!(
        !b_log.contains("did not all catch up"),
        "B's read-your-writes never timed out:\n{b_log}"
    );
    // Secondary: B waited for A's notifications, not for a poll (10 minutes away) or its
    // read-your-writes timeout (5 s).
    assert!(
        quiet.iter().all(|t| *t < Duration::from_secs(4)),
        "{quiet:?}"
    );
    // A's maintainer integrates and signs what B committed (it signs every second).
    let (head, _) = positions(&db.pool).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            signed_size(&db.pool).await == head
        })
        .await,
        "a checkpoint of the head {head} is signed"
    );

    // The holder dies without a word; B takes every lease once they expire.
    a.kill9().await;
    let killed = Instant::now();
    assert!(
        eventually(Duration::from_secs(30), || all_leases_held_by(&db.pool, &b)).await,
        "B takes the leases over: {:?}\n{}",
        leases(&db.pool).await,
        b.log_text()
    );
    println!(
        "B held every lease {:?} after A was killed",
        killed.elapsed()
    );
    // B logs an acquisition only after its transaction commits, so the last line may
    // trail the row the test saw: wait for every line, then count that none came twice.
    let acquired = || b.log_text().matches("lease acquired").count();
    assert!(
        eventually(Duration::from_secs(5), || async {
            acquired() >= lease_names().len()
        })
        .await,
        "B logs each acquisition:\n{}",
        b.log_text()
    );
    assert_eq!(
        acquired(),
        lease_names().len(),
        "each lease acquired once, by B"
    );
    for _ in 0..3 {
        let (created, read, _, _) = invite_and_read(&client, &b.base, key, org).await;
        assert_eq!(
            (created, read),
            (201, 200),
            "B projects its own commands now"
        );
    }
    let (head, gap_free) = positions(&db.pool).await;
    assert!(gap_free);
    assert!(projections_at(&db.pool, head).await);
    assert!(
        eventually(Duration::from_secs(20), || async {
            signed_size(&db.pool).await == head
        })
        .await,
        "B's maintainer signs the new head {head}"
    );
    let (code, out, err) = ledgerline(&db.url, &["verify"]).await;
    assert_eq!(code, 0, "verify: {out}{err}");

    // A graceful stop gives the leases back at once.
    assert_eq!(b.terminate().await, 0, "{}", b.log_text());
    assert!(
        leases(&db.pool).await.is_empty(),
        "released on shutdown: {:?}",
        leases(&db.pool).await
    );
}

#[tokio::test]
async fn a_lease_is_taken_over_at_once_when_its_holder_stops_gracefully() {
    let db = TestDb::new().await;
    let setup = Setup::new(&db.url).await;
    // A TTL far beyond the test's patience: only a release lets B in.
    let mut a = Server::start(&setup, 600, NO_POLL_MS).await;
    assert!(eventually(Duration::from_secs(20), || all_leases_held_by(&db.pool, &a)).await);
    let b = Server::start(&setup, 600, NO_POLL_MS).await;
    assert!(all_leases_held_by(&db.pool, &a).await);
    assert_eq!(a.terminate().await, 0, "{}", a.log_text());
    assert!(
        eventually(Duration::from_secs(20), || all_leases_held_by(&db.pool, &b)).await,
        "B takes the released leases without waiting for a TTL: {:?}\n{}",
        leases(&db.pool).await,
        b.log_text()
    );
    let client = reqwest::Client::new();
    let r = call(
        &client,
        &b.base,
        Method::POST,
        "/v1/organizations",
        &setup.admin_key,
        Some(json!({"name": "After Handover", "slug": "after-handover"})),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let (head, _) = positions(&db.pool).await;
    assert!(projections_at(&db.pool, head).await);
}

/// Two roles made each other's parent at once through two servers: the organization's turn
/// is a database lock, so one of them sees the other's change and is refused.
#[tokio::test]
async fn roles_re_parented_through_two_servers_at_once_make_no_cycle() {
    let db = TestDb::new().await;
    let setup = Setup::new(&db.url).await;
    let a = Server::start(&setup, LEASE_TTL_SECS, NO_POLL_MS).await;
    let b = Server::start(&setup, LEASE_TTL_SECS, NO_POLL_MS).await;
    let client = reqwest::Client::new();
    let key = setup.admin_key.as_str();
    let send = |base: &str, method: Method, path: String, body: serde_json::Value| {
        let (client, base) = (client.clone(), base.to_string());
        async move {
            call(&client, &base, method, &path, key, Some(body))
                .await
                .expect("the server answers")
        }
    };
    let r = send(
        &a.base,
        Method::POST,
        "/v1/organizations".into(),
        json!({"name": "Two Trees", "slug": "two-trees"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let roles = format!("/v1/organizations/{}/roles", id_of(&r));
    for round in 0..10 {
        let mut pair = Vec::new();
        for name in ["c", "d"] {
            let body = json!({"name": format!("{name}{round}")});
            let r = send(&a.base, Method::POST, roles.clone(), body).await;
            assert_eq!(r.status, 201, "{}", r.body);
            pair.push(id_of(&r));
        }
        let (c, d) = (pair[0], pair[1]);
        let (by_a, by_b) = tokio::join!(
            send(
                &a.base,
                Method::PATCH,
                format!("{roles}/{c}"),
                json!({"parent_role_id": d})
            ),
            send(
                &b.base,
                Method::PATCH,
                format!("{roles}/{d}"),
                json!({"parent_role_id": c})
            ),
        );
        let statuses = [by_a.status, by_b.status];
        assert!(
            statuses.contains(&200) && statuses.contains(&422),
            "round {round}: one passes, the other is refused: {} {} / {} {}",
            by_a.status,
            by_a.body,
            by_b.status,
            by_b.body
        );
    }
    let (head, gap_free) = positions(&db.pool).await;
    assert!(gap_free, "positions are exactly 1..={head}");
}

/// A client that sends its headers and not its body holds a graceful stop up (until the
/// request timeout, 30 s): a second SIGTERM ends the server at once, with status 143.
#[tokio::test]
async fn a_second_sigterm_stops_a_server_held_up_by_an_unfinished_request() {
    use tokio::io::AsyncWriteExt;
    let db = TestDb::new().await;
    let setup = Setup::new(&db.url).await;
    let mut a = Server::start(&setup, LEASE_TTL_SECS, NO_POLL_MS).await;
    let address = a.base.trim_start_matches("http://");
    let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /v1/organizations HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        setup.admin_key
    );
    client.write_all(head.as_bytes()).await.unwrap();
    // Time for the server to authenticate and start waiting for the body.
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.send_term();
    assert_eq!(
        a.exit_within(Duration::from_secs(2)).await,
        None,
        "the first SIGTERM waits for the request in flight: {}",
        a.log_text()
    );
    a.send_term();
    assert_eq!(
        a.exit_within(Duration::from_secs(20)).await,
        Some(143),
        "the second SIGTERM stops it at once: {}",
        a.log_text()
    );
    drop(client);
}

/// Signals are caught from the start, but until `serve` holds anything one just ends it: not
/// ignored while it waits for a database that does not answer.
#[tokio::test]
async fn a_sigterm_while_connecting_ends_serve_at_once() {
    let db = TestDb::new().await;
    let setup = Setup::new(&db.url).await;
    // Accepts connections and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("postgres://postgres@{}/none", silent.local_addr().unwrap());
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listen.local_addr().unwrap().port();
    drop(listen);
    let mut child = tokio::process::Command::new(server::BIN)
        .arg("serve")
        .env("LEDGERLINE_DATABASE_URL", &url)
        .env("LEDGERLINE_LISTEN", format!("127.0.0.1:{port}"))
        .env("LEDGERLINE_MASTER_KEY", &setup.master_key)
        .env("LEDGERLINE_SIGNING_KEY", &setup.signing_key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (_accepted, _) = silent.accept().await.unwrap();
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Well before the pool's 10 s connect timeout would have ended it with status 1.
    let exit = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("serve ends within 5 s of SIGTERM")
        .unwrap();
    assert_eq!(exit.code(), Some(0), "{exit}");
}

/// The connections on this database that have run LISTEN (a process's listener).
const LISTENERS: &str =
    "FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%'";

/// How many listeners this database has.
async fn listeners(pool: &sqlx::PgPool) -> i64 {
    let (n,): (i64,) = sqlx::query_as(&format!("SELECT count(*) {LISTENERS}"))
        .fetch_one(pool)
        .await
        .unwrap();
    n
}

/// Cuts the connection of every listener on this database; true if there was one.
async fn cut_listener(pool: &sqlx::PgPool) -> bool {
    let (cut,): (i64,) = sqlx::query_as(&format!(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) {LISTENERS}"
    ))
    .fetch_one(pool)
    .await
    .unwrap();
    cut > 0
}

/// A holder that no running process has.
const GONE: &str = "gone:1:00000000";

#[tokio::test]
async fn a_lease_released_while_nobody_listened_is_taken_once_the_listener_is_back() {
    let db = TestDb::new().await;
    let setup = Setup::new(&db.url).await;
    // Every lease held for an hour by a process that is gone.
    for name in lease_names() {
        sqlx::query(
            "INSERT INTO leases (name, holder, acquired_at, expires_at) \
             VALUES ($1, $2, now(), now() + interval '1 hour')",
        )
        .bind(&name)
        .bind(GONE)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let b = Server::start(&setup, 600, NO_POLL_MS).await;
    // B's tasks try for their leases as they start; give them time to have been refused,
    // so that from now on only a wake-up makes them try again (their own turn is 200 s away).
    assert!(
        eventually(Duration::from_secs(20), || async {
            listeners(&db.pool).await == 1
        })
        .await,
        "B listens"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        leases(&db.pool)
            .await
            .iter()
            .all(|(_, holder, _)| holder == GONE),
        "B cannot take what is held"
    );
    // The leases go without a notification (as if sent while B's listener was away), then
    // B's listener loses its connection and subscribes again.
    sqlx::query("DELETE FROM leases")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(cut_listener(&db.pool).await, "B's listener was found");
    assert!(
        eventually(Duration::from_secs(20), || all_leases_held_by(&db.pool, &b)).await,
        "B tries for every lease as soon as it listens again: {:?}\n{}",
        leases(&db.pool).await,
        b.log_text()
    );
}

/// A master key that does not open the database's data keys (someone else's
/// `LEDGERLINE_MASTER_KEY`) stops `serve` before it serves: with it, every user would read
/// as erased, and what it sealed the right key could never open.
#[tokio::test]
async fn serve_refuses_a_master_key_that_does_not_open_the_data_keys() {
    let db = TestDb::new().await;
    let setup = Setup::new(&db.url).await;
    // No data key yet: any master key is taken.
    let mut a = Server::start(&setup, LEASE_TTL_SECS, NO_POLL_MS).await;
    let client = reqwest::Client::new();
    let r = call(
        &client,
        &a.base,
        Method::POST,
        "/v1/organizations",
        &setup.admin_key,
        Some(json!({"name": "Sealed", "slug": "sealed"})),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let (invited, ..) = invite_and_read(&client, &a.base, &setup.admin_key, id_of(&r)).await;
    assert_eq!(invited, 201);
    assert_eq!(a.terminate().await, 0, "{}", a.log_text());

    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listen.local_addr().unwrap().port();
    drop(listen);
    let wrong = tokio::process::Command::new(server::BIN)
        .arg("serve")
        .env("LEDGERLINE_DATABASE_URL", &setup.url)
        .env("LEDGERLINE_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "LEDGERLINE_MASTER_KEY",
            ledgerline::crypto::MasterKey::generate().to_hex(),
        )
        .env("LEDGERLINE_SIGNING_KEY", &setup.signing_key)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), wrong)
        .await
        .expect("serve ends by itself")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the master key does not open this database's data keys"),
        "{stderr}"
    );
    // The right key still serves.
    let mut b = Server::start(&setup, LEASE_TTL_SECS, NO_POLL_MS).await;
    assert_eq!(b.terminate().await, 0, "{}", b.log_text());
}
