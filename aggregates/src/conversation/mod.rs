//! The Conversation aggregate: a direct, group or channel conversation of one organization,
//! its title, archive state and participants. Messages are aggregates of their own (see
//! `message`), so this stream grows only with membership and settings changes, never with
//! traffic, and posting costs the same at the 10th message as at the 100,000th.

mod aggregate;
mod commands;
mod events;

pub use aggregate::{Conversation, ConversationError, Participant};
pub use commands::{ConversationActor, ConversationCommand, Departure};
pub use events::{ConversationEvent, ConversationKind, ConversationSpec, Member, ParticipantRole};

#[cfg(test)]
mod tests;
