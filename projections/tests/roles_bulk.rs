//! The multi-row path of `roles` (roles_batch.rs) against one event at a time: over random
//! logs of creations, updates (names, descriptions, parents, permission sets) and deletions,
//! which it must take without falling back; and over logs with events the per-event code
//! fails on, or that the fold must not take, where the outcome (the failing event, its error,
//! the checkpoint) and both tables must be the same. Its own test binary, as the fallback
//! count is process-wide.

mod common;

use common::{agrees_in_batches, rows, Actor, Ledger, Rng, TestDb};
use ledgerline_aggregates::role::{RoleEvent, RoleSpec};
use ledgerline_projections::{bulk_fallbacks, Projection};
use sqlx::PgPool;
use uuid::Uuid;

const PERMISSIONS: [&str; 5] = [
    "users:read",
    "users:write",
    "roles:read",
    "keys:read",
    "audit:read",
];

fn spec(rng: &mut Rng, name: String, parent: Option<Uuid>) -> RoleSpec {
    let permissions: Vec<&str> = PERMISSIONS
        .iter()
        .copied()
        .filter(|_| rng.below(2) == 0)
        .collect();
    serde_json::from_value(serde_json::json!({
        "name": name,
        "description": format!("about {}", rng.below(5)),
        "parent_role_id": parent,
        "permissions": permissions,
    }))
    .expect("a role spec")
}

/// A log the roles aggregate would accept, of one organization's roles.
async fn role_log(ledger: &mut Ledger, seed: u64, steps: usize) -> (Uuid, Vec<Uuid>) {
    let org = Uuid::new_v4();
    let actor = Actor::api(org, None, Uuid::new_v4());
    let mut rng = Rng(seed);
    let mut roles: Vec<Uuid> = Vec::new();
    for step in 0..steps {
        let roll = rng.below(100);
        if roles.len() < 4 || roll < 25 {
            let role = Uuid::new_v4();
            let parent = roles.get(rng.below(roles.len() + 1)).copied();
            let created = RoleEvent::RoleCreated {
                role_id: role,
                organization_id: org,
                spec: spec(&mut rng, format!("role {step}"), parent),
                built_in: rng.below(4) == 0,
            };
            ledger.append("Role", role, &created, &actor).await;
            roles.push(role);
            continue;
        }
        let i = rng.below(roles.len());
        let role = roles[i];
        let event = if roll < 88 {
            let parent = roles.get(rng.below(roles.len() * 2)).copied();
            RoleEvent::RoleUpdated {
                before: spec(&mut rng, "before".into(), None),
                after: spec(&mut rng, format!("renamed {step}"), parent),
            }
        } else {
            roles.remove(i);
            RoleEvent::RoleDeleted {
                name: "gone".into(),
            }
        };
        ledger.append("Role", role, &event, &actor).await;
    }
    (org, roles)
}

async fn tables(pool: &PgPool) -> (Vec<String>, Vec<String>) {
    (
        rows(pool, "roles").await,
        rows(pool, "role_permissions").await,
    )
}

/// One test, so that the fallbacks the failing logs cause come after the count that must be
/// zero over the valid ones.
#[tokio::test]
async fn the_multi_row_path_agrees_with_one_event_at_a_time() {
    for seed in [7u64, 31, 0x2545_f491] {
        let db = TestDb::new().await;
        let mut ledger = Ledger::new(&db.pool);
        role_log(&mut ledger, seed, 1200).await;
        assert_eq!(
            agrees_in_batches(&db.pool, Projection::Roles, &[5000, 301, 64, 8]).await,
            None
        );
        let (roles, permissions) = tables(&db.pool).await;
        assert!(
            roles.len() > 20 && permissions.len() > 20,
            "roles stand at the end with permissions: {} and {}",
            roles.len(),
            permissions.len()
        );
        assert_eq!(bulk_fallbacks(), 0, "every batch of 8 or more was folded");
    }

    // Each case puts events the per-event code fails on, or that the fold must not take,
    // into the middle of a log.
    for case in 0..8 {
        let db = TestDb::new().await;
        let mut ledger = Ledger::new(&db.pool);
        let (org, roles) = role_log(&mut ledger, 900 + case, 300).await;
        let actor = Actor::api(org, None, Uuid::new_v4());
        let mut rng = Rng(case + 1);
        let (someone, stranger) = (roles[0], Uuid::new_v4());
        let created = |role: Uuid, named: Uuid, rng: &mut Rng| RoleEvent::RoleCreated {
            role_id: named,
            organization_id: org,
            spec: spec(rng, format!("made {role}"), None),
            built_in: false,
        };
        let updated = |rng: &mut Rng| RoleEvent::RoleUpdated {
            before: spec(rng, "a".into(), None),
            after: spec(rng, "b".into(), None),
        };
        let deleted = RoleEvent::RoleDeleted { name: "x".into() };
        let events: Vec<(Uuid, RoleEvent)> = match case {
            // A role that was never made, updated or deleted.
            0 => vec![(stranger, updated(&mut rng))],
            1 => vec![(stranger, deleted)],
            // Made twice: in one batch, and across batches.
            2 => vec![
                (stranger, created(stranger, stranger, &mut rng)),
                (stranger, created(stranger, stranger, &mut rng)),
            ],
            3 => vec![(someone, created(someone, someone, &mut rng))],
            // Naming another role than its aggregate.
            4 => vec![(stranger, created(stranger, Uuid::new_v4(), &mut rng))],
            // Deleted, then updated.
            5 => vec![(someone, deleted), (someone, updated(&mut rng))],
            // Made again while it is there, then deleted.
            6 => vec![
                (someone, created(someone, someone, &mut rng)),
                (someone, deleted),
            ],
            // Deleted, then made again (one by one applies it).
            _ => vec![
                (someone, deleted),
                (someone, created(someone, someone, &mut rng)),
            ],
        };
        for (role, event) in &events {
            ledger.append("Role", *role, event, &actor).await;
        }
        role_log(&mut ledger, 1900 + case, 100).await;
        let failed = agrees_in_batches(&db.pool, Projection::Roles, &[5000, 64, 8]).await;
        assert_eq!(failed.is_none(), case == 7, "case {case}: {failed:?}");
    }
}
