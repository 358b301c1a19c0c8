//! The multi-row path of `users` (users_batch.rs) against one event at a time: over random
//! logs of every kind of user event, which it must take without falling back; and over logs
//! with events the per-event code fails on, or that the fold cannot take, where the outcome
//! (the failing event, its error, the checkpoint), the table and the data keys left must be
//! the same. Its own test binary, as the fallback count is process-wide.

mod common;

use common::{frequent_event_types, rows, run_until_failure, sealed, Actor, Ledger, Rng, TestDb};
use ledgerline_aggregates::user::UserEvent;
use ledgerline_projections::{bulk_fallbacks, reset, Projection};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Clone, Copy, PartialEq)]
enum Status {
    Active,
    Deactivated,
    Erased,
}

fn invited(user: Uuid, org: Uuid, n: usize) -> UserEvent {
    UserEvent::UserInvited {
        user_id: user,
        organization_id: org,
        email: sealed(user, &format!("u{n}@example.com")),
        full_name: sealed(user, &format!("User {n}")),
        email_blind_index: format!("blind-{n}"),
    }
}

/// A log the users aggregate would accept: invitations, profile changes of each kind,
/// deactivations and reactivations, role assignments and revocations, erasures (after
/// which a user has no more events).
async fn user_log(ledger: &mut Ledger, seed: u64, steps: usize) -> (Uuid, Vec<Uuid>) {
    let org = Uuid::new_v4();
    let actor = Actor::api(org, None, Uuid::new_v4());
    let mut rng = Rng(seed);
    let mut users: Vec<(Uuid, Status)> = Vec::new();
    for step in 0..steps {
        let live: Vec<usize> = (0..users.len())
            .filter(|&i| users[i].1 != Status::Erased)
            .collect();
        let roll = rng.below(100);
        if live.len() < 3 || roll < 12 {
            let user = Uuid::new_v4();
            ledger
                .append("User", user, &invited(user, org, step), &actor)
                .await;
            users.push((user, Status::Active));
            continue;
        }
        let i = live[rng.below(live.len())];
        let (user, status) = users[i];
        let event = match roll {
            12..=44 => {
                let (email, name) = match rng.below(3) {
                    0 => (true, false),
                    1 => (false, true),
                    _ => (true, true),
                };
                UserEvent::UserProfileUpdated {
                    email: email.then(|| sealed(user, &format!("new{step}@example.com"))),
                    email_blind_index: email.then(|| format!("blind-new-{step}")),
                    previous_email_blind_index: None,
                    full_name: name.then(|| sealed(user, &format!("Renamed {step}"))),
                }
            }
            45..=59 if status == Status::Active => {
                users[i].1 = Status::Deactivated;
                UserEvent::UserDeactivated {
                    reason: (rng.below(2) == 0).then(|| format!("reason {step}")),
                }
            }
            45..=59 => {
                users[i].1 = Status::Active;
                UserEvent::UserReactivated {}
            }
            60..=79 => UserEvent::UserRoleAssigned {
                role_id: Uuid::new_v4(),
                expires_at: None,
                reason: None,
            },
            80..=94 => UserEvent::UserRoleRevoked {
                role_id: Uuid::new_v4(),
                reason: None,
            },
            _ => {
                users[i].1 = Status::Erased;
                UserEvent::UserErased {
                    email_blind_index: format!("blind-{step}"),
                }
            }
        };
        ledger.append("User", user, &event, &actor).await;
    }
    (org, users.into_iter().map(|(u, _)| u).collect())
}

/// From scratch: the `users` table empty and a data key for every user in the log.
async fn start_over(pool: &PgPool) {
    reset(pool, Some(&["users"])).await.unwrap();
    for statement in [
        "DELETE FROM subject_keys",
        "INSERT INTO subject_keys (subject_id, organization_id, wrapped_key) \
         SELECT DISTINCT aggregate_id::uuid, organization_id, '\\x00'::bytea FROM events \
         WHERE aggregate_type = 'User'",
    ] {
        sqlx::query(statement).execute(pool).await.unwrap();
    }
}

async fn keys_left(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT subject_id FROM subject_keys ORDER BY 1")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Applies the log one event at a time, then in batches of each of `sizes`: the same
/// outcome, `users` table and data keys each time. Returns the outcome.
async fn compare(pool: &PgPool, sizes: &[i64]) -> Option<(i64, String)> {
    start_over(pool).await;
    let one = run_until_failure(pool, Projection::Users, 1).await;
    let (users, keys) = (rows(pool, "users").await, keys_left(pool).await);
    for &size in sizes {
        start_over(pool).await;
        assert_eq!(
            run_until_failure(pool, Projection::Users, size).await,
            one,
            "outcome with batches of {size}"
        );
        let got = rows(pool, "users").await;
        let only_one: Vec<_> = users.iter().filter(|r| !got.contains(r)).collect();
        let only_bulk: Vec<_> = got.iter().filter(|r| !users.contains(r)).collect();
        assert!(
            only_one.is_empty() && only_bulk.is_empty(),
            "users differ with batches of {size}:\n one by one only: {only_one:#?}\n \
             multi-row only: {only_bulk:#?}"
        );
        assert_eq!(keys_left(pool).await, keys, "data keys, batches of {size}");
    }
    one.0
}

/// One test, so that the fallbacks the failing logs cause come after the count that must be
/// zero over the valid ones.
#[tokio::test]
async fn the_multi_row_path_agrees_with_one_event_at_a_time() {
    valid_logs_are_folded_into_the_same_table().await;
    failing_logs_fail_at_the_same_event().await;
}

async fn valid_logs_are_folded_into_the_same_table() {
    for seed in [3u64, 17, 0x9e37_79b9] {
        let db = TestDb::new().await;
        let mut ledger = Ledger::new(&db.pool);
        user_log(&mut ledger, seed, 1500).await;
        assert_eq!(
            frequent_event_types(&db.pool).await,
            [
                "UserDeactivated",
                "UserErased",
                "UserInvited",
                "UserProfileUpdated",
                "UserReactivated",
                "UserRoleAssigned",
                "UserRoleRevoked"
            ],
            "the log has every kind of user event"
        );
        assert_eq!(compare(&db.pool, &[5000, 301, 64, 8]).await, None);
        assert_eq!(bulk_fallbacks(), 0, "every batch of 8 or more was folded");
    }
}

/// Each case ends a valid log with events the per-event code fails on, or that the fold
/// must not take; the multi-row path must fail (or not) exactly as one by one does.
async fn failing_logs_fail_at_the_same_event() {
    for case in 0..7 {
        let db = TestDb::new().await;
        let mut ledger = Ledger::new(&db.pool);
        let (org, users) = user_log(&mut ledger, 500 + case, 300).await;
        let actor = Actor::api(org, None, Uuid::new_v4());
        let erased: String = sqlx::query_scalar(
            "SELECT aggregate_id FROM events WHERE event_type = 'UserErased' LIMIT 1",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let erased: Uuid = erased.parse().unwrap();
        let someone = users.iter().copied().find(|u| *u != erased).unwrap();
        let (stranger, newcomer) = (Uuid::new_v4(), Uuid::new_v4());
        let renamed = UserEvent::UserProfileUpdated {
            email: Some(sealed(erased, "back@example.com")),
            email_blind_index: Some("blind-back".into()),
            previous_email_blind_index: None,
            full_name: Some(sealed(erased, "Back")),
        };
        let assigned = UserEvent::UserRoleAssigned {
            role_id: Uuid::new_v4(),
            expires_at: None,
            reason: None,
        };
        let events: Vec<(Uuid, UserEvent)> = match case {
            // A user that was never invited.
            0 => vec![(stranger, assigned)],
            // Invited twice, in one batch and across batches.
            1 => vec![
                (newcomer, invited(newcomer, org, 1)),
                (newcomer, invited(newcomer, org, 2)),
            ],
            2 => vec![(someone, invited(someone, org, 3))],
            // Changed before it exists, then invited.
            3 => vec![(newcomer, assigned), (newcomer, invited(newcomer, org, 4))],
            // An erased user deactivated (the check fails), then given a profile again,
            // which would make the folded row valid.
            4 => vec![
                (erased, UserEvent::UserDeactivated { reason: None }),
                (erased, renamed),
            ],
            // Erased in the batch, then deactivated (the check fails) and given a profile.
            5 => vec![
                (
                    someone,
                    UserEvent::UserErased {
                        email_blind_index: "x".into(),
                    },
                ),
                (someone, UserEvent::UserDeactivated { reason: None }),
                (someone, renamed),
            ],
            // An erased user's role assigned: one by one applies it (the version moves).
            _ => vec![(erased, assigned)],
        };
        for (user, event) in &events {
            ledger.append("User", *user, event, &actor).await;
        }
        let failed = compare(&db.pool, &[5000, 64, 8]).await;
        assert_eq!(failed.is_none(), case == 6, "case {case}: {failed:?}");
    }
}
