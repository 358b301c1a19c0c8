//! Per-organization turns: a transaction-scoped advisory lock that commands which must not
//! interleave within one organization take, across every `serve` process (the owner rule in
//! [`super::owners`], changes to the role tree in [`super::role_tree`]).
//!
//! A turn holds a pool connection for as long as it lasts, and a turn's work needs more
//! connections besides (its command, the read models it waits for). So within a process,
//! requests first wait for their organization's turn in memory, holding no connection, and
//! only a few turns of a kind may hold connections at once: else a burst of them (a bulk
//! offboarding) would hold every connection of the pool while waiting on one lock, and starve
//! the turn that holds it and every other request with it.

use std::sync::Arc;

use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

/// One kind of turn.
pub struct Turns {
    /// Prefixes the organization's id in the lock's key, as `hashtextextended` hashes it.
    lock_name: &'static str,
    /// Striped by organization; two organizations sharing a stripe merely take turns too.
    queues: Vec<Arc<Mutex<()>>>,
    permits: Arc<Semaphore>,
}

/// A turn taken: ends when dropped or when its transaction is rolled back (the transaction
/// only holds the lock).
pub struct Turn {
    pub tx: Transaction<'static, Postgres>,
    _queued: OwnedMutexGuard<()>,
    _permit: OwnedSemaphorePermit,
}

impl Turns {
    /// `at_once`: how many turns of this kind may hold a connection at once in a process.
    pub fn new(lock_name: &'static str, at_once: usize) -> Self {
        Self {
            lock_name,
            queues: (0..64).map(|_| Arc::new(Mutex::new(()))).collect(),
            permits: Arc::new(Semaphore::new(at_once)),
        }
    }

    pub async fn take(&self, pool: &PgPool, org: Uuid) -> sqlx::Result<Turn> {
        let stripe = (org.as_u128() % self.queues.len() as u128) as usize;
        let queued = self.queues[stripe].clone().lock_owned().await;
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || $2, 0))")
            .bind(self.lock_name)
            .bind(org.to_string())
            .execute(&mut *tx)
            .await?;
        Ok(Turn {
            tx,
            _queued: queued,
            _permit: permit,
        })
    }
}
