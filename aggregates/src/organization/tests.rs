//! Given/when/then tests of the Organization aggregate: every command's success and every
//! rejection.

use cqrs_es::test::TestFramework;
use cqrs_es::Aggregate;
use serde_json::json;
use uuid::Uuid;

use super::*;
use crate::Rejection;

type Framework = TestFramework<Organization>;

fn org_id() -> Uuid {
    Uuid::from_u128(1)
}

fn profile() -> OrganizationProfile {
    OrganizationProfile {
        name: "Acme".into(),
        slug: "acme".into(),
        country_code: Some("DE".into()),
        domain: Some("acme.example".into()),
        settings: Default::default(),
    }
}

fn created() -> OrganizationEvent {
    OrganizationEvent::OrganizationCreated {
        organization_id: org_id(),
        profile: profile(),
    }
}

fn suspended() -> OrganizationEvent {
    OrganizationEvent::OrganizationSuspended { reason: None }
}

fn create(
    name: &str,
    slug: &str,
    country: Option<&str>,
    domain: Option<&str>,
) -> OrganizationCommand {
    OrganizationCommand::Create {
        organization_id: org_id(),
        name: name.into(),
        slug: slug.into(),
        country_code: country.map(Into::into),
        domain: domain.map(Into::into),
        settings: Default::default(),
    }
}

fn update() -> OrganizationCommand {
    OrganizationCommand::Update {
        name: None,
        slug: None,
        country_code: None,
        domain: None,
        settings: None,
    }
}

fn update_with(f: impl FnOnce(&mut OrganizationCommand)) -> OrganizationCommand {
    let mut command = update();
    f(&mut command);
    command
}

fn suspend(reason: Option<&str>) -> OrganizationCommand {
    OrganizationCommand::Suspend {
        reason: reason.map(Into::into),
    }
}

// --- Create ---

#[test]
fn create_emits_the_normalised_profile() {
    let mut settings = serde_json::Map::new();
    settings.insert("theme".into(), json!("dark"));
    Framework::with(())
        .given_no_previous_events()
        .when(OrganizationCommand::Create {
            organization_id: org_id(),
            name: "  Acme  ".into(),
            slug: "acme".into(),
            country_code: Some("de".into()),
            domain: Some("Acme.Example".into()),
            settings: settings.clone(),
        })
        .then_expect_events(vec![OrganizationEvent::OrganizationCreated {
            organization_id: org_id(),
            profile: OrganizationProfile {
                settings,
                ..profile()
            },
        }]);
}

#[test]
fn create_without_optional_fields() {
    Framework::with(())
        .given_no_previous_events()
        .when(create("Acme", "acme", None, None))
        .then_expect_events(vec![OrganizationEvent::OrganizationCreated {
            organization_id: org_id(),
            profile: OrganizationProfile {
                country_code: None,
                domain: None,
                ..profile()
            },
        }]);
}

#[test]
fn create_rejects_an_existing_organization() {
    Framework::with(())
        .given(vec![created()])
        .when(create("Other", "other", None, None))
        .then_expect_error(OrganizationError::AlreadyExists);
}

#[test]
fn create_rejects_a_blank_name() {
    Framework::with(())
        .given_no_previous_events()
        .when(create("   ", "acme", None, None))
        .then_expect_error_message("name must not be empty");
}

#[test]
fn create_rejects_a_bad_slug() {
    Framework::with(())
        .given_no_previous_events()
        .when(create("Acme", "Acme Corp", None, None))
        .then_expect_error_message("slug must be 1-63 characters of a-z, 0-9 and inner hyphens");
}

#[test]
fn create_rejects_an_unknown_country_code() {
    Framework::with(())
        .given_no_previous_events()
        .when(create("Acme", "acme", Some("XX"), None))
        .then_expect_error_message("`XX` is not an ISO 3166-1 alpha-2 country code");
}

#[test]
fn create_rejects_a_bad_domain() {
    Framework::with(())
        .given_no_previous_events()
        .when(create("Acme", "acme", None, Some("localhost")))
        .then_expect_error_message("`localhost` is not a valid domain name");
}

// --- Update ---

#[test]
fn update_carries_the_whole_profile_before_and_after() {
    let mut settings = serde_json::Map::new();
    settings.insert("locale".into(), json!("de-DE"));
    Framework::with(())
        .given(vec![created()])
        .when(OrganizationCommand::Update {
            name: Some(" Acme Corp ".into()),
            slug: Some("acme-corp".into()),
            country_code: Some(Some("fr".into())),
            domain: Some(Some("ACME.fr".into())),
            settings: Some(settings.clone()),
        })
        .then_expect_events(vec![OrganizationEvent::OrganizationUpdated {
            before: profile(),
            after: OrganizationProfile {
                name: "Acme Corp".into(),
                slug: "acme-corp".into(),
                country_code: Some("FR".into()),
                domain: Some("acme.fr".into()),
                settings,
            },
        }]);
}

#[test]
fn update_clears_optional_fields() {
    Framework::with(())
        .given(vec![created()])
        .when(update_with(|c| {
            if let OrganizationCommand::Update {
                country_code,
                domain,
                ..
            } = c
            {
                *country_code = Some(None);
                *domain = Some(None);
            }
        }))
        .then_expect_events(vec![OrganizationEvent::OrganizationUpdated {
            before: profile(),
            after: OrganizationProfile {
                country_code: None,
                domain: None,
                ..profile()
            },
        }]);
}

#[test]
fn update_is_allowed_while_suspended() {
    Framework::with(())
        .given(vec![created(), suspended()])
        .when(update_with(|c| {
            if let OrganizationCommand::Update { name, .. } = c {
                *name = Some("Acme Corp".into());
            }
        }))
        .then_expect_events(vec![OrganizationEvent::OrganizationUpdated {
            before: profile(),
            after: OrganizationProfile {
                name: "Acme Corp".into(),
                ..profile()
            },
        }]);
}

#[test]
fn update_applies_on_top_of_earlier_updates() {
    let renamed = OrganizationProfile {
        name: "Acme Corp".into(),
        ..profile()
    };
    Framework::with(())
        .given(vec![
            created(),
            OrganizationEvent::OrganizationUpdated {
                before: profile(),
                after: renamed.clone(),
            },
        ])
        .when(update_with(|c| {
            if let OrganizationCommand::Update { slug, .. } = c {
                *slug = Some("acme-corp".into());
            }
        }))
        .then_expect_events(vec![OrganizationEvent::OrganizationUpdated {
            before: renamed.clone(),
            after: OrganizationProfile {
                slug: "acme-corp".into(),
                ..renamed
            },
        }]);
}

#[test]
fn update_rejects_a_missing_organization() {
    Framework::with(())
        .given_no_previous_events()
        .when(update_with(|c| {
            if let OrganizationCommand::Update { name, .. } = c {
                *name = Some("Acme".into());
            }
        }))
        .then_expect_error(OrganizationError::NotFound);
}

#[test]
fn update_rejects_an_empty_update() {
    Framework::with(())
        .given(vec![created()])
        .when(update())
        .then_expect_error(OrganizationError::NoChange);
}

#[test]
fn update_rejects_values_equal_to_the_current_ones() {
    Framework::with(())
        .given(vec![created()])
        .when(OrganizationCommand::Update {
            // Equal once normalised, so still no change.
            name: Some(" Acme ".into()),
            slug: Some("acme".into()),
            country_code: Some(Some("de".into())),
            domain: Some(Some("ACME.example".into())),
            settings: Some(Default::default()),
        })
        .then_expect_error_message(
            "nothing to change: the update leaves the organization as it is",
        );
}

#[test]
fn update_rejects_invalid_fields() {
    let cases: Vec<(OrganizationCommand, &str)> = vec![
        (
            update_with(|c| {
                if let OrganizationCommand::Update { name, .. } = c {
                    *name = Some("".into());
                }
            }),
            "name must not be empty",
        ),
        (
            update_with(|c| {
                if let OrganizationCommand::Update { slug, .. } = c {
                    *slug = Some("-acme".into());
                }
            }),
            "slug must be 1-63 characters of a-z, 0-9 and inner hyphens",
        ),
        (
            update_with(|c| {
                if let OrganizationCommand::Update { country_code, .. } = c {
                    *country_code = Some(Some("DEU".into()));
                }
            }),
            "`DEU` is not an ISO 3166-1 alpha-2 country code",
        ),
        (
            update_with(|c| {
                if let OrganizationCommand::Update { domain, .. } = c {
                    *domain = Some(Some("-bad.com".into()));
                }
            }),
            "`-bad.com` is not a valid domain name",
        ),
    ];
    for (command, message) in cases {
        Framework::with(())
            .given(vec![created()])
            .when(command)
            .then_expect_error_message(message);
    }
}

// --- Suspend ---

#[test]
fn suspend_emits_the_trimmed_reason() {
    Framework::with(())
        .given(vec![created()])
        .when(suspend(Some("  unpaid invoices ")))
        .then_expect_events(vec![OrganizationEvent::OrganizationSuspended {
            reason: Some("unpaid invoices".into()),
        }]);
}

#[test]
fn suspend_without_a_reason() {
    Framework::with(())
        .given(vec![created()])
        .when(suspend(Some("   ")))
        .then_expect_events(vec![OrganizationEvent::OrganizationSuspended {
            reason: None,
        }]);
}

#[test]
fn suspend_rejects_a_missing_organization() {
    Framework::with(())
        .given_no_previous_events()
        .when(suspend(None))
        .then_expect_error(OrganizationError::NotFound);
}

#[test]
fn suspend_rejects_a_suspended_organization() {
    Framework::with(())
        .given(vec![created(), suspended()])
        .when(suspend(None))
        .then_expect_error_message("the organization is already suspended");
}

#[test]
fn suspend_rejects_a_reason_over_500_characters() {
    Framework::with(())
        .given(vec![created()])
        .when(suspend(Some(&"x".repeat(501))))
        .then_expect_error_message("reason must be at most 500 characters");
}

// --- Reactivate ---

#[test]
fn reactivate_lifts_a_suspension() {
    Framework::with(())
        .given(vec![created(), suspended()])
        .when(OrganizationCommand::Reactivate)
        .then_expect_events(vec![OrganizationEvent::OrganizationReactivated {}]);
}

#[test]
fn reactivate_rejects_a_missing_organization() {
    Framework::with(())
        .given_no_previous_events()
        .when(OrganizationCommand::Reactivate)
        .then_expect_error(OrganizationError::NotFound);
}

#[test]
fn reactivate_rejects_an_active_organization() {
    Framework::with(())
        .given(vec![
            created(),
            suspended(),
            OrganizationEvent::OrganizationReactivated {},
        ])
        .when(OrganizationCommand::Reactivate)
        .then_expect_error_message("the organization is not suspended");
}

// --- State and error mapping ---

#[test]
fn state_follows_the_events() {
    let mut org = Organization::default();
    assert_eq!(org.status(), None);
    assert!(org.profile().is_none());
    org.apply(created());
    assert_eq!(org.id(), Some(org_id()));
    assert_eq!(org.profile(), Some(&profile()));
    assert!(org.is_active());
    org.apply(OrganizationEvent::OrganizationSuspended {
        reason: Some("unpaid".into()),
    });
    assert_eq!(org.status(), Some(OrganizationStatus::Suspended));
    assert_eq!(org.suspension_reason(), Some("unpaid"));
    org.apply(OrganizationEvent::OrganizationReactivated {});
    assert!(org.is_active());
    assert_eq!(org.suspension_reason(), None);
}

#[test]
fn errors_map_to_rejections() {
    use OrganizationError as E;
    assert_eq!(E::Invalid("x".into()).rejection(), Rejection::Invalid);
    assert_eq!(E::NoChange.rejection(), Rejection::Invalid);
    assert_eq!(E::NotFound.rejection(), Rejection::NotFound);
    for e in [E::AlreadyExists, E::AlreadySuspended, E::NotSuspended] {
        assert_eq!(e.rejection(), Rejection::Conflict, "{e}");
    }
}

/// The ledger store refuses an organization key's command in flight by this name
/// (`metadata`): a rename of the event must not quietly let it through.
#[test]
fn the_event_that_refuses_an_organizations_requests_in_flight_is_named_as_recorded() {
    let suspended = OrganizationEvent::OrganizationSuspended { reason: None };
    assert_eq!(
        [cqrs_es::DomainEvent::event_type(&suspended)],
        crate::metadata::ACTOR_ORGANIZATION_LOSSES
    );
}
