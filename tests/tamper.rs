//! Tampering with the ledger as a PostgreSQL superuser would, and what `verify` reports.
//!
//! Every test builds a realistic log through the HTTP API, then attacks it with SQL. The
//! append-only triggers refuse UPDATE/DELETE/TRUNCATE, so each attack first switches them off
//! (`SET LOCAL session_replication_role = replica`, or `ALTER TABLE events DISABLE TRIGGER
//! USER`), exactly as a superuser can. docs/ledger-format.md, section 4, tabulates the outcomes.

mod common;

use chrono::Duration;
use common::{
    event_at, hash_of, ledgerline, ledgerline_offline, rewrite_json_from, set_hashes, superuser_tx,
    tamper, TestApp, TestDb,
};
use ledgerline::ledger::hash::GENESIS;
use ledgerline::ledger::verify::{verify_database, BadEvent, Fault, Report};
use ledgerline_projections::StoredEvent;
use reqwest::Method;
use serde_json::json;
use sqlx::{Executor, PgPool, Postgres, Transaction};
use uuid::Uuid;

/// The log every attack starts from.
struct Log {
    /// The head position: the number of events.
    n: i64,
    /// The position of the custom role `support`'s RoleCreated event (a middle event).
    support_role: i64,
}

/// About 25 events from the HTTP API: two organizations with their built-in roles, invited
/// users (one with a non-ASCII name), a custom role, role assignments, keys issued, revoked and
/// rotated, a profile update and a deactivation.
async fn build_log(t: &TestApp) -> Log {
    let admin = t.admin_key.clone();
    let org = t.create_org("Acme").await;
    let ada = t.invite(org, "ada@example.com", "Ada Lovelace").await;
    let zoe = t.invite(org, "zoe@example.com", "Zoë Ångström").await;
    let grace = t.invite(org, "grace@example.com", "Grace Hopper").await;

    let r = t
        .post(
            &format!("/v1/organizations/{org}/roles"),
            &admin,
            json!({"name": "support", "permissions": ["users:read", "audit:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "create role: {}", r.body);
    let support: Uuid = r.body["id"].as_str().unwrap().parse().unwrap();
    let r = t
        .put(
            &format!("/v1/organizations/{org}/users/{ada}/roles/{support}"),
            &admin,
            json!({"reason": "on call"}),
        )
        .await;
    assert_eq!(r.status, 200, "assign: {}", r.body);
    let admin_role = t.role_id(org, "admin").await;
    let r = t
        .put(
            &format!("/v1/organizations/{org}/users/{zoe}/roles/{admin_role}"),
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "assign: {}", r.body);

    let r = t
        .post(
            &format!("/v1/organizations/{org}/api-keys"),
            &admin,
            json!({"label": "ada laptop", "permissions": ["users:read", "audit:read"], "user_id": ada}),
        )
        .await;
    assert_eq!(r.status, 201, "issue: {}", r.body);
    let ada_key: Uuid = r.body["id"].as_str().unwrap().parse().unwrap();
    let r = t
        .post(
            &format!("/v1/organizations/{org}/api-keys"),
            &admin,
            json!({"label": "ci service", "permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "issue: {}", r.body);
    let ci_key: Uuid = r.body["id"].as_str().unwrap().parse().unwrap();
    let r = t
        .post(
            &format!("/v1/organizations/{org}/api-keys/{ci_key}/revoke"),
            &admin,
            json!({"reason": "leaked in a log"}),
        )
        .await;
    assert_eq!(r.status, 200, "revoke: {}", r.body);
    let r = t
        .call(
            Method::POST,
            &format!("/v1/organizations/{org}/api-keys/{ada_key}/rotate"),
            Some(&admin),
            None,
        )
        .await;
    assert!(r.status == 200 || r.status == 201, "rotate: {}", r.body);

    let r = t
        .patch(
            &format!("/v1/organizations/{org}"),
            &admin,
            json!({"name": "Acme Bäckerei", "country_code": "DE"}),
        )
        .await;
    assert_eq!(r.status, 200, "update org: {}", r.body);
    let r = t
        .post(
            &format!("/v1/organizations/{org}/users/{grace}/deactivate"),
            &admin,
            json!({"reason": "left"}),
        )
        .await;
    assert_eq!(r.status, 200, "deactivate: {}", r.body);

    let globex = t.create_org("Globex").await;
    t.member_with_key(globex, "auditor", "hank@example.com")
        .await;

    let n = t.head().await;
    assert!(n >= 20, "a realistic log has at least 20 events, got {n}");
    let (support_role,): (i64,) = sqlx::query_as(
        "SELECT position FROM events WHERE event_type = 'RoleCreated' AND payload::text LIKE '%\"name\":\"support\"%'",
    )
    .fetch_one(t.pool())
    .await
    .unwrap();
    assert!(
        1 < support_role && support_role + 1 < n,
        "the support role is a middle event"
    );
    let report = t.verify().await;
    assert!(
        report.intact(),
        "the fresh log verifies: {:?}",
        report.first_bad
    );
    Log { n, support_role }
}

async fn insert_event(tx: &mut Transaction<'_, Postgres>, e: &StoredEvent) {
    sqlx::query(
        "INSERT INTO events (position, aggregate_type, aggregate_id, sequence, event_type, event_version,
                             organization_id, recorded_at, payload, metadata, prev_hash, hash, hash_version)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::json, $10::text::json, $11, $12, $13)",
    )
    .bind(e.position)
    .bind(&e.aggregate_type)
    .bind(&e.aggregate_id)
    .bind(e.sequence)
    .bind(&e.event_type)
    .bind(&e.event_version)
    .bind(e.organization_id)
    .bind(e.recorded_at)
    .bind(&e.payload)
    .bind(&e.metadata)
    .bind(&e.prev_hash)
    .bind(&e.hash)
    .bind(e.hash_version)
    .execute(&mut **tx)
    .await
    .unwrap();
}

fn assert_first_bad(report: &Report, position: i64, fault: Fault) {
    assert_eq!(
        report.first_bad,
        Some(BadEvent {
            position,
            fault: fault.clone()
        }),
        "expected the first bad position {position} ({fault})"
    );
    assert!(!report.intact());
}

fn assert_intact(report: &Report) {
    assert!(
        report.intact(),
        "expected an intact log, got {:?}",
        report.first_bad
    );
}

/// Shifts positions `from..` up by one, leaving `from` free (via a temporary offset: the
/// unique index on position is checked row by row).
fn renumber_up_from(from: i64) -> Vec<String> {
    vec![
        format!("UPDATE events SET position = position + 1000000000 WHERE position >= {from}"),
        format!(
            "UPDATE events SET position = position - 1000000000 + 1 WHERE position >= 1000000000"
        ),
    ]
}

#[tokio::test]
async fn untouched_log_is_intact() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let report = t.verify().await;
    assert_intact(&report);
    assert_eq!(report.events as i64, t.head().await);
    assert_eq!(report.events as i64, log.n);
    assert_eq!(report.head_position, log.n);
    // The recomputed head hash is the stored one, and what the API publishes.
    assert_eq!(
        report.head_hash.to_vec(),
        event_at(t.pool(), log.n).await.hash
    );
    let head = t.get("/v1/ledger/head", &t.admin_key).await;
    assert_eq!(head.status, 200, "{}", head.body);
    assert_eq!(head.body["position"], log.n);
    assert_eq!(head.body["hash"], hex::encode(report.head_hash));
    // Event 1 links to genesis.
    assert_eq!(event_at(t.pool(), 1).await.prev_hash, GENESIS.to_vec());
}

#[tokio::test]
async fn triggers_refuse_update_delete_and_truncate() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    let before = event_at(t.pool(), k).await;
    for sql in [
        format!("UPDATE events SET event_type = 'RoleDeleted' WHERE position = {k}"),
        format!("UPDATE events SET payload = '{{}}'::json WHERE position = {k}"),
        format!("DELETE FROM events WHERE position = {k}"),
        "DELETE FROM events".to_string(),
        "TRUNCATE events".to_string(),
        "TRUNCATE events CASCADE".to_string(),
    ] {
        let err = sqlx::query(&sql).execute(t.pool()).await.expect_err(&sql);
        let db = err
            .as_database_error()
            .unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db.code().as_deref(), Some("42501"), "{sql}: {db}");
        assert!(db.message().contains("append-only"), "{sql}: {db}");
    }
    assert_eq!(event_at(t.pool(), k).await, before, "the row is unchanged");
    assert_eq!(t.head().await, log.n);
    let report = t.verify().await;
    assert_intact(&report);
    assert_eq!(report.events as i64, log.n);
}

#[tokio::test]
async fn changed_payload_byte_is_content_changed() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    let before = event_at(t.pool(), k).await;
    tamper(
        t.pool(),
        &[format!(
            r#"UPDATE events SET payload = replace(payload::text, '"name":"support"', '"name":"suppOrt"')::json WHERE position = {k}"#
        )],
    )
    .await;
    let after = event_at(t.pool(), k).await;
    // Exactly one byte of valid JSON changed; nothing else.
    assert_eq!(after.payload.len(), before.payload.len());
    let diff = before
        .payload
        .bytes()
        .zip(after.payload.bytes())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(diff, 1);
    serde_json::from_str::<serde_json::Value>(&after.payload).expect("still valid JSON");
    assert_eq!(
        (after.hash.clone(), after.metadata.clone()),
        (before.hash.clone(), before.metadata.clone())
    );

    assert_first_bad(&t.verify().await, k, Fault::ContentChanged);
}

#[tokio::test]
async fn changed_metadata_is_content_changed() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    let before = event_at(t.pool(), k).await;
    assert!(
        before.metadata.contains(r#""client_ip":"127.0.0.1""#),
        "{}",
        before.metadata
    );
    tamper(
        t.pool(),
        &[format!(
            r#"UPDATE events SET metadata = replace(metadata::text, '"client_ip":"127.0.0.1"', '"client_ip":"10.6.6.6"')::json WHERE position = {k}"#
        )],
    )
    .await;
    assert_ne!(event_at(t.pool(), k).await.metadata, before.metadata);
    assert_first_bad(&t.verify().await, k, Fault::ContentChanged);
}

/// The stored JSON text is hashed, not its meaning: whitespace alone is a change.
#[tokio::test]
async fn whitespace_only_json_change_is_content_changed() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.n / 2;
    let before = event_at(t.pool(), k).await;
    tamper(
        t.pool(),
        &[format!(
            "UPDATE events SET metadata = (' ' || metadata::text)::json WHERE position = {k}"
        )],
    )
    .await;
    let after = event_at(t.pool(), k).await;
    assert_eq!(
        after.metadata,
        format!(" {}", before.metadata),
        "json keeps the text exactly"
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&after.metadata).unwrap(),
        serde_json::from_str::<serde_json::Value>(&before.metadata).unwrap(),
        "the same JSON value"
    );
    assert_first_bad(&t.verify().await, k, Fault::ContentChanged);
}

/// Every other hashed column, one at a time: changed → content changed at k; restored → intact.
#[tokio::test]
async fn every_hashed_column_is_covered() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    tamper(
        t.pool(),
        &[format!(
            "CREATE TABLE tamper_backup AS SELECT * FROM events WHERE position = {k}"
        )],
    )
    .await;
    let restore = vec![
        format!("DELETE FROM events WHERE position = {k}"),
        "INSERT INTO events SELECT * FROM tamper_backup".to_string(),
    ];
    let other_org = Uuid::new_v4();
    let changes = [
        "aggregate_type = 'Rolf'".to_string(),
        "aggregate_id = aggregate_id || ' '".to_string(),
        "sequence = sequence + 1".to_string(),
        "event_type = 'RoleDeleted'".to_string(),
        "event_version = '2'".to_string(),
        "organization_id = NULL".to_string(),
        format!("organization_id = '{other_org}'"),
        "recorded_at = recorded_at + interval '1 microsecond'".to_string(),
        "recorded_at = recorded_at - interval '1 day'".to_string(),
        // The stored prev_hash is part of the hash input, so changing it alone is a content change.
        "prev_hash = decode(repeat('ab', 32), 'hex')".to_string(),
    ];
    for change in &changes {
        tamper(
            t.pool(),
            &[format!("UPDATE events SET {change} WHERE position = {k}")],
        )
        .await;
        let report = t.verify().await;
        assert_eq!(
            report.first_bad,
            Some(BadEvent {
                position: k,
                fault: Fault::ContentChanged
            }),
            "after SET {change}"
        );
        tamper(t.pool(), &restore).await;
        let report = t.verify().await;
        assert!(
            report.intact(),
            "restored after SET {change}: {:?}",
            report.first_bad
        );
    }
    // And a platform event (no tenant) that is given one.
    let platform = event_at(t.pool(), 1).await;
    assert_eq!(platform.organization_id, None);
    tamper(
        t.pool(),
        &[format!(
            "UPDATE events SET organization_id = '{other_org}' WHERE position = 1"
        )],
    )
    .await;
    assert_first_bad(&t.verify().await, 1, Fault::ContentChanged);
}

#[tokio::test]
async fn deleted_event_is_missing() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    // The other way to get past the triggers: switch them off for everyone, then back on.
    tamper(
        t.pool(),
        &[
            "ALTER TABLE events DISABLE TRIGGER USER".to_string(),
            format!("DELETE FROM events WHERE position = {k}"),
            "ALTER TABLE events ENABLE TRIGGER USER".to_string(),
        ],
    )
    .await;
    let report = t.verify().await;
    assert_first_bad(&report, k, Fault::Missing);
    assert_eq!(report.events as i64, log.n - 1);

    // Deleting the first event too moves the first bad position to 1.
    tamper(
        t.pool(),
        &["DELETE FROM events WHERE position = 1".to_string()],
    )
    .await;
    assert_first_bad(&t.verify().await, 1, Fault::Missing);
}

#[tokio::test]
async fn deleted_event_with_positions_closed_up_is_reordered() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    // Delete k and renumber k+1.. down by one, so that the positions have no gap.
    tamper(
        t.pool(),
        &[
            format!("DELETE FROM events WHERE position = {k}"),
            format!("UPDATE events SET position = position + 1000000000 WHERE position > {k}"),
            "UPDATE events SET position = position - 1000000000 - 1 WHERE position >= 1000000000"
                .to_string(),
        ],
    )
    .await;
    assert_eq!(t.head().await, log.n - 1);
    // Event k+1, now at k, still commits to its old position.
    assert_first_bad(&t.verify().await, k, Fault::Reordered { written_at: k + 1 });
}

#[tokio::test]
async fn swapped_events_are_reordered() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    // position >= 1 is a CHECK, so park event k at a large temporary position.
    tamper(
        t.pool(),
        &[
            format!("UPDATE events SET position = 1000000000 WHERE position = {k}"),
            format!(
                "UPDATE events SET position = {k} WHERE position = {}",
                k + 1
            ),
            format!(
                "UPDATE events SET position = {} WHERE position = 1000000000",
                k + 1
            ),
        ],
    )
    .await;
    let report = t.verify().await;
    assert_first_bad(&report, k, Fault::Reordered { written_at: k + 1 });
    assert_eq!(report.events as i64, log.n);
}

/// A forged event for the insertion attacks: an API key with platform:admin for the attacker.
fn forged_event(position: i64, after: &StoredEvent) -> StoredEvent {
    let key_id = Uuid::new_v4();
    StoredEvent {
        position,
        aggregate_type: "ApiKey".into(),
        aggregate_id: key_id.to_string(),
        sequence: 1,
        event_type: "ApiKeyIssued".into(),
        event_version: "1".into(),
        organization_id: None,
        recorded_at: after.recorded_at + Duration::microseconds(1),
        payload: json!({"ApiKeyIssued": {"bootstrap": false, "expires_at": null, "key_id": key_id,
            "label": "maintenance", "organization_id": null, "permissions": ["platform:admin"],
            "prefix": "ll_0123456789ab", "secret_hash": "00".repeat(32), "user_id": null}})
        .to_string(),
        metadata: after.metadata.clone(),
        prev_hash: after.hash.clone(),
        hash: vec![0x5a; 32],
        hash_version: after.hash_version,
    }
}

#[tokio::test]
async fn inserted_forgery_with_made_up_hash_is_content_changed() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    let before_k = event_at(t.pool(), k - 1).await;
    let mut tx = superuser_tx(t.pool()).await;
    for s in renumber_up_from(k) {
        sqlx::query(&s).execute(&mut *tx).await.unwrap();
    }
    let mut forged = forged_event(k, &before_k);
    forged.hash = rand_hash();
    insert_event(&mut tx, &forged).await;
    tx.commit().await.unwrap();

    let report = t.verify().await;
    assert_first_bad(&report, k, Fault::ContentChanged);
    assert_eq!(report.events as i64, log.n + 1);
}

#[tokio::test]
async fn inserted_forgery_with_valid_hash_breaks_the_next_event() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    let before_k = event_at(t.pool(), k - 1).await;
    let original_k = event_at(t.pool(), k).await;
    let mut tx = superuser_tx(t.pool()).await;
    for s in renumber_up_from(k) {
        sqlx::query(&s).execute(&mut *tx).await.unwrap();
    }
    // The forger uses our algorithm: prev_hash = the hash of k-1, the hash computed properly.
    let mut forged = forged_event(k, &before_k);
    forged.hash = hash_of(&before_k.hash, &forged);
    insert_event(&mut tx, &forged).await;
    tx.commit().await.unwrap();

    // The forged row itself verifies; the damage shows at k+1, where the original event k now
    // sits. Its stored hash commits to position k (and its prev_hash to event k-1), so it hashes
    // correctly only at position k: the verifier recognises it as moved, not merely edited.
    let report = t.verify().await;
    assert_first_bad(&report, k + 1, Fault::Reordered { written_at: k });
    assert_eq!(event_at(t.pool(), k + 1).await.hash, original_k.hash);

    // If the forger also rehashes the old event k for its new position (keeping its prev_hash),
    // it is self-consistent again but does not link to the forged row: link broken at k+1.
    let mut moved = event_at(t.pool(), k + 1).await;
    moved.hash = hash_of(&moved.prev_hash, &moved);
    let mut tx = superuser_tx(t.pool()).await;
    set_hashes(&mut tx, k + 1, &moved.prev_hash, &moved.hash).await;
    tx.commit().await.unwrap();
    assert_first_bad(&t.verify().await, k + 1, Fault::LinkBroken);

    // Linking it to the forged row and rehashing it just moves the break to k+2.
    let mut tx = superuser_tx(t.pool()).await;
    moved.prev_hash = forged.hash.clone();
    moved.hash = hash_of(&moved.prev_hash, &moved);
    set_hashes(&mut tx, k + 1, &moved.prev_hash, &moved.hash).await;
    tx.commit().await.unwrap();
    let report = t.verify().await;
    assert_eq!(
        report.first_bad.as_ref().map(|b| b.position),
        Some(k + 2),
        "{:?}",
        report.first_bad
    );
}

/// With the table's constraints dropped, a superuser can put a row where no range of the
/// chain reads it: at position 0, below, or at none. The application loads an aggregate's
/// events by sequence, not position, so it would replay the row all the same; verify must
/// not call such a log intact.
#[tokio::test]
async fn rows_outside_the_chain_are_found() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let last = event_at(t.pool(), log.n).await;
    let mut tx = superuser_tx(t.pool()).await;
    sqlx::query("ALTER TABLE events DROP CONSTRAINT events_position_check")
        .execute(&mut *tx)
        .await
        .unwrap();
    insert_event(&mut tx, &forged_event(0, &last)).await;
    tx.commit().await.unwrap();
    let report = t.verify().await;
    assert_first_bad(&report, 0, Fault::OutsideTheChain { rows: 1 });
    assert_eq!(
        (report.head_position, report.head_hash.to_vec()),
        (log.n, last.hash.clone()),
        "the chain itself is whole"
    );

    let mut tx = superuser_tx(t.pool()).await;
    sqlx::query("ALTER TABLE events ALTER COLUMN position DROP NOT NULL")
        .execute(&mut *tx)
        .await
        .unwrap();
    insert_event(&mut tx, &forged_event(-5, &last)).await;
    sqlx::query(
        "INSERT INTO events (position, aggregate_type, aggregate_id, sequence, event_type, \
         event_version, organization_id, recorded_at, payload, metadata, prev_hash, hash) \
         SELECT NULL, aggregate_type, aggregate_id, sequence + 1000, event_type, \
         event_version, organization_id, recorded_at, payload, metadata, prev_hash, hash \
         FROM events WHERE position = $1",
    )
    .bind(log.n)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_first_bad(&t.verify().await, -5, Fault::OutsideTheChain { rows: 3 });
}

/// With the table's unique index and key dropped, a row copied in a second time is found at
/// its own position as a repeat, in the middle and at the head, where a gap after it would
/// name a position that does not exist. (Of two rows at one position either may come first;
/// a verbatim copy makes the second the repeat whichever it is.)
#[tokio::test]
async fn a_row_copied_in_again_is_a_repeat_at_its_position() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    let copy = |position: i64| {
        format!("INSERT INTO events SELECT * FROM events WHERE position = {position}")
    };
    tamper(
        t.pool(),
        &[
            "DROP INDEX events_position".to_string(),
            "ALTER TABLE events DROP CONSTRAINT events_pkey".to_string(),
            copy(log.n),
        ],
    )
    .await;
    assert_first_bad(&t.verify().await, log.n, Fault::Repeated);

    tamper(t.pool(), &[copy(k)]).await;
    assert_first_bad(&t.verify().await, k, Fault::Repeated);
    let (code, out, err) = run_verify(Some(&t.db.url)).await;
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains(&format!("first bad position {k}: repeated")),
        "{out}"
    );
}

fn rand_hash() -> Vec<u8> {
    let mut h = Uuid::new_v4().as_bytes().to_vec();
    h.extend_from_slice(Uuid::new_v4().as_bytes());
    h
}

/// "Recompute just one": event k's hash replaced, and k+1's prev_hash set to match it.
#[tokio::test]
async fn replaced_hash_with_matching_next_link_is_caught_at_that_event() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    let e = event_at(t.pool(), k).await;
    let next = event_at(t.pool(), k + 1).await;
    let fake = rand_hash();
    let mut tx = superuser_tx(t.pool()).await;
    set_hashes(&mut tx, k, &e.prev_hash, &fake).await;
    // A verifier that chained stored hashes would accept this; recomputing does not.
    set_hashes(&mut tx, k + 1, &fake, &next.hash).await;
    tx.commit().await.unwrap();
    assert_first_bad(&t.verify().await, k, Fault::ContentChanged);
}

/// An edit to k with k's hash recomputed correctly and k+1's prev_hash updated: k verifies, but
/// k+1's own hash covers its prev_hash, so k+1 no longer hashes to its stored hash.
#[tokio::test]
async fn edited_event_rehashed_is_caught_at_the_next_event() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    let mut e = event_at(t.pool(), k).await;
    let next = event_at(t.pool(), k + 1).await;
    e.payload = e
        .payload
        .replace(r#""name":"support""#, r#""name":"owner2""#);
    e.hash = hash_of(&e.prev_hash, &e);
    let mut tx = superuser_tx(t.pool()).await;
    sqlx::query("UPDATE events SET payload = $2::text::json, hash = $3 WHERE position = $1")
        .bind(k)
        .bind(&e.payload)
        .bind(&e.hash)
        .execute(&mut *tx)
        .await
        .unwrap();
    set_hashes(&mut tx, k + 1, &e.hash, &next.hash).await;
    tx.commit().await.unwrap();
    assert_first_bad(&t.verify().await, k + 1, Fault::ContentChanged);
}

/// prev_hash of k changed and k's hash recomputed over it: k is self-consistent but does not
/// link to the recomputed hash of k-1.
#[tokio::test]
async fn relinked_event_is_link_broken() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    let mut e = event_at(t.pool(), k).await;
    e.prev_hash = rand_hash();
    e.hash = hash_of(&e.prev_hash, &e);
    let mut tx = superuser_tx(t.pool()).await;
    set_hashes(&mut tx, k, &e.prev_hash, &e.hash).await;
    tx.commit().await.unwrap();
    assert_first_bad(&t.verify().await, k, Fault::LinkBroken);

    // At position 1 the link must be genesis (32 zero bytes).
    let mut first = event_at(t.pool(), 1).await;
    first.prev_hash = vec![1; 32];
    first.hash = hash_of(&first.prev_hash, &first);
    let mut tx = superuser_tx(t.pool()).await;
    set_hashes(&mut tx, 1, &first.prev_hash, &first.hash).await;
    tx.commit().await.unwrap();
    assert_first_bad(&t.verify().await, 1, Fault::LinkBroken);
}

/// What the chain alone cannot see (docs/ledger-format.md section 5): a rewrite of every hash
/// from k to the head, and a truncation. Both verify as intact; both change the head, which is
/// why the head must be kept outside the database.
#[tokio::test]
async fn rewrite_and_truncation_need_an_external_head() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    let kept = t.verify().await; // the auditor's copy of the head
    assert_intact(&kept);

    // Rewrite: edit k, then rehash everything after it.
    let edit = |text: &str| text.replace(r#""name":"support""#, r#""name":"suppOrt""#);
    rewrite_json_from(&t, k, "payload", edit, &[]).await;
    let rewritten = t.verify().await;
    assert_intact(&rewritten);
    assert_eq!(rewritten.head_position, kept.head_position);
    assert_ne!(
        rewritten.head_hash, kept.head_hash,
        "only the kept head shows the rewrite"
    );
    // The auditor's check: after an intact run, the kept position must still have the kept hash.
    assert_ne!(
        event_at(t.pool(), kept.head_position).await.hash,
        kept.head_hash.to_vec()
    );

    // Truncation: the newest three events deleted.
    tamper(
        t.pool(),
        &[format!("DELETE FROM events WHERE position > {}", log.n - 3)],
    )
    .await;
    let truncated = t.verify().await;
    assert_intact(&truncated);
    assert_eq!(truncated.events as i64, log.n - 3);
    assert_eq!(truncated.head_position, log.n - 3);
    assert!(
        truncated.head_position < kept.head_position,
        "only the kept head shows the truncation"
    );
}

// ---------------------------------------------------------------------------------------
// The `ledgerline verify` command.

/// A value the writer never stores is tampering (exit 1), not a verifier that could not run:
/// a time of `infinity`, and a `NULL` where the column's constraint was dropped to allow it.
#[tokio::test]
async fn impossible_values_are_tampering_at_their_position() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let k = log.support_role;
    tamper(
        t.pool(),
        &[format!(
            "UPDATE events SET recorded_at = 'infinity' WHERE position = {k}"
        )],
    )
    .await;
    // PostgreSQL stores `infinity` as the largest 64-bit count; it is said as `infinity`.
    assert_first_bad(
        &t.verify().await,
        k,
        Fault::Impossible {
            column: "recorded_at",
            value: "infinity".into(),
        },
    );
    let (code, out, err) = run_verify(Some(&t.db.url)).await;
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(
        out.starts_with(&format!(
            "TAMPERED: first bad position {k}: impossible value: recorded_at holds infinity, \
             which the writer never stores ("
        )),
        "{out}"
    );
    // An export of the range fails naming the position (it panicked decoding the time),
    // and leaves no file behind.
    let out = std::env::temp_dir().join(format!("ll-export-{}.jsonl", Uuid::new_v4().simple()));
    let out_s = out.to_str().unwrap();
    let (code, summary, err) = ledgerline(&t.db.url, &["export", "--out", out_s]).await;
    assert_eq!(code, 2, "{summary}{err}");
    assert!(
        err.contains(&format!(
            "position {k}: recorded_at holds a time no writer stores"
        )),
        "{err}"
    );
    assert!(!out.exists() && !std::path::Path::new(&format!("{out_s}.partial")).exists());

    let j = k - 1;
    tamper(
        t.pool(),
        &[
            "ALTER TABLE events ALTER COLUMN event_version DROP NOT NULL".to_string(),
            format!("UPDATE events SET event_version = NULL WHERE position = {j}"),
        ],
    )
    .await;
    assert_first_bad(
        &t.verify().await,
        j,
        Fault::Impossible {
            column: "event_version",
            value: "NULL".into(),
        },
    );

    // `-infinity`, the smallest 64-bit count: no writer stores it either.
    let i = j - 1;
    tamper(
        t.pool(),
        &[format!(
            "UPDATE events SET recorded_at = '-infinity' WHERE position = {i}"
        )],
    )
    .await;
    let (code, out, err) = run_verify(Some(&t.db.url)).await;
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(
        out.starts_with(&format!(
            "TAMPERED: first bad position {i}: impossible value: recorded_at holds -infinity, \
             which the writer never stores ("
        )),
        "{out}"
    );
}

async fn run_verify(url: Option<&str>) -> (i32, String, String) {
    match url {
        Some(url) => ledgerline(url, &["verify"]).await,
        None => ledgerline_offline(&["verify"]).await,
    }
}

#[tokio::test]
async fn cli_verify_exit_codes() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let report = t.verify().await;

    let (code, out, err) = run_verify(Some(&t.db.url)).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("intact"), "{out}");
    assert!(out.contains(&format!("{} events verified", log.n)), "{out}");
    assert!(
        out.contains(&format!(
            "head position {} hash {}",
            log.n,
            hex::encode(report.head_hash)
        )),
        "{out}"
    );

    let k = log.support_role;
    tamper(
        t.pool(),
        &[format!(
            r#"UPDATE events SET payload = replace(payload::text, '"name":"support"', '"name":"suppOrt"')::json WHERE position = {k}"#
        )],
    )
    .await;
    let (code, out, err) = run_verify(Some(&t.db.url)).await;
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("TAMPERED"), "{out}");
    assert!(out.contains(&format!("first bad position {k}:")), "{out}");
    assert!(out.contains("content changed"), "{out}");
    assert!(!out.contains("intact"), "{out}");

    // A database that cannot be reached: exit 2, never 0 or 1.
    let base = t.db.url.rsplit_once('/').unwrap().0;
    let missing = format!("{base}/ll_no_such_database_{}", Uuid::new_v4().simple());
    let (code, out, err) = run_verify(Some(&missing)).await;
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("error"), "{err}");
    assert!(
        !out.contains("intact") && !out.contains("TAMPERED"),
        "{out}"
    );

    // No database configured at all: also 2.
    let (code, out, err) = run_verify(None).await;
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
}

// ---------------------------------------------------------------------------------------
// Attacks at the verifier's segment boundary: `verify_database` checks ranges of 65,536
// positions in parallel and checks the links between them when it joins the ranges.

const SEGMENT: i64 = 65_536;

/// Appends `count` synthetic events after the current head, correctly chained.
async fn append_synthetic(pool: &PgPool, count: i64) {
    let head: Option<(i64, Vec<u8>, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT position, hash, recorded_at FROM events ORDER BY position DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .unwrap();
    let (mut position, mut prev, start) = match head {
        Some((p, h, at)) => (p, h, at),
        None => (
            0,
            GENESIS.to_vec(),
            chrono::DateTime::from_timestamp_micros(1_767_268_800_000_000).unwrap(),
        ),
    };
    let tenant = Uuid::new_v4();
    let mut rows = Vec::with_capacity(count as usize);
    for i in 0..count {
        position += 1;
        let id = Uuid::new_v4();
        let mut e = StoredEvent {
            position,
            aggregate_type: "Load".into(),
            aggregate_id: id.to_string(),
            sequence: 1,
            event_type: "LoadTested".into(),
            event_version: "1".into(),
            organization_id: (i % 3 != 0).then_some(tenant),
            recorded_at: start + Duration::microseconds(i + 1),
            payload: json!({"LoadTested": {"n": position, "note": "Zoë"}}).to_string(),
            metadata: json!({"actor_kind": "test"}).to_string(),
            prev_hash: prev.clone(),
            hash: Vec::new(),
            hash_version: 2,
        };
        e.hash = hash_of(&prev, &e);
        prev = e.hash.clone();
        rows.push(e);
    }
    for chunk in rows.chunks(10_000) {
        sqlx::query(
            "INSERT INTO events (position, aggregate_type, aggregate_id, sequence, event_type, event_version,
                                 organization_id, recorded_at, payload, metadata, prev_hash, hash,
                                 hash_version)
             SELECT pos, ty, id, seq, et, ev, org, at, pl::json, md::json, ph, h, 2
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::uuid[],
                         $8::timestamptz[], $9::text[], $10::text[], $11::bytea[], $12::bytea[])
                  AS t(pos, ty, id, seq, et, ev, org, at, pl, md, ph, h)",
        )
        .bind(chunk.iter().map(|e| e.position).collect::<Vec<_>>())
        .bind(chunk.iter().map(|e| e.aggregate_type.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|e| e.aggregate_id.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|e| e.sequence).collect::<Vec<_>>())
        .bind(chunk.iter().map(|e| e.event_type.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|e| e.event_version.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|e| e.organization_id).collect::<Vec<_>>())
        .bind(chunk.iter().map(|e| e.recorded_at).collect::<Vec<_>>())
        .bind(chunk.iter().map(|e| e.payload.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|e| e.metadata.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|e| e.prev_hash.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|e| e.hash.clone()).collect::<Vec<_>>())
        .execute(pool)
        .await
        .unwrap();
    }
}

async fn verify(pool: &PgPool) -> Report {
    verify_database(pool, 4).await.expect("verify runs")
}

/// Puts back, from the copy taken before the attacks, the rows at `touched` positions, and
/// removes any row moved beyond the original head `n`.
async fn restore(pool: &PgPool, n: i64, touched: &[i64]) {
    let list = touched
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    tamper(
        pool,
        &[
            format!("DELETE FROM events WHERE position IN ({list}) OR position > {n}"),
            format!("INSERT INTO events SELECT * FROM pristine WHERE position IN ({list})"),
        ],
    )
    .await;
}

#[tokio::test]
async fn attacks_at_the_verifier_segment_boundary() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let n = SEGMENT + 4_000;
    append_synthetic(pool, n).await;

    let report = verify(pool).await;
    assert_intact(&report);
    assert_eq!(report.events as i64, n);
    assert_eq!(report.head_position, n);
    assert_eq!(report.head_hash.to_vec(), event_at(pool, n).await.hash);

    tamper(
        pool,
        &["CREATE TABLE pristine AS SELECT * FROM events".to_string()],
    )
    .await;
    let b = SEGMENT; // the last position of the first range; b + 1 starts the second

    // A broken link exactly at the join: only the join can see it.
    let mut e = event_at(pool, b + 1).await;
    e.prev_hash = rand_hash();
    e.hash = hash_of(&e.prev_hash, &e);
    let mut tx = superuser_tx(pool).await;
    set_hashes(&mut tx, b + 1, &e.prev_hash, &e.hash).await;
    tx.commit().await.unwrap();
    assert_first_bad(&verify(pool).await, b + 1, Fault::LinkBroken);
    restore(pool, n, &[b + 1]).await;

    // The same at the last event of the first range.
    let mut e = event_at(pool, b).await;
    e.prev_hash = rand_hash();
    e.hash = hash_of(&e.prev_hash, &e);
    let mut tx = superuser_tx(pool).await;
    set_hashes(&mut tx, b, &e.prev_hash, &e.hash).await;
    tx.commit().await.unwrap();
    assert_first_bad(&verify(pool).await, b, Fault::LinkBroken);
    restore(pool, n, &[b]).await;

    // "Recompute just one" across the join: b's hash replaced, b+1's prev_hash set to match.
    let e = event_at(pool, b).await;
    let next = event_at(pool, b + 1).await;
    let fake = rand_hash();
    let mut tx = superuser_tx(pool).await;
    set_hashes(&mut tx, b, &e.prev_hash, &fake).await;
    set_hashes(&mut tx, b + 1, &fake, &next.hash).await;
    tx.commit().await.unwrap();
    assert_first_bad(&verify(pool).await, b, Fault::ContentChanged);
    restore(pool, n, &[b, b + 1]).await;

    // Edit b, rehash it and relink b+1: b+1 (first of the second range) no longer hashes.
    let mut e = event_at(pool, b).await;
    e.payload = e.payload.replace("Zoë", "Zoe");
    e.hash = hash_of(&e.prev_hash, &e);
    let mut tx = superuser_tx(pool).await;
    sqlx::query("UPDATE events SET payload = $2::text::json, hash = $3 WHERE position = $1")
        .bind(b)
        .bind(&e.payload)
        .bind(&e.hash)
        .execute(&mut *tx)
        .await
        .unwrap();
    set_hashes(&mut tx, b + 1, &e.hash, &next.hash).await;
    tx.commit().await.unwrap();
    assert_first_bad(&verify(pool).await, b + 1, Fault::ContentChanged);
    restore(pool, n, &[b, b + 1]).await;

    // Swapped across the join.
    tamper(
        pool,
        &[
            format!("UPDATE events SET position = 1000000000 WHERE position = {b}"),
            format!(
                "UPDATE events SET position = {b} WHERE position = {}",
                b + 1
            ),
            format!(
                "UPDATE events SET position = {} WHERE position = 1000000000",
                b + 1
            ),
        ],
    )
    .await;
    assert_first_bad(
        &verify(pool).await,
        b,
        Fault::Reordered { written_at: b + 1 },
    );
    restore(pool, n, &[b, b + 1]).await;

    // Deleted: the first event of the second range, then the last of the first.
    tamper(
        pool,
        &[format!("DELETE FROM events WHERE position = {}", b + 1)],
    )
    .await;
    assert_first_bad(&verify(pool).await, b + 1, Fault::Missing);
    restore(pool, n, &[b + 1]).await;
    tamper(pool, &[format!("DELETE FROM events WHERE position = {b}")]).await;
    assert_first_bad(&verify(pool).await, b, Fault::Missing);
    restore(pool, n, &[b]).await;

    // Two faults in different ranges: the first in position order wins, whichever range
    // finishes first.
    let late = b + 3_000;
    tamper(
        pool,
        &[format!(
            "UPDATE events SET event_type = 'Forged' WHERE position = {late}"
        )],
    )
    .await;
    assert_first_bad(&verify(pool).await, late, Fault::ContentChanged);
    tamper(
        pool,
        &["UPDATE events SET event_type = 'Forged' WHERE position = 100".to_string()],
    )
    .await;
    assert_first_bad(&verify(pool).await, 100, Fault::ContentChanged);
    restore(pool, n, &[100, late]).await;

    // An event moved far beyond the head leaves a gap where it was.
    tamper(
        pool,
        &[format!(
            "UPDATE events SET position = {} WHERE position = 500",
            n + 3 * SEGMENT
        )],
    )
    .await;
    assert_first_bad(&verify(pool).await, 500, Fault::Missing);
    restore(pool, n, &[500]).await;

    // Every attack undone: the log verifies again, with the same head.
    let again = verify(pool).await;
    assert_intact(&again);
    assert_eq!(
        (again.events, again.head_hash),
        (report.events, report.head_hash)
    );
}

/// Row-level security on `events` can show each session other rows: here a role of its own
/// (an auditor's, or the one a verifier runs as) is shown the log without its newest event,
/// a tail cut off only for it, while every other session reads it whole. The rows it is
/// shown form an intact chain, so only the table's make-up tells: `verify` reports it as
/// tampering, whoever runs it, and `export` refuses.
#[tokio::test]
async fn row_level_security_on_the_log_is_tampering() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let role = format!("auditor_{}", Uuid::new_v4().simple());
    tamper(
        t.pool(),
        &[
            format!("CREATE ROLE {role} NOLOGIN NOSUPERUSER NOBYPASSRLS"),
            format!("GRANT SELECT ON events TO {role}"),
            "ALTER TABLE events ENABLE ROW LEVEL SECURITY".to_string(),
            format!(
                "CREATE POLICY split ON events USING (current_user <> '{role}' OR position < {})",
                log.n
            ),
        ],
    )
    .await;
    // Sessions that take the role on (RLS follows `current_user`), so no login of its own.
    let set_role = format!("SET ROLE {role}");
    let shown = sqlx::postgres::PgPoolOptions::new()
        .after_connect(move |conn, _| {
            let set_role = set_role.clone();
            Box::pin(async move { conn.execute(set_role.as_str()).await.map(drop) })
        })
        .connect(&t.db.url)
        .await
        .unwrap();
    let (seen,): (i64,) = sqlx::query_as("SELECT count(*) FROM events")
        .fetch_one(&shown)
        .await
        .unwrap();
    assert_eq!(seen, log.n - 1, "the role is shown a cut-off log");
    let what = "row-level security is enabled; 1 row-level security policy(ies)".to_string();
    for pool in [&shown, t.pool()] {
        let report = verify_database(pool, 2).await.unwrap();
        assert_first_bad(&report, 0, Fault::NotAPlainTable { what: what.clone() });
    }
    let (code, out, err) = ledgerline(&t.db.url, &["verify"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("not a plain table"), "{out}");
    let file = std::env::temp_dir().join(format!("{role}.jsonl"));
    let path = file.to_str().unwrap();
    let (code, out, err) = ledgerline(&t.db.url, &["export", "--out", path]).await;
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("not a plain table"), "{err}");
    assert!(!file.exists());
    // A policy that makes the role's reads fail is said as such too, not as "could not run".
    tamper(
        t.pool(),
        &["CREATE POLICY fails ON events AS RESTRICTIVE USING (1 / 0 = 1)".to_string()],
    )
    .await;
    let report = verify_database(&shown, 2).await.unwrap();
    let what = "row-level security is enabled; 2 row-level security policy(ies)".to_string();
    assert_first_bad(&report, 0, Fault::NotAPlainTable { what });
    shown.close().await;
    tamper(
        t.pool(),
        &[format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")],
    )
    .await;
}

/// A table inheriting from `events` adds its rows to every read of it (a foreign one, read
/// through each role's own user mapping, can add other rows for each role): tampering.
#[tokio::test]
async fn a_table_inheriting_from_the_log_is_tampering() {
    let t = TestApp::spawn().await;
    build_log(&t).await;
    tamper(
        t.pool(),
        &["CREATE TABLE more_events () INHERITS (events)".to_string()],
    )
    .await;
    let what = "1 table(s) inherit from it (their rows read as its own)".to_string();
    assert_first_bad(&t.verify().await, 0, Fault::NotAPlainTable { what });
}

/// `verify --actors` checks from the log alone that nothing was recorded after its actor lost
/// the standing it was authenticated on: a log the writer wrote shows none (exit 0). An event
/// made to say its key was authenticated at another version than the key had where it was
/// recorded (as if authenticated before a rotation), with the chain made whole again after
/// it, verifies intact, but `--actors` finds it at its position (exit 1).
#[tokio::test]
async fn verify_actors_finds_a_command_recorded_after_its_key_changed() {
    let t = TestApp::spawn().await;
    build_log(&t).await;
    let (code, out, err) = ledgerline(&t.db.url, &["verify", "--actors"]).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("intact"), "{out}");
    assert!(
        out.contains("none recorded after its actor lost its standing"),
        "{out}"
    );

    let k: i64 = sqlx::query_scalar(
        "SELECT max(position) FROM events WHERE metadata::jsonb ? 'actor_key_sequence'",
    )
    .fetch_one(t.pool())
    .await
    .unwrap();
    // The server's log maintainer stopped first: a round of its own could sign the rewrite
    // (or what it read before it) after the forger's clean-up, as seen once in a CI run.
    t.app.clone().shutdown().await;
    // As if authenticated before a change of its key, the chain made whole again after it,
    // and the checkpoints and tree that would show the rewrite gone (as a thorough forger
    // leaves them: only checkpoints kept outside the database show it then).
    let edit = |text: &str| {
        let mut metadata: serde_json::Value = serde_json::from_str(text).unwrap();
        metadata["actor_key_sequence"] = json!("0");
        metadata.to_string()
    };
    let also = [
        "DELETE FROM merkle_nodes",
        "DELETE FROM checkpoints",
        "UPDATE merkle_state SET size = 0, peaks = '{}'",
    ];
    rewrite_json_from(&t, k, "metadata", edit, &also).await;

    let (code, out, err) = ledgerline(&t.db.url, &["verify"]).await;
    assert_eq!(code, 0, "the chain alone shows nothing: {out}\n{err}");
    let (code, out, err) = ledgerline(&t.db.url, &["verify", "--actors"]).await;
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("intact"), "{out}");
    assert!(out.contains("UNGUARDED: 1 of "), "{out}");
    assert!(
        out.contains(&format!("position {k}: its API key (ApiKey ")),
        "{out}"
    );
    assert!(out.contains("not at 0"), "{out}");
}
