//! Migrations against databases that already hold data: each must carry the rows it
//! finds into the new shape, as a deployment over a live database would need.

mod common;

use std::borrow::Cow;

use chrono::Utc;
use common::{TestApp, TestDb, POLICY};
use ledgerline::db::MIGRATOR;
use ledgerline::ledger::checkpoint::LogSigner;
use ledgerline::ledger::export::{export, ExportScope};
use ledgerline::ledger::hash::{event_hash, truncate_to_micros, EventFields, HashVersion, GENESIS};
use ledgerline::ledger::offline::verify_reader;
use ledgerline::ledger::tree;
use ledgerline_projections::Projector;
use sqlx::migrate::Migrator;
use uuid::Uuid;

/// The migrations up to and including `version`, as a release that stopped there had them.
fn up_to(version: i64) -> Migrator {
    Migrator {
        migrations: Cow::Owned(
            MIGRATOR
                .iter()
                .filter(|m| m.version <= version)
                .cloned()
                .collect(),
        ),
        ..Migrator::DEFAULT
    }
}

/// 0008 gives `message_reads` and `role_permissions` their tenant, taken from the message
/// and the role each row belongs to; a server from before it can still insert (a rolling
/// deploy), without the column.
#[tokio::test]
async fn the_tenant_columns_are_filled_from_the_rows_they_belong_to() {
    let db = TestDb::unmigrated().await;
    up_to(7).run(&db.pool).await.unwrap();
    let (org, other) = (Uuid::new_v4(), Uuid::new_v4());
    let mut rows = Vec::new();
    for (i, tenant) in [org, other].into_iter().enumerate() {
        let (message, role) = (Uuid::new_v4(), Uuid::new_v4());
        sqlx::query(
            "INSERT INTO messages (id, conversation_id, organization_id, author_id, \
             content_sealed, position, created_at, version) \
             VALUES ($1, $2, $3, $4, 'sealed', $5, now(), 1)",
        )
        .bind(message)
        .bind(Uuid::new_v4())
        .bind(tenant)
        .bind(Uuid::new_v4())
        .bind(i as i64 + 1)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO message_reads (message_id, user_id, conversation_id, read_at) \
             SELECT id, $2, conversation_id, now() FROM messages WHERE id = $1",
        )
        .bind(message)
        .bind(Uuid::new_v4())
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO roles (id, organization_id, name, description, is_built_in, \
             created_at, updated_at, version) VALUES ($1, $2, 'ops', '', false, now(), now(), 1)",
        )
        .bind(role)
        .bind(tenant)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO role_permissions (role_id, permission) \
             VALUES ($1, 'users:read'), ($1, 'keys:read')",
        )
        .bind(role)
        .execute(&db.pool)
        .await
        .unwrap();
        rows.push((tenant, message, role));
    }

    ledgerline::db::migrate(&db.pool).await.unwrap();
    // What an older server's projection still writes while the new one migrates.
    sqlx::query("INSERT INTO role_permissions (role_id, permission) VALUES ($1, 'users:write')")
        .bind(rows[0].2)
        .execute(&db.pool)
        .await
        .unwrap();

    for (tenant, message, role) in rows {
        let reads: Vec<Uuid> =
            sqlx::query_scalar("SELECT organization_id FROM message_reads WHERE message_id = $1")
                .bind(message)
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(reads, [tenant]);
        let permissions: Vec<Uuid> = sqlx::query_scalar(
            "SELECT organization_id FROM role_permissions WHERE role_id = $1 \
                 AND permission <> 'users:write'",
        )
        .bind(role)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(permissions, [tenant, tenant]);
    }
}

/// 0010 adds `hash_version`: the events already in the log stay v1 and verify as such, the
/// writer goes on in v2 from their head, an organization's export shows the old events as
/// stubs nothing attributes and the new ones by their tenant tags, and a server from before
/// 0010 (whose writer names no `hash_version`) can no longer append.
#[tokio::test]
async fn a_log_written_in_v1_goes_on_in_v2() {
    let db = TestDb::unmigrated().await;
    up_to(9).run(&db.pool).await.unwrap();
    let other_tenant = Uuid::new_v4();
    let insert = |position: i64, prev: [u8; 32]| {
        let id = Uuid::new_v4().to_string();
        let payload = format!(r#"{{"LoadTested":{{"n":{position}}}}}"#);
        let at = truncate_to_micros(Utc::now());
        let org = (position != 2).then_some(other_tenant);
        let fields = EventFields {
            hash_version: HashVersion::V1,
            position,
            aggregate_type: "Load",
            aggregate_id: &id,
            sequence: 1,
            event_type: "LoadTested",
            event_version: "1",
            organization_id: org,
            recorded_at: at,
            payload: &payload,
            metadata: "{}",
        };
        let hash = event_hash(&prev, &fields);
        let query = sqlx::query(
            "INSERT INTO events (position, aggregate_type, aggregate_id, sequence, event_type, \
             event_version, organization_id, recorded_at, payload, metadata, prev_hash, hash) \
             VALUES ($1, 'Load', $2, 1, 'LoadTested', '1', $3, $4, $5::json, '{}', $6, $7)",
        )
        .bind(position)
        .bind(id.clone())
        .bind(org)
        .bind(at)
        .bind(payload.clone())
        .bind(prev.to_vec())
        .bind(hash.to_vec());
        (query, hash)
    };
    let mut prev = GENESIS;
    for position in 1..=3 {
        let (query, hash) = insert(position, prev);
        query.execute(&db.pool).await.unwrap();
        prev = hash;
    }

    ledgerline::db::migrate(&db.pool).await.unwrap();
    // The maintainer signs the v1 log as it is: no `hash-v2-from`, every event v1.
    let signer = std::sync::Arc::new(LogSigner::generate("ledgerline.test/log").unwrap());
    tree::catch_up(&db.pool, Some(&signer), POLICY, true)
        .await
        .unwrap();
    let before = newest_checkpoint(&db.pool).await;
    assert!(before.starts_with("ledgerline.test/log\n3\n"), "{before}");
    assert!(!before.contains("hash-v2-from"), "{before}");
    let (query, _) = insert(4, prev);
    let refused = query.execute(&db.pool).await.unwrap_err();
    assert_eq!(
        refused
            .as_database_error()
            .and_then(|e| e.code())
            .as_deref(),
        Some("55000"),
        "{refused}"
    );

    // The server that goes on signing holds the log's key.
    let pool = db.pool.clone();
    let t = TestApp::spawn_signed(db, pool, Projector::default(), signer.clone()).await;
    let org = t.create_org("Acme").await;
    let versions: Vec<(i64, i16)> =
        sqlx::query_as("SELECT position, hash_version FROM events ORDER BY position")
            .fetch_all(t.pool())
            .await
            .unwrap();
    assert!(versions.len() > 4, "{versions:?}");
    for (position, version) in versions {
        assert_eq!(version, if position <= 3 { 1 } else { 2 }, "at {position}");
    }
    let report = t.verify().await;
    assert!(report.intact(), "{:?}", report.first_bad);
    assert_eq!(report.events as i64, t.head().await);

    let mut file = Vec::new();
    let scope = ExportScope {
        organization: Some(org),
        from: 1,
        to: None,
    };
    export(t.pool(), scope, t.app.origin(), &mut file)
        .await
        .unwrap();
    let report = verify_reader(&file[..], None, 2).unwrap();
    assert!(report.intact(), "{report}");
    // The three old events, and the platform's bootstrap key written by the new writer.
    assert_eq!((report.v1_stubs, report.stubs), (3, 4), "{report}");

    // The running server signs where the writer turned to v2; both notes check the export.
    tree::catch_up(t.pool(), Some(&t.signer), POLICY, true)
        .await
        .unwrap();
    let after = newest_checkpoint(t.pool()).await;
    assert!(after.contains("\nhash-v2-from 4\n"), "{after}");
    let key = signer.verifier();
    for note in [&before, &after] {
        let report = verify_reader(&file[..], Some((note, &key)), 2).unwrap();
        assert!(report.matches_checkpoint(), "{note}: {report}");
        // The database's auditor finds the boundary each note signs (none, then 4).
        let path = std::env::temp_dir().join(format!("ll-cp-{}.txt", Uuid::new_v4().simple()));
        std::fs::write(&path, note).unwrap();
        let (code, out, err) = common::ledgerline(
            &t.db.url,
            &[
                "verify",
                "--since",
                path.to_str().unwrap(),
                "--public-key",
                &key.to_string(),
            ],
        )
        .await;
        std::fs::remove_file(&path).ok();
        assert_eq!(code, 0, "{note}: {out}{err}");
    }
}

async fn newest_checkpoint(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar("SELECT note FROM checkpoints ORDER BY tree_size DESC LIMIT 1")
        .fetch_one(pool)
        .await
        .unwrap()
}
