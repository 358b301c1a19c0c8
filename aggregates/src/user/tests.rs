//! Given/when/then tests of the User aggregate: every command's success and every rejection.

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use cqrs_es::Aggregate;
use uuid::Uuid;

use super::*;
use crate::{Rejection, Sealed};

type Framework = TestFramework<User>;

fn user_id() -> Uuid {
    Uuid::from_u128(10)
}

fn org_id() -> Uuid {
    Uuid::from_u128(1)
}

fn role_id() -> Uuid {
    Uuid::from_u128(20)
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap()
}

fn seal(body: &str) -> Sealed {
    Sealed(format!("{}{}:{body}", Sealed::PREFIX, user_id()))
}

fn index(c: char) -> String {
    c.to_string().repeat(64)
}

fn sealed_email(body: &str, index_char: char) -> SealedEmail {
    SealedEmail {
        sealed: seal(body),
        blind_index: index(index_char),
    }
}

fn invite(email: SealedEmail, full_name: Sealed) -> UserCommand {
    UserCommand::Invite {
        user_id: user_id(),
        organization_id: org_id(),
        profile: SealedProfile { email, full_name },
    }
}

fn invited() -> UserEvent {
    UserEvent::UserInvited {
        user_id: user_id(),
        organization_id: org_id(),
        email: seal("email1"),
        full_name: seal("name1"),
        email_blind_index: index('a'),
    }
}

fn deactivated() -> UserEvent {
    UserEvent::UserDeactivated { reason: None }
}

fn erased() -> UserEvent {
    UserEvent::UserErased {
        email_blind_index: index('a'),
    }
}

fn assigned(expires_at: Option<DateTime<Utc>>, reason: Option<&str>) -> UserEvent {
    UserEvent::UserRoleAssigned {
        role_id: role_id(),
        expires_at,
        reason: reason.map(Into::into),
    }
}

fn assign(expires_at: Option<DateTime<Utc>>, reason: Option<&str>) -> UserCommand {
    UserCommand::AssignRole {
        role_id: role_id(),
        expires_at,
        reason: reason.map(Into::into),
        now: now(),
    }
}

fn revoke(reason: Option<&str>) -> UserCommand {
    UserCommand::RevokeRole {
        role_id: role_id(),
        reason: reason.map(Into::into),
    }
}

fn long_reason() -> Option<String> {
    Some("x".repeat(501))
}

// --- Invite ---

#[test]
fn invite_emits_the_sealed_profile_and_blind_index() {
    Framework::with(())
        .given_no_previous_events()
        .when(invite(sealed_email("email1", 'a'), seal("name1")))
        .then_expect_events(vec![invited()]);
}

#[test]
fn invite_rejects_an_existing_user() {
    Framework::with(())
        .given(vec![invited()])
        .when(invite(sealed_email("email2", 'b'), seal("name2")))
        .then_expect_error(UserError::AlreadyExists);
}

#[test]
fn invite_rejects_a_clear_text_email() {
    let email = SealedEmail {
        sealed: Sealed("ada@example.com".into()),
        blind_index: index('a'),
    };
    Framework::with(())
        .given_no_previous_events()
        .when(invite(email, seal("name1")))
        .then_expect_error_message("personal data must be sealed");
}

#[test]
fn invite_rejects_a_clear_text_full_name() {
    Framework::with(())
        .given_no_previous_events()
        .when(invite(
            sealed_email("email1", 'a'),
            Sealed("Ada Lovelace".into()),
        ))
        .then_expect_error(UserError::NotSealed);
}

#[test]
fn invite_rejects_a_malformed_blind_index() {
    let email = SealedEmail {
        sealed: seal("email1"),
        blind_index: "ABC".into(),
    };
    Framework::with(())
        .given_no_previous_events()
        .when(invite(email, seal("name1")))
        .then_expect_error_message("email blind index must be 64 lower-case hexadecimal digits");
}

// --- UpdateProfile ---

#[test]
fn update_profile_email_names_the_previous_blind_index() {
    Framework::with(())
        .given(vec![invited()])
        .when(UserCommand::UpdateProfile {
            email: Some(sealed_email("email2", 'b')),
            full_name: None,
            unchanged: false,
        })
        .then_expect_events(vec![UserEvent::UserProfileUpdated {
            email: Some(seal("email2")),
            email_blind_index: Some(index('b')),
            previous_email_blind_index: Some(index('a')),
            full_name: None,
        }]);
}

#[test]
fn update_profile_full_name_only() {
    Framework::with(())
        .given(vec![invited()])
        .when(UserCommand::UpdateProfile {
            email: None,
            full_name: Some(seal("name2")),
            unchanged: false,
        })
        .then_expect_events(vec![UserEvent::UserProfileUpdated {
            email: None,
            email_blind_index: None,
            previous_email_blind_index: None,
            full_name: Some(seal("name2")),
        }]);
}

#[test]
fn update_profile_uses_the_latest_blind_index_as_previous() {
    Framework::with(())
        .given(vec![
            invited(),
            UserEvent::UserProfileUpdated {
                email: Some(seal("email2")),
                email_blind_index: Some(index('b')),
                previous_email_blind_index: Some(index('a')),
                full_name: None,
            },
        ])
        .when(UserCommand::UpdateProfile {
            email: Some(sealed_email("email3", 'c')),
            full_name: Some(seal("name3")),
            unchanged: false,
        })
        .then_expect_events(vec![UserEvent::UserProfileUpdated {
            email: Some(seal("email3")),
            email_blind_index: Some(index('c')),
            previous_email_blind_index: Some(index('b')),
            full_name: Some(seal("name3")),
        }]);
}

#[test]
fn update_profile_accepts_a_resealed_unchanged_address() {
    Framework::with(())
        .given(vec![invited()])
        .when(UserCommand::UpdateProfile {
            email: Some(sealed_email("email1b", 'a')),
            full_name: None,
            unchanged: false,
        })
        .then_expect_events(vec![UserEvent::UserProfileUpdated {
            email: Some(seal("email1b")),
            email_blind_index: Some(index('a')),
            previous_email_blind_index: Some(index('a')),
            full_name: None,
        }]);
}

#[test]
fn update_profile_is_allowed_while_deactivated() {
    Framework::with(())
        .given(vec![invited(), deactivated()])
        .when(UserCommand::UpdateProfile {
            email: None,
            full_name: Some(seal("name2")),
            unchanged: false,
        })
        .then_expect_events(vec![UserEvent::UserProfileUpdated {
            email: None,
            email_blind_index: None,
            previous_email_blind_index: None,
            full_name: Some(seal("name2")),
        }]);
}

#[test]
fn update_profile_rejects_a_missing_user() {
    Framework::with(())
        .given_no_previous_events()
        .when(UserCommand::UpdateProfile {
            email: None,
            full_name: Some(seal("name2")),
            unchanged: false,
        })
        .then_expect_error(UserError::NotFound);
}

#[test]
fn update_profile_rejects_an_erased_user() {
    Framework::with(())
        .given(vec![invited(), erased()])
        .when(UserCommand::UpdateProfile {
            email: None,
            full_name: Some(seal("name2")),
            unchanged: false,
        })
        .then_expect_error_message("the user has been erased");
}

#[test]
fn update_profile_rejects_an_empty_update() {
    Framework::with(())
        .given(vec![invited()])
        .when(UserCommand::UpdateProfile {
            email: None,
            full_name: None,
            unchanged: false,
        })
        .then_expect_error(UserError::NoChange);
}

#[test]
fn update_profile_rejects_values_that_are_all_unchanged() {
    Framework::with(())
        .given(vec![invited()])
        .when(UserCommand::UpdateProfile {
            email: None,
            full_name: None,
            unchanged: true,
        })
        .then_expect_error_message("nothing to change: the update leaves the user as it is");
}

#[test]
fn update_profile_keeps_a_changed_field_beside_an_unchanged_one() {
    Framework::with(())
        .given(vec![invited()])
        .when(UserCommand::UpdateProfile {
            email: None,
            full_name: Some(seal("name2")),
            unchanged: true,
        })
        .then_expect_events(vec![UserEvent::UserProfileUpdated {
            email: None,
            email_blind_index: None,
            previous_email_blind_index: None,
            full_name: Some(seal("name2")),
        }]);
}

#[test]
fn update_profile_of_an_erased_user_is_refused_as_erased_even_when_unchanged() {
    Framework::with(())
        .given(vec![invited(), erased()])
        .when(UserCommand::UpdateProfile {
            email: None,
            full_name: None,
            unchanged: true,
        })
        .then_expect_error(UserError::Erased);
}

#[test]
fn update_profile_rejects_clear_text() {
    for command in [
        UserCommand::UpdateProfile {
            email: Some(SealedEmail {
                sealed: Sealed("ada@example.com".into()),
                blind_index: index('b'),
            }),
            full_name: None,
            unchanged: false,
        },
        UserCommand::UpdateProfile {
            email: None,
            full_name: Some(Sealed("sealed:v1:not-a-uuid:abc".into())),
            unchanged: false,
        },
    ] {
        Framework::with(())
            .given(vec![invited()])
            .when(command)
            .then_expect_error(UserError::NotSealed);
    }
}

#[test]
fn update_profile_rejects_a_malformed_blind_index() {
    Framework::with(())
        .given(vec![invited()])
        .when(UserCommand::UpdateProfile {
            email: Some(SealedEmail {
                sealed: seal("email2"),
                blind_index: String::new(),
            }),
            full_name: None,
            unchanged: false,
        })
        .then_expect_error_message("email blind index must be 64 lower-case hexadecimal digits");
}

// --- Deactivate ---

#[test]
fn deactivate_emits_the_trimmed_reason() {
    Framework::with(())
        .given(vec![invited()])
        .when(UserCommand::Deactivate {
            reason: Some(" left the company ".into()),
        })
        .then_expect_events(vec![UserEvent::UserDeactivated {
            reason: Some("left the company".into()),
        }]);
}

#[test]
fn deactivate_rejects_a_missing_user() {
    Framework::with(())
        .given_no_previous_events()
        .when(UserCommand::Deactivate { reason: None })
        .then_expect_error(UserError::NotFound);
}

#[test]
fn deactivate_rejects_a_deactivated_user() {
    Framework::with(())
        .given(vec![invited(), deactivated()])
        .when(UserCommand::Deactivate { reason: None })
        .then_expect_error_message("the user is already deactivated");
}

#[test]
fn deactivate_rejects_an_erased_user() {
    Framework::with(())
        .given(vec![invited(), erased()])
        .when(UserCommand::Deactivate { reason: None })
        .then_expect_error(UserError::Erased);
}

#[test]
fn deactivate_rejects_a_reason_over_500_characters() {
    Framework::with(())
        .given(vec![invited()])
        .when(UserCommand::Deactivate {
            reason: long_reason(),
        })
        .then_expect_error_message("reason must be at most 500 characters");
}

// --- Reactivate ---

#[test]
fn reactivate_a_deactivated_user() {
    Framework::with(())
        .given(vec![invited(), deactivated()])
        .when(UserCommand::Reactivate)
        .then_expect_events(vec![UserEvent::UserReactivated {}]);
}

#[test]
fn reactivate_rejects_a_missing_user() {
    Framework::with(())
        .given_no_previous_events()
        .when(UserCommand::Reactivate)
        .then_expect_error(UserError::NotFound);
}

#[test]
fn reactivate_rejects_an_active_user() {
    Framework::with(())
        .given(vec![
            invited(),
            deactivated(),
            UserEvent::UserReactivated {},
        ])
        .when(UserCommand::Reactivate)
        .then_expect_error_message("the user is not deactivated");
}

#[test]
fn reactivate_rejects_an_erased_user() {
    Framework::with(())
        .given(vec![invited(), deactivated(), erased()])
        .when(UserCommand::Reactivate)
        .then_expect_error(UserError::Erased);
}

// --- Erase ---

#[test]
fn erase_releases_the_current_blind_index() {
    Framework::with(())
        .given(vec![
            invited(),
            UserEvent::UserProfileUpdated {
                email: Some(seal("email2")),
                email_blind_index: Some(index('b')),
                previous_email_blind_index: Some(index('a')),
                full_name: None,
            },
        ])
        .when(UserCommand::Erase)
        .then_expect_events(vec![UserEvent::UserErased {
            email_blind_index: index('b'),
        }]);
}

#[test]
fn erase_a_deactivated_user() {
    Framework::with(())
        .given(vec![invited(), deactivated()])
        .when(UserCommand::Erase)
        .then_expect_events(vec![erased()]);
}

#[test]
fn erase_rejects_a_missing_user() {
    Framework::with(())
        .given_no_previous_events()
        .when(UserCommand::Erase)
        .then_expect_error(UserError::NotFound);
}

#[test]
fn erase_rejects_an_erased_user() {
    Framework::with(())
        .given(vec![invited(), erased()])
        .when(UserCommand::Erase)
        .then_expect_error_message("the user has already been erased");
}

// --- AssignRole ---

#[test]
fn assign_role_without_expiry() {
    Framework::with(())
        .given(vec![invited()])
        .when(assign(None, None))
        .then_expect_events(vec![assigned(None, None)]);
}

#[test]
fn assign_role_with_expiry_and_trimmed_reason() {
    let later = now() + Duration::days(30);
    Framework::with(())
        .given(vec![invited()])
        .when(assign(Some(later), Some(" on-call cover ")))
        .then_expect_events(vec![assigned(Some(later), Some("on-call cover"))]);
}

#[test]
fn assign_role_again_replaces_the_assignment() {
    let later = now() + Duration::days(30);
    Framework::with(())
        .given(vec![invited(), assigned(None, None)])
        .when(assign(Some(later), None))
        .then_expect_events(vec![assigned(Some(later), None)]);
}

#[test]
fn assign_role_again_after_revocation() {
    Framework::with(())
        .given(vec![
            invited(),
            assigned(None, None),
            UserEvent::UserRoleRevoked {
                role_id: role_id(),
                reason: None,
            },
        ])
        .when(assign(None, None))
        .then_expect_events(vec![assigned(None, None)]);
}

#[test]
fn assign_role_rejects_a_missing_user() {
    Framework::with(())
        .given_no_previous_events()
        .when(assign(None, None))
        .then_expect_error(UserError::NotFound);
}

#[test]
fn assign_role_rejects_an_erased_user() {
    Framework::with(())
        .given(vec![invited(), erased()])
        .when(assign(None, None))
        .then_expect_error(UserError::Erased);
}

#[test]
fn assign_role_rejects_a_deactivated_user() {
    Framework::with(())
        .given(vec![invited(), deactivated()])
        .when(assign(None, None))
        .then_expect_error_message("the user is deactivated; reactivate the user first");
}

#[test]
fn assign_role_rejects_an_expiry_that_is_not_in_the_future() {
    for expires_at in [now(), now() - Duration::seconds(1)] {
        Framework::with(())
            .given(vec![invited()])
            .when(assign(Some(expires_at), None))
            .then_expect_error_message("expires_at must be in the future");
    }
}

#[test]
fn assign_role_rejects_a_reason_over_500_characters() {
    Framework::with(())
        .given(vec![invited()])
        .when(assign(None, long_reason().as_deref()))
        .then_expect_error_message("reason must be at most 500 characters");
}

#[test]
fn assign_role_rejects_an_identical_assignment() {
    let later = now() + Duration::days(30);
    Framework::with(())
        .given(vec![invited(), assigned(Some(later), Some("cover"))])
        .when(assign(Some(later), Some(" cover ")))
        .then_expect_error(UserError::AssignmentUnchanged);
}

// --- RevokeRole ---

#[test]
fn revoke_role_emits_the_trimmed_reason() {
    Framework::with(())
        .given(vec![invited(), assigned(None, None)])
        .when(revoke(Some(" no longer needed ")))
        .then_expect_events(vec![UserEvent::UserRoleRevoked {
            role_id: role_id(),
            reason: Some("no longer needed".into()),
        }]);
}

#[test]
fn revoke_role_is_allowed_while_deactivated() {
    Framework::with(())
        .given(vec![invited(), assigned(None, None), deactivated()])
        .when(revoke(None))
        .then_expect_events(vec![UserEvent::UserRoleRevoked {
            role_id: role_id(),
            reason: None,
        }]);
}

#[test]
fn revoke_role_rejects_a_missing_user() {
    Framework::with(())
        .given_no_previous_events()
        .when(revoke(None))
        .then_expect_error(UserError::NotFound);
}

#[test]
fn revoke_role_rejects_an_erased_user() {
    Framework::with(())
        .given(vec![invited(), assigned(None, None), erased()])
        .when(revoke(None))
        .then_expect_error(UserError::Erased);
}

#[test]
fn revoke_role_rejects_a_role_not_assigned() {
    Framework::with(())
        .given(vec![invited()])
        .when(revoke(None))
        .then_expect_error_message(&format!("role {} is not assigned to the user", role_id()));
}

#[test]
fn revoke_role_rejects_a_reason_over_500_characters() {
    Framework::with(())
        .given(vec![invited(), assigned(None, None)])
        .when(revoke(long_reason().as_deref()))
        .then_expect_error_message("reason must be at most 500 characters");
}

// --- State and error mapping ---

#[test]
fn state_follows_the_events() {
    let mut user = User::default();
    assert_eq!(user.status(), None);
    user.apply(invited());
    assert_eq!(user.id(), Some(user_id()));
    assert_eq!(user.organization_id(), Some(org_id()));
    assert!(user.is_active());
    assert_eq!(user.email(), Some(&seal("email1")));
    assert_eq!(user.full_name(), Some(&seal("name1")));
    assert_eq!(user.email_blind_index(), Some(index('a').as_str()));

    let other = Uuid::from_u128(21);
    user.apply(assigned(Some(now()), None));
    user.apply(UserEvent::UserRoleAssigned {
        role_id: other,
        expires_at: None,
        reason: None,
    });
    assert_eq!(user.roles().len(), 2);
    assert_eq!(user.current_roles(now()).collect::<Vec<_>>(), vec![other]);
    assert!(user.roles()[&role_id()].is_current(now() - Duration::seconds(1)));

    user.apply(deactivated());
    assert_eq!(user.status(), Some(UserStatus::Deactivated));
    user.apply(erased());
    assert_eq!(user.status(), Some(UserStatus::Erased));
    assert_eq!(user.email(), None);
    assert_eq!(user.full_name(), None);
    assert_eq!(user.email_blind_index(), None);
    assert!(user.roles().is_empty());
    assert_eq!(user.organization_id(), Some(org_id()));
}

#[test]
fn errors_map_to_rejections() {
    use UserError as E;
    for e in [
        E::Invalid("x".into()),
        E::NotSealed,
        E::NoChange,
        E::Unchanged,
        E::AssignmentUnchanged,
    ] {
        assert_eq!(e.rejection(), Rejection::Invalid, "{e}");
    }
    assert_eq!(E::NotFound.rejection(), Rejection::NotFound);
    for e in [
        E::AlreadyExists,
        E::AlreadyDeactivated,
        E::NotDeactivated,
        E::Deactivated,
        E::Erased,
        E::AlreadyErased,
        E::RoleNotAssigned(role_id()),
    ] {
        assert_eq!(e.rejection(), Rejection::Conflict, "{e}");
    }
}

/// The ledger store refuses a request's command by these names (`metadata`): a rename of an
/// event must not quietly let a deactivated user's requests through.
#[test]
fn the_events_that_refuse_a_users_requests_in_flight_are_named_as_recorded() {
    let losses = [
        deactivated(),
        erased(),
        UserEvent::UserRoleAssigned {
            role_id: role_id(),
            expires_at: None,
            reason: None,
        },
        UserEvent::UserRoleRevoked {
            role_id: role_id(),
            reason: None,
        },
    ];
    let names: Vec<String> = losses
        .iter()
        .map(cqrs_es::DomainEvent::event_type)
        .collect();
    assert_eq!(names, crate::metadata::ACTOR_USER_LOSSES);
}
