//! An organization keeps an active owner: the commands that could take its last one away
//! (revoking an owner role, deactivating or erasing its holder, cutting a role off from the
//! owner role) are refused when they would, one at a time per organization.
//!
//! "Owner" is an active user with an unexpired assignment of the built-in `owner` role or of a
//! role that inherits from it. An organization that has no owner (one the platform operator
//! created and has not yet given one) is left to the platform operator.

use std::future::Future;

use ledgerline_aggregates::organization::built_in_roles;
use uuid::Uuid;

use super::{ApiError, ApiResult};
use crate::app::App;

/// What a command would take away from the organization's owners.
pub enum Loss {
    /// The user leaves (deactivated or erased), with every role they hold.
    User(Uuid),
    /// One role is taken from one user.
    Assignment { user: Uuid, role: Uuid },
    /// A role, and every role inheriting from it, stops inheriting from the owner role
    /// (it is deleted, or given another parent).
    Branch(Uuid),
}

/// Runs `command` unless it would leave `org` without an owner (409, nothing appended); with
/// no `loss` (a change that takes no owner away), just runs it.
///
/// A transaction-scoped advisory lock per organization makes two such commands take turns,
/// so that two owners removing each other at once cannot both pass the check; the lock is
/// held until `command` has returned, i.e. until the read models show its effect (commands
/// wait for them) or the wait for them timed out.
pub async fn keeping_an_owner<T, E: Into<ApiError>>(
    app: &App,
    org: Uuid,
    loss: Option<Loss>,
    command: impl Future<Output = Result<T, E>>,
) -> ApiResult<T> {
    let Some(loss) = loss else {
        return command.await.map_err(Into::into);
    };
    let mut turn = app.pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('ledgerline owners ' || $1, 0))")
        .bind(org.to_string())
        .execute(&mut *turn)
        .await?;
    let (user, assignment, branch) = match loss {
        Loss::User(user) => (Some(user), None, None),
        Loss::Assignment { user, role } => (None, Some((user, role)), None),
        Loss::Branch(role) => (None, None, Some(role)),
    };
    let (now, after): (i64, i64) = sqlx::query_as(
        "WITH RECURSIVE owning(id, kept) AS ( \
             SELECT $2::uuid, true \
             UNION \
             SELECT r.id, o.kept AND r.id IS DISTINCT FROM $6 \
             FROM roles r JOIN owning o ON r.parent_role_id = o.id), \
         holders AS ( \
             SELECT ur.user_id, ur.role_id, o.kept \
             FROM user_roles ur \
             JOIN owning o ON o.id = ur.role_id \
             JOIN users u ON u.id = ur.user_id \
             WHERE u.organization_id = $1 AND u.status = 'active' \
               AND (ur.expires_at IS NULL OR ur.expires_at > now())) \
         SELECT count(DISTINCT user_id), \
                count(DISTINCT user_id) FILTER ( \
                    WHERE kept AND user_id IS DISTINCT FROM $3 \
                      AND NOT COALESCE(user_id = $4 AND role_id = $5, false)) \
         FROM holders",
    )
    .bind(org)
    .bind(built_in_roles::role_id(org, built_in_roles::OWNER))
    .bind(user)
    .bind(assignment.map(|(u, _)| u))
    .bind(assignment.map(|(_, r)| r))
    .bind(branch)
    .fetch_one(&mut *turn)
    .await?;
    if now > 0 && after == 0 {
        return Err(ApiError::conflict(
            "this would leave the organization without an active owner: give the owner role \
             to another active user first",
        ));
    }
    let outcome = command.await;
    // The transaction only held the lock; ending it releases the lock.
    turn.rollback().await?;
    outcome.map_err(Into::into)
}
