//! The `users` read model: each user's sealed profile and life cycle. Erasure also destroys
//! the user's data key (crypto-shredding), in the same transaction as the checkpoint.

use ledgerline_aggregates::user::UserEvent;
use sqlx::PgConnection;

use crate::decode::{self, one_row};
use crate::{ProjectionError, StoredEvent};

pub const NAME: &str = "users";
pub const TABLES: &[&str] = &["users"];

pub async fn apply(conn: &mut PgConnection, event: &StoredEvent) -> Result<(), ProjectionError> {
    if event.aggregate_type != "User" {
        return Ok(());
    }
    let id = decode::aggregate_id(event)?;
    let at = event.recorded_at;
    let seq = event.sequence;
    let result = match decode::payload::<UserEvent>(event)? {
        UserEvent::UserInvited {
            user_id,
            organization_id,
            email,
            full_name,
            email_blind_index,
        } => {
            if user_id != id {
                return Err(ProjectionError::inconsistent(
                    event.position,
                    format!("UserInvited names {user_id} in aggregate {id}"),
                ));
            }
            sqlx::query(
                "INSERT INTO users (id, organization_id, email_sealed, full_name_sealed, \
                 email_blind_index, status, created_at, updated_at, version) \
                 VALUES ($1, $2, $3, $4, $5, 'active', $6, $6, $7)",
            )
            .bind(id)
            .bind(organization_id)
            .bind(email.0)
            .bind(full_name.0)
            .bind(email_blind_index)
            .bind(at)
            .bind(seq)
            .execute(&mut *conn)
            .await?
        }
        // Only the fields that changed are present; the others keep their value.
        UserEvent::UserProfileUpdated {
            email,
            email_blind_index,
            full_name,
            ..
        } => {
            sqlx::query(
                "UPDATE users SET email_sealed = COALESCE($2, email_sealed), \
                 email_blind_index = COALESCE($3, email_blind_index), \
                 full_name_sealed = COALESCE($4, full_name_sealed), \
                 updated_at = $5, version = $6 WHERE id = $1",
            )
            .bind(id)
            .bind(email.map(|s| s.0))
            .bind(email_blind_index)
            .bind(full_name.map(|s| s.0))
            .bind(at)
            .bind(seq)
            .execute(&mut *conn)
            .await?
        }
        UserEvent::UserDeactivated { reason } => {
            sqlx::query(
                "UPDATE users SET status = 'deactivated', deactivated_at = $2, \
                 deactivation_reason = $3, updated_at = $2, version = $4 WHERE id = $1",
            )
            .bind(id)
            .bind(at)
            .bind(reason)
            .bind(seq)
            .execute(&mut *conn)
            .await?
        }
        UserEvent::UserReactivated {} => {
            sqlx::query(
                "UPDATE users SET status = 'active', deactivated_at = NULL, \
                 deactivation_reason = NULL, updated_at = $2, version = $3 WHERE id = $1",
            )
            .bind(id)
            .bind(at)
            .bind(seq)
            .execute(&mut *conn)
            .await?
        }
        UserEvent::UserErased { .. } => {
            let erased = sqlx::query(
                "UPDATE users SET status = 'erased', email_sealed = NULL, \
                 full_name_sealed = NULL, email_blind_index = NULL, erased_at = $2, \
                 updated_at = $2, version = $3 WHERE id = $1",
            )
            .bind(id)
            .bind(at)
            .bind(seq)
            .execute(&mut *conn)
            .await?;
            // Crypto-shredding lives here, not in the command handler: this runs in the
            // transaction that advances the checkpoint past UserErased, so the key is
            // destroyed exactly once per erasure and a crash either keeps both the key and
            // the unapplied event (to be applied again) or neither. A rebuild replays it as
            // a no-op. Sealed copies in the log and in audit_events become unreadable.
            let forgotten = [crate::Forgotten::of(id, event)?];
            crate::destroy_keys_and_forget(conn, crate::SUBJECT_KEYS, &forgotten).await?;
            erased
        }
        // Assignments live in `user_roles`; here they only move the aggregate's version,
        // which is what optimistic-concurrency checks on the user compare against.
        UserEvent::UserRoleAssigned { .. } | UserEvent::UserRoleRevoked { .. } => {
            sqlx::query("UPDATE users SET version = $2 WHERE id = $1")
                .bind(id)
                .bind(seq)
                .execute(&mut *conn)
                .await?
        }
    };
    one_row(event, result, "users")
}
