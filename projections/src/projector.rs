//! The background side of the runner: one task per projection that keeps its read model up
//! to the ledger's head, and a handle to wait for a position (read-your-writes) or stop.
//!
//! With several processes on one database, each projection runs where its lease
//! (`projection:<name>`) is held; the other processes follow its progress from the
//! checkpoint notifications (and a poll), so their commands can still wait for it.
//!
//! A projection runs a batch only when the log has an event it reads ([`crate::tail`]);
//! events it does not read it passes over in memory, writing its checkpoint at its next
//! poll. Waiting for a position takes that into account, in every process.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::lease::{Lease, LeaseConfig, Leasing, DEFAULT_TTL};
use crate::notify::{self, Deliver};
use crate::runner::run_leased_batch;
use crate::tail::{self, Window};
use crate::{BatchOutcome, Projection, RunError};

/// Settings of the projection tasks; [`Projector::spawn`] uses the defaults.
#[derive(Debug, Clone, Copy)]
pub struct Projector {
    /// Events per transaction.
    pub batch_size: i64,
    /// How often to look for events, or at the progress of a projection another process
    /// runs, without being told: the fallback for lost notifications, and how failures
    /// cleared by `retry` are found.
    pub poll_interval: Duration,
    /// How long a projection's lease lasts unless renewed (every third of it).
    pub lease_ttl: Duration,
    /// A projection more events than this behind a command's position is catching up (it
    /// was added or reset, or every process was stopped for long): commands do not wait
    /// for it, as they could not within their timeout, and every command would otherwise
    /// take that whole timeout until it is done.
    pub catching_up: i64,
    /// How long a batch may take before its session is ended and it is tried again
    /// (`runner::run_leased_batch`); a batch takes milliseconds, or as long as a rebuild's
    /// swap holds its checkpoint row.
    pub stall_limit: Duration,
}

impl Default for Projector {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            lease_ttl: DEFAULT_TTL,
            catching_up: 10_000,
            stall_limit: Duration::from_secs(30),
        }
    }
}

/// What a projection task has reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    checkpoint: i64,
    /// The position the projection is stopped at, if it is.
    failed_at: Option<i64>,
    /// Whether the task has learnt where the projection stands (at start-up it has not:
    /// a checkpoint of 0 then says nothing about catching up).
    known: bool,
    /// How many resets this process has heard of: a batch that began before one reports
    /// nothing (see [`publish`]).
    resets: u64,
}

/// The running projection tasks. Dropping it also stops them (after their current batch),
/// but only [`ProjectorHandle::shutdown`] waits for that (and for their leases' release).
#[derive(Debug)]
pub struct ProjectorHandle {
    progress: Vec<(Projection, watch::Receiver<Progress>)>,
    head: watch::Receiver<i64>,
    window: watch::Receiver<Window>,
    leasing: Leasing,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    catching_up: i64,
}

impl Projector {
    /// Starts one task per projection. `head` carries the last position this process
    /// committed; the writer publishes it after each commit so projections wake at once.
    pub fn spawn(pool: PgPool, head: watch::Receiver<i64>) -> ProjectorHandle {
        Projector::default().start(pool, head)
    }

    pub fn start(self, pool: PgPool, local_head: watch::Receiver<i64>) -> ProjectorHandle {
        let (shutdown, stop) = watch::channel(false);
        let (head_tx, head) = watch::channel(*local_head.borrow());
        let (released_tx, released) = watch::channel(0u64);
        let (resync_tx, resync) = watch::channel(0u64);
        let (window_tx, window) = watch::channel(Window::default());
        let leasing = Leasing {
            config: LeaseConfig::new(self.lease_ttl),
            released,
        };
        let mut progress = Vec::new();
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        for projection in Projection::ALL {
            let (tx, rx) = watch::channel(Progress {
                checkpoint: 0,
                failed_at: None,
                known: false,
                resets: 0,
            });
            progress.push((projection, rx));
            senders.push((projection.name(), tx.clone()));
            let task = run(
                self,
                projection,
                pool.clone(),
                tx,
                leasing.clone(),
                Wakeups {
                    window: window.clone(),
                    resync: resync.clone(),
                    stop: stop.clone(),
                },
            );
            tasks.push(tokio::spawn(task));
        }
        tasks.push(tokio::spawn(tail::follow(
            pool.clone(),
            window_tx,
            head.clone(),
            self.poll_interval,
            stop.clone(),
        )));
        tasks.push(tokio::spawn(notify::forward(
            local_head,
            head_tx.clone(),
            stop.clone(),
        )));
        let deliver = Deliver {
            head: head_tx,
            released: released_tx,
            resync: resync_tx,
            checkpoint: move |name: &str, position: i64| {
                if let Some((_, tx)) = senders.iter().find(|(n, _)| *n == name) {
                    tx.send_if_modified(|p| advanced(p, position));
                }
            },
        };
        let listen_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            notify::listen(&pool, deliver, listen_stop).await;
        }));
        ProjectorHandle {
            progress,
            head,
            window,
            leasing,
            shutdown,
            tasks: Mutex::new(tasks),
            catching_up: self.catching_up,
        }
    }
}

/// Moves `p` to a checkpoint a batch (of any process) reported; a checkpoint at or past the
/// failed position means the failure was cleared and the event applied. Notifications
/// arrive in commit order and checkpoints only go back by `reset`, so a lower one is a
/// reset: taken too, or the projection would count as having reached positions past
/// events its emptied tables no longer show. (This process's own batch may briefly be
/// shown lower, by a notification still in flight: that only makes a wait longer.)
fn advanced(p: &mut Progress, checkpoint: i64) -> bool {
    if checkpoint == p.checkpoint && p.known {
        return false;
    }
    // A reset says 0; a batch's notification, the position it reached (at least 1). A reset
    // deletes the projection's failures too.
    if checkpoint == 0 && p.checkpoint > 0 {
        p.resets += 1;
        p.failed_at = None;
    }
    p.checkpoint = checkpoint;
    p.known = true;
    if p.failed_at.is_some_and(|f| f <= checkpoint) {
        p.failed_at = None;
    }
    true
}

/// What [`ProjectorHandle::wait`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waited {
    /// Each projection found stopped at or before the position, with the position it is
    /// stopped at (not waited for).
    pub stopped: Vec<(&'static str, i64)>,
    /// Whether the time ran out (or the projector ended) before the others got there; the
    /// projections not looked at by then may be stopped too.
    pub timed_out: bool,
}

impl Waited {
    /// Every projection got there.
    pub fn all_there(&self) -> bool {
        !self.timed_out && self.stopped.is_empty()
    }
}

impl ProjectorHandle {
    /// Waits until every projection has reached `position`: applied every event up to it
    /// that it reads. False on timeout, or if a projection is stopped at or before `position`
    /// (it will not get there by itself: not waited for, while the others still are, so
    /// that one stopped projection leaves the rest read-your-writes). A projection that is
    /// catching up ([`Projector::catching_up`]) is not waited for. A projection reset by
    /// another process counts as where it was until the reset's notification arrives.
    pub async fn wait_for(&self, position: i64, timeout: Duration) -> bool {
        self.wait(position, timeout).await.all_there()
    }

    /// [`ProjectorHandle::wait_for`] for `projections` alone, those catching up included: for
    /// a decision that must read what they show. A stopped one is not waited for (false).
    pub async fn wait_for_these(
        &self,
        projections: &[Projection],
        position: i64,
        timeout: Duration,
    ) -> bool {
        self.wait_among(projections, i64::MAX, position, timeout)
            .await
            .all_there()
    }

    /// [`ProjectorHandle::wait_for`], saying which projections were stopped and whether
    /// time ran out: a caller that logs the outcome tells a stop, which lasts until someone
    /// acts, from a slow moment.
    pub async fn wait(&self, position: i64, timeout: Duration) -> Waited {
        self.wait_among(&Projection::ALL, self.catching_up, position, timeout)
            .await
    }

    /// Waits for `projections`, passing over those more than `catching_up` events behind.
    async fn wait_among(
        &self,
        projections: &[Projection],
        catching_up: i64,
        position: i64,
        timeout: Duration,
    ) -> Waited {
        let mut stopped = Vec::new();
        let all = async {
            let waited = self
                .progress
                .iter()
                .filter(|(p, _)| projections.contains(p));
            for (projection, rx) in waited {
                let (mut rx, mut window) = (rx.clone(), self.window.clone());
                let p = *rx.borrow();
                let behind = position - reach(*projection, p, &window.borrow());
                if p.known && p.failed_at.is_none() && behind > catching_up {
                    tracing::debug!(
                        projection = projection.name(),
                        behind,
                        "catching up: commands do not wait for it"
                    );
                    continue;
                }
                loop {
                    let p = *rx.borrow_and_update();
                    if reach(*projection, p, &window.borrow_and_update()) >= position {
                        break;
                    }
                    if let Some(failed_at) = p.failed_at.filter(|f| *f <= position) {
                        stopped.push((projection.name(), failed_at));
                        break;
                    }
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { return false },
                        changed = window.changed() => if changed.is_err() { return false },
                    }
                }
            }
            true
        };
        let finished = tokio::time::timeout(timeout, all).await.unwrap_or(false);
        Waited {
            stopped,
            timed_out: !finished,
        }
    }

    /// Whether every projection has reached `position` now, those catching up included
    /// (which [`ProjectorHandle::wait_for`] does not wait for).
    pub fn reached(&self, position: i64) -> bool {
        let window = self.window.borrow();
        self.progress
            .iter()
            .all(|(projection, rx)| reach(*projection, *rx.borrow(), &window) >= position)
    }

    /// How far each projection has got, by name: its last reported checkpoint, moved past
    /// the following events it does not read.
    pub fn checkpoints(&self) -> Vec<(&'static str, i64)> {
        let window = self.window.borrow();
        self.progress
            .iter()
            .map(|(projection, rx)| (projection.name(), reach(*projection, *rx.borrow(), &window)))
            .collect()
    }

    /// The newest ledger head this process knows of: its own commits and, from their
    /// notifications, every other process's.
    pub fn head(&self) -> watch::Receiver<i64> {
        self.head.clone()
    }

    /// This process's lease identity, for other leased tasks (the log maintainer).
    pub fn leasing(&self) -> Leasing {
        self.leasing.clone()
    }

    /// Stops the tasks after their current batch, releases their leases, and waits.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("not poisoned"));
        for task in tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "projection task ended abnormally");
            }
        }
    }
}

/// How far a projection has effectively got (see [`Window::reach`]); never past the event
/// it is stopped at.
fn reach(projection: Projection, p: Progress, window: &Window) -> i64 {
    let reach = window.reach(projection, p.checkpoint);
    p.failed_at
        .map_or(reach, |f| reach.min(f - 1).max(p.checkpoint))
}

/// What wakes a projection task besides its timers.
struct Wakeups {
    /// The log's new events, committed by this process or (notified) another.
    window: watch::Receiver<Window>,
    /// The listener (re)subscribed: notifications may have been lost.
    resync: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
}

async fn run(
    config: Projector,
    projection: Projection,
    pool: PgPool,
    progress: watch::Sender<Progress>,
    leasing: Leasing,
    wakeups: Wakeups,
) {
    let Wakeups {
        mut window,
        mut resync,
        mut stop,
    } = wakeups;
    let name = projection.name();
    let mut lease = Lease::new(format!("projection:{name}"), leasing.config);
    let mut released = leasing.released;
    let (mut window_open, mut released_open, mut resync_open) = (true, true, true);
    let mut next_follow = Instant::now();
    // Whether to run a batch now (told of a commit, or the poll is due), and when the
    // next poll is due.
    let mut run_now = true;
    let mut next_poll = Instant::now();
    loop {
        if *stop.borrow() {
            break;
        }
        if !lease.keep(&pool).await {
            // Another process runs this projection: follow its progress, and try for the
            // lease at its turn or as soon as one is released.
            if Instant::now() >= next_follow {
                if let Err(e) = follow(&pool, name, &progress).await {
                    tracing::warn!(projection = name, error = %e, "reading a projection's progress failed");
                }
                next_follow = Instant::now() + config.poll_interval;
            }
            run_now = true;
            tokio::select! {
                _ = tokio::time::sleep_until(next_follow.min(lease.due()).into()) => {}
                changed = released.changed(), if released_open => match changed {
                    Ok(()) => lease.try_now(),
                    Err(_) => released_open = false,
                },
                changed = resync.changed(), if resync_open => match changed {
                    Ok(()) => next_follow = Instant::now(),
                    Err(_) => resync_open = false,
                },
                changed = stop.changed() => if changed.is_err() { break },
            }
            continue;
        }
        if !run_now {
            // New events: a batch only if one of them is ours (or the poll is due, below).
            let w = window.borrow_and_update();
            run_now = reach(projection, *progress.borrow(), &w) < w.end();
        }
        if run_now {
            // Marks the events as seen: a commit published while the batch runs wakes us.
            window.borrow_and_update();
            match batch(config, projection, &pool, &lease, &progress).await {
                Step::More => continue,
                Step::LeaseLost => {
                    lease.lost();
                    continue;
                }
                Step::Wait => next_poll = Instant::now() + config.poll_interval,
            }
        }
        // Wake for new events (a batch if one is ours), a resubscribed listener, the poll
        // (which also writes the checkpoint past events passed over), or the lease's renewal
        // (which runs no batch unless the poll is due too).
        run_now = false;
        tokio::select! {
            changed = window.changed(), if window_open => {
                window_open = changed.is_ok();
            }
            changed = resync.changed(), if resync_open => {
                resync_open = changed.is_ok();
                run_now = true;
            }
            _ = tokio::time::sleep_until(next_poll.min(lease.due()).into()) => {
                run_now = Instant::now() >= next_poll;
            }
            changed = stop.changed() => if changed.is_err() { break },
        }
    }
    // Write the checkpoint past the events passed over, so the next holder need not.
    let passed_over = {
        let p = *progress.borrow();
        reach(projection, p, &window.borrow()) > p.checkpoint
    };
    if passed_over {
        while lease.held() {
            if !matches!(
                batch(config, projection, &pool, &lease, &progress).await,
                Step::More
            ) {
                break;
            }
        }
    }
    lease.release(&pool).await;
    tracing::debug!(projection = name, "projection task stopped");
}

/// What a projection task does after a batch.
enum Step {
    /// Run the next batch at once: this one was full.
    More,
    /// Caught up, stopped at a failure, or failed for the moment: wait for a wake-up.
    Wait,
    /// The lease turned out to be another process's.
    LeaseLost,
}

/// Runs one fenced batch and publishes where it got.
async fn batch(
    config: Projector,
    projection: Projection,
    pool: &PgPool,
    lease: &Lease,
    progress: &watch::Sender<Progress>,
) -> Step {
    let resets = progress.borrow().resets;
    let ran = run_leased_batch(
        pool,
        projection,
        config.batch_size,
        lease.holder(),
        config.stall_limit,
    );
    let outcome = ran.await;
    #[cfg(feature = "fault-injection")]
    crate::fault::before_report(projection, lease.holder()).await;
    match outcome {
        Ok(BatchOutcome::Applied {
            applied,
            checkpoint,
        }) => {
            publish(progress, resets, checkpoint, None);
            // A short batch has read every committed event.
            if (applied as i64) < config.batch_size {
                Step::Wait
            } else {
                Step::More
            }
        }
        Ok(BatchOutcome::Failed {
            checkpoint,
            failure,
        }) => {
            publish(progress, resets, checkpoint, Some(failure.position));
            Step::Wait
        }
        Err(RunError::NotLeaseHolder(_)) => Step::LeaseLost,
        Err(e) => {
            let name = projection.name();
            crate::note_batch_error(projection);
            tracing::warn!(projection = name, error = %e, "projection batch failed; will retry");
            Step::Wait
        }
    }
}

/// Publishes where the projection stands in the database (for a projection that another
/// process runs).
async fn follow(pool: &PgPool, name: &str, progress: &watch::Sender<Progress>) -> sqlx::Result<()> {
    let seen = progress.borrow().checkpoint;
    let (mut checkpoint, mut failed_at) = read_progress(pool, name).await?;
    // Lower than what this process knew: either this read began before the commit that
    // told it more (a notification overtook it), or the projection was reset and its
    // notification lost (the listener was away). A read begun now tells them apart.
    let mut reset = false;
    if checkpoint < seen {
        (checkpoint, failed_at) = read_progress(pool, name).await?;
        reset = checkpoint < seen;
    }
    progress.send_if_modified(|p| {
        let now = Progress {
            checkpoint: if reset {
                checkpoint
            } else {
                p.checkpoint.max(checkpoint)
            },
            failed_at,
            known: true,
            resets: p.resets + u64::from(reset),
        };
        std::mem::replace(p, now) != now
    });
    Ok(())
}

/// A projection's checkpoint and the first position it is stopped at, if any.
async fn read_progress(pool: &PgPool, name: &str) -> sqlx::Result<(i64, Option<i64>)> {
    sqlx::query_as(
        "SELECT COALESCE((SELECT position FROM projection_checkpoints WHERE name = $1), 0), \
                (SELECT min(position) FROM projection_failures WHERE name = $1)",
    )
    .bind(name)
    .fetch_one(pool)
    .await
}

/// Publishes where this process's batch got, unless a reset was heard of since the batch
/// began (`resets`, read then): the batch may have committed just before the reset, whose
/// notification, taken meanwhile, is then the truth, and must not be undone by this later
/// report. Skipping it only makes a wait longer: the batch's own notification follows (for
/// a batch that stopped at a failure, which notifications do not carry, the next poll).
fn publish(
    progress: &watch::Sender<Progress>,
    resets: u64,
    checkpoint: i64,
    failed_at: Option<i64>,
) {
    progress.send_if_modified(|p| {
        if p.resets != resets {
            return false;
        }
        let now = Progress {
            checkpoint,
            failed_at,
            known: true,
            resets,
        };
        std::mem::replace(p, now) != now
    });
}
