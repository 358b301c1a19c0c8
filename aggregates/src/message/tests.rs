//! Given/when/then tests of the Message aggregate: every command's success and every
//! rejection.

use cqrs_es::test::{AggregateTestExecutor, TestFramework};
use cqrs_es::Aggregate;
use uuid::Uuid;

use super::*;
use crate::conversation::ParticipantRole::{self, Admin, Member, Owner};
use crate::{Rejection, Sealed};
use MessageError as E;
use MessageEvent as Ev;

type Framework = TestFramework<Message>;

fn message_id() -> Uuid {
    Uuid::from_u128(200)
}

fn conversation_id() -> Uuid {
    Uuid::from_u128(100)
}

fn org_id() -> Uuid {
    Uuid::from_u128(1)
}

fn author() -> Uuid {
    Uuid::from_u128(10)
}

/// Another participant.
fn reader() -> Uuid {
    Uuid::from_u128(11)
}

fn seal(body: &str) -> Sealed {
    Sealed(format!("{}{}:{body}", Sealed::PREFIX, message_id()))
}

fn blake3() -> String {
    "ab".repeat(32)
}

/// The conversation as seen by an actor with `role`.
fn facts(role: Option<ParticipantRole>) -> ConversationFacts {
    ConversationFacts {
        conversation_id: conversation_id(),
        organization_id: org_id(),
        archived: false,
        role,
    }
}

fn archived(role: Option<ParticipantRole>) -> ConversationFacts {
    ConversationFacts {
        archived: true,
        ..facts(role)
    }
}

fn elsewhere(role: Option<ParticipantRole>) -> ConversationFacts {
    ConversationFacts {
        conversation_id: Uuid::from_u128(101),
        ..facts(role)
    }
}

fn parent(message_id: u128, thread_root_id: Option<u128>) -> ParentFacts {
    ParentFacts {
        message_id: Uuid::from_u128(message_id),
        conversation_id: conversation_id(),
        thread_root_id: thread_root_id.map(Uuid::from_u128),
    }
}

fn attachment(mime_type: &str) -> NewAttachment {
    NewAttachment {
        file_name: seal("file"),
        mime_type: mime_type.into(),
        size_bytes: 1024,
        blake3: blake3(),
    }
}

fn stored_attachment(mime_type: &str) -> Attachment {
    Attachment {
        file_name: seal("file"),
        mime_type: mime_type.into(),
        size_bytes: 1024,
        blake3: blake3(),
    }
}

/// The parts of a `Post` that tests vary; [`draft`] is a root post by `author()`, a member,
/// of five bytes of text.
struct Draft {
    conversation: ConversationFacts,
    content: Sealed,
    content_bytes: usize,
    parent: Option<ParentFacts>,
    attachments: Vec<NewAttachment>,
}

fn draft() -> Draft {
    Draft {
        conversation: facts(Some(Member)),
        content: seal("hello"),
        content_bytes: 5,
        parent: None,
        attachments: vec![],
    }
}

impl Draft {
    fn post(self) -> MessageCommand {
        MessageCommand::Post {
            message_id: message_id(),
            conversation: self.conversation,
            author_id: author(),
            content: self.content,
            content_bytes: self.content_bytes,
            parent: self.parent,
            attachments: self.attachments,
        }
    }
}

fn post() -> MessageCommand {
    draft().post()
}

fn posted_with(
    parent_message_id: Option<u128>,
    thread_root_id: Option<u128>,
    attachments: Vec<Attachment>,
) -> Ev {
    Ev::MessagePosted {
        message_id: message_id(),
        conversation_id: conversation_id(),
        organization_id: org_id(),
        author_id: author(),
        content: seal("hello"),
        parent_message_id: parent_message_id.map(Uuid::from_u128),
        thread_root_id: thread_root_id.map(Uuid::from_u128),
        attachments,
    }
}

fn posted() -> Ev {
    posted_with(None, None, vec![])
}

fn deleted(by: Option<Uuid>) -> Ev {
    Ev::MessageDeleted {
        conversation_id: conversation_id(),
        by,
    }
}

fn given(events: Vec<Ev>) -> AggregateTestExecutor<Message> {
    Framework::with(()).given(events)
}

fn edit(conversation: ConversationFacts, editor_id: Uuid, bytes: usize) -> MessageCommand {
    MessageCommand::Edit {
        conversation,
        editor_id,
        content: seal("edited"),
        content_bytes: bytes,
        unchanged: false,
    }
}

fn edited() -> Ev {
    Ev::MessageEdited {
        conversation_id: conversation_id(),
        content: seal("edited"),
    }
}

fn delete(conversation: ConversationFacts, actor: MessageActor) -> MessageCommand {
    MessageCommand::Delete {
        conversation,
        actor,
    }
}

fn react(conversation: ConversationFacts, emoji: &str) -> MessageCommand {
    MessageCommand::React {
        conversation,
        user_id: reader(),
        emoji: emoji.into(),
    }
}

fn unreact(conversation: ConversationFacts, emoji: &str) -> MessageCommand {
    MessageCommand::Unreact {
        conversation,
        user_id: reader(),
        emoji: emoji.into(),
    }
}

fn reacted(user_id: Uuid, emoji: &str) -> Ev {
    Ev::ReactionAdded {
        conversation_id: conversation_id(),
        user_id,
        emoji: emoji.into(),
    }
}

fn unreacted(user_id: Uuid, emoji: &str) -> Ev {
    Ev::ReactionRemoved {
        conversation_id: conversation_id(),
        user_id,
        emoji: emoji.into(),
    }
}

fn mark_read(conversation: ConversationFacts) -> MessageCommand {
    MessageCommand::MarkRead {
        conversation,
        user_id: reader(),
    }
}

fn read() -> Ev {
    Ev::MessageRead {
        conversation_id: conversation_id(),
        user_id: reader(),
    }
}

// --- Post ---

#[test]
fn post_a_root_message() {
    given(vec![])
        .when(post())
        .then_expect_events(vec![posted()]);
}

#[test]
fn a_reply_to_a_root_starts_its_thread() {
    given(vec![])
        .when(
            Draft {
                parent: Some(parent(150, None)),
                ..draft()
            }
            .post(),
        )
        .then_expect_events(vec![posted_with(Some(150), Some(150), vec![])]);
}

#[test]
fn a_reply_to_a_reply_stays_in_the_roots_thread() {
    given(vec![])
        .when(
            Draft {
                parent: Some(parent(160, Some(150))),
                ..draft()
            }
            .post(),
        )
        .then_expect_events(vec![posted_with(Some(160), Some(150), vec![])]);
}

#[test]
fn post_with_attachments_lower_cases_their_media_types() {
    given(vec![])
        .when(
            Draft {
                attachments: vec![attachment("Image/PNG"), attachment("application/pdf")],
                ..draft()
            }
            .post(),
        )
        .then_expect_events(vec![posted_with(
            None,
            None,
            vec![
                stored_attachment("image/png"),
                stored_attachment("application/pdf"),
            ],
        )]);
}

#[test]
fn post_only_an_attachment() {
    given(vec![])
        .when(
            Draft {
                content_bytes: 0,
                attachments: vec![attachment("image/png")],
                ..draft()
            }
            .post(),
        )
        .then_expect_events(vec![posted_with(
            None,
            None,
            vec![stored_attachment("image/png")],
        )]);
}

#[test]
fn post_by_an_owner_of_an_archived_conversation_is_refused() {
    given(vec![])
        .when(
            Draft {
                conversation: archived(Some(Owner)),
                ..draft()
            }
            .post(),
        )
        .then_expect_error(E::Archived);
}

#[test]
fn post_rejects_an_existing_message() {
    given(vec![posted()])
        .when(post())
        .then_expect_error(E::AlreadyExists);
}

#[test]
fn post_rejects_a_non_participant_author() {
    given(vec![])
        .when(
            Draft {
                conversation: facts(None),
                ..draft()
            }
            .post(),
        )
        .then_expect_error_message("the acting user is not a participant of the conversation");
}

#[test]
fn post_rejects_clear_text() {
    given(vec![])
        .when(
            Draft {
                content: Sealed("hello".into()),
                ..draft()
            }
            .post(),
        )
        .then_expect_error_message("content must be sealed");
}

#[test]
fn post_takes_16384_bytes_and_refuses_16385() {
    given(vec![])
        .when(
            Draft {
                content_bytes: 16384,
                ..draft()
            }
            .post(),
        )
        .then_expect_events(vec![posted()]);
    given(vec![])
        .when(
            Draft {
                content_bytes: 16385,
                ..draft()
            }
            .post(),
        )
        .then_expect_error_message("content is 16385 bytes; a message holds at most 16384 bytes");
}

#[test]
fn post_needs_text_or_an_attachment() {
    given(vec![])
        .when(
            Draft {
                content_bytes: 0,
                ..draft()
            }
            .post(),
        )
        .then_expect_error(E::Empty);
}

#[test]
fn post_rejects_a_parent_of_another_conversation() {
    let mut other = parent(150, None);
    other.conversation_id = Uuid::from_u128(101);
    given(vec![])
        .when(
            Draft {
                parent: Some(other),
                ..draft()
            }
            .post(),
        )
        .then_expect_error_message("parent_message_id must be a message of the same conversation");
}

#[test]
fn post_rejects_a_reply_to_itself() {
    given(vec![])
        .when(
            Draft {
                parent: Some(parent(200, None)),
                ..draft()
            }
            .post(),
        )
        .then_expect_error(E::OwnParent);
}

#[test]
fn post_takes_at_most_32_attachments() {
    let many = |n| vec![attachment("image/png"); n];
    given(vec![])
        .when(
            Draft {
                attachments: many(32),
                ..draft()
            }
            .post(),
        )
        .then_expect_events(vec![posted_with(
            None,
            None,
            vec![stored_attachment("image/png"); 32],
        )]);
    given(vec![])
        .when(
            Draft {
                attachments: many(33),
                ..draft()
            }
            .post(),
        )
        .then_expect_error(E::TooManyAttachments);
}

#[test]
fn post_rejects_a_clear_text_file_name() {
    let mut clear = attachment("image/png");
    clear.file_name = Sealed("holiday.png".into());
    given(vec![])
        .when(
            Draft {
                attachments: vec![clear],
                ..draft()
            }
            .post(),
        )
        .then_expect_error(E::NotSealed("attachment file_name"));
}

#[test]
fn post_rejects_a_malformed_media_type() {
    given(vec![])
        .when(
            Draft {
                attachments: vec![attachment("image")],
                ..draft()
            }
            .post(),
        )
        .then_expect_error_message(
            "mime_type `image` is not a media type of the form type/subtype",
        );
}

#[test]
fn post_rejects_a_negative_size() {
    let mut negative = attachment("image/png");
    negative.size_bytes = -1;
    given(vec![])
        .when(
            Draft {
                attachments: vec![negative],
                ..draft()
            }
            .post(),
        )
        .then_expect_error_message("attachment size_bytes must not be negative");
}

#[test]
fn post_takes_an_empty_file() {
    let mut empty = attachment("text/plain");
    empty.size_bytes = 0;
    let mut stored = stored_attachment("text/plain");
    stored.size_bytes = 0;
    given(vec![])
        .when(
            Draft {
                attachments: vec![empty],
                ..draft()
            }
            .post(),
        )
        .then_expect_events(vec![posted_with(None, None, vec![stored])]);
}

#[test]
fn post_rejects_a_malformed_digest() {
    let mut upper = attachment("image/png");
    upper.blake3 = "AB".repeat(32);
    given(vec![])
        .when(
            Draft {
                attachments: vec![upper],
                ..draft()
            }
            .post(),
        )
        .then_expect_error_message("attachment blake3 must be 64 lower-case hexadecimal digits");
}

// --- Edit ---

#[test]
fn the_author_edits() {
    given(vec![posted()])
        .when(edit(facts(Some(Member)), author(), 6))
        .then_expect_events(vec![edited()]);
}

#[test]
fn edit_rejects_a_missing_message() {
    given(vec![])
        .when(edit(facts(Some(Member)), author(), 6))
        .then_expect_error(E::NotFound);
}

#[test]
fn edit_rejects_facts_of_another_conversation() {
    given(vec![posted()])
        .when(edit(elsewhere(Some(Member)), author(), 6))
        .then_expect_error(E::WrongConversation);
}

#[test]
fn edit_rejects_a_deleted_message() {
    given(vec![posted(), deleted(Some(author()))])
        .when(edit(facts(Some(Member)), author(), 6))
        .then_expect_error_message("the message has been deleted");
}

#[test]
fn nobody_edits_someone_elses_message() {
    given(vec![posted()])
        .when(edit(facts(Some(Owner)), reader(), 6))
        .then_expect_error_message("only the author may edit a message");
}

#[test]
fn a_former_participant_no_longer_edits() {
    given(vec![posted()])
        .when(edit(facts(None), author(), 6))
        .then_expect_error(E::NotParticipant);
}

#[test]
fn edit_rejects_an_archived_conversation() {
    given(vec![posted()])
        .when(edit(archived(Some(Member)), author(), 6))
        .then_expect_error(E::Archived);
}

#[test]
fn edit_rejects_clear_text() {
    given(vec![posted()])
        .when(MessageCommand::Edit {
            conversation: facts(Some(Member)),
            editor_id: author(),
            content: Sealed("edited".into()),
            content_bytes: 6,
            unchanged: false,
        })
        .then_expect_error(E::NotSealed("content"));
}

#[test]
fn edit_takes_16384_bytes_and_refuses_16385() {
    given(vec![posted()])
        .when(edit(facts(Some(Member)), author(), 16384))
        .then_expect_events(vec![edited()]);
    given(vec![posted()])
        .when(edit(facts(Some(Member)), author(), 16385))
        .then_expect_error(E::TooLarge(16385));
}

#[test]
fn edit_rejects_empty_content() {
    given(vec![posted()])
        .when(edit(facts(Some(Member)), author(), 0))
        .then_expect_error(E::EmptyEdit);
}

#[test]
fn edit_empties_the_text_beside_attachments() {
    given(vec![posted_with(
        None,
        None,
        vec![stored_attachment("image/png")],
    )])
    .when(edit(facts(Some(Member)), author(), 0))
    .then_expect_events(vec![edited()]);
}

fn unchanged_edit(conversation: ConversationFacts, editor_id: Uuid) -> MessageCommand {
    MessageCommand::Edit {
        conversation,
        editor_id,
        content: seal("edited"),
        content_bytes: 6,
        unchanged: true,
    }
}

#[test]
fn edit_rejects_content_that_is_unchanged() {
    given(vec![posted()])
        .when(unchanged_edit(facts(Some(Member)), author()))
        .then_expect_error_message("nothing to change: the edit leaves the message as it is");
}

#[test]
fn an_unchanged_edit_by_anyone_but_the_author_is_refused_as_such() {
    given(vec![posted()])
        .when(unchanged_edit(facts(Some(Owner)), reader()))
        .then_expect_error(E::NotAuthor);
    given(vec![posted()])
        .when(unchanged_edit(archived(Some(Member)), author()))
        .then_expect_error(E::Archived);
}

// --- Delete ---

#[test]
fn the_author_deletes() {
    given(vec![posted()])
        .when(delete(facts(Some(Member)), MessageActor::User(author())))
        .then_expect_events(vec![deleted(Some(author()))]);
}

#[test]
fn an_admin_or_owner_deletes_someone_elses_message() {
    for role in [Admin, Owner] {
        given(vec![posted()])
            .when(delete(facts(Some(role)), MessageActor::User(reader())))
            .then_expect_events(vec![deleted(Some(reader()))]);
    }
}

#[test]
fn a_member_does_not_delete_someone_elses_message() {
    given(vec![posted()])
        .when(delete(facts(Some(Member)), MessageActor::User(reader())))
        .then_expect_error(E::MayNotDelete);
}

#[test]
fn a_service_key_deletes_in_an_archived_conversation() {
    given(vec![posted()])
        .when(delete(archived(None), MessageActor::Service))
        .then_expect_events(vec![deleted(None)]);
}

#[test]
fn the_author_deletes_in_an_archived_conversation() {
    given(vec![posted()])
        .when(delete(archived(Some(Member)), MessageActor::User(author())))
        .then_expect_events(vec![deleted(Some(author()))]);
}

#[test]
fn delete_rejects_a_non_participant() {
    given(vec![posted()])
        .when(delete(facts(None), MessageActor::User(author())))
        .then_expect_error(E::NotParticipant);
}

#[test]
fn delete_rejects_a_deleted_message() {
    given(vec![posted(), deleted(None)])
        .when(delete(facts(Some(Owner)), MessageActor::User(author())))
        .then_expect_error(E::AlreadyDeleted);
}

#[test]
fn delete_rejects_a_missing_message() {
    given(vec![])
        .when(delete(facts(None), MessageActor::Service))
        .then_expect_error(E::NotFound);
}

#[test]
fn delete_rejects_facts_of_another_conversation() {
    given(vec![posted()])
        .when(delete(elsewhere(None), MessageActor::Service))
        .then_expect_error(E::WrongConversation);
}

// --- React / Unreact ---

const NOT_EMOJI: &str = "emoji must be emoji only: no text, whitespace or invisible characters \
                         (ASCII only as a keycap's base, as in 1️⃣)";

#[test]
fn a_participant_reacts() {
    given(vec![posted()])
        .when(react(facts(Some(Member)), " 👍 "))
        .then_expect_events(vec![reacted(reader(), "👍")]);
}

#[test]
fn a_participant_adds_a_second_emoji_and_another_the_same() {
    given(vec![posted(), reacted(reader(), "👍")])
        .when(react(facts(Some(Member)), "🎉"))
        .then_expect_events(vec![reacted(reader(), "🎉")]);
    given(vec![posted(), reacted(author(), "👍")])
        .when(react(facts(Some(Member)), "👍"))
        .then_expect_events(vec![reacted(reader(), "👍")]);
}

#[test]
fn react_rejects_a_duplicate_reaction() {
    given(vec![posted(), reacted(reader(), "👍")])
        .when(react(facts(Some(Member)), "👍"))
        .then_expect_error_message("the user has already reacted with this emoji");
}

#[test]
fn react_rejects_a_word() {
    given(vec![posted()])
        .when(react(facts(Some(Member)), "ok"))
        .then_expect_error_message(NOT_EMOJI);
}

#[test]
fn react_rejects_a_deleted_message() {
    given(vec![posted(), deleted(None)])
        .when(react(facts(Some(Member)), "👍"))
        .then_expect_error(E::Deleted);
}

#[test]
fn react_rejects_a_non_participant() {
    given(vec![posted()])
        .when(react(facts(None), "👍"))
        .then_expect_error(E::NotParticipant);
}

#[test]
fn react_rejects_an_archived_conversation() {
    given(vec![posted()])
        .when(react(archived(Some(Member)), "👍"))
        .then_expect_error(E::Archived);
}

#[test]
fn react_rejects_a_missing_message_and_foreign_facts() {
    given(vec![])
        .when(react(facts(Some(Member)), "👍"))
        .then_expect_error(E::NotFound);
    given(vec![posted()])
        .when(react(elsewhere(Some(Member)), "👍"))
        .then_expect_error(E::WrongConversation);
}

#[test]
fn a_participant_takes_a_reaction_back() {
    given(vec![posted(), reacted(reader(), "👍")])
        .when(unreact(facts(Some(Member)), "👍"))
        .then_expect_events(vec![unreacted(reader(), "👍")]);
}

#[test]
fn unreact_takes_back_a_reaction_an_older_rule_let_in() {
    given(vec![posted(), reacted(reader(), "日本")])
        .when(unreact(facts(Some(Member)), " 日本 "))
        .then_expect_events(vec![unreacted(reader(), "日本")]);
    given(vec![posted()])
        .when(unreact(facts(Some(Member)), "日本"))
        .then_expect_error_message(NOT_EMOJI);
}

#[test]
fn unreact_rejects_a_reaction_not_given() {
    given(vec![posted(), reacted(author(), "👍")])
        .when(unreact(facts(Some(Member)), "👍"))
        .then_expect_error(E::NotReacted);
}

#[test]
fn unreact_rejects_a_deleted_message() {
    given(vec![posted(), reacted(reader(), "👍"), deleted(None)])
        .when(unreact(facts(Some(Member)), "👍"))
        .then_expect_error(E::Deleted);
}

#[test]
fn unreact_rejects_a_non_participant() {
    given(vec![posted(), reacted(reader(), "👍")])
        .when(unreact(facts(None), "👍"))
        .then_expect_error(E::NotParticipant);
}

#[test]
fn unreact_rejects_an_archived_conversation() {
    given(vec![posted(), reacted(reader(), "👍")])
        .when(unreact(archived(Some(Member)), "👍"))
        .then_expect_error(E::Archived);
}

#[test]
fn unreact_rejects_a_missing_message_and_foreign_facts() {
    given(vec![])
        .when(unreact(facts(Some(Member)), "👍"))
        .then_expect_error(E::NotFound);
    given(vec![posted(), reacted(reader(), "👍")])
        .when(unreact(elsewhere(Some(Member)), "👍"))
        .then_expect_error(E::WrongConversation);
}

// --- MarkRead ---

#[test]
fn a_participant_marks_a_message_read() {
    given(vec![posted()])
        .when(mark_read(facts(Some(Member))))
        .then_expect_events(vec![read()]);
}

#[test]
fn a_deleted_message_in_an_archived_conversation_is_still_read() {
    given(vec![posted(), deleted(None)])
        .when(mark_read(archived(Some(Member))))
        .then_expect_events(vec![read()]);
}

#[test]
fn mark_read_rejects_a_second_read() {
    given(vec![posted(), read()])
        .when(mark_read(facts(Some(Member))))
        .then_expect_error_message("the user has already read this message");
}

#[test]
fn mark_read_rejects_a_non_participant() {
    given(vec![posted()])
        .when(mark_read(facts(None)))
        .then_expect_error(E::NotParticipant);
}

#[test]
fn mark_read_rejects_a_missing_message_and_foreign_facts() {
    given(vec![])
        .when(mark_read(facts(Some(Member))))
        .then_expect_error(E::NotFound);
    given(vec![posted()])
        .when(mark_read(elsewhere(Some(Member))))
        .then_expect_error(E::WrongConversation);
}

// --- apply ---

#[test]
fn apply_keeps_the_state_in_step_with_the_events() {
    let mut m = Message::default();
    assert_eq!(m.id(), None);
    m.apply(posted_with(Some(160), Some(150), vec![]));
    assert_eq!(m.id(), Some(message_id()));
    assert_eq!(m.conversation_id(), Some(conversation_id()));
    assert_eq!(m.organization_id(), Some(org_id()));
    assert_eq!(m.author_id(), Some(author()));
    assert_eq!(m.thread_root_id(), Some(Uuid::from_u128(150)));
    assert!(!m.is_deleted());

    m.apply(edited());
    m.apply(reacted(reader(), "👍"));
    m.apply(reacted(author(), "👍"));
    m.apply(Ev::ReactionRemoved {
        conversation_id: conversation_id(),
        user_id: author(),
        emoji: "👍".into(),
    });
    assert_eq!(
        m.reactions().iter().collect::<Vec<_>>(),
        vec![&(reader(), "👍".to_string())]
    );
    m.apply(read());
    m.apply(deleted(None));
    assert!(m.is_deleted());
    assert_eq!(m.reactions().len(), 1);
    assert!(m.readers().contains(&reader()));
}

#[test]
fn errors_map_to_rejections() {
    for e in [
        E::WrongConversation,
        E::NotParticipant,
        E::Invalid("x".into()),
        E::NotSealed("content"),
        E::TooLarge(MAX_CONTENT_BYTES + 1),
        E::Empty,
        E::EmptyEdit,
        E::NoChange,
        E::ParentElsewhere,
        E::OwnParent,
        E::TooManyAttachments,
    ] {
        assert_eq!(e.rejection(), Rejection::Invalid, "{e}");
    }
    assert_eq!(E::NotFound.rejection(), Rejection::NotFound);
    for e in [
        E::AlreadyExists,
        E::Archived,
        E::Deleted,
        E::AlreadyDeleted,
        E::AlreadyReacted,
        E::NotReacted,
        E::AlreadyRead,
    ] {
        assert_eq!(e.rejection(), Rejection::Conflict, "{e}");
    }
    for e in [E::NotAuthor, E::MayNotDelete] {
        assert_eq!(e.rejection(), Rejection::Forbidden, "{e}");
    }
}
