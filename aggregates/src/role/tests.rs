//! Given/when/then tests of the Role aggregate: every command's success and every rejection.

use cqrs_es::test::TestFramework;
use cqrs_es::Aggregate;
use uuid::Uuid;

use super::*;
use crate::organization::built_in_roles;
use crate::{Permission as P, PermissionSet, Rejection};

type Framework = TestFramework<Role>;

fn role_id() -> Uuid {
    Uuid::from_u128(30)
}

fn org_id() -> Uuid {
    Uuid::from_u128(1)
}

fn parent_id() -> Uuid {
    Uuid::from_u128(31)
}

fn set(permissions: &[P]) -> PermissionSet {
    permissions.iter().copied().collect()
}

/// What a typical organization admin may grant.
fn admin() -> PermissionSet {
    built_in_roles::permissions("admin").unwrap()
}

fn spec() -> RoleSpec {
    RoleSpec {
        name: "Support".into(),
        description: "Helps customers".into(),
        permissions: set(&[P::UsersRead, P::UsersWrite]),
        parent_role_id: None,
    }
}

fn created() -> RoleEvent {
    RoleEvent::RoleCreated {
        role_id: role_id(),
        organization_id: org_id(),
        spec: spec(),
        built_in: false,
    }
}

fn owner_spec() -> RoleSpec {
    RoleSpec {
        name: "owner".into(),
        description: built_in_roles::description("owner").into(),
        permissions: built_in_roles::permissions("owner").unwrap(),
        parent_role_id: None,
    }
}

fn built_in_created() -> RoleEvent {
    RoleEvent::RoleCreated {
        role_id: role_id(),
        organization_id: org_id(),
        spec: owner_spec(),
        built_in: true,
    }
}

fn deleted() -> RoleEvent {
    RoleEvent::RoleDeleted {
        name: "Support".into(),
    }
}

fn create(name: &str, permissions: PermissionSet, grantable: PermissionSet) -> RoleCommand {
    RoleCommand::Create {
        role_id: role_id(),
        organization_id: org_id(),
        name: name.into(),
        description: "Helps customers".into(),
        permissions,
        parent_role_id: None,
        parent_ancestry: Vec::new(),
        built_in: false,
        grantable,
    }
}

fn update() -> RoleCommand {
    RoleCommand::Update {
        name: None,
        description: None,
        permissions: None,
        parent_role_id: None,
        parent_ancestry: Vec::new(),
        inheriting_levels: 0,
        grantable: admin(),
    }
}

fn update_with(f: impl FnOnce(&mut RoleCommand)) -> RoleCommand {
    let mut command = update();
    f(&mut command);
    command
}

fn rename(to: &str) -> RoleCommand {
    update_with(|c| {
        if let RoleCommand::Update { name, .. } = c {
            *name = Some(to.into());
        }
    })
}

fn set_permissions(to: PermissionSet, by: PermissionSet) -> RoleCommand {
    update_with(|c| {
        if let RoleCommand::Update {
            permissions,
            grantable,
            ..
        } = c
        {
            *permissions = Some(to);
            *grantable = by;
        }
    })
}

fn set_parent(to: Option<Uuid>, ancestry: Vec<Uuid>) -> RoleCommand {
    update_with(|c| {
        if let RoleCommand::Update {
            parent_role_id,
            parent_ancestry,
            ..
        } = c
        {
            *parent_role_id = Some(to);
            *parent_ancestry = ancestry;
        }
    })
}

/// `n` roles, nearest first: an ancestry of `n` levels.
fn ancestry(n: usize) -> Vec<Uuid> {
    (0..n).map(|i| Uuid::from_u128(1000 + i as u128)).collect()
}

fn create_under(ancestry: Vec<Uuid>) -> RoleCommand {
    RoleCommand::Create {
        role_id: role_id(),
        organization_id: org_id(),
        name: "Support".into(),
        description: "Helps customers".into(),
        permissions: PermissionSet::new(),
        parent_role_id: ancestry.first().copied(),
        parent_ancestry: ancestry,
        built_in: false,
        grantable: admin(),
    }
}

fn move_under(ancestry: Vec<Uuid>, below: usize) -> RoleCommand {
    update_with(|c| {
        if let RoleCommand::Update {
            parent_role_id,
            parent_ancestry,
            inheriting_levels,
            ..
        } = c
        {
            *parent_role_id = Some(ancestry.first().copied());
            *parent_ancestry = ancestry;
            *inheriting_levels = below;
        }
    })
}

// --- Create ---

#[test]
fn create_emits_the_normalised_spec() {
    Framework::with(())
        .given_no_previous_events()
        .when(RoleCommand::Create {
            role_id: role_id(),
            organization_id: org_id(),
            name: "  Support ".into(),
            description: " Helps customers ".into(),
            permissions: set(&[P::UsersRead, P::UsersWrite]),
            parent_role_id: None,
            parent_ancestry: Vec::new(),
            built_in: false,
            grantable: admin(),
        })
        .then_expect_events(vec![created()]);
}

#[test]
fn create_with_a_parent_and_no_permissions_of_its_own() {
    Framework::with(())
        .given_no_previous_events()
        .when(RoleCommand::Create {
            role_id: role_id(),
            organization_id: org_id(),
            name: "Support".into(),
            description: String::new(),
            permissions: PermissionSet::new(),
            parent_role_id: Some(parent_id()),
            parent_ancestry: vec![parent_id()],
            built_in: false,
            grantable: set(&[P::RolesWrite]),
        })
        .then_expect_events(vec![RoleEvent::RoleCreated {
            role_id: role_id(),
            organization_id: org_id(),
            spec: RoleSpec {
                description: String::new(),
                permissions: PermissionSet::new(),
                parent_role_id: Some(parent_id()),
                ..spec()
            },
            built_in: false,
        }]);
}

#[test]
fn create_a_built_in_role_as_platform_admin() {
    Framework::with(())
        .given_no_previous_events()
        .when(RoleCommand::Create {
            role_id: role_id(),
            organization_id: org_id(),
            name: "owner".into(),
            description: built_in_roles::description("owner").into(),
            permissions: built_in_roles::permissions("owner").unwrap(),
            parent_role_id: None,
            parent_ancestry: Vec::new(),
            built_in: true,
            grantable: set(&[P::PlatformAdmin]),
        })
        .then_expect_events(vec![built_in_created()]);
}

#[test]
fn create_rejects_an_existing_role() {
    Framework::with(())
        .given(vec![created()])
        .when(create("Other", PermissionSet::new(), admin()))
        .then_expect_error(RoleError::AlreadyExists);
}

#[test]
fn create_rejects_the_id_of_a_deleted_role() {
    Framework::with(())
        .given(vec![created(), deleted()])
        .when(create("Support", PermissionSet::new(), admin()))
        .then_expect_error_message("a role with this id already exists");
}

#[test]
fn create_rejects_a_blank_name() {
    Framework::with(())
        .given_no_previous_events()
        .when(create(" ", PermissionSet::new(), admin()))
        .then_expect_error_message("name must not be empty");
}

#[test]
fn a_role_of_ones_own_cannot_take_a_built_in_name() {
    for name in ["member", "Auditor", "OWNER"] {
        Framework::with(())
            .given_no_previous_events()
            .when(create(name, PermissionSet::new(), admin()))
            .then_expect_error_message(&format!(
                "role name `{}` is reserved for the built-in role",
                name.to_lowercase()
            ));
    }
    Framework::with(())
        .given(vec![created()])
        .when(rename("Admin"))
        .then_expect_error_message("role name `admin` is reserved for the built-in role");
}

#[test]
fn create_rejects_a_long_description() {
    Framework::with(())
        .given_no_previous_events()
        .when(RoleCommand::Create {
            role_id: role_id(),
            organization_id: org_id(),
            name: "Support".into(),
            description: "x".repeat(2001),
            permissions: PermissionSet::new(),
            parent_role_id: None,
            parent_ancestry: Vec::new(),
            built_in: false,
            grantable: admin(),
        })
        .then_expect_error_message("description must be at most 2000 characters");
}

#[test]
fn create_rejects_a_built_in_role_outside_the_catalogue() {
    Framework::with(())
        .given_no_previous_events()
        .when(RoleCommand::Create {
            role_id: role_id(),
            organization_id: org_id(),
            name: "Support".into(),
            description: String::new(),
            permissions: PermissionSet::new(),
            parent_role_id: None,
            parent_ancestry: Vec::new(),
            built_in: true,
            grantable: set(&[P::PlatformAdmin]),
        })
        .then_expect_error_message(
            "a built-in role must be named one of: owner, admin, member, auditor",
        );
}

#[test]
fn create_rejects_a_role_that_is_its_own_parent() {
    Framework::with(())
        .given_no_previous_events()
        .when(RoleCommand::Create {
            role_id: role_id(),
            organization_id: org_id(),
            name: "Support".into(),
            description: String::new(),
            permissions: PermissionSet::new(),
            parent_role_id: Some(role_id()),
            parent_ancestry: Vec::new(),
            built_in: false,
            grantable: admin(),
        })
        .then_expect_error(RoleError::Cycle);
}

#[test]
fn create_rejects_platform_admin_even_from_a_platform_admin() {
    Framework::with(())
        .given_no_previous_events()
        .when(create(
            "Root",
            set(&[P::PlatformAdmin]),
            set(&[P::PlatformAdmin]),
        ))
        .then_expect_error_message("platform:admin cannot be granted in an organization");
}

#[test]
fn create_rejects_permissions_the_author_does_not_hold() {
    Framework::with(())
        .given_no_previous_events()
        .when(create(
            "Support",
            set(&[P::UsersRead, P::UsersErase, P::LedgerRead]),
            admin(),
        ))
        .then_expect_error_message(
            "you cannot grant permissions you do not hold: users:erase, ledger:read",
        );
}

// --- Update ---

#[test]
fn update_carries_the_whole_spec_before_and_after() {
    Framework::with(())
        .given(vec![created()])
        .when(RoleCommand::Update {
            name: Some(" Customer support ".into()),
            description: Some("Answers tickets".into()),
            permissions: Some(set(&[P::UsersRead])),
            parent_role_id: Some(Some(parent_id())),
            parent_ancestry: vec![parent_id(), Uuid::from_u128(32)],
            inheriting_levels: 0,
            grantable: admin(),
        })
        .then_expect_events(vec![RoleEvent::RoleUpdated {
            before: spec(),
            after: RoleSpec {
                name: "Customer support".into(),
                description: "Answers tickets".into(),
                permissions: set(&[P::UsersRead]),
                parent_role_id: Some(parent_id()),
            },
        }]);
}

#[test]
fn update_removes_the_parent() {
    let with_parent = RoleSpec {
        parent_role_id: Some(parent_id()),
        ..spec()
    };
    Framework::with(())
        .given(vec![
            created(),
            RoleEvent::RoleUpdated {
                before: spec(),
                after: with_parent.clone(),
            },
        ])
        // Never too deep, whatever is below: how a chain an older release let grow past the
        // limit is cut.
        .when(move_under(Vec::new(), MAX_INHERITANCE_DEPTH + 1))
        .then_expect_events(vec![RoleEvent::RoleUpdated {
            before: with_parent,
            after: spec(),
        }]);
}

#[test]
fn update_changes_a_built_in_roles_description_and_permissions() {
    let auditor = RoleSpec {
        name: "auditor".into(),
        description: built_in_roles::description("auditor").into(),
        permissions: built_in_roles::permissions("auditor").unwrap(),
        parent_role_id: None,
    };
    let mut fewer = auditor.permissions.clone();
    fewer.remove(&P::LedgerRead);
    Framework::with(())
        .given(vec![RoleEvent::RoleCreated {
            role_id: role_id(),
            organization_id: org_id(),
            spec: auditor.clone(),
            built_in: true,
        }])
        .when(RoleCommand::Update {
            // Restating the name and the parent is not renaming or re-parenting.
            name: Some("auditor".into()),
            description: Some("Reads the audit trail".into()),
            permissions: Some(fewer.clone()),
            parent_role_id: Some(None),
            parent_ancestry: Vec::new(),
            inheriting_levels: 0,
            grantable: owner_spec().permissions,
        })
        .then_expect_events(vec![RoleEvent::RoleUpdated {
            before: auditor.clone(),
            after: RoleSpec {
                description: "Reads the audit trail".into(),
                permissions: fewer,
                ..auditor
            },
        }]);
}

#[test]
fn update_rejects_taking_a_permission_from_the_owner_role() {
    let mut fewer = owner_spec().permissions;
    fewer.remove(&P::LedgerRead);
    Framework::with(())
        .given(vec![built_in_created()])
        .when(set_permissions(fewer, owner_spec().permissions))
        .then_expect_error(RoleError::OwnerNarrowed);
}

#[test]
fn update_gives_the_owner_role_a_permission_back() {
    // An owner role narrowed before the rule (a log may hold one) can be made whole again.
    let mut narrowed = owner_spec();
    narrowed.permissions.remove(&P::LedgerRead);
    Framework::with(())
        .given(vec![RoleEvent::RoleCreated {
            role_id: role_id(),
            organization_id: org_id(),
            spec: narrowed.clone(),
            built_in: true,
        }])
        .when(set_permissions(
            owner_spec().permissions,
            owner_spec().permissions,
        ))
        .then_expect_events(vec![RoleEvent::RoleUpdated {
            before: narrowed,
            after: owner_spec(),
        }]);
}

#[test]
fn update_does_not_check_an_unchanged_permission_set() {
    // The owner role exceeds what an admin holds, yet restating its set grants nothing.
    Framework::with(())
        .given(vec![built_in_created()])
        .when(RoleCommand::Update {
            name: None,
            description: Some("Runs the organization".into()),
            permissions: Some(owner_spec().permissions),
            parent_role_id: None,
            parent_ancestry: Vec::new(),
            inheriting_levels: 0,
            grantable: admin(),
        })
        .then_expect_events(vec![RoleEvent::RoleUpdated {
            before: owner_spec(),
            after: RoleSpec {
                description: "Runs the organization".into(),
                ..owner_spec()
            },
        }]);
}

#[test]
fn update_rejects_a_missing_role() {
    Framework::with(())
        .given_no_previous_events()
        .when(rename("Other"))
        .then_expect_error(RoleError::NotFound);
}

#[test]
fn update_rejects_a_deleted_role() {
    Framework::with(())
        .given(vec![created(), deleted()])
        .when(rename("Other"))
        .then_expect_error_message("the role has been deleted");
}

#[test]
fn update_rejects_invalid_fields() {
    Framework::with(())
        .given(vec![created()])
        .when(rename("a\u{7}b"))
        .then_expect_error_message("name must not contain control characters");
    Framework::with(())
        .given(vec![created()])
        .when(update_with(|c| {
            if let RoleCommand::Update { description, .. } = c {
                *description = Some("x".repeat(2001));
            }
        }))
        .then_expect_error_message("description must be at most 2000 characters");
}

#[test]
fn update_rejects_renaming_a_built_in_role() {
    Framework::with(())
        .given(vec![built_in_created()])
        .when(rename("boss"))
        .then_expect_error_message("built-in roles cannot be renamed");
}

#[test]
fn update_rejects_re_parenting_a_built_in_role() {
    Framework::with(())
        .given(vec![built_in_created()])
        .when(set_parent(Some(parent_id()), vec![parent_id()]))
        .then_expect_error(RoleError::BuiltIn("given another parent"));
}

#[test]
fn update_rejects_platform_admin() {
    Framework::with(())
        .given(vec![created()])
        .when(set_permissions(
            set(&[P::PlatformAdmin]),
            set(&[P::PlatformAdmin]),
        ))
        .then_expect_error(RoleError::PlatformAdmin);
}

#[test]
fn update_rejects_permissions_the_author_does_not_hold() {
    // The whole new set counts: the author lacks users:write, which the role already has.
    Framework::with(())
        .given(vec![created()])
        .when(set_permissions(
            set(&[P::UsersRead, P::UsersWrite, P::RolesRead]),
            set(&[P::UsersRead, P::RolesRead, P::RolesWrite]),
        ))
        .then_expect_error(RoleError::Escalation {
            missing: vec![P::UsersWrite],
        });
}

#[test]
fn update_rejects_the_role_as_its_own_parent() {
    Framework::with(())
        .given(vec![created()])
        .when(set_parent(Some(role_id()), vec![role_id()]))
        .then_expect_error(RoleError::Cycle);
}

#[test]
fn update_rejects_a_parent_that_descends_from_the_role() {
    Framework::with(())
        .given(vec![created()])
        .when(set_parent(Some(parent_id()), vec![parent_id(), role_id()]))
        .then_expect_error_message(
            "a role cannot inherit from itself, directly or through its parents",
        );
}

#[test]
fn create_under_a_parent_at_the_depth_limit() {
    let parent = ancestry(MAX_INHERITANCE_DEPTH);
    Framework::with(())
        .given_no_previous_events()
        .when(create_under(parent.clone()))
        .then_expect_events(vec![RoleEvent::RoleCreated {
            role_id: role_id(),
            organization_id: org_id(),
            spec: RoleSpec {
                permissions: PermissionSet::new(),
                parent_role_id: Some(parent[0]),
                ..spec()
            },
            built_in: false,
        }]);
}

#[test]
fn create_rejects_a_parent_past_the_depth_limit() {
    // One past the limit is as far as the service walks: the same answer for any longer.
    Framework::with(())
        .given_no_previous_events()
        .when(create_under(ancestry(MAX_INHERITANCE_DEPTH + 1)))
        .then_expect_error(RoleError::TooDeep {
            limit: MAX_INHERITANCE_DEPTH,
        });
}

#[test]
fn update_counts_the_roles_below_against_the_depth_limit() {
    // Two levels inherit from the role: the new parent's ancestry may be the limit less two.
    Framework::with(())
        .given(vec![created()])
        .when(move_under(ancestry(MAX_INHERITANCE_DEPTH - 1), 2))
        .then_expect_error(RoleError::TooDeep {
            limit: MAX_INHERITANCE_DEPTH,
        });
    let fits = ancestry(MAX_INHERITANCE_DEPTH - 2);
    Framework::with(())
        .given(vec![created()])
        .when(move_under(fits.clone(), 2))
        .then_expect_events(vec![RoleEvent::RoleUpdated {
            before: spec(),
            after: RoleSpec {
                parent_role_id: Some(fits[0]),
                ..spec()
            },
        }]);
}

#[test]
fn update_finds_a_cycle_before_the_depth() {
    // The role at the end of a walk cut at the limit: a cycle, whatever the depth.
    let mut long = ancestry(MAX_INHERITANCE_DEPTH);
    long.push(role_id());
    Framework::with(())
        .given(vec![created()])
        .when(move_under(long, 3))
        .then_expect_error(RoleError::Cycle);
}

#[test]
fn update_rejects_an_update_that_changes_nothing() {
    Framework::with(())
        .given(vec![created()])
        .when(update())
        .then_expect_error(RoleError::NoChange);
    Framework::with(())
        .given(vec![created()])
        .when(RoleCommand::Update {
            name: Some(" Support ".into()),
            description: Some("Helps customers".into()),
            permissions: Some(spec().permissions),
            parent_role_id: Some(None),
            parent_ancestry: Vec::new(),
            inheriting_levels: 0,
            grantable: admin(),
        })
        .then_expect_error_message("nothing to change: the update leaves the role as it is");
}

// --- Delete ---

#[test]
fn delete_releases_the_current_name() {
    let renamed = RoleSpec {
        name: "Helpdesk".into(),
        ..spec()
    };
    Framework::with(())
        .given(vec![
            created(),
            RoleEvent::RoleUpdated {
                before: spec(),
                after: renamed,
            },
        ])
        .when(RoleCommand::Delete)
        .then_expect_events(vec![RoleEvent::RoleDeleted {
            name: "Helpdesk".into(),
        }]);
}

#[test]
fn delete_rejects_a_missing_role() {
    Framework::with(())
        .given_no_previous_events()
        .when(RoleCommand::Delete)
        .then_expect_error(RoleError::NotFound);
}

#[test]
fn delete_rejects_a_deleted_role() {
    Framework::with(())
        .given(vec![created(), deleted()])
        .when(RoleCommand::Delete)
        .then_expect_error(RoleError::Deleted);
}

#[test]
fn delete_rejects_a_built_in_role() {
    Framework::with(())
        .given(vec![built_in_created()])
        .when(RoleCommand::Delete)
        .then_expect_error_message("built-in roles cannot be deleted");
}

// --- State and error mapping ---

#[test]
fn state_follows_the_events() {
    let mut role = Role::default();
    assert!(role.spec().is_none());
    role.apply(created());
    assert_eq!(role.id(), Some(role_id()));
    assert_eq!(role.organization_id(), Some(org_id()));
    assert_eq!(role.spec(), Some(&spec()));
    assert!(!role.is_built_in());
    role.apply(deleted());
    assert!(role.is_deleted());
    assert!(role.spec().is_none());
}

#[test]
fn errors_map_to_rejections() {
    use RoleError as E;
    for e in [
        E::Invalid("x".into()),
        E::PlatformAdmin,
        E::Cycle,
        E::TooDeep { limit: 16 },
        E::NoChange,
    ] {
        assert_eq!(e.rejection(), Rejection::Invalid, "{e}");
    }
    assert_eq!(E::NotFound.rejection(), Rejection::NotFound);
    assert_eq!(E::Deleted.rejection(), Rejection::NotFound);
    assert_eq!(E::AlreadyExists.rejection(), Rejection::Conflict);
    assert_eq!(E::BuiltIn("deleted").rejection(), Rejection::Conflict);
    let escalation = E::Escalation {
        missing: vec![P::UsersErase],
    };
    assert_eq!(escalation.rejection(), Rejection::Forbidden);
}

/// The ledger store refuses a role holder's command in flight by these names (`metadata`):
/// every event of a role after its creation, so that a new event of a role, or a rename of
/// one, must not quietly let a narrowed role's requests through.
#[test]
fn the_events_that_refuse_a_role_holders_requests_in_flight_are_named_as_recorded() {
    let updated = RoleEvent::RoleUpdated {
        before: spec(),
        after: spec(),
    };
    // No wildcard: a new event of a role does not compile here until it is placed.
    let after_creation = |e: &RoleEvent| match e {
        RoleEvent::RoleCreated { .. } => false,
        RoleEvent::RoleUpdated { .. } | RoleEvent::RoleDeleted { .. } => true,
    };
    let names: Vec<String> = [created(), updated, deleted()]
        .iter()
        .filter(|e| after_creation(e))
        .map(cqrs_es::DomainEvent::event_type)
        .collect();
    assert_eq!(names, crate::metadata::ACTOR_ROLE_LOSSES);
}
