//! The ledger: the append-only, hash-chained event log and the cqrs-es wiring around it.

pub mod checkpoint;
pub mod checkpoint_row;
mod claim_book;
pub mod claims_check;
mod copy_binary;
pub mod export;
pub mod hash;
mod loader;
pub mod merkle;
pub mod offline;
pub mod standing;
pub mod store;
pub mod tree;
pub mod verify;
mod writer;

pub use store::{AppendError, Appended, Head, LedgerStore};
pub use writer::APPLICATION_NAME as WRITER_APPLICATION_NAME;

/// `n` and its noun, in the singular for one: `1 event`, `0 events`, `2 events`.
pub(crate) fn count(n: impl Into<i128>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}
