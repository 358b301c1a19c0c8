//! The API key aggregate's state, the rules its commands must pass, and its errors.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApiKeyCommand, ApiKeyEvent};
use crate::permissions::{self, Permission, PermissionSet};
use crate::{validate, Rejection};

/// The longest prefix accepted; prefixes are shown in lists and logs.
const MAX_PREFIX_CHARS: usize = 64;
/// The longest a rotated-away secret may keep working: long enough to move a fleet over, or
/// to rotate again after a lost answer; short, as it is a second secret of the same powers.
pub const MAX_ROTATION_GRACE: chrono::TimeDelta = chrono::TimeDelta::hours(24);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
// As the read models write it (an entity's history shows the aggregate's own state).
#[serde(rename_all = "lowercase")]
pub enum ApiKeyStatus {
    /// Usable until it expires; expiry is a matter of time, not of events.
    Active,
    /// Final.
    Revoked,
}

/// An API key as rebuilt from its events. Every field is empty until it is issued.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    id: Option<Uuid>,
    organization_id: Option<Uuid>,
    user_id: Option<Uuid>,
    label: String,
    permissions: PermissionSet,
    expires_at: Option<DateTime<Utc>>,
    prefix: String,
    secret_hash: String,
    /// Prefixes of earlier secrets, which may never name a secret again.
    retired_prefixes: Vec<String>,
    bootstrap: bool,
    status: Option<ApiKeyStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyError {
    #[error("an API key with this id already exists")]
    AlreadyExists,
    #[error("the API key does not exist")]
    NotFound,
    /// A field broke an input rule; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("platform:admin cannot be granted to an organization's key")]
    PlatformAdmin,
    #[error("you cannot grant permissions you do not hold: {}", permissions::list(.missing))]
    Escalation { missing: Vec<Permission> },
    #[error("the API key is already revoked")]
    AlreadyRevoked,
    #[error("the API key has been revoked and cannot be rotated")]
    Revoked,
    #[error("the new prefix has already been used by this key")]
    PrefixReused,
}

impl ApiKeyError {
    pub fn rejection(&self) -> Rejection {
        match self {
            Self::Invalid(_) | Self::PlatformAdmin | Self::PrefixReused => Rejection::Invalid,
            Self::NotFound => Rejection::NotFound,
            Self::AlreadyExists | Self::AlreadyRevoked | Self::Revoked => Rejection::Conflict,
            Self::Escalation { .. } => Rejection::Forbidden,
        }
    }
}

impl ApiKey {
    pub fn id(&self) -> Option<Uuid> {
        self.id
    }

    /// `None` for a platform key, and before issue.
    pub fn organization_id(&self) -> Option<Uuid> {
        self.organization_id
    }

    /// `None` for a service key, and before issue.
    pub fn user_id(&self) -> Option<Uuid> {
        self.user_id
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn permissions(&self) -> &PermissionSet {
        &self.permissions
    }

    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.expires_at
    }

    /// The prefix of the current secret.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hex BLAKE3 of the current secret.
    pub fn secret_hash(&self) -> &str {
        &self.secret_hash
    }

    pub fn is_bootstrap(&self) -> bool {
        self.bootstrap
    }

    /// `None` until the key is issued.
    pub fn status(&self) -> Option<ApiKeyStatus> {
        self.status
    }

    /// Whether the key authenticates a request made at `now`.
    pub fn is_usable(&self, now: DateTime<Utc>) -> bool {
        self.status == Some(ApiKeyStatus::Active) && self.expires_at.is_none_or(|at| at > now)
    }

    /// Every command yields exactly one event or none, so the rules live in this plain
    /// function and `handle` only writes its answer.
    fn decide(&self, command: ApiKeyCommand) -> Result<ApiKeyEvent, ApiKeyError> {
        match command {
            ApiKeyCommand::Issue {
                key_id,
                organization_id,
                user_id,
                label,
                permissions,
                expires_at,
                prefix,
                secret_hash,
                bootstrap,
                grantable,
                now,
            } => {
                if self.status.is_some() {
                    return Err(ApiKeyError::AlreadyExists);
                }
                let label = invalid(validate::name("label", &label))?;
                // A key without permissions could authenticate but never act.
                if permissions.is_empty() {
                    return Err(invalid_msg("an API key must hold at least one permission"));
                }
                if organization_id.is_none() && user_id.is_some() {
                    return Err(invalid_msg(
                        "a user's key must belong to the user's organization",
                    ));
                }
                if bootstrap && organization_id.is_some() {
                    return Err(invalid_msg("the bootstrap key must be a platform key"));
                }
                if organization_id.is_some() && permissions.contains(&Permission::PlatformAdmin) {
                    return Err(ApiKeyError::PlatformAdmin);
                }
                if !permissions::may_grant(&grantable, &permissions) {
                    return Err(ApiKeyError::Escalation {
                        missing: permissions::missing(&grantable, &permissions),
                    });
                }
                if expires_at.is_some_and(|at| at <= now) {
                    return Err(invalid_msg("expires_at must be in the future"));
                }
                let prefix = check_prefix(prefix)?;
                let secret_hash = invalid(validate::hex_digest("secret hash", &secret_hash))?;
                Ok(ApiKeyEvent::ApiKeyIssued {
                    key_id,
                    organization_id,
                    user_id,
                    label,
                    permissions,
                    expires_at,
                    prefix,
                    secret_hash,
                    bootstrap,
                })
            }
            ApiKeyCommand::Revoke { reason } => {
                match self.status {
                    None => return Err(ApiKeyError::NotFound),
                    Some(ApiKeyStatus::Revoked) => return Err(ApiKeyError::AlreadyRevoked),
                    Some(ApiKeyStatus::Active) => {}
                }
                let reason = invalid(validate::reason(reason.as_deref()))?;
                Ok(ApiKeyEvent::ApiKeyRevoked { reason })
            }
            ApiKeyCommand::Rotate {
                prefix,
                secret_hash,
                previous_valid_until,
                now,
            } => {
                match self.status {
                    None => return Err(ApiKeyError::NotFound),
                    Some(ApiKeyStatus::Revoked) => return Err(ApiKeyError::Revoked),
                    Some(ApiKeyStatus::Active) => {}
                }
                let prefix = check_prefix(prefix)?;
                // The old prefixes stay claimed by this key, so the claim store would let it
                // take one back; only the aggregate knows it must not.
                if prefix == self.prefix || self.retired_prefixes.contains(&prefix) {
                    return Err(ApiKeyError::PrefixReused);
                }
                let secret_hash = invalid(validate::hex_digest("secret hash", &secret_hash))?;
                if let Some(until) = previous_valid_until {
                    if until <= now || until - now > MAX_ROTATION_GRACE {
                        return Err(invalid_msg(&format!(
                            "the previous secret's grace period must end in the future and \
                             within {} hours",
                            MAX_ROTATION_GRACE.num_hours()
                        )));
                    }
                }
                Ok(ApiKeyEvent::ApiKeyRotated {
                    prefix,
                    secret_hash,
                    previous_prefix: self.prefix.clone(),
                    previous_valid_until,
                })
            }
        }
    }
}

fn invalid<T>(result: Result<T, String>) -> Result<T, ApiKeyError> {
    result.map_err(ApiKeyError::Invalid)
}

fn invalid_msg(message: &str) -> ApiKeyError {
    ApiKeyError::Invalid(message.to_string())
}

/// Prefixes are looked up verbatim and shown to people, so no blanks or invisible characters.
fn check_prefix(prefix: String) -> Result<String, ApiKeyError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_CHARS
        && prefix.bytes().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(prefix)
    } else {
        Err(ApiKeyError::Invalid(format!(
            "prefix must be 1-{MAX_PREFIX_CHARS} printable ASCII characters without spaces"
        )))
    }
}

impl Aggregate for ApiKey {
    const TYPE: &'static str = "ApiKey";
    type Command = ApiKeyCommand;
    type Event = ApiKeyEvent;
    type Error = ApiKeyError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = self.decide(command)?;
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ApiKeyEvent::ApiKeyIssued {
                key_id,
                organization_id,
                user_id,
                label,
                permissions,
                expires_at,
                prefix,
                secret_hash,
                bootstrap,
            } => {
                self.id = Some(key_id);
                self.organization_id = organization_id;
                self.user_id = user_id;
                self.label = label;
                self.permissions = permissions;
                self.expires_at = expires_at;
                self.prefix = prefix;
                self.secret_hash = secret_hash;
                self.bootstrap = bootstrap;
                self.status = Some(ApiKeyStatus::Active);
            }
            ApiKeyEvent::ApiKeyRevoked { .. } => self.status = Some(ApiKeyStatus::Revoked),
            ApiKeyEvent::ApiKeyRotated {
                prefix,
                secret_hash,
                previous_prefix,
                ..
            } => {
                self.retired_prefixes.push(previous_prefix);
                self.prefix = prefix;
                self.secret_hash = secret_hash;
            }
        }
    }
}
