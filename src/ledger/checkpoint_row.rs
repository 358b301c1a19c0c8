//! A `checkpoints` row as stored: the signed note, and beside it the columns `tree_size`,
//! `root`, `chain_head` and `signed_at`, which nothing signs and anyone who can write the
//! database can set. Whoever shows or compares what a checkpoint says (the API, the metrics,
//! `verify`) takes it from the note and names the columns that disagree with it.

use chrono::{DateTime, Utc};

use super::checkpoint::{Checkpoint, NoteError};

/// The columns of a [`CheckpointRow`], for a `SELECT ... FROM checkpoints`. A `signed_at`
/// that `DateTime` cannot hold (`infinity`: only an edit stores it) is read as NULL, as
/// decoding it would panic.
pub const COLUMNS: &str = "tree_size, root, chain_head, CASE WHEN isfinite(signed_at) \
     AND signed_at < '262143-01-01 00:00:00+00' THEN signed_at END AS signed_at, note";

/// Every name [`CheckpointRow::mismatch`] can give: the columns a note signs a value of, and
/// `note` for a note that is no readable checkpoint.
pub const MISMATCH_NAMES: [&str; 5] = ["tree_size", "root", "chain_head", "signed_at", "note"];

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CheckpointRow {
    /// The table's key: rows are ordered, paged and named by it, whatever the note says.
    pub tree_size: i64,
    pub root: Vec<u8>,
    pub chain_head: Vec<u8>,
    /// `None`: a time no signer stores.
    pub signed_at: Option<DateTime<Utc>>,
    /// The signed note, as signed.
    pub note: String,
}

impl CheckpointRow {
    /// The columns that are not what `signed` (this row's note, parsed or opened) says.
    pub fn differs_from(&self, signed: &Checkpoint) -> Vec<&'static str> {
        [
            (
                "tree_size",
                i64::try_from(signed.tree_size) != Ok(self.tree_size),
            ),
            ("root", self.root != signed.root),
            ("chain_head", self.chain_head != signed.chain_head),
            ("signed_at", self.signed_at != Some(signed.time)),
        ]
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect()
    }

    /// What the note says, its signature not checked (the reader who relies on it opens the
    /// note with the log's key), and the names of what disagrees with it: the columns, or
    /// `note` alone when the note is no readable checkpoint (nothing then says more than
    /// the columns, which nothing signs).
    pub fn read(&self) -> (Result<Checkpoint, NoteError>, Vec<&'static str>) {
        let read = Checkpoint::parse_unverified(&self.note).and_then(|cp| {
            // Positions are `bigint`s: a larger size is no checkpoint of this log.
            match i64::try_from(cp.tree_size) {
                Ok(_) => Ok(cp),
                Err(_) => Err(NoteError::Malformed(
                    "the tree size is past any position".into(),
                )),
            }
        });
        let mismatch = match &read {
            Ok(signed) => self.differs_from(signed),
            Err(_) => vec!["note"],
        };
        (read, mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::checkpoint::{tests::checkpoint, LogSigner};

    fn stored() -> (Checkpoint, CheckpointRow) {
        let cp = checkpoint();
        let note = LogSigner::generate(&cp.origin).unwrap().sign(&cp);
        let row = CheckpointRow {
            tree_size: 42,
            root: cp.root.to_vec(),
            chain_head: cp.chain_head.to_vec(),
            signed_at: Some(cp.time),
            note,
        };
        (cp, row)
    }

    #[test]
    fn a_row_is_read_from_its_note_and_names_each_column_that_differs() {
        let (cp, row) = stored();
        assert_eq!(row.read(), (Ok(cp.clone()), vec![]));
        let edited = CheckpointRow {
            tree_size: 43,
            root: vec![0; 32],
            chain_head: vec![1; 31],
            signed_at: None,
            ..row.clone()
        };
        assert_eq!(
            edited.read(),
            (Ok(cp), MISMATCH_NAMES[..4].to_vec()),
            "the note's values, whatever the columns say"
        );
        let garbled = CheckpointRow {
            note: "not a note".into(),
            ..row
        };
        let (read, mismatch) = garbled.read();
        assert!(read.is_err());
        assert_eq!(mismatch, vec!["note"]);
    }
}
