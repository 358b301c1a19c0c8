//! The unique claims against the log (`ledgerline claims check`). `unique_claims` (organization
//! names and slugs, e-mail addresses, role names, key prefixes) is written by the writer in
//! each append's own transaction (`claim_book.rs`); it is not a read model, so no rebuild
//! redoes it, and a writer bug leaves its mark there for good (one did: a key released and
//! claimed by another owner in one batch kept its old owner). This folds the claims every
//! event implies, with the writer's own derivation (`claims_for`), in position order, compares
//! the result with the table, and, when asked, rewrites the rows that differ.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use ledgerline_aggregates::{claims_for, ClaimOp, CLAIMING_AGGREGATES};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::writer::APPEND_LOCK;

/// (scope, key) → owner (`<aggregate type>:<aggregate id>`), as the table keeps them.
type Claims = BTreeMap<(String, String), String>;

#[derive(Debug, thiserror::Error)]
pub enum ClaimsError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// An event the writer could never have derived claims from: `verify` says whether the
    /// log was tampered with.
    #[error("the event at position {position} cannot be read for its claims: {error}")]
    Undecodable { position: i64, error: String },
    /// `--repair` writes what the log says: not from a log that does not verify.
    #[error(
        "not repairing: the log does not verify ({why}); a repair would write a forger's \
         claims; see `ledgerline verify`"
    )]
    Untrusted { why: String },
}

/// One key whose owner in the table is not the one the log gives it (`None`: no owner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClaimDifference {
    pub scope: String,
    pub key: String,
    pub in_table: Option<String>,
    pub from_log: Option<String>,
}

/// An event that claims a key another owner held at the time: the log itself holds two
/// owners of one name, which only a faulty writer lets through. The first holder keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Contest {
    pub position: i64,
    pub scope: String,
    pub key: String,
    pub holder: String,
    pub claimant: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClaimsReport {
    /// The last position folded.
    pub position: i64,
    /// Events of the claiming aggregates read.
    pub events: u64,
    /// Claims the log gives, held at `position`.
    pub claims: usize,
    pub differences: Vec<ClaimDifference>,
    pub contests: Vec<Contest>,
    /// Whether `differences` were rewritten in the table.
    pub repaired: bool,
}

impl ClaimsReport {
    /// The table holds exactly the claims the log gives.
    pub fn consistent(&self) -> bool {
        self.differences.is_empty()
    }
}

/// The claims of the log up to `position`, grown event by event.
#[derive(Default)]
struct Fold {
    claims: Claims,
    position: i64,
    events: u64,
    contests: Vec<Contest>,
}

impl Fold {
    /// Folds the events after `self.position`, as `conn` sees them.
    async fn advance(&mut self, conn: &mut PgConnection) -> Result<(), ClaimsError> {
        let head: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events")
            .fetch_one(&mut *conn)
            .await?;
        let mut rows = sqlx::query_as::<_, (i64, String, String, Option<Uuid>, String)>(
            "SELECT position, aggregate_type, aggregate_id, organization_id, payload::text \
             FROM events WHERE position > $1 AND aggregate_type = ANY($2) ORDER BY position",
        )
        .bind(self.position)
        .bind(&CLAIMING_AGGREGATES[..])
        .fetch(&mut *conn);
        while let Some((position, aggregate_type, aggregate_id, tenant, payload)) =
            rows.try_next().await?
        {
            let undecodable = |error: String| ClaimsError::Undecodable { position, error };
            let payload = serde_json::from_str(&payload).map_err(|e| undecodable(e.to_string()))?;
            let ops = claims_for(&aggregate_type, tenant, &payload)
                .map_err(|e| undecodable(e.to_string()))?;
            self.apply(position, &ops, &format!("{aggregate_type}:{aggregate_id}"));
            self.events += 1;
        }
        self.position = self.position.max(head.unwrap_or(0));
        Ok(())
    }

    /// As the writer's claim book applies an accepted command's claims.
    fn apply(&mut self, position: i64, ops: &[ClaimOp], owner: &str) {
        for op in ops {
            let key = (op.scope().to_string(), op.key().to_string());
            match op {
                ClaimOp::Release { .. } => {
                    if self.claims.get(&key).is_some_and(|o| o == owner) {
                        self.claims.remove(&key);
                    }
                }
                ClaimOp::Claim { .. } => match self.claims.get(&key) {
                    Some(holder) if holder != owner => self.contests.push(Contest {
                        position,
                        scope: key.0,
                        key: key.1,
                        holder: holder.clone(),
                        claimant: owner.to_string(),
                    }),
                    _ => {
                        self.claims.insert(key, owner.to_string());
                    }
                },
            }
        }
    }
}

async fn table(conn: &mut PgConnection) -> sqlx::Result<Claims> {
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT scope, key, owner FROM unique_claims")
            .fetch_all(conn)
            .await?;
    Ok(rows.into_iter().map(|(s, k, o)| ((s, k), o)).collect())
}

fn differing(table: &Claims, log: &Claims) -> Vec<ClaimDifference> {
    let mut keys: Vec<&(String, String)> = table.keys().chain(log.keys()).collect();
    keys.sort_unstable();
    keys.dedup();
    keys.into_iter()
        .filter(|k| table.get(*k) != log.get(*k))
        .map(|k| ClaimDifference {
            scope: k.0.clone(),
            key: k.1.clone(),
            in_table: table.get(k).cloned(),
            from_log: log.get(k).cloned(),
        })
        .collect()
}

/// Compares `unique_claims` with the claims the log gives. With `repair`, rewrites the rows
/// that differ, once the log verifies (chain and checkpoints): under the ledger's append
/// lock, so that no append takes or releases a claim meanwhile, and after folding what was
/// appended since the comparison; appends wait only for that part and the rewrite.
pub async fn check_claims(pool: &PgPool, repair: bool) -> Result<ClaimsReport, ClaimsError> {
    let mut fold = Fold::default();
    // One snapshot for the log and the table, which appends change together.
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    fold.advance(&mut tx).await?;
    let mut differences = differing(&table(&mut tx).await?, &fold.claims);
    tx.commit().await?;
    let mut repaired = false;
    if repair && !differences.is_empty() {
        if let Err(why) = crate::auditor::verify_before_trusting(pool).await? {
            return Err(ClaimsError::Untrusted { why });
        }
        let mut tx = pool.begin().await?;
        // Every append waits for this lock, and gives up after 12 s counting on its holders
        // to idle 10 s at most: a frozen repair must not hold it for as long as TCP keeps it.
        ledgerline_projections::lease::idle_limit(&mut tx).await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(APPEND_LOCK)
            .execute(&mut *tx)
            .await?;
        fold.advance(&mut tx).await?;
        differences = differing(&table(&mut tx).await?, &fold.claims);
        rewrite(&mut tx, &differences).await?;
        tx.commit().await?;
        repaired = true;
    }
    Ok(ClaimsReport {
        position: fold.position,
        events: fold.events,
        claims: fold.claims.len(),
        differences,
        contests: fold.contests,
        repaired,
    })
}

/// Each differing key: its row deleted, and inserted with the log's owner if it has one.
/// Two statements: an `INSERT` does not see the rows a `DELETE` in the same statement removed.
async fn rewrite(conn: &mut PgConnection, differences: &[ClaimDifference]) -> sqlx::Result<()> {
    let scopes: Vec<&str> = differences.iter().map(|d| d.scope.as_str()).collect();
    let keys: Vec<&str> = differences.iter().map(|d| d.key.as_str()).collect();
    let owners: Vec<Option<&str>> = differences.iter().map(|d| d.from_log.as_deref()).collect();
    sqlx::query(
        "DELETE FROM unique_claims c USING unnest($1::text[], $2::text[]) AS d(scope, key) \
         WHERE c.scope = d.scope AND c.key = d.key",
    )
    .bind(&scopes)
    .bind(&keys)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO unique_claims (scope, key, owner) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS d(scope, key, owner) \
         WHERE owner IS NOT NULL",
    )
    .bind(&scopes)
    .bind(&keys)
    .bind(&owners)
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(rows: &[(&str, &str, &str)]) -> Claims {
        rows.iter()
            .map(|(s, k, o)| ((s.to_string(), k.to_string()), o.to_string()))
            .collect()
    }

    #[test]
    fn differences_name_each_key_with_both_owners() {
        let table = claims(&[
            ("role_name", "o:ops", "Role:r1"),
            ("role_name", "o:dev", "Role:r3"),
        ]);
        let log = claims(&[
            ("role_name", "o:ops", "Role:r2"),
            ("role_name", "o:qa", "Role:r4"),
        ]);
        let d = differing(&table, &log);
        let seen: Vec<(&str, Option<&str>, Option<&str>)> = d
            .iter()
            .map(|d| (d.key.as_str(), d.in_table.as_deref(), d.from_log.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [
                ("o:dev", Some("Role:r3"), None),
                ("o:ops", Some("Role:r1"), Some("Role:r2")),
                ("o:qa", None, Some("Role:r4")),
            ]
        );
        assert!(differing(&log, &log).is_empty());
    }

    #[test]
    fn a_second_owner_claiming_a_held_key_is_a_contest_and_the_first_keeps_it() {
        let claim = |k: &str| ClaimOp::Claim {
            scope: "role_name",
            key: k.into(),
        };
        let release = |k: &str| ClaimOp::Release {
            scope: "role_name",
            key: k.into(),
        };
        let mut f = Fold::default();
        f.apply(1, &[claim("o:ops")], "Role:r1");
        f.apply(2, &[claim("o:ops")], "Role:r2");
        // Another owner's release leaves the key alone.
        f.apply(3, &[release("o:ops")], "Role:r2");
        assert_eq!(f.claims, claims(&[("role_name", "o:ops", "Role:r1")]));
        assert_eq!(
            f.contests,
            [Contest {
                position: 2,
                scope: "role_name".into(),
                key: "o:ops".into(),
                holder: "Role:r1".into(),
                claimant: "Role:r2".into(),
            }]
        );
        f.apply(4, &[release("o:ops")], "Role:r1");
        f.apply(5, &[claim("o:ops")], "Role:r2");
        assert_eq!(f.claims, claims(&[("role_name", "o:ops", "Role:r2")]));
    }
}
