//! Given/when/then tests of the Conversation aggregate: every command's success and every
//! rejection.

use cqrs_es::test::{AggregateTestExecutor, TestFramework};
use cqrs_es::Aggregate;
use uuid::Uuid;

use super::*;
use crate::Rejection;
use ConversationActor::Service;
use ConversationError as E;
use ConversationEvent as Ev;
use ParticipantRole::{Admin, Owner};

type Framework = TestFramework<Conversation>;

fn conversation_id() -> Uuid {
    Uuid::from_u128(100)
}

fn org_id() -> Uuid {
    Uuid::from_u128(1)
}

/// The owner of every conversation below.
fn owner() -> Uuid {
    Uuid::from_u128(10)
}

/// An admin of the group (a member promoted after creation).
fn admin() -> Uuid {
    Uuid::from_u128(11)
}

/// A plain member of the group, and the other participant of the direct conversation.
fn member() -> Uuid {
    Uuid::from_u128(12)
}

/// A member of the organization outside the conversation.
fn outsider() -> Uuid {
    Uuid::from_u128(13)
}

fn user(id: Uuid) -> ConversationActor {
    ConversationActor::User(id)
}

fn member_of(user_id: Uuid, role: ParticipantRole) -> Member {
    Member { user_id, role }
}

fn spec(title: Option<&str>, description: Option<&str>) -> ConversationSpec {
    ConversationSpec {
        title: title.map(Into::into),
        description: description.map(Into::into),
    }
}

fn create(kind: ConversationKind, title: Option<&str>, members: Vec<Uuid>) -> ConversationCommand {
    ConversationCommand::Create {
        conversation_id: conversation_id(),
        organization_id: org_id(),
        kind,
        title: title.map(Into::into),
        description: None,
        owner_id: owner(),
        members,
    }
}

fn created(kind: ConversationKind, spec: ConversationSpec, members: &[Uuid]) -> Ev {
    let mut participants = vec![member_of(owner(), Owner)];
    participants.extend(
        members
            .iter()
            .map(|m| member_of(*m, ParticipantRole::Member)),
    );
    Ev::ConversationCreated {
        conversation_id: conversation_id(),
        organization_id: org_id(),
        kind,
        spec,
        created_by: owner(),
        participants,
    }
}

fn role_changed(user_id: Uuid, before: ParticipantRole, after: ParticipantRole) -> Ev {
    Ev::ParticipantRoleChanged {
        user_id,
        before,
        after,
    }
}

/// A group of owner, admin and member, titled "Team".
fn group() -> Vec<Ev> {
    vec![
        created(
            ConversationKind::Group,
            spec(Some("Team"), None),
            &[admin(), member()],
        ),
        role_changed(admin(), ParticipantRole::Member, Admin),
    ]
}

fn archived_group() -> Vec<Ev> {
    let mut events = group();
    events.push(Ev::ConversationArchived {});
    events
}

/// A direct conversation between owner and member.
fn direct() -> Vec<Ev> {
    vec![created(
        ConversationKind::Direct,
        spec(None, None),
        &[member()],
    )]
}

fn given(events: Vec<Ev>) -> AggregateTestExecutor<Conversation> {
    Framework::with(()).given(events)
}

fn update(
    title: Option<Option<&str>>,
    description: Option<Option<&str>>,
    actor: ConversationActor,
) -> ConversationCommand {
    ConversationCommand::Update {
        title: title.map(|t| t.map(Into::into)),
        description: description.map(|d| d.map(Into::into)),
        actor,
    }
}

fn add(user_id: Uuid, role: ParticipantRole, actor: ConversationActor) -> ConversationCommand {
    ConversationCommand::AddParticipant {
        user_id,
        role,
        actor,
    }
}

fn remove(user_id: Uuid, actor: ConversationActor) -> ConversationCommand {
    ConversationCommand::RemoveParticipant { user_id, actor }
}

fn removed(user_id: Uuid, by: Option<Uuid>) -> Ev {
    Ev::ParticipantRemoved { user_id, by }
}

fn change_role(
    user_id: Uuid,
    role: ParticipantRole,
    actor: ConversationActor,
) -> ConversationCommand {
    ConversationCommand::ChangeRole {
        user_id,
        role,
        actor,
    }
}

// --- Create ---

#[test]
fn create_lists_the_owner_first_then_the_members_in_order() {
    Framework::with(())
        .given_no_previous_events()
        .when(ConversationCommand::Create {
            conversation_id: conversation_id(),
            organization_id: org_id(),
            kind: ConversationKind::Group,
            title: Some("  Team ".into()),
            description: Some(" Where we plan ".into()),
            owner_id: owner(),
            members: vec![member(), admin()],
        })
        .then_expect_events(vec![created(
            ConversationKind::Group,
            spec(Some("Team"), Some("Where we plan")),
            &[member(), admin()],
        )]);
}

#[test]
fn create_channel_with_a_title() {
    given(vec![])
        .when(create(ConversationKind::Channel, Some("News"), vec![]))
        .then_expect_events(vec![created(
            ConversationKind::Channel,
            spec(Some("News"), None),
            &[],
        )]);
}

#[test]
fn create_direct_needs_no_title() {
    given(vec![])
        .when(create(ConversationKind::Direct, None, vec![member()]))
        .then_expect_events(direct());
}

#[test]
fn create_direct_may_have_a_title() {
    given(vec![])
        .when(create(ConversationKind::Direct, Some("Us"), vec![member()]))
        .then_expect_events(vec![created(
            ConversationKind::Direct,
            spec(Some("Us"), None),
            &[member()],
        )]);
}

#[test]
fn create_stores_a_blank_description_as_none() {
    given(vec![])
        .when(ConversationCommand::Create {
            conversation_id: conversation_id(),
            organization_id: org_id(),
            kind: ConversationKind::Direct,
            title: None,
            description: Some("   ".into()),
            owner_id: owner(),
            members: vec![member()],
        })
        .then_expect_events(direct());
}

#[test]
fn create_rejects_an_existing_conversation() {
    given(group())
        .when(create(ConversationKind::Group, Some("Team"), vec![]))
        .then_expect_error(E::AlreadyExists);
}

#[test]
fn create_group_and_channel_need_a_title() {
    given(vec![])
        .when(create(ConversationKind::Group, None, vec![member()]))
        .then_expect_error_message("a group conversation needs a title");
    given(vec![])
        .when(create(ConversationKind::Channel, None, vec![]))
        .then_expect_error(E::TitleRequired(ConversationKind::Channel));
}

#[test]
fn create_rejects_a_blank_or_long_title() {
    given(vec![])
        .when(create(ConversationKind::Group, Some("   "), vec![]))
        .then_expect_error_message("title must not be empty");
    given(vec![])
        .when(create(
            ConversationKind::Direct,
            Some(&"x".repeat(201)),
            vec![member()],
        ))
        .then_expect_error_message("title must be at most 200 characters");
}

#[test]
fn create_rejects_a_long_description() {
    given(vec![])
        .when(ConversationCommand::Create {
            conversation_id: conversation_id(),
            organization_id: org_id(),
            kind: ConversationKind::Group,
            title: Some("Team".into()),
            description: Some("x".repeat(2001)),
            owner_id: owner(),
            members: vec![],
        })
        .then_expect_error_message("description must be at most 2000 characters");
}

#[test]
fn create_rejects_the_owner_among_the_members() {
    given(vec![])
        .when(create(
            ConversationKind::Group,
            Some("Team"),
            vec![member(), owner()],
        ))
        .then_expect_error(E::DuplicateParticipant(owner()));
}

#[test]
fn create_rejects_a_repeated_member() {
    given(vec![])
        .when(create(
            ConversationKind::Group,
            Some("Team"),
            vec![member(), admin(), member()],
        ))
        .then_expect_error(E::DuplicateParticipant(member()));
}

#[test]
fn create_direct_needs_exactly_one_member_besides_the_owner() {
    for members in [vec![], vec![member(), admin()]] {
        given(vec![])
            .when(create(ConversationKind::Direct, None, members))
            .then_expect_error(E::DirectShape);
    }
    given(vec![])
        .when(create(ConversationKind::Direct, None, vec![owner()]))
        .then_expect_error(E::DuplicateParticipant(owner()));
}

#[test]
fn create_takes_at_most_a_thousand_participants() {
    let members: Vec<Uuid> = (1000..1999).map(Uuid::from_u128).collect();
    assert_eq!(members.len() + 1, Conversation::MAX_INITIAL_PARTICIPANTS);
    given(vec![])
        .when(create(
            ConversationKind::Channel,
            Some("All"),
            members.clone(),
        ))
        .then_expect_events(vec![created(
            ConversationKind::Channel,
            spec(Some("All"), None),
            &members,
        )]);

    let mut members = members;
    members.push(Uuid::from_u128(1999));
    given(vec![])
        .when(create(ConversationKind::Channel, Some("All"), members))
        .then_expect_error_message(
            "a conversation starts with at most 1000 participants, the owner included",
        );
}

// --- Update ---

#[test]
fn update_title_carries_the_spec_before_and_after() {
    given(group())
        .when(update(Some(Some(" Crew ")), None, user(admin())))
        .then_expect_events(vec![Ev::ConversationUpdated {
            before: spec(Some("Team"), None),
            after: spec(Some("Crew"), None),
        }]);
}

#[test]
fn update_description_by_a_service_key() {
    given(group())
        .when(update(None, Some(Some("Plans")), Service))
        .then_expect_events(vec![Ev::ConversationUpdated {
            before: spec(Some("Team"), None),
            after: spec(Some("Team"), Some("Plans")),
        }]);
}

#[test]
fn update_clears_the_description() {
    let mut events = group();
    events.push(Ev::ConversationUpdated {
        before: spec(Some("Team"), None),
        after: spec(Some("Team"), Some("Plans")),
    });
    given(events)
        .when(update(None, Some(None), user(owner())))
        .then_expect_events(vec![Ev::ConversationUpdated {
            before: spec(Some("Team"), Some("Plans")),
            after: spec(Some("Team"), None),
        }]);
}

#[test]
fn update_may_clear_a_direct_conversations_title() {
    given(vec![created(
        ConversationKind::Direct,
        spec(Some("Us"), None),
        &[member()],
    )])
    .when(update(Some(None), None, user(owner())))
    .then_expect_events(vec![Ev::ConversationUpdated {
        before: spec(Some("Us"), None),
        after: spec(None, None),
    }]);
}

#[test]
fn update_rejects_a_missing_conversation() {
    given(vec![])
        .when(update(Some(Some("Crew")), None, Service))
        .then_expect_error(E::NotFound);
}

#[test]
fn update_hides_the_conversation_from_outsiders() {
    given(group())
        .when(update(Some(Some("Crew")), None, user(outsider())))
        .then_expect_error_message("the conversation does not exist");
    given(group())
        .when(update(Some(Some("Crew")), None, user(outsider())))
        .then_expect_error(E::NotVisible);
}

#[test]
fn update_rejects_an_archived_conversation() {
    given(archived_group())
        .when(update(Some(Some("Crew")), None, user(owner())))
        .then_expect_error_message("the conversation is archived; unarchive it first");
}

#[test]
fn update_is_for_moderators_only() {
    given(group())
        .when(update(Some(Some("Crew")), None, user(member())))
        .then_expect_error(E::NotModerator);
}

#[test]
fn update_cannot_clear_a_groups_title() {
    given(group())
        .when(update(Some(None), None, user(owner())))
        .then_expect_error(E::TitleRequired(ConversationKind::Group));
}

#[test]
fn update_rejects_an_invalid_title() {
    given(group())
        .when(update(Some(Some(" ")), None, user(owner())))
        .then_expect_error_message("title must not be empty");
}

#[test]
fn update_rejects_a_change_to_the_same_spec() {
    given(group())
        .when(update(Some(Some(" Team")), Some(None), user(owner())))
        .then_expect_error(E::NoChange);
}

#[test]
fn update_needs_a_field() {
    given(group())
        .when(update(None, None, user(owner())))
        .then_expect_error(E::NothingGiven);
}

// --- Archive / Unarchive ---

#[test]
fn archive_by_an_admin() {
    given(group())
        .when(ConversationCommand::Archive {
            actor: user(admin()),
        })
        .then_expect_events(vec![Ev::ConversationArchived {}]);
}

#[test]
fn archive_rejects_a_missing_conversation() {
    given(vec![])
        .when(ConversationCommand::Archive { actor: Service })
        .then_expect_error(E::NotFound);
}

#[test]
fn archive_rejects_an_archived_conversation() {
    given(archived_group())
        .when(ConversationCommand::Archive { actor: Service })
        .then_expect_error(E::AlreadyArchived);
}

#[test]
fn archive_is_for_moderators_only() {
    given(group())
        .when(ConversationCommand::Archive {
            actor: user(member()),
        })
        .then_expect_error(E::NotModerator);
    given(group())
        .when(ConversationCommand::Archive {
            actor: user(outsider()),
        })
        .then_expect_error(E::NotVisible);
}

#[test]
fn unarchive_by_a_service_key() {
    given(archived_group())
        .when(ConversationCommand::Unarchive { actor: Service })
        .then_expect_events(vec![Ev::ConversationUnarchived {}]);
}

#[test]
fn unarchive_rejects_a_conversation_that_is_not_archived() {
    given(group())
        .when(ConversationCommand::Unarchive {
            actor: user(owner()),
        })
        .then_expect_error(E::NotArchived);
}

#[test]
fn unarchive_is_for_moderators_only() {
    given(archived_group())
        .when(ConversationCommand::Unarchive {
            actor: user(member()),
        })
        .then_expect_error(E::NotModerator);
}

#[test]
fn unarchive_rejects_a_missing_conversation() {
    given(vec![])
        .when(ConversationCommand::Unarchive { actor: Service })
        .then_expect_error(E::NotFound);
}

// --- AddParticipant ---

#[test]
fn add_participant_by_an_admin() {
    given(group())
        .when(add(outsider(), ParticipantRole::Member, user(admin())))
        .then_expect_events(vec![Ev::ParticipantAdded {
            user_id: outsider(),
            role: ParticipantRole::Member,
        }]);
}

#[test]
fn add_participant_as_admin_by_a_service_key() {
    given(group())
        .when(add(outsider(), Admin, Service))
        .then_expect_events(vec![Ev::ParticipantAdded {
            user_id: outsider(),
            role: Admin,
        }]);
}

#[test]
fn add_participant_as_admin_by_the_owner() {
    given(group())
        .when(add(outsider(), Admin, user(owner())))
        .then_expect_events(vec![Ev::ParticipantAdded {
            user_id: outsider(),
            role: Admin,
        }]);
}

#[test]
fn add_participant_as_admin_is_the_owners_right() {
    given(group())
        .when(add(outsider(), Admin, user(admin())))
        .then_expect_error(E::AdminAddsAdmin);
}

#[test]
fn add_participant_is_for_moderators_only() {
    given(group())
        .when(add(outsider(), ParticipantRole::Member, user(member())))
        .then_expect_error(E::NotModerator);
}

#[test]
fn add_participant_rejects_a_missing_conversation() {
    given(vec![])
        .when(add(outsider(), ParticipantRole::Member, Service))
        .then_expect_error(E::NotFound);
}

#[test]
fn add_participant_rejects_an_archived_conversation() {
    given(archived_group())
        .when(add(outsider(), ParticipantRole::Member, user(owner())))
        .then_expect_error(E::Archived);
}

#[test]
fn add_participant_keeps_a_direct_conversation_at_two() {
    given(direct())
        .when(add(outsider(), ParticipantRole::Member, user(owner())))
        .then_expect_error_message("a direct conversation keeps its two participants for life");
}

#[test]
fn add_participant_rejects_a_participant() {
    given(group())
        .when(add(member(), ParticipantRole::Member, user(owner())))
        .then_expect_error(E::AlreadyParticipant(member()));
}

#[test]
fn add_participant_refuses_a_second_owner() {
    given(group())
        .when(add(outsider(), Owner, user(owner())))
        .then_expect_error(E::AddedAsOwner);
}

// --- RemoveParticipant ---

#[test]
fn a_member_leaves() {
    given(group())
        .when(remove(member(), user(member())))
        .then_expect_events(vec![removed(member(), Some(member()))]);
}

#[test]
fn an_admin_leaves_an_archived_conversation() {
    given(archived_group())
        .when(remove(admin(), user(admin())))
        .then_expect_events(vec![removed(admin(), Some(admin()))]);
}

#[test]
fn the_owner_cannot_leave() {
    given(group())
        .when(remove(owner(), user(owner())))
        .then_expect_error_message(
            "the owner cannot leave the conversation; hand ownership over first",
        );
}

#[test]
fn the_former_owner_leaves_after_handing_ownership_over() {
    let mut events = group();
    events.push(role_changed(admin(), Admin, Owner));
    events.push(role_changed(owner(), Owner, Admin));
    given(events)
        .when(remove(owner(), user(owner())))
        .then_expect_events(vec![removed(owner(), Some(owner()))]);
}

#[test]
fn nobody_leaves_or_is_removed_from_a_direct_conversation() {
    for (target, actor) in [
        (member(), user(member())),
        (owner(), user(owner())),
        (member(), user(owner())),
        (member(), Service),
    ] {
        given(direct())
            .when(remove(target, actor))
            .then_expect_error(E::DirectParticipantsFixed);
    }
}

#[test]
fn the_owner_removes_an_admin() {
    given(group())
        .when(remove(admin(), user(owner())))
        .then_expect_events(vec![removed(admin(), Some(owner()))]);
}

#[test]
fn a_service_key_removes_an_admin() {
    given(group())
        .when(remove(admin(), Service))
        .then_expect_events(vec![removed(admin(), None)]);
}

#[test]
fn an_admin_removes_a_member_of_an_archived_conversation() {
    given(archived_group())
        .when(remove(member(), user(admin())))
        .then_expect_events(vec![removed(member(), Some(admin()))]);
}

#[test]
fn an_admin_cannot_remove_another_admin() {
    let mut events = group();
    events.push(Ev::ParticipantAdded {
        user_id: outsider(),
        role: Admin,
    });
    given(events)
        .when(remove(outsider(), user(admin())))
        .then_expect_error(E::AdminRemovesAdmin);
}

#[test]
fn a_member_removes_nobody() {
    given(group())
        .when(remove(admin(), user(member())))
        .then_expect_error(E::NotModerator);
}

#[test]
fn the_owner_cannot_be_removed() {
    for actor in [Service, user(admin())] {
        given(group())
            .when(remove(owner(), actor))
            .then_expect_error(E::OwnerCannotBeRemoved);
    }
}

#[test]
fn remove_rejects_a_non_participant() {
    given(group())
        .when(remove(outsider(), user(owner())))
        .then_expect_error(E::NotParticipant(outsider()));
}

#[test]
fn remove_hides_the_conversation_from_outsiders() {
    given(group())
        .when(remove(outsider(), user(outsider())))
        .then_expect_error(E::NotVisible);
}

#[test]
fn remove_rejects_a_missing_conversation() {
    given(vec![])
        .when(remove(member(), Service))
        .then_expect_error(E::NotFound);
}

// --- ChangeRole ---

#[test]
fn the_owner_promotes_a_member() {
    given(group())
        .when(change_role(member(), Admin, user(owner())))
        .then_expect_events(vec![role_changed(member(), ParticipantRole::Member, Admin)]);
}

#[test]
fn a_service_key_demotes_an_admin() {
    given(group())
        .when(change_role(admin(), ParticipantRole::Member, Service))
        .then_expect_events(vec![role_changed(admin(), Admin, ParticipantRole::Member)]);
}

#[test]
fn making_someone_owner_hands_ownership_over() {
    given(group())
        .when(change_role(member(), Owner, user(owner())))
        .then_expect_events(vec![
            role_changed(member(), ParticipantRole::Member, Owner),
            role_changed(owner(), Owner, Admin),
        ]);
}

#[test]
fn a_service_key_hands_ownership_over_in_an_archived_conversation() {
    given(archived_group())
        .when(change_role(admin(), Owner, Service))
        .then_expect_events(vec![
            role_changed(admin(), Admin, Owner),
            role_changed(owner(), Owner, Admin),
        ]);
}

#[test]
fn the_new_owner_changes_roles_and_the_old_one_no_longer_does() {
    let mut events = group();
    events.push(role_changed(member(), ParticipantRole::Member, Owner));
    events.push(role_changed(owner(), Owner, Admin));
    given(events.clone())
        .when(change_role(
            admin(),
            ParticipantRole::Member,
            user(member()),
        ))
        .then_expect_events(vec![role_changed(admin(), Admin, ParticipantRole::Member)]);
    given(events)
        .when(change_role(admin(), ParticipantRole::Member, user(owner())))
        .then_expect_error(E::NotOwner);
}

#[test]
fn admins_and_members_do_not_change_roles() {
    for actor in [user(admin()), user(member())] {
        given(group())
            .when(change_role(member(), Admin, actor))
            .then_expect_error_message(
                "only the conversation's owner may change participants' roles",
            );
    }
}

#[test]
fn change_role_rejects_a_non_participant() {
    given(group())
        .when(change_role(outsider(), Admin, user(owner())))
        .then_expect_error(E::NotParticipant(outsider()));
}

#[test]
fn change_role_rejects_the_same_role() {
    given(group())
        .when(change_role(admin(), Admin, Service))
        .then_expect_error(E::RoleUnchanged(Admin));
}

#[test]
fn the_owners_role_changes_only_by_a_transfer() {
    given(group())
        .when(change_role(owner(), Admin, Service))
        .then_expect_error(E::OwnerRoleChange);
}

#[test]
fn change_role_hides_the_conversation_from_outsiders() {
    given(group())
        .when(change_role(member(), Admin, user(outsider())))
        .then_expect_error(E::NotVisible);
}

#[test]
fn change_role_rejects_a_missing_conversation() {
    given(vec![])
        .when(change_role(member(), Admin, Service))
        .then_expect_error(E::NotFound);
}

// --- Mute / Unmute ---

fn mute(user_id: Uuid) -> ConversationCommand {
    ConversationCommand::Mute { user_id }
}

fn unmute(user_id: Uuid) -> ConversationCommand {
    ConversationCommand::Unmute { user_id }
}

fn muted_group() -> Vec<Ev> {
    let mut events = group();
    events.push(Ev::ParticipantMuted { user_id: member() });
    events
}

#[test]
fn a_participant_mutes_an_archived_conversation() {
    given(archived_group())
        .when(mute(member()))
        .then_expect_events(vec![Ev::ParticipantMuted { user_id: member() }]);
}

#[test]
fn mute_rejects_a_muted_participant() {
    given(muted_group())
        .when(mute(member()))
        .then_expect_error(E::AlreadyMuted);
}

#[test]
fn mute_rejects_a_non_participant() {
    given(group())
        .when(mute(outsider()))
        .then_expect_error(E::NotParticipant(outsider()));
}

#[test]
fn mute_rejects_a_missing_conversation() {
    given(vec![])
        .when(mute(member()))
        .then_expect_error(E::NotFound);
}

#[test]
fn a_participant_unmutes() {
    given(muted_group())
        .when(unmute(member()))
        .then_expect_events(vec![Ev::ParticipantUnmuted { user_id: member() }]);
}

#[test]
fn unmute_rejects_a_participant_that_has_not_muted() {
    given(muted_group())
        .when(unmute(admin()))
        .then_expect_error(E::NotMuted);
}

#[test]
fn unmute_rejects_a_non_participant() {
    given(muted_group())
        .when(unmute(outsider()))
        .then_expect_error(E::NotParticipant(outsider()));
}

// --- Withdraw ---

/// Another member, who joins the group after the others.
fn latecomer() -> Uuid {
    Uuid::from_u128(14)
}

fn withdraw(user_id: Uuid, departure: Departure, able: &[Uuid]) -> ConversationCommand {
    ConversationCommand::Withdraw {
        user_id,
        departure,
        able: able.iter().copied().collect(),
    }
}

fn erased_by(by: Option<Uuid>) -> Departure {
    Departure::Erased { by }
}

#[test]
fn an_erased_member_leaves() {
    given(group())
        .when(withdraw(
            member(),
            erased_by(Some(owner())),
            &[owner(), admin()],
        ))
        .then_expect_events(vec![removed(member(), Some(owner()))]);
}

#[test]
fn an_erased_owner_leaves_and_the_longest_standing_able_admin_owns_it() {
    // The member joined before either admin.
    let events = vec![
        created(
            ConversationKind::Group,
            spec(Some("Team"), None),
            &[member(), admin()],
        ),
        role_changed(admin(), ParticipantRole::Member, Admin),
        Ev::ParticipantAdded {
            user_id: latecomer(),
            role: Admin,
        },
    ];
    given(events)
        .when(withdraw(
            owner(),
            erased_by(None),
            &[member(), latecomer(), admin()],
        ))
        .then_expect_events(vec![
            removed(owner(), None),
            role_changed(admin(), Admin, Owner),
        ]);
}

#[test]
fn with_no_able_admin_the_longest_standing_able_member_owns_it() {
    let mut events = group();
    events.push(Ev::ParticipantAdded {
        user_id: latecomer(),
        role: ParticipantRole::Member,
    });
    // The admin cannot act (deactivated): not among the able.
    given(events)
        .when(withdraw(
            owner(),
            erased_by(None),
            &[latecomer(), member(), owner()],
        ))
        .then_expect_events(vec![
            removed(owner(), None),
            role_changed(member(), ParticipantRole::Member, Owner),
        ]);
}

#[test]
fn one_who_left_and_came_back_stands_from_their_return() {
    let mut events = vec![created(
        ConversationKind::Group,
        spec(Some("Team"), None),
        &[member(), latecomer()],
    )];
    events.push(removed(member(), Some(owner())));
    events.push(Ev::ParticipantAdded {
        user_id: member(),
        role: ParticipantRole::Member,
    });
    given(events)
        .when(withdraw(owner(), erased_by(None), &[member(), latecomer()]))
        .then_expect_events(vec![
            removed(owner(), None),
            role_changed(latecomer(), ParticipantRole::Member, Owner),
        ]);
}

#[test]
fn an_erased_owner_with_no_one_able_leaves_it_without_an_owner() {
    given(group())
        .when(withdraw(owner(), erased_by(Some(owner())), &[outsider()]))
        .then_expect_events(vec![removed(owner(), Some(owner()))]);
}

#[test]
fn a_service_key_gives_an_ownerless_conversation_an_owner() {
    let mut events = group();
    events.push(removed(owner(), None));
    given(events)
        .when(change_role(member(), Owner, Service))
        .then_expect_events(vec![role_changed(member(), ParticipantRole::Member, Owner)]);
}

#[test]
fn an_erased_owner_leaves_a_direct_conversation_to_the_other() {
    given(direct())
        .when(withdraw(owner(), erased_by(None), &[member()]))
        .then_expect_events(vec![
            removed(owner(), None),
            role_changed(member(), ParticipantRole::Member, Owner),
        ]);
}

#[test]
fn an_erased_participant_leaves_an_archived_conversation() {
    given(archived_group())
        .when(withdraw(admin(), erased_by(None), &[]))
        .then_expect_events(vec![removed(admin(), None)]);
}

#[test]
fn withdraw_rejects_a_non_participant() {
    given(group())
        .when(withdraw(outsider(), erased_by(None), &[owner()]))
        .then_expect_error(E::NotParticipant(outsider()));
}

#[test]
fn withdraw_rejects_a_conversation_that_does_not_exist() {
    given(vec![])
        .when(withdraw(owner(), erased_by(None), &[]))
        .then_expect_error(E::NotFound);
}

#[test]
fn a_deactivated_owner_stays_as_an_admin_and_hands_ownership_on() {
    given(archived_group())
        .when(withdraw(
            owner(),
            Departure::Deactivated,
            &[member(), admin()],
        ))
        .then_expect_events(vec![
            role_changed(admin(), Admin, Owner),
            role_changed(owner(), Owner, Admin),
        ]);
}

#[test]
fn a_deactivated_participant_who_does_not_own_it_has_nothing_to_hand_on() {
    given(group())
        .when(withdraw(admin(), Departure::Deactivated, &[member()]))
        .then_expect_error(E::NotOwnedBy(admin()));
}

#[test]
fn a_deactivated_owner_with_no_one_able_stays_owner() {
    given(group())
        .when(withdraw(
            owner(),
            Departure::Deactivated,
            &[owner(), outsider()],
        ))
        .then_expect_error(E::NoSuccessor);
}

#[test]
fn apply_follows_an_erased_owners_departure() {
    let mut c = Conversation::default();
    for event in group() {
        c.apply(event);
    }
    c.apply(removed(owner(), None));
    assert_eq!(c.owner(), None);
    assert_eq!(c.role_of(owner()), None);
    c.apply(role_changed(member(), ParticipantRole::Member, Owner));
    assert_eq!(c.owner(), Some(member()));
}

// --- apply ---

#[test]
fn apply_keeps_the_state_in_step_with_the_events() {
    let mut c = Conversation::default();
    assert_eq!(c.id(), None);
    assert!(c.participants().is_empty());
    for event in group() {
        c.apply(event);
    }
    assert_eq!(c.id(), Some(conversation_id()));
    assert_eq!(c.organization_id(), Some(org_id()));
    assert_eq!(c.kind(), Some(ConversationKind::Group));
    assert_eq!(c.spec(), Some(&spec(Some("Team"), None)));
    assert_eq!(c.owner(), Some(owner()));
    assert_eq!(c.role_of(owner()), Some(Owner));
    assert_eq!(c.role_of(admin()), Some(Admin));
    assert_eq!(c.role_of(member()), Some(ParticipantRole::Member));
    assert_eq!(c.role_of(outsider()), None);

    c.apply(Ev::ConversationUpdated {
        before: spec(Some("Team"), None),
        after: spec(Some("Crew"), Some("Plans")),
    });
    assert_eq!(c.spec(), Some(&spec(Some("Crew"), Some("Plans"))));

    c.apply(Ev::ConversationArchived {});
    assert!(c.is_archived());
    c.apply(Ev::ConversationUnarchived {});
    assert!(!c.is_archived());

    c.apply(Ev::ParticipantAdded {
        user_id: outsider(),
        role: Admin,
    });
    assert_eq!(
        c.participants()[&outsider()],
        Participant {
            role: Admin,
            muted: false
        }
    );
    c.apply(Ev::ParticipantMuted {
        user_id: outsider(),
    });
    assert!(c.participants()[&outsider()].muted);
    c.apply(Ev::ParticipantUnmuted {
        user_id: outsider(),
    });
    assert!(!c.participants()[&outsider()].muted);
    c.apply(removed(outsider(), None));
    assert_eq!(c.role_of(outsider()), None);

    c.apply(role_changed(member(), ParticipantRole::Member, Owner));
    c.apply(role_changed(owner(), Owner, Admin));
    assert_eq!(c.owner(), Some(member()));
    assert_eq!(c.role_of(owner()), Some(Admin));
    assert_eq!(c.participants().len(), 3);
    assert_eq!(
        c.participants()
            .values()
            .filter(|p| p.role == Owner)
            .count(),
        1
    );
}

#[test]
fn errors_map_to_rejections() {
    let someone = outsider();
    for e in [
        E::Invalid("x".into()),
        E::TitleRequired(ConversationKind::Group),
        E::DuplicateParticipant(someone),
        E::DirectShape,
        E::TooManyParticipants,
        E::NothingGiven,
        E::NoChange,
        E::AddedAsOwner,
        E::RoleUnchanged(Admin),
        E::AlreadyMuted,
        E::NotMuted,
    ] {
        assert_eq!(e.rejection(), Rejection::Invalid, "{e}");
    }
    for e in [E::NotFound, E::NotVisible, E::NotParticipant(someone)] {
        assert_eq!(e.rejection(), Rejection::NotFound, "{e}");
    }
    for e in [
        E::AlreadyExists,
        E::Archived,
        E::AlreadyArchived,
        E::NotArchived,
        E::DirectParticipantsFixed,
        E::AlreadyParticipant(someone),
        E::OwnerCannotLeave,
        E::OwnerCannotBeRemoved,
        E::OwnerRoleChange,
        E::NotOwnedBy(someone),
        E::NoSuccessor,
    ] {
        assert_eq!(e.rejection(), Rejection::Conflict, "{e}");
    }
    for e in [E::NotModerator, E::NotOwner, E::AdminRemovesAdmin] {
        assert_eq!(e.rejection(), Rejection::Forbidden, "{e}");
    }
    assert_eq!(E::NotVisible.to_string(), E::NotFound.to_string());
}
