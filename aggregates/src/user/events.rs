//! Events of the User aggregate. Personal data appears only as [`Sealed`] ciphertext.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Sealed;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserEvent {
    UserInvited {
        user_id: Uuid,
        organization_id: Uuid,
        email: Sealed,
        full_name: Sealed,
        /// Keyed BLAKE3 of the lower-cased address: uniqueness without clear text.
        email_blind_index: String,
    },
    /// Only the fields that changed are present.
    UserProfileUpdated {
        email: Option<Sealed>,
        email_blind_index: Option<String>,
        previous_email_blind_index: Option<String>,
        full_name: Option<Sealed>,
    },
    UserDeactivated {
        reason: Option<String>,
    },
    UserReactivated {},
    /// The user's data key is destroyed with this event; the blind index it names is released.
    UserErased {
        email_blind_index: String,
    },
    UserRoleAssigned {
        role_id: Uuid,
        expires_at: Option<DateTime<Utc>>,
        reason: Option<String>,
    },
    UserRoleRevoked {
        role_id: Uuid,
        reason: Option<String>,
    },
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        match self {
            Self::UserInvited { .. } => "UserInvited",
            Self::UserProfileUpdated { .. } => "UserProfileUpdated",
            Self::UserDeactivated { .. } => "UserDeactivated",
            Self::UserReactivated { .. } => "UserReactivated",
            Self::UserErased { .. } => "UserErased",
            Self::UserRoleAssigned { .. } => "UserRoleAssigned",
            Self::UserRoleRevoked { .. } => "UserRoleRevoked",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
