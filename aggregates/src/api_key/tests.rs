//! Given/when/then tests of the API key aggregate: every command's success and every
//! rejection.

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use cqrs_es::Aggregate;
use uuid::Uuid;

use super::*;
use crate::{Permission as P, PermissionSet, Rejection};

type Framework = TestFramework<ApiKey>;

fn key_id() -> Uuid {
    Uuid::from_u128(40)
}

fn org_id() -> Uuid {
    Uuid::from_u128(1)
}

fn user_id() -> Uuid {
    Uuid::from_u128(10)
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap()
}

fn hash(c: char) -> String {
    c.to_string().repeat(64)
}

fn set(permissions: &[P]) -> PermissionSet {
    permissions.iter().copied().collect()
}

fn readers() -> PermissionSet {
    set(&[P::UsersRead, P::RolesRead])
}

/// A user's key in an organization, issued by someone holding `readers()` and keys:write.
fn issue() -> ApiKeyCommand {
    ApiKeyCommand::Issue {
        key_id: key_id(),
        organization_id: Some(org_id()),
        user_id: Some(user_id()),
        label: "CI".into(),
        permissions: readers(),
        expires_at: None,
        prefix: "ll_abc123".into(),
        secret_hash: hash('a'),
        bootstrap: false,
        grantable: set(&[P::UsersRead, P::RolesRead, P::KeysWrite]),
        now: now(),
    }
}

fn issue_with(f: impl FnOnce(&mut ApiKeyCommand)) -> ApiKeyCommand {
    let mut command = issue();
    f(&mut command);
    command
}

fn issued() -> ApiKeyEvent {
    ApiKeyEvent::ApiKeyIssued {
        key_id: key_id(),
        organization_id: Some(org_id()),
        user_id: Some(user_id()),
        label: "CI".into(),
        permissions: readers(),
        expires_at: None,
        prefix: "ll_abc123".into(),
        secret_hash: hash('a'),
        bootstrap: false,
    }
}

fn revoked() -> ApiKeyEvent {
    ApiKeyEvent::ApiKeyRevoked { reason: None }
}

fn rotated(prefix: &str, previous: &str) -> ApiKeyEvent {
    ApiKeyEvent::ApiKeyRotated {
        prefix: prefix.into(),
        secret_hash: hash('b'),
        previous_prefix: previous.into(),
        previous_valid_until: None,
    }
}

fn rotate(prefix: &str) -> ApiKeyCommand {
    rotate_with_grace(prefix, None)
}

fn rotate_with_grace(prefix: &str, previous_valid_until: Option<DateTime<Utc>>) -> ApiKeyCommand {
    ApiKeyCommand::Rotate {
        prefix: prefix.into(),
        secret_hash: hash('b'),
        previous_valid_until,
        now: now(),
    }
}

// --- Issue ---

#[test]
fn issue_a_users_key() {
    Framework::with(())
        .given_no_previous_events()
        .when(issue_with(|c| {
            if let ApiKeyCommand::Issue { label, .. } = c {
                *label = "  CI ".into();
            }
        }))
        .then_expect_events(vec![issued()]);
}

#[test]
fn issue_a_service_key_that_expires() {
    let later = now() + Duration::days(90);
    Framework::with(())
        .given_no_previous_events()
        .when(issue_with(|c| {
            if let ApiKeyCommand::Issue {
                user_id,
                expires_at,
                ..
            } = c
            {
                *user_id = None;
                *expires_at = Some(later);
            }
        }))
        .then_expect_events(vec![ApiKeyEvent::ApiKeyIssued {
            key_id: key_id(),
            organization_id: Some(org_id()),
            user_id: None,
            label: "CI".into(),
            permissions: readers(),
            expires_at: Some(later),
            prefix: "ll_abc123".into(),
            secret_hash: hash('a'),
            bootstrap: false,
        }]);
}

#[test]
fn issue_the_bootstrap_platform_key() {
    Framework::with(())
        .given_no_previous_events()
        .when(ApiKeyCommand::Issue {
            key_id: key_id(),
            organization_id: None,
            user_id: None,
            label: "bootstrap".into(),
            permissions: set(&[P::PlatformAdmin]),
            expires_at: None,
            prefix: "ll_root".into(),
            secret_hash: hash('c'),
            bootstrap: true,
            grantable: set(&[P::PlatformAdmin]),
            now: now(),
        })
        .then_expect_events(vec![ApiKeyEvent::ApiKeyIssued {
            key_id: key_id(),
            organization_id: None,
            user_id: None,
            label: "bootstrap".into(),
            permissions: set(&[P::PlatformAdmin]),
            expires_at: None,
            prefix: "ll_root".into(),
            secret_hash: hash('c'),
            bootstrap: true,
        }]);
}

#[test]
fn issue_rejects_an_existing_key() {
    Framework::with(())
        .given(vec![issued()])
        .when(issue())
        .then_expect_error(ApiKeyError::AlreadyExists);
}

#[test]
fn issue_rejects_a_blank_label() {
    Framework::with(())
        .given_no_previous_events()
        .when(issue_with(|c| {
            if let ApiKeyCommand::Issue { label, .. } = c {
                *label = " ".into();
            }
        }))
        .then_expect_error_message("label must not be empty");
}

#[test]
fn issue_rejects_a_key_without_permissions() {
    Framework::with(())
        .given_no_previous_events()
        .when(issue_with(|c| {
            if let ApiKeyCommand::Issue { permissions, .. } = c {
                *permissions = PermissionSet::new();
            }
        }))
        .then_expect_error_message("an API key must hold at least one permission");
}

#[test]
fn issue_rejects_a_users_key_outside_an_organization() {
    Framework::with(())
        .given_no_previous_events()
        .when(issue_with(|c| {
            if let ApiKeyCommand::Issue {
                organization_id, ..
            } = c
            {
                *organization_id = None;
            }
        }))
        .then_expect_error_message("a user's key must belong to the user's organization");
}

#[test]
fn issue_rejects_a_bootstrap_key_in_an_organization() {
    Framework::with(())
        .given_no_previous_events()
        .when(issue_with(|c| {
            if let ApiKeyCommand::Issue { bootstrap, .. } = c {
                *bootstrap = true;
            }
        }))
        .then_expect_error_message("the bootstrap key must be a platform key");
}

#[test]
fn issue_rejects_platform_admin_on_an_organizations_key() {
    Framework::with(())
        .given_no_previous_events()
        .when(issue_with(|c| {
            if let ApiKeyCommand::Issue {
                permissions,
                grantable,
                ..
            } = c
            {
                *permissions = set(&[P::PlatformAdmin]);
                *grantable = set(&[P::PlatformAdmin]);
            }
        }))
        .then_expect_error(ApiKeyError::PlatformAdmin);
}

#[test]
fn issue_rejects_permissions_the_issuer_does_not_hold() {
    Framework::with(())
        .given_no_previous_events()
        .when(issue_with(|c| {
            if let ApiKeyCommand::Issue { permissions, .. } = c {
                *permissions = set(&[P::UsersRead, P::UsersWrite, P::AuditRead]);
            }
        }))
        .then_expect_error_message(
            "you cannot grant permissions you do not hold: users:write, audit:read",
        );
}

#[test]
fn issue_rejects_an_expiry_that_is_not_in_the_future() {
    for at in [now(), now() - Duration::days(1)] {
        Framework::with(())
            .given_no_previous_events()
            .when(issue_with(|c| {
                if let ApiKeyCommand::Issue { expires_at, .. } = c {
                    *expires_at = Some(at);
                }
            }))
            .then_expect_error_message("expires_at must be in the future");
    }
}

#[test]
fn issue_rejects_a_bad_prefix() {
    for bad in [String::new(), "ll abc".into(), "x".repeat(65)] {
        Framework::with(())
            .given_no_previous_events()
            .when(issue_with(|c| {
                if let ApiKeyCommand::Issue { prefix, .. } = c {
                    *prefix = bad;
                }
            }))
            .then_expect_error_message(
                "prefix must be 1-64 printable ASCII characters without spaces",
            );
    }
}

#[test]
fn issue_rejects_a_bad_secret_hash() {
    Framework::with(())
        .given_no_previous_events()
        .when(issue_with(|c| {
            if let ApiKeyCommand::Issue { secret_hash, .. } = c {
                *secret_hash = "not-a-hash".into();
            }
        }))
        .then_expect_error_message("secret hash must be 64 lower-case hexadecimal digits");
}

// --- Revoke ---

#[test]
fn revoke_emits_the_trimmed_reason() {
    Framework::with(())
        .given(vec![issued()])
        .when(ApiKeyCommand::Revoke {
            reason: Some(" leaked in a log ".into()),
        })
        .then_expect_events(vec![ApiKeyEvent::ApiKeyRevoked {
            reason: Some("leaked in a log".into()),
        }]);
}

#[test]
fn revoke_rejects_a_missing_key() {
    Framework::with(())
        .given_no_previous_events()
        .when(ApiKeyCommand::Revoke { reason: None })
        .then_expect_error(ApiKeyError::NotFound);
}

#[test]
fn revoke_rejects_a_revoked_key() {
    Framework::with(())
        .given(vec![issued(), revoked()])
        .when(ApiKeyCommand::Revoke { reason: None })
        .then_expect_error_message("the API key is already revoked");
}

#[test]
fn revoke_rejects_a_reason_over_500_characters() {
    Framework::with(())
        .given(vec![issued()])
        .when(ApiKeyCommand::Revoke {
            reason: Some("x".repeat(501)),
        })
        .then_expect_error_message("reason must be at most 500 characters");
}

// --- Rotate ---

#[test]
fn rotate_names_the_previous_prefix() {
    Framework::with(())
        .given(vec![issued()])
        .when(rotate("ll_def456"))
        .then_expect_events(vec![rotated("ll_def456", "ll_abc123")]);
}

#[test]
fn rotate_again_names_the_latest_prefix() {
    Framework::with(())
        .given(vec![issued(), rotated("ll_def456", "ll_abc123")])
        .when(rotate("ll_ghi789"))
        .then_expect_events(vec![rotated("ll_ghi789", "ll_def456")]);
}

#[test]
fn rotate_may_keep_the_previous_secret_working_for_a_while() {
    let until = now() + Duration::hours(24);
    Framework::with(())
        .given(vec![issued()])
        .when(rotate_with_grace("ll_def456", Some(until)))
        .then_expect_events(vec![ApiKeyEvent::ApiKeyRotated {
            prefix: "ll_def456".into(),
            secret_hash: hash('b'),
            previous_prefix: "ll_abc123".into(),
            previous_valid_until: Some(until),
        }]);
}

#[test]
fn rotate_refuses_a_grace_period_past_or_too_long() {
    for until in [
        now(),
        now() - Duration::seconds(1),
        now() + Duration::hours(24) + Duration::seconds(1),
    ] {
        Framework::with(())
            .given(vec![issued()])
            .when(rotate_with_grace("ll_def456", Some(until)))
            .then_expect_error_message(
                "the previous secret's grace period must end in the future and within 24 hours",
            );
    }
}

/// Rotations written before the grace period existed read as rotations without one, and
/// one without it is written with the same fields as they were (stored payloads are hashed
/// as stored and never written again, so this keeps new ones alike, not old ones intact).
#[test]
fn a_rotation_without_a_grace_period_is_written_as_before() {
    let before = serde_json::json!({"ApiKeyRotated": {
        "prefix": "ll_def456", "secret_hash": hash('b'), "previous_prefix": "ll_abc123"}});
    let read: ApiKeyEvent = serde_json::from_value(before.clone()).unwrap();
    assert_eq!(read, rotated("ll_def456", "ll_abc123"));
    assert_eq!(serde_json::to_value(&read).unwrap(), before);
}

#[test]
fn rotate_rejects_a_missing_key() {
    Framework::with(())
        .given_no_previous_events()
        .when(rotate("ll_def456"))
        .then_expect_error(ApiKeyError::NotFound);
}

#[test]
fn rotate_rejects_a_revoked_key() {
    Framework::with(())
        .given(vec![issued(), revoked()])
        .when(rotate("ll_def456"))
        .then_expect_error_message("the API key has been revoked and cannot be rotated");
}

#[test]
fn rotate_rejects_the_current_prefix() {
    Framework::with(())
        .given(vec![issued()])
        .when(rotate("ll_abc123"))
        .then_expect_error(ApiKeyError::PrefixReused);
}

#[test]
fn rotate_rejects_a_retired_prefix() {
    Framework::with(())
        .given(vec![issued(), rotated("ll_def456", "ll_abc123")])
        .when(rotate("ll_abc123"))
        .then_expect_error_message("the new prefix has already been used by this key");
}

#[test]
fn rotate_rejects_a_bad_prefix() {
    Framework::with(())
        .given(vec![issued()])
        .when(rotate(""))
        .then_expect_error_message("prefix must be 1-64 printable ASCII characters without spaces");
}

#[test]
fn rotate_rejects_a_bad_secret_hash() {
    Framework::with(())
        .given(vec![issued()])
        .when(ApiKeyCommand::Rotate {
            prefix: "ll_def456".into(),
            secret_hash: hash('A'),
            previous_valid_until: None,
            now: now(),
        })
        .then_expect_error_message("secret hash must be 64 lower-case hexadecimal digits");
}

// --- State and error mapping ---

#[test]
fn state_follows_the_events() {
    let mut key = ApiKey::default();
    assert_eq!(key.status(), None);
    assert!(!key.is_usable(now()));
    key.apply(ApiKeyEvent::ApiKeyIssued {
        key_id: key_id(),
        organization_id: Some(org_id()),
        user_id: Some(user_id()),
        label: "CI".into(),
        permissions: readers(),
        expires_at: Some(now()),
        prefix: "ll_abc123".into(),
        secret_hash: hash('a'),
        bootstrap: false,
    });
    assert_eq!(key.id(), Some(key_id()));
    assert_eq!(key.organization_id(), Some(org_id()));
    assert_eq!(key.user_id(), Some(user_id()));
    assert_eq!(key.label(), "CI");
    assert_eq!(key.permissions(), &readers());
    assert_eq!(key.expires_at(), Some(now()));
    assert!(!key.is_bootstrap());
    assert!(key.is_usable(now() - Duration::seconds(1)));
    assert!(!key.is_usable(now()));

    key.apply(rotated("ll_def456", "ll_abc123"));
    assert_eq!(key.prefix(), "ll_def456");
    assert_eq!(key.secret_hash(), hash('b'));

    key.apply(revoked());
    assert_eq!(key.status(), Some(ApiKeyStatus::Revoked));
    assert!(!key.is_usable(now() - Duration::seconds(1)));
}

#[test]
fn errors_map_to_rejections() {
    use ApiKeyError as E;
    for e in [E::Invalid("x".into()), E::PlatformAdmin, E::PrefixReused] {
        assert_eq!(e.rejection(), Rejection::Invalid, "{e}");
    }
    assert_eq!(E::NotFound.rejection(), Rejection::NotFound);
    for e in [E::AlreadyExists, E::AlreadyRevoked, E::Revoked] {
        assert_eq!(e.rejection(), Rejection::Conflict, "{e}");
    }
    let escalation = E::Escalation {
        missing: vec![P::KeysWrite],
    };
    assert_eq!(escalation.rejection(), Rejection::Forbidden);
}
