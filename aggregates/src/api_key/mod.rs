//! The API key aggregate: a credential of a user or a service, identified by a visible
//! prefix and stored only as the hash of its secret.

mod aggregate;
mod commands;
mod events;

pub use aggregate::{ApiKey, ApiKeyError, ApiKeyStatus, MAX_ROTATION_GRACE};
pub use commands::ApiKeyCommand;
pub use events::ApiKeyEvent;

#[cfg(test)]
mod tests;
