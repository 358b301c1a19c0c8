//! Events of the Role aggregate.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::PermissionSet;

/// What a role says, as carried by its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleSpec {
    pub name: String,
    pub description: String,
    /// The role's own permissions; inherited ones are resolved by readers from the parent.
    pub permissions: PermissionSet,
    pub parent_role_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RoleEvent {
    RoleCreated {
        role_id: Uuid,
        organization_id: Uuid,
        spec: RoleSpec,
        built_in: bool,
    },
    /// Carries the whole spec before and after, so an auditor reads the change directly.
    RoleUpdated {
        before: RoleSpec,
        after: RoleSpec,
    },
    RoleDeleted {
        name: String,
    },
}

impl DomainEvent for RoleEvent {
    fn event_type(&self) -> String {
        match self {
            Self::RoleCreated { .. } => "RoleCreated",
            Self::RoleUpdated { .. } => "RoleUpdated",
            Self::RoleDeleted { .. } => "RoleDeleted",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
