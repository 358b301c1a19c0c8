//! The Role aggregate: a named set of permissions in one organization, optionally
//! inheriting a parent role's permissions.

mod aggregate;
mod commands;
mod events;

pub use aggregate::{Role, RoleError};
pub use commands::RoleCommand;
pub use events::{RoleEvent, RoleSpec};

/// The most ancestors a role may have (parent, grandparent, ...): a parent change or a
/// creation that would make any chain of inheritance deeper is refused. Kept short so that
/// the walks resolving inheritance are cheap and the cycle check, which walks the new
/// parent's ancestors, sees every one of them.
pub const MAX_INHERITANCE_DEPTH: usize = 16;

#[cfg(test)]
mod tests;
