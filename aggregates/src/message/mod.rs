//! The Message aggregate: one message of a conversation with its edits, deletion, reactions
//! and read marks. Each message is a stream of its own, so its length is bounded by what
//! happens to that one message, not by the conversation's history.
//!
//! The conversation's state (is the actor a participant, with which role; is it archived)
//! is handed in as [`ConversationFacts`]. The service layer reads them together with the
//! conversation's version and the ledger store refuses the append if the conversation
//! changed in between (see `metadata::GUARD_*`), so the facts hold at commit time.

mod aggregate;
mod commands;
mod events;

pub use aggregate::{Message, MessageError};
pub use commands::{ConversationFacts, MessageActor, MessageCommand, NewAttachment, ParentFacts};
pub use events::{Attachment, MessageEvent};

/// The most a message's text may hold, in bytes of UTF-8.
pub const MAX_CONTENT_BYTES: usize = 16 * 1024;
/// The most attachments one message may describe.
pub const MAX_ATTACHMENTS: usize = 32;

#[cfg(test)]
mod tests;
