//! The Conversation aggregate's state, the rules its commands must pass, and its errors.

use std::collections::{BTreeMap, BTreeSet};

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    ConversationActor, ConversationCommand, ConversationEvent, ConversationKind, ConversationSpec,
    Departure, Member, ParticipantRole,
};
use crate::{validate, Rejection};

/// One participant of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    pub role: ParticipantRole,
    /// Personal: only the participant itself mutes or unmutes.
    pub muted: bool,
}

/// A conversation as rebuilt from its events. Every field is empty until it is created.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    id: Option<Uuid>,
    organization_id: Option<Uuid>,
    kind: Option<ConversationKind>,
    spec: Option<ConversationSpec>,
    archived: bool,
    /// `None` once an erased owner left with no one able to take over (a service key
    /// gives the conversation a new one).
    owner: Option<Uuid>,
    participants: BTreeMap<Uuid, Participant>,
    /// When each participant joined, counted in joins (at creation: as listed, the owner
    /// first): whom ownership passes to when its owner withdraws. Bookkeeping, not a fact:
    /// left out of the state the history shows (the state is never stored).
    #[serde(skip)]
    joined: BTreeMap<Uuid, u64>,
    #[serde(skip)]
    joins: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversationError {
    #[error("a conversation with this id already exists")]
    AlreadyExists,
    #[error("the conversation does not exist")]
    NotFound,
    /// The acting user is not a participant. Worded exactly like [`Self::NotFound`] on
    /// purpose: a conversation is invisible to those outside it, so the answer must not
    /// reveal that it exists.
    #[error("the conversation does not exist")]
    NotVisible,
    /// A field broke an input rule; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("a {} conversation needs a title", .0.as_str())]
    TitleRequired(ConversationKind),
    #[error("user {0} is listed more than once among the participants")]
    DuplicateParticipant(Uuid),
    #[error(
        "a direct conversation has exactly two distinct participants: the owner and one member"
    )]
    DirectShape,
    #[error(
        "a conversation starts with at most {} participants, the owner included",
        Conversation::MAX_INITIAL_PARTICIPANTS
    )]
    TooManyParticipants,
    #[error("nothing to change: give a new title, a new description or both")]
    NothingGiven,
    #[error("nothing to change: the update leaves the conversation as it is")]
    NoChange,
    #[error("the conversation is archived; unarchive it first")]
    Archived,
    #[error("the conversation is already archived")]
    AlreadyArchived,
    #[error("the conversation is not archived")]
    NotArchived,
    #[error("only the conversation's owner or an admin may do this")]
    NotModerator,
    #[error("only the conversation's owner may change participants' roles")]
    NotOwner,
    #[error("a direct conversation keeps its two participants for life")]
    DirectParticipantsFixed,
    #[error("user {0} is already a participant")]
    AlreadyParticipant(Uuid),
    #[error("a participant cannot be added as owner; add it, then hand ownership over with a role change")]
    AddedAsOwner,
    #[error("user {0} is not a participant")]
    NotParticipant(Uuid),
    #[error("the owner cannot leave the conversation; hand ownership over first")]
    OwnerCannotLeave,
    #[error("the owner cannot be removed from the conversation")]
    OwnerCannotBeRemoved,
    #[error("only the conversation's owner may remove an admin")]
    AdminRemovesAdmin,
    #[error("only the conversation's owner may add a participant as admin")]
    AdminAddsAdmin,
    #[error("the participant already has the role {}", .0.as_str())]
    RoleUnchanged(ParticipantRole),
    #[error("the owner's role changes only by making another participant owner")]
    OwnerRoleChange,
    #[error("the participant has already muted the conversation")]
    AlreadyMuted,
    #[error("the participant has not muted the conversation")]
    NotMuted,
    #[error("user {0} does not own the conversation: there is no ownership to pass on")]
    NotOwnedBy(Uuid),
    #[error("no other participant who can act can take the conversation's ownership over")]
    NoSuccessor,
}

impl ConversationError {
    pub fn rejection(&self) -> Rejection {
        match self {
            Self::Invalid(_)
            | Self::TitleRequired(_)
            | Self::DuplicateParticipant(_)
            | Self::DirectShape
            | Self::TooManyParticipants
            | Self::NothingGiven
            | Self::NoChange
            | Self::AddedAsOwner
            // Like an unchanged role on the same PATCH: an update to the value it already
            // has, which the API answers 422 everywhere.
            | Self::RoleUnchanged(_)
            | Self::AlreadyMuted
            | Self::NotMuted => Rejection::Invalid,
            Self::NotFound | Self::NotVisible | Self::NotParticipant(_) => Rejection::NotFound,
            Self::AlreadyExists
            | Self::Archived
            | Self::AlreadyArchived
            | Self::NotArchived
            | Self::DirectParticipantsFixed
            | Self::AlreadyParticipant(_)
            | Self::OwnerCannotLeave
            | Self::OwnerCannotBeRemoved
            | Self::OwnerRoleChange
            | Self::NotOwnedBy(_)
            | Self::NoSuccessor => Rejection::Conflict,
            Self::NotModerator
            | Self::NotOwner
            | Self::AdminRemovesAdmin
            | Self::AdminAddsAdmin => Rejection::Forbidden,
        }
    }
}

/// What the actor may do in this conversation: a service key moderates like the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Authority {
    Service,
    Participant(Uuid, ParticipantRole),
}

impl Authority {
    fn is_owner(self) -> bool {
        matches!(
            self,
            Self::Service | Self::Participant(_, ParticipantRole::Owner)
        )
    }

    fn moderates(self) -> bool {
        match self {
            Self::Service => true,
            Self::Participant(_, role) => role.moderates(),
        }
    }

    fn user(self) -> Option<Uuid> {
        match self {
            Self::Service => None,
            Self::Participant(user, _) => Some(user),
        }
    }
}

impl Conversation {
    /// The most participants a conversation may start with, the owner included; more join
    /// one by one.
    pub const MAX_INITIAL_PARTICIPANTS: usize = 1000;

    pub fn id(&self) -> Option<Uuid> {
        self.id
    }

    pub fn organization_id(&self) -> Option<Uuid> {
        self.organization_id
    }

    pub fn kind(&self) -> Option<ConversationKind> {
        self.kind
    }

    pub fn spec(&self) -> Option<&ConversationSpec> {
        self.spec.as_ref()
    }

    pub fn is_archived(&self) -> bool {
        self.archived
    }

    pub fn owner(&self) -> Option<Uuid> {
        self.owner
    }

    pub fn participants(&self) -> &BTreeMap<Uuid, Participant> {
        &self.participants
    }

    /// The user's role; `None` when it is not a participant.
    pub fn role_of(&self, user: Uuid) -> Option<ParticipantRole> {
        self.participants.get(&user).map(|p| p.role)
    }

    /// The spec and kind of a conversation that exists.
    fn live(&self) -> Result<(&ConversationSpec, ConversationKind), ConversationError> {
        match (&self.spec, self.kind) {
            (Some(spec), Some(kind)) => Ok((spec, kind)),
            _ => Err(ConversationError::NotFound),
        }
    }

    /// What the actor may do; a user outside the conversation does not get to see it.
    fn authority(&self, actor: ConversationActor) -> Result<Authority, ConversationError> {
        match actor {
            ConversationActor::Service => Ok(Authority::Service),
            ConversationActor::User(user) => self
                .role_of(user)
                .map(|role| Authority::Participant(user, role))
                .ok_or(ConversationError::NotVisible),
        }
    }

    /// The authority of an actor that moderates.
    fn moderator(&self, actor: ConversationActor) -> Result<Authority, ConversationError> {
        let authority = self.authority(actor)?;
        if authority.moderates() {
            Ok(authority)
        } else {
            Err(ConversationError::NotModerator)
        }
    }

    fn participant(&self, user: Uuid) -> Result<&Participant, ConversationError> {
        self.participants
            .get(&user)
            .ok_or(ConversationError::NotParticipant(user))
    }

    /// Whom ownership passes to when `leaving` withdraws: the longest-standing admin among
    /// `able`, else the longest-standing member (an admin was trusted to moderate by the
    /// owner; a member over them would manage them). With the role they have now.
    fn successor(&self, leaving: Uuid, able: &BTreeSet<Uuid>) -> Option<(Uuid, ParticipantRole)> {
        self.participants
            .iter()
            .filter(|(user, _)| **user != leaving && able.contains(*user))
            .min_by_key(|(user, p)| (p.role != ParticipantRole::Admin, self.joined.get(*user)))
            .map(|(user, p)| (*user, p.role))
    }

    fn join(&mut self, user: Uuid, role: ParticipantRole) {
        self.participants
            .insert(user, Participant { role, muted: false });
        self.joined.insert(user, self.joins);
        self.joins += 1;
    }

    fn not_archived(&self) -> Result<(), ConversationError> {
        if self.archived {
            Err(ConversationError::Archived)
        } else {
            Ok(())
        }
    }

    /// The rules live in this plain function and `handle` only writes its answer. Every
    /// command yields one event, except an ownership transfer, which yields two, and a
    /// withdrawal (one or two).
    fn decide(
        &self,
        command: ConversationCommand,
    ) -> Result<Vec<ConversationEvent>, ConversationError> {
        let event = match command {
            ConversationCommand::Create {
                conversation_id,
                organization_id,
                kind,
                title,
                description,
                owner_id,
                members,
            } => {
                if self.id.is_some() {
                    return Err(ConversationError::AlreadyExists);
                }
                let title = title
                    .map(|t| invalid(validate::name("title", &t)))
                    .transpose()?;
                if title.is_none() && kind != ConversationKind::Direct {
                    return Err(ConversationError::TitleRequired(kind));
                }
                let description = check_description(description)?;
                let participants = initial_participants(kind, owner_id, members)?;
                ConversationEvent::ConversationCreated {
                    conversation_id,
                    organization_id,
                    kind,
                    spec: ConversationSpec { title, description },
                    created_by: owner_id,
                    participants,
                }
            }
            ConversationCommand::Update {
                title,
                description,
                actor,
            } => {
                let (before, kind) = self.live()?;
                self.moderator(actor)?;
                self.not_archived()?;
                if title.is_none() && description.is_none() {
                    return Err(ConversationError::NothingGiven);
                }
                let mut after = before.clone();
                if let Some(title) = title {
                    after.title = title
                        .map(|t| invalid(validate::name("title", &t)))
                        .transpose()?;
                    if after.title.is_none() && kind != ConversationKind::Direct {
                        return Err(ConversationError::TitleRequired(kind));
                    }
                }
                if let Some(description) = description {
                    after.description = check_description(description)?;
                }
                // An update that changes nothing would put a meaningless entry in the ledger.
                if after == *before {
                    return Err(ConversationError::NoChange);
                }
                ConversationEvent::ConversationUpdated {
                    before: before.clone(),
                    after,
                }
            }
            ConversationCommand::Archive { actor } => {
                self.live()?;
                self.moderator(actor)?;
                if self.archived {
                    return Err(ConversationError::AlreadyArchived);
                }
                ConversationEvent::ConversationArchived {}
            }
            ConversationCommand::Unarchive { actor } => {
                self.live()?;
                self.moderator(actor)?;
                if !self.archived {
                    return Err(ConversationError::NotArchived);
                }
                ConversationEvent::ConversationUnarchived {}
            }
            ConversationCommand::AddParticipant {
                user_id,
                role,
                actor,
            } => {
                let (_, kind) = self.live()?;
                let authority = self.moderator(actor)?;
                self.not_archived()?;
                if kind == ConversationKind::Direct {
                    return Err(ConversationError::DirectParticipantsFixed);
                }
                if role == ParticipantRole::Owner {
                    return Err(ConversationError::AddedAsOwner);
                }
                // Giving the admin role is the owner's (ChangeRole); adding someone as admin
                // gives it too, and would let an admin promote anyone by removing and
                // re-adding them.
                if role == ParticipantRole::Admin && !authority.is_owner() {
                    return Err(ConversationError::AdminAddsAdmin);
                }
                if self.participants.contains_key(&user_id) {
                    return Err(ConversationError::AlreadyParticipant(user_id));
                }
                ConversationEvent::ParticipantAdded { user_id, role }
            }
            ConversationCommand::RemoveParticipant { user_id, actor } => {
                let (_, kind) = self.live()?;
                // Removal and leaving only ever shrink access, so archived conversations
                // allow them.
                let authority = self.authority(actor)?;
                if authority.user() == Some(user_id) {
                    if kind == ConversationKind::Direct {
                        return Err(ConversationError::DirectParticipantsFixed);
                    }
                    if self.owner == Some(user_id) {
                        return Err(ConversationError::OwnerCannotLeave);
                    }
                } else {
                    if !authority.moderates() {
                        return Err(ConversationError::NotModerator);
                    }
                    if kind == ConversationKind::Direct {
                        return Err(ConversationError::DirectParticipantsFixed);
                    }
                    let target = self.participant(user_id)?;
                    if target.role == ParticipantRole::Owner {
                        return Err(ConversationError::OwnerCannotBeRemoved);
                    }
                    if target.role == ParticipantRole::Admin && !authority.is_owner() {
                        return Err(ConversationError::AdminRemovesAdmin);
                    }
                }
                ConversationEvent::ParticipantRemoved {
                    user_id,
                    by: authority.user(),
                }
            }
            ConversationCommand::ChangeRole {
                user_id,
                role,
                actor,
            } => {
                self.live()?;
                // Allowed while archived: an owner who wants to leave must be able to hand
                // ownership over first.
                if !self.authority(actor)?.is_owner() {
                    return Err(ConversationError::NotOwner);
                }
                let before = self.participant(user_id)?.role;
                if before == role {
                    return Err(ConversationError::RoleUnchanged(role));
                }
                if before == ParticipantRole::Owner {
                    return Err(ConversationError::OwnerRoleChange);
                }
                let changed = ConversationEvent::ParticipantRoleChanged {
                    user_id,
                    before,
                    after: role,
                };
                return match (role, self.owner) {
                    // A conversation has exactly one owner: the previous one steps down.
                    (ParticipantRole::Owner, Some(previous)) => Ok(vec![
                        changed,
                        ConversationEvent::ParticipantRoleChanged {
                            user_id: previous,
                            before: ParticipantRole::Owner,
                            after: ParticipantRole::Admin,
                        },
                    ]),
                    _ => Ok(vec![changed]),
                };
            }
            ConversationCommand::Withdraw {
                user_id,
                departure,
                able,
            } => {
                // Allowed while archived and in direct conversations: it follows from the
                // user's fate, which no conversation's state can refuse.
                self.live()?;
                let owns = self.participant(user_id)?.role == ParticipantRole::Owner;
                let successor = owns.then(|| self.successor(user_id, &able)).flatten();
                let promoted = |(user_id, before)| ConversationEvent::ParticipantRoleChanged {
                    user_id,
                    before,
                    after: ParticipantRole::Owner,
                };
                return match departure {
                    Departure::Deactivated => {
                        if !owns {
                            return Err(ConversationError::NotOwnedBy(user_id));
                        }
                        let successor = successor.ok_or(ConversationError::NoSuccessor)?;
                        Ok(vec![
                            promoted(successor),
                            ConversationEvent::ParticipantRoleChanged {
                                user_id,
                                before: ParticipantRole::Owner,
                                after: ParticipantRole::Admin,
                            },
                        ])
                    }
                    // Removed first: the owner's departure is what the new owner answers.
                    // With no one able to take over, the conversation is left without an
                    // owner, for a service key to give it one.
                    Departure::Erased { by } => Ok(std::iter::once(
                        ConversationEvent::ParticipantRemoved { user_id, by },
                    )
                    .chain(successor.map(promoted))
                    .collect()),
                };
            }
            ConversationCommand::Mute { user_id } => {
                self.live()?;
                if self.participant(user_id)?.muted {
                    return Err(ConversationError::AlreadyMuted);
                }
                ConversationEvent::ParticipantMuted { user_id }
            }
            ConversationCommand::Unmute { user_id } => {
                self.live()?;
                if !self.participant(user_id)?.muted {
                    return Err(ConversationError::NotMuted);
                }
                ConversationEvent::ParticipantUnmuted { user_id }
            }
        };
        Ok(vec![event])
    }
}

fn invalid<T>(result: Result<T, String>) -> Result<T, ConversationError> {
    result.map_err(ConversationError::Invalid)
}

/// A blank description is no description, so the events never carry empty strings.
fn check_description(value: Option<String>) -> Result<Option<String>, ConversationError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let value = invalid(validate::description(&value))?;
    Ok(Some(value).filter(|v| !v.is_empty()))
}

/// The owner first, then the members in the order given.
fn initial_participants(
    kind: ConversationKind,
    owner_id: Uuid,
    members: Vec<Uuid>,
) -> Result<Vec<Member>, ConversationError> {
    if members.len() >= Conversation::MAX_INITIAL_PARTICIPANTS {
        return Err(ConversationError::TooManyParticipants);
    }
    let mut seen = BTreeSet::from([owner_id]);
    if let Some(duplicate) = members.iter().find(|m| !seen.insert(**m)) {
        return Err(ConversationError::DuplicateParticipant(*duplicate));
    }
    if kind == ConversationKind::Direct && members.len() != 1 {
        return Err(ConversationError::DirectShape);
    }
    let owner = Member {
        user_id: owner_id,
        role: ParticipantRole::Owner,
    };
    let members = members.into_iter().map(|user_id| Member {
        user_id,
        role: ParticipantRole::Member,
    });
    Ok(std::iter::once(owner).chain(members).collect())
}

impl Aggregate for Conversation {
    const TYPE: &'static str = "Conversation";
    type Command = ConversationCommand;
    type Event = ConversationEvent;
    type Error = ConversationError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ConversationEvent::ConversationCreated {
                conversation_id,
                organization_id,
                kind,
                spec,
                created_by,
                participants,
            } => {
                self.id = Some(conversation_id);
                self.organization_id = Some(organization_id);
                self.kind = Some(kind);
                self.spec = Some(spec);
                self.owner = Some(created_by);
                for m in participants {
                    self.join(m.user_id, m.role);
                }
            }
            ConversationEvent::ConversationUpdated { after, .. } => self.spec = Some(after),
            ConversationEvent::ConversationArchived {} => self.archived = true,
            ConversationEvent::ConversationUnarchived {} => self.archived = false,
            ConversationEvent::ParticipantAdded { user_id, role } => {
                self.join(user_id, role);
            }
            ConversationEvent::ParticipantRemoved { user_id, .. } => {
                self.participants.remove(&user_id);
                self.joined.remove(&user_id);
                // Only an erased owner is ever removed (`Withdraw`).
                if self.owner == Some(user_id) {
                    self.owner = None;
                }
            }
            ConversationEvent::ParticipantRoleChanged { user_id, after, .. } => {
                if let Some(participant) = self.participants.get_mut(&user_id) {
                    participant.role = after;
                }
                if after == ParticipantRole::Owner {
                    self.owner = Some(user_id);
                }
            }
            ConversationEvent::ParticipantMuted { user_id } => self.set_muted(user_id, true),
            ConversationEvent::ParticipantUnmuted { user_id } => self.set_muted(user_id, false),
        }
    }
}

impl Conversation {
    fn set_muted(&mut self, user: Uuid, muted: bool) {
        if let Some(participant) = self.participants.get_mut(&user) {
            participant.muted = muted;
        }
    }
}
