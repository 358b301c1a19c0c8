//! Commands of the Conversation aggregate. Facts about users (active, of this organization)
//! are checked by the service layer before the command is built.

use std::collections::BTreeSet;

use serde::Deserialize;
use uuid::Uuid;

use super::{ConversationKind, ParticipantRole};

/// Who acts on a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ConversationActor {
    /// A user key: the user's own role in the conversation decides what it may do.
    User(Uuid),
    /// A service key of the organization holding `conversations:write`: it moderates with
    /// an owner's rights, but is never a participant.
    Service,
}

#[derive(Debug, Clone, Deserialize)]
pub enum ConversationCommand {
    Create {
        conversation_id: Uuid,
        organization_id: Uuid,
        kind: ConversationKind,
        title: Option<String>,
        description: Option<String>,
        /// The creator, who becomes the owner.
        owner_id: Uuid,
        /// The other participants; repeating anyone, the owner included, is refused.
        members: Vec<Uuid>,
    },
    /// `None` leaves a field as it is; `Some(None)` clears it.
    Update {
        title: Option<Option<String>>,
        description: Option<Option<String>>,
        actor: ConversationActor,
    },
    Archive {
        actor: ConversationActor,
    },
    Unarchive {
        actor: ConversationActor,
    },
    AddParticipant {
        user_id: Uuid,
        role: ParticipantRole,
        actor: ConversationActor,
    },
    /// Removing oneself is leaving.
    RemoveParticipant {
        user_id: Uuid,
        actor: ConversationActor,
    },
    /// Making someone `owner` hands ownership over: the previous owner becomes `admin`.
    ChangeRole {
        user_id: Uuid,
        role: ParticipantRole,
        actor: ConversationActor,
    },
    /// Muting is personal: the service layer lets a user mute only itself.
    Mute {
        user_id: Uuid,
    },
    Unmute {
        user_id: Uuid,
    },
    /// The service layer's answer to a user's erasure or deactivation, never a client's
    /// command: an erased user leaves, and ownership a user who left or cannot act held
    /// passes to the longest-standing participant in `able` (admins before members), the
    /// ones who can act (active users, as the service layer knows them).
    Withdraw {
        user_id: Uuid,
        departure: Departure,
        able: BTreeSet<Uuid>,
    },
}

/// Why a user withdraws from a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Departure {
    /// Deactivated: may be reactivated, so stays a participant; only ownership passes on
    /// (the deactivated owner becomes an admin, as after handing ownership over).
    Deactivated,
    /// Erased: leaves for good, removed `by` whoever erased them (`None`: a service or the
    /// platform operator's key).
    Erased { by: Option<Uuid> },
}
