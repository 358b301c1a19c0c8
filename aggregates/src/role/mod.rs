//! The Role aggregate: a named set of permissions in one organization, optionally
//! inheriting a parent role's permissions.

mod aggregate;
mod commands;
mod events;

pub use aggregate::{Role, RoleError};
pub use commands::RoleCommand;
pub use events::{RoleEvent, RoleSpec};

#[cfg(test)]
mod tests;
