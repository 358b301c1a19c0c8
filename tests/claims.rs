//! `ledgerline claims check`: the unique claims the writer keeps, against the claims the log
//! gives; run as the built binary against a test database.

mod common;

use common::{
    hold_appends, ledgerline, release_appends, tamper, wait_for_appenders, TestApp, POLICY,
};
use ledgerline::ledger::tree;
use serde_json::json;
use uuid::Uuid;

async fn claim_rows(t: &TestApp) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT scope, key, owner FROM unique_claims ORDER BY scope, key")
        .fetch_all(t.pool())
        .await
        .unwrap()
}

/// Organizations, users, keys, and roles created, renamed and deleted: claims taken and
/// released.
async fn log_with_claims(t: &TestApp) -> (Uuid, Uuid) {
    let org = t.create_org("Claims Co").await;
    t.invite(org, "ada@example.com", "Ada").await;
    t.member_with_key(org, "member", "grace@example.com").await;
    let mut roles = Vec::new();
    for name in ["ops", "dev"] {
        let r = t
            .post(
                &format!("/v1/organizations/{org}/roles"),
                &t.admin_key,
                json!({"name": name, "permissions": ["users:read"]}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        roles.push(r.body["id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    let r = t
        .patch(
            &format!("/v1/organizations/{org}/roles/{}", roles[0]),
            &t.admin_key,
            json!({"name": "ops-old"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t
        .delete(
            &format!("/v1/organizations/{org}/roles/{}", roles[1]),
            &t.admin_key,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    (org, roles[0])
}

#[tokio::test]
async fn the_claims_of_an_untouched_log_equal_the_table() {
    let t = TestApp::spawn().await;
    let (org, _) = log_with_claims(&t).await;
    let (code, out, err) = ledgerline(&t.db.url, &["claims", "check"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("the unique claims equal the log's"), "{out}");
    let held = claim_rows(&t).await;
    assert!(
        held.iter().any(|(_, k, _)| *k == format!("{org}:ops-old")),
        "the renamed role holds its new name: {held:?}"
    );
    assert!(
        !held
            .iter()
            .any(|(_, k, _)| *k == format!("{org}:ops") || *k == format!("{org}:dev")),
        "released names are gone: {held:?}"
    );
    assert!(out.contains(&format!("{} held", held.len())), "{out}");
}

#[tokio::test]
async fn a_damaged_table_is_reported_left_alone_and_repaired_on_request() {
    let t = TestApp::spawn().await;
    let (org, ops) = log_with_claims(&t).await;
    let good = claim_rows(&t).await;
    // An owner changed (what the batch bug left), a claim lost, a stray one added.
    tamper(
        t.pool(),
        &[
            format!(
                "UPDATE unique_claims SET owner = 'Role:{}' WHERE key = '{org}:ops-old'",
                Uuid::new_v4()
            ),
            "DELETE FROM unique_claims WHERE scope = 'api_key_prefix' \
             AND key = (SELECT min(key) FROM unique_claims WHERE scope = 'api_key_prefix')"
                .to_string(),
            format!("INSERT INTO unique_claims (scope, key, owner) VALUES ('role_name', '{org}:ghost', 'Role:{ops}')"),
        ],
    )
    .await;
    let damaged = claim_rows(&t).await;
    let (code, out, err) = ledgerline(&t.db.url, &["claims", "check"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(out.matches("  DIFFERENT ").count(), 3, "{out}");
    assert!(
        out.contains(&format!("role_name {org}:ops-old: table Role:"))
            && out.contains(&format!("log Role:{ops}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{org}:ghost: table Role:{ops}, log nobody")),
        "{out}"
    );
    assert!(out.contains(", log ApiKey:"), "the lost prefix: {out}");
    assert_eq!(claim_rows(&t).await, damaged, "a check changes nothing");

    let (code, out, err) = ledgerline(&t.db.url, &["claims", "check", "--repair"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("  REWRITTEN ").count(), 3, "{out}");
    assert!(out.contains("repaired: 3 row(s) rewritten"), "{out}");
    assert_eq!(claim_rows(&t).await, good, "the table is the log's again");

    let (code, out, err) = ledgerline(&t.db.url, &["claims", "check"]).await;
    assert_eq!(code, 0, "{out}{err}");
    // The repaired name is refused to another role, as it was before the damage.
    let r = t
        .post(
            &format!("/v1/organizations/{org}/roles"),
            &t.admin_key,
            json!({"name": "OPS-old", "permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
}

/// A forged event that claims a held name: the log itself gives the key a second owner. The
/// check reports it; a repair refuses to write from a log that does not verify.
#[tokio::test]
async fn a_contested_claim_is_reported_and_a_forged_log_is_not_repaired_from() {
    let t = TestApp::spawn().await;
    let (org, _) = log_with_claims(&t).await;
    tamper(
        t.pool(),
        &[
            "INSERT INTO events (position, aggregate_type, aggregate_id, sequence, event_type, \
             event_version, organization_id, recorded_at, payload, metadata, prev_hash, hash, \
             hash_version) \
             SELECT (SELECT max(position) + 1 FROM events), aggregate_type, \
             gen_random_uuid()::text, 1, event_type, event_version, organization_id, \
             recorded_at, payload, metadata, prev_hash, hash, hash_version FROM events \
             WHERE event_type = 'RoleCreated' ORDER BY position LIMIT 1"
                .to_string(),
            format!("DELETE FROM unique_claims WHERE key = '{org}:ops-old'"),
        ],
    )
    .await;
    let before = claim_rows(&t).await;
    let (code, out, err) = ledgerline(&t.db.url, &["claims", "check"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("  CONTESTED role_name "), "{out}");
    assert!(
        out.contains(&format!(
            "  DIFFERENT role_name {org}:ops-old: table nobody"
        )),
        "{out}"
    );
    let (code, out, err) = ledgerline(&t.db.url, &["claims", "check", "--repair"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("not repairing: the log does not verify"),
        "{err}"
    );
    assert_eq!(claim_rows(&t).await, before, "nothing rewritten");
}

/// A log cut off behind a signed checkpoint: the chain that is left links, but `verify`
/// reports it truncated, and a repair must not release what the cut events still held.
#[tokio::test]
async fn a_log_cut_off_behind_a_checkpoint_is_not_repaired_from() {
    let t = TestApp::spawn().await;
    let (org, _) = log_with_claims(&t).await;
    tree::catch_up(t.pool(), Some(&t.signer), POLICY, true)
        .await
        .expect("integrate and sign");
    // The newest event is the deletion that released `dev`: without it the log holds the name.
    tamper(
        t.pool(),
        &["DELETE FROM events WHERE position = (SELECT max(position) FROM events)".to_string()],
    )
    .await;
    let before = claim_rows(&t).await;
    let (code, out, err) = ledgerline(&t.db.url, &["claims", "check"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!("  DIFFERENT role_name {org}:dev: table nobody")),
        "{out}"
    );
    let (code, out, err) = ledgerline(&t.db.url, &["claims", "check", "--repair"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("not repairing: the log does not verify") && err.contains("TRUNCATED"),
        "{err}"
    );
    assert_eq!(claim_rows(&t).await, before, "nothing rewritten");
}

/// The log with claims, a claim in the table that the log does not give (`{org}:ghost`,
/// for a repair to rewrite) and a session holding the append lock, which a repair then waits
/// for past its comparison.
async fn ghost_claim_and_append_lock(t: &TestApp) -> (Uuid, sqlx::PgConnection) {
    let (org, ops) = log_with_claims(t).await;
    tamper(
        t.pool(),
        &[format!(
            "INSERT INTO unique_claims (scope, key, owner) VALUES ('role_name', '{org}:ghost', 'Role:{ops}')"
        )],
    )
    .await;
    (org, hold_appends(t.pool()).await)
}

/// A claim taken while a repair compared and verified is folded before the rewrite: kept,
/// not rewritten away as one the log does not give. The append lock is held so that a
/// command queues for it first and the repair (past its comparison) behind it.
#[tokio::test]
async fn a_repair_folds_what_was_appended_after_its_comparison() {
    let t = TestApp::spawn().await;
    let (org, mut holder) = ghost_claim_and_append_lock(&t).await;
    let roles = format!("/v1/organizations/{org}/roles");
    let create = t.post(
        &roles,
        &t.admin_key,
        json!({"name": "late", "permissions": ["users:read"]}),
    );
    let repair = async {
        wait_for_appenders(t.pool(), 1).await;
        let repair = ledgerline(&t.db.url, &["claims", "check", "--repair"]);
        let release = async {
            wait_for_appenders(t.pool(), 2).await;
            release_appends(&mut holder).await;
        };
        tokio::join!(repair, release).0
    };
    let (created, (code, out, err)) = tokio::join!(create, repair);
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("repaired: 1 row(s) rewritten"), "{out}");
    assert!(out.contains(&format!("{org}:ghost")), "{out}");
    let held = claim_rows(&t).await;
    assert!(
        held.iter().any(|(_, k, _)| *k == format!("{org}:late")),
        "the claim taken meanwhile is kept: {held:?}"
    );
    let (code, out, err) = ledgerline(&t.db.url, &["claims", "check"]).await;
    assert_eq!(code, 0, "{out}{err}");
}

/// A repair frozen while it holds the append lock (a stopped process, a paused machine) is
/// ended by the database once it idles for `STALLED_TRANSACTION_LIMIT` (10 s), as every other
/// holder of that lock is, within the 12 s a batch waits for it: appends go on. Here the
/// repair is stopped (SIGSTOP) right after it took the lock and read the table.
#[tokio::test]
async fn a_repair_frozen_with_the_append_lock_does_not_stop_appends() {
    let t = TestApp::spawn().await;
    // The repair waits for the append lock (past its comparison), then for the table.
    let (org, mut holder) = ghost_claim_and_append_lock(&t).await;
    let mut repair = tokio::process::Command::new(env!("CARGO_BIN_EXE_ledgerline"))
        .args(["claims", "check", "--repair"])
        .env("LEDGERLINE_DATABASE_URL", &t.db.url)
        .env("RUST_LOG", "warn")
        .env_remove("LEDGERLINE_LOG_ORIGIN")
        .kill_on_drop(true)
        .spawn()
        .expect("run ledgerline");
    wait_for_appenders(t.pool(), 1).await;
    let mut table = t.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE unique_claims IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *table)
        .await
        .unwrap();
    release_appends(&mut holder).await;
    assert!(
        common::eventually(std::time::Duration::from_secs(30), || async {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE '%FROM unique_claims%')",
            )
            .fetch_one(t.pool())
            .await
            .unwrap()
        })
        .await,
        "the repair, holding the append lock, waits for the table"
    );
    let pid = repair.id().expect("running").to_string();
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill -STOP");
    assert!(stopped.success());
    table.commit().await.unwrap();

    // An append goes in (201) once the database has ended the frozen repair's transaction.
    t.create_role(org, "after the freeze", &["users:read"], None)
        .await;
    repair.start_kill().expect("SIGKILL");
    repair.wait().await.expect("reaped");
}
