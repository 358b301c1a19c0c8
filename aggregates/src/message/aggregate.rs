//! The Message aggregate's state, the rules its commands must pass, and its errors.

use std::collections::BTreeSet;

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    Attachment, ConversationFacts, MessageActor, MessageCommand, MessageEvent, NewAttachment,
    MAX_ATTACHMENTS, MAX_CONTENT_BYTES,
};
use crate::conversation::ParticipantRole;
use crate::{validate, Rejection, Sealed};

/// A message as rebuilt from its events. Every field is empty until it is posted.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    id: Option<Uuid>,
    conversation_id: Option<Uuid>,
    organization_id: Option<Uuid>,
    author_id: Option<Uuid>,
    thread_root_id: Option<Uuid>,
    /// Whether it was posted with attachments: its text may then be empty, when posted and
    /// when edited alike.
    #[serde(default)]
    has_attachments: bool,
    deleted: bool,
    reactions: BTreeSet<(Uuid, String)>,
    readers: BTreeSet<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("a message with this id already exists")]
    AlreadyExists,
    #[error("the message does not exist")]
    NotFound,
    /// The service layer looked up another conversation than the message's; a bug there,
    /// refused rather than decided on the wrong facts.
    #[error("the message belongs to another conversation")]
    WrongConversation,
    /// A service key acting for a user who is not a participant (user keys outside the
    /// conversation never get this far: the service layer answers 404).
    #[error("the acting user is not a participant of the conversation")]
    NotParticipant,
    /// A field broke an input rule; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// What must be sealed: `content`, `attachment file_name`.
    #[error("{0} must be sealed")]
    NotSealed(&'static str),
    #[error("content is {0} bytes; a message holds at most {MAX_CONTENT_BYTES} bytes")]
    TooLarge(usize),
    #[error("a message needs content or at least one attachment")]
    Empty,
    #[error(
        "content must not be empty on a message without attachments; delete the message instead"
    )]
    EmptyEdit,
    #[error("nothing to change: the edit leaves the message as it is")]
    NoChange,
    #[error("parent_message_id must be a message of the same conversation")]
    ParentElsewhere,
    #[error("a message cannot reply to itself")]
    OwnParent,
    #[error("a message describes at most {MAX_ATTACHMENTS} attachments")]
    TooManyAttachments,
    #[error("the conversation is archived; unarchive it first")]
    Archived,
    #[error("the message has been deleted")]
    Deleted,
    #[error("the message has already been deleted")]
    AlreadyDeleted,
    #[error("only the author may edit a message")]
    NotAuthor,
    #[error("only the author or a conversation owner or admin may delete a message")]
    MayNotDelete,
    #[error("the user has already reacted with this emoji")]
    AlreadyReacted,
    #[error("the user has not reacted with this emoji")]
    NotReacted,
    #[error("the user has already read this message")]
    AlreadyRead,
}

impl MessageError {
    pub fn rejection(&self) -> Rejection {
        match self {
            Self::WrongConversation
            | Self::NotParticipant
            | Self::Invalid(_)
            | Self::NotSealed(_)
            | Self::TooLarge(_)
            | Self::Empty
            | Self::EmptyEdit
            | Self::NoChange
            | Self::ParentElsewhere
            | Self::OwnParent
            | Self::TooManyAttachments => Rejection::Invalid,
            Self::NotFound => Rejection::NotFound,
            Self::AlreadyExists
            | Self::Archived
            | Self::Deleted
            | Self::AlreadyDeleted
            | Self::AlreadyReacted
            | Self::NotReacted
            | Self::AlreadyRead => Rejection::Conflict,
            Self::NotAuthor | Self::MayNotDelete => Rejection::Forbidden,
        }
    }
}

impl Message {
    pub fn id(&self) -> Option<Uuid> {
        self.id
    }

    pub fn conversation_id(&self) -> Option<Uuid> {
        self.conversation_id
    }

    pub fn organization_id(&self) -> Option<Uuid> {
        self.organization_id
    }

    pub fn author_id(&self) -> Option<Uuid> {
        self.author_id
    }

    /// The first message of this one's thread; `None` for a root.
    pub fn thread_root_id(&self) -> Option<Uuid> {
        self.thread_root_id
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted
    }

    /// Who reacted with what.
    pub fn reactions(&self) -> &BTreeSet<(Uuid, String)> {
        &self.reactions
    }

    pub fn readers(&self) -> &BTreeSet<Uuid> {
        &self.readers
    }

    /// Checks that the message exists and the facts describe its conversation, and returns
    /// the conversation's id and the acting user's role (`None`: not a participant).
    fn facts(
        &self,
        conversation: &ConversationFacts,
    ) -> Result<(Uuid, Option<ParticipantRole>), MessageError> {
        let own = self.conversation_id.ok_or(MessageError::NotFound)?;
        if conversation.conversation_id != own {
            return Err(MessageError::WrongConversation);
        }
        Ok((own, conversation.role))
    }

    fn not_deleted(&self) -> Result<(), MessageError> {
        if self.deleted {
            Err(MessageError::Deleted)
        } else {
            Ok(())
        }
    }

    /// Every command yields exactly one event or none, so the rules live in this plain
    /// function and `handle` only writes its answer.
    fn decide(&self, command: MessageCommand) -> Result<MessageEvent, MessageError> {
        match command {
            MessageCommand::Post {
                message_id,
                conversation,
                author_id,
                content,
                content_bytes,
                parent,
                attachments,
            } => {
                if self.id.is_some() {
                    return Err(MessageError::AlreadyExists);
                }
                participant(conversation.role)?;
                not_archived(&conversation)?;
                check_content(&content, content_bytes)?;
                if content_bytes == 0 && attachments.is_empty() {
                    return Err(MessageError::Empty);
                }
                let (parent_message_id, thread_root_id) = match parent {
                    None => (None, None),
                    Some(parent) => {
                        if parent.conversation_id != conversation.conversation_id {
                            return Err(MessageError::ParentElsewhere);
                        }
                        if parent.message_id == message_id {
                            return Err(MessageError::OwnParent);
                        }
                        // A reply to a reply stays in the root's thread: threads are flat.
                        let root = parent.thread_root_id.unwrap_or(parent.message_id);
                        (Some(parent.message_id), Some(root))
                    }
                };
                Ok(MessageEvent::MessagePosted {
                    message_id,
                    conversation_id: conversation.conversation_id,
                    organization_id: conversation.organization_id,
                    author_id,
                    content,
                    parent_message_id,
                    thread_root_id,
                    attachments: check_attachments(attachments)?,
                })
            }
            MessageCommand::Edit {
                conversation,
                editor_id,
                content,
                content_bytes,
                unchanged,
            } => {
                let (conversation_id, role) = self.facts(&conversation)?;
                self.not_deleted()?;
                if self.author_id != Some(editor_id) {
                    return Err(MessageError::NotAuthor);
                }
                participant(role)?;
                not_archived(&conversation)?;
                check_content(&content, content_bytes)?;
                // The rule of a post: text may be empty only beside attachments.
                if content_bytes == 0 && !self.has_attachments {
                    return Err(MessageError::EmptyEdit);
                }
                // An edit that changes nothing would put a meaningless entry in the ledger.
                if unchanged {
                    return Err(MessageError::NoChange);
                }
                Ok(MessageEvent::MessageEdited {
                    conversation_id,
                    content,
                })
            }
            MessageCommand::Delete {
                conversation,
                actor,
            } => {
                // Deleting only ever removes content, so archived conversations allow it.
                let (conversation_id, role) = self.facts(&conversation)?;
                if self.deleted {
                    return Err(MessageError::AlreadyDeleted);
                }
                let by = match actor {
                    MessageActor::Service => None,
                    MessageActor::User(user) => {
                        let role = participant(role)?;
                        if self.author_id != Some(user) && !role.moderates() {
                            return Err(MessageError::MayNotDelete);
                        }
                        Some(user)
                    }
                };
                Ok(MessageEvent::MessageDeleted {
                    conversation_id,
                    by,
                })
            }
            MessageCommand::React {
                conversation,
                user_id,
                emoji,
            } => {
                let (conversation_id, role) = self.facts(&conversation)?;
                self.not_deleted()?;
                participant(role)?;
                not_archived(&conversation)?;
                let emoji = invalid(validate::emoji(&emoji))?;
                if self.reactions.contains(&(user_id, emoji.clone())) {
                    return Err(MessageError::AlreadyReacted);
                }
                Ok(MessageEvent::ReactionAdded {
                    conversation_id,
                    user_id,
                    emoji,
                })
            }
            MessageCommand::Unreact {
                conversation,
                user_id,
                emoji,
            } => {
                let (conversation_id, role) = self.facts(&conversation)?;
                self.not_deleted()?;
                participant(role)?;
                not_archived(&conversation)?;
                // A reaction there is taken back as it is, unchecked: one given under an
                // older, looser emoji rule must not stay for good. One not there is checked,
                // so that a malformed one hears why.
                let emoji = emoji.trim().to_string();
                if !self.reactions.contains(&(user_id, emoji.clone())) {
                    invalid(validate::emoji(&emoji))?;
                    return Err(MessageError::NotReacted);
                }
                Ok(MessageEvent::ReactionRemoved {
                    conversation_id,
                    user_id,
                    emoji,
                })
            }
            MessageCommand::MarkRead {
                conversation,
                user_id,
            } => {
                // Reading changes nothing for others, so deleted messages and archived
                // conversations allow it.
                let (conversation_id, role) = self.facts(&conversation)?;
                participant(role)?;
                if self.readers.contains(&user_id) {
                    return Err(MessageError::AlreadyRead);
                }
                Ok(MessageEvent::MessageRead {
                    conversation_id,
                    user_id,
                })
            }
        }
    }
}

fn invalid<T>(result: Result<T, String>) -> Result<T, MessageError> {
    result.map_err(MessageError::Invalid)
}

fn participant(role: Option<ParticipantRole>) -> Result<ParticipantRole, MessageError> {
    role.ok_or(MessageError::NotParticipant)
}

fn not_archived(conversation: &ConversationFacts) -> Result<(), MessageError> {
    if conversation.archived {
        Err(MessageError::Archived)
    } else {
        Ok(())
    }
}

/// Clear text must never reach an event: once appended it could not be erased.
fn sealed(value: &Sealed, what: &'static str) -> Result<(), MessageError> {
    if value.is_well_formed() {
        Ok(())
    } else {
        Err(MessageError::NotSealed(what))
    }
}

fn check_content(content: &Sealed, content_bytes: usize) -> Result<(), MessageError> {
    sealed(content, "content")?;
    if content_bytes > MAX_CONTENT_BYTES {
        return Err(MessageError::TooLarge(content_bytes));
    }
    Ok(())
}

fn check_attachments(attachments: Vec<NewAttachment>) -> Result<Vec<Attachment>, MessageError> {
    if attachments.len() > MAX_ATTACHMENTS {
        return Err(MessageError::TooManyAttachments);
    }
    attachments
        .into_iter()
        .map(|a| {
            sealed(&a.file_name, "attachment file_name")?;
            if a.size_bytes < 0 {
                return Err(MessageError::Invalid(
                    "attachment size_bytes must not be negative".to_string(),
                ));
            }
            Ok(Attachment {
                file_name: a.file_name,
                mime_type: invalid(validate::mime_type(&a.mime_type))?,
                size_bytes: a.size_bytes,
                blake3: invalid(validate::hex_digest("attachment blake3", &a.blake3))?,
            })
        })
        .collect()
}

impl Aggregate for Message {
    const TYPE: &'static str = "Message";
    type Command = MessageCommand;
    type Event = MessageEvent;
    type Error = MessageError;
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
            MessageEvent::MessagePosted {
                message_id,
                conversation_id,
                organization_id,
                author_id,
                thread_root_id,
                attachments,
                ..
            } => {
                self.id = Some(message_id);
                self.has_attachments = !attachments.is_empty();
                self.conversation_id = Some(conversation_id);
                self.organization_id = Some(organization_id);
                self.author_id = Some(author_id);
                self.thread_root_id = thread_root_id;
            }
            MessageEvent::MessageEdited { .. } => {}
            // Reactions and read marks stay: who reacted and read is not the content.
            MessageEvent::MessageDeleted { .. } => self.deleted = true,
            MessageEvent::ReactionAdded { user_id, emoji, .. } => {
                self.reactions.insert((user_id, emoji));
            }
            MessageEvent::ReactionRemoved { user_id, emoji, .. } => {
                self.reactions.remove(&(user_id, emoji));
            }
            MessageEvent::MessageRead { user_id, .. } => {
                self.readers.insert(user_id);
            }
        }
    }
}
