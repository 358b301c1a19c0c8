//! The multi-row path of `user_roles` (user_roles_batch.rs) against one event at a time:
//! over random logs of assignments (again and again, by users and by service keys, with and
//! without expiry and reason), revocations, role deletions and the user and role events the
//! projection passes over, which it must take without falling back; and over logs with an
//! event the per-event code fails on, where the outcome (the failing event, its error, the
//! checkpoint) and the table must be the same. Its own test binary, as the fallback count is
//! process-wide.

mod common;

use chrono::{Duration, TimeZone, Utc};
use common::{agrees_in_batches, frequent_event_types, Actor, Ledger, Rng, TestDb};
use ledgerline_aggregates::role::{RoleEvent, RoleSpec};
use ledgerline_aggregates::user::UserEvent;
use ledgerline_projections::{bulk_fallbacks, Projection};
use uuid::Uuid;

fn spec(name: &str) -> RoleSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "description": "",
        "parent_role_id": null,
        "permissions": ["users:read"],
    }))
    .expect("a role spec")
}

/// A log of six users and five roles of one organization; a deleted role is made again
/// under a new id, and a role deleted may still be assigned afterwards (not what the
/// aggregates accept, but what the per-event code must meet all the same).
async fn role_log(ledger: &mut Ledger, seed: u64, steps: usize) -> Uuid {
    let org = Uuid::new_v4();
    let mut rng = Rng(seed);
    let users: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    let mut roles: Vec<Uuid> = Vec::new();
    let create = |role: Uuid, n: usize| RoleEvent::RoleCreated {
        role_id: role,
        organization_id: org,
        spec: spec(&format!("role {n}")),
        built_in: false,
    };
    let service = Actor::api(org, None, Uuid::new_v4());
    for step in 0..steps {
        if roles.len() < 5 {
            let role = Uuid::new_v4();
            ledger
                .append("Role", role, &create(role, step), &service)
                .await;
            roles.push(role);
            continue;
        }
        let user = users[rng.below(users.len())];
        let role = roles[rng.below(roles.len())];
        let actor = if rng.below(2) == 0 {
            Actor::api(org, Some(users[rng.below(users.len())]), Uuid::new_v4())
        } else {
            service.clone()
        };
        match rng.below(100) {
            0..=49 => {
                let event = UserEvent::UserRoleAssigned {
                    role_id: role,
                    expires_at: (rng.below(3) == 0).then(|| {
                        Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
                            + Duration::days(rng.below(400) as i64)
                    }),
                    reason: (rng.below(2) == 0).then(|| format!("reason {step}")),
                };
                ledger.append("User", user, &event, &actor).await;
            }
            50..=79 => {
                let event = UserEvent::UserRoleRevoked {
                    role_id: role,
                    reason: None,
                };
                ledger.append("User", user, &event, &actor).await;
            }
            80..=85 => {
                let deleted = RoleEvent::RoleDeleted {
                    name: "gone".into(),
                };
                ledger.append("Role", role, &deleted, &service).await;
                if rng.below(2) == 0 {
                    roles.retain(|r| *r != role);
                }
            }
            86..=92 => {
                let updated = RoleEvent::RoleUpdated {
                    before: spec("before"),
                    after: spec(&format!("after {step}")),
                };
                ledger.append("Role", role, &updated, &service).await;
            }
            _ => {
                let event = UserEvent::UserDeactivated { reason: None };
                ledger.append("User", user, &event, &actor).await;
            }
        }
    }
    org
}

/// One test, so that the fallbacks the failing logs cause come after the count that must be
/// zero over the valid ones.
#[tokio::test]
async fn the_multi_row_path_agrees_with_one_event_at_a_time() {
    for seed in [5u64, 23, 0x5bd1_e995] {
        let db = TestDb::new().await;
        let mut ledger = Ledger::new(&db.pool);
        role_log(&mut ledger, seed, 1500).await;
        assert_eq!(
            frequent_event_types(&db.pool).await,
            [
                "RoleCreated",
                "RoleDeleted",
                "RoleUpdated",
                "UserDeactivated",
                "UserRoleAssigned",
                "UserRoleRevoked"
            ],
            "the log has every kind of event the projection reads"
        );
        assert_eq!(
            agrees_in_batches(&db.pool, Projection::UserRoles, &[5000, 301, 64, 8]).await,
            None
        );
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM user_roles")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(left > 5, "assignments stand at the end: {left}");
        assert_eq!(bulk_fallbacks(), 0, "every batch of 8 or more was folded");
    }

    // Each case puts an event the per-event code fails on into the middle of a log.
    for case in 0..2 {
        let db = TestDb::new().await;
        let mut ledger = Ledger::new(&db.pool);
        let org = role_log(&mut ledger, 700 + case, 300).await;
        let user = Uuid::new_v4();
        match case {
            // An assignment recorded without its organization.
            0 => {
                let event = UserEvent::UserRoleAssigned {
                    role_id: Uuid::new_v4(),
                    expires_at: None,
                    reason: None,
                };
                ledger.append("User", user, &event, &Actor::cli()).await;
            }
            // A user event that does not decode.
            _ => {
                let actor = Actor::api(org, None, Uuid::new_v4());
                ledger
                    .append_raw(
                        "User",
                        &user.to_string(),
                        "UserRoleRevoked",
                        "1",
                        r#"{"UserRoleRevoked": {"role_id": 7}}"#,
                        &actor,
                    )
                    .await;
            }
        }
        role_log(&mut ledger, 800 + case, 200).await;
        let failed = agrees_in_batches(&db.pool, Projection::UserRoles, &[5000, 64, 8]).await;
        assert!(failed.is_some(), "case {case} fails");
    }
}
