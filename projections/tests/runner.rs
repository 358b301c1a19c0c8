//! The runner's guarantees: a failing event stops its projection there (recorded, never
//! skipped), retry resumes at it, reset + catch_up rebuilds the same read models, concurrent
//! runners apply each event once, and the background projector serves read-your-writes.

mod common;

use std::time::{Duration, Instant};

use common::{checkpoint, populate, rows, run_to_head, sealed, snapshot, Actor, Ledger, TestDb};
use ledgerline_aggregates::organization::{OrganizationEvent, OrganizationProfile};
use ledgerline_aggregates::user::UserEvent;
use ledgerline_projections::{
    bulk_fallbacks, catch_up, reset, retry, run_batch, run_leased_batch, status, BatchOutcome,
    Projection, Projector, RunError,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

fn invite(user: Uuid, org: Uuid) -> UserEvent {
    UserEvent::UserInvited {
        user_id: user,
        organization_id: org,
        email: sealed(user, "ZQ"),
        full_name: sealed(user, "bg"),
        email_blind_index: format!("bi-{user}"),
    }
}

/// Appends `n` invitations of new users to `org`; the last one's position.
async fn invite_users(ledger: &mut Ledger, org: Uuid, actor: &Actor, n: usize) -> i64 {
    let mut last = ledger.head();
    for _ in 0..n {
        let user = Uuid::new_v4();
        last = ledger.append("User", user, &invite(user, org), actor).await;
    }
    last
}

async fn user_ids(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM users ORDER BY created_at")
        .fetch_all(pool)
        .await
        .unwrap()
}

fn failed_at(result: Result<(), RunError>) -> (&'static str, i64) {
    match result {
        Err(RunError::Failed { name, position, .. }) => (name, position),
        other => panic!("expected a stopped projection, got {other:?}"),
    }
}

#[tokio::test]
async fn a_malformed_event_stops_its_projections_there_and_is_never_skipped() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let (org, first, later) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let actor = Actor::api(org, None, Uuid::new_v4());
    ledger
        .append("User", first, &invite(first, org), &actor)
        .await;
    let bad = ledger
        .append_raw(
            "User",
            &Uuid::new_v4().to_string(),
            "UserInvited",
            "1",
            r#"{"UserInvited":{"user_id":"nope"}}"#,
            &actor,
        )
        .await;
    ledger
        .append("User", later, &invite(later, org), &actor)
        .await;
    let created = OrganizationEvent::OrganizationCreated {
        organization_id: org,
        profile: OrganizationProfile {
            name: "Acme".into(),
            slug: "acme".into(),
            country_code: None,
            domain: None,
            settings: common::empty_settings(),
        },
    };
    ledger.append("Organization", org, &created, &actor).await;
    let head = ledger.head();

    assert_eq!(failed_at(catch_up(&db.pool).await), ("users", bad));
    assert_eq!(
        user_ids(&db.pool).await,
        vec![first],
        "the event before it is applied"
    );
    assert_eq!(checkpoint(&db.pool, "users").await, bad - 1);
    // user_roles reads User events too and stops at the same place; the others go on.
    assert_eq!(checkpoint(&db.pool, "user_roles").await, bad - 1);
    assert_eq!(checkpoint(&db.pool, "audit_events").await, head);
    assert_eq!(checkpoint(&db.pool, "organizations").await, head);

    let statuses = status(&db.pool).await.unwrap();
    let users = statuses.iter().find(|s| s.name == "users").unwrap();
    assert_eq!(
        (users.position, users.head, users.lag),
        (bad - 1, head, head - bad + 1)
    );
    assert_eq!(users.failures.len(), 1);
    assert_eq!(users.failures[0].position, bad);
    assert!(
        users.failures[0].error.contains("UserInvited"),
        "{}",
        users.failures[0].error
    );
    let audit = statuses.iter().find(|s| s.name == "audit_events").unwrap();
    assert_eq!((audit.lag, audit.failures.len()), (0, 0));

    // Running again does not move past it.
    let outcome = run_batch(&db.pool, Projection::Users, 100).await.unwrap();
    match outcome {
        BatchOutcome::Failed {
            checkpoint,
            failure,
        } => {
            assert_eq!((checkpoint, failure.position), (bad - 1, bad));
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(
        user_ids(&db.pool).await,
        vec![first],
        "later events are not applied"
    );

    // Retry clears the failure, tries the event again, and stops there again.
    assert_eq!(retry(&db.pool, "users").await.unwrap(), 1);
    assert_eq!(failed_at(catch_up(&db.pool).await), ("users", bad));
    assert_eq!(user_ids(&db.pool).await, vec![first]);
    let failures: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_failures")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(failures, 2, "users and user_roles, once each");
    assert!(matches!(
        retry(&db.pool, "nope").await,
        Err(RunError::UnknownProjection(_))
    ));
}

#[tokio::test]
async fn unknown_event_types_and_versions_of_a_known_aggregate_are_errors() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let org = Uuid::new_v4();
    let actor = Actor::api(org, None, Uuid::new_v4());
    let merged = ledger
        .append_raw(
            "Organization",
            &org.to_string(),
            "OrganizationMerged",
            "1",
            r#"{"OrganizationMerged":{}}"#,
            &actor,
        )
        .await;
    assert_eq!(
        failed_at(catch_up(&db.pool).await),
        ("organizations", merged)
    );

    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let v2 = ledger
        .append_raw(
            "Organization",
            &org.to_string(),
            "OrganizationReactivated",
            "2",
            r#"{"OrganizationReactivated":{}}"#,
            &actor,
        )
        .await;
    assert_eq!(failed_at(catch_up(&db.pool).await), ("organizations", v2));
    let error: String = sqlx::query_scalar("SELECT error FROM projection_failures")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(error.contains("unsupported version 2"), "{error}");

    // A payload of another type than its event_type column says is refused too.
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let lying = ledger
        .append_raw(
            "Organization",
            &org.to_string(),
            "OrganizationSuspended",
            "1",
            r#"{"OrganizationReactivated":{}}"#,
            &actor,
        )
        .await;
    assert_eq!(
        failed_at(catch_up(&db.pool).await),
        ("organizations", lying)
    );
}

#[tokio::test]
async fn retry_resumes_at_the_failed_event_once_its_cause_is_fixed() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let org = Uuid::new_v4();
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    // A fault outside the event (here a trigger, in life a bad migration, say; a full disk is
    // retried instead, see tests/metrics.rs)
    // makes the read model refuse the second invitation.
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.id = '{}' THEN RAISE EXCEPTION 'read model refuses'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION refuse();",
        users[1]
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let actor = Actor::api(org, None, Uuid::new_v4());
    for user in &users {
        ledger
            .append("User", *user, &invite(*user, org), &actor)
            .await;
    }
    assert_eq!(failed_at(catch_up(&db.pool).await), ("users", 2));
    assert_eq!(user_ids(&db.pool).await, users[..1]);

    sqlx::raw_sql("DROP TRIGGER refuse ON users")
        .execute(&db.pool)
        .await
        .unwrap();
    // Fixing the cause is not enough: an operator decides to retry.
    assert_eq!(failed_at(catch_up(&db.pool).await), ("users", 2));
    assert_eq!(retry(&db.pool, "users").await.unwrap(), 1);
    catch_up(&db.pool).await.unwrap();
    assert_eq!(user_ids(&db.pool).await, users);
    let users_status = status(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == "users")
        .unwrap();
    assert_eq!((users_status.position, users_status.lag), (3, 0));
    assert!(users_status.failures.is_empty());
}

#[tokio::test]
async fn reset_and_catch_up_rebuild_identical_read_models() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let story = populate(&mut ledger).await;
    sqlx::query("INSERT INTO subject_keys (subject_id, wrapped_key) VALUES ($1, $2)")
        .bind(story.alice)
        .bind(vec![1u8; 48])
        .execute(&db.pool)
        .await
        .unwrap();
    // Small batches, so that the rebuild crosses batch boundaries.
    for projection in Projection::ALL {
        while let BatchOutcome::Applied { applied: 1.., .. } =
            run_batch(&db.pool, projection, 3).await.unwrap()
        {}
    }
    let before = snapshot(&db.pool).await;
    assert!(
        before.iter().all(|(_, rows)| !rows.is_empty()),
        "the story fills every table"
    );

    reset(&db.pool, Some(&["roles"])).await.unwrap();
    assert!(
        rows(&db.pool, "roles").await.is_empty()
            && rows(&db.pool, "role_permissions").await.is_empty()
    );
    assert_eq!(
        rows(&db.pool, "users").await,
        before[1].1,
        "other projections untouched"
    );
    assert_eq!(checkpoint(&db.pool, "roles").await, 0);
    catch_up(&db.pool).await.unwrap();
    assert_eq!(snapshot(&db.pool).await, before);

    reset(&db.pool, None).await.unwrap();
    for (table, rows) in snapshot(&db.pool).await {
        assert!(rows.is_empty(), "{table} is empty after reset");
    }
    let permissions: i64 = sqlx::query_scalar("SELECT count(*) FROM permissions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        permissions,
        ledgerline_aggregates::Permission::ALL.len() as i64,
        "reference data stays"
    );
    catch_up(&db.pool).await.unwrap();
    assert_eq!(snapshot(&db.pool).await, before);
    let keys: Vec<Uuid> = sqlx::query_scalar("SELECT subject_id FROM subject_keys")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(keys, vec![story.alice], "reset does not touch subject keys");

    assert!(matches!(
        reset(&db.pool, Some(&["nope"])).await,
        Err(RunError::UnknownProjection(_))
    ));
}

#[tokio::test]
async fn concurrent_runners_apply_each_event_once() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let org = Uuid::new_v4();
    let actor = Actor::api(org, None, Uuid::new_v4());
    invite_users(&mut ledger, org, &actor, 200).await;
    let mut runners = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let pool = db.pool.clone();
        runners.spawn(async move {
            for projection in [Projection::Users, Projection::AuditEvents] {
                while let BatchOutcome::Applied { applied: 1.., .. } =
                    run_batch(&pool, projection, 7).await.unwrap()
                {}
            }
        });
    }
    while let Some(done) = runners.join_next().await {
        done.unwrap();
    }
    // A double application would have hit the users primary key and been recorded.
    let failures: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_failures")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(failures, 0);
    assert_eq!(user_ids(&db.pool).await.len(), 200);
    assert_eq!(rows(&db.pool, "audit_events").await.len(), 200);
    assert_eq!(checkpoint(&db.pool, "users").await, 200);
}

#[tokio::test]
async fn the_projector_follows_the_head_and_reports_stopped_projections() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let (head_tx, head_rx) = tokio::sync::watch::channel(0i64);
    let projector = Projector::spawn(db.pool.clone(), head_rx);
    let org = Uuid::new_v4();
    let actor = Actor::api(org, None, Uuid::new_v4());

    let user = Uuid::new_v4();
    let position = ledger
        .append("User", user, &invite(user, org), &actor)
        .await;
    head_tx.send_replace(position);
    assert!(projector.wait_for(position, Duration::from_secs(10)).await);
    assert_eq!(user_ids(&db.pool).await, vec![user], "read your writes");

    // Written by "another process": no head notification, found by polling.
    let other = Uuid::new_v4();
    let position = ledger
        .append("User", other, &invite(other, org), &actor)
        .await;
    assert!(projector.wait_for(position, Duration::from_secs(10)).await);
    assert!(projector
        .checkpoints()
        .iter()
        .all(|(_, cp)| *cp == position));

    let bad = ledger
        .append_raw(
            "User",
            &Uuid::new_v4().to_string(),
            "UserErased",
            "1",
            r#"{"UserErased":{}}"#,
            &actor,
        )
        .await;
    head_tx.send_replace(bad);
    let started = Instant::now();
    assert!(!projector.wait_for(bad, Duration::from_secs(30)).await);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a stopped projection is reported, not waited out"
    );
    assert!(projector.wait_for(bad - 1, Duration::from_secs(1)).await);
    // The other projections go on past the bad event, each at its own pace: wait for them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut checkpoints = projector.checkpoints();
    while !checkpoints.contains(&("audit_events", bad)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        checkpoints = projector.checkpoints();
    }
    assert!(
        checkpoints.contains(&("users", bad - 1)) && checkpoints.contains(&("audit_events", bad)),
        "{checkpoints:?}"
    );

    let stopped = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), projector.shutdown())
        .await
        .unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(5));
}

fn created(org: Uuid) -> OrganizationEvent {
    OrganizationEvent::OrganizationCreated {
        organization_id: org,
        profile: OrganizationProfile {
            name: format!("Org {org}"),
            slug: format!("org-{org}"),
            country_code: None,
            domain: None,
            settings: common::empty_settings(),
        },
    }
}

/// A projector that polls every 10 minutes, so a wait that depended on the poll would time
/// out, after it has applied one organization's creation (`first`). It renews its leases
/// every third of `lease_ttl`, which also wakes a projection behind the events it reads.
struct SlowPoll {
    slow_poll: Projector,
    head_tx: tokio::sync::watch::Sender<i64>,
    runs: ledgerline_projections::ProjectorHandle,
    org: Uuid,
    actor: Actor,
    first: i64,
}

impl SlowPoll {
    async fn start(db: &TestDb, ledger: &mut Ledger, lease_ttl: Duration) -> SlowPoll {
        let slow_poll = Projector {
            poll_interval: Duration::from_secs(600),
            lease_ttl,
            ..Projector::default()
        };
        let (head_tx, head_rx) = tokio::sync::watch::channel(0i64);
        let runs = slow_poll.start(db.pool.clone(), head_rx);
        let org = Uuid::new_v4();
        let actor = Actor::api(org, None, Uuid::new_v4());
        let first = ledger
            .append("Organization", org, &created(org), &actor)
            .await;
        head_tx.send_replace(first);
        assert!(runs.wait_for(first, Duration::from_secs(30)).await);
        SlowPoll {
            slow_poll,
            head_tx,
            runs,
            org,
            actor,
            first,
        }
    }
}

impl SlowPoll {
    /// Suspends the organization (an event `organizations` reads) and tells the projector.
    async fn suspend(&self, ledger: &mut Ledger) -> i64 {
        let suspended = ledger
            .append(
                "Organization",
                self.org,
                &OrganizationEvent::OrganizationSuspended { reason: None },
                &self.actor,
            )
            .await;
        self.head_tx.send_replace(suspended);
        suspended
    }

    /// Whether the handle counts `organizations` as behind the organization's creation.
    fn organizations_behind(&self) -> bool {
        self.runs
            .checkpoints()
            .into_iter()
            .any(|(name, reach)| name == "organizations" && reach < self.first)
    }

    /// Waits up to 30 s until the handle has heard of a reset of `organizations`.
    async fn reset_heard(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.organizations_behind() {
            assert!(Instant::now() < deadline, "the reset is heard of");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits up to 30 s until `n` connections on this database have run LISTEN.
async fn listening(pool: &PgPool, n: i64) -> bool {
    for _ in 0..300 {
        let (found,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if found == n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A projection that none of the new events concern runs no batch for them: waiting for
/// their position returns without its checkpoint row moving, in the process that runs it
/// and in one that follows it; the row catches up at shutdown. With a 10-minute poll, a
/// wait that depended on the poll would time out.
#[tokio::test]
async fn projections_pass_over_events_they_do_not_read_without_a_transaction() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let SlowPoll {
        slow_poll,
        head_tx,
        runs,
        org,
        actor,
        first,
    } = SlowPoll::start(&db, &mut ledger, Projector::default().lease_ttl).await;
    assert_eq!(checkpoint(&db.pool, "organizations").await, first);

    // A second process: it holds no lease, so it follows the first one's progress.
    let (follower_head_tx, follower_head_rx) = tokio::sync::watch::channel(first);
    let follows = slow_poll.start(db.pool.clone(), follower_head_rx);
    assert!(follows.wait_for(first, Duration::from_secs(30)).await);
    // A listener that (re)subscribes makes the projections it holds run a batch (a
    // notification may have been lost), which rightly moves their checkpoints; let both
    // processes' first subscriptions and those batches be over before the events come.
    assert!(listening(&db.pool, 2).await, "both processes listen");
    // Nothing shows those batches over; a moment well past their usual length makes that
    // likely.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let idle = ["organizations", "roles", "api_keys", "messaging"];
    let mut before = Vec::new();
    for name in idle {
        before.push(checkpoint(&db.pool, name).await);
    }
    let last = invite_users(&mut ledger, org, &actor, 5).await;
    head_tx.send_replace(last);
    follower_head_tx.send_replace(last);
    assert!(runs.wait_for(last, Duration::from_secs(30)).await);
    assert!(follows.wait_for(last, Duration::from_secs(30)).await);
    assert_eq!(user_ids(&db.pool).await.len(), 5);
    assert_eq!(checkpoint(&db.pool, "users").await, last);
    assert_eq!(checkpoint(&db.pool, "audit_events").await, last);
    for (name, before) in idle.into_iter().zip(&before) {
        assert_eq!(
            checkpoint(&db.pool, name).await,
            *before,
            "{name} ran no batch"
        );
    }
    assert!(runs.checkpoints().iter().all(|(_, p)| *p == last));
    assert!(follows.checkpoints().iter().all(|(_, p)| *p == last));
    // `status` counts them as reached too, and shows the recorded checkpoint beside it.
    for s in status(&db.pool).await.unwrap() {
        assert_eq!((s.position, s.lag), (last, 0), "{}", s.name);
        if let Some(i) = idle.iter().position(|n| *n == s.name) {
            assert_eq!(s.checkpoint, before[i], "{}", s.name);
        }
    }

    // An event one of them reads is applied as usual.
    let org2 = Uuid::new_v4();
    let third = ledger
        .append("Organization", org2, &created(org2), &actor)
        .await;
    head_tx.send_replace(third);
    follower_head_tx.send_replace(third);
    assert!(follows.wait_for(third, Duration::from_secs(30)).await);
    assert_eq!(checkpoint(&db.pool, "organizations").await, third);
    assert!(checkpoint(&db.pool, "roles").await <= first);

    follows.shutdown().await;
    runs.shutdown().await;
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, position FROM projection_checkpoints ORDER BY name")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 7);
    assert!(
        rows.iter().all(|(_, p)| *p == third),
        "written at shutdown: {rows:?}"
    );
}

/// A projection reset while the projector runs starts over: waiting for a later position
/// (past an event it does not read) waits for it to apply its own events again, and does
/// not count it as caught up from the checkpoint it had before the reset.
///
/// The process learns of the reset from its notification, which may arrive after this
/// test's next commit is known (own commits move the head directly): the test waits for
/// the handle to have taken the reset first, as `ProjectorHandle::wait_for` documents.
#[tokio::test]
async fn a_reset_projection_is_waited_for_until_it_has_applied_its_events_again() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let SlowPoll {
        head_tx,
        runs,
        org,
        actor,
        first,
        ..
    } = SlowPoll::start(&db, &mut ledger, Duration::from_secs(1800)).await;

    // A notification sent before the listener subscribed is lost (its resubscription then
    // runs a batch instead, from the database's checkpoint).
    assert!(listening(&db.pool, 1).await, "the projector listens");
    // That batch may open after the reset and apply the organization again at once, and the
    // handle then never shows it behind (seen in CI): then reset again. With a 10-minute
    // poll and a 10-minute renewal nothing else runs the projection before the next head.
    let mut heard = false;
    for _ in 0..10 {
        reset(&db.pool, Some(&["organizations"])).await.unwrap();
        for _ in 0..30 {
            let behind = runs
                .checkpoints()
                .into_iter()
                .any(|(name, reach)| name == "organizations" && reach < first);
            if behind {
                heard = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if heard {
            break;
        }
    }
    assert!(heard, "the reset's notification reached the handle");
    let user = Uuid::new_v4();
    let later = ledger
        .append("User", user, &invite(user, org), &actor)
        .await;
    head_tx.send_replace(later);
    assert!(runs.wait_for(later, Duration::from_secs(30)).await);
    let orgs: i64 = sqlx::query_scalar("SELECT count(*) FROM organizations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        orgs, 1,
        "the organization is there again when the wait ends"
    );
    runs.shutdown().await;
}

/// A batch that committed just before a reset, reported by its task only after the
/// reset's notification was taken (a busy process comes back to a task late), does not undo
/// the reset: the projection counts as behind until it has applied its events again.
#[tokio::test]
async fn a_batch_reported_after_a_reset_it_preceded_does_not_undo_it() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    // Nothing but the next head wakes it: no poll, no lease renewal during the test.
    let slow = SlowPoll::start(&db, &mut ledger, Duration::from_secs(1800)).await;
    let runs = &slow.runs;
    assert!(listening(&db.pool, 1).await, "the projector listens");
    // Its first subscription wakes each projection for a batch (a notification may have been
    // lost): let that be over before the reset, or on a busy machine it comes after and
    // applies the organization again (seen once in a full run). Nothing shows that batch
    // over; a moment well past its usual length makes that likely.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let holder: String =
        sqlx::query_scalar("SELECT holder FROM leases WHERE name = 'projection:organizations'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let report =
        ledgerline_projections::fault::pause_next_report(Projection::Organizations, &holder);
    let suspended = slow.suspend(&mut ledger).await;
    // The batch commits; its report waits for `report`.
    let deadline = Instant::now() + Duration::from_secs(30);
    while checkpoint(&db.pool, "organizations").await != suspended {
        assert!(Instant::now() < deadline, "the batch commits");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reset(&db.pool, Some(&["organizations"])).await.unwrap();
    // The reset's notification is taken while the batch's report waits.
    slow.reset_heard().await;
    report.notify_one();
    // The test's runtime has one thread: the released task reports while this sleeps.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let orgs: i64 = sqlx::query_scalar("SELECT count(*) FROM organizations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(orgs, 0, "reset, and nothing applied since");
    assert!(slow.organizations_behind(), "{:?}", runs.checkpoints());
    assert!(!runs.reached(suspended));
    slow.runs.shutdown().await;
}

/// A reset deletes the projection's failures too: a process that knew it stopped no longer
/// counts it stopped once it hears of the reset (until a batch stops there again).
#[tokio::test]
async fn a_reset_projection_is_no_longer_counted_stopped() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let slow = SlowPoll::start(&db, &mut ledger, Duration::from_secs(1800)).await;
    assert!(listening(&db.pool, 1).await, "the projector listens");
    let org = slow.org.to_string();
    ledgerline_projections::fault::panic_on(Projection::Organizations, &org, 2);
    let suspended = slow.suspend(&mut ledger).await;
    let waited = slow.runs.wait(suspended, Duration::from_secs(30)).await;
    assert_eq!(
        waited.stopped,
        vec![("organizations", suspended)],
        "{waited:?}"
    );

    ledgerline_projections::fault::disarm(Projection::Organizations, &org, 2);
    reset(&db.pool, Some(&["organizations"])).await.unwrap();
    slow.reset_heard().await;
    let waited = slow.runs.wait(suspended, Duration::from_millis(500)).await;
    assert!(waited.stopped.is_empty(), "{waited:?}");
    slow.runs.shutdown().await;
}

#[tokio::test]
async fn status_of_an_empty_ledger() {
    let db = TestDb::new().await;
    catch_up(&db.pool).await.unwrap();
    let statuses = status(&db.pool).await.unwrap();
    assert_eq!(statuses.len(), 7);
    assert!(statuses
        .iter()
        .all(|s| s.position == 0 && s.head == 0 && s.lag == 0 && s.failures.is_empty()));
}

/// audit_events takes a batch in one statement; when the statement fails, the failure is
/// still pinned on its own event, with every event before it applied.
#[tokio::test]
async fn a_failure_inside_a_bulk_insert_names_its_own_event() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let org = Uuid::new_v4();
    let actor = Actor::api(org, None, Uuid::new_v4());
    invite_users(&mut ledger, org, &actor, 40).await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.position = 29 THEN RAISE EXCEPTION 'audit refuses'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT ON audit_events FOR EACH ROW \
         EXECUTE FUNCTION refuse();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(failed_at(catch_up(&db.pool).await), ("audit_events", 29));
    assert_eq!(checkpoint(&db.pool, "audit_events").await, 28);
    let copied: Vec<i64> = sqlx::query_scalar("SELECT position FROM audit_events ORDER BY 1")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(copied, (1..=28).collect::<Vec<i64>>());
    // The other projections are not held back by it.
    assert_eq!(checkpoint(&db.pool, "users").await, 40);
}

/// audit_events writes a long batch with one `COPY`, which has no `ON CONFLICT`: an event
/// whose row is already in the table fails it. The batch then goes one event at a time, as
/// `INSERT ... ON CONFLICT DO NOTHING`, and ends with the table that one event per batch
/// gives (the row found there kept as it was), on a connection that serves on.
#[tokio::test]
async fn a_long_batch_meeting_a_row_already_there_ends_as_one_event_at_a_time() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let org = Uuid::new_v4();
    let actor = Actor::api(org, None, Uuid::new_v4());
    // Enough rows that the conflict (position 3) has most of the data after it, to be skipped.
    invite_users(&mut ledger, org, &actor, 600).await;
    let plant = || {
        sqlx::query(
            "INSERT INTO audit_events (position, event_type, event_version, aggregate_type, \
             aggregate_id, sequence, event_data, recorded_at) \
             VALUES (3, 'Planted', '1', 'Test', 'planted', 1, '{}', '2001-02-03 04:05:06+00')",
        )
    };
    plant().execute(&db.pool).await.unwrap();
    run_to_head(&db.pool, Projection::AuditEvents, 1).await;
    let one_by_one = rows(&db.pool, "audit_events").await;
    assert_eq!(one_by_one.len(), 600);
    assert!(one_by_one.iter().any(|r| r.contains("\"Planted\"")));

    reset(&db.pool, Some(&["audit_events"])).await.unwrap();
    plant().execute(&db.pool).await.unwrap();
    // One connection: what the failed COPY left on it meets the statements after it.
    let one = PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*db.pool.connect_options()).clone())
        .await
        .unwrap();
    let fallbacks = bulk_fallbacks();
    run_to_head(&one, Projection::AuditEvents, 1000).await;
    assert!(
        bulk_fallbacks() > fallbacks,
        "the batch was applied one by one"
    );
    assert_eq!(rows(&one, "audit_events").await, one_by_one);
    assert_eq!(checkpoint(&one, "audit_events").await, 600);
}

/// Waits up to 5 s until a session of this database (only: other tests' waits are not
/// this one's) waits for a lock.
async fn a_session_waits_for_a_lock(pool: &PgPool) -> bool {
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A rebuild's swap locks the checkpoints, then deletes the swapped projections' failures. A
/// batch of a stopped projection opening meanwhile must wait for the checkpoint before it
/// touches the failure row: holding that row while it waited made a lock cycle with the swap
/// (a deadlock, or the swap's lock timeout first, every time under load).
#[tokio::test]
async fn a_batch_of_a_stopped_projection_waits_for_its_checkpoint_before_its_failure() {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let org = Uuid::new_v4();
    let user = Uuid::new_v4();
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.id = '{user}' THEN RAISE EXCEPTION 'read model refuses'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION refuse();"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let actor = Actor::api(org, None, Uuid::new_v4());
    ledger
        .append("User", user, &invite(user, org), &actor)
        .await;
    assert_eq!(failed_at(catch_up(&db.pool).await), ("users", 1));

    // What a swap does first: the checkpoint, locked.
    let mut swap = db.pool.begin().await.unwrap();
    sqlx::query("SELECT position FROM projection_checkpoints WHERE name = 'users' FOR UPDATE")
        .execute(&mut *swap)
        .await
        .unwrap();
    let batch = tokio::spawn({
        let pool = db.pool.clone();
        async move { run_batch(&pool, Projection::Users, 10).await }
    });
    assert!(
        a_session_waits_for_a_lock(&db.pool).await,
        "the batch waits"
    );
    // Then the failures, as the swapped-in tables applied the event.
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *swap)
        .await
        .unwrap();
    sqlx::query("DELETE FROM projection_failures WHERE name = 'users'")
        .execute(&mut *swap)
        .await
        .expect("the swap is not blocked by the waiting batch");
    swap.commit().await.unwrap();
    let outcome = batch.await.unwrap();
    assert!(
        matches!(outcome, Ok(BatchOutcome::Failed { .. })),
        "the batch meets the event again (the trigger is still there), no deadlock: {outcome:?}"
    );
}

/// A fresh database whose log holds one organization's creation: the database, its ledger
/// writer, the actor, and the event's position.
async fn one_organization() -> (TestDb, Ledger, Actor, i64) {
    let db = TestDb::new().await;
    let mut ledger = Ledger::new(&db.pool);
    let org = Uuid::new_v4();
    let actor = Actor::api(org, None, Uuid::new_v4());
    let first = ledger
        .append("Organization", org, &created(org), &actor)
        .await;
    (db, ledger, actor, first)
}

/// A process that follows a projection another runs, and missed the notification of its
/// reset (its listener was away), learns of it from its poll: a checkpoint lower than the
/// one it knew is read again and taken, not kept out by the higher one.
#[tokio::test]
async fn a_follower_learns_of_a_reset_whose_notification_it_missed() {
    let (db, _, _, first) = one_organization().await;
    let fast = Projector {
        poll_interval: Duration::from_millis(200),
        ..Projector::default()
    };
    let (_head_tx, head_rx) = tokio::sync::watch::channel(first);
    let runs = fast.start(db.pool.clone(), head_rx);
    assert!(runs.wait_for(first, Duration::from_secs(30)).await);
    let (_follower_tx, follower_rx) = tokio::sync::watch::channel(first);
    let follows = fast.start(db.pool.clone(), follower_rx);
    assert!(follows.wait_for(first, Duration::from_secs(30)).await);

    // A reset that notifies no one, and a failure that keeps the projection's holder from
    // applying the event again.
    sqlx::raw_sql(
        "UPDATE projection_checkpoints SET position = 0 WHERE name = 'organizations'; \
         DELETE FROM organizations; \
         INSERT INTO projection_failures (name, position, error) \
         VALUES ('organizations', 1, 'held back by the test')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let organizations = || {
        follows
            .checkpoints()
            .into_iter()
            .find(|(name, _)| *name == "organizations")
            .unwrap()
            .1
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while organizations() != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(organizations(), 0, "the follower took the reset");
    assert!(
        !follows.wait_for(first, Duration::from_secs(1)).await,
        "a command at the old head waits for the reset projection"
    );
    follows.shutdown().await;
    runs.shutdown().await;
}

/// A batch is run only by the holder of the projection's lease, and only while the lease
/// has not run out: a process whose lease lapsed (frozen, cut off) applies nothing.
#[tokio::test]
async fn a_batch_under_a_lease_not_held_is_refused_and_applies_nothing() {
    let (db, mut ledger, actor, first) = one_organization().await;
    let refused = |r: Result<BatchOutcome, RunError>| matches!(r, Err(RunError::NotLeaseHolder(_)));
    let batch = |holder: &'static str| {
        run_leased_batch(
            &db.pool,
            Projection::Organizations,
            100,
            holder,
            Projector::default().stall_limit,
        )
    };

    assert!(refused(batch("nobody").await), "no one holds it");
    assert_eq!(checkpoint(&db.pool, "organizations").await, 0);

    sqlx::query(
        "INSERT INTO leases (name, holder, expires_at) \
         VALUES ('projection:organizations', 'me', now() + interval '1 minute')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert!(refused(batch("someone-else").await), "another holds it");
    assert_eq!(
        batch("me").await.unwrap(),
        BatchOutcome::Applied {
            applied: 1,
            checkpoint: first
        }
    );

    let org2 = Uuid::new_v4();
    ledger
        .append("Organization", org2, &created(org2), &actor)
        .await;
    sqlx::query("UPDATE leases SET expires_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(refused(batch("me").await), "its lease ran out");
    assert_eq!(checkpoint(&db.pool, "organizations").await, first);
}

/// Another runner records a failure and commits while this batch waits for the checkpoint it
/// holds: the batch must see that failure and stop there, not apply the event past it (as it
/// would if it read failures from the snapshot its statement took before waiting).
#[tokio::test]
async fn a_failure_recorded_while_a_batch_waits_for_the_checkpoint_stops_the_batch() {
    let (db, _, _, first) = one_organization().await;
    sqlx::query("INSERT INTO projection_checkpoints (name) VALUES ('organizations')")
        .execute(&db.pool)
        .await
        .unwrap();

    // The other runner: the checkpoint locked, its failure at the event recorded.
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM projection_checkpoints WHERE name = 'organizations' FOR UPDATE")
        .execute(&mut *other)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO projection_failures (name, position, error) \
         VALUES ('organizations', $1, 'the other runner could not apply it')",
    )
    .bind(first)
    .execute(&mut *other)
    .await
    .unwrap();
    let batch = tokio::spawn({
        let pool = db.pool.clone();
        async move { run_batch(&pool, Projection::Organizations, 10).await }
    });
    assert!(
        a_session_waits_for_a_lock(&db.pool).await,
        "the batch waits for the checkpoint"
    );
    other.commit().await.unwrap();

    let outcome = batch.await.unwrap().unwrap();
    assert!(
        matches!(&outcome, BatchOutcome::Failed { checkpoint: 0, failure } if failure.position == first),
        "{outcome:?}"
    );
    assert_eq!(
        checkpoint(&db.pool, "organizations").await,
        0,
        "not applied past the failure"
    );
}

/// An event no writer stores (a superuser's edit, which `verify` reports: a `recorded_at` of
/// `infinity`, or a NULL once a constraint was dropped) stops the projections at that event,
/// recorded like any other failure; reading it used to panic the batch, or fail it for good
/// with nothing recorded.
#[tokio::test]
async fn an_event_no_writer_stores_stops_the_projections_there() {
    for alter in [
        "UPDATE events SET recorded_at = 'infinity' WHERE position = {p}",
        "ALTER TABLE events ALTER COLUMN recorded_at DROP NOT NULL; \
         UPDATE events SET recorded_at = NULL WHERE position = {p}",
        "ALTER TABLE events ALTER COLUMN payload DROP NOT NULL; \
         UPDATE events SET payload = NULL WHERE position = {p}",
    ] {
        let (db, mut ledger, actor, first) = one_organization().await;
        for _ in 0..2 {
            let org = Uuid::new_v4();
            ledger
                .append("Organization", org, &created(org), &actor)
                .await;
        }
        let altered = first + 1;
        sqlx::raw_sql(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; {}; COMMIT",
            alter.replace("{p}", &altered.to_string())
        ))
        .execute(&db.pool)
        .await
        .unwrap();

        let (name, position) = failed_at(catch_up(&db.pool).await);
        assert_eq!(position, altered, "{alter}: {name}");
        for s in status(&db.pool).await.unwrap() {
            assert_eq!(s.checkpoint, first, "{alter}: {} applied up to it", s.name);
            // Stopped before the altered event, even those that do not read its kind: what
            // status and the metrics show, and the lag measured from there.
            assert_eq!(s.position, first, "{alter}: {} is stopped there", s.name);
            assert_eq!(s.lag, s.head - first, "{alter}: {}", s.name);
            let failure = &s.failures[0];
            assert_eq!(failure.position, altered, "{alter}: {}", s.name);
            assert!(
                failure.error.contains("cannot be read"),
                "{}",
                failure.error
            );
        }
    }
}
