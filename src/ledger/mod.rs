//! The ledger: the append-only, hash-chained event log and the cqrs-es wiring around it.

pub mod hash;
pub mod store;
pub mod verify;

pub use store::{AppendError, Head, LedgerStore};
