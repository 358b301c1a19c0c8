//! The operator's projection commands, run as the built binary against a test database.

mod common;

use common::{ledgerline, TestApp};

#[tokio::test]
async fn projections_status_shows_every_projection_at_the_head() {
    let t = TestApp::spawn().await;
    t.create_org("Status Co").await;
    let head = t.head().await;
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "status"]).await;
    assert_eq!(code, 0, "{err}");
    for name in ledgerline_projections::names() {
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing: {out}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cols[1..4],
            [head.to_string(), head.to_string(), "0".to_string()],
            "{line}"
        );
    }
}

#[tokio::test]
async fn projections_retry_clears_a_failure_and_refuses_unknown_names() {
    let t = TestApp::spawn().await;
    sqlx::query(
        "INSERT INTO projection_failures (name, position, error) VALUES ('users', 1, 'boom')",
    )
    .execute(t.pool())
    .await
    .unwrap();
    let (_, out, _) = ledgerline(&t.db.url, &["projections", "status"]).await;
    assert!(out.contains("at position 1: boom"), "{out}");

    let (code, out, err) = ledgerline(&t.db.url, &["projections", "retry", "users"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 failure(s) cleared"), "{out}");
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM projection_failures")
        .fetch_one(t.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);

    let (code, _, err) =
        ledgerline(&t.db.url, &["projections", "retry", "no_such_projection"]).await;
    assert_eq!(code, 2, "{err}");
}

/// A command a test runs is awaited, not waited for: the test's app runs on the test's own
/// thread, and a task of it holding a row the command needs must be able to finish. (A
/// blocking helper once froze the log maintainer inside its transaction while `prove` waited
/// for the same row: the run hung until CI's limit.)
#[tokio::test]
async fn a_command_waiting_for_a_row_the_app_holds_gets_it() {
    let t = TestApp::spawn().await;
    let pool = t.pool().clone();
    let (locked, is_locked) = tokio::sync::oneshot::channel();
    let holder = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM projection_checkpoints WHERE name = 'users' FOR UPDATE")
            .execute(&mut *tx)
            .await
            .unwrap();
        locked.send(()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        tx.commit().await.unwrap();
    });
    is_locked.await.unwrap();
    // The swap locks the projection's checkpoint row.
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "rebuild", "users"]).await;
    assert_eq!(code, 0, "{out}{err}");
    holder.await.unwrap();
}
