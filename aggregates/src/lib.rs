//! ledgerline's domain: the commands, events and aggregates of the tenant core and messaging, with no I/O.
//!
//! Everything here is pure: cross-aggregate facts (does the parent role exist, what may the
//! caller grant) are looked up by the service layer and handed in with the command.
#![forbid(unsafe_code)]

pub mod api_key;
pub mod claims;
pub mod conversation;
pub mod message;
pub mod metadata;
pub mod organization;
pub mod permissions;
pub mod role;
pub mod sealed;
pub mod user;
pub mod validate;

pub use claims::{claims_for, ClaimOp, CLAIMING_AGGREGATES};
pub use permissions::{Permission, PermissionSet};
pub use sealed::Sealed;

/// The version every event of this crate is written with; bump it (and add an upcaster)
/// when an event's shape changes.
pub const EVENT_VERSION: &str = "1";

/// How the service layer should answer a rejected command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// 422: the input breaks a rule; the same command will never succeed.
    Invalid,
    /// 404: the aggregate does not exist, or no longer does.
    NotFound,
    /// 409: the aggregate's current state does not allow the command.
    Conflict,
    /// 403: the caller would grant more than it holds.
    Forbidden,
}
