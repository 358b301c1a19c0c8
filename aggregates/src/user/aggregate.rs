//! The User aggregate's state, the rules its commands must pass, and its errors.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{SealedEmail, UserCommand, UserEvent};
use crate::{validate, Rejection, Sealed};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
// As the read models write it (an entity's history shows the aggregate's own state).
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    Active,
    Deactivated,
    /// Final: the personal data is unreadable and the user accepts no more commands.
    Erased,
}

/// One role held by a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleAssignment {
    pub expires_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
}

impl RoleAssignment {
    /// Whether the assignment still grants its role at `now`. Expired assignments stay
    /// until revoked, so the state never depends on a clock.
    pub fn is_current(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

/// A user as rebuilt from its events. Every field is empty until the user is invited.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    id: Option<Uuid>,
    organization_id: Option<Uuid>,
    status: Option<UserStatus>,
    email: Option<Sealed>,
    full_name: Option<Sealed>,
    email_blind_index: Option<String>,
    roles: BTreeMap<Uuid, RoleAssignment>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("a user with this id already exists")]
    AlreadyExists,
    #[error("the user does not exist")]
    NotFound,
    /// A field broke an input rule; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("personal data must be sealed")]
    NotSealed,
    #[error("nothing to change: give a new e-mail address, a new full name or both")]
    NoChange,
    #[error("nothing to change: the update leaves the user as it is")]
    Unchanged,
    #[error("nothing to change: the role is already assigned with this expiry and reason")]
    AssignmentUnchanged,
    #[error("the user is already deactivated")]
    AlreadyDeactivated,
    #[error("the user is not deactivated")]
    NotDeactivated,
    #[error("the user is deactivated; reactivate the user first")]
    Deactivated,
    #[error("the user has been erased")]
    Erased,
    #[error("the user has already been erased")]
    AlreadyErased,
    #[error("role {0} is not assigned to the user")]
    RoleNotAssigned(Uuid),
}

impl UserError {
    pub fn rejection(&self) -> Rejection {
        match self {
            Self::Invalid(_)
            | Self::NotSealed
            | Self::NoChange
            | Self::Unchanged
            | Self::AssignmentUnchanged => Rejection::Invalid,
            Self::NotFound => Rejection::NotFound,
            Self::AlreadyExists
            | Self::AlreadyDeactivated
            | Self::NotDeactivated
            | Self::Deactivated
            | Self::Erased
            | Self::AlreadyErased
            | Self::RoleNotAssigned(_) => Rejection::Conflict,
        }
    }
}

impl User {
    pub fn id(&self) -> Option<Uuid> {
        self.id
    }

    pub fn organization_id(&self) -> Option<Uuid> {
        self.organization_id
    }

    /// `None` until the user is invited.
    pub fn status(&self) -> Option<UserStatus> {
        self.status
    }

    pub fn is_active(&self) -> bool {
        self.status == Some(UserStatus::Active)
    }

    /// `None` once erased.
    pub fn email(&self) -> Option<&Sealed> {
        self.email.as_ref()
    }

    /// `None` once erased.
    pub fn full_name(&self) -> Option<&Sealed> {
        self.full_name.as_ref()
    }

    /// `None` once erased: the index is released with the erasure.
    pub fn email_blind_index(&self) -> Option<&str> {
        self.email_blind_index.as_deref()
    }

    /// Every assignment, expired ones included; see [`RoleAssignment::is_current`].
    pub fn roles(&self) -> &BTreeMap<Uuid, RoleAssignment> {
        &self.roles
    }

    /// The roles that grant their permissions at `now`.
    pub fn current_roles(&self, now: DateTime<Utc>) -> impl Iterator<Item = Uuid> + '_ {
        self.roles
            .iter()
            .filter(move |(_, a)| a.is_current(now))
            .map(|(id, _)| *id)
    }

    /// The status of a user that may still be acted on.
    fn live(&self) -> Result<UserStatus, UserError> {
        match self.status {
            None => Err(UserError::NotFound),
            Some(UserStatus::Erased) => Err(UserError::Erased),
            Some(status) => Ok(status),
        }
    }

    /// Every command yields exactly one event or none, so the rules live in this plain
    /// function and `handle` only writes its answer.
    fn decide(&self, command: UserCommand) -> Result<UserEvent, UserError> {
        match command {
            UserCommand::Invite {
                user_id,
                organization_id,
                profile,
            } => {
                if self.status.is_some() {
                    return Err(UserError::AlreadyExists);
                }
                let email_blind_index = check_email(&profile.email)?;
                sealed(&profile.full_name)?;
                Ok(UserEvent::UserInvited {
                    user_id,
                    organization_id,
                    email: profile.email.sealed,
                    full_name: profile.full_name,
                    email_blind_index,
                })
            }
            UserCommand::UpdateProfile {
                email,
                full_name,
                unchanged,
            } => {
                // Deactivated users may still be corrected: deactivation ends access, not
                // the record.
                self.live()?;
                // An update that changes nothing would put a meaningless entry in the ledger.
                if email.is_none() && full_name.is_none() {
                    return Err(if unchanged {
                        UserError::Unchanged
                    } else {
                        UserError::NoChange
                    });
                }
                if let Some(full_name) = &full_name {
                    sealed(full_name)?;
                }
                // A re-sealed address with the same blind index is passed on as given: the
                // ciphertext differs (fresh nonce) and the claims ignore an unchanged index.
                let (email, email_blind_index, previous_email_blind_index) = match email {
                    Some(email) => {
                        let index = check_email(&email)?;
                        (
                            Some(email.sealed),
                            Some(index),
                            self.email_blind_index.clone(),
                        )
                    }
                    None => (None, None, None),
                };
                Ok(UserEvent::UserProfileUpdated {
                    email,
                    email_blind_index,
                    previous_email_blind_index,
                    full_name,
                })
            }
            UserCommand::Deactivate { reason } => {
                if self.live()? == UserStatus::Deactivated {
                    return Err(UserError::AlreadyDeactivated);
                }
                let reason = invalid(validate::reason(reason.as_deref()))?;
                Ok(UserEvent::UserDeactivated { reason })
            }
            UserCommand::Reactivate => {
                if self.live()? == UserStatus::Active {
                    return Err(UserError::NotDeactivated);
                }
                Ok(UserEvent::UserReactivated {})
            }
            UserCommand::Erase => match self.status {
                None => Err(UserError::NotFound),
                Some(UserStatus::Erased) => Err(UserError::AlreadyErased),
                Some(UserStatus::Active | UserStatus::Deactivated) => Ok(UserEvent::UserErased {
                    // Present for every invited, unerased user; the default only keeps a
                    // corrupt stream from panicking.
                    email_blind_index: self.email_blind_index.clone().unwrap_or_default(),
                }),
            },
            UserCommand::AssignRole {
                role_id,
                expires_at,
                reason,
                now,
            } => {
                if self.live()? == UserStatus::Deactivated {
                    return Err(UserError::Deactivated);
                }
                if expires_at.is_some_and(|at| at <= now) {
                    return Err(UserError::Invalid(
                        "expires_at must be in the future".to_string(),
                    ));
                }
                let assignment = RoleAssignment {
                    expires_at,
                    reason: invalid(validate::reason(reason.as_deref()))?,
                };
                // Assigning again replaces the assignment (a new expiry, say), but an
                // identical one would only add noise to the ledger.
                if self.roles.get(&role_id) == Some(&assignment) {
                    return Err(UserError::AssignmentUnchanged);
                }
                Ok(UserEvent::UserRoleAssigned {
                    role_id,
                    expires_at: assignment.expires_at,
                    reason: assignment.reason,
                })
            }
            UserCommand::RevokeRole { role_id, reason } => {
                // Revoking only ever removes access, so deactivated users allow it too.
                self.live()?;
                if !self.roles.contains_key(&role_id) {
                    return Err(UserError::RoleNotAssigned(role_id));
                }
                let reason = invalid(validate::reason(reason.as_deref()))?;
                Ok(UserEvent::UserRoleRevoked { role_id, reason })
            }
        }
    }
}

fn invalid<T>(result: Result<T, String>) -> Result<T, UserError> {
    result.map_err(UserError::Invalid)
}

/// Clear text must never reach an event: once appended it could not be erased.
fn sealed(value: &Sealed) -> Result<(), UserError> {
    if value.is_well_formed() {
        Ok(())
    } else {
        Err(UserError::NotSealed)
    }
}

/// Checks a sealed address and returns its blind index.
fn check_email(email: &SealedEmail) -> Result<String, UserError> {
    sealed(&email.sealed)?;
    invalid(validate::hex_digest(
        "email blind index",
        &email.blind_index,
    ))
}

impl Aggregate for User {
    const TYPE: &'static str = "User";
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;
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
            UserEvent::UserInvited {
                user_id,
                organization_id,
                email,
                full_name,
                email_blind_index,
            } => {
                self.id = Some(user_id);
                self.organization_id = Some(organization_id);
                self.status = Some(UserStatus::Active);
                self.email = Some(email);
                self.full_name = Some(full_name);
                self.email_blind_index = Some(email_blind_index);
            }
            UserEvent::UserProfileUpdated {
                email,
                email_blind_index,
                full_name,
                ..
            } => {
                if email.is_some() {
                    self.email = email;
                }
                if email_blind_index.is_some() {
                    self.email_blind_index = email_blind_index;
                }
                if full_name.is_some() {
                    self.full_name = full_name;
                }
            }
            UserEvent::UserDeactivated { .. } => self.status = Some(UserStatus::Deactivated),
            UserEvent::UserReactivated {} => self.status = Some(UserStatus::Active),
            UserEvent::UserErased { .. } => {
                // The ciphertext is unreadable once the key is gone; dropping it and the
                // roles keeps the state from suggesting otherwise.
                self.status = Some(UserStatus::Erased);
                self.email = None;
                self.full_name = None;
                self.email_blind_index = None;
                self.roles.clear();
            }
            UserEvent::UserRoleAssigned {
                role_id,
                expires_at,
                reason,
            } => {
                self.roles
                    .insert(role_id, RoleAssignment { expires_at, reason });
            }
            UserEvent::UserRoleRevoked { role_id, .. } => {
                self.roles.remove(&role_id);
            }
        }
    }
}
