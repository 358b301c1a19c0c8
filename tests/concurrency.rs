//! Concurrency: commands on one aggregate take turns within a process; across processes,
//! optimistic concurrency per aggregate (one winner per sequence, 409 for the rest, never a
//! fork); group commit across aggregates (positions 1..N with no gap).

mod common;

use std::sync::Arc;

use common::{
    assert_actors_guarded, assert_error_says, decided_before_appended, hold_appends,
    release_appends, wait_for_appenders, TestApp, TestDb,
};
use cqrs_es::persist::SerializedEvent;
use ledgerline::app::{Actor, CommandError, Created};
use ledgerline::ledger::store::{AppendError, Appended, LedgerStore};
use ledgerline_aggregates::organization::{Organization, OrganizationCommand, OrganizationError};
use serde_json::{json, Value};
use uuid::Uuid;

/// Within one process commands on one aggregate take turns (`aggregate_locks`): 32 renames
/// at once all land, one after another, at consecutive sequence numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_on_one_aggregate_in_one_process_all_land_in_turn() {
    let t = Arc::new(TestApp::spawn().await);
    let org = t.create_org("Contended").await;
    let before = last_sequence(&t, org).await;

    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let t = t.clone();
            tokio::spawn(async move {
                t.patch(
                    &format!("/v1/organizations/{org}"),
                    &t.admin_key,
                    json!({"name": format!("Contended {i}")}),
                )
                .await
            })
        })
        .collect();
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(
        sequences_after(&t, org, before).await,
        ((before + 1)..=(before + 32)).collect::<Vec<_>>()
    );
    assert_eq!(t.app.aggregate_locks.in_use(), 0, "no turn left behind");
    gap_free_and_intact(&t).await;

    // The read model shows the last name appended.
    let name = t
        .get(&format!("/v1/organizations/{org}"), &t.admin_key)
        .await
        .body["name"]
        .clone();
    let last: (String,) = sqlx::query_as(
        "SELECT payload::jsonb #>> '{OrganizationUpdated,after,name}' FROM events WHERE aggregate_id = $1 ORDER BY sequence DESC LIMIT 1",
    )
    .bind(org.to_string())
    .fetch_one(t.pool())
    .await
    .unwrap();
    assert_eq!(name, json!(last.0));
}

/// Two processes do not share turns: two renames decided at the same sequence, one in each,
/// give one winner; the other is a 409 and appends nothing (no fork).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_on_one_aggregate_racing_across_processes_give_one_winner_per_sequence() {
    let t = TestApp::spawn().await;
    let org = t.create_org("Contended").await;
    let before = last_sequence(&t, org).await;
    let path = format!("/v1/organizations/{org}");
    let (first, second) = decided_before_appended(
        &t,
        t.patch(&path, &t.admin_key, json!({"name": "First"})),
        (
            reqwest::Method::PATCH,
            &path,
            &t.admin_key,
            Some(json!({"name": "Second"})),
        ),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_error_says(&second, 409, "changed concurrently");
    assert_eq!(sequences_after(&t, org, before).await, vec![before + 1]);
    gap_free_and_intact(&t).await;
    let shown = t.get(&path, &t.admin_key).await;
    assert_eq!(shown.body["name"], "First", "{}", shown.body);
}

async fn last_sequence(t: &TestApp, aggregate: Uuid) -> i64 {
    sqlx::query_scalar("SELECT max(sequence) FROM events WHERE aggregate_id = $1")
        .bind(aggregate.to_string())
        .fetch_one(t.pool())
        .await
        .unwrap()
}

async fn sequences_after(t: &TestApp, aggregate: Uuid, after: i64) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT sequence FROM events WHERE aggregate_id = $1 AND sequence > $2 ORDER BY sequence",
    )
    .bind(aggregate.to_string())
    .bind(after)
    .fetch_all(t.pool())
    .await
    .unwrap()
}

async fn gap_free_and_intact(t: &TestApp) {
    let (count, max): (i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), max(position) FROM events")
            .fetch_one(t.pool())
            .await
            .unwrap();
    assert_eq!(Some(count), max, "positions are gap-free");
    let report = t.verify().await;
    assert!(report.intact(), "{:?}", report.first_bad);
}

/// Creates organization `id` as `App::execute_fresh` does: with no load.
async fn create_fresh(
    t: &TestApp,
    id: Uuid,
    slug: &str,
) -> Result<Created<Organization>, CommandError<OrganizationError>> {
    let command = OrganizationCommand::Create {
        organization_id: id,
        name: format!("Org {slug}"),
        slug: slug.into(),
        country_code: None,
        domain: None,
        settings: Default::default(),
    };
    let actor = Actor::cli("test");
    t.app
        .execute_fresh(id, Some(id), &actor, None, command)
        .await
}

/// A command on an aggregate whose id its handler just made (a post's) skips the load
/// (`App::execute_fresh`). Its safety rests on the append: were the id taken after all, the
/// command is refused as a conflict, as two racing commands are, and appends nothing.
#[tokio::test]
async fn a_fresh_command_on_a_taken_id_is_a_conflict_and_appends_nothing() {
    let t = TestApp::spawn().await;
    let taken = t.create_org("Taken").await;
    let head = t.head().await;
    let outcome = create_fresh(&t, taken, "another-slug").await;
    assert!(
        matches!(outcome, Err(CommandError::Conflict)),
        "{outcome:?}"
    );
    assert_eq!(t.head().await, head, "a refused command appends nothing");

    // An id nobody holds: created, and shown by the read model once the call returns.
    let fresh = Uuid::new_v4();
    let created = create_fresh(&t, fresh, "fresh-slug").await.unwrap();
    assert_eq!(t.head().await, head + 1);
    assert_eq!(created.appended.position, head + 1);
    assert_eq!(created.events.len(), 1);
    let recorded_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT recorded_at FROM events WHERE position = $1")
            .bind(head + 1)
            .fetch_one(t.pool())
            .await
            .unwrap();
    assert_eq!(created.appended.recorded_at, recorded_at);
    let r = t
        .get(&format!("/v1/organizations/{fresh}"), &t.admin_key)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["slug"], "fresh-slug");
    assert!(t.verify().await.intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_commands_from_32_tasks_are_gap_free_and_projected() {
    let t = Arc::new(TestApp::spawn().await);
    let orgs = [
        t.create_org("Alpha").await,
        t.create_org("Beta").await,
        t.create_org("Gamma").await,
    ];
    let start = t.head().await;

    let tasks: Vec<_> = (0..32)
        .map(|w| {
            let t = t.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in (w..1000).step_by(32) {
                    let org = orgs[i % orgs.len()];
                    let r = t
                        .post(
                            &format!("/v1/organizations/{org}/users"),
                            &t.admin_key,
                            json!({"email": format!("user{i}@example.com"), "full_name": format!("User {i}")}),
                        )
                        .await;
                    assert_eq!(r.status, 201, "{}", r.body);
                    ids.push((org, r.body["id"].as_str().unwrap().to_string(), i));
                }
                ids
            })
        })
        .collect();
    let mut users = Vec::new();
    for task in tasks {
        users.extend(task.await.unwrap());
    }
    assert_eq!(users.len(), 1000);

    let positions: Vec<(i64,)> = sqlx::query_as("SELECT position FROM events ORDER BY position")
        .fetch_all(t.pool())
        .await
        .unwrap();
    let positions: Vec<i64> = positions.into_iter().map(|(p,)| p).collect();
    let n = positions.len() as i64;
    assert_eq!(
        positions,
        (1..=n).collect::<Vec<_>>(),
        "positions are exactly 1..N"
    );
    assert_eq!(n, start + 1000);
    let report = t.verify().await;
    assert!(report.intact(), "{:?}", report.first_bad);
    assert_eq!(report.events as i64, n);

    // Every projection has reached the head and says what the events say.
    for (name, position) in t.app.projector.as_ref().unwrap().checkpoints() {
        assert_eq!(position, n, "projection {name} is at the head");
    }
    let (audit_rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_events")
        .fetch_one(t.pool())
        .await
        .unwrap();
    assert_eq!(audit_rows, n);
    for (org, id, i) in &users {
        let r = t
            .get(&format!("/v1/organizations/{org}/users/{id}"), &t.admin_key)
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["email"], format!("user{i}@example.com"));
    }
    let per_org: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT organization_id, count(*) FROM users GROUP BY organization_id ORDER BY organization_id")
            .fetch_all(t.pool())
            .await
            .unwrap();
    let from_events: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT organization_id, count(*) FROM events WHERE event_type = 'UserInvited' GROUP BY organization_id ORDER BY organization_id",
    )
    .fetch_all(t.pool())
    .await
    .unwrap();
    assert_eq!(per_org, from_events);
}

/// One event of a batch the test makes by hand: `payload` is `{"<event type>": {...}}`.
fn by_hand(
    aggregate_type: &str,
    id: Uuid,
    sequence: usize,
    payload: Value,
    metadata: Value,
) -> SerializedEvent {
    SerializedEvent {
        aggregate_id: id.to_string(),
        sequence,
        aggregate_type: aggregate_type.into(),
        event_type: payload.as_object().unwrap().keys().next().unwrap().clone(),
        event_version: "1.0".into(),
        payload,
        metadata,
    }
}

/// A command of user `user`'s key, authenticated when the user was at `sequence`: an
/// organization (a new one, so that nothing else refuses it) suspended in their name.
fn acting_as(user: Uuid, sequence: i64) -> Vec<SerializedEvent> {
    vec![by_hand(
        "Organization",
        Uuid::new_v4(),
        1,
        json!({"OrganizationSuspended": {"reason": null}}),
        json!({"actor_kind": "api_key", "request_id": "r", "actor_user_id": user,
               "actor_user_sequence": sequence.to_string()}),
    )]
}

/// Appends each command in one batch, in this order, behind one that holds the writer until
/// all have queued (the append lock is held meanwhile), and answers their outcomes.
async fn in_one_batch(
    store: &LedgerStore,
    pool: &sqlx::PgPool,
    commands: &[Vec<SerializedEvent>],
) -> Vec<Result<Appended, AppendError>> {
    let mut holder = hold_appends(pool).await;
    let ahead = acting_as(Uuid::new_v4(), 0);
    let ahead = store.append(&ahead);
    let mut ahead = Box::pin(ahead);
    assert!(futures::poll!(&mut ahead).is_pending());
    wait_for_appenders(pool, 1).await;
    // Each append queues for the writer on its first poll, in the order given.
    let mut all = Box::pin(futures::future::join_all(
        commands.iter().map(|events| store.append(events)),
    ));
    assert!(futures::poll!(&mut all).is_pending());
    release_appends(&mut holder).await;
    ahead.await.unwrap();
    all.await
}

/// Whether the outcome is a refusal because the acting key's standing was lost, saying `why`.
fn stopped_by(outcome: &Result<Appended, AppendError>, why: &str) -> bool {
    matches!(outcome, Err(AppendError::ActorStopped(m)) if m.contains(why))
}

/// Where a key stood is checked against the commands before it in the same batch, not only
/// against the log: a user's role revoked earlier in the batch refuses the commands of their
/// key authenticated before it, while a new name of another user lets theirs through. And a
/// guard many commands share, looked up once, refuses each of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_users_loss_refuses_their_commands_in_the_same_batch_and_each_sharing_the_guard() {
    let db = TestDb::new().await;
    let store = LedgerStore::start(db.pool.clone());
    let (ada, bob, org, role) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let system = json!({"actor_kind": "cli:test", "request_id": "r", "organization_id": org});
    for user in [ada, bob] {
        let assigned =
            json!({"UserRoleAssigned": {"role_id": role, "expires_at": null, "reason": null}});
        store
            .append(&[by_hand("User", user, 1, assigned, system.clone())])
            .await
            .unwrap();
    }
    let revoked = json!({"UserRoleRevoked": {"role_id": role, "reason": null}});
    let renamed = json!({"UserProfileUpdated": {"email": null, "email_blind_index": null,
                         "previous_email_blind_index": null, "full_name": null}});
    let outcomes = in_one_batch(
        &store,
        &db.pool,
        &[
            vec![by_hand("User", ada, 2, revoked, system.clone())],
            acting_as(ada, 1),
            vec![by_hand("User", bob, 2, renamed, system.clone())],
            acting_as(bob, 1),
        ],
    )
    .await;
    let stopped = |o: &_| stopped_by(o, "user was deactivated, erased, or given or lost a role");
    assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
    assert!(stopped(&outcomes[1]), "{:?}", outcomes[1]);
    assert!(outcomes[2].is_ok(), "{:?}", outcomes[2]);
    assert!(
        outcomes[3].is_ok(),
        "a new name takes nothing away: {:?}",
        outcomes[3]
    );

    // Ada's revocation in the log now: both commands authenticated before it are refused by
    // the one guard they share; one authenticated after it lands.
    let outcomes = in_one_batch(
        &store,
        &db.pool,
        &[acting_as(ada, 1), acting_as(ada, 1), acting_as(ada, 2)],
    )
    .await;
    assert!(stopped(&outcomes[0]), "{:?}", outcomes[0]);
    assert!(stopped(&outcomes[1]), "{:?}", outcomes[1]);
    assert!(outcomes[2].is_ok(), "{:?}", outcomes[2]);
    assert_actors_guarded(&db.pool).await;
}

/// A command of a user's key authenticated while the user acted under `roles` (each a role
/// and its sequence then): an organization (a new one) suspended in their name.
fn acting_under(roles: &[(Uuid, i64)]) -> Vec<SerializedEvent> {
    let roles: Vec<String> = roles
        .iter()
        .map(|(id, seq)| format!("{id}@{seq}"))
        .collect();
    vec![by_hand(
        "Organization",
        Uuid::new_v4(),
        1,
        json!({"OrganizationSuspended": {"reason": null}}),
        json!({"actor_kind": "api_key", "request_id": "r", "actor_user_id": Uuid::new_v4(),
               "actor_role_sequences": roles.join(",")}),
    )]
}

/// A role changed earlier in the batch, or in the log, refuses the commands of keys whose
/// user acted under it (each role a guard of its own, its parent too), and a change of a role
/// a command did not act under lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_roles_change_refuses_its_holders_commands_in_the_same_batch_and_after() {
    let db = TestDb::new().await;
    let store = LedgerStore::start(db.pool.clone());
    let (held, parent, other) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let system = json!({"actor_kind": "cli:test", "request_id": "r"});
    let spec = json!({"name": "r", "description": "", "permissions": [], "parent_role_id": null});
    let updated = json!({"RoleUpdated": {"before": spec, "after": spec}});
    let outcomes = in_one_batch(
        &store,
        &db.pool,
        &[
            vec![by_hand("Role", parent, 1, updated.clone(), system.clone())],
            acting_under(&[(held, 0), (parent, 0)]),
            vec![by_hand("Role", other, 1, updated, system)],
            acting_under(&[(held, 0)]),
        ],
    )
    .await;
    let stopped = |o: &_| stopped_by(o, "roles this key's user held");
    assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
    assert!(stopped(&outcomes[1]), "{:?}", outcomes[1]);
    assert!(outcomes[2].is_ok(), "{:?}", outcomes[2]);
    assert!(outcomes[3].is_ok(), "{:?}", outcomes[3]);

    // The parent's change in the log now: a command authenticated before it is refused, one
    // authenticated after it lands.
    let outcomes = in_one_batch(
        &store,
        &db.pool,
        &[
            acting_under(&[(held, 0), (parent, 0)]),
            acting_under(&[(held, 0), (parent, 1)]),
        ],
    )
    .await;
    assert!(stopped(&outcomes[0]), "{:?}", outcomes[0]);
    assert!(outcomes[1].is_ok(), "{:?}", outcomes[1]);
    assert_actors_guarded(&db.pool).await;
}
