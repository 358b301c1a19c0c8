//! The ledger: the append-only, hash-chained event log and the cqrs-es wiring around it.

mod claim_book;
mod copy_binary;
pub mod hash;
mod loader;
pub mod store;
pub mod verify;
mod writer;

pub use store::{AppendError, Head, LedgerStore};
