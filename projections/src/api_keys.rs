//! The `api_keys` read model: what authentication looks keys up by (prefix, then hash) and
//! what key management lists. It holds the secret's hash and prefix, never the secret.

use ledgerline_aggregates::api_key::ApiKeyEvent;
use ledgerline_aggregates::metadata;
use sqlx::PgConnection;

use crate::decode::{self, one_row, Metadata};
use crate::{ProjectionError, StoredEvent};

pub const NAME: &str = "api_keys";
pub const TABLES: &[&str] = &["api_keys"];

pub async fn apply(conn: &mut PgConnection, event: &StoredEvent) -> Result<(), ProjectionError> {
    if event.aggregate_type != "ApiKey" {
        return Ok(());
    }
    let id = decode::aggregate_id(event)?;
    let at = event.recorded_at;
    let result = match decode::payload::<ApiKeyEvent>(event)? {
        ApiKeyEvent::ApiKeyIssued {
            key_id,
            organization_id,
            user_id,
            label,
            permissions,
            expires_at,
            prefix,
            secret_hash,
            bootstrap: _,
        } => {
            if key_id != id {
                return Err(ProjectionError::inconsistent(
                    event.position,
                    format!("ApiKeyIssued names {key_id} in aggregate {id}"),
                ));
            }
            let permissions: Vec<&str> = permissions.iter().map(|p| p.as_str()).collect();
            let created_by = Metadata::of(event)?.uuid(metadata::ACTOR_KEY_ID)?;
            sqlx::query(
                "INSERT INTO api_keys (id, organization_id, user_id, label, prefix, key_hash, \
                 permissions, status, expires_at, created_at, created_by_key_id, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $9, $10, $11)",
            )
            .bind(id)
            .bind(organization_id)
            .bind(user_id)
            .bind(label)
            .bind(prefix)
            .bind(secret_hash)
            .bind(permissions)
            .bind(expires_at)
            .bind(at)
            .bind(created_by)
            .bind(event.sequence)
            .execute(&mut *conn)
            .await?
        }
        ApiKeyEvent::ApiKeyRevoked { reason } => {
            sqlx::query(
                "UPDATE api_keys SET status = 'revoked', revoked_at = $2, \
                 revocation_reason = $3, version = $4 WHERE id = $1",
            )
            .bind(id)
            .bind(at)
            .bind(reason)
            .bind(event.sequence)
            .execute(&mut *conn)
            .await?
        }
        // The row's secret is replaced here (a grace period the rotation gave the old one
        // is honoured from the log, by authentication). Matching on the previous prefix
        // proves the log and the row agree on which secret is being replaced.
        ApiKeyEvent::ApiKeyRotated {
            prefix,
            secret_hash,
            previous_prefix,
            ..
        } => {
            sqlx::query(
                "UPDATE api_keys SET prefix = $2, key_hash = $3, rotated_at = $4, \
                 version = $5 WHERE id = $1 AND prefix = $6",
            )
            .bind(id)
            .bind(prefix)
            .bind(secret_hash)
            .bind(at)
            .bind(event.sequence)
            .bind(previous_prefix)
            .execute(&mut *conn)
            .await?
        }
    };
    one_row(event, result, "api_keys")
}
