//! Cross-process wake-ups over PostgreSQL LISTEN/NOTIFY. The ledger writer notifies the new
//! head with each commit, a projection batch its new checkpoint, a released lease its name;
//! one listener per process turns them into the watch channels its tasks already wait on.
//! A notification is sent only if its transaction commits, and delivered in commit order.
//! It can still be lost (a listener that reconnects misses what was sent meanwhile), so
//! everyone who waits on one also polls.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::watch;

/// Payload: the new head position.
pub const HEAD_CHANNEL: &str = "ledgerline_head";
/// Payload: `<projection name>:<checkpoint position>`.
pub const CHECKPOINT_CHANNEL: &str = "ledgerline_checkpoint";
/// Payload: the released lease's name.
pub const LEASE_CHANNEL: &str = "ledgerline_lease";

/// How long to wait before connecting again after the listener's connection failed.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Where the listener delivers what it hears.
pub(crate) struct Deliver<F: Fn(&str, i64) + Send + 'static> {
    /// The newest head any process has committed (never lowered).
    pub head: watch::Sender<i64>,
    /// Bumped for every released lease, and when the listener (re)subscribed (see
    /// [`Deliver::resubscribed`]).
    pub released: watch::Sender<u64>,
    /// Bumped whenever the listener has (re)subscribed: what was sent before may be lost,
    /// so waiters should look at the database now rather than at their next poll.
    pub resync: watch::Sender<u64>,
    /// A projection's checkpoint moved to a position.
    pub checkpoint: F,
}

impl<F: Fn(&str, i64) + Send + 'static> Deliver<F> {
    /// The listener has just (re)subscribed. A lease released while it was not listening
    /// was never heard of, and a waiter would otherwise try for it only at its next turn
    /// (a third of the TTL away), so lease waiters are woken as if one had been released.
    fn resubscribed(&self) {
        bump(&self.resync);
        bump(&self.released);
    }
}

/// Raises `head` to `position` if that is newer.
pub(crate) fn raise(head: &watch::Sender<i64>, position: i64) {
    head.send_if_modified(|h| {
        let newer = position > *h;
        *h = (*h).max(position);
        newer
    });
}

/// Forwards this process's own commits into `head`, which the listener also raises.
pub(crate) async fn forward(
    mut local: watch::Receiver<i64>,
    head: watch::Sender<i64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        raise(&head, *local.borrow_and_update());
        tokio::select! {
            changed = local.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// Listens until `stop` and delivers every notification; reconnects on failure.
pub(crate) async fn listen<F: Fn(&str, i64) + Send + 'static>(
    pool: &PgPool,
    deliver: Deliver<F>,
    mut stop: watch::Receiver<bool>,
) {
    // A connection of its own, outside the application's pool, held for as long as we
    // listen; PgListener reconnects through it.
    let own = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with((*pool.connect_options()).clone());
    let mut listener: Option<PgListener> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let l = match &mut listener {
            Some(l) => l,
            None => match subscribe(&own).await {
                Ok(l) => {
                    deliver.resubscribed();
                    listener.insert(l)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for notifications; polling only until it can");
                    tokio::select! {
                        _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                        _ = stop.changed() => return,
                    }
                    continue;
                }
            },
        };
        tokio::select! {
            received = l.try_recv() => match received {
                Ok(Some(n)) => dispatch(&deliver, n.channel(), n.payload()),
                // Reconnected: whatever was sent meanwhile is lost.
                Ok(None) => {
                    tracing::debug!("notification listener reconnected");
                    deliver.resubscribed();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "notification listener failed; reconnecting");
                    listener = None;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

async fn subscribe(pool: &PgPool) -> sqlx::Result<PgListener> {
    let mut l = PgListener::connect_with(pool).await?;
    l.listen_all([HEAD_CHANNEL, CHECKPOINT_CHANNEL, LEASE_CHANNEL])
        .await?;
    Ok(l)
}

fn dispatch<F: Fn(&str, i64) + Send + 'static>(deliver: &Deliver<F>, channel: &str, payload: &str) {
    match channel {
        HEAD_CHANNEL => match payload.parse() {
            Ok(position) => raise(&deliver.head, position),
            Err(_) => tracing::warn!(payload, "bad head notification"),
        },
        CHECKPOINT_CHANNEL => match parse_checkpoint(payload) {
            Some((name, position)) => (deliver.checkpoint)(name, position),
            None => tracing::warn!(payload, "bad checkpoint notification"),
        },
        LEASE_CHANNEL => bump(&deliver.released),
        _ => {}
    }
}

fn bump(signal: &watch::Sender<u64>) {
    signal.send_modify(|n| *n = n.wrapping_add(1));
}

/// `name:position` → (name, position).
fn parse_checkpoint(payload: &str) -> Option<(&str, i64)> {
    let (name, position) = payload.rsplit_once(':')?;
    Some((name, position.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn checkpoint_payloads_parse() {
        assert_eq!(super::parse_checkpoint("users:42"), Some(("users", 42)));
        assert_eq!(super::parse_checkpoint("users"), None);
        assert_eq!(super::parse_checkpoint("users:x"), None);
    }
}
