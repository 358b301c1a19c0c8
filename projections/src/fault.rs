//! Test support, compiled only with the `fault-injection` feature (the workspace's tests
//! turn it on; a release build has none of it): makes a projection's code panic on chosen
//! events, as a bug met only by some event would, so that what the runner does then can be
//! tested. The panic comes before the batch writes anything or after it wrote everything:
//! the second shows that what a panicking batch wrote is rolled back. A batch can also be
//! made to hang, for the stall watches: its session stuck in a statement that holds its
//! transaction's locks, or its `COPY` half-sent, as the rebuilds that hung were seen. And a
//! live batch's report to its process can be held back, as a busy process's can be late.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use sqlx::PgConnection;

use crate::{Projection, StoredEvent};

/// When, in `Projection::apply_many`, an armed event's batch panics, or that it hangs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Before the batch writes anything.
    BeforeWriting,
    /// Once the whole batch is written, before the caller commits it.
    AfterWriting,
    /// The batch never ends (before writing anything, its session sleeps in a statement for
    /// an hour, then the batch waits for ever), every time.
    Hang,
    /// The batch never ends the first time; the event is then disarmed.
    HangOnce,
    /// The batch's binary `COPY` (`copy_in::copy`) sends half its data and then waits for
    /// ever, the server waiting in the `COPY` for the rest, once: as the rebuilds that hung
    /// were seen (a client's TLS layer waiting to read while the server waited for data).
    /// The event is disarmed when its `COPY` stops, so a batch that never reached one leaves
    /// it armed.
    HangInCopyOnce,
}

tokio::task_local! {
    /// The armed event of the batch being applied whose `COPY` is to stop halfway.
    static COPY_TO_CUT: (Projection, String, i64);
}

/// Each armed event: the projection, the event's aggregate id and sequence number (unique
/// across the tests of a process, which share this), and when it panics.
static ARMED: Mutex<Vec<(Projection, String, i64, When)>> = Mutex::new(Vec::new());
/// Whether anything is armed: the common case costs one load.
static ANY: AtomicBool = AtomicBool::new(false);

/// From now on, `projection` panics whenever a batch holds that event, before the batch
/// writes anything.
pub fn panic_on(projection: Projection, aggregate_id: &str, sequence: i64) {
    arm(projection, aggregate_id, sequence, When::BeforeWriting);
}

/// From now on, `projection` panics whenever a batch holds that event, at `when`.
pub fn arm(projection: Projection, aggregate_id: &str, sequence: i64, when: When) {
    let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    armed.push((projection, aggregate_id.to_string(), sequence, when));
    ANY.store(true, Ordering::SeqCst);
}

/// Batches whose report waits: a projection run by a lease holder (unique to a projector,
/// so that tests sharing this do not meet), and what releases it.
type ReportPause = (Projection, String, std::sync::Arc<tokio::sync::Notify>);
static REPORT_PAUSES: Mutex<Vec<ReportPause>> = Mutex::new(Vec::new());

/// The next batch of `projection` under the lease holder `holder` waits, once it has ended
/// (whatever its outcome), before the projector reports where it got to the waits of its
/// process, until the returned `Notify` is notified: as a busy process may come back to a
/// task late.
pub fn pause_next_report(
    projection: Projection,
    holder: &str,
) -> std::sync::Arc<tokio::sync::Notify> {
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut pauses = REPORT_PAUSES.lock().unwrap_or_else(|p| p.into_inner());
    pauses.push((projection, holder.to_string(), release.clone()));
    release
}

/// The wait [`pause_next_report`] armed for this batch, once.
pub(crate) async fn before_report(projection: Projection, holder: &str) {
    let release = {
        let mut pauses = REPORT_PAUSES.lock().unwrap_or_else(|p| p.into_inner());
        let at = pauses
            .iter()
            .position(|(p, h, _)| *p == projection && h == holder);
        at.map(|at| pauses.remove(at).2)
    };
    if let Some(release) = release {
        release.notified().await;
    }
}

/// Undoes [`panic_on`] and [`arm`] (the bug fixed).
pub fn disarm(projection: Projection, aggregate_id: &str, sequence: i64) {
    let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    armed.retain(|(p, a, s, _)| (*p, a.as_str(), *s) != (projection, aggregate_id, sequence));
}

/// Whether that event is still armed in `projection` (one armed to hang once no longer is
/// once a batch met it).
pub fn armed(projection: Projection, aggregate_id: &str, sequence: i64) -> bool {
    let armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    armed
        .iter()
        .any(|(p, a, s, _)| (*p, a.as_str(), *s) == (projection, aggregate_id, sequence))
}

/// Waits for ever when `events` hold an event armed to hang in `projection`: first in a
/// statement on `conn`, so that its session stays busy, holding its locks, until it is
/// ended.
pub(crate) async fn hang(projection: Projection, conn: &mut PgConnection, events: &[StoredEvent]) {
    let hit = hit(projection, events, |when| {
        matches!(when, When::Hang | When::HangOnce)
    });
    if hit.is_some() {
        let _ = sqlx::query("SELECT pg_sleep(3600)").execute(conn).await;
        std::future::pending::<()>().await;
    }
}

/// Runs `apply` (a batch of `events` in `projection`) so that its binary `COPY` stops
/// halfway ([`cut_copy`]) when one of `events` is armed with [`When::HangInCopyOnce`].
pub(crate) async fn cutting_copy<T>(
    projection: Projection,
    events: &[StoredEvent],
    apply: impl std::future::Future<Output = T>,
) -> T {
    let key = if ANY.load(Ordering::SeqCst) {
        let armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
        first_armed(&armed, projection, events, |when| {
            when == When::HangInCopyOnce
        })
        .map(|(i, _)| (armed[i].0, armed[i].1.clone(), armed[i].2))
    } else {
        None
    };
    match key {
        Some(key) => COPY_TO_CUT.scope(key, apply).await,
        None => apply.await,
    }
}

/// Whether the `COPY` about to be sent is to stop halfway (see [`cutting_copy`]); its event
/// is disarmed.
pub(crate) fn cut_copy() -> bool {
    COPY_TO_CUT
        .try_with(|(projection, aggregate_id, sequence)| {
            let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
            let before = armed.len();
            armed.retain(|(p, a, s, when)| {
                (p, a, s, *when) != (projection, aggregate_id, sequence, When::HangInCopyOnce)
            });
            armed.len() < before
        })
        .unwrap_or(false)
}

pub(crate) fn check(projection: Projection, events: &[StoredEvent], now: When) {
    if let Some(position) = hit(projection, events, |when| when == now) {
        panic!(
            "fault injected into {} at position {position}",
            projection.name()
        );
    }
}

/// The position of the first of `events` armed in `projection` with a `When` that `wanted`
/// takes, if any; an event armed to hang once is disarmed as it is found.
fn hit(
    projection: Projection,
    events: &[StoredEvent],
    wanted: impl Fn(When) -> bool,
) -> Option<i64> {
    if !ANY.load(Ordering::SeqCst) {
        return None;
    }
    let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    let (i, event) = first_armed(&armed, projection, events, wanted)?;
    if armed[i].3 == When::HangOnce {
        armed.remove(i);
    }
    Some(event.position)
}

/// The first of `events` armed in `projection` with a `When` that `wanted` takes: where it
/// stands in `armed`, and the event.
fn first_armed<'e>(
    armed: &[(Projection, String, i64, When)],
    projection: Projection,
    events: &'e [StoredEvent],
    wanted: impl Fn(When) -> bool,
) -> Option<(usize, &'e StoredEvent)> {
    events.iter().find_map(|e| {
        let i = armed.iter().position(|(p, a, s, when)| {
            (*p, a.as_str(), *s) == (projection, e.aggregate_id.as_str(), e.sequence)
                && wanted(*when)
        })?;
        Some((i, e))
    })
}
