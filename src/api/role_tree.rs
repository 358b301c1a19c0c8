//! An organization's roles form a forest through `parent_role_id`: no cycle, and no chain
//! deeper than [`MAX_INHERITANCE_DEPTH`] (the Role aggregate's rules). The changes that could
//! break either (a parent set, a role created under a parent, a role deleted while others
//! might inherit from it) take turns per organization, and read the tree with the walks here.

use std::future::Future;
use std::sync::LazyLock;

use axum::http::StatusCode;
use ledgerline_aggregates::role::MAX_INHERITANCE_DEPTH;
use uuid::Uuid;

use super::error::{ApiError, ApiResult};
use crate::app::App;

/// The walks below go one level past the limit, so that a longer chain (or a cycle left by
/// an older release) shows as too deep instead of being cut where it would look fine.
const WALK: i32 = MAX_INHERITANCE_DEPTH as i32;

/// Requests of one process wait for their organization's turn here, holding no database
/// connection: otherwise more waiters than the pool has connections would starve the one
/// whose turn it is. Striped by organization; two sharing a stripe merely take turns too.
static QUEUES: LazyLock<Vec<tokio::sync::Mutex<()>>> =
    LazyLock::new(|| (0..64).map(|_| tokio::sync::Mutex::new(())).collect());

/// Runs `work`, a change to `org`'s tree of roles, in the organization's turn, so that the
/// tree it reads is still the tree when its command is appended: two changes that are fine
/// alone but make a cycle (or too deep a chain) together cannot both pass.
///
/// The turn is a transaction-scoped advisory lock per organization (so also across `serve`
/// processes), taken before [`super::owners::keeping_an_owner`]'s lock (always in this order,
/// so the two never deadlock), held until `work` has returned: until the read models show
/// its command. `work` runs to its end on a task of its own, so a client hanging up does
/// not end the turn while its command may still be appended. A command whose wait for the
/// read models timed out leaves them behind: the next turn waits for them once more, and
/// answers 503 while they still do not show every role event of the organization.
pub async fn in_turn<T: Send + 'static>(
    app: &App,
    org: Uuid,
    work: impl Future<Output = ApiResult<T>> + Send + 'static,
) -> ApiResult<T> {
    let app = app.clone();
    super::to_the_end(async move {
        let _queued = QUEUES[(org.as_u128() % QUEUES.len() as u128) as usize]
            .lock()
            .await;
        let mut turn = app.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('ledgerline roles ' || $1, 0))")
            .bind(org.to_string())
            .execute(&mut *turn)
            .await?;
        shown(&app, org).await?;
        let outcome = work.await;
        // The transaction only held the lock; ending it releases the lock.
        turn.rollback().await?;
        outcome
    })
    .await
}

/// [`in_turn`] when `changes_tree`; else just `work`, as a change that leaves the tree as it
/// is (a name, permissions) need not wait for one.
pub async fn in_turn_if<T: Send + 'static>(
    changes_tree: bool,
    app: &App,
    org: Uuid,
    work: impl Future<Output = ApiResult<T>> + Send + 'static,
) -> ApiResult<T> {
    if changes_tree {
        in_turn(app, org, work).await
    } else {
        work.await
    }
}

/// Ok once the `roles` read model shows every role event of `org` in the log (waiting for
/// the read models once when it does not), else 503.
async fn shown(app: &App, org: Uuid) -> ApiResult<()> {
    for first in [true, false] {
        let pending: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM events \
                WHERE organization_id = $1 AND aggregate_type = 'Role' \
                  AND position > coalesce((SELECT position FROM projection_checkpoints \
                                           WHERE name = 'roles'), 0))",
        )
        .bind(org)
        .fetch_one(&app.pool)
        .await?;
        if !pending {
            return Ok(());
        }
        if first {
            app.await_ledger().await;
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the organization's roles are being changed and the read models do not show it yet; \
         retry shortly",
    ))
}

/// `role` and its ancestors, nearest first, walked to one past the limit at most: a walk
/// that long is refused as too deep, so within the limit it holds every ancestor.
pub async fn ancestry(app: &App, role: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        "WITH RECURSIVE chain(id, parent, depth) AS (
             SELECT id, parent_role_id, 0 FROM roles WHERE id = $1
           UNION ALL
             SELECT p.id, p.parent_role_id, c.depth + 1 FROM roles p JOIN chain c ON p.id = c.parent
             WHERE c.depth < $2
         )
         SELECT id FROM chain ORDER BY depth",
    )
    .bind(role)
    .bind(WALK)
    .fetch_all(&app.pool)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// How many levels of roles inherit from `role` (0: none), counted to one past the limit at
/// most, as they will once `role`'s parent changes: the walk never comes back to `role`
/// (which, in a cycle left by an older release, its descendants lead back to).
pub async fn levels_below(app: &App, role: Uuid) -> Result<usize, sqlx::Error> {
    let levels: i32 = sqlx::query_scalar(
        "WITH RECURSIVE below(id, depth) AS (
             SELECT id, 1 FROM roles WHERE parent_role_id = $1 AND id <> $1
           UNION ALL
             SELECT r.id, b.depth + 1 FROM roles r JOIN below b ON r.parent_role_id = b.id
             WHERE r.id <> $1 AND b.depth <= $2
         )
         SELECT coalesce(max(depth), 0) FROM below",
    )
    .bind(role)
    .bind(WALK)
    .fetch_one(&app.pool)
    .await?;
    Ok(usize::try_from(levels).unwrap_or_default())
}
