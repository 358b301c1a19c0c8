//! Unique claims for one append batch: loaded once under the ledger lock, decided in memory
//! in arrival order (all of a command's claims or none), saved once.

use std::collections::{HashMap, HashSet};

use ledgerline_aggregates::ClaimOp;
use sqlx::PgConnection;

use super::writer::Prepared;

/// The unique claims a batch touches: loaded once, decided in memory, saved once.
pub(super) struct ClaimBook {
    /// (scope, key) → owner, as stored before the batch.
    initial: HashMap<(&'static str, String), String>,
    current: HashMap<(&'static str, String), String>,
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

    /// Applies one command's claims, all or nothing. Err names the scope that is taken.
    pub(super) fn apply(&mut self, ops: &[ClaimOp], owner: &str) -> Result<(), &'static str> {
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
                    Some(o) if o != owner => return Err(op.scope()),
                    _ => {
                        next.insert(k, owner.to_string());
                    }
                },
            }
        }
        self.current = next;
        Ok(())
    }

    pub(super) async fn save(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let released: Vec<&(&'static str, String)> = self
            .initial
            .keys()
            .filter(|k| !self.current.contains_key(*k))
            .collect();
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
        let added: Vec<(&(&'static str, String), &String)> = self
            .current
            .iter()
            .filter(|(k, _)| !self.initial.contains_key(*k))
            .collect();
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
