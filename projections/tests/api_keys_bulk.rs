//! The multi-row path of `api_keys` (api_keys_batch.rs) against one event at a time: over
//! random logs of issues, rotations (chained, several per batch) and revocations (again and
//! again, with and without a reason), which it must take without falling back; and over logs
//! with events the per-event code fails on, or that the fold must not take, where the
//! outcome (the failing event, its error, the checkpoint) and the table must be the same.
//! Its own test binary, as the fallback count is process-wide.

mod common;

use common::{agrees_in_batches, Actor, Ledger, Rng, TestDb};
use ledgerline_aggregates::api_key::ApiKeyEvent;
use ledgerline_projections::{bulk_fallbacks, Projection};
use uuid::Uuid;

fn hash(rng: &mut Rng) -> String {
    (0..64)
        .map(|_| char::from(b"0123456789abcdef"[rng.below(16)]))
        .collect()
}

fn issued(key: Uuid, org: Uuid, prefix: &str, rng: &mut Rng) -> ApiKeyEvent {
    let permissions = &["users:read", "keys:write", "audit:read"][..rng.below(4)];
    serde_json::from_value(serde_json::json!({"ApiKeyIssued": {
        "key_id": key,
        "organization_id": (rng.below(5) > 0).then_some(org),
        "user_id": (rng.below(2) == 0).then(Uuid::new_v4),
        "label": format!("key {prefix}"),
        "permissions": permissions,
        "expires_at": (rng.below(3) == 0).then_some("2031-02-03T04:05:06Z"),
        "prefix": prefix,
        "secret_hash": hash(rng),
        "bootstrap": false,
    }}))
    .expect("an issue")
}

fn rotated(previous: &str, prefix: &str, rng: &mut Rng) -> ApiKeyEvent {
    ApiKeyEvent::ApiKeyRotated {
        prefix: prefix.into(),
        secret_hash: hash(rng),
        previous_prefix: previous.into(),
        previous_valid_until: None,
    }
}

/// A log the keys aggregate would accept, but for revocations repeated and rotations after
/// them, which the projection applies all the same. Returns the keys and their prefixes.
async fn key_log(ledger: &mut Ledger, seed: u64, steps: usize) -> (Uuid, Vec<(Uuid, String)>) {
    let org = Uuid::new_v4();
    let mut rng = Rng(seed);
    let mut keys: Vec<(Uuid, String)> = Vec::new();
    for step in 0..steps {
        let actor = Actor::api(org, None, Uuid::new_v4());
        let roll = rng.below(100);
        if keys.len() < 3 || roll < 35 {
            let (key, prefix) = (Uuid::new_v4(), format!("ll_{seed}_{step}"));
            let event = issued(key, org, &prefix, &mut rng);
            ledger.append("ApiKey", key, &event, &actor).await;
            keys.push((key, prefix));
            continue;
        }
        let i = rng.below(keys.len());
        let (key, previous) = keys[i].clone();
        let event = if roll < 75 {
            let prefix = format!("ll_{seed}_{step}_r");
            keys[i].1 = prefix.clone();
            rotated(&previous, &prefix, &mut rng)
        } else {
            ApiKeyEvent::ApiKeyRevoked {
                reason: (rng.below(2) == 0).then(|| format!("reason {step}")),
            }
        };
        ledger.append("ApiKey", key, &event, &actor).await;
    }
    (org, keys)
}

/// One test, so that the fallbacks the failing logs cause come after the count that must be
/// zero over the valid ones.
#[tokio::test]
async fn the_multi_row_path_agrees_with_one_event_at_a_time() {
    for seed in [11u64, 29, 0x1b87_3593] {
        let db = TestDb::new().await;
        let mut ledger = Ledger::new(&db.pool);
        key_log(&mut ledger, seed, 1500).await;
        assert_eq!(
            agrees_in_batches(&db.pool, Projection::ApiKeys, &[5000, 301, 64, 8]).await,
            None
        );
        let revoked: i64 =
            sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE status = 'revoked'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert!(revoked > 20, "keys are revoked: {revoked}");
        assert_eq!(bulk_fallbacks(), 0, "every batch of 8 or more was folded");
    }

    // Each case puts events the per-event code fails on, or that the fold must not take,
    // into the middle of a log.
    for case in 0..11 {
        let db = TestDb::new().await;
        let mut ledger = Ledger::new(&db.pool);
        let (org, keys) = key_log(&mut ledger, 300 + case, 200).await;
        let actor = Actor::api(org, None, Uuid::new_v4());
        let mut rng = Rng(case + 5);
        let ((a, a_prefix), (b, b_prefix)) = (keys[0].clone(), keys[1].clone());
        let stranger = Uuid::new_v4();
        let events: Vec<(Uuid, ApiKeyEvent)> = match case {
            // A key that was never issued, revoked or rotated.
            0 => vec![(stranger, ApiKeyEvent::ApiKeyRevoked { reason: None })],
            1 => vec![(stranger, rotated("nope", "ll_new", &mut rng))],
            // A rotation naming another previous prefix than the key's.
            2 => vec![(a, rotated(&b_prefix, "ll_new", &mut rng))],
            // Issued again, and issued naming another key.
            3 => vec![(a, issued(a, org, "ll_new", &mut rng))],
            4 => vec![(stranger, issued(Uuid::new_v4(), org, "ll_new", &mut rng))],
            // A prefix another key holds: issued with it; rotated to it, the holder letting
            // it go afterwards (one by one fails at the first).
            5 => vec![(stranger, issued(stranger, org, &b_prefix, &mut rng))],
            6 => vec![
                (a, rotated(&a_prefix, &b_prefix, &mut rng)),
                (b, rotated(&b_prefix, "ll_away", &mut rng)),
            ],
            // Given and let go again within the batch while another key holds it.
            7 => vec![
                (stranger, issued(stranger, org, &b_prefix, &mut rng)),
                (stranger, rotated(&b_prefix, "ll_away", &mut rng)),
            ],
            // A hash the table refuses, which a later rotation replaces.
            8 => {
                let mut bad = rotated(&a_prefix, "ll_bad", &mut rng);
                if let ApiKeyEvent::ApiKeyRotated { secret_hash, .. } = &mut bad {
                    *secret_hash = secret_hash.to_uppercase();
                }
                vec![(a, bad), (a, rotated("ll_bad", "ll_good", &mut rng))]
            }
            // A reason PostgreSQL's text refuses (a NUL), which a later revocation
            // replaces.
            9 => vec![
                (
                    a,
                    ApiKeyEvent::ApiKeyRevoked {
                        reason: Some("a\0b".into()),
                    },
                ),
                (a, ApiKeyEvent::ApiKeyRevoked { reason: None }),
            ],
            // The holder lets go first: one by one applies both.
            _ => vec![
                (b, rotated(&b_prefix, "ll_away", &mut rng)),
                (a, rotated(&a_prefix, &b_prefix, &mut rng)),
            ],
        };
        for (key, event) in &events {
            ledger.append("ApiKey", *key, event, &actor).await;
        }
        key_log(&mut ledger, 600 + case, 100).await;
        let failed = agrees_in_batches(&db.pool, Projection::ApiKeys, &[5000, 64, 8]).await;
        assert_eq!(failed.is_none(), case == 10, "case {case}: {failed:?}");
    }
}
