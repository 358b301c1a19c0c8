//! The log's recent events as the live projector needs them: for each position, which
//! projections read that event. One task per process reads it (position and types only),
//! so a projection that none of the new events concern is known to be caught up without a
//! transaction of its own: after a chat message, five of the seven projections have nothing
//! to do, and running a batch each for them cost more than the message's own work.
//!
//! A projection "reaches" a position when every event up to it that it reads is applied:
//! its checkpoint, moved past the following events it does not read. Its checkpoint row is
//! written at its next batch (a relevant event, the poll, or shutdown), so a restart only
//! passes over those events again.

use std::collections::VecDeque;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::Projection;

/// Positions kept: far more than arrive between two polls, which bounds how long a
/// projection can go without writing its checkpoint.
const CAPACITY: usize = 1 << 16;
/// Rows read per query.
const CHUNK: i64 = 10_000;

/// For the positions `start + 1 ..= end()`, the projections (bits, [`Projection::bit`])
/// that read the event there. Positions are gap-free, so none is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Window {
    start: i64,
    readers: VecDeque<u8>,
}

impl Window {
    pub(crate) fn end(&self) -> i64 {
        self.start + self.readers.len() as i64
    }

    /// Adds the event at `position` (the next one, or the window starts over there).
    fn push(&mut self, position: i64, aggregate_type: &str, event_type: &str) {
        if position != self.end() + 1 {
            self.readers.clear();
            self.start = position - 1;
        }
        let readers = Projection::ALL
            .iter()
            .filter(|p| p.reads(aggregate_type, event_type))
            .fold(0u8, |mask, p| mask | p.bit());
        self.readers.push_back(readers);
        while self.readers.len() > CAPACITY {
            self.readers.pop_front();
            self.start += 1;
        }
    }

    /// How far a projection whose checkpoint is `checkpoint` has effectively got: past
    /// every following event in the window that it does not read. `checkpoint` itself when
    /// the window does not cover the position after it.
    pub(crate) fn reach(&self, projection: Projection, checkpoint: i64) -> i64 {
        if checkpoint < self.start || checkpoint >= self.end() {
            return checkpoint;
        }
        let bit = projection.bit();
        let from = (checkpoint - self.start) as usize;
        match self.readers.range(from..).position(|r| r & bit != 0) {
            Some(offset) => checkpoint + offset as i64,
            None => self.end(),
        }
    }
}

/// Keeps `window` up to the log: reads what is new whenever `head` moves and every `poll`
/// (events committed without a notification reaching this process), until `stop`.
pub(crate) async fn follow(
    pool: PgPool,
    window: watch::Sender<Window>,
    mut head: watch::Receiver<i64>,
    poll: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // Start a window back from the head, so that projections a little behind at start-up
    // can pass over events too.
    let start: sqlx::Result<Option<i64>> = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(&pool)
        .await;
    let start = start.ok().flatten().unwrap_or(0);
    window.send_modify(|w| w.start = (start - CAPACITY as i64).max(0));
    loop {
        head.borrow_and_update();
        if let Err(e) = read_new(&pool, &window).await {
            tracing::warn!(error = %e, "reading the log's new events failed; will retry");
        }
        tokio::select! {
            changed = head.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(poll) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn read_new(pool: &PgPool, window: &watch::Sender<Window>) -> sqlx::Result<()> {
    loop {
        let after = window.borrow().end();
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT position, aggregate_type, event_type FROM events WHERE position > $1 \
             ORDER BY position LIMIT $2",
        )
        .bind(after)
        .bind(CHUNK)
        .fetch_all(pool)
        .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let full = rows.len() as i64 == CHUNK;
        window.send_modify(|w| {
            for (position, aggregate_type, event_type) in &rows {
                w.push(*position, aggregate_type, event_type);
            }
        });
        if !full {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: i64, events: &[(&str, &str)]) -> Window {
        let mut w = Window {
            start,
            ..Window::default()
        };
        for (i, (aggregate, event)) in events.iter().enumerate() {
            w.push(start + 1 + i as i64, aggregate, event);
        }
        w
    }

    #[test]
    fn a_projection_reaches_up_to_the_next_event_it_reads() {
        // Positions 11..=15.
        let w = window(
            10,
            &[
                ("Message", "MessagePosted"),
                ("User", "UserInvited"),
                ("Message", "MessagePosted"),
                ("User", "UserErased"),
                ("Organization", "OrganizationUpdated"),
            ],
        );
        assert_eq!(w.end(), 15);
        assert_eq!(w.reach(Projection::Users, 10), 11);
        assert_eq!(w.reach(Projection::Users, 12), 13);
        assert_eq!(w.reach(Projection::Organizations, 10), 14);
        assert_eq!(w.reach(Projection::Organizations, 15), 15);
        assert_eq!(w.reach(Projection::ApiKeys, 10), 15);
        // Messaging reads the erasure but not the invitation.
        assert_eq!(w.reach(Projection::Messaging, 11), 12);
        assert_eq!(w.reach(Projection::Messaging, 13), 13);
        assert_eq!(w.reach(Projection::Messaging, 14), 15);
        assert_eq!(w.reach(Projection::AuditEvents, 12), 12);
    }

    #[test]
    fn outside_the_window_nothing_is_known() {
        let w = window(10, &[("Message", "MessagePosted")]);
        assert_eq!(w.reach(Projection::Users, 9), 9, "before the window");
        assert_eq!(w.reach(Projection::Users, 20), 20, "after it");
        assert_eq!(Window::default().reach(Projection::Users, 0), 0);
    }

    #[test]
    fn a_gap_starts_the_window_over_and_old_positions_fall_out() {
        let mut w = window(0, &[("Message", "MessagePosted"); 3]);
        w.push(7, "Message", "MessagePosted");
        assert_eq!((w.start, w.end()), (6, 7));
        assert_eq!(w.reach(Projection::Users, 3), 3);
        for p in 8..8 + CAPACITY as i64 {
            w.push(p, "Message", "MessagePosted");
        }
        assert_eq!(w.readers.len(), CAPACITY);
        assert_eq!(w.end(), 7 + CAPACITY as i64);
        assert_eq!(w.reach(Projection::Users, 6), 6, "position 7 fell out");
        assert_eq!(w.reach(Projection::Users, 7), w.end());
    }
}
