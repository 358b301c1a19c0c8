//! The Role aggregate's state, the rules its commands must pass, and its errors.

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{RoleCommand, RoleEvent, RoleSpec, MAX_INHERITANCE_DEPTH};
use crate::organization::built_in_roles;
use crate::permissions::{self, Permission, PermissionSet};
use crate::{validate, Rejection};

/// A role as rebuilt from its events. Every field is empty until it is created.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Role {
    id: Option<Uuid>,
    organization_id: Option<Uuid>,
    spec: Option<RoleSpec>,
    built_in: bool,
    deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("a role with this id already exists")]
    AlreadyExists,
    #[error("the role does not exist")]
    NotFound,
    #[error("the role has been deleted")]
    Deleted,
    /// A field broke an input rule; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("platform:admin cannot be granted in an organization")]
    PlatformAdmin,
    #[error("you cannot grant permissions you do not hold: {}", permissions::list(.missing))]
    Escalation { missing: Vec<Permission> },
    #[error("a role cannot inherit from itself, directly or through its parents")]
    Cycle,
    #[error(
        "a role may have at most {limit} levels of ancestors (parent, grandparent, ...): with \
         this parent a chain of inheritance would be deeper"
    )]
    TooDeep { limit: usize },
    /// What a built-in role cannot be: `renamed`, `given another parent`, `deleted`.
    #[error("built-in roles cannot be {0}")]
    BuiltIn(&'static str),
    #[error("the owner role cannot lose a permission: it keeps the organization governable")]
    OwnerNarrowed,
    #[error("nothing to change: the update leaves the role as it is")]
    NoChange,
}

impl RoleError {
    pub fn rejection(&self) -> Rejection {
        match self {
            Self::Invalid(_)
            | Self::PlatformAdmin
            | Self::Cycle
            | Self::TooDeep { .. }
            | Self::NoChange => Rejection::Invalid,
            Self::NotFound | Self::Deleted => Rejection::NotFound,
            Self::AlreadyExists | Self::BuiltIn(_) | Self::OwnerNarrowed => Rejection::Conflict,
            Self::Escalation { .. } => Rejection::Forbidden,
        }
    }
}

impl Role {
    pub fn id(&self) -> Option<Uuid> {
        self.id
    }

    pub fn organization_id(&self) -> Option<Uuid> {
        self.organization_id
    }

    /// What the role says; `None` before creation and after deletion, so a deleted role
    /// can never be read as granting anything.
    pub fn spec(&self) -> Option<&RoleSpec> {
        self.spec.as_ref().filter(|_| !self.deleted)
    }

    pub fn is_built_in(&self) -> bool {
        self.built_in
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted
    }

    /// The spec of a role that may still be acted on.
    fn live(&self) -> Result<&RoleSpec, RoleError> {
        match &self.spec {
            None => Err(RoleError::NotFound),
            Some(_) if self.deleted => Err(RoleError::Deleted),
            Some(spec) => Ok(spec),
        }
    }

    /// Every command yields exactly one event or none, so the rules live in this plain
    /// function and `handle` only writes its answer.
    fn decide(&self, command: RoleCommand) -> Result<RoleEvent, RoleError> {
        match command {
            RoleCommand::Create {
                role_id,
                organization_id,
                name,
                description,
                permissions,
                parent_role_id,
                parent_ancestry,
                built_in,
                grantable,
            } => {
                // A deleted role's id stays taken: its history must not run on as another role.
                if self.id.is_some() {
                    return Err(RoleError::AlreadyExists);
                }
                let name = invalid(validate::name("name", &name))?;
                if built_in && !built_in_roles::NAMES.contains(&name.as_str()) {
                    return Err(RoleError::Invalid(format!(
                        "a built-in role must be named one of: {}",
                        built_in_roles::NAMES.join(", ")
                    )));
                }
                if !built_in {
                    not_a_built_in_name(&name)?;
                }
                let description = invalid(validate::description(&description))?;
                if let Some(parent) = parent_role_id {
                    check_parent(role_id, parent, &parent_ancestry, 0)?;
                }
                check_grantable(&grantable, &permissions)?;
                Ok(RoleEvent::RoleCreated {
                    role_id,
                    organization_id,
                    spec: RoleSpec {
                        name,
                        description,
                        permissions,
                        parent_role_id,
                    },
                    built_in,
                })
            }
            RoleCommand::Update {
                name,
                description,
                permissions,
                parent_role_id,
                parent_ancestry,
                inheriting_levels,
                grantable,
            } => {
                let before = self.live()?;
                let mut after = before.clone();
                if let Some(name) = name {
                    after.name = invalid(validate::name("name", &name))?;
                    if !self.built_in && after.name != before.name {
                        not_a_built_in_name(&after.name)?;
                    }
                }
                if let Some(description) = description {
                    after.description = invalid(validate::description(&description))?;
                }
                if let Some(parent) = parent_role_id {
                    // Checked even when the parent stays: the ancestry may have changed since.
                    if let Some(parent) = parent {
                        let own = self.id.unwrap_or_default();
                        check_parent(own, parent, &parent_ancestry, inheriting_levels)?;
                    }
                    after.parent_role_id = parent;
                }
                // Built-in roles are found by name and parentage by the rest of the system;
                // restating the current value is not a change, so PUT-style clients pass.
                if self.built_in && after.name != before.name {
                    return Err(RoleError::BuiltIn("renamed"));
                }
                if self.built_in && after.parent_role_id != before.parent_role_id {
                    return Err(RoleError::BuiltIn("given another parent"));
                }
                if let Some(permissions) = permissions {
                    // Only a changed set is checked, and then as a whole: whoever changes
                    // what a role grants must hold all of it, before and after (taking a
                    // permission away from its holders is no lesser act than giving it),
                    // while restating the set alongside a new description grants nothing new.
                    if permissions != before.permissions {
                        check_grantable(&grantable, &permissions)?;
                        check_grantable(&grantable, &before.permissions)?;
                    }
                    after.permissions = permissions;
                }
                // The owner role is what keeps an organization governable: it may gain a
                // permission (a new one, say) but lose none.
                if self.built_in
                    && before.name == built_in_roles::OWNER
                    && !after.permissions.is_superset(&before.permissions)
                {
                    return Err(RoleError::OwnerNarrowed);
                }
                // An update that changes nothing would put a meaningless entry in the ledger.
                if after == *before {
                    return Err(RoleError::NoChange);
                }
                Ok(RoleEvent::RoleUpdated {
                    before: before.clone(),
                    after,
                })
            }
            RoleCommand::Delete => {
                let spec = self.live()?;
                if self.built_in {
                    return Err(RoleError::BuiltIn("deleted"));
                }
                Ok(RoleEvent::RoleDeleted {
                    name: spec.name.clone(),
                })
            }
        }
    }
}

/// Role `own` may take `parent` (whose ancestry is `ancestry`, the parent first) when it
/// does not descend from `own` and no chain through `own`, with `below` levels of roles
/// inheriting from it, gets deeper than the limit. The ancestry is walked to one past the
/// limit at most: when it is that long the role is refused for depth, so within the limit
/// the cycle check saw every ancestor.
fn check_parent(own: Uuid, parent: Uuid, ancestry: &[Uuid], below: usize) -> Result<(), RoleError> {
    if parent == own || ancestry.contains(&own) {
        return Err(RoleError::Cycle);
    }
    // The parent brings `ancestry.len()` ancestors to the role and to each role below it.
    if ancestry.len().max(1) + below > MAX_INHERITANCE_DEPTH {
        return Err(RoleError::TooDeep {
            limit: MAX_INHERITANCE_DEPTH,
        });
    }
    Ok(())
}

/// A built-in role's name (in any case, as names are unique) is its own: a role of one's own
/// taking it would read as the built-in role, and keep an organization whose creation was cut
/// off before that role from ever getting it (`complete_interrupted` makes it by name).
fn not_a_built_in_name(name: &str) -> Result<(), RoleError> {
    let folded = name.to_lowercase();
    match built_in_roles::NAMES.iter().find(|n| **n == folded) {
        Some(n) => Err(RoleError::Invalid(format!(
            "role name `{n}` is reserved for the built-in role"
        ))),
        None => Ok(()),
    }
}

fn invalid<T>(result: Result<T, String>) -> Result<T, RoleError> {
    result.map_err(RoleError::Invalid)
}

/// A role lives in one organization, so it may never carry the platform's power, and it may
/// not grant more than its author holds.
fn check_grantable(grantable: &PermissionSet, wanted: &PermissionSet) -> Result<(), RoleError> {
    if wanted.contains(&Permission::PlatformAdmin) {
        return Err(RoleError::PlatformAdmin);
    }
    if !permissions::may_grant(grantable, wanted) {
        return Err(RoleError::Escalation {
            missing: permissions::missing(grantable, wanted),
        });
    }
    Ok(())
}

impl Aggregate for Role {
    const TYPE: &'static str = "Role";
    type Command = RoleCommand;
    type Event = RoleEvent;
    type Error = RoleError;
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
            RoleEvent::RoleCreated {
                role_id,
                organization_id,
                spec,
                built_in,
            } => {
                self.id = Some(role_id);
                self.organization_id = Some(organization_id);
                self.spec = Some(spec);
                self.built_in = built_in;
            }
            RoleEvent::RoleUpdated { after, .. } => self.spec = Some(after),
            RoleEvent::RoleDeleted { .. } => self.deleted = true,
        }
    }
}
