//! Commands of the API key aggregate. The service layer makes the secret and hands in only
//! its prefix and hash, plus what the issuer may grant.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use crate::PermissionSet;

#[derive(Debug, Clone, Deserialize)]
pub enum ApiKeyCommand {
    Issue {
        key_id: Uuid,
        organization_id: Option<Uuid>,
        user_id: Option<Uuid>,
        label: String,
        permissions: PermissionSet,
        expires_at: Option<DateTime<Utc>>,
        prefix: String,
        secret_hash: String,
        bootstrap: bool,
        /// The issuer's effective permissions; the key may not exceed them.
        grantable: PermissionSet,
        now: DateTime<Utc>,
    },
    Revoke {
        reason: Option<String>,
    },
    Rotate {
        prefix: String,
        secret_hash: String,
        /// Until when the secret being replaced keeps working, if at all: after `now`, at
        /// most [`crate::api_key::MAX_ROTATION_GRACE`] later.
        previous_valid_until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    },
}
