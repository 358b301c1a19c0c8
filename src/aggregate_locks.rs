//! One command at a time per aggregate within this process.
//!
//! The ledger decides commands optimistically: two commands on one aggregate loaded at the
//! same sequence both decide, and the append refuses the second (a conflict, 409). Within
//! one process that race is avoidable, so commands on one aggregate take turns from load to
//! append ([`crate::app::App::execute_guarded`]): the second loads what the first appended
//! and decides on it. Many people marking one message read, or two edits of one user, then
//! all land, one commit after another, with no reload storms. Commands through other
//! `serve` processes still race and are refused as before (the append's check is what
//! guarantees one winner per sequence; this only spares the losses it can see).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

/// A lock per aggregate id, made on first use and forgotten when nobody holds or waits for it.
#[derive(Default)]
pub struct AggregateLocks {
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

/// The turn on one aggregate; the next waiting command goes when it is dropped.
pub struct AggregateLock<'a> {
    locks: &'a AggregateLocks,
    id: Uuid,
    // Both `None` only while dropping: the guard goes first, then this handle, then the
    // table's entry if this was the last handle.
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
    held: Option<OwnedMutexGuard<()>>,
}

impl AggregateLocks {
    /// Waits for the turn on aggregate `id` (first come, first served: tokio's mutex is fair).
    pub async fn lock(&self, id: Uuid) -> AggregateLock<'_> {
        let lock = self.table().entry(id).or_default().clone();
        let mut turn = AggregateLock {
            locks: self,
            id,
            lock: Some(lock.clone()),
            held: None,
        };
        // Dropped while waiting (a client that hung up), the wait's own handle goes first
        // (it lives in an inner scope), then `turn`, whose drop tidies the table.
        turn.held = Some(lock.lock_owned().await);
        turn
    }

    /// How many aggregates have a lock held or waited for (for tests).
    pub fn in_use(&self) -> usize {
        self.table().len()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>> {
        // Nothing runs under this mutex that can panic, so a poisoned one holds a whole map.
        self.locks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for AggregateLock<'_> {
    fn drop(&mut self) {
        drop(self.held.take());
        drop(self.lock.take());
        let mut table = self.locks.table();
        // Only the table's own handle left: no holder, no waiter (a waiter clones the handle
        // under this same mutex before it waits). Removed so the table does not grow with
        // every aggregate ever commanded.
        if table
            .get(&self.id)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            table.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_holder_at_a_time_per_id_and_the_table_empties() {
        let locks = Arc::new(AggregateLocks::default());
        let (id, other) = (Uuid::new_v4(), Uuid::new_v4());
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (locks, inside, most) = (locks.clone(), inside.clone(), most.clone());
                tokio::spawn(async move {
                    let _turn = locks.lock(id).await;
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        // Another aggregate's turn is not held up by them.
        let _other = tokio::time::timeout(Duration::from_secs(1), locks.lock(other))
            .await
            .expect("another id's lock is free");
        drop(_other);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "two held one id's lock at once"
        );
        assert_eq!(locks.in_use(), 0, "locks nobody holds are forgotten");
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_the_lock_working() {
        let locks = AggregateLocks::default();
        let id = Uuid::new_v4();
        let held = locks.lock(id).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(20), locks.lock(id)).await;
        assert!(gave_up.is_err(), "the lock was held");
        drop(held);
        assert_eq!(locks.in_use(), 0);
        let again = tokio::time::timeout(Duration::from_secs(1), locks.lock(id)).await;
        assert!(
            again.is_ok(),
            "the lock is free once its holder and waiter are gone"
        );
    }

    #[tokio::test]
    async fn a_waiter_dropped_after_its_turn_came_leaves_nothing_behind() {
        let locks = AggregateLocks::default();
        let id = Uuid::new_v4();
        let held = locks.lock(id).await;
        let mut waiter = Box::pin(locks.lock(id));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            waiter.as_mut().poll(&mut cx).is_pending(),
            "queued behind the holder"
        );
        // The holder leaves: the turn passes to the waiter, which is dropped unpolled.
        drop(held);
        drop(waiter);
        assert_eq!(locks.in_use(), 0, "the last to leave removes the entry");
        let again = tokio::time::timeout(Duration::from_secs(1), locks.lock(id)).await;
        assert!(again.is_ok(), "the turn it was given came back");
    }
}
