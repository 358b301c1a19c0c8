//! Commands of the Message aggregate. Content arrives sealed (the service layer holds the
//! keys); the conversation's state arrives as facts.

use serde::Deserialize;
use uuid::Uuid;

use crate::conversation::ParticipantRole;
use crate::Sealed;

/// The conversation as the service layer found it, for the acting user.
#[derive(Debug, Clone, Deserialize)]
pub struct ConversationFacts {
    pub conversation_id: Uuid,
    pub organization_id: Uuid,
    pub archived: bool,
    /// The acting user's role (for a post through a service key, the author's);
    /// `None` when that user is not a participant.
    pub role: Option<ParticipantRole>,
}

/// The message a reply answers, as found in the read model (a message's conversation and
/// thread never change, so these facts cannot go stale).
#[derive(Debug, Clone, Deserialize)]
pub struct ParentFacts {
    pub message_id: Uuid,
    pub conversation_id: Uuid,
    /// The root of the parent's thread; `None` when the parent is itself a root.
    pub thread_root_id: Option<Uuid>,
}

/// An attachment as described by the poster: ledgerline keeps the description, not the file.
#[derive(Debug, Clone, Deserialize)]
pub struct NewAttachment {
    /// Sealed: a file name is often personal data.
    pub file_name: Sealed,
    pub mime_type: String,
    pub size_bytes: i64,
    /// BLAKE3 of the file's content, 64 lowercase hex characters.
    pub blake3: String,
}

/// Who deletes a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MessageActor {
    User(Uuid),
    /// A service key with `conversations:write`: moderates like a conversation owner.
    Service,
}

#[derive(Debug, Clone, Deserialize)]
pub enum MessageCommand {
    Post {
        message_id: Uuid,
        conversation: ConversationFacts,
        author_id: Uuid,
        content: Sealed,
        /// The clear text's size, measured by the service layer before sealing.
        content_bytes: usize,
        parent: Option<ParentFacts>,
        attachments: Vec<NewAttachment>,
    },
    /// Author only.
    Edit {
        conversation: ConversationFacts,
        editor_id: Uuid,
        content: Sealed,
        content_bytes: usize,
        /// The new content equals the current one: the service layer, which alone can open
        /// the current content, compared them.
        unchanged: bool,
    },
    /// The author, a conversation owner or admin, or a service key.
    Delete {
        conversation: ConversationFacts,
        actor: MessageActor,
    },
    React {
        conversation: ConversationFacts,
        user_id: Uuid,
        emoji: String,
    },
    Unreact {
        conversation: ConversationFacts,
        user_id: Uuid,
        emoji: String,
    },
    /// The user has read the conversation up to and including this message.
    MarkRead {
        conversation: ConversationFacts,
        user_id: Uuid,
    },
}
