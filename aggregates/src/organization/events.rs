//! Events of the Organization aggregate.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The editable profile of an organization, as carried by its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrganizationProfile {
    pub name: String,
    pub slug: String,
    pub country_code: Option<String>,
    pub domain: Option<String>,
    /// Free-form settings; always a JSON object.
    pub settings: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrganizationEvent {
    OrganizationCreated {
        organization_id: Uuid,
        profile: OrganizationProfile,
    },
    /// Carries the whole profile before and after, so an auditor reads the change directly.
    OrganizationUpdated {
        before: OrganizationProfile,
        after: OrganizationProfile,
    },
    OrganizationSuspended {
        reason: Option<String>,
    },
    OrganizationReactivated {},
}

impl DomainEvent for OrganizationEvent {
    fn event_type(&self) -> String {
        match self {
            Self::OrganizationCreated { .. } => "OrganizationCreated",
            Self::OrganizationUpdated { .. } => "OrganizationUpdated",
            Self::OrganizationSuspended { .. } => "OrganizationSuspended",
            Self::OrganizationReactivated { .. } => "OrganizationReactivated",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
