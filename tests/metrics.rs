//! `GET /metrics`: valid Prometheus text, commands counted by type and outcome, gauges that
//! match the database, and a stopped projection visible in the metrics and in `/readyz`.
//!
//! The counters are process-wide and the tests of this binary run in parallel, so each test
//! compares before and after for command types no other test here sends.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::{assert_error, eventually, TestApp};
use serde_json::json;

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses exposition format 0.0.4, panicking on any line that is neither a `# HELP` or
/// `# TYPE` comment nor `name{labels} value`, and on a sample whose family has no `# TYPE`.
fn parse(text: &str) -> Vec<Sample> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
            let name = name.unwrap_or_else(|| panic!("comment without a name: {line}"));
            assert!(valid_name(name), "bad metric name in {line:?}");
            match kind {
                Some("HELP") => assert!(rest.is_some_and(|h| !h.is_empty()), "{line}"),
                Some("TYPE") => {
                    let kind = rest.unwrap_or_default();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{line}"
                    );
                    assert!(
                        types.insert(name.to_string(), kind.to_string()).is_none(),
                        "one TYPE per family: {line}"
                    );
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("no value in {line:?}"),
        };
        assert!(valid_name(name), "bad metric name in {line:?}");
        let mut labels = BTreeMap::new();
        let rest = match rest.strip_prefix('{') {
            Some(mut inner) => loop {
                if let Some(after) = inner.strip_prefix('}') {
                    break after;
                }
                inner = inner.strip_prefix(',').unwrap_or(inner);
                let eq = inner
                    .find("=\"")
                    .unwrap_or_else(|| panic!("bad label in {line:?}"));
                let key = &inner[..eq];
                assert!(valid_name(key) && !key.contains(':'), "{line:?}");
                let mut value = String::new();
                let mut chars = inner[eq + 2..].char_indices();
                let end = loop {
                    match chars.next() {
                        Some((i, '"')) => break eq + 2 + i + 1,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => value.push(c),
                            other => panic!("bad escape {other:?} in {line:?}"),
                        },
                        Some((_, c)) => value.push(c),
                        None => panic!("unterminated label value in {line:?}"),
                    }
                };
                assert!(labels.insert(key.to_string(), value).is_none(), "{line:?}");
                inner = &inner[end..];
            },
            None => rest,
        };
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space before the value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| types.get(*base).is_some_and(|t| t == "histogram"))
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample before its TYPE: {line:?}"
        );
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    check_histograms(&types, &samples);
    samples
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Buckets cumulative, the last one `+Inf`, equal to `_count`.
fn check_histograms(types: &BTreeMap<String, String>, samples: &[Sample]) {
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let bucket = format!("{family}_bucket");
        let buckets: Vec<&Sample> = samples.iter().filter(|s| s.name == bucket).collect();
        assert!(!buckets.is_empty(), "{family} has buckets");
        assert!(
            buckets.windows(2).all(|w| w[0].value <= w[1].value),
            "{family} buckets are cumulative"
        );
        let last = buckets.last().unwrap();
        assert_eq!(last.labels["le"], "+Inf", "{family}");
        let count = samples
            .iter()
            .find(|s| s.name == format!("{family}_count"))
            .unwrap_or_else(|| panic!("{family}_count"));
        assert_eq!(last.value, count.value, "{family}: +Inf equals _count");
        assert!(samples.iter().any(|s| s.name == format!("{family}_sum")));
    }
}

struct Metrics(Vec<Sample>);

impl Metrics {
    /// The value of the sample named `name` with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.0
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    #[track_caller]
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("{name} {labels:?} in the metrics"))
    }

    fn commands(&self, command: &str, outcome: &str) -> f64 {
        self.get(
            "ledgerline_commands_total",
            &[("command", command), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    }

    fn projection(&self, name: &str, projection: &str) -> f64 {
        self.value(name, &[("projection", projection)])
    }
}

async fn scrape(t: &TestApp) -> Metrics {
    let res = t
        .client
        .get(format!("{}/metrics", t.base))
        .send()
        .await
        .expect("request sent");
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(
        res.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    Metrics(parse(&res.text().await.expect("body")))
}

/// Scrapes until `ready` holds (the projector and the log maintainer run in the background).
async fn scrape_until(t: &TestApp, what: &str, ready: impl Fn(&Metrics) -> bool) -> Metrics {
    for _ in 0..100 {
        let m = scrape(t).await;
        if ready(&m) {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn the_parser_refuses_what_is_not_exposition_format() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v \\\"q\\\"\"} 3\n";
    assert_eq!(parse(ok)[0].labels["k"], "v \"q\"");
    for bad in [
        "a_total 3\n",                           // no TYPE
        "# TYPE a gauge\na{k=v} 1\n",            // unquoted label
        "# TYPE a gauge\na 1 2 3\n",             // junk value
        "# TYPE a gauge\na{k=\"v\"}\n",          // no value
        "# TYPE a gauge\n# TYPE a gauge\na 1\n", // two TYPEs
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse(bad)).is_err(),
            "refused: {bad:?}"
        );
    }
}

#[tokio::test]
async fn commands_are_counted_by_type_and_outcome_and_gauges_match_the_ledger() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Metrics Co").await;
    let ada = t.invite(org, "ada@example.com", "Ada").await;
    let user = format!("/v1/organizations/{org}/users/{ada}");
    let before = scrape(&t).await;

    for action in ["deactivate", "reactivate", "deactivate"] {
        let r = t
            .post(&format!("{user}/{action}"), &t.admin_key, json!({}))
            .await;
        assert_eq!(r.status, 200, "{action}: {}", r.body);
    }
    // The aggregate refuses to deactivate a deactivated user.
    let again = t
        .post(&format!("{user}/deactivate"), &t.admin_key, json!({}))
        .await;
    assert_error(&again, 409);

    let after = scrape(&t).await;
    let delta = |command: &str, outcome: &str| {
        after.commands(command, outcome) - before.commands(command, outcome)
    };
    assert_eq!(delta("user.deactivate", "ok"), 2.0);
    assert_eq!(delta("user.deactivate", "rejected"), 1.0);
    assert_eq!(delta("user.deactivate", "conflict"), 0.0);
    assert_eq!(delta("user.reactivate", "ok"), 1.0);
    assert!(after.commands("organization.create", "ok") >= 1.0);
    for histogram in [
        "ledgerline_append_latency_seconds_count",
        "ledgerline_append_batch_commands_count",
        "ledgerline_append_batch_events_count",
    ] {
        assert!(
            after.value(histogram, &[]) >= before.value(histogram, &[]) + 3.0,
            "{histogram} counts the three commits"
        );
    }
    let labels: HashSet<&str> = after
        .0
        .iter()
        .filter_map(|s| s.labels.get("command").map(String::as_str))
        .collect();
    assert!(
        labels.iter().all(|l| !l.contains(&org.to_string())),
        "no ids in labels: {labels:?}"
    );

    let head = t.head().await as f64;
    assert_eq!(after.value("ledgerline_database_up", &[]), 1.0);
    assert_eq!(after.value("ledgerline_log_maintainer_halted", &[]), 0.0);
    assert_eq!(after.value("ledgerline_ledger_head_position", &[]), head);
    let caught_up = scrape_until(&t, "every projection at the head", |m| {
        ledgerline_projections::names().iter().all(|p| {
            m.projection("ledgerline_projection_position", p) == head
                && m.projection("ledgerline_projection_lag_events", p) == 0.0
        })
    })
    .await;
    for p in ledgerline_projections::names() {
        assert_eq!(
            caught_up.projection("ledgerline_projection_lag_seconds", p),
            0.0
        );
        assert_eq!(caught_up.projection("ledgerline_projection_failed", p), 0.0);
        assert_eq!(
            caught_up.get(
                "ledgerline_projection_failed_position",
                &[("projection", p)]
            ),
            None
        );
    }

    // The maintainer signs a checkpoint of the head within its one-second interval.
    let signed = scrape_until(&t, "a checkpoint of the head", |m| {
        m.get("ledgerline_checkpoint_size", &[]) == Some(head)
    })
    .await;
    let (size,): (i64,) = sqlx::query_as("SELECT max(tree_size) FROM checkpoints")
        .fetch_one(t.pool())
        .await
        .unwrap();
    assert_eq!(size as f64, head);
    let age = signed.value("ledgerline_checkpoint_age_seconds", &[]);
    assert!((0.0..60.0).contains(&age), "checkpoint age {age}");
    // A row as signed: nothing beside its note differs (tests/checkpoints.rs edits one).
    for column in ["tree_size", "root", "chain_head", "signed_at", "note"] {
        assert_eq!(
            signed.value("ledgerline_checkpoint_mismatch", &[("column", column)]),
            0.0,
            "{column}"
        );
    }
}

/// `/readyz` needs no key: when the database cannot answer it, the answer says so without
/// the cause, which can name hosts, databases, roles and tables (the server's log has it).
#[tokio::test]
async fn readyz_keeps_the_database_error_to_the_log() {
    let t = TestApp::spawn().await;
    sqlx::query("ALTER TABLE projection_failures RENAME TO projection_failures_away")
        .execute(t.pool())
        .await
        .unwrap();
    let r = t.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_error(&r, 503);
    assert_eq!(
        r.body["error"]["message"], "database not ready (the server's log says why)",
        "{}",
        r.body
    );
}

/// Invites a user into `org` whom the users read model refuses (a trigger): the `users`
/// projection stops on that event. Returns the invitation's answer.
async fn invite_refused_by_users(t: &TestApp, org: uuid::Uuid) -> common::Response {
    for statement in [
        "CREATE FUNCTION refuse_user() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'this read model refuses the user'; END $$",
        "CREATE TRIGGER refuse_user BEFORE INSERT ON users \
         FOR EACH ROW EXECUTE FUNCTION refuse_user()",
    ] {
        sqlx::query(statement).execute(t.pool()).await.unwrap();
    }
    t.post(
        &format!("/v1/organizations/{org}/users"),
        &t.admin_key,
        json!({"email": "ada@example.com", "full_name": "Ada"}),
    )
    .await
}

#[tokio::test]
async fn a_stopped_projection_shows_in_readyz_and_the_metrics() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Broken Co").await;
    let r = t.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let invited = invite_refused_by_users(&t, org).await;
    let (bad,): (i64,) =
        sqlx::query_as("SELECT max(position) FROM events WHERE event_type = 'UserInvited'")
            .fetch_one(t.pool())
            .await
            .unwrap_or_else(|e| panic!("the invitation is in the ledger ({e}): {}", invited.body));

    let mut ready = t.call(reqwest::Method::GET, "/readyz", None, None).await;
    for _ in 0..100 {
        if ready.status != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = t.call(reqwest::Method::GET, "/readyz", None, None).await;
    }
    assert_error(&ready, 503);
    let message = ready.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("users at position {bad} ")),
        "{message}"
    );
    // Not why: the answer needs no key, and an error can quote an event's fields.
    assert!(!message.contains("refuses the user"), "{message}");
    let status = ledgerline_projections::status(t.pool()).await.unwrap();
    let users = status.iter().find(|s| s.name == "users").unwrap();
    assert!(
        users.failures[0]
            .error
            .contains("this read model refuses the user"),
        "{:?}",
        users.failures
    );
    assert!(!message.contains("organizations"), "{message}");

    // Later events: the stopped projection falls behind, in events and in time.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    t.create_org("Later Co").await;
    let head = t.head().await;
    let m = scrape_until(&t, "the other projections at the head", |m| {
        m.projection("ledgerline_projection_lag_events", "organizations") == 0.0
    })
    .await;
    assert_eq!(m.value("ledgerline_ledger_head_position", &[]), head as f64);
    assert_eq!(m.projection("ledgerline_projection_failed", "users"), 1.0);
    assert_eq!(
        m.projection("ledgerline_projection_failed_position", "users"),
        bad as f64
    );
    assert_eq!(
        m.projection("ledgerline_projection_position", "users"),
        (bad - 1) as f64
    );
    assert_eq!(
        m.projection("ledgerline_projection_lag_events", "users"),
        (head - bad + 1) as f64
    );
    let lag = m.projection("ledgerline_projection_lag_seconds", "users");
    assert!((1.0..60.0).contains(&lag), "users lag {lag}s");
    // A stopped projection's lag grows with the wait, with no new event to show it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = scrape(&t)
        .await
        .projection("ledgerline_projection_lag_seconds", "users");
    assert!(later >= lag + 1.0, "users lag {lag}s, then {later}s");
    assert_eq!(
        m.projection("ledgerline_projection_failed", "organizations"),
        0.0
    );
    assert_eq!(
        m.projection("ledgerline_projection_lag_seconds", "organizations"),
        0.0
    );

    // Fixed and retried, it catches up and the service is ready again.
    sqlx::query("DROP TRIGGER refuse_user ON users")
        .execute(t.pool())
        .await
        .unwrap();
    assert_eq!(
        ledgerline_projections::retry(t.pool(), "users")
            .await
            .unwrap(),
        1
    );
    let m = scrape_until(&t, "users caught up after the retry", |m| {
        m.projection("ledgerline_projection_lag_events", "users") == 0.0
    })
    .await;
    assert_eq!(m.projection("ledgerline_projection_failed", "users"), 0.0);
    assert_eq!(
        m.projection("ledgerline_projection_lag_seconds", "users"),
        0.0
    );
    let r = t.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// `org`'s name in the `organizations` read model.
async fn org_name(t: &TestApp, org: uuid::Uuid) -> String {
    sqlx::query_scalar("SELECT name FROM organizations WHERE id = $1")
        .bind(org)
        .fetch_one(t.pool())
        .await
        .unwrap()
}

/// The app, whose projector counts a batch stalled after `stall_limit`.
async fn stalling_after(stall_limit: Duration) -> TestApp {
    TestApp::spawn_with(ledgerline_projections::Projector {
        stall_limit,
        ..ledgerline_projections::Projector::default()
    })
    .await
}

/// Renames `org` through the API, and checks the answer.
async fn rename(t: &TestApp, org: uuid::Uuid, name: &str) {
    let r = t
        .patch(
            &format!("/v1/organizations/{org}"),
            &t.admin_key,
            json!({ "name": name }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Whether, within 30 s, the `organizations` read model shows `org` named `name`.
async fn shows_name(t: &TestApp, org: uuid::Uuid, name: &str) -> bool {
    eventually(Duration::from_secs(30), || async {
        org_name(t, org).await == name
    })
    .await
}

/// The position of `org`'s event `sequence`.
async fn org_event(t: &TestApp, org: &str, sequence: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT position FROM events \
         WHERE aggregate_type = 'Organization' AND aggregate_id = $1 AND sequence = $2",
    )
    .bind(org)
    .bind(sequence)
    .fetch_one(t.pool())
    .await
    .unwrap()
}

/// A panic in a projection's code (a bug met only by some event; injected here) stops that
/// projection at the event, recorded as an event it cannot apply is, instead of ending its
/// task: the events before it in the same batch are applied, the other projections go on,
/// and once the code is fixed a retry goes on from there.
#[tokio::test]
async fn a_projection_whose_code_panics_stops_at_that_event_and_a_retry_resumes_it() {
    panicking_projection_stops_at_the_event(ledgerline_projections::fault::When::BeforeWriting)
        .await;
}

/// The same with the panic after the batch wrote its rows: what it wrote is rolled back,
/// both the batch of three and the panicking event's own batch, which wrote its name.
#[tokio::test]
async fn what_a_batch_wrote_before_it_panicked_is_rolled_back() {
    panicking_projection_stops_at_the_event(ledgerline_projections::fault::When::AfterWriting)
        .await;
}

async fn panicking_projection_stops_at_the_event(when: ledgerline_projections::fault::When) {
    use ledgerline_projections::{fault, Projection};
    let t = TestApp::spawn().await;
    let org = t.create_org("Panicky Co").await;
    let id = org.to_string();
    // The three updates queue behind a stop, so that one batch takes them all.
    t.stop_projection("organizations").await;
    fault::arm(Projection::Organizations, &id, 3, when);
    for name in ["First", "Second", "Third"] {
        rename(&t, org, name).await;
    }
    let (first, panics) = (org_event(&t, &id, 2).await, org_event(&t, &id, 3).await);
    t.resume_projection("organizations").await;
    let stopped = || async {
        let status = ledgerline_projections::status(t.pool()).await.unwrap();
        let s = status.iter().find(|s| s.name == "organizations").unwrap();
        (
            s.checkpoint,
            s.failures.first().map(|f| (f.position, f.error.clone())),
        )
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            stopped().await.1.is_some()
        })
        .await,
        "the panic is recorded as the projection's failure"
    );
    let (checkpoint, failure) = stopped().await;
    let (position, error) = failure.unwrap();
    assert_eq!((checkpoint, position), (first, panics), "{error}");
    assert!(
        error.contains("panicked") && error.contains("fault injected into organizations"),
        "{error}"
    );
    let name = || org_name(&t, org);
    assert_eq!(name().await, "First", "the event before it in its batch");
    let ready = t.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_error(&ready, 503);
    let message = ready.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("organizations at position {panics} ")),
        "{message}"
    );
    let head = t.head().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            let status = ledgerline_projections::status(t.pool()).await.unwrap();
            status
                .iter()
                .find(|s| s.name == "audit_events")
                .unwrap()
                .position
                == head
        })
        .await,
        "the other projections go on"
    );

    // The bug fixed and the projection retried: its task is still there to take it up.
    fault::disarm(Projection::Organizations, &id, 3);
    t.resume_projection("organizations").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            name().await == "Third"
        })
        .await,
        "the projection resumes at the event"
    );
    assert_eq!(stopped().await.1, None);
}

/// A live batch that never ends (a rebuild's `COPY` twice stayed half-sent with every task
/// parked) holds its projection's checkpoint row, and with it every command waiting for the
/// projection: after the projector's stall limit its session (busy in a statement, as the
/// injected hang keeps it) is ended and its task dropped, the batch is counted as one that
/// failed for the moment, and the next one applies the event.
#[tokio::test]
async fn a_live_batch_that_stalls_is_ended_and_tried_again() {
    use ledgerline_projections::{fault, Projection};
    let t = stalling_after(Duration::from_secs(1)).await;
    let org = t.create_org("Stuck Co").await;
    let id = org.to_string();
    let errors =
        |m: &Metrics| m.projection("ledgerline_projection_batch_errors_total", "organizations");
    let before = errors(&scrape(&t).await);
    // Its first update.
    fault::arm(Projection::Organizations, &id, 2, fault::When::HangOnce);
    rename(&t, org, "Unstuck").await;
    assert!(
        shows_name(&t, org, "Unstuck").await,
        "the next batch applies the update"
    );
    assert!(
        !fault::armed(Projection::Organizations, &id, 2),
        "a batch met the hang"
    );
    scrape_until(&t, "the stalled batch counted", |m| errors(m) > before).await;
}

/// A stalled live batch is ended even when the pool has no connection free: the watch ends
/// its session on a connection of its own, not once the pool's acquire timeout (30 s here)
/// gives it one.
#[tokio::test]
async fn a_live_batch_that_stalls_is_ended_with_no_pooled_connection_free() {
    use ledgerline_projections::{fault, Projection};
    use sqlx::Connection;
    let t = stalling_after(Duration::from_secs(3)).await;
    let org = t.create_org("Crowded Co").await;
    let id = org.to_string();
    fault::arm(Projection::Organizations, &id, 2, fault::When::HangOnce);
    let mut observer = sqlx::PgConnection::connect(&t.db.url).await.unwrap();
    // The sessions asleep in the hung batch, counted outside the pool.
    let mut sleeping = async || -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND state = 'active' AND query = 'SELECT pg_sleep(3600)'",
        )
        .fetch_one(&mut observer)
        .await
        .unwrap()
    };
    let update = rename(&t, org, "Uncrowded");
    let crowd = async {
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while sleeping().await == 0 {
            assert!(std::time::Instant::now() < until, "the batch never hung");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let hung = std::time::Instant::now();
        // Every connection the pool has or may open, held.
        let mut held = Vec::new();
        while let Ok(Ok(conn)) =
            tokio::time::timeout(Duration::from_millis(300), t.pool().acquire()).await
        {
            held.push(conn);
        }
        while sleeping().await > 0 {
            assert!(
                hung.elapsed() < Duration::from_secs(15),
                "the stalled batch's session still runs {:?} after it hung, with {} \
                 pooled connections held",
                hung.elapsed(),
                held.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(held);
    };
    tokio::join!(update, crowd);
    assert!(
        shows_name(&t, org, "Uncrowded").await,
        "the next batch applies the update"
    );
}

/// A live batch that stalls before its session is known, waiting in its opening statement
/// for a checkpoint row held elsewhere (a swap's, here the test's): its wait ends on the
/// server at the stall limit, so no session of the projector waits on the row much longer,
/// however long the row is held (before, each stalled batch left its pooled connection
/// waiting until the row was free, and the next one joined it). Then the events apply.
#[tokio::test]
async fn a_live_batch_stalled_on_a_held_checkpoint_frees_its_session() {
    let t = stalling_after(Duration::from_secs(1)).await;
    let org = t.create_org("Held Co").await;
    let held = common::hold_checkpoint(t.pool(), "organizations").await;
    rename(&t, org, "Released").await;
    // The longest wait of the sessions waiting for a lock on the checkpoints, sampled while
    // the row stays held (the command above already waited for the read models, up to 5 s).
    let mut longest = 0.0f64;
    let mut waiters = 0i64;
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        let (count, age): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), max(extract(epoch FROM clock_timestamp() - query_start))::float8 \
             FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE '%projection_checkpoints%'",
        )
        .fetch_one(t.pool())
        .await
        .unwrap();
        waiters = waiters.max(count);
        longest = longest.max(age.unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(waiters >= 1, "a batch came to the held row");
    assert!(
        longest < 3.0,
        "a batch waited {longest:.1} s for the held row, its limit being 1 s"
    );
    held.rollback().await.unwrap();
    assert!(
        shows_name(&t, org, "Released").await,
        "the next batch applies the update"
    );
}

/// A stall limit past the longest lock timeout PostgreSQL takes (about 24.8 days) bounds a
/// batch's lock waits by that instead: refused, the `SET` would leave every batch failing on
/// a connection left inside an aborted transaction.
#[tokio::test]
async fn a_stall_limit_longer_than_any_lock_timeout_still_applies_events() {
    let t = stalling_after(Duration::from_secs(3_000_000)).await;
    let org = t.create_org("Patient Co").await;
    rename(&t, org, "Still Patient").await;
    assert!(
        shows_name(&t, org, "Still Patient").await,
        "the projector applies the update"
    );
}

/// The same at the very first event of the log, just after a reset: the projection has no
/// checkpoint row yet (the panicking batch's was rolled back).
#[tokio::test]
async fn a_projection_that_panics_at_its_first_event_after_a_reset_stops_there() {
    use ledgerline_projections::{fault, Projection};
    let t = TestApp::spawn().await;
    // The bootstrap key's issue: its id is random, so no other test's event is armed.
    let first = common::event_at(t.pool(), 1).await;
    assert_eq!(first.aggregate_type, "ApiKey");
    fault::panic_on(Projection::AuditEvents, &first.aggregate_id, first.sequence);
    ledgerline_projections::reset(t.pool(), Some(&["audit_events"]))
        .await
        .unwrap();
    let audit = || async {
        let status = ledgerline_projections::status(t.pool()).await.unwrap();
        let s = status.iter().find(|s| s.name == "audit_events").unwrap();
        (s.checkpoint, s.failures.first().map(|f| f.position))
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            audit().await.1.is_some()
        })
        .await,
        "the panic is recorded"
    );
    assert_eq!(audit().await, (0, Some(1)));
    fault::disarm(Projection::AuditEvents, &first.aggregate_id, first.sequence);
    t.resume_projection("audit_events").await;
    let head = t.head().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            audit().await == (head, None)
        })
        .await,
        "caught up once retried"
    );
}

/// A batch that fails for a reason that says nothing about its event (here the disk is
/// full, as a trigger claims) is retried, not recorded as the projection's failure: it
/// shows as a counter and as lag while it lasts, and the projection goes on once it ends.
#[tokio::test]
async fn a_batch_that_fails_for_a_passing_reason_is_counted_and_retried() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Full Disk Co").await;
    let errors = |m: &Metrics| m.projection("ledgerline_projection_batch_errors_total", "users");
    let before = errors(&scrape(&t).await);
    for statement in [
        "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'no space left' USING ERRCODE = 'disk_full'; END $$",
        "CREATE TRIGGER disk_full BEFORE INSERT ON users \
         FOR EACH ROW EXECUTE FUNCTION disk_full()",
    ] {
        sqlx::query(statement).execute(t.pool()).await.unwrap();
    }
    // Its answer waits for the users read model in vain (and then finds no such user):
    // what matters here is that the invitation is in the ledger.
    let head = t.head().await;
    let users = format!("/v1/organizations/{org}/users");
    let invite = t.post(
        &users,
        &t.admin_key,
        json!({"email": "ada@example.com", "full_name": "Ada"}),
    );
    let (_, m) = tokio::join!(invite, async {
        assert!(eventually(Duration::from_secs(30), || async { t.head().await > head }).await);
        // The poll retries it every second: at least two failed batches.
        scrape_until(&t, "the users batch failing twice", |m| {
            errors(m) >= before + 2.0
        })
        .await
    });
    assert!(m.projection("ledgerline_projection_lag_events", "users") >= 1.0);
    assert_eq!(m.projection("ledgerline_projection_failed", "users"), 0.0);
    let r = t.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, 200, "not a failure of the event: {}", r.body);

    sqlx::query("DROP TRIGGER disk_full ON users")
        .execute(t.pool())
        .await
        .unwrap();
    scrape_until(&t, "users caught up once the disk has room", |m| {
        m.projection("ledgerline_projection_lag_events", "users") == 0.0
    })
    .await;
    let (users,): (i64,) = sqlx::query_as("SELECT count(*) FROM users WHERE organization_id = $1")
        .bind(org)
        .fetch_one(t.pool())
        .await
        .unwrap();
    assert_eq!(users, 1);
}

#[tokio::test]
async fn an_unfinished_rebuild_shows_its_progress_its_age_and_that_nothing_runs_it() {
    let t = TestApp::spawn().await;
    let none = scrape(&t).await;
    assert!(
        none.0
            .iter()
            .all(|s| !s.name.starts_with("ledgerline_rebuild_")),
        "no samples without an unfinished job"
    );

    // A job as `ledgerline projections rebuild` records it, part way through, and as a run
    // killed ten minutes ago leaves it: nobody holds the rebuild lock.
    let head = t.head().await;
    let job: i64 = sqlx::query_scalar(
        "INSERT INTO projection_rebuilds (projections, shadow_schema, target_position) \
         VALUES ('{roles,users}', 'ledgerline_rebuild_metrics_test', $1) RETURNING id",
    )
    .bind(head)
    .fetch_one(t.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO projection_rebuild_progress (rebuild_id, name, position, updated_at) \
         VALUES ($1, 'roles', 2, now()), ($1, 'users', 1, now() - interval '10 minutes')",
    )
    .bind(job)
    .execute(t.pool())
    .await
    .unwrap();

    let m = scrape(&t).await;
    let job = job.to_string();
    for (projection, position) in [("roles", 2.0), ("users", 1.0)] {
        let labels = [("job", job.as_str()), ("projection", projection)];
        assert_eq!(m.value("ledgerline_rebuild_position", &labels), position);
        assert_eq!(m.value("ledgerline_rebuild_target", &labels), head as f64);
    }
    let age = |projection| {
        m.value(
            "ledgerline_rebuild_progress_age_seconds",
            &[("job", job.as_str()), ("projection", projection)],
        )
    };
    assert!((600.0..660.0).contains(&age("users")), "{}", age("users"));
    assert!((0.0..60.0).contains(&age("roles")), "{}", age("roles"));
    assert_eq!(
        m.value("ledgerline_rebuild_lock_held", &[("job", job.as_str())]),
        0.0
    );
    let labels = [("job", job.as_str()), ("projection", "organizations")];
    assert_eq!(m.get("ledgerline_rebuild_position", &labels), None);

    sqlx::query("UPDATE projection_rebuilds SET status = 'swapped', finished_at = now()")
        .execute(t.pool())
        .await
        .unwrap();
    let done = scrape(&t).await;
    assert!(
        done.0
            .iter()
            .all(|s| !s.name.starts_with("ledgerline_rebuild_")),
        "a finished job is no longer shown"
    );
}

/// A real run, kept alive at its swap by a held checkpoint row, shows the lock held; killed
/// with SIGKILL, its job stays but the lock is gone.
#[tokio::test]
async fn a_rebuild_at_work_holds_its_lock_and_a_killed_one_does_not() {
    let t = TestApp::spawn_without_polls().await;
    let held = common::hold_checkpoint(t.pool(), "users").await;
    let log = std::env::temp_dir().join(format!("ll-rebuild-{}.log", uuid::Uuid::new_v4()));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ledgerline"))
        .args(["projections", "rebuild", "users"])
        .env("LEDGERLINE_DATABASE_URL", &t.db.url)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("run ledgerline");
    let at_swap = common::at_the_swap(t.pool()).await;
    let sessions: Vec<String> = sqlx::query_scalar(
        "SELECT concat_ws(' | ', application_name, state, wait_event_type, left(query, 100)) \
         FROM pg_stat_activity WHERE datname = current_database()",
    )
    .fetch_all(t.pool())
    .await
    .unwrap();
    assert!(
        at_swap,
        "the rebuild waits at its swap; it exited: {:?}; its log: {}; sessions: {sessions:?}",
        child.try_wait(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let _ = std::fs::remove_file(&log);
    let job: i64 =
        sqlx::query_scalar("SELECT id FROM projection_rebuilds WHERE status = 'running'")
            .fetch_one(t.pool())
            .await
            .unwrap();
    let job = job.to_string();
    let held_metric =
        |m: &Metrics| m.value("ledgerline_rebuild_lock_held", &[("job", job.as_str())]);
    assert_eq!(held_metric(&scrape(&t).await), 1.0);

    child.kill().await.unwrap(); // SIGKILL
    let m = scrape_until(&t, "the killed run's lock freed", |m| held_metric(m) == 0.0).await;
    let labels = [("job", job.as_str()), ("projection", "users")];
    assert_eq!(
        m.value("ledgerline_rebuild_position", &labels),
        m.value("ledgerline_rebuild_target", &labels),
        "the killed job had caught up and stays recorded"
    );
    held.rollback().await.unwrap();
    ledgerline_projections::abandon_rebuild(t.pool())
        .await
        .unwrap();
}

/// A projection stopped on a failure is not waited for, and the others still are: a
/// command whose effect they show answers with it (201 and the view, the `behind` header
/// saying one read model is), not a 202 at once as if none had shown it.
#[tokio::test]
async fn a_stopped_projection_leaves_the_others_read_your_writes() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Half Broken").await;
    let invited = invite_refused_by_users(&t, org).await;
    assert_eq!(invited.status, 202, "{}", invited.body);
    assert!(
        eventually(Duration::from_secs(10), || async {
            t.call(reqwest::Method::GET, "/readyz", None, None)
                .await
                .status
                == 503
        })
        .await,
        "users stopped"
    );

    // `roles` (after `users` in the projections' order) is held up a moment: a command
    // that did not wait for it once `users` was found stopped would answer before it shows
    // the new role.
    for round in 0..3 {
        let mut hold = t.pool().begin().await.unwrap();
        sqlx::query("LOCK TABLE roles IN SHARE MODE")
            .execute(&mut *hold)
            .await
            .unwrap();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            hold.rollback().await.unwrap();
        });
        let name = format!("healthy {round}");
        let r = t
            .post(
                &format!("/v1/organizations/{org}/roles"),
                &t.admin_key,
                json!({"name": name, "permissions": ["users:read"]}),
            )
            .await;
        release.await.unwrap();
        assert_eq!(r.status, 201, "round {round}: {}", r.body);
        assert_eq!(r.body["name"], json!(name));
        assert_eq!(
            r.headers
                .get("ledgerline-read-models")
                .and_then(|v| v.to_str().ok()),
            Some("behind"),
            "users is behind, and the answer says so"
        );
    }
}
