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
use super::turns::Turns;
use crate::app::App;

/// The walks below go one level past the limit, so that a longer chain (or a cycle left by
/// an older release) shows as too deep instead of being cut where it would look fine.
const WALK: i32 = MAX_INHERITANCE_DEPTH as i32;

/// The role tree's turns: the lock's key is `'ledgerline roles ' || org`. Two at once per
/// process: a turn holds its lock's connection while its work takes the owners' turn (a
/// connection of its own) and runs its command, so more would hold much of the pool.
static ROLES: LazyLock<Turns> = LazyLock::new(|| Turns::new("ledgerline roles ", 2));

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
        let turn = ROLES.take(&app.pool, org).await?;
        shown(&app, org).await?;
        let outcome = work.await;
        // The transaction only held the lock; ending it releases the lock (as dropping it
        // does, should the rollback fail: the work's outcome stands either way).
        if let Err(e) = turn.tx.rollback().await {
            tracing::warn!(organization = %org, error = %e, "ending an organization's turn failed");
        }
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
