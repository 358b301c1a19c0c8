//! Commands of the Conversation aggregate. Facts about users (active, of this organization)
//! are checked by the service layer before the command is built.

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
}
