//! Events of the Message aggregate. Text and file names appear only as [`Sealed`]
//! ciphertext under the message's own key; every event names its conversation, so an
//! auditor (or a projection) can follow a conversation without looking anything up.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Sealed;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub file_name: Sealed,
    pub mime_type: String,
    pub size_bytes: i64,
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MessageEvent {
    MessagePosted {
        message_id: Uuid,
        conversation_id: Uuid,
        organization_id: Uuid,
        author_id: Uuid,
        content: Sealed,
        parent_message_id: Option<Uuid>,
        /// The first message of the thread this one belongs to; `None` for a root.
        thread_root_id: Option<Uuid>,
        attachments: Vec<Attachment>,
    },
    MessageEdited {
        conversation_id: Uuid,
        content: Sealed,
    },
    /// The message's key is destroyed with this event: content and file names become
    /// unreadable everywhere, while the chain still verifies. `by` is `None` for a service key.
    MessageDeleted {
        conversation_id: Uuid,
        by: Option<Uuid>,
    },
    ReactionAdded {
        conversation_id: Uuid,
        user_id: Uuid,
        emoji: String,
    },
    ReactionRemoved {
        conversation_id: Uuid,
        user_id: Uuid,
        emoji: String,
    },
    MessageRead {
        conversation_id: Uuid,
        user_id: Uuid,
    },
}

impl DomainEvent for MessageEvent {
    fn event_type(&self) -> String {
        match self {
            Self::MessagePosted { .. } => "MessagePosted",
            Self::MessageEdited { .. } => "MessageEdited",
            Self::MessageDeleted { .. } => "MessageDeleted",
            Self::ReactionAdded { .. } => "ReactionAdded",
            Self::ReactionRemoved { .. } => "ReactionRemoved",
            Self::MessageRead { .. } => "MessageRead",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
