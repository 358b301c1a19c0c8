//! Test support, compiled only with the `fault-injection` feature (the workspace's tests
//! turn it on; a release build has none of it): makes a projection's code panic on chosen
//! events, as a bug met only by some event would, so that what the runner does then can be
//! tested.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::{Projection, StoredEvent};

/// Each armed event: the projection, the event's aggregate id and sequence number (unique
/// across the tests of a process, which share this).
static ARMED: Mutex<Vec<(Projection, String, i64)>> = Mutex::new(Vec::new());
/// Whether anything is armed: the common case costs one load.
static ANY: AtomicBool = AtomicBool::new(false);

/// From now on, `projection` panics whenever a batch holds that event.
pub fn panic_on(projection: Projection, aggregate_id: &str, sequence: i64) {
    let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    armed.push((projection, aggregate_id.to_string(), sequence));
    ANY.store(true, Ordering::SeqCst);
}

/// Undoes [`panic_on`] (the bug fixed).
pub fn disarm(projection: Projection, aggregate_id: &str, sequence: i64) {
    let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    armed.retain(|(p, a, s)| (*p, a.as_str(), *s) != (projection, aggregate_id, sequence));
}

pub(crate) fn check(projection: Projection, events: &[StoredEvent]) {
    if !ANY.load(Ordering::SeqCst) {
        return;
    }
    let hit = {
        let armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
        events.iter().find_map(|e| {
            armed
                .iter()
                .any(|(p, a, s)| *p == projection && *a == e.aggregate_id && *s == e.sequence)
                .then_some(e.position)
        })
    };
    if let Some(position) = hit {
        panic!(
            "fault injected into {} at position {position}",
            projection.name()
        );
    }
}
