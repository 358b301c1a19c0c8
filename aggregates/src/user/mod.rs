//! The User aggregate: a member of one organization, its sealed profile, status and roles.

mod aggregate;
mod commands;
mod events;

pub use aggregate::{RoleAssignment, User, UserError, UserStatus};
pub use commands::{SealedEmail, SealedProfile, UserCommand};
pub use events::UserEvent;

#[cfg(test)]
mod tests;
