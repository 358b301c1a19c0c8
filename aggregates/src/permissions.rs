//! The fixed permission catalogue and the subset rule that stops privilege escalation.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One entry of the catalogue. Serialized as its wire name (`users:read`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Permission {
    OrganizationsRead,
    OrganizationsWrite,
    UsersRead,
    UsersWrite,
    UsersErase,
    RolesRead,
    RolesWrite,
    KeysRead,
    KeysWrite,
    AuditRead,
    LedgerRead,
    ConversationsRead,
    ConversationsWrite,
    PlatformAdmin,
}

/// A set of permissions, ordered so that events serialize deterministically.
pub type PermissionSet = BTreeSet<Permission>;

impl Permission {
    pub const ALL: [Permission; 14] = [
        Permission::OrganizationsRead,
        Permission::OrganizationsWrite,
        Permission::UsersRead,
        Permission::UsersWrite,
        Permission::UsersErase,
        Permission::RolesRead,
        Permission::RolesWrite,
        Permission::KeysRead,
        Permission::KeysWrite,
        Permission::AuditRead,
        Permission::LedgerRead,
        Permission::ConversationsRead,
        Permission::ConversationsWrite,
        Permission::PlatformAdmin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::OrganizationsRead => "organizations:read",
            Permission::OrganizationsWrite => "organizations:write",
            Permission::UsersRead => "users:read",
            Permission::UsersWrite => "users:write",
            Permission::UsersErase => "users:erase",
            Permission::RolesRead => "roles:read",
            Permission::RolesWrite => "roles:write",
            Permission::KeysRead => "keys:read",
            Permission::KeysWrite => "keys:write",
            Permission::AuditRead => "audit:read",
            Permission::LedgerRead => "ledger:read",
            Permission::ConversationsRead => "conversations:read",
            Permission::ConversationsWrite => "conversations:write",
            Permission::PlatformAdmin => "platform:admin",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Permission::OrganizationsRead => "Read the organization's profile",
            Permission::OrganizationsWrite => {
                "Update the organization's profile (suspending and reactivating it needs platform:admin)"
            }
            Permission::UsersRead => "List and read users",
            Permission::UsersWrite => "Invite, update, deactivate and reactivate users",
            Permission::UsersErase => "Erase a user's personal data",
            Permission::RolesRead => "List and read roles and role assignments",
            Permission::RolesWrite => "Create, change and delete roles; assign and revoke them",
            Permission::KeysRead => "List and read API keys",
            Permission::KeysWrite => {
                "Issue, revoke and rotate API keys: a user key only its own user's, and a key \
                 revokes or rotates only keys listing no more than it holds (a user key revokes \
                 any of its own user's)"
            }
            Permission::AuditRead => "Read the audit events",
            Permission::LedgerRead => "Read the raw ledger events and hashes",
            Permission::ConversationsRead => {
                "Read conversations and messages: a user key its own, a service key all"
            }
            Permission::ConversationsWrite => {
                "Create and manage conversations; post, edit, delete and react to messages"
            }
            Permission::PlatformAdmin => "Operate the whole platform: every permission everywhere",
        }
    }
}

/// Its wire name, one of the catalogue's: the schema is made from [`Permission::ALL`], so it
/// cannot leave one out.
impl schemars::JsonSchema for Permission {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Permission".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let names: Vec<&str> = Permission::ALL.iter().map(|p| p.as_str()).collect();
        schemars::json_schema!({
            "type": "string",
            "enum": names,
            "description": "A permission of the catalogue, by its wire name"
        })
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown permission `{0}`")]
pub struct UnknownPermission(pub String);

impl FromStr for Permission {
    type Err = UnknownPermission;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Permission::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPermission(s.to_string()))
    }
}

impl TryFrom<String> for Permission {
    type Error = UnknownPermission;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Permission> for String {
    fn from(p: Permission) -> Self {
        p.as_str().to_string()
    }
}

/// Whether `held` may grant every permission in `wanted`. `platform:admin` holds them all.
pub fn may_grant(held: &PermissionSet, wanted: &PermissionSet) -> bool {
    held.contains(&Permission::PlatformAdmin) || wanted.is_subset(held)
}

/// The permissions in `wanted` that `held` may not grant, for error messages.
pub fn missing(held: &PermissionSet, wanted: &PermissionSet) -> Vec<Permission> {
    if held.contains(&Permission::PlatformAdmin) {
        return Vec::new();
    }
    wanted.difference(held).copied().collect()
}

/// Permissions as a comma-separated list of wire names, for error messages.
pub fn list(permissions: &[Permission]) -> String {
    permissions
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Suspending and reactivating an organization needs `platform:admin` (the operator's
    /// act, `api::organizations::operator_act`): the permission to update one must not say it
    /// grants them, and says whose they are.
    #[test]
    fn organizations_write_does_not_promise_suspension() {
        let said = Permission::OrganizationsWrite.description();
        assert!(!said.contains("suspend and reactivate the"), "{said}");
        assert!(said.contains(Permission::PlatformAdmin.as_str()), "{said}");
    }

    /// A user key revokes any key of its own user, whatever that key lists
    /// (`api::api_keys::revoke`): the limit the description states must name that exception.
    #[test]
    fn keys_write_names_the_own_keys_exception() {
        let said = Permission::KeysWrite.description();
        assert!(said.contains("revokes any of its own user's"), "{said}");
    }

    #[test]
    fn wire_names_round_trip() {
        for p in Permission::ALL {
            assert_eq!(p.as_str().parse::<Permission>().unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
        }
        assert!("users:delete".parse::<Permission>().is_err());
    }

    #[test]
    fn platform_admin_may_grant_everything_others_only_subsets() {
        let admin = PermissionSet::from([Permission::PlatformAdmin]);
        let all: PermissionSet = Permission::ALL.into_iter().collect();
        assert!(may_grant(&admin, &all));
        let reader = PermissionSet::from([Permission::UsersRead]);
        assert!(may_grant(
            &reader,
            &PermissionSet::from([Permission::UsersRead])
        ));
        assert!(!may_grant(
            &reader,
            &PermissionSet::from([Permission::UsersWrite])
        ));
        assert_eq!(
            missing(
                &reader,
                &PermissionSet::from([Permission::UsersWrite, Permission::UsersRead])
            ),
            vec![Permission::UsersWrite]
        );
    }
}
