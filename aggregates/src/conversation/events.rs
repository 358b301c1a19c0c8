//! Events of the Conversation aggregate.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConversationKind {
    /// Exactly two distinct participants, fixed for life.
    Direct,
    Group,
    Channel,
}

impl ConversationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Group => "group",
            Self::Channel => "channel",
        }
    }
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ParticipantRole {
    Owner,
    Admin,
    Member,
}

impl ParticipantRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Member => "member",
        }
    }

    /// Owners and admins manage participants and may delete others' messages.
    pub fn moderates(self) -> bool {
        matches!(self, Self::Owner | Self::Admin)
    }
}

/// The editable text of a conversation, as carried by its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationSpec {
    pub title: Option<String>,
    pub description: Option<String>,
}

/// One participant and its role, as listed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub user_id: Uuid,
    pub role: ParticipantRole,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ConversationEvent {
    /// `participants` lists everyone who joins at creation, the owner first.
    ConversationCreated {
        conversation_id: Uuid,
        organization_id: Uuid,
        kind: ConversationKind,
        spec: ConversationSpec,
        created_by: Uuid,
        participants: Vec<Member>,
    },
    /// Carries the whole spec before and after, so an auditor reads the change directly.
    ConversationUpdated {
        before: ConversationSpec,
        after: ConversationSpec,
    },
    ConversationArchived {},
    ConversationUnarchived {},
    ParticipantAdded {
        user_id: Uuid,
        role: ParticipantRole,
    },
    /// Removed by someone else (`by`, `None` for a service key) or, when `by` is the user
    /// itself, left.
    ParticipantRemoved {
        user_id: Uuid,
        by: Option<Uuid>,
    },
    ParticipantRoleChanged {
        user_id: Uuid,
        before: ParticipantRole,
        after: ParticipantRole,
    },
    ParticipantMuted {
        user_id: Uuid,
    },
    ParticipantUnmuted {
        user_id: Uuid,
    },
}

impl DomainEvent for ConversationEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ConversationCreated { .. } => "ConversationCreated",
            Self::ConversationUpdated { .. } => "ConversationUpdated",
            Self::ConversationArchived { .. } => "ConversationArchived",
            Self::ConversationUnarchived { .. } => "ConversationUnarchived",
            Self::ParticipantAdded { .. } => "ParticipantAdded",
            Self::ParticipantRemoved { .. } => "ParticipantRemoved",
            Self::ParticipantRoleChanged { .. } => "ParticipantRoleChanged",
            Self::ParticipantMuted { .. } => "ParticipantMuted",
            Self::ParticipantUnmuted { .. } => "ParticipantUnmuted",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
