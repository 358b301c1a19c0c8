//! Unique claims for one append batch: loaded once under the ledger lock, decided in memory
//! in arrival order (all of a command's claims or none), saved once.

use std::collections::{HashMap, HashSet};

use ledgerline_aggregates::ClaimOp;
use sqlx::PgConnection;

use super::writer::Prepared;

/// A claim's (scope, key).
type Key = (&'static str, String);

/// The unique claims a batch touches: loaded once, decided in memory, saved once.
pub(super) struct ClaimBook {
    /// (scope, key) → owner, as stored before the batch.
    initial: HashMap<Key, String>,
    current: HashMap<Key, String>,
}

impl ClaimBook {
    pub(super) async fn load(
        conn: &mut PgConnection,
        batch: &[Prepared],
    ) -> Result<Self, sqlx::Error> {
        let wanted: HashSet<(&'static str, &str)> = batch
            .iter()
            .flat_map(|p| p.claims.iter().map(|c| (c.scope(), c.key())))
            .collect();
        let mut initial = HashMap::new();
        if !wanted.is_empty() {
            let scopes: Vec<&str> = wanted.iter().map(|(s, _)| *s).collect();
            let keys: Vec<&str> = wanted.iter().map(|(_, k)| *k).collect();
            let rows: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT c.scope, c.key, c.owner FROM unique_claims c
                 JOIN unnest($1::text[], $2::text[]) AS w(scope, key) USING (scope, key)",
            )
            .bind(&scopes)
            .bind(&keys)
            .fetch_all(&mut *conn)
            .await?;
            for (scope, key, owner) in rows {
                if let Some((s, _)) = wanted.iter().find(|(s, _)| *s == scope) {
                    initial.insert((*s, key), owner);
                }
            }
        }
        Ok(Self {
            current: initial.clone(),
            initial,
        })
    }

    /// Applies one command's claims, all or nothing. Err names the scope that is taken and
    /// its holder (`<aggregate type>:<id>`), which the API names to a caller who may read it.
    pub(super) fn apply(
        &mut self,
        ops: &[ClaimOp],
        owner: &str,
    ) -> Result<(), (&'static str, String)> {
        let mut next = self.current.clone();
        for op in ops {
            let k = (op.scope(), op.key().to_string());
            match op {
                ClaimOp::Release { .. } => {
                    if next.get(&k).is_some_and(|o| o == owner) {
                        next.remove(&k);
                    }
                }
                ClaimOp::Claim { .. } => match next.get(&k) {
                    Some(o) if o != owner => return Err((op.scope(), o.clone())),
                    _ => {
                        next.insert(k, owner.to_string());
                    }
                },
            }
        }
        self.current = next;
        Ok(())
    }

    /// What the batch changed: keys to delete (released, or passed to another owner) and
    /// (key, owner) rows to insert (claimed anew, or by the new owner). A key released and
    /// claimed by another owner within the batch is in both: compared by key alone, it
    /// would keep its old owner in the table, and both owners could claim it again later.
    fn changes(&self) -> (Vec<&Key>, Vec<(&Key, &String)>) {
        let released = self
            .initial
            .iter()
            .filter(|(k, owner)| self.current.get(*k) != Some(*owner))
            .map(|(k, _)| k)
            .collect();
        let added = self
            .current
            .iter()
            .filter(|(k, owner)| self.initial.get(*k) != Some(*owner))
            .collect();
        (released, added)
    }

    pub(super) async fn save(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let (released, added) = self.changes();
        if !released.is_empty() {
            let scopes: Vec<&str> = released.iter().map(|(s, _)| *s).collect();
            let keys: Vec<&str> = released.iter().map(|(_, k)| k.as_str()).collect();
            sqlx::query(
                "DELETE FROM unique_claims c USING unnest($1::text[], $2::text[]) AS r(scope, key)
                 WHERE c.scope = r.scope AND c.key = r.key",
            )
            .bind(&scopes)
            .bind(&keys)
            .execute(&mut *conn)
            .await?;
        }
        if !added.is_empty() {
            let scopes: Vec<&str> = added.iter().map(|((s, _), _)| *s).collect();
            let keys: Vec<&str> = added.iter().map(|((_, k), _)| k.as_str()).collect();
            let owners: Vec<&str> = added.iter().map(|(_, o)| o.as_str()).collect();
            sqlx::query(
                "INSERT INTO unique_claims (scope, key, owner)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[])",
            )
            .bind(&scopes)
            .bind(&keys)
            .bind(&owners)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ledgerline_aggregates::ClaimOp;

    use super::ClaimBook;

    fn book(initial: &[(&'static str, &str, &str)]) -> ClaimBook {
        let initial: HashMap<_, _> = initial
            .iter()
            .map(|(s, k, o)| ((*s, k.to_string()), o.to_string()))
            .collect();
        ClaimBook {
            current: initial.clone(),
            initial,
        }
    }

    fn claim(key: &str) -> ClaimOp {
        ClaimOp::Claim {
            scope: "role_name",
            key: key.into(),
        }
    }

    fn release(key: &str) -> ClaimOp {
        ClaimOp::Release {
            scope: "role_name",
            key: key.into(),
        }
    }

    /// One batch: R1 renames "ops" to "ops-old", then R2 is created as "ops".
    #[test]
    fn a_key_passed_to_another_owner_in_one_batch_is_rewritten_for_it() {
        let mut b = book(&[("role_name", "o:ops", "Role:r1")]);
        b.apply(&[release("o:ops"), claim("o:ops-old")], "Role:r1")
            .unwrap();
        b.apply(&[claim("o:ops")], "Role:r2").unwrap();
        let (released, added) = b.changes();
        assert_eq!(released, [&("role_name", "o:ops".to_string())]);
        let mut added: Vec<(&str, &str)> = added
            .iter()
            .map(|((_, k), o)| (k.as_str(), o.as_str()))
            .collect();
        added.sort_unstable();
        assert_eq!(added, [("o:ops", "Role:r2"), ("o:ops-old", "Role:r1")]);
    }

    #[test]
    fn unchanged_keys_are_not_written() {
        let mut b = book(&[("role_name", "o:ops", "Role:r1")]);
        b.apply(&[claim("o:ops")], "Role:r1").unwrap();
        let (released, added) = b.changes();
        assert!(released.is_empty() && added.is_empty());
        // Released and claimed back by the same owner in one batch: nothing to write either.
        b.apply(&[release("o:ops")], "Role:r1").unwrap();
        b.apply(&[claim("o:ops")], "Role:r1").unwrap();
        let (released, added) = b.changes();
        assert!(released.is_empty() && added.is_empty());
    }

    #[test]
    fn another_owners_key_is_refused() {
        let mut b = book(&[("role_name", "o:ops", "Role:r1")]);
        assert_eq!(
            b.apply(&[claim("o:ops")], "Role:r2"),
            Err(("role_name", "Role:r1".to_string()))
        );
        let (released, added) = b.changes();
        assert!(released.is_empty() && added.is_empty());
    }
}
