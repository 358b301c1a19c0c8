//! The Organization aggregate: a tenant of the platform, its profile and its status.

mod aggregate;
mod commands;
mod events;

pub use aggregate::{Organization, OrganizationError, OrganizationStatus};
pub use commands::OrganizationCommand;
pub use events::{OrganizationEvent, OrganizationProfile};

/// The built-in roles every organization is created with, and their permissions.
pub mod built_in_roles {
    use crate::permissions::{Permission as P, PermissionSet};

    pub const OWNER: &str = "owner";
    pub const NAMES: [&str; 4] = [OWNER, "admin", "member", "auditor"];

    /// The permissions of a built-in role by name; `None` for any other name.
    pub fn permissions(name: &str) -> Option<PermissionSet> {
        let set: &[P] = match name {
            "owner" => &[
                P::OrganizationsRead,
                P::OrganizationsWrite,
                P::UsersRead,
                P::UsersWrite,
                P::UsersErase,
                P::RolesRead,
                P::RolesWrite,
                P::KeysRead,
                P::KeysWrite,
                P::AuditRead,
                P::LedgerRead,
                P::ConversationsRead,
                P::ConversationsWrite,
            ],
            "admin" => &[
                P::OrganizationsRead,
                P::UsersRead,
                P::UsersWrite,
                P::RolesRead,
                P::RolesWrite,
                P::KeysRead,
                P::KeysWrite,
                P::AuditRead,
                P::ConversationsRead,
                P::ConversationsWrite,
            ],
            "member" => &[
                P::OrganizationsRead,
                P::UsersRead,
                P::RolesRead,
                P::ConversationsRead,
                P::ConversationsWrite,
            ],
            "auditor" => &[
                P::OrganizationsRead,
                P::UsersRead,
                P::RolesRead,
                P::KeysRead,
                P::AuditRead,
                P::LedgerRead,
            ],
            _ => return None,
        };
        Some(set.iter().copied().collect())
    }

    pub fn description(name: &str) -> &'static str {
        match name {
            "owner" => "Full control of the organization",
            "admin" => "Manages users, roles, keys and conversations",
            "member" => "Reads the organization's directory and takes part in conversations",
            "auditor" => "Reads audit views and the ledger; issues no command",
            _ => "",
        }
    }

    /// Built-in role ids are derived from the organization id, so that creating them again
    /// after an interrupted organization creation finds the same aggregates.
    pub fn role_id(organization_id: uuid::Uuid, name: &str) -> uuid::Uuid {
        uuid::Uuid::new_v5(
            &organization_id,
            format!("ledgerline:built-in-role:{name}").as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests;
