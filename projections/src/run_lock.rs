//! The session a rebuild job or a check holds its advisory lock on, kept alive and watched
//! while the run goes on.
//!
//! The lock is all that tells a run at work from one that was killed (`projections status`,
//! `/metrics`, the next run's clean-up), and PostgreSQL frees it with its session. Left
//! idle, that session can be ended under a live run: by an `idle_session_timeout` a DBA set
//! on the database, a firewall or a pooler dropping an idle connection, an operator's
//! `pg_terminate_backend`. The run would then go on while a second one resumes the same
//! job, ends the first one's sessions and swaps. So the session is told not to time out
//! when idle, is checked every [`CHECK_EVERY`], and a run whose lock is lost stops (the
//! watcher says so) rather than go on without it; the swap and a check's comparison also
//! look for the lock in their own transaction before they rely on it.

use std::time::Duration;

use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How often the lock's session is asked a trivial query.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// How long that query may take before the session counts as lost (a connection a firewall
/// dropped without a word answers nothing until TCP gives up, many minutes later).
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection outside `pool`'s for a session advisory lock, which ends when the
/// connection is dropped. The server's `idle_session_timeout` (PostgreSQL 14 and later; a
/// database or role may set it) is turned off for it where the server knows the setting.
/// Its statements may be long ones (`DROP SCHEMA` of a large copy), which are expected
/// rather than worth a warning.
pub(crate) async fn connect(pool: &PgPool) -> sqlx::Result<PgConnection> {
    let options = (*pool.connect_options())
        .clone()
        .log_slow_statements(log::LevelFilter::Off, Duration::ZERO);
    let mut conn = PgConnection::connect_with(&options).await?;
    // `current_setting(.., true)` is NULL for a setting the server does not have; setting
    // an unknown one would be an error.
    sqlx::query(
        "SELECT set_config('idle_session_timeout', '0', false) \
         WHERE current_setting('idle_session_timeout', true) IS NOT NULL",
    )
    .execute(&mut conn)
    .await?;
    Ok(conn)
}

/// The lock's connection, owned by a task that checks it until [`LockWatch::stop`].
pub(crate) struct LockWatch {
    pid: i32,
    lost: watch::Receiver<Option<String>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Option<PgConnection>>,
}

impl LockWatch {
    /// Watches `conn`, which holds the run's lock.
    pub(crate) async fn start(mut conn: PgConnection) -> sqlx::Result<Self> {
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
        let (lost_tx, lost) = watch::channel(None);
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                let last = tokio::select! {
                    _ = tokio::time::sleep(CHECK_EVERY) => false,
                    _ = &mut stopped => true,
                };
                // Once more when stopped: the caller learns whether it still held the lock
                // at the end (a run that failed because it lost it says so).
                if let Err(cause) = alive(&mut conn).await {
                    tracing::error!(pid, error = %cause, "the session holding the run's lock is gone");
                    lost_tx.send_replace(Some(cause));
                    return None;
                }
                if last {
                    return Some(conn);
                }
            }
        });
        Ok(Self {
            pid,
            lost,
            stop,
            task,
        })
    }

    /// The backend pid of the lock's session, for the checks made in other transactions.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Resolves when the lock's session is found gone, with the cause.
    pub(crate) async fn lost(&self) -> String {
        let mut lost = self.lost.clone();
        let cause = match lost.wait_for(Option::is_some).await {
            Ok(cause) => cause.clone().unwrap_or_default(),
            // The watcher ended without saying so: it panicked.
            Err(_) => "the lock's watcher ended".to_string(),
        };
        cause
    }

    /// Stops watching: the connection, still holding the lock, or `Err` with the cause when
    /// its session is gone.
    pub(crate) async fn stop(self) -> Result<PgConnection, String> {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Some(conn)) => Ok(conn),
            Ok(None) => Err(self.lost.borrow().clone().unwrap_or_default()),
            Err(e) => Err(format!("the lock's watcher ended abnormally: {e}")),
        }
    }
}

async fn alive(conn: &mut PgConnection) -> Result<(), String> {
    match tokio::time::timeout(CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(conn)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
    }
}
