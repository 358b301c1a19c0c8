//! Commands of the User aggregate. The service layer validates and seals personal data
//! (it holds the keys); the aggregate checks it got ciphertext and enforces the life cycle.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use crate::Sealed;

/// A validated, sealed e-mail address with its blind index.
#[derive(Debug, Clone, Deserialize)]
pub struct SealedEmail {
    pub sealed: Sealed,
    pub blind_index: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SealedProfile {
    pub email: SealedEmail,
    pub full_name: Sealed,
}

#[derive(Debug, Clone, Deserialize)]
pub enum UserCommand {
    Invite {
        user_id: Uuid,
        organization_id: Uuid,
        profile: SealedProfile,
    },
    /// Only the fields that change. The service layer, which alone can open the current
    /// values, leaves out a field given with its current value and says so in `unchanged`.
    UpdateProfile {
        email: Option<SealedEmail>,
        full_name: Option<Sealed>,
        unchanged: bool,
    },
    Deactivate {
        reason: Option<String>,
    },
    Reactivate,
    Erase,
    /// `now` comes from the caller so the aggregate stays free of clocks.
    AssignRole {
        role_id: Uuid,
        expires_at: Option<DateTime<Utc>>,
        reason: Option<String>,
        now: DateTime<Utc>,
    },
    RevokeRole {
        role_id: Uuid,
        reason: Option<String>,
    },
}
