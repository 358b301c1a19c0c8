//! Events of the API key aggregate. They hold the secret's hash and prefix, never the secret.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::PermissionSet;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ApiKeyEvent {
    ApiKeyIssued {
        key_id: Uuid,
        /// `None` for the platform operator's key.
        organization_id: Option<Uuid>,
        /// `None` for a service key.
        user_id: Option<Uuid>,
        label: String,
        permissions: PermissionSet,
        expires_at: Option<DateTime<Utc>>,
        prefix: String,
        /// Hex BLAKE3 of the secret.
        secret_hash: String,
        /// True only for the key `ledgerline bootstrap` makes.
        bootstrap: bool,
    },
    ApiKeyRevoked {
        reason: Option<String>,
    },
    /// A new secret replaces the old one, which stops working with this event, or at
    /// `previous_valid_until` when the rotation gave it a grace period (so that clients can
    /// move over, and a client whose answer was lost can still rotate again). A later
    /// rotation ends that grace; a revocation ends every secret.
    ApiKeyRotated {
        prefix: String,
        secret_hash: String,
        previous_prefix: String,
        // Absent from rotations without a grace period, as from those written before it
        // existed: their payloads stay as they were.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_valid_until: Option<DateTime<Utc>>,
    },
}

impl DomainEvent for ApiKeyEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ApiKeyIssued { .. } => "ApiKeyIssued",
            Self::ApiKeyRevoked { .. } => "ApiKeyRevoked",
            Self::ApiKeyRotated { .. } => "ApiKeyRotated",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
