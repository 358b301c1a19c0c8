//! The Organization aggregate's state, the rules its commands must pass, and its errors.

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{OrganizationCommand, OrganizationEvent, OrganizationProfile};
use crate::{validate, Rejection};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
// As the read models write it (an entity's history shows the aggregate's own state).
#[serde(rename_all = "lowercase")]
pub enum OrganizationStatus {
    Active,
    Suspended,
}

/// An organization as rebuilt from its events. Every field is `None` until it is created.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Organization {
    id: Option<Uuid>,
    profile: Option<OrganizationProfile>,
    status: Option<OrganizationStatus>,
    suspension_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrganizationError {
    #[error("an organization with this id already exists")]
    AlreadyExists,
    #[error("the organization does not exist")]
    NotFound,
    /// A field broke an input rule; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("nothing to change: the update leaves the organization as it is")]
    NoChange,
    #[error("the organization is already suspended")]
    AlreadySuspended,
    #[error("the organization is not suspended")]
    NotSuspended,
}

impl OrganizationError {
    pub fn rejection(&self) -> Rejection {
        match self {
            Self::Invalid(_) | Self::NoChange => Rejection::Invalid,
            Self::NotFound => Rejection::NotFound,
            Self::AlreadyExists | Self::AlreadySuspended | Self::NotSuspended => {
                Rejection::Conflict
            }
        }
    }
}

impl Organization {
    pub fn id(&self) -> Option<Uuid> {
        self.id
    }

    pub fn profile(&self) -> Option<&OrganizationProfile> {
        self.profile.as_ref()
    }

    /// `None` until the organization is created.
    pub fn status(&self) -> Option<OrganizationStatus> {
        self.status
    }

    pub fn is_active(&self) -> bool {
        self.status == Some(OrganizationStatus::Active)
    }

    /// Why the organization is suspended, if it is and a reason was given.
    pub fn suspension_reason(&self) -> Option<&str> {
        self.suspension_reason.as_deref()
    }

    /// Every command yields exactly one event or none, so the rules live in this plain
    /// function and `handle` only writes its answer.
    fn decide(&self, command: OrganizationCommand) -> Result<OrganizationEvent, OrganizationError> {
        match command {
            OrganizationCommand::Create {
                organization_id,
                name,
                slug,
                country_code,
                domain,
                settings,
            } => {
                if self.id.is_some() {
                    return Err(OrganizationError::AlreadyExists);
                }
                let profile = OrganizationProfile {
                    name: invalid(validate::name("name", &name))?,
                    slug: invalid(validate::slug(&slug))?,
                    country_code: optional(country_code, validate::country_code)?,
                    domain: optional(domain, validate::domain)?,
                    settings,
                };
                Ok(OrganizationEvent::OrganizationCreated {
                    organization_id,
                    profile,
                })
            }
            OrganizationCommand::Update {
                name,
                slug,
                country_code,
                domain,
                settings,
            } => {
                // A suspended organization may still be corrected: suspension stops the
                // tenant's use of the platform, while whoever lifts it may need to fix the
                // profile first. Whether the tenant itself may update is the caller's call.
                let before = self.profile.as_ref().ok_or(OrganizationError::NotFound)?;
                let mut after = before.clone();
                if let Some(name) = name {
                    after.name = invalid(validate::name("name", &name))?;
                }
                if let Some(slug) = slug {
                    after.slug = invalid(validate::slug(&slug))?;
                }
                if let Some(country_code) = country_code {
                    after.country_code = optional(country_code, validate::country_code)?;
                }
                if let Some(domain) = domain {
                    after.domain = optional(domain, validate::domain)?;
                }
                if let Some(settings) = settings {
                    after.settings = settings;
                }
                // An update that changes nothing would put a meaningless entry in the ledger.
                if after == *before {
                    return Err(OrganizationError::NoChange);
                }
                Ok(OrganizationEvent::OrganizationUpdated {
                    before: before.clone(),
                    after,
                })
            }
            OrganizationCommand::Suspend { reason } => {
                match self.status {
                    None => return Err(OrganizationError::NotFound),
                    Some(OrganizationStatus::Suspended) => {
                        return Err(OrganizationError::AlreadySuspended)
                    }
                    Some(OrganizationStatus::Active) => {}
                }
                let reason = invalid(validate::reason(reason.as_deref()))?;
                Ok(OrganizationEvent::OrganizationSuspended { reason })
            }
            OrganizationCommand::Reactivate => match self.status {
                None => Err(OrganizationError::NotFound),
                Some(OrganizationStatus::Active) => Err(OrganizationError::NotSuspended),
                Some(OrganizationStatus::Suspended) => {
                    Ok(OrganizationEvent::OrganizationReactivated {})
                }
            },
        }
    }
}

fn invalid<T>(result: Result<T, String>) -> Result<T, OrganizationError> {
    result.map_err(OrganizationError::Invalid)
}

/// Validates an optional field with `rule`; `None` stays `None`.
fn optional(
    value: Option<String>,
    rule: fn(&str) -> Result<String, String>,
) -> Result<Option<String>, OrganizationError> {
    invalid(value.as_deref().map(rule).transpose())
}

impl Aggregate for Organization {
    const TYPE: &'static str = "Organization";
    type Command = OrganizationCommand;
    type Event = OrganizationEvent;
    type Error = OrganizationError;
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
            OrganizationEvent::OrganizationCreated {
                organization_id,
                profile,
            } => {
                self.id = Some(organization_id);
                self.profile = Some(profile);
                self.status = Some(OrganizationStatus::Active);
            }
            OrganizationEvent::OrganizationUpdated { after, .. } => self.profile = Some(after),
            OrganizationEvent::OrganizationSuspended { reason } => {
                self.status = Some(OrganizationStatus::Suspended);
                self.suspension_reason = reason;
            }
            OrganizationEvent::OrganizationReactivated {} => {
                self.status = Some(OrganizationStatus::Active);
                self.suspension_reason = None;
            }
        }
    }
}
