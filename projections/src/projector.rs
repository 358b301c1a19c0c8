//! The background side of the runner: one task per projection that keeps its read model up
//! to the ledger's head, and a handle to wait for a position (read-your-writes) or stop.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{run_batch, BatchOutcome, Projection};

/// Settings of the projection tasks; [`Projector::spawn`] uses the defaults.
#[derive(Debug, Clone, Copy)]
pub struct Projector {
    /// Events per transaction.
    pub batch_size: i64,
    /// How often to look for events without being told of a new head: events written by
    /// other processes, and failures cleared by `retry`.
    pub poll_interval: Duration,
}

impl Default for Projector {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// What a projection task has reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    checkpoint: i64,
    /// The position the projection is stopped at, if it is.
    failed_at: Option<i64>,
}

/// The running projection tasks. Dropping it also stops them (after their current batch),
/// but only [`ProjectorHandle::shutdown`] waits for that.
#[derive(Debug)]
pub struct ProjectorHandle {
    progress: Vec<(&'static str, watch::Receiver<Progress>)>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Projector {
    /// Starts one task per projection. `head` carries the ledger's last committed position;
    /// the writer publishes it after each commit so projections wake at once.
    pub fn spawn(pool: PgPool, head: watch::Receiver<i64>) -> ProjectorHandle {
        Projector::default().start(pool, head)
    }

    pub fn start(self, pool: PgPool, head: watch::Receiver<i64>) -> ProjectorHandle {
        let (shutdown, stop) = watch::channel(false);
        let mut progress = Vec::new();
        let mut tasks = Vec::new();
        for projection in Projection::ALL {
            let (tx, rx) = watch::channel(Progress {
                checkpoint: 0,
                failed_at: None,
            });
            progress.push((projection.name(), rx));
            let task = run(
                self,
                projection,
                pool.clone(),
                head.clone(),
                stop.clone(),
                tx,
            );
            tasks.push(tokio::spawn(task));
        }
        ProjectorHandle {
            progress,
            shutdown,
            tasks,
        }
    }
}

impl ProjectorHandle {
    /// Waits until every projection has applied `position`. False on timeout, or at once if
    /// a projection is stopped at or before `position` (it will not get there by itself).
    pub async fn wait_for(&self, position: i64, timeout: Duration) -> bool {
        let all = async {
            for (_, rx) in &self.progress {
                let mut rx = rx.clone();
                let reached = rx
                    .wait_for(|p| {
                        p.checkpoint >= position || p.failed_at.is_some_and(|f| f <= position)
                    })
                    .await
                    .is_ok_and(|p| p.checkpoint >= position);
                if !reached {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(timeout, all).await.unwrap_or(false)
    }

    /// The last checkpoint each task has reported, by projection name.
    pub fn checkpoints(&self) -> Vec<(&'static str, i64)> {
        self.progress
            .iter()
            .map(|(name, rx)| (*name, rx.borrow().checkpoint))
            .collect()
    }

    /// Stops the tasks after their current batch and waits for them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "projection task ended abnormally");
            }
        }
    }
}

async fn run(
    config: Projector,
    projection: Projection,
    pool: PgPool,
    mut head: watch::Receiver<i64>,
    mut stop: watch::Receiver<bool>,
    progress: watch::Sender<Progress>,
) {
    let name = projection.name();
    let mut head_open = true;
    loop {
        if *stop.borrow() {
            break;
        }
        // Marks the head as seen: a commit published while the batch runs wakes us again.
        head.borrow_and_update();
        let caught_up = match run_batch(&pool, projection, config.batch_size).await {
            Ok(BatchOutcome::Applied {
                applied,
                checkpoint,
            }) => {
                publish(
                    &progress,
                    Progress {
                        checkpoint,
                        failed_at: None,
                    },
                );
                // A short batch has read every committed event.
                (applied as i64) < config.batch_size
            }
            Ok(BatchOutcome::Failed {
                checkpoint,
                failure,
            }) => {
                publish(
                    &progress,
                    Progress {
                        checkpoint,
                        failed_at: Some(failure.position),
                    },
                );
                true
            }
            Err(e) => {
                tracing::warn!(projection = name, error = %e, "projection batch failed; will retry");
                true
            }
        };
        if caught_up {
            tokio::select! {
                changed = head.changed(), if head_open => head_open = changed.is_ok(),
                _ = tokio::time::sleep(config.poll_interval) => {}
                changed = stop.changed() => if changed.is_err() { break },
            }
        }
    }
    tracing::debug!(projection = name, "projection task stopped");
}

fn publish(progress: &watch::Sender<Progress>, now: Progress) {
    progress.send_if_modified(|p| std::mem::replace(p, now) != now);
}
