//! The ledger: the append-only, hash-chained event log and the cqrs-es wiring around it.

pub mod checkpoint;
mod claim_book;
pub mod claims_check;
mod copy_binary;
pub mod export;
pub mod hash;
mod loader;
pub mod merkle;
pub mod offline;
pub mod store;
pub mod tree;
pub mod verify;
mod writer;

pub use store::{AppendError, Head, LedgerStore};
pub use writer::APPLICATION_NAME as WRITER_APPLICATION_NAME;
