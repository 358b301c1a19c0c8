//! Migrations against databases that already hold data: each must carry the rows it
//! finds into the new shape, as a deployment over a live database would need.

mod common;

use std::borrow::Cow;

use common::TestDb;
use ledgerline::db::MIGRATOR;
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
