//! The operator's projection commands, run as the built binary against a test database.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{at_the_swap, eventually, ledgerline, ledgerline_offline, tamper, TestApp, TestDb};
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

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
    let (code, out, _) = ledgerline(&t.db.url, &["projections", "status"]).await;
    assert!(out.contains("at position 1: boom"), "{out}");
    assert_eq!(
        code, 1,
        "a stopped projection is an exit code scripts can see: {out}"
    );

    let (code, out, err) = ledgerline(&t.db.url, &["projections", "retry", "users"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 failure cleared"), "{out}");
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "status"]).await;
    assert_eq!(code, 0, "{out}{err}");

    let (code, out, err) = ledgerline(&t.db.url, &["projections", "retry", "users"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("users: no failure recorded; nothing to retry"),
        "{out}"
    );
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM projection_failures")
        .fetch_one(t.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);

    for command in ["retry", "rebuild", "check"] {
        let (code, _, err) =
            ledgerline(&t.db.url, &["projections", command, "no_such_projection"]).await;
        assert_eq!(code, 2, "{command}: {err}");
        assert!(
            err.contains(
                "unknown projection `no_such_projection`; the projections are organizations, \
                 users,"
            ),
            "{command}: the names to choose from: {err}"
        );
    }
}

/// A database that refuses connections is named as such, not only as a pool that timed out.
#[tokio::test]
async fn an_unreachable_database_is_reported_with_its_cause() {
    let (code, out, err) = ledgerline("postgres://postgres@127.0.0.1:1/nothing", &["verify"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
}

/// A database URL with a parameter the driver would ignore (and log the value of) is refused
/// before any connection, naming the parameter, never its value; and a snapshot wait beyond a
/// week is refused before any work (it overflowed the clock at the swap, after the build).
#[tokio::test]
async fn settings_that_would_fail_late_or_leak_are_refused_at_once() {
    let url = "postgres://postgres@127.0.0.1:1/nothing?sslmode=disable&sslpassword=k3y";
    let (code, out, err) = ledgerline(url, &["verify"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("`sslpassword` is not one"), "{err}");
    assert!(!format!("{out}{err}").contains("k3y"), "{out}{err}");
    let far = u64::MAX.to_string();
    let args = [
        "projections",
        "rebuild",
        "--all",
        "--snapshot-wait-secs",
        &far,
    ];
    let (code, out, err) = ledgerline("postgres://postgres@127.0.0.1:1/nothing", &args).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--snapshot-wait-secs"), "{err}");
    // A timer that far off overflows the clock when it is first set, in the maintainer's
    // task, after the server said it serves: nothing would be signed again.
    let args = ["serve", "--checkpoint-interval-secs", &far];
    let (code, out, err) = ledgerline("postgres://postgres@127.0.0.1:1/nothing", &args).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--checkpoint-interval-secs"), "{err}");
}

/// An export of an organization the log never created is refused, not a file of stubs
/// alone that verifies as intact.
#[tokio::test]
async fn an_export_of_an_unknown_organization_is_refused() {
    let t = TestApp::spawn().await;
    t.create_org("Known Co").await;
    let out = std::env::temp_dir().join(format!("ll_unknown_{}.jsonl", uuid::Uuid::new_v4()));
    let path = out.to_str().unwrap();
    let unknown = uuid::Uuid::new_v4().to_string();
    let (code, _, err) = ledgerline(&t.db.url, &["export", "--org", &unknown, "--out", path]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("no organization {unknown} in the log")),
        "{err}"
    );
    assert!(!out.exists(), "no file written");
}

/// An export file with nothing in it could not be verified (exit 2): there is no file to
/// speak of, tampered or not. A blank line added to an export is a change of the file (the
/// exporter ends each line with one newline), and is named as such (exit 1).
#[tokio::test]
async fn an_empty_export_holds_no_events_and_a_blank_line_is_named() {
    let out = std::env::temp_dir().join(format!("ll_empty_{}.jsonl", uuid::Uuid::new_v4()));
    let path = out.to_str().unwrap();
    for empty in ["", "\n", " \n\t\n"] {
        std::fs::write(&out, empty).unwrap();
        let (code, said, err) = ledgerline_offline(&["verify", "--file", path]).await;
        assert_eq!(code, 2, "{empty:?}: {said}{err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "error: verifying {path}: the file holds no events: it is empty (or only \
                 whitespace), with no export header"
            ),
            "{empty:?}"
        );
    }
    let t = TestApp::spawn().await;
    t.create_org("Blank Co").await;
    let (code, summary, err) = ledgerline(&t.db.url, &["export", "--out", path]).await;
    assert_eq!(code, 0, "{summary}{err}");
    let head = t.head().await;
    let (code, said, err) = ledgerline_offline(&["verify", "--file", path]).await;
    assert_eq!(code, 0, "{said}{err}");
    let mut text = std::fs::read_to_string(&out).unwrap();
    text.push('\n');
    std::fs::write(&out, text).unwrap();
    let (code, said, err) = ledgerline_offline(&["verify", "--file", path]).await;
    assert_eq!(code, 1, "{said}{err}");
    assert!(
        said.starts_with(&format!(
            "TAMPERED: first bad position {}: blank line at line {} (",
            head + 1,
            head + 2
        )),
        "{said}"
    );
    std::fs::remove_file(&out).ok();
}

/// `verify --file --org` refuses the export of another organization (or of every one): a
/// header naming another organization is what an exporter hiding this one's events as
/// stubs would write.
#[tokio::test]
async fn verify_file_with_org_refuses_another_organizations_export() {
    let t = TestApp::spawn().await;
    let acme = t.create_org("Acme").await;
    let globex = t.create_org("Globex").await;
    let out = std::env::temp_dir().join(format!("ll_org_{}.jsonl", uuid::Uuid::new_v4()));
    let path = out.to_str().unwrap();
    let (code, summary, err) = ledgerline(
        &t.db.url,
        &["export", "--org", &acme.to_string(), "--out", path],
    )
    .await;
    assert_eq!(code, 0, "{summary}{err}");
    let head = t.head().await;
    let (code, said, err) =
        ledgerline_offline(&["verify", "--file", path, "--org", &acme.to_string()]).await;
    assert_eq!(code, 0, "{said}{err}");
    assert!(
        said.contains(&format!(
            "; covers positions 1 to {head} for organization {acme}: its events in full, every \
             other position a stub; "
        )),
        "{said}"
    );
    let (code, said, err) =
        ledgerline_offline(&["verify", "--file", path, "--org", &globex.to_string()]).await;
    assert_eq!(code, 1, "{said}{err}");
    assert!(
        said.starts_with(&format!(
            "TAMPERED: line 1: the export is of organization {acme}, not of organization \
             {globex}, whose export was asked for ("
        )),
        "{said}"
    );
    std::fs::remove_file(&out).ok();
}

/// Counts of one are said in the singular.
#[tokio::test]
async fn verify_says_one_event_in_the_singular() {
    let t = TestApp::spawn().await;
    assert_eq!(t.head().await, 1, "the operator's bootstrap key alone");
    let (code, out, err) = ledgerline(&t.db.url, &["verify"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("intact: 1 event verified in "), "{out}");
    tamper(
        t.pool(),
        &["UPDATE events SET metadata = '{}' WHERE position = 1".to_string()],
    )
    .await;
    let (code, out, err) = ledgerline(&t.db.url, &["verify"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with("TAMPERED: first bad position 1: content changed")
            && out.contains(" (1 event read in "),
        "{out}"
    );
}

/// An error is said once, not once more for each error that wraps it.
#[tokio::test]
async fn a_missing_database_is_named_once() {
    let db = TestDb::new().await;
    let url = format!("{}_missing", db.url.split('?').next().unwrap());
    let (code, out, err) = ledgerline(&url, &["verify"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(err.matches("does not exist").count(), 1, "{err}");
}

/// A log edited past its triggers would pass its edits into rebuilt read models (or make a
/// check flag the honest live rows): both verify the chain first and start nothing.
#[tokio::test]
async fn rebuilds_and_checks_refuse_a_log_that_does_not_verify() {
    let t = TestApp::spawn().await;
    t.create_org("Tampered Co").await;
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "check", "audit_events"]).await;
    assert_eq!(code, 0, "an intact log is checked: {out}{err}");
    let live: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT position, client_ip FROM audit_events ORDER BY position")
            .fetch_all(t.pool())
            .await
            .unwrap();
    tamper(
        t.pool(),
        &["UPDATE events SET metadata = (metadata::jsonb || '{\"client_ip\": \"6.6.6.6\"}')::json \
           WHERE position = 2"
            .to_string()],
    )
    .await;

    for args in [
        &["projections", "rebuild", "--all"][..],
        &["projections", "check", "audit_events"][..],
    ] {
        let (code, out, err) = ledgerline(&t.db.url, args).await;
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.contains("the log does not verify (first bad position 2: content changed"),
            "{args:?}: {err}"
        );
    }
    // A wrong name is said first, before any verifying.
    for command in ["rebuild", "check"] {
        let (code, _, err) = ledgerline(&t.db.url, &["projections", command, "userz"]).await;
        assert_eq!(code, 2, "{command}: {err}");
        assert!(
            err.contains("unknown projection `userz`"),
            "{command}: {err}"
        );
        assert!(!err.contains("does not verify"), "{command}: {err}");
    }
    let (jobs,): (i64,) = sqlx::query_as("SELECT count(*) FROM projection_rebuilds")
        .fetch_one(t.pool())
        .await
        .unwrap();
    assert_eq!(jobs, 0, "no job was started");
    let after: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT position, client_ip FROM audit_events ORDER BY position")
            .fetch_all(t.pool())
            .await
            .unwrap();
    assert_eq!(after, live, "the live rows are as the intact log made them");
}

/// A view over a live table would stop the swap after all the work: the rebuild refuses at
/// its start instead (exit 2, as other refusals), naming the view, and starts no job.
#[tokio::test]
async fn a_rebuild_refuses_a_view_over_its_tables_and_starts_nothing() {
    let t = TestApp::spawn().await;
    t.create_org("Viewed Co").await;
    sqlx::query("CREATE VIEW org_names AS SELECT name FROM organizations")
        .execute(t.pool())
        .await
        .unwrap();
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "rebuild", "--all"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("view org_names (depends on organizations)")
            && err.contains("nothing was started"),
        "{err}"
    );
    assert!(!err.contains("keeps the work"), "no job to keep: {err}");
    let (jobs,): (i64,) = sqlx::query_as("SELECT count(*) FROM projection_rebuilds")
        .fetch_one(t.pool())
        .await
        .unwrap();
    assert_eq!(jobs, 0, "no job was started");
}

/// A projection stopped on a failure has equal tables up to its checkpoint: the check says
/// it is stopped, and at which event, beside the comparison.
#[tokio::test]
async fn a_check_says_a_projection_is_stopped_beside_its_comparison() {
    let t = TestApp::spawn().await;
    t.create_org("Stopped Co").await;
    let failed = t.head().await + 1;
    sqlx::query(
        "INSERT INTO projection_failures (name, position, error) VALUES ('organizations', $1, 'boom')",
    )
    .bind(failed)
    .execute(t.pool())
    .await
    .unwrap();
    // Answered 202: the organization is in the log, not in the stopped read model.
    let r = t
        .post(
            "/v1/organizations",
            &t.admin_key,
            serde_json::json!({"name": "Later Co", "slug": "later-co"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let head = t.head().await;
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "check", "organizations"]).await;
    assert_eq!(
        code, 0,
        "the tables are equal at its checkpoint: {out}{err}"
    );
    let stopped = out
        .lines()
        .find(|l| l.starts_with("organizations (at position "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        stopped.ends_with(&format!(
            ") STOPPED on a failure at the event at position {failed} (the head is at {head}): \
             compared at its checkpoint; `ledgerline projections status` shows the error"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "stopped on a failure (compared up to its checkpoint only): organizations at \
             position {failed}"
        )),
        "{out}"
    );
    assert!(out.contains("equal a rebuild from the log"), "{out}");
}

/// The operator key is shown even when the read models cannot show it yet: only its hash
/// is kept and a second bootstrap is refused, so a key not printed would need a rotation.
#[tokio::test]
async fn bootstrap_prints_the_key_even_when_a_projection_is_stopped() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO projection_failures (name, position, error) VALUES ('users', 1, 'boom')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (code, out, err) = ledgerline(&db.url, &["bootstrap"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let printed: Value = serde_json::from_str(&out).expect("the key as JSON");
    let secret = printed["api_key"].as_str().unwrap();
    assert!(secret.starts_with("ll_"), "{out}");
    assert!(err.contains("could not show it yet"), "{err}");
    let (issued,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM events WHERE event_type = 'ApiKeyIssued'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(issued, 1);
    // The stopped projection does not hold back the one the key needs.
    let (shown,): (i64,) = sqlx::query_as("SELECT count(*) FROM api_keys")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(shown, 1);
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
        let tx = common::hold_checkpoint(&pool, "users").await;
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

/// A rebuild with no job to resume says what the last one did: a run killed just after its
/// swap committed printed nothing, and the operator running it again would otherwise not
/// learn that it was swapped in.
#[tokio::test]
async fn a_new_rebuild_says_the_last_one_was_swapped_in() {
    let t = TestApp::spawn().await;
    t.create_org("Again Co").await;
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "rebuild", "users"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !err.contains("the last rebuild"),
        "none before the first: {err}"
    );
    let (job, position): (i64, i64) = sqlx::query_as(
        "SELECT id, target_position FROM projection_rebuilds WHERE status = 'swapped'",
    )
    .fetch_one(t.pool())
    .await
    .unwrap();
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "rebuild", "--all"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains(&format!(
            "the last rebuild, job {job} (users), was swapped in at position {position} ("
        )) && err.contains("); this run starts a new one"),
        "{err}"
    );
}

/// Holds the `users` checkpoint row, which a rebuild's swap locks: a rebuild of `users`
/// started meanwhile catches up, builds its indexes and then waits, alive and holding the
/// rebuild lock, until the returned transaction ends.
async fn hold_the_swap(pool: &PgPool) -> Transaction<'static, Postgres> {
    common::hold_checkpoint(pool, "users").await
}

/// `ledgerline projections rebuild users` as a job runner starts it: standard error a pipe.
fn start_rebuild(url: &str, extra: &[&str], log: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ledgerline"))
        .args(extra)
        .args(["projections", "rebuild", "users"])
        .env("LEDGERLINE_DATABASE_URL", url)
        .env("RUST_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run ledgerline")
}

#[tokio::test]
async fn projections_status_tells_a_running_rebuild_from_a_killed_one() {
    let t = TestApp::spawn_without_polls().await;
    t.create_org("Rebuild Status Co").await;
    let head = t.head().await;
    let (_, out, _) = ledgerline(&t.db.url, &["projections", "status"]).await;
    assert!(!out.contains("rebuild job"), "no job, none shown: {out}");

    let held = hold_the_swap(t.pool()).await;
    let mut child = start_rebuild(&t.db.url, &[], "warn");
    assert!(at_the_swap(t.pool()).await, "the rebuild reached its swap");
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "status"]).await;
    assert_eq!(code, 0, "{err}");
    let job = out
        .lines()
        .find(|l| l.starts_with("rebuild job "))
        .unwrap_or_else(|| panic!("the job is shown: {out}"));
    assert!(job.contains("RUNNING"), "{out}");
    // Who holds the lock, to find the run by: its session's pid, name and address.
    assert!(
        job.contains("(the session holding the rebuild lock: pid ")
            && job.contains(", ledgerline-rebuild, from 127.0.0.1)"),
        "{job}"
    );
    let users = out
        .lines()
        .find(|l| l.trim_start().starts_with("users") && l.contains("ago)"))
        .unwrap_or_else(|| panic!("the job's projection is shown: {out}"));
    let cols: Vec<&str> = users.split_whitespace().collect();
    assert_eq!(cols[1..3], [head.to_string(), head.to_string()], "{users}");
    assert!(
        !out.contains("--abandon"),
        "nothing to do while it runs: {out}"
    );
    // A second run is refused at once, without verifying the log first.
    let (code, _, err) =
        common::ledgerline_logging(&t.db.url, &["projections", "rebuild", "users"], "info").await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("another rebuild is running"), "{err}");
    assert!(!err.contains("verifying the log"), "{err}");

    child.kill().await.unwrap(); // SIGKILL
    let freed = eventually(Duration::from_secs(30), || async {
        let rows = ledgerline_projections::rebuild_progress(t.pool())
            .await
            .unwrap();
        rows.iter().all(|r| !r.held)
    })
    .await;
    assert!(freed, "PostgreSQL freed the killed run's lock");
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("STOPPED"), "{out}");
    assert!(!out.contains("RUNNING"), "{out}");
    assert!(
        out.contains("`ledgerline projections rebuild users`")
            && out.contains("`ledgerline projections rebuild --abandon`"),
        "the operator is told what to do: {out}"
    );

    // What it says works: the job resumes and is no longer shown.
    held.commit().await.unwrap();
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "rebuild", "users"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("(resumed)"), "{out}");
    let (_, out, _) = ledgerline(&t.db.url, &["projections", "status"]).await;
    assert!(!out.contains("rebuild job"), "{out}");
}

/// Without a terminal the progress goes to the log, so with `--log-format json` every line
/// on standard error is a JSON object, progress included, with its figures as fields.
#[tokio::test]
async fn rebuild_progress_is_a_json_log_event_when_json_logs_are_asked_for() {
    let t = TestApp::spawn_without_polls().await;
    t.create_org("Json Progress Co").await;
    let head = t.head().await;
    let held = hold_the_swap(t.pool()).await;
    let mut child = start_rebuild(&t.db.url, &["--log-format", "json"], "info");
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut lines = Vec::new();
    // The log's progress events come every 5 s; the held swap keeps the run going that long.
    let progress = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            lines.push(line.clone());
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if event["fields"]["message"] == "rebuild progress" {
                return event;
            }
        }
        panic!("the run ended without a progress event: {lines:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no progress event in the log: {lines:?}"));
    let fields = &progress["fields"];
    assert_eq!(progress["level"], "INFO", "{progress}");
    assert_eq!(fields["command"], "rebuild", "{progress}");
    // Counted from where the display first looked, which on so short a log is after the
    // catching up: the figures are there as numbers, and the run is waiting at its swap.
    for figure in [
        "events_done",
        "events_total",
        "percent",
        "events_per_second",
    ] {
        assert!(fields[figure].is_i64(), "{figure}: {progress}");
    }
    assert_eq!(fields["events_done"], fields["events_total"], "{progress}");
    assert_eq!(fields["percent"], 100, "{progress}");
    assert!(fields["events_total"].as_i64() <= Some(head), "{progress}");
    assert_eq!(
        fields["phase"], "swapping the tables in",
        "the count stands still, and the line says why: {progress}"
    );

    held.commit().await.unwrap();
    let waited = lines.len();
    while let Some(line) = stderr.next_line().await.unwrap() {
        lines.push(line);
    }
    assert!(child.wait().await.unwrap().success(), "{lines:?}");
    // Where the run ended is logged when it ends, not only at the next 5-second mark.
    assert!(
        lines[waited..]
            .iter()
            .any(|l| l.contains("\"message\":\"rebuild progress\"")),
        "{lines:?}"
    );
    for line in &lines {
        assert!(
            serde_json::from_str::<Value>(line).is_ok_and(|v| v.is_object()),
            "not a JSON log line: {line:?}"
        );
    }
}

/// A database migrated by a newer binary, or not yet by this one: `check` (an auditor's
/// read-only command) and `rebuild` refuse, exit 2 and change no schema.
#[tokio::test]
async fn check_and_rebuild_refuse_a_database_whose_migrations_differ_and_change_nothing() {
    let db = TestDb::new().await;
    let schema = |pool: &PgPool| {
        let pool = pool.clone();
        async move {
            let layout: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT table_schema::text, table_name::text, column_name::text \
                 FROM information_schema.columns \
                 WHERE table_schema NOT IN ('pg_catalog', 'information_schema') \
                 ORDER BY 1, 2, 3",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            let constraints: Vec<String> = sqlx::query_scalar(
                "SELECT conname::text FROM pg_constraint \
                 WHERE connamespace = 'public'::regnamespace ORDER BY 1",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            let migrations: Vec<(i64, bool)> =
                sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            (layout, constraints, migrations)
        }
    };
    let commands: [&[&str]; 3] = [
        &["projections", "check"],
        &["projections", "rebuild", "--all"],
        &["projections", "rebuild", "--abandon"],
    ];

    // One of this binary's migrations undone (0007: its effect is one constraint), as on a
    // database the new release has not migrated yet: a command that migrated would apply it.
    for statement in [
        "ALTER TABLE projection_rebuilds DROP CONSTRAINT projection_rebuilds_shadow_schema_plain",
        "DELETE FROM _sqlx_migrations WHERE version = 7",
    ] {
        sqlx::query(statement).execute(&db.pool).await.unwrap();
    }
    let before = schema(&db.pool).await;
    for args in commands {
        let (code, out, err) = ledgerline(&db.url, args).await;
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.contains("not applied: 7 (rebuild schema names)") && err.contains("never migrates"),
            "{args:?}: {err}"
        );
        assert_eq!(
            schema(&db.pool).await,
            before,
            "{args:?} changed the schema"
        );
    }

    // Applied by a newer binary: this one does not know it.
    let (code, _, err) = ledgerline(&db.url, &["migrate"]).await;
    assert_eq!(code, 0, "{err}");
    let newer = ledgerline::db::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap()
        + 1;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, 'from a newer release', true, '\\x00', 0)",
    )
    .bind(newer)
    .execute(&db.pool)
    .await
    .unwrap();
    let before = schema(&db.pool).await;
    for args in commands {
        let (code, out, err) = ledgerline(&db.url, args).await;
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.contains("unknown to this binary")
                && err.contains(&format!("{newer} (from a newer release)")),
            "{args:?}: {err}"
        );
        assert_eq!(
            schema(&db.pool).await,
            before,
            "{args:?} changed the schema"
        );
    }

    // `migrate` and `serve` say it in the same words, and apply nothing.
    let serve = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--master-key",
        &"11".repeat(32),
        "--signing-key",
        &"22".repeat(32),
    ];
    for args in [&["migrate"][..], &serve] {
        let (code, out, err) = ledgerline(&db.url, args).await;
        assert_eq!(code, 2, "{}: {out}{err}", args[0]);
        assert!(
            err.contains("applied but unknown to this binary (a newer one's?)")
                && err.contains(&format!("{newer} (from a newer release)"))
                && err.contains("nothing was migrated"),
            "{}: {err}",
            args[0]
        );
        assert!(!err.contains("resolved migrations"), "{}: {err}", args[0]);
        assert_eq!(
            schema(&db.pool).await,
            before,
            "{} changed the schema",
            args[0]
        );
    }

    // The same database as this binary migrates it: checked as usual.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(newer)
        .execute(&db.pool)
        .await
        .unwrap();
    let (code, out, err) = ledgerline(&db.url, &["projections", "check"]).await;
    assert_eq!(code, 0, "{out}{err}");
}

/// The database lost under a running `rebuild --all` (every session ended, as a restart
/// ends them): the error names the exact command that resumes the job and the one that drops
/// it, as every failure after the job exists does.
#[tokio::test]
async fn a_rebuild_of_all_that_loses_its_database_names_both_commands() {
    let t = TestApp::spawn_without_polls().await;
    t.create_org("Lost Database Co").await;
    let mut held = hold_the_swap(t.pool()).await;
    let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *held)
        .await
        .unwrap();
    let child = spawn_piped(&t.db.url, &["projections", "rebuild", "--all"], "warn");
    assert!(at_the_swap(t.pool()).await, "at the swap");
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid NOT IN (pg_backend_pid(), $1)",
    )
    .bind(holder)
    .execute(t.pool())
    .await
    .unwrap();
    let out = child.wait_with_output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("keeps the work it recorded")
            && err.contains("run `ledgerline projections rebuild --all` to resume it")
            && err.contains("`ledgerline projections rebuild --abandon` to drop it"),
        "{err}"
    );
    held.commit().await.unwrap();
}

/// `projections status` and `retry` on a database no migration has touched name what is
/// missing and what to run, rather than PostgreSQL's "relation ... does not exist".
#[tokio::test]
async fn status_and_retry_name_the_missing_migrations() {
    let db = TestDb::unmigrated().await;
    for args in [
        &["projections", "status"][..],
        &["projections", "retry", "users"],
    ] {
        let (code, out, err) = ledgerline(&db.url, args).await;
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(!err.contains("does not exist"), "{args:?}: {err}");
        assert!(
            err.contains("lacks this binary's migrations: not applied: 1 (")
                && err.contains("`ledgerline migrate`"),
            "{args:?}: {err}"
        );
    }
}

/// `bootstrap` on a new database migrates it, as `serve` would, and says so (and where),
/// so that one pointed at the wrong database is not silent about the tables it made there.
#[tokio::test]
async fn bootstrap_says_which_migrations_it_applied() {
    let db = TestDb::unmigrated().await;
    let (code, out, err) = ledgerline(&db.url, &["bootstrap"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let printed: Value = serde_json::from_str(&out).expect("only the key on standard output");
    assert!(printed["api_key"].is_string(), "{out}");
    let migrations = ledgerline::db::MIGRATOR.iter().count();
    assert!(
        err.contains(&format!(
            "bootstrap: applied {migrations} migrations to {}",
            ledgerline::db::redact_url(&db.url)
        )),
        "{err}"
    );

    // On a migrated database it has nothing to say about them.
    let db = TestDb::new().await;
    let (code, out, err) = ledgerline(&db.url, &["bootstrap"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("migration"), "{err}");
}

/// A URL for another database is refused as such, before connecting anywhere (sqlx's driver
/// would connect to PostgreSQL with it and complain about the role).
#[tokio::test]
async fn a_database_url_that_is_not_postgresql_is_refused() {
    for args in [&["migrate"][..], &["projections", "status"]] {
        let (code, out, err) = ledgerline("mysql://x@127.0.0.1/db", args).await;
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.contains("`mysql:` is not a PostgreSQL URL"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("role"), "{args:?}: {err}");
    }
}

/// `ledgerline ARGS` started with standard output and error pipes.
fn spawn_piped(url: &str, args: &[&str], log: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ledgerline"))
        .args(args)
        .env("LEDGERLINE_DATABASE_URL", url)
        .env("RUST_LOG", log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run ledgerline")
}

/// A reader that goes away before the end (`ledgerline projections status | head -1`): the
/// command ends quietly with 141, as a shell shows a process SIGPIPE ended, never with a
/// panic. Here the pipe's read end is closed before the command writes anything: each
/// command connects to the database first, which takes far longer than closing it. (A
/// command that writes at once, such as `keygen`, raced the closing and won on a CI run.)
#[tokio::test]
async fn a_command_whose_output_reader_goes_away_exits_141_quietly() {
    let t = TestApp::spawn().await;
    t.create_org("Pipe Co").await;
    for args in [
        &["projections", "status"][..],
        &["projections", "check", "users"][..],
        &["verify"][..],
    ] {
        let mut child = spawn_piped(&t.db.url, args, "warn");
        drop(child.stdout.take());
        let out = child.wait_with_output().await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
    }
}

/// A reader gone before the platform key is printed: its secret is lost (only its hash is
/// kept, and bootstrap makes a key once), so the command says so, and how to give the key a
/// new secret, and fails, rather than end quietly with 141 as the others do.
#[tokio::test]
async fn bootstrap_says_so_when_its_key_cannot_be_printed() {
    let db = TestDb::new().await;
    let mut child = spawn_piped(&db.url, &["bootstrap"], "warn");
    drop(child.stdout.take());
    let out = child.wait_with_output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the platform key could not be written to standard output"),
        "{err}"
    );
    let id = platform_keys(&db.url).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!("ledgerline platform-key rotate {id}")),
        "{err}"
    );
    let (code, out, err) = ledgerline(&db.url, &["platform-key", "rotate", &id]).await;
    assert_eq!(code, 0, "the lost secret is replaced: {err}");
    let secret: Value = serde_json::from_str(&out).expect("the new secret as JSON");
    let secret = secret["api_key"].as_str().unwrap();
    let prefix: String = sqlx::query_scalar("SELECT prefix FROM api_keys WHERE id = $1::uuid")
        .bind(&id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(ledgerline::keys::prefix_of(secret), Some(prefix.as_str()));
}

/// `projections status` names which process holds each lease, and for how long.
#[tokio::test]
async fn projections_status_shows_who_holds_each_lease() {
    let t = TestApp::spawn().await;
    t.create_org("Lease Co").await;
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "status"]).await;
    assert_eq!(code, 0, "{err}");
    let holders: Vec<(String, String)> =
        sqlx::query_as("SELECT name, holder FROM leases ORDER BY name")
            .fetch_all(t.pool())
            .await
            .unwrap();
    assert!(
        holders.iter().any(|(n, _)| n == "log-maintainer"),
        "the test app holds leases: {holders:?}"
    );
    for (name, holder) in &holders {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing: {out}"));
        assert!(line.contains(holder.as_str()), "{line}");
        assert!(line.trim_end().ends_with(" s"), "expires in N s: {line}");
    }
}

/// A rebuild that fails after its job was made, on a cause that says nothing of the job (its
/// swap's session ended, as a lost database ends them all): the error says the job kept its
/// work and gives the commands that resume and drop it; the summary of the rerun's swap and
/// its last progress figures agree.
#[tokio::test]
async fn a_rebuild_failing_after_its_job_began_says_how_to_resume_it() {
    let t = TestApp::spawn_without_polls().await;
    t.create_org("Resume Hint Co").await;
    let held = hold_the_swap(t.pool()).await;
    let child = start_rebuild(&t.db.url, &["--log-format", "json"], "info");
    assert!(at_the_swap(t.pool()).await, "at the swap");
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock' \
         AND application_name LIKE 'ledgerline\\_rebuild\\_%'",
    )
    .execute(t.pool())
    .await
    .unwrap();
    let out = child.wait_with_output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let said = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert!(
        said.contains("rebuilding projections: database error"),
        "{err}"
    );
    assert!(
        err.contains("keeps the work it recorded")
            && err.contains("run `ledgerline projections rebuild users` to resume it")
            && err.contains("`ledgerline projections rebuild --abandon` to drop it"),
        "{err}"
    );
    held.commit().await.unwrap();

    // Events that arrive while the rerun waits at its swap are applied by the swap.
    let held = hold_the_swap(t.pool()).await;
    let args = ["--log-format", "json", "projections", "rebuild", "users"];
    let child = spawn_piped(&t.db.url, &args, "info");
    assert!(at_the_swap(t.pool()).await, "at the swap again");
    t.create_org("Arrives During The Swap Co").await;
    let head = t.head().await;
    held.commit().await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        stdout.contains(&format!("swapped in at position {head}")),
        "{stdout}"
    );
    let last = err
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|e| e["fields"]["message"] == "rebuild progress")
        .unwrap_or_else(|| panic!("no progress: {err}"));
    assert_eq!(last["fields"]["events_done"], head, "{last}");
    assert_eq!(last["fields"]["events_total"], head, "{last}");
    assert_eq!(last["fields"]["phase"], "swapped in", "{last}");
}

/// The auditor's commands say what each flag takes, and `prove` that it does not check a
/// checkpoint's signature unless given the key.
#[tokio::test]
async fn the_auditors_flags_are_described_in_the_help() {
    for (args, phrases) in [
        (
            &["prove", "consistency", "--help"][..],
            &[
                "--from <FROM> The older checkpoint file",
                "--to <TO> The newer checkpoint file",
                "Without it the checkpoint files' signatures are not checked",
            ][..],
        ),
        (
            &["prove", "inclusion", "--help"][..],
            &["The event's position in the log"][..],
        ),
        (&["export", "--help"][..], &["The file to write"][..]),
    ] {
        let (code, out, err) = ledgerline_offline(args).await;
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        let out = out.split_whitespace().collect::<Vec<_>>().join(" ");
        for phrase in phrases {
            assert!(out.contains(phrase), "{args:?}: {phrase}: {out}");
        }
    }
}

/// `serve` refuses a pool the per-organization turns could hold all of, before it starts
/// anything; other commands take any size; the default, which depends on the machine's
/// cores, is at least what `serve` needs.
#[tokio::test]
async fn serve_refuses_a_pool_too_small_for_the_turns() {
    let (code, out, err) = ledgerline_offline(&["serve", "--db-pool", "7"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("LEDGERLINE_DB_POOL (--db-pool) is 7: `serve` needs at least 8"),
        "{err}"
    );
    let db = TestDb::new().await;
    let (code, out, err) = ledgerline(&db.url, &["migrate", "--db-pool", "1"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = ledgerline_offline(&["serve", "--help"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let out = out.split_whitespace().collect::<Vec<_>>().join(" ");
    let default: u32 = out
        .split("--db-pool <DB_POOL>")
        .nth(1)
        .and_then(|s| s.split("[default: ").nth(1))
        .and_then(|s| s.split(']').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no default pool in the help: {out}"));
    assert!((8..=16).contains(&default), "{default}");
}

/// The platform key, which no API route reaches, is cut by whoever holds the database:
/// `platform-key rotate` gives it a new secret (the old one fails at once), `revoke` ends
/// it, `issue` makes another, `list` shows them. An organization's key, a key the log does
/// not hold and a second revocation are refused (exit 1), appending nothing.
#[tokio::test]
async fn the_platform_key_is_rotated_revoked_and_replaced_from_the_cli() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Keys Co").await;
    let url = t.db.url.clone();
    let r = t
        .post(
            &format!("/v1/organizations/{org}/api-keys"),
            &t.admin_key,
            serde_json::json!({"label": "ops", "permissions": ["users:read"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let org_key = r.body["id"].as_str().unwrap().to_string();

    let listed = platform_keys(&url).await;
    assert_eq!(listed.len(), 1, "the bootstrap key alone: {listed:?}");
    assert_eq!(listed[0]["status"], "active", "{listed:?}");
    let id = listed[0]["id"].as_str().unwrap().to_string();

    let (code, out, err) = ledgerline(&url, &["platform-key", "rotate", &id]).await;
    assert_eq!(code, 0, "{err}");
    let rotated: Value = serde_json::from_str(&out).expect("the new secret as JSON");
    assert_eq!(rotated["id"], id.as_str());
    let secret = rotated["api_key"].as_str().unwrap();
    assert_eq!(
        me(&t, &t.admin_key).await,
        401,
        "the old secret stops working"
    );
    assert_eq!(me(&t, secret).await, 200, "the new one works");

    let revoke = ["platform-key", "revoke", &id, "--reason", "leaked"];
    let (code, out, err) = ledgerline(&url, &revoke).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"), "{out}");
    assert_eq!(me(&t, secret).await, 401, "a revoked key stops working");

    let unknown = uuid::Uuid::new_v4().to_string();
    for (args, says) in [
        (["platform-key", "revoke", &id], "already revoked"),
        (["platform-key", "rotate", &id], "revoked"),
        (["platform-key", "rotate", &unknown], "holds no API key"),
        (
            ["platform-key", "revoke", &org_key],
            "belongs to organization",
        ),
    ] {
        let before = t.head().await;
        let (code, out, err) = ledgerline(&url, &args).await;
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(t.head().await, before, "{args:?} appended nothing");
    }

    let (code, out, err) = ledgerline(&url, &["platform-key", "issue"]).await;
    assert_eq!(code, 0, "{err}");
    let issued: Value = serde_json::from_str(&out).expect("the new key as JSON");
    assert_eq!(me(&t, issued["api_key"].as_str().unwrap()).await, 200);
    let statuses: Vec<Value> = platform_keys(&url)
        .await
        .iter()
        .map(|k| k["status"].clone())
        .collect();
    assert_eq!(statuses, ["revoked", "active"]);

    // A list the read models cannot bring up to date says so.
    sqlx::query(
        "INSERT INTO projection_failures (name, position, error) VALUES ('api_keys', $1, 'boom')",
    )
    .bind(t.head().await + 1)
    .execute(t.pool())
    .await
    .unwrap();
    let (code, _, _) = ledgerline(&url, &["platform-key", "issue"]).await;
    assert_eq!(code, 0);
    let (code, _, err) = ledgerline(&url, &["platform-key", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("this list may be out of date"), "{err}");
}

/// The status `GET /v1/me` answers `key`.
async fn me(t: &TestApp, key: &str) -> u16 {
    t.get("/v1/me", key).await.status
}

/// `ledgerline platform-key list`, one key a line.
async fn platform_keys(url: &str) -> Vec<Value> {
    let (code, out, err) = ledgerline(url, &["platform-key", "list"]).await;
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("a key as JSON"))
        .collect()
}
