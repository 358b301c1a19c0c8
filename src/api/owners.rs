//! An organization keeps an active owner: the commands that could take its last one away
//! (revoking an owner role, assigning one again with an expiry, deactivating or erasing its
//! holder, cutting a role off from the owner role) are refused when they would, one at a
//! time per organization.
//!
//! "Owner" is an active user with an assignment without expiry of the built-in `owner` role
//! or of a role that inherits from it: one given until a date lapses by itself, with no
//! command to refuse, so it does not keep the organization owned. An organization with no
//! such owner (one the platform operator created and has not yet given one for good) is
//! left to the platform operator.

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use axum::http::StatusCode;
use ledgerline_aggregates::organization::built_in_roles;
use ledgerline_projections::Projection;
use uuid::Uuid;

use super::turns::{Turn, Turns};
use super::{ApiError, ApiResult};
use crate::app::App;

/// The owners' turns: the lock's key is `'ledgerline owners ' || org`. A few at once per
/// process (each holds a connection, up to [`TURN_HELD_FOR`] after its command), so that
/// they never hold all of the pool (with the role tree's two, six of at least eight:
/// `MIN_SERVE_POOL` in `config.rs`).
static OWNERS: LazyLock<Turns> = LazyLock::new(|| Turns::new("ledgerline owners ", 4));

/// What a command would take away from the organization's owners.
pub enum Loss {
    /// The user leaves (deactivated or erased), with every role they hold.
    User(Uuid),
    /// One role is taken from one user, or given again with an expiry (it then no longer
    /// counts).
    Assignment { user: Uuid, role: Uuid },
    /// A role, and every role inheriting from it, stops inheriting from the owner role
    /// (it is deleted, or given another parent).
    Branch(Uuid),
}

/// The read models the owners are counted from.
const COUNTED_FROM: [Projection; 3] = [Projection::Users, Projection::UserRoles, Projection::Roles];

/// How long a check waits for [`COUNTED_FROM`] to show the organization's pending changes
/// before it answers 503 (as long as a command waits for its own).
const PENDING_WAIT: Duration = Duration::from_secs(5);

/// How much longer than a command's own wait for the read models (5 s) its turn is held,
/// in the background, for [`COUNTED_FROM`] to show it. A bound, so that a projection far
/// behind cannot hold the organization's turn for ever; as long as this, so that the turn
/// outlasts another process taking over a dead one's projection (within about 1⅓ × the
/// lease's TTL, 10 s by default), and a removal queued behind it (then waiting up to 5 s for
/// pending changes and 5 s for its own) still answers within a request's 30 s. A stopped
/// projection ends the hold at once. Past it, the next check counts no owner with a change
/// pending (see [`keeping_an_owner`]): the hold spares it that, it is not what makes it safe.
const TURN_HELD_FOR: Duration = Duration::from_secs(10);

/// Runs `command` unless it would leave `org` without an active owner (409, nothing
/// appended); with no `loss` (a change that takes no owner away), just runs it.
///
/// A transaction-scoped advisory lock per organization makes two such commands take turns,
/// so that two owners removing each other at once cannot both pass the check. The turn runs
/// in a task of its own ([`super::to_the_end`]), so a client hanging up ends neither the
/// command nor the turn early. The answer goes once the command has waited for the read
/// models as any does; the turn of one that took effect is held on in the background until
/// `users`, `user_roles` and `roles` show it, one of them is stopped, or [`TURN_HELD_FOR`]
/// has passed. The check reads those read models and counts as staying only the owners with
/// no change (of the user, or of a role on their way to `owner`) pending in the log beyond
/// what they show: when that leaves none while changes are pending, it waits for them
/// ([`PENDING_WAIT`]), and then answers 503 rather than decide on what may no longer be so.
pub async fn keeping_an_owner<T, E>(
    app: &App,
    org: Uuid,
    loss: Option<Loss>,
    command: impl Future<Output = Result<T, E>> + Send + 'static,
) -> ApiResult<T>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    let Some(loss) = loss else {
        return command.await.map_err(Into::into);
    };
    let app = app.clone();
    super::to_the_end(async move {
        let mut turn = OWNERS.take(&app.pool, org).await?;
        check(&app, &mut turn.tx, org, &loss).await?;
        let outcome = command.await;
        if outcome.is_ok() {
            tokio::spawn(hold_until_shown(app, org, turn));
        } else if let Err(e) = turn.tx.rollback().await {
            // A refused command appended nothing: nothing to wait for. (Dropping the turn
            // ends it too; the command's answer stands.)
            tracing::warn!(organization = %org, error = %e, "ending an organization's turn failed");
        }
        outcome.map_err(Into::into)
    })
    .await
}

/// 409 if `loss` would leave `org` without an active owner, 503 if that cannot be told for
/// changes the read models do not show (after waiting for them a moment).
async fn check(app: &App, turn: &mut sqlx::PgConnection, org: Uuid, loss: &Loss) -> ApiResult<()> {
    let mut counted = count_owners(turn, org, loss).await?;
    // No owner shown is no proof of none while a pending change could make one (a first
    // owner's assignment, a reactivation, a role moved under `owner`); other changes (the
    // invitations of an organization being set up) cannot.
    if let ((shown, 0, Some(pending), gaining), Some(projector)) = (counted, &app.projector) {
        if shown > 0 || gaining {
            projector
                .wait_for_these(&COUNTED_FROM, pending, PENDING_WAIT)
                .await;
            counted = count_owners(turn, org, loss).await?;
        }
    }
    match counted {
        (0, _, None, _) | (0, _, _, false) | (_, 1.., _, _) => Ok(()),
        (_, _, None, _) => Err(ApiError::conflict(
            "this would leave the organization without an active owner (one whose owner role \
             does not expire): give the owner role, without an expiry, to another active user \
             first",
        )),
        (_, _, Some(_), _) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this organization's users or roles are being changed and the read models do not \
             show it yet, so whether it keeps an active owner cannot be told; retry shortly",
        )),
    }
}

/// Holds `turn` until [`COUNTED_FROM`] show everything this process has committed (the
/// command, with what committed before it), one of them is stopped, or [`TURN_HELD_FOR`] has
/// passed.
async fn hold_until_shown(app: App, org: Uuid, turn: Turn) {
    if let Some(projector) = &app.projector {
        let head = *app.store.committed().borrow();
        if !projector
            .wait_for_these(&COUNTED_FROM, head, TURN_HELD_FOR)
            .await
        {
            tracing::warn!(
                organization = %org,
                position = head,
                "the owners' read models do not show a change of them (stopped, or not in \
                 time): ending the organization's turn anyway"
            );
        }
    }
    // The transaction only held the lock; ending it releases the lock (as does dropping it,
    // should the rollback fail).
    if let Err(e) = turn.tx.rollback().await {
        tracing::warn!(organization = %org, error = %e, "ending an organization's turn failed");
    }
}

/// The organization's active owners now; those certain to be left after `loss` (none of
/// their changes pending); the position of the newest change of its users or roles that the
/// read models do not show yet, if any; and whether one of those could make an owner.
async fn count_owners(
    turn: &mut sqlx::PgConnection,
    org: Uuid,
    loss: &Loss,
) -> sqlx::Result<(i64, i64, Option<i64>, bool)> {
    let (user, assignment, branch) = match *loss {
        Loss::User(user) => (Some(user), None, None),
        Loss::Assignment { user, role } => (None, Some((user, role)), None),
        Loss::Branch(role) => (None, None, Some(role)),
    };
    // A projection applies an event and moves its checkpoint in one transaction: an event it
    // reads past its checkpoint is one its tables do not show. `user_roles` reads both User
    // and Role events.
    sqlx::query_as(
        "WITH RECURSIVE shown AS ( \
             SELECT coalesce(max(position) FILTER (WHERE name = 'users'), 0) AS users, \
                    coalesce(max(position) FILTER (WHERE name = 'roles'), 0) AS roles, \
                    coalesce(max(position) FILTER (WHERE name = 'user_roles'), 0) AS user_roles \
             FROM projection_checkpoints), \
         owning(id, kept, sure) AS ( \
             SELECT $2::uuid, true, true \
             UNION \
             SELECT r.id, o.kept AND r.id IS DISTINCT FROM $6, \
                    o.sure AND NOT EXISTS ( \
                        SELECT 1 FROM events e, shown s \
                        WHERE e.aggregate_type = 'Role' AND e.aggregate_id = r.id::text \
                          AND e.position > least(s.roles, s.user_roles)) \
             FROM roles r JOIN owning o ON r.parent_role_id = o.id), \
         holders AS ( \
             SELECT ur.user_id, ur.role_id, o.kept, \
                    o.sure AND NOT EXISTS ( \
                        SELECT 1 FROM events e, shown s \
                        WHERE e.aggregate_type = 'User' AND e.aggregate_id = ur.user_id::text \
                          AND e.position > least(s.users, s.user_roles)) AS sure \
             FROM user_roles ur \
             JOIN owning o ON o.id = ur.role_id \
             JOIN users u ON u.id = ur.user_id \
             WHERE u.organization_id = $1 AND u.status = 'active' AND ur.expires_at IS NULL), \
         pending AS ( \
             SELECT max(e.position) AS newest, \
                    coalesce(bool_or(e.aggregate_type = 'Role' \
                        OR e.event_type IN ('UserRoleAssigned', 'UserReactivated')), false) \
                        AS gaining \
             FROM events e, shown s \
             WHERE e.organization_id = $1 \
               AND e.position > least(s.users, s.roles, s.user_roles) \
               AND ((e.aggregate_type = 'User' AND e.position > least(s.users, s.user_roles)) \
                 OR (e.aggregate_type = 'Role' AND e.position > least(s.roles, s.user_roles)))) \
         SELECT count(DISTINCT user_id), \
                count(DISTINCT user_id) FILTER ( \
                    WHERE kept AND sure AND user_id IS DISTINCT FROM $3 \
                      AND NOT COALESCE(user_id = $4 AND role_id = $5, false)), \
                (SELECT newest FROM pending), (SELECT gaining FROM pending) \
         FROM holders",
    )
    .bind(org)
    .bind(built_in_roles::role_id(org, built_in_roles::OWNER))
    .bind(user)
    .bind(assignment.map(|(u, _)| u))
    .bind(assignment.map(|(_, r)| r))
    .bind(branch)
    .fetch_one(turn)
    .await
}
