//! Offline verification of an export file (`export.rs`, docs/ledger-format.md "Export
//! files"): no database, no server. Every full event's hash (and every v2 stub's) is
//! recomputed from its fields and the previous hash, never taken from the file; links and
//! positions are checked as the database verifier checks them; in an organization's export,
//! only that organization's events may be in full and no v2 stub may carry its tag; and,
//! given a signed checkpoint, its signature is checked, the file's chain head and Merkle root
//! at the checkpoint's size must be the signed ones, and each line's hash format the one it
//! signs.
//!
//! The file is read in blocks of [`BLOCK`] bytes, each cut at line boundaries into pieces that
//! the workers take from a queue and check on their own: parse (`line.rs`: borrowed, no
//! allocation per field), hash, check positions and links within the piece, and build the
//! piece's Merkle subtrees. This thread reads ahead and joins the pieces' results in file
//! order: the positions and links between pieces, the first fault, the Merkle frontier. The
//! result is that of a sequential walk. Memory: at most three blocks (each with the start of
//! a line the block before cut, which [`LINE_LIMIT`] bounds) and the pieces' results,
//! whatever the file's size.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::checkpoint::{Checkpoint, NoteError, NoteVerifier};
use super::count;
use super::export::{ExportHeader, FORMAT, VERSION};
use super::hash::{self, FormatRun, HashVersion, GENESIS};
use super::merkle::{Blake3, Digest, Frontier};
use super::verify::{out_of_place, Fault};

mod line;
use line::Parsed;

/// Bytes read at a time.
pub const BLOCK: usize = 8 << 20;
/// Each block is cut into this many pieces (at least one per worker), which the workers
/// take from a queue.
const PIECES_PER_BLOCK: usize = 8;
/// A header longer than this is malformed (a real one is under 5 KiB).
const HEADER_LIMIT: u64 = 1 << 20;
/// An event line longer than this (without its newline) is malformed, so that one line
/// cannot make the reader hold more than this and a block. The longest line the API can make
/// is under 8 MiB: a request body is at most 1 MiB, an organization's update carries its
/// settings twice (before and after), and re-serialized numbers grow at most about fourfold
/// (`1e15` is stored as `1000000000000000.0`); docs/ledger-format.md, "Export files".
pub const LINE_LIMIT: usize = 16 << 20;
/// How far around a position to look for where a moved event was written (as `verify`).
const REORDER_WINDOW: i64 = 4096;

/// What is wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFault {
    /// The first bad position (`None` for a fault of the header or of the checkpoint itself).
    pub position: Option<i64>,
    /// The file's line (1 is the header), when the fault is on a line.
    pub line: Option<u64>,
    pub kind: FileFaultKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileFaultKind {
    /// A fault of the chain, as the database verifier names it.
    Chain(Fault),
    /// The header is not an export header this verifier reads.
    MalformedHeader(String),
    /// The line is not an event or stub line.
    MalformedLine(String),
    /// The line is empty or only whitespace: the exporter writes none (every line ends in one
    /// newline), so it was added or emptied.
    BlankLine,
    /// A v2 stub whose tenant tag is the header organization's: one of its own events was
    /// left out of the file.
    OwnEventAsStub,
    /// A full event of another tenant (`None`: a platform event) in the export of one
    /// organization, whose events alone are in full: the file is not that organization's
    /// export (a header naming another organization would let its own events pass as
    /// stubs whose tags are not the header's).
    OtherTenantInFull {
        tenant: Option<Uuid>,
        organization: Uuid,
    },
    /// The header names another organization (`None`: every organization) than the one
    /// whose export the auditor asked to verify.
    OrganizationNotAsked { asked: Uuid, file: Option<Uuid> },
    /// A line in another hash format than the checkpoint signs for its position: a v2 event
    /// passed off as v1 (whose stub shows nothing of whose it is), or the other way round.
    HashVersionNotAsSigned {
        v2_from: Option<u64>,
        tree_size: u64,
    },
    /// The checkpoint is not signed by the trusted key (forged or altered), or unreadable.
    Checkpoint(NoteError),
    /// The checkpoint names another log than the export's header.
    OriginMismatch { export: String, checkpoint: String },
    /// The file's hash at the checkpoint's size is not the signed chain head.
    ChainHeadMismatch { tree_size: u64 },
    /// The Merkle root of the file's events at the checkpoint's size is not the signed root.
    RootMismatch { tree_size: u64 },
    /// The export ends before the checkpoint's size.
    Truncated { tree_size: u64 },
}

impl std::fmt::Display for FileFaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileFaultKind::Chain(fault) => fault.fmt(f),
            FileFaultKind::MalformedHeader(m) => write!(f, "malformed header: {m}"),
            FileFaultKind::MalformedLine(m) => write!(f, "malformed line: {m}"),
            FileFaultKind::BlankLine => f.write_str("blank line"),
            FileFaultKind::OwnEventAsStub => f.write_str(
                "an event of the exported organization is left out: this stub's tenant tag \
                 is the organization's own",
            ),
            FileFaultKind::OtherTenantInFull {
                tenant,
                organization,
            } => {
                match tenant {
                    Some(t) => write!(f, "an event of organization {t} in full")?,
                    None => f.write_str("a platform event (of no organization) in full")?,
                }
                write!(
                    f,
                    ", in the export of organization {organization}, whose events alone are in \
                     full"
                )
            }
            FileFaultKind::OrganizationNotAsked { asked, file } => {
                match file {
                    Some(o) => write!(f, "the export is of organization {o}")?,
                    None => f.write_str("the export is of every organization")?,
                }
                write!(
                    f,
                    ", not of organization {asked}, whose export was asked for"
                )
            }
            FileFaultKind::HashVersionNotAsSigned { v2_from, tree_size } => match v2_from {
                // No v1 event comes before position 1: the log was v2 from its start.
                Some(1) => f.write_str(
                    "hash version not as signed: the checkpoint signs every event as v2",
                ),
                Some(p) => write!(
                    f,
                    "hash version not as signed: the checkpoint signs v1 events before position \
                     {p} and v2 events from it"
                ),
                None => write!(
                    f,
                    "hash version not as signed: the checkpoint signs only v1 events up to \
                     position {tree_size}"
                ),
            },
            FileFaultKind::Checkpoint(e) => write!(f, "checkpoint refused: {e}"),
            FileFaultKind::OriginMismatch { export, checkpoint } => write!(
                f,
                "the checkpoint is of log `{checkpoint}`, the export of log `{export}`"
            ),
            FileFaultKind::ChainHeadMismatch { tree_size } => write!(
                f,
                "chain head mismatch: the hash at position {tree_size} is not the checkpoint's"
            ),
            FileFaultKind::RootMismatch { tree_size } => write!(
                f,
                "Merkle root mismatch: the root of the first {tree_size} events is not the \
                 checkpoint's"
            ),
            FileFaultKind::Truncated { tree_size } => write!(
                f,
                "truncated: the export ends before the checkpoint's size {tree_size}, so \
                 events it signed are not in the file (to check a range cut short on purpose, \
                 `export --to` or `?to=`, use a checkpoint within it, or export through \
                 position {tree_size} or later)"
            ),
        }
    }
}

impl std::fmt::Display for FileFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.position, self.line) {
            (Some(p), Some(l)) => write!(f, "position {p} (line {l}): {}", self.kind),
            (Some(p), None) => write!(f, "position {p}: {}", self.kind),
            (None, Some(l)) => write!(f, "line {l}: {}", self.kind),
            (None, None) => self.kind.fmt(f),
        }
    }
}

#[derive(Debug, Clone)]
pub struct OfflineReport {
    /// The header, if it could be read.
    pub header: Option<ExportHeader>,
    /// Event lines in the file (after the header).
    pub lines: u64,
    /// Full events and stubs checked (up to the first fault).
    pub full_events: u64,
    pub stubs: u64,
    /// Of the stubs, those of v1 events: a hash alone, which shows nothing of whose it is.
    pub v1_stubs: u64,
    /// The last position checked good and its hash (the header's `from - 1` and `prev_hash`
    /// when none was).
    pub head_position: i64,
    pub head_hash: Digest,
    /// The checkpoint, once its signature verified.
    pub checkpoint: Option<Checkpoint>,
    /// The file's Merkle root at the checkpoint's size, when it was computed.
    pub root: Option<Digest>,
    pub first_bad: Option<FileFault>,
    pub elapsed: Duration,
}

impl OfflineReport {
    pub fn intact(&self) -> bool {
        self.first_bad.is_none()
    }
    /// Event lines per second.
    pub fn rate(&self) -> f64 {
        self.lines as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// The export matched a checkpoint: intact, and its chain head and root are the signed ones.
    pub fn matches_checkpoint(&self) -> bool {
        self.intact() && self.checkpoint.is_some()
    }
    /// When the fault is the checkpoint comparison's (the file's chain head, root or length
    /// at the checkpoint's size) rather than the chain's: the position the chain checked out
    /// through.
    fn against_checkpoint(&self) -> Option<i64> {
        let bad = self.first_bad.as_ref()?;
        match bad.kind {
            FileFaultKind::ChainHeadMismatch { .. } | FileFaultKind::RootMismatch { .. } => {
                bad.position
            }
            FileFaultKind::Truncated { .. } => bad.position.map(|p| p - 1),
            _ => None,
        }
    }

    /// The first position past the checkpoint's size, when the export goes on beyond it:
    /// those events only chain to the signed prefix, and anyone can make a chain.
    pub fn unsigned_from(&self) -> Option<i64> {
        let size = i64::try_from(self.checkpoint.as_ref()?.tree_size).ok()?;
        (self.head_position > size).then_some(size + 1)
    }
}

impl std::fmt::Display for OfflineReport {
    /// One line: `intact: ...`, `TAMPERED: first bad position ...` or `FORGED: ...`, as
    /// `ledgerline verify` (and `verify --since`) says them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let stubs = count(self.stubs, "stub", "stubs");
        let counts = if self.intact() {
            format!(
                "{} ({} full, {stubs}) read in {secs:.3}s, {:.0} events/s",
                count(self.lines, "event", "events"),
                self.full_events,
                self.rate()
            )
        } else if let Some(through) = self.against_checkpoint() {
            // The chain checked out; what failed is its match with the checkpoint, at the
            // checkpoint's size: no event "before the fault" is the right count.
            format!(
                "{} read in {secs:.3}s; the chain checked out through position {through}, but \
                 does not match the checkpoint",
                count(self.lines, "line", "lines"),
            )
        } else {
            // Lines past the fault are read but not checked: the two counts differ.
            format!(
                "{} read in {secs:.3}s; {} before the fault checked out: {} full, {stubs}",
                count(self.lines, "line", "lines"),
                count(self.full_events + self.stubs, "event", "events"),
                self.full_events,
            )
        };
        match &self.first_bad {
            None => {
                write!(f, "intact: {counts}; ")?;
                // What the file vouches for: an auditor sees which organization and range
                // checked out, not only that something did.
                if let Some(h) = &self.header {
                    write!(f, "{}; ", Covers(h))?;
                }
                write!(
                    f,
                    "head position {} hash {}",
                    self.head_position,
                    hex::encode(self.head_hash)
                )?;
                if let Some(cp) = &self.checkpoint {
                    write!(
                        f,
                        "; matches the checkpoint of `{}` at size {} (root {})",
                        cp.origin,
                        cp.tree_size,
                        hex::encode(cp.root)
                    )?;
                    if let Some(first) = self.unsigned_from() {
                        write!(
                            f,
                            "; positions {first} to {} are past it: they extend the signed \
                             prefix, but no signature vouches for them (check them against \
                             a later checkpoint)",
                            self.head_position
                        )?;
                    }
                } else {
                    // What the chain alone cannot show (docs/ledger-format.md, section 5).
                    f.write_str(
                        "; checked against no checkpoint: a file cut short, or rewritten with \
                         every hash recomputed, reads as intact too (pass --checkpoint)",
                    )?;
                }
                if self.stubs > self.v1_stubs {
                    // A tag is authenticated only as far as a signed checkpoint covers it: past
                    // that, a rewritten file could put any tag on one of the organization's own.
                    let covered = self.matches_checkpoint() && self.unsigned_from().is_none();
                    let n = self.stubs - self.v1_stubs;
                    let (are, s, they_are, them) = if n == 1 {
                        ("is a stub", "", "it is", "it")
                    } else {
                        ("are stubs", "s", "they are", "them")
                    };
                    let verb = match (covered, n == 1) {
                        (true, true) => "shows",
                        (true, false) => "show",
                        (false, true) => "says",
                        (false, false) => "say",
                    };
                    write!(
                        f,
                        "; {} {are} whose tenant tag{s} {verb} {they_are} not this \
                         organization's event{s}",
                        count(n, "position", "positions")
                    )?;
                    if !covered {
                        write!(f, " (shown only against a checkpoint that covers {them})")?;
                    }
                }
                if self.v1_stubs > 0 {
                    // A v1 stub's event is known only by its hash: nothing shows whose it is.
                    let n = self.v1_stubs;
                    let (are, a, s, they_are) = if n == 1 {
                        ("is a stub", "a ", "", "it is")
                    } else {
                        ("are stubs", "", "s", "they are")
                    };
                    write!(
                        f,
                        "; {} {are} of {a}v1 event{s}, another organization's by the \
                         exporter's word: the file cannot show {they_are} not this one's",
                        count(n, "position", "positions")
                    )?;
                }
                Ok(())
            }
            // As `verify --since` says of a checkpoint that does not open under the key: the
            // verdict is on the checkpoint, whatever the file holds.
            Some(FileFault {
                kind: kind @ FileFaultKind::Checkpoint(_),
                ..
            }) => write!(f, "FORGED: {kind}"),
            Some(FileFault {
                position,
                line: Some(line),
                kind: FileFaultKind::BlankLine,
            }) => match position {
                Some(p) => write!(
                    f,
                    "TAMPERED: first bad position {p}: blank line at line {line} ({counts})"
                ),
                None => write!(f, "TAMPERED: blank line at line {line} ({counts})"),
            },
            Some(bad) => match bad.position {
                Some(p) => write!(
                    f,
                    "TAMPERED: first bad position {p}: {} ({counts})",
                    bad.kind
                ),
                None => write!(f, "TAMPERED: {bad} ({counts})"),
            },
        }
    }
}

/// The range a header gives and whose events it says are in full, as an intact report says it.
struct Covers<'h>(&'h ExportHeader);

impl std::fmt::Display for Covers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.0;
        match h.to - h.from {
            ..0 => write!(
                f,
                "covers no position (from {} to {}: an empty range)",
                h.from, h.to
            )?,
            0 => write!(f, "covers position {}", h.from)?,
            _ => write!(f, "covers positions {} to {}", h.from, h.to)?,
        }
        match h.organization_id {
            Some(org) => write!(
                f,
                " for organization {org}: its events in full, every other position a stub"
            ),
            None => f.write_str(" for every organization: every event in full"),
        }
    }
}

/// Why a verification could not run (as opposed to finding a fault).
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("reading the export: {0}")]
    Io(#[from] std::io::Error),
    /// Not an export at all: nothing to check, so no verdict on it.
    #[error("the file holds no events: it is empty (or only whitespace), with no export header")]
    NoEvents,
    #[error(
        "the checkpoint's size {tree_size} is before the export's range (from position {from}): \
         export from position {tree_size} or earlier to check against it"
    )]
    CheckpointNotCovered { tree_size: u64, from: i64 },
}

/// Verifies the export at `path`, optionally against a signed checkpoint (the note's text and
/// the key trusted to sign it), with `workers` threads parsing and hashing.
pub fn verify_file(
    path: &Path,
    checkpoint: Option<(&str, &NoteVerifier)>,
    workers: usize,
) -> Result<OfflineReport, OfflineError> {
    verify_file_of(path, checkpoint, None, workers)
}

/// [`verify_file`], and with `organization` the file must be that organization's export: a
/// header naming another (or every organization) is a fault of line 1, as a malformed one is.
pub fn verify_file_of(
    path: &Path,
    checkpoint: Option<(&str, &NoteVerifier)>,
    organization: Option<Uuid>,
    workers: usize,
) -> Result<OfflineReport, OfflineError> {
    let file = std::fs::File::open(path)?;
    verify_blocks(file, checkpoint, organization, workers, BLOCK)
}

/// [`verify_file`] over any reader.
pub fn verify_reader(
    input: impl Read,
    checkpoint: Option<(&str, &NoteVerifier)>,
    workers: usize,
) -> Result<OfflineReport, OfflineError> {
    verify_blocks(input, checkpoint, None, workers, BLOCK)
}

fn verify_blocks(
    input: impl Read,
    checkpoint: Option<(&str, &NoteVerifier)>,
    organization: Option<Uuid>,
    workers: usize,
    block: usize,
) -> Result<OfflineReport, OfflineError> {
    let started = Instant::now();
    let workers = workers.max(1);
    let mut report = OfflineReport {
        header: None,
        lines: 0,
        full_events: 0,
        stubs: 0,
        v1_stubs: 0,
        head_position: 0,
        head_hash: GENESIS,
        checkpoint: None,
        root: None,
        first_bad: None,
        elapsed: Duration::ZERO,
    };
    // A refused checkpoint is reported first, but the file is still checked.
    let mut refused = None;
    if let Some((note, verifier)) = checkpoint {
        match verifier.open(note) {
            Ok(cp) => report.checkpoint = Some(cp),
            Err(e) => {
                refused = Some(FileFault {
                    position: None,
                    line: None,
                    kind: FileFaultKind::Checkpoint(e),
                })
            }
        }
    }
    let mut reader = BufReader::with_capacity(1 << 16, input);
    let header = match read_header(&mut reader) {
        Ok(Ok(h)) => h,
        Ok(Err(kind)) => {
            report.checkpoint = None;
            report.first_bad = refused.clone().or(Some(FileFault {
                position: None,
                line: Some(1),
                kind,
            }));
            report.elapsed = started.elapsed();
            return Ok(report);
        }
        // A forged checkpoint is a verdict of its own, file or no file.
        Err(OfflineError::NoEvents) if refused.is_some() => {
            report.first_bad = refused;
            report.elapsed = started.elapsed();
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    report.header = Some(header.clone());
    if let Some(asked) = organization.filter(|o| header.organization_id != Some(*o)) {
        report.checkpoint = None;
        report.first_bad = refused.or(Some(FileFault {
            position: None,
            line: Some(1),
            kind: FileFaultKind::OrganizationNotAsked {
                asked,
                file: header.organization_id,
            },
        }));
        report.elapsed = started.elapsed();
        return Ok(report);
    }
    report.head_position = header.from - 1;
    report.head_hash = header.prev_hash;

    // What the checkpoint asks of the walk: leaves and the hash up to its size.
    let mut target = None;
    if let Some(cp) = &report.checkpoint {
        if cp.origin != header.origin {
            refused = refused.or(Some(FileFault {
                position: None,
                line: None,
                kind: FileFaultKind::OriginMismatch {
                    export: header.origin.clone(),
                    checkpoint: cp.origin.clone(),
                },
            }));
            report.checkpoint = None;
        } else if (cp.tree_size as i128) < (header.from as i128) - 1 {
            return Err(OfflineError::CheckpointNotCovered {
                tree_size: cp.tree_size,
                from: header.from,
            });
        } else {
            target = Some(i64::try_from(cp.tree_size).unwrap_or(i64::MAX));
        }
    }
    let ctx = Ctx {
        full_export: header.organization_id.is_none(),
        organization: header.organization_id.map(|o| *o.as_bytes()),
        checkpoint: report.checkpoint.clone().filter(|_| target.is_some()),
        from: header.from,
        to: header.to,
        leaves_to: target.unwrap_or(0).min(header.to),
        hash_at: target.unwrap_or(-1),
        #[cfg(test)]
        work: tests::WORK.with(|w| Arc::clone(&w.borrow())),
    };
    let frontier =
        Frontier::<Blake3>::from_parts((header.from - 1) as u64, header.frontier.clone())
            .expect("checked with the header");
    let mut walk = Walk {
        from: header.from,
        expected: header.from,
        prev: header.prev_hash,
        line_no: 1,
        first_bad: None,
        lines: 0,
        full: 0,
        stubs: 0,
        v1_stubs: 0,
        formats: FormatRun::default(),
        peaks: Peaks {
            size: frontier.size(),
            peaks: frontier.peaks().to_vec(),
        },
        hash_at: None,
    };
    walk_blocks(&mut reader, &ctx, workers, block, &mut walk)?;

    if walk.first_bad.is_none() && walk.expected != header.to + 1 {
        // The file ends before the header's `to`.
        walk.first_bad = Some(FileFault {
            position: Some(walk.expected),
            line: None,
            kind: FileFaultKind::Chain(Fault::Missing),
        });
    }
    report.lines = walk.lines;
    report.full_events = walk.full;
    report.stubs = walk.stubs;
    report.v1_stubs = walk.v1_stubs;
    report.head_position = walk.expected - 1;
    report.head_hash = walk.prev;
    let mut first_bad = walk.first_bad.clone();
    if let (Some(cp), Some(size)) = (&report.checkpoint, target) {
        let fault_before = |p: i64| {
            first_bad
                .as_ref()
                .and_then(|f| f.position)
                .is_some_and(|q| q <= p)
        };
        if size > header.to {
            if !fault_before(header.to + 1) {
                first_bad = Some(FileFault {
                    position: Some(header.to + 1),
                    line: None,
                    kind: FileFaultKind::Truncated {
                        tree_size: cp.tree_size,
                    },
                });
            }
        } else if !fault_before(size) {
            let head = if size == header.from - 1 {
                Some(header.prev_hash)
            } else {
                walk.hash_at
            };
            let root = (walk.peaks.size == cp.tree_size).then(|| walk.peaks.root());
            report.root = root;
            let at = |kind| FileFault {
                position: Some(size),
                line: None,
                kind,
            };
            if head != Some(cp.chain_head) {
                first_bad = Some(at(FileFaultKind::ChainHeadMismatch {
                    tree_size: cp.tree_size,
                }));
            } else if root != Some(cp.root) {
                first_bad = Some(at(FileFaultKind::RootMismatch {
                    tree_size: cp.tree_size,
                }));
            }
        }
    }
    report.first_bad = refused.or(first_bad);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Reads and checks the header line: `Err(fault)` if it is not a header this verifier reads;
/// [`OfflineError::NoEvents`] if the file is empty or only whitespace.
fn read_header(
    reader: &mut impl BufRead,
) -> Result<Result<ExportHeader, FileFaultKind>, OfflineError> {
    let mut line = Vec::new();
    reader.take(HEADER_LIMIT).read_until(b'\n', &mut line)?;
    if line.iter().all(|b| *b == b'\n' || blank(*b)) {
        if only_whitespace_left(reader)? {
            return Err(OfflineError::NoEvents);
        }
        if line.last() == Some(&b'\n') {
            return Ok(Err(FileFaultKind::BlankLine));
        }
    }
    let malformed = |m: String| Ok(Err(FileFaultKind::MalformedHeader(m)));
    if line.last() != Some(&b'\n') {
        return malformed("no complete first line".into());
    }
    let value: serde_json::Value = match serde_json::from_slice(&line) {
        Ok(v) => v,
        Err(e) => return malformed(format!("not JSON: {e}")),
    };
    if value.get("format").and_then(|v| v.as_str()) != Some(FORMAT) {
        return malformed(format!("not a `{FORMAT}` file"));
    }
    // Version 1 files were written before v2 hashes: the grammar of version 2 reads them.
    if !value
        .get("version")
        .and_then(|v| v.as_u64())
        .is_some_and(|v| (1..=u64::from(VERSION)).contains(&v))
    {
        return malformed(format!(
            "version {} (this verifier reads versions 1 to {VERSION})",
            value.get("version").unwrap_or(&serde_json::Value::Null)
        ));
    }
    let header: ExportHeader = match serde_json::from_value(value) {
        Ok(h) => h,
        Err(e) => return malformed(e.to_string()),
    };
    Ok(check_header(&header)
        .map(|()| header)
        .map_err(FileFaultKind::MalformedHeader))
}

/// JSON's whitespace other than the newline that ends a line.
fn blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r')
}

/// Whether the rest of `reader` is JSON whitespace (or nothing); reads up to the first byte
/// that is not.
fn only_whitespace_left(reader: &mut impl BufRead) -> std::io::Result<bool> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(true);
        }
        if !buf.iter().all(|b| *b == b'\n' || blank(*b)) {
            return Ok(false);
        }
        let n = buf.len();
        reader.consume(n);
    }
}

fn check_header(h: &ExportHeader) -> Result<(), String> {
    if h.from < 1 {
        return Err(format!("from is {}, not a position", h.from));
    }
    if h.to < h.from - 1 {
        return Err(format!("to ({}) is before from ({})", h.to, h.from));
    }
    if h.to == i64::MAX {
        return Err("to is not a position".into());
    }
    if h.from == 1 && h.prev_hash != GENESIS {
        return Err("an export from position 1 must have the genesis prev_hash".into());
    }
    if Frontier::<Blake3>::from_parts((h.from - 1) as u64, h.frontier.clone()).is_none() {
        return Err(format!(
            "the frontier has {} peaks; a tree of {} leaves has {}",
            h.frontier.len(),
            h.from - 1,
            (h.from - 1).count_ones()
        ));
    }
    Ok(())
}

/// What the workers are asked to do besides checking.
struct Ctx {
    /// Every event must be in full (no organization in the header).
    full_export: bool,
    /// The header's organization: its events alone may be in full, and no v2 stub may
    /// carry its tenant tag.
    organization: Option<[u8; 16]>,
    /// The checkpoint, whose signed format each line must be in.
    checkpoint: Option<Checkpoint>,
    /// The header's first position.
    from: i64,
    /// The header's last position.
    to: i64,
    /// Merkle leaves are collected for positions up to this.
    leaves_to: i64,
    /// The hash at this position is kept (the checkpoint's chain head).
    hash_at: i64,
    /// What the workers did, for the tests to count.
    #[cfg(test)]
    work: Arc<tests::Work>,
}

/// A piece of a block for a worker: `data[range]`, whole lines, the `seq`-th of the file.
struct Job {
    seq: u64,
    data: Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
}

/// Reads `reader` block by block and hands pieces of whole lines to the workers through a
/// queue, so that no worker waits for another at block boundaries; this thread reads ahead
/// and joins the results in file order as they arrive. At most `IN_FLIGHT` blocks are in
/// memory; their buffers are reused.
fn walk_blocks(
    reader: &mut impl Read,
    ctx: &Ctx,
    workers: usize,
    block: usize,
    walk: &mut Walk,
) -> Result<(), OfflineError> {
    const IN_FLIGHT: usize = 3;
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(PIECES_PER_BLOCK * IN_FLIGHT);
    let job_rx = Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::channel::<(u64, Chunk)>();
    // The first piece known to hold a fault, or to make one where it joins: no piece after it
    // can change the verdict (the walk stops at its first fault), so they are only counted.
    let stop = AtomicU64::new(u64::MAX);
    std::thread::scope(|s| {
        // Owned here, so that an early return (a read error) drops it and the workers stop.
        let job_tx = job_tx;
        for _ in 0..workers {
            let (job_rx, done_tx, stop) = (&job_rx, done_tx.clone(), &stop);
            s.spawn(move || loop {
                let job = match job_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return, // another worker panicked; the scope reports it
                };
                let Ok(job) = job else { return };
                let data = &job.data[job.range];
                let chunk = if job.seq > stop.load(Ordering::Relaxed) {
                    Chunk::counted(data)
                } else {
                    let chunk = check_chunk(data, ctx);
                    if chunk.first_bad.is_some() {
                        stop.fetch_min(job.seq, Ordering::Relaxed);
                    }
                    chunk
                };
                drop(job.data);
                if done_tx.send((job.seq, chunk)).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);

        let mut joiner = Joiner {
            walk,
            next: 0,
            waiting: BTreeMap::new(),
            rx: done_rx,
            stop: &stop,
        };
        let mut blocks: VecDeque<Arc<Vec<u8>>> = VecDeque::new();
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut carry: Vec<u8> = Vec::new();
        // Whether `carry` is what follows a dropped line: the rest of a block, whole lines too.
        let mut after_skip = false;
        let mut seq = 0u64;
        loop {
            // A buffer: a new one, or the oldest block's once no worker holds it.
            while blocks.len() >= IN_FLIGHT {
                if Arc::strong_count(&blocks[0]) == 1 {
                    let oldest = blocks.pop_front().expect("a block");
                    spare.push(Arc::try_unwrap(oldest).unwrap_or_default());
                } else if !joiner.join_one() {
                    break;
                }
            }
            let mut buf = spare.pop().unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(&carry);
            // The carried bytes start a line. Cut at a block's last newline, they hold none, so
            // only new bytes are searched (a long line is not searched again for every block).
            // After a dropped line they may hold whole lines, which must not count as one long
            // line with the next: they are searched too.
            let mut searched = if after_skip { 0 } else { buf.len() };
            let (split, eof) = loop {
                let want = buf.len() + block;
                if fill(reader, &mut buf, want)? {
                    break (Some(buf.len()), true);
                }
                if let Some(i) = buf[searched..].iter().rposition(|b| *b == b'\n') {
                    break (Some(searched + i + 1), false);
                }
                // One line longer than a block: read on, but not past the limit.
                if buf.len() > LINE_LIMIT {
                    break (None, false);
                }
                searched = buf.len();
            };
            let Some(split) = split else {
                // As a worker would report it (`check_chunk`), without holding the line.
                #[cfg(test)]
                ctx.work.skipped.fetch_add(1, Ordering::Relaxed);
                joiner.waiting.insert(seq, Chunk::overlong());
                stop.fetch_min(seq, Ordering::Relaxed);
                seq += 1;
                joiner.drain();
                let eof = skip_line(reader, &mut buf, &mut carry, block)?;
                after_skip = true;
                spare.push(buf);
                if eof {
                    break;
                }
                continue;
            };
            carry.clear();
            carry.extend_from_slice(&buf[split..]);
            after_skip = false;
            buf.truncate(split);
            let data = Arc::new(buf);
            for range in pieces(&data, PIECES_PER_BLOCK.max(workers)) {
                let job = Job {
                    seq,
                    data: Arc::clone(&data),
                    range,
                };
                seq += 1;
                if job_tx.send(job).is_err() {
                    break; // the workers are gone (a panic, reported by the scope)
                }
                joiner.join_ready();
            }
            blocks.push_back(data);
            if eof {
                break;
            }
        }
        drop(job_tx);
        while joiner.next < seq && joiner.join_one() {}
        Ok(())
    })
}

/// Joins the workers' results in file order.
struct Joiner<'w> {
    walk: &'w mut Walk,
    /// The sequence number of the next piece to join.
    next: u64,
    waiting: BTreeMap<u64, Chunk>,
    rx: mpsc::Receiver<(u64, Chunk)>,
    /// Set to a piece whose join found a fault.
    stop: &'w AtomicU64,
}

impl Joiner<'_> {
    /// Joins what has arrived, without waiting.
    fn join_ready(&mut self) {
        while let Ok((seq, chunk)) = self.rx.try_recv() {
            self.waiting.insert(seq, chunk);
        }
        self.drain();
    }

    /// Waits for one more result and joins what it makes joinable; false when no more can come.
    fn join_one(&mut self) -> bool {
        match self.rx.recv() {
            Ok((seq, chunk)) => {
                self.waiting.insert(seq, chunk);
                self.drain();
                true
            }
            Err(_) => false,
        }
    }

    fn drain(&mut self) {
        while let Some(chunk) = self.waiting.remove(&self.next) {
            self.walk.join(chunk);
            if self.walk.first_bad.is_some() {
                self.stop.fetch_min(self.next, Ordering::Relaxed);
            }
            self.next += 1;
        }
    }
}

/// Reads and drops the rest of a line (with `buf` as scratch space) and puts what follows its
/// newline in `carry` (the rest of a block: it may hold whole lines); true if the input ends
/// first.
fn skip_line(
    reader: &mut impl Read,
    buf: &mut Vec<u8>,
    carry: &mut Vec<u8>,
    block: usize,
) -> std::io::Result<bool> {
    carry.clear();
    loop {
        buf.clear();
        let eof = fill(reader, buf, block)?;
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            carry.extend_from_slice(&buf[i + 1..]);
            return Ok(false);
        }
        if eof {
            return Ok(true);
        }
    }
}

/// Reads until `buf` holds `want` bytes or the input ends; true at the end of the input.
fn fill(reader: &mut impl Read, buf: &mut Vec<u8>, want: usize) -> std::io::Result<bool> {
    buf.reserve(want.saturating_sub(buf.len()));
    while buf.len() < want {
        let n = reader
            .by_ref()
            .take((want - buf.len()) as u64)
            .read_to_end(buf)?;
        if n == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `data` cut into up to `n` pieces of whole lines, as ranges.
fn pieces(data: &[u8], n: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for i in 1..n {
        let target = (data.len() * i / n).max(start);
        let mut rest = &data[target..];
        let skipped = rest.skip_until(b'\n').expect("reading a slice cannot fail");
        let end = target + skipped;
        if end > start && end < data.len() {
            out.push(start..end);
            start = end;
        }
    }
    if start < data.len() {
        out.push(start..data.len());
    }
    out
}

/// The result of checking one piece of whole lines on its own.
#[derive(Default)]
struct Chunk {
    lines: u64,
    full: u64,
    stubs: u64,
    v1_stubs: u64,
    /// The formats of the piece's lines up to the first fault (no v1 line may follow a v2 one,
    /// here or across the join). Its first line's is taken once the line passed the checks
    /// that come before this rule.
    formats: FormatRun,
    /// Counted only, after a piece with a fault: what else it says is empty.
    unchecked: bool,
    /// The first line's position, if it parsed.
    first_position: Option<i64>,
    /// The stored `prev_hash` of the first line when it is a full event or a v2 stub that
    /// hashes correctly: its link is checked when the piece is joined to the one before.
    first_prev: Option<Digest>,
    /// The last line checked good: its position and its hash (recomputed, or a stub's).
    last: Option<(i64, Digest)>,
    /// The first fault; its `line` counts from 0 within the piece, its `position` is `None`
    /// when it is on the first line and that line has no readable position.
    first_bad: Option<FileFault>,
    /// The Merkle subtrees over the leaves of the good lines up to `Ctx::leaves_to`: aligned
    /// complete subtrees `(level, root)`, in order, that the join adds to the frontier.
    subtrees: Vec<(u32, Digest)>,
    hash_at: Option<Digest>,
}

/// One line, checked for shape; a full event or a v2 stub hashed.
enum Checked {
    /// A v1 stub: its hash as the file gives it.
    Stub { position: i64, hash: Digest },
    Hashed {
        position: i64,
        version: HashVersion,
        prev_hash: Digest,
        /// The hash the line gives, and the one its fields hash to.
        hash: Digest,
        recomputed: Digest,
        /// For a full event that does not hash to `hash`: the nearby position at which it
        /// does (where a moved event was written).
        written_at: Option<i64>,
        whose: Whose,
    },
}

/// Whose event a full line or a v2 stub is, against the header's organization.
enum Whose {
    /// A full event that may be in full: the organization's, or any in an export of every
    /// organization.
    InFull,
    /// A full event of another tenant in an organization's export.
    OtherInFull(Option<[u8; 16]>),
    /// A v2 stub whose tag is not the organization's.
    OtherAsStub,
    /// A v2 stub whose tag is the organization's own.
    OwnAsStub,
}

impl Chunk {
    /// A piece after one with a fault: its lines are counted, not checked.
    fn counted(data: &[u8]) -> Self {
        let newlines = data.iter().filter(|b| **b == b'\n').count();
        // The last line may lack its newline, as `line::next_line` reads it.
        let unended = data.last().is_some_and(|b| *b != b'\n');
        Chunk {
            lines: (newlines + usize::from(unended)) as u64,
            unchecked: true,
            ..Chunk::default()
        }
    }

    /// A piece of one line longer than [`LINE_LIMIT`], which the reader does not hold.
    fn overlong() -> Self {
        Chunk {
            lines: 1,
            first_bad: Some(FileFault {
                position: None,
                line: Some(0),
                kind: FileFaultKind::MalformedLine(too_long()),
            }),
            ..Chunk::default()
        }
    }
}

/// Why a line longer than [`LINE_LIMIT`] is malformed.
fn too_long() -> String {
    format!(
        "longer than {} MiB ({LINE_LIMIT} bytes), which no export line is",
        LINE_LIMIT >> 20
    )
}

impl Checked {
    fn position(&self) -> i64 {
        match self {
            Checked::Stub { position, .. } | Checked::Hashed { position, .. } => *position,
        }
    }
}

/// Reads the next line of `rest` and hashes a full event (with `input` as scratch space) or
/// a v2 stub.
fn check_line(rest: &mut &[u8], ctx: &Ctx, input: &mut Vec<u8>) -> Result<Checked, String> {
    line::read_next(rest, ctx.full_export, |parsed, kept| match parsed {
        Parsed::Stub { position, hash } => (
            Checked::Stub {
                position: *position,
                hash: *hash,
            },
            true,
        ),
        Parsed::StubV2(s) => {
            let own = ctx
                .organization
                .as_ref()
                .is_some_and(|org| hash::tenant_tag(s.position, Some(org)) == s.tenant_tag);
            let checked = Checked::Hashed {
                position: s.position,
                version: HashVersion::V2,
                prev_hash: s.prev_hash,
                hash: s.hash,
                recomputed: hash::chain_v2(&s.prev_hash, &s.tenant_tag, &s.content_digest),
                written_at: None,
                whose: if own {
                    Whose::OwnAsStub
                } else {
                    Whose::OtherAsStub
                },
            };
            (checked, true)
        }
        Parsed::Full(e) => {
            let fields = e.fields();
            let recomputed = hash::raw_hash(input, &e.prev_hash, &fields);
            let authentic = recomputed == e.hash;
            let checked = Checked::Hashed {
                position: parsed.position(),
                version: e.hash_version,
                prev_hash: e.prev_hash,
                hash: e.hash,
                recomputed,
                // Up to twice the window's hashes of the whole line: only for a reading kept.
                written_at: if authentic || !kept {
                    None
                } else {
                    #[cfg(test)]
                    ctx.work.searches.fetch_add(1, Ordering::Relaxed);
                    hash::written_at(input, &e.prev_hash, &fields, REORDER_WINDOW, &e.hash)
                },
                whose: match ctx.organization {
                    Some(org) if e.organization_id != Some(org) => {
                        Whose::OtherInFull(e.organization_id)
                    }
                    _ => Whose::InFull,
                },
            };
            (checked, authentic)
        }
    })
}

fn check_chunk(data: &[u8], ctx: &Ctx) -> Chunk {
    #[cfg(test)]
    ctx.work.pieces.fetch_add(1, Ordering::Relaxed);
    let mut c = Chunk::default();
    let mut input = Vec::with_capacity(4096);
    let mut rest = data;
    let mut expected: Option<i64> = None;
    let mut leaves = Vec::new();
    while !rest.is_empty() {
        let index = c.lines;
        c.lines += 1;
        if c.first_bad.is_some() {
            line::next_line(&mut rest); // counted, not checked
            continue;
        }
        let fault = |position, kind| FileFault {
            position,
            line: Some(index),
            kind,
        };
        // The reader drops such a line rather than hold it (`walk_blocks`); one that ends in
        // the block is refused the same way, wherever the file was cut.
        if rest.len() > LINE_LIMIT {
            let mut after = rest;
            if line::next_line(&mut after).len() > LINE_LIMIT {
                rest = after;
                c.first_bad = Some(fault(expected, FileFaultKind::MalformedLine(too_long())));
                continue;
            }
        }
        // Every line the exporter writes is a JSON object, so this costs one comparison.
        if rest[0] == b'\n' || blank(rest[0]) {
            let mut after = rest;
            if line::next_line(&mut after).iter().all(|b| blank(*b)) {
                rest = after;
                c.first_bad = Some(fault(expected, FileFaultKind::BlankLine));
                continue;
            }
        }
        let parsed = match check_line(&mut rest, ctx, &mut input) {
            Ok(p) => p,
            Err(m) => {
                c.first_bad = Some(fault(expected, FileFaultKind::MalformedLine(m)));
                continue;
            }
        };
        let position = parsed.position();
        match expected {
            Some(e) => {
                if let Some(bad) = out_of_place(ctx.from, e, position) {
                    c.first_bad = Some(fault(Some(bad.position), FileFaultKind::Chain(bad.fault)));
                    continue;
                }
            }
            None => c.first_position = Some(position),
        }
        if position > ctx.to {
            c.first_bad = Some(fault(
                Some(position),
                FileFaultKind::MalformedLine(format!(
                    "position {position} is beyond the header's `to` ({})",
                    ctx.to
                )),
            ));
            continue;
        }
        let version = match &parsed {
            Checked::Stub { .. } => HashVersion::V1,
            Checked::Hashed { version, .. } => *version,
        };
        if let Some(cp) = &ctx.checkpoint {
            // (A position below 1 is a fault of its own, reported before this.)
            let signed = cp.signed_format(u64::try_from(position).unwrap_or(0));
            if signed.is_some_and(|signed| signed != version) {
                c.first_bad = Some(fault(
                    Some(position),
                    FileFaultKind::HashVersionNotAsSigned {
                        v2_from: cp.hash_v2_from,
                        tree_size: cp.tree_size,
                    },
                ));
                continue;
            }
        }
        if !c.formats.admit(version) {
            c.first_bad = Some(fault(
                Some(position),
                FileFaultKind::Chain(Fault::V1AfterV2),
            ));
            continue;
        }
        let hash = match &parsed {
            Checked::Stub { hash, .. } => {
                c.stubs += 1;
                c.v1_stubs += 1;
                *hash
            }
            Checked::Hashed {
                prev_hash,
                hash,
                recomputed,
                written_at,
                whose,
                ..
            } => {
                if recomputed != hash {
                    let kind = match written_at {
                        Some(q) => Fault::Reordered { written_at: *q },
                        None => Fault::ContentChanged,
                    };
                    c.first_bad = Some(fault(Some(position), FileFaultKind::Chain(kind)));
                    continue;
                }
                match c.last {
                    None => c.first_prev = Some(*prev_hash),
                    Some((_, prev)) if prev != *prev_hash => {
                        c.first_bad = Some(fault(
                            Some(position),
                            FileFaultKind::Chain(Fault::LinkBroken),
                        ));
                        continue;
                    }
                    Some(_) => {}
                }
                match whose {
                    Whose::InFull => c.full += 1,
                    Whose::OtherAsStub => c.stubs += 1,
                    Whose::OwnAsStub => {
                        c.first_bad = Some(fault(Some(position), FileFaultKind::OwnEventAsStub));
                        continue;
                    }
                    Whose::OtherInFull(tenant) => {
                        let organization = ctx.organization.expect("an organization's export");
                        c.first_bad = Some(fault(
                            Some(position),
                            FileFaultKind::OtherTenantInFull {
                                tenant: tenant.map(Uuid::from_bytes),
                                organization: Uuid::from_bytes(organization),
                            },
                        ));
                        continue;
                    }
                }
                *recomputed
            }
        };
        if position <= ctx.leaves_to {
            leaves.push(leaf(&hash));
        }
        if position == ctx.hash_at {
            c.hash_at = Some(hash);
        }
        c.last = Some((position, hash));
        expected = Some(position + 1);
    }
    if let (Some(first @ 1..), false) = (c.first_position, leaves.is_empty()) {
        // The leaves are those of positions first, first + 1, ...: leaf indexes from first - 1.
        c.subtrees = subtrees((first - 1) as u64, &leaves);
    }
    c
}

/// The leaves starting at leaf index `start` as maximal aligned complete subtrees, in order:
/// what pushing them one by one would add to a frontier of size `start`.
fn subtrees(start: u64, leaves: &[Digest]) -> Vec<(u32, Digest)> {
    let mut out = Vec::new();
    let mut at = start;
    let mut rest = leaves;
    while !rest.is_empty() {
        let mut level = at.trailing_zeros().min(63);
        while 1u64 << level > rest.len() as u64 {
            level -= 1;
        }
        let (block, more) = rest.split_at(1 << level);
        let mut nodes = block.to_vec();
        while nodes.len() > 1 {
            nodes = nodes.chunks_exact(2).map(|p| node(&p[0], &p[1])).collect();
        }
        out.push((level, nodes[0]));
        at += block.len() as u64;
        rest = more;
    }
    out
}

/// `Blake3::leaf` of an event hash, in one call (no incremental hasher).
fn leaf(event_hash: &Digest) -> Digest {
    let mut input = [0u8; 33];
    input[1..].copy_from_slice(event_hash);
    blake3::hash(&input).into()
}

/// `Blake3::node`, in one call.
fn node(left: &Digest, right: &Digest) -> Digest {
    let mut input = [1u8; 65];
    input[1..33].copy_from_slice(left);
    input[33..].copy_from_slice(right);
    blake3::hash(&input).into()
}

/// The walk over the pieces in file order.
struct Walk {
    /// The header's first position.
    from: i64,
    /// The position the next line must hold.
    expected: i64,
    /// The hash of the last good position (recomputed, or a stub's).
    prev: Digest,
    /// Lines joined so far, the header included.
    line_no: u64,
    first_bad: Option<FileFault>,
    lines: u64,
    full: u64,
    stubs: u64,
    v1_stubs: u64,
    /// The formats of the lines joined so far.
    formats: FormatRun,
    peaks: Peaks,
    hash_at: Option<Digest>,
}

impl Walk {
    /// Chains a piece to what came before it; the first fault in file order wins.
    fn join(&mut self, c: Chunk) {
        let line_no = self.line_no;
        self.line_no += c.lines;
        self.lines += c.lines;
        // Pieces are counted only after one with a fault, which joined before them.
        assert!(
            !c.unchecked || self.first_bad.is_some(),
            "a piece was skipped before any fault"
        );
        if self.first_bad.is_some() || c.lines == 0 {
            return;
        }
        let at_line = |index: u64| Some(line_no + 1 + index);
        if let Some(bad) = c
            .first_position
            .and_then(|p| out_of_place(self.from, self.expected, p))
        {
            self.first_bad = Some(FileFault {
                position: Some(bad.position),
                line: at_line(0),
                kind: FileFaultKind::Chain(bad.fault),
            });
            return;
        }
        // The piece's first line passed what comes before this rule when its format is known
        // (it is recorded after the line's shape, position and signed format are checked), and
        // the rule comes before its hash: so before the line's own fault, if any.
        if !c.formats.may_follow(&self.formats) {
            self.first_bad = Some(FileFault {
                position: Some(self.expected),
                line: at_line(0),
                kind: FileFaultKind::Chain(Fault::V1AfterV2),
            });
            return;
        }
        // A first line that hashed correctly has its link checked here, before any fault the
        // piece found on it after its hash (an own event's stub), as the sequential walk does.
        if c.first_prev.is_some_and(|p| p != self.prev) {
            self.first_bad = Some(FileFault {
                position: Some(self.expected),
                line: at_line(0),
                kind: FileFaultKind::Chain(Fault::LinkBroken),
            });
            return;
        }
        if let Some(f) = c.first_bad.as_ref().filter(|f| f.line == Some(0)) {
            self.first_bad = Some(FileFault {
                position: f.position.or(Some(self.expected)),
                line: at_line(0),
                kind: f.kind.clone(),
            });
            return;
        }
        self.formats = c.formats.after(&self.formats);
        // Counted only once the piece joins: its events are checked up to its own fault.
        self.full += c.full;
        self.stubs += c.stubs;
        self.v1_stubs += c.v1_stubs;
        for (level, root) in &c.subtrees {
            self.peaks.push(*level, root);
        }
        if c.hash_at.is_some() {
            self.hash_at = c.hash_at;
        }
        if let Some((position, hash)) = c.last {
            self.expected = position + 1;
            self.prev = hash;
        }
        if let Some(f) = c.first_bad {
            self.first_bad = Some(FileFault {
                line: f.line.and_then(at_line),
                ..f
            });
        }
    }
}

/// The Merkle frontier as peaks, largest first, grown without allocating per leaf.
struct Peaks {
    size: u64,
    peaks: Vec<Digest>,
}

impl Peaks {
    /// Adds a complete subtree of `2^level` leaves; the size must be a multiple of it (the
    /// subtrees of consecutive pieces are aligned, see [`subtrees`]).
    fn push(&mut self, level: u32, root: &Digest) {
        debug_assert_eq!(self.size % (1 << level), 0);
        let mut n = *root;
        let mut l = level;
        while self.size >> l & 1 == 1 {
            let left = self.peaks.pop().expect("one peak per set bit of the size");
            n = node(&left, &n);
            l += 1;
        }
        self.peaks.push(n);
        self.size += 1 << level;
    }

    fn root(&self) -> Digest {
        Frontier::<Blake3>::from_parts(self.size, self.peaks.clone())
            .expect("peaks grown leaf by leaf")
            .root()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::sync::atomic::AtomicU64;

    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    use super::*;
    use crate::ledger::checkpoint::LogSigner;
    use crate::ledger::export::{write_event_line, write_stub_line, write_stub_v2_line};
    use crate::ledger::hash::{event_hash, stub_parts, EventFields};
    use crate::ledger::merkle::{self, TreeHash};

    const ORIGIN: &str = "ledgerline.test/log";

    /// What the workers of a verification did: the work a fault cuts short.
    #[derive(Default)]
    pub(super) struct Work {
        /// Pieces checked (not only counted).
        pub pieces: AtomicU64,
        /// Searches for the position a line that does not hash was written at.
        pub searches: AtomicU64,
        /// Lines the reader dropped past [`LINE_LIMIT`] (`skip_line`) rather than hold.
        pub skipped: AtomicU64,
    }

    thread_local! {
        /// The counts of the verifications this thread runs.
        pub(super) static WORK: RefCell<Arc<Work>> = RefCell::default();
    }

    /// Verifies `file` with `workers` threads and blocks of `block` bytes, counting the work:
    /// the pieces checked, the searches, the lines skipped.
    fn counted(file: &[u8], workers: usize, block: usize) -> (OfflineReport, [u64; 3]) {
        let work = Arc::new(Work::default());
        WORK.with(|w| *w.borrow_mut() = Arc::clone(&work));
        let r = verify_blocks(file, None, None, workers, block).unwrap();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (r, [n(&work.pieces), n(&work.searches), n(&work.skipped)])
    }

    struct Event {
        version: HashVersion,
        position: i64,
        org: Option<Uuid>,
        payload: String,
        metadata: String,
        prev_hash: Digest,
        hash: Digest,
    }

    impl Event {
        fn fields(&self) -> EventFields<'_> {
            EventFields {
                hash_version: self.version,
                position: self.position,
                aggregate_type: "User",
                aggregate_id: "5f0c6a1e-0000-4000-8000-000000000001",
                sequence: self.position,
                event_type: "UserInvited",
                event_version: "1",
                organization_id: self.org,
                recorded_at: DateTime::from_timestamp_micros(1_767_268_800_000_000 + self.position)
                    .unwrap(),
                payload: &self.payload,
                metadata: &self.metadata,
            }
        }
    }

    fn tenant(n: u128) -> Option<Uuid> {
        (n != 0).then(|| Uuid::from_u128(n))
    }

    /// A chain of `n` v1 events: tenants 1 and 2 alternate with platform events (every 5th).
    fn chain(n: i64) -> Vec<Event> {
        chain_from_v2(n, n + 1)
    }

    /// The same, with the events from position `v2` on in v2.
    fn chain_from_v2(n: i64, v2: i64) -> Vec<Event> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|p| {
                let mut e = Event {
                    version: if p < v2 {
                        HashVersion::V1
                    } else {
                        HashVersion::V2
                    },
                    position: p,
                    org: tenant(if p % 5 == 0 { 0 } else { 1 + (p % 2) as u128 }),
                    payload: format!(r#"{{"n": {p}, "name":"Zoë \u00e9", "secret":"s{p}"}}"#),
                    metadata: if p % 7 == 0 {
                        "{\"request_id\":\n\"r\"}".into()
                    } else {
                        r#"{"request_id":"r"}"#.into()
                    },
                    prev_hash: prev,
                    hash: [0; 32],
                };
                e.hash = event_hash(&prev, &e.fields());
                prev = e.hash;
                e
            })
            .collect()
    }

    fn leaves(events: &[Event]) -> Vec<Digest> {
        events.iter().map(|e| Blake3::leaf(&e.hash)).collect()
    }

    /// The export of positions `from..=to` of `events`, for `org` or for everyone.
    fn export(events: &[Event], org: Option<Uuid>, from: i64, to: i64) -> Vec<u8> {
        let mut frontier = Frontier::<Blake3>::new();
        for leaf in leaves(&events[..(from - 1) as usize]) {
            frontier.push(leaf);
        }
        let header = ExportHeader {
            format: FORMAT.into(),
            version: VERSION,
            origin: ORIGIN.into(),
            organization_id: org,
            from,
            to,
            prev_hash: if from == 1 {
                GENESIS
            } else {
                events[(from - 2) as usize].hash
            },
            frontier: frontier.peaks().to_vec(),
            exported_at: Utc::now(),
        };
        let mut out = Vec::new();
        header.write_line(&mut out);
        for e in &events[(from - 1) as usize..to as usize] {
            if org.is_none() || e.org == org {
                write_event_line(&mut out, &e.fields(), &e.prev_hash, &e.hash);
            } else {
                stub(&mut out, e);
            }
        }
        out
    }

    /// The stub an exporter writes for `e`.
    fn stub(out: &mut Vec<u8>, e: &Event) {
        match e.version {
            HashVersion::V1 => write_stub_line(out, e.position, &e.hash),
            HashVersion::V2 => {
                let (tag, digest) = stub_parts(&e.fields());
                write_stub_v2_line(out, e.position, &e.prev_hash, &tag, &digest, &e.hash);
            }
        }
    }

    fn stub_line(e: &Event) -> String {
        let mut out = Vec::new();
        stub(&mut out, e);
        String::from_utf8(out).unwrap().trim_end().to_string()
    }

    fn lines(file: &[u8]) -> Vec<String> {
        String::from_utf8(file.to_vec())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn unlines(lines: &[String]) -> Vec<u8> {
        lines
            .iter()
            .flat_map(|l| format!("{l}\n").into_bytes())
            .collect()
    }

    /// Verifies with several block sizes and worker counts: they must all agree.
    fn check(file: &[u8], checkpoint: Option<(&str, &NoteVerifier)>) -> OfflineReport {
        let mut first: Option<OfflineReport> = None;
        for (block, workers) in [(BLOCK, 1), (BLOCK, 2), (150, 2), (700, 3), (2500, 4)] {
            let r = verify_blocks(file, checkpoint, None, workers, block).unwrap();
            if let Some(f) = &first {
                assert_eq!(
                    (&r.first_bad, r.lines, r.head_position, r.root),
                    (&f.first_bad, f.lines, f.head_position, f.root),
                    "block {block}, {workers} workers"
                );
                assert_eq!(
                    (r.full_events, r.stubs, r.v1_stubs),
                    (f.full_events, f.stubs, f.v1_stubs),
                    "counts, block {block}, {workers} workers"
                );
            }
            first.get_or_insert(r);
        }
        first.unwrap()
    }

    fn fault(file: &[u8]) -> Option<(Option<i64>, FileFaultKind)> {
        check(file, None).first_bad.map(|f| (f.position, f.kind))
    }

    fn chain_fault(position: i64, fault: Fault) -> Option<(Option<i64>, FileFaultKind)> {
        Some((Some(position), FileFaultKind::Chain(fault)))
    }

    #[test]
    fn an_untouched_export_verifies() {
        let events = chain(40);
        let r = check(&export(&events, None, 1, 40), None);
        assert!(r.intact(), "{:?}", r.first_bad);
        assert_eq!((r.lines, r.full_events, r.stubs), (40, 40, 0));
        assert_eq!((r.head_position, r.head_hash), (40, events[39].hash));

        let r = check(&export(&events, tenant(1), 1, 40), None);
        assert!(r.intact(), "{:?}", r.first_bad);
        assert_eq!((r.full_events, r.stubs), (16, 24));
        assert_eq!(r.head_hash, events[39].hash);

        // A range that starts later, and an empty range.
        let r = check(&export(&events, tenant(2), 11, 30), None);
        assert!(r.intact(), "{:?}", r.first_bad);
        assert_eq!((r.lines, r.head_position), (20, 30));
        let r = check(&export(&events, None, 41, 40), None);
        assert!(r.intact() && r.lines == 0 && r.head_hash == events[39].hash);
        assert!(r.to_string().starts_with("intact: 0 events"), "{r}");
    }

    #[test]
    fn an_intact_report_says_what_the_file_could_not_show() {
        let events = chain(40);
        let whole = check(&export(&events, None, 1, 40), None).to_string();
        assert!(whole.contains("checked against no checkpoint"), "{whole}");
        assert!(!whole.contains("stubs, another"), "{whole}");
        let r = check(&export(&events, tenant(2), 1, 40), None);
        assert!(r.intact() && r.stubs > 0, "{r}");
        assert!(
            r.to_string()
                .contains(&format!("{} positions are stubs of v1 events", r.stubs)),
            "{r}"
        );
    }

    #[test]
    fn an_intact_report_names_the_organization_and_the_range_it_covers() {
        let events = chain(40);
        let said = check(&export(&events, tenant(2), 11, 30), None).to_string();
        let org = tenant(2).unwrap();
        assert!(
            said.contains(&format!(
                "; covers positions 11 to 30 for organization {org}: its events in full, every \
                 other position a stub; head position 30 hash "
            )),
            "{said}"
        );
        let said = check(&export(&events, None, 1, 40), None).to_string();
        assert!(
            said.contains(
                "; covers positions 1 to 40 for every organization: every event in full; head \
                 position 40 hash "
            ),
            "{said}"
        );
        let said = check(&export(&events, tenant(1), 4, 4), None).to_string();
        assert!(
            said.contains("; covers position 4 for organization "),
            "{said}"
        );
        let said = check(&export(&events, None, 41, 40), None).to_string();
        assert!(
            said.contains("; covers no position (from 41 to 40: an empty range) for every"),
            "{said}"
        );
    }

    #[test]
    fn a_file_of_another_organization_than_asked_is_refused() {
        let events = chain(10);
        let file = export(&events, tenant(1), 1, 10);
        let r = verify_blocks(&file[..], None, tenant(1), 2, BLOCK).unwrap();
        assert!(r.intact(), "{r}");
        let asked = tenant(2).unwrap();
        for (file, of) in [
            (file.clone(), format!("organization {}", tenant(1).unwrap())),
            (export(&events, None, 1, 10), "every organization".into()),
        ] {
            let r = verify_blocks(&file[..], None, Some(asked), 2, BLOCK).unwrap();
            let said = r.to_string();
            let f = r.first_bad.expect("refused");
            assert_eq!((f.position, f.line), (None, Some(1)), "{said}");
            assert!(
                said.starts_with(&format!(
                    "TAMPERED: line 1: the export is of {of}, not of organization {asked}, whose \
                     export was asked for ("
                )),
                "{said}"
            );
        }
        // A checkpoint that does not open under the key is still the verdict.
        let forged = signed(&LogSigner::generate(ORIGIN).unwrap(), &events, 10);
        let key = LogSigner::generate(ORIGIN).unwrap().verifier();
        let r = verify_blocks(&file[..], Some((&forged, &key)), Some(asked), 2, BLOCK).unwrap();
        assert!(r.to_string().starts_with("FORGED: "), "{r}");
    }

    #[test]
    fn counts_of_one_read_in_the_singular() {
        let events = chain_from_v2(10, 3);
        // Position 1 is tenant 2's, 2 tenant 1's (v1), 3 tenant 2's (v2), 4 tenant 1's.
        let orgs: Vec<_> = events[..4].iter().map(|e| e.org).collect();
        assert_eq!(orgs, [tenant(2), tenant(1), tenant(2), tenant(1)]);
        // One full event and one stub of a v1 event.
        let said = check(&export(&events, tenant(2), 1, 2), None).to_string();
        for phrase in [
            "intact: 2 events (1 full, 1 stub) read in ",
            "; 1 position is a stub of a v1 event, another organization's by the exporter's \
             word: the file cannot show it is not this one's",
        ] {
            assert!(said.contains(phrase), "{said}");
        }
        // One event alone, and one stub of a v2 event.
        let said = check(&export(&events, tenant(1), 4, 4), None).to_string();
        assert!(
            said.starts_with("intact: 1 event (1 full, 0 stubs) read in "),
            "{said}"
        );
        let said = check(&export(&events, tenant(1), 3, 3), None).to_string();
        assert!(
            said.contains(
                "; 1 position is a stub whose tenant tag says it is not this organization's \
                 event (shown only against a checkpoint that covers it)"
            ),
            "{said}"
        );
        // A fault after one event: one line and one event before it.
        let mut edited = lines(&export(&events, tenant(2), 1, 2));
        edited[2] = edited[2].replacen("\"position\":2", "\"position\":3", 1);
        let said = check(&unlines(&edited), None).to_string();
        assert!(
            said.contains("(2 lines read in ")
                && said.contains("; 1 event before the fault checked out: 1 full, 0 stubs)"),
            "{said}"
        );
        let mut edited = lines(&export(&events, tenant(2), 1, 1));
        edited[1] = edited[1].replacen("\"n\": 1,", "\"n\": 0,", 1);
        let said = check(&unlines(&edited), None).to_string();
        assert!(
            said.contains("(1 line read in ")
                && said.contains("; 0 events before the fault checked out: 0 full, 0 stubs)"),
            "{said}"
        );
    }

    #[test]
    fn a_tampered_report_counts_what_checked_out_before_the_fault() {
        let events = chain(40);
        let mut edited = lines(&export(&events, tenant(1), 1, 40));
        // A full event well into the file, with stubs before it (line i holds position i).
        let p = (25..40)
            .find(|&p| edited[p].contains(&format!("\"n\": {p},")))
            .unwrap();
        edited[p] = edited[p].replacen(&format!("\"n\": {p},"), "\"n\": 0,", 1);
        let r = check(&unlines(&edited), None);
        let bad = r.first_bad.as_ref().and_then(|f| f.position);
        assert_eq!(bad, Some(p as i64), "{r}");
        assert!(r.stubs > 0, "{r}");
        // Every line is read; only the events before the first bad position are counted.
        assert_eq!(r.lines, 40);
        assert_eq!(r.full_events + r.stubs, bad.unwrap() as u64 - 1, "{r}");
        assert!(
            r.to_string().contains(&format!(
                "40 lines read in {:.3}s; {} events before the fault checked out: ",
                r.elapsed.as_secs_f64(),
                bad.unwrap() - 1
            )),
            "{r}"
        );
    }

    #[test]
    fn edits_of_the_file_are_found_where_they_are() {
        let events = chain(40);
        let full = lines(&export(&events, None, 1, 40));
        // Line i + 1 holds position i (line 0 is the header).

        let mut edited = full.clone();
        edited[12] = edited[12].replacen("\"n\": 12", "\"n\": 13", 1);
        assert_eq!(
            fault(&unlines(&edited)),
            chain_fault(12, Fault::ContentChanged)
        );

        let mut edited = full.clone();
        edited[14] = edited[14].replacen(&hex::encode(events[13].hash), &hex::encode([1u8; 32]), 1);
        assert_eq!(
            fault(&unlines(&edited)),
            chain_fault(14, Fault::ContentChanged)
        );

        let mut deleted = full.clone();
        deleted.remove(20);
        assert_eq!(fault(&unlines(&deleted)), chain_fault(20, Fault::Missing));
        assert_eq!(
            fault(&unlines(&full[..40])),
            chain_fault(40, Fault::Missing)
        );

        let mut swapped = full.clone();
        swapped.swap(20, 21);
        assert_eq!(fault(&unlines(&swapped)), chain_fault(20, Fault::Missing));

        // A line repeated: found at its own position, not as a gap after it.
        let mut repeated = full.clone();
        repeated.insert(21, full[20].clone());
        assert_eq!(fault(&unlines(&repeated)), chain_fault(20, Fault::Repeated));
        // A position below the range repeats nothing: the first one the file lacks is missing.
        let mut later = lines(&export(&events, None, 11, 40));
        assert!(later[1].starts_with("{\"position\":11,"), "{}", later[1]);
        later[1] = later[1].replacen("{\"position\":11,", "{\"position\":5,", 1);
        assert_eq!(fault(&unlines(&later)), chain_fault(11, Fault::Missing));

        let mut malformed = full.clone();
        malformed[30] = "{\"position\":30,".into();
        let f = check(&unlines(&malformed), None).first_bad.unwrap();
        assert_eq!((f.position, f.line), (Some(30), Some(31)));
        assert!(matches!(f.kind, FileFaultKind::MalformedLine(_)), "{f}");

        let mut extra = full.clone();
        extra.push(full[40].replacen("\"position\":40", "\"position\":41", 1));
        assert!(matches!(
            fault(&unlines(&extra)),
            Some((Some(41), FileFaultKind::MalformedLine(_)))
        ));

        // A stub where the whole log was promised.
        let mut stubbed = full.clone();
        stubbed[8] = format!(
            "{{\"position\":8,\"hash\":\"{}\"}}",
            hex::encode(events[7].hash)
        );
        assert!(matches!(
            fault(&unlines(&stubbed)),
            Some((Some(8), FileFaultKind::MalformedLine(_)))
        ));

        // recorded_at must say what recorded_at_micros says.
        let mut retimed = full.clone();
        retimed[3] = retimed[3].replacen(".000003Z", ".000004Z", 1);
        assert!(matches!(
            fault(&unlines(&retimed)),
            Some((Some(3), FileFaultKind::MalformedLine(_)))
        ));

        // An event moved: it hashes only at the position it was written at.
        let mut moved = full.clone();
        moved.remove(15);
        moved[15] = moved[15].replacen("\"position\":16", "\"position\":15", 1);
        let f = fault(&unlines(&moved));
        assert_eq!(f, chain_fault(15, Fault::Reordered { written_at: 16 }));
    }

    #[test]
    fn v2_stubs_show_they_are_not_the_organizations_own() {
        // v1 up to position 12, v2 from 13 on, as a log upgraded in service.
        let events = chain_from_v2(40, 13);
        let r = check(&export(&events, None, 1, 40), None);
        assert!(r.intact(), "{:?}", r.first_bad);
        let r = check(&export(&events, tenant(1), 1, 40), None);
        assert!(r.intact(), "{:?}", r.first_bad);
        assert_eq!((r.full_events, r.stubs, r.v1_stubs), (16, 24, 7));
        let text = r.to_string();
        assert!(
            text.contains("17 positions are stubs whose tenant tags"),
            "{text}"
        );
        assert!(
            text.contains("7 positions are stubs of v1 events"),
            "{text}"
        );
        // Only v2 events: no stub left unattributed.
        let r = check(&export(&events, tenant(1), 13, 40), None);
        assert!(r.intact() && r.v1_stubs == 0, "{r}");
        assert!(!r.to_string().contains("v1 events"), "{r}");

        let org = lines(&export(&events, tenant(1), 1, 40));
        let own = |from: i64| {
            (from..=40)
                .find(|p| events[*p as usize - 1].org == tenant(1))
                .unwrap()
        };
        // One of the organization's own v2 events left out as a v2 stub: its tag gives it away,
        // though its hash and links are right.
        let k = own(20);
        let mut hidden = org.clone();
        hidden[k as usize] = stub_line(&events[k as usize - 1]);
        assert_eq!(
            fault(&unlines(&hidden)),
            Some((Some(k), FileFaultKind::OwnEventAsStub))
        );
        // ... under a header that names another organization, so that the tag is not that
        // one's: the organization's events still in full give the file away, the first of
        // them at its position.
        let mut header: ExportHeader = serde_json::from_str(&hidden[0]).unwrap();
        header.organization_id = tenant(3);
        let mut h = Vec::new();
        header.write_line(&mut h);
        hidden[0] = String::from_utf8(h).unwrap().trim_end().to_string();
        let first = own(1);
        assert!(first < k);
        let r = check(&unlines(&hidden), None);
        let f = r.first_bad.clone().expect("a fault");
        assert_eq!(
            (f.position, f.line, f.kind),
            (
                Some(first),
                Some(first as u64 + 1),
                FileFaultKind::OtherTenantInFull {
                    tenant: tenant(1),
                    organization: tenant(3).unwrap(),
                }
            )
        );
        assert!(
            r.to_string().starts_with(&format!(
                "TAMPERED: first bad position {first}: an event of organization {} in full, \
                 in the export of organization {}, whose events alone are in full",
                tenant(1).unwrap(),
                tenant(3).unwrap()
            )),
            "{r}"
        );
        // A platform event in full is no organization's own either.
        let platform = (1..=40)
            .find(|p| events[*p as usize - 1].org.is_none())
            .unwrap();
        let mut shown = org.clone();
        let e = &events[platform as usize - 1];
        let mut line = Vec::new();
        write_event_line(&mut line, &e.fields(), &e.prev_hash, &e.hash);
        shown[platform as usize] = String::from_utf8(line).unwrap().trim_end().to_string();
        let f = check(&unlines(&shown), None).first_bad.expect("a fault");
        assert_eq!(
            (f.position, f.kind.to_string()),
            (
                Some(platform),
                format!(
                    "a platform event (of no organization) in full, in the export of \
                     organization {}, whose events alone are in full",
                    tenant(1).unwrap()
                )
            )
        );
        // ... or as a v1 stub, its hash alone: after v2 lines, refused as such.
        let mut hidden = org.clone();
        hidden[k as usize] = format!(
            "{{\"position\":{k},\"hash\":\"{}\"}}",
            hex::encode(events[k as usize - 1].hash)
        );
        assert_eq!(fault(&unlines(&hidden)), chain_fault(k, Fault::V1AfterV2));
        // A v2 event of the organization's as a hash-only stub at the start of the file: no
        // v2 line before it, so only a checkpoint (which signs where v2 begins) tells.
        let k = own(13);
        let mut from_k = lines(&export(&events, tenant(1), k, 40));
        from_k[1] = format!(
            "{{\"position\":{k},\"hash\":\"{}\"}}",
            hex::encode(events[k as usize - 1].hash)
        );
        let r = check(&unlines(&from_k), None);
        assert!(r.intact() && r.v1_stubs == 1, "{r}");
        let signer = LogSigner::generate(ORIGIN).unwrap();
        let note = signed(&signer, &events, 40);
        assert!(note.contains("\nhash-v2-from 13\n"), "{note}");
        let r = check(&unlines(&from_k), Some((&note, &signer.verifier())));
        let not_as_signed = FileFaultKind::HashVersionNotAsSigned {
            v2_from: Some(13),
            tree_size: 40,
        };
        assert_eq!(
            r.first_bad.map(|f| (f.position, f.kind)),
            Some((Some(k), not_as_signed.clone()))
        );
        // Past the checkpoint's size too (here the file starts just after it), once it signs
        // that v2 began.
        let k = own(21);
        let mut from_k = lines(&export(&events, tenant(1), k, 40));
        from_k[1] = format!(
            "{{\"position\":{k},\"hash\":\"{}\"}}",
            hex::encode(events[k as usize - 1].hash)
        );
        let note = signed(&signer, &events, k as usize - 1);
        let r = check(&unlines(&from_k), Some((&note, &signer.verifier())));
        assert_eq!(
            r.first_bad.map(|f| (f.position, f.kind)),
            Some((
                Some(k),
                FileFaultKind::HashVersionNotAsSigned {
                    v2_from: Some(13),
                    tree_size: k as u64 - 1
                }
            ))
        );
        let note = signed(&signer, &events, 40);
        // ... and a v1 event passed off as v2 before the signed boundary.
        let mut early = lines(&export(&events, None, 1, 40));
        let v2 = EventFields {
            hash_version: HashVersion::V2,
            ..events[4].fields()
        };
        let mut line = Vec::new();
        let rehashed = event_hash(&events[4].prev_hash, &v2);
        write_event_line(&mut line, &v2, &events[4].prev_hash, &rehashed);
        early[5] = String::from_utf8(line).unwrap().trim_end().to_string();
        let r = check(&unlines(&early), Some((&note, &signer.verifier())));
        assert_eq!(
            r.first_bad.map(|f| (f.position, f.kind)),
            Some((Some(5), not_as_signed))
        );

        // A v1 line after v2 ones in a later piece of the file: the join finds it.
        let whole = lines(&export(&events, None, 1, 40));
        let mut late = whole.clone();
        let v1 = events[35].fields();
        let v1 = EventFields {
            hash_version: HashVersion::V1,
            ..v1
        };
        let mut line = Vec::new();
        write_event_line(
            &mut line,
            &v1,
            &events[35].prev_hash,
            &event_hash(&events[35].prev_hash, &v1),
        );
        late[36] = String::from_utf8(line).unwrap().trim_end().to_string();
        assert_eq!(fault(&unlines(&late)), chain_fault(36, Fault::V1AfterV2));
        // ... which comes before its hash: a v1 line whose content was edited too is found by
        // the same rule, whichever piece it starts (`check` cuts the file several ways).
        late[36] = late[36].replacen("\"n\": 36", "\"n\": 37", 1);
        assert_eq!(fault(&unlines(&late)), chain_fault(36, Fault::V1AfterV2));

        // A v2 stub whose tag was changed (to pass for another tenant's) no longer hashes.
        let theirs = (20..=40)
            .find(|p| events[*p as usize - 1].org == tenant(2))
            .unwrap();
        let mut retagged = org.clone();
        let tag = hex::encode(stub_parts(&events[theirs as usize - 1].fields()).0);
        retagged[theirs as usize] =
            retagged[theirs as usize].replacen(&tag, &hex::encode([9u8; 32]), 1);
        assert_ne!(retagged, org);
        assert_eq!(
            fault(&unlines(&retagged)),
            chain_fault(theirs, Fault::ContentChanged)
        );
        // And one whose prev_hash is not the hash before it breaks the link there.
        let mut relinked = org.clone();
        let e = &events[theirs as usize - 1];
        let (tag, digest) = stub_parts(&e.fields());
        let forged = hash::chain_v2(&[5; 32], &tag, &digest);
        let mut line = Vec::new();
        write_stub_v2_line(&mut line, theirs, &[5; 32], &tag, &digest, &forged);
        relinked[theirs as usize] = String::from_utf8(line).unwrap().trim_end().to_string();
        assert_eq!(
            fault(&unlines(&relinked)),
            chain_fault(theirs, Fault::LinkBroken)
        );
        // The organization's own event as a stub that also breaks the link: the link comes
        // first (as in the sequential walk), whether or not the stub starts a piece.
        let k = own(20);
        let e = &events[k as usize - 1];
        let (tag, digest) = stub_parts(&e.fields());
        let forged = hash::chain_v2(&[5; 32], &tag, &digest);
        let mut line = Vec::new();
        write_stub_v2_line(&mut line, k, &[5; 32], &tag, &digest, &forged);
        let mut relinked = org.clone();
        relinked[k as usize] = String::from_utf8(line).unwrap().trim_end().to_string();
        assert_eq!(
            fault(&unlines(&relinked)),
            chain_fault(k, Fault::LinkBroken)
        );
        // A v2 event moved is found where it was written, as a v1 one is.
        let mut moved = whole.clone();
        moved.remove(25);
        moved[25] = moved[25].replacen("\"position\":26", "\"position\":25", 1);
        assert_eq!(
            fault(&unlines(&moved)),
            chain_fault(25, Fault::Reordered { written_at: 26 })
        );
    }

    #[test]
    fn a_stub_edited_breaks_the_next_full_events_link() {
        let events = chain(40);
        let org = lines(&export(&events, tenant(1), 1, 40));
        // Positions 2 (tenant 1's... no: even positions are tenant 1) — find a stub followed
        // by a full event: position 5 (platform) is a stub, 6 is tenant 1's... or not.
        let stub_then_full = (1..39)
            .find(|&p| !org[p].contains("aggregate_type") && org[p + 1].contains("aggregate_type"))
            .unwrap();
        let mut edited = org.clone();
        edited[stub_then_full] = format!(
            "{{\"position\":{stub_then_full},\"hash\":\"{}\"}}",
            hex::encode([7u8; 32])
        );
        assert_eq!(
            fault(&unlines(&edited)),
            chain_fault(stub_then_full as i64 + 1, Fault::LinkBroken)
        );
    }

    #[test]
    fn headers_are_checked() {
        let events = chain(10);
        let file = lines(&export(&events, None, 4, 10));
        let header_fault = |header: String| {
            let mut f = file.clone();
            f[0] = header;
            match check(&unlines(&f), None).first_bad {
                Some(FileFault {
                    kind: FileFaultKind::MalformedHeader(m),
                    ..
                }) => m,
                other => panic!("{other:?}"),
            }
        };
        assert!(
            header_fault(file[0].replacen("\"version\":2", "\"version\":3", 1))
                .contains("version 3")
        );
        assert!(header_fault(file[0].replacen("\"from\":4", "\"from\":5", 1)).contains("frontier"));
        assert!(header_fault("{}".into()).contains("not a `ledgerline-export` file"));
        assert!(
            header_fault(file[0].replacen("\"to\":10", "\"to\":10,\"x\":1", 1))
                .contains("unknown field")
        );
        // A first line with no newline after it: not a whole header.
        let r = check(file[0].as_bytes(), None);
        assert!(matches!(
            r.first_bad.map(|f| f.kind),
            Some(FileFaultKind::MalformedHeader(m)) if m == "no complete first line"
        ));
        // A wrong prev_hash in the header breaks the first link.
        let mut f = file.clone();
        f[0] = f[0].replacen(&hex::encode(events[2].hash), &hex::encode([3u8; 32]), 1);
        assert_eq!(fault(&unlines(&f)), chain_fault(4, Fault::LinkBroken));
    }

    #[test]
    fn an_empty_file_holds_no_events_and_a_blank_line_is_named() {
        // Nothing to check: the verifier could not run (exit 2), it found no fault.
        for empty in [&b""[..], b"\n", b" \t\r\n\n  \n", b"   "] {
            for (block, workers) in [(BLOCK, 1), (2, 2)] {
                let r = verify_blocks(empty, None, None, workers, block);
                assert!(
                    matches!(r, Err(OfflineError::NoEvents)),
                    "{empty:?}: {:?}",
                    r.map(|r| r.to_string())
                );
            }
        }
        assert_eq!(
            OfflineError::NoEvents.to_string(),
            "the file holds no events: it is empty (or only whitespace), with no export header"
        );
        // A forged checkpoint is a verdict whatever the file: it is still given.
        let events = chain(3);
        let forged = signed(&LogSigner::generate(ORIGIN).unwrap(), &events, 3);
        let key = LogSigner::generate(ORIGIN).unwrap().verifier();
        let r = verify_blocks(&b""[..], Some((&forged, &key)), None, 1, BLOCK).unwrap();
        assert!(
            r.to_string().starts_with("FORGED: checkpoint refused: "),
            "{r}"
        );

        let events = chain(10);
        let file = export(&events, tenant(1), 1, 10);
        // The exporter ends every line with one newline (the last one may be missing): a line
        // more, even an empty one, is a change of the file, named as what it is.
        let blank = |edited: &[u8]| {
            let r = check(edited, None);
            let said = r.to_string();
            let f = r.first_bad.expect("a fault");
            assert_eq!(f.kind, FileFaultKind::BlankLine, "{said}");
            (f.position, f.line, said)
        };
        let mut trailing = file.clone();
        trailing.push(b'\n');
        let (position, line, said) = blank(&trailing);
        assert_eq!((position, line), (Some(11), Some(12)));
        assert!(
            said.starts_with("TAMPERED: first bad position 11: blank line at line 12 "),
            "{said}"
        );
        // Spaces after the last newline, with no newline of their own.
        let mut spaces = file.clone();
        spaces.extend_from_slice(b"  ");
        assert_eq!(blank(&spaces).1, Some(12));
        // Within the file: at the position whose line it took.
        let mut within = lines(&file);
        within[4] = " \r".into();
        let (position, line, said) = blank(&unlines(&within));
        assert_eq!((position, line), (Some(4), Some(5)));
        assert!(
            said.starts_with("TAMPERED: first bad position 4: blank line at line 5 "),
            "{said}"
        );
        // Before the header: the header is not where it must be.
        let mut before = b"\n".to_vec();
        before.extend_from_slice(&file);
        let (position, line, said) = blank(&before);
        assert_eq!((position, line), (None, Some(1)));
        assert!(
            said.starts_with("TAMPERED: blank line at line 1 "),
            "{said}"
        );
        // Without the trailing newline the file is as written: intact.
        assert!(check(&file[..file.len() - 1], None).intact());
    }

    fn signed(signer: &LogSigner, events: &[Event], size: usize) -> String {
        let leaves = leaves(&events[..size]);
        signer.sign(&Checkpoint {
            origin: ORIGIN.into(),
            tree_size: size as u64,
            root: merkle::root::<Blake3>(&leaves),
            chain_head: if size == 0 {
                GENESIS
            } else {
                events[size - 1].hash
            },
            time: DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap(),
            hash_v2_from: events[..size]
                .iter()
                .find(|e| e.version == HashVersion::V2)
                .map(|e| e.position as u64),
        })
    }

    #[test]
    fn checkpoints_are_matched_by_chain_head_and_root() {
        let events = chain(40);
        let signer = LogSigner::generate(ORIGIN).unwrap();
        let key = signer.verifier();
        let file = export(&events, tenant(2), 11, 34);
        for size in [10, 11, 20, 33, 34] {
            let note = signed(&signer, &events, size);
            let r = check(&file, Some((&note, &key)));
            assert!(r.matches_checkpoint(), "size {size}: {:?}", r.first_bad);
            assert_eq!(
                r.root,
                Some(merkle::root::<Blake3>(&leaves(&events[..size])))
            );
        }

        let note = signed(&signer, &events, 36);
        let f = check(&file, Some((&note, &key))).first_bad.unwrap();
        assert_eq!(
            (f.position, f.kind),
            (Some(35), FileFaultKind::Truncated { tree_size: 36 })
        );

        let note = signed(&signer, &events, 9);
        assert!(matches!(
            verify_blocks(&file[..], Some((&note, &key)), None, 2, BLOCK),
            Err(OfflineError::CheckpointNotCovered {
                tree_size: 9,
                from: 11
            })
        ));

        // A forged signature: the checkpoint is refused, whatever the file, and reported as
        // `verify --since` reports a checkpoint that does not open under the key: FORGED.
        let forged = signed(&LogSigner::generate(ORIGIN).unwrap(), &events, 20);
        let r = check(&file, Some((&forged, &key)));
        let said = r.to_string();
        let f = r.first_bad.unwrap();
        assert!(matches!(
            f.kind,
            FileFaultKind::Checkpoint(NoteError::OtherKey { .. })
        ));
        assert!(said.starts_with(&format!("FORGED: {}", f.kind)), "{said}");
        let note = signed(&signer, &events, 20);
        let altered = note.replacen("\n20\n", "\n21\n", 1);
        let r = check(&file, Some((&altered, &key)));
        let said = r.to_string();
        let f = r.first_bad.unwrap();
        assert!(matches!(
            f.kind,
            FileFaultKind::Checkpoint(NoteError::BadSignature(_))
        ));
        assert!(
            said.starts_with("FORGED: checkpoint refused: the signature by key"),
            "{said}"
        );

        // A stub edited with no full event after it: only the root can tell.
        let mut edited = lines(&file);
        let last = edited.len() - 1;
        assert!(
            !edited[last].contains("aggregate_type"),
            "position 34 is a stub"
        );
        edited[last] = format!(
            "{{\"position\":34,\"hash\":\"{}\"}}",
            hex::encode([9u8; 32])
        );
        let edited = unlines(&edited);
        assert!(check(&edited, None).intact());
        let note = signed(&signer, &events, 34);
        let r = check(&edited, Some((&note, &key)));
        // A checkpoint that opens but does not match the file: the file is TAMPERED.
        assert!(
            r.to_string()
                .starts_with("TAMPERED: first bad position 34: chain head mismatch"),
            "{r}"
        );
        // The chain itself checked out: the count is not of events "before the fault".
        assert!(
            r.to_string().contains(
                "; the chain checked out through position 34, but does not match the checkpoint)"
            ),
            "{r}"
        );
        let f = r.first_bad.unwrap();
        assert_eq!(
            (f.position, f.kind),
            (Some(34), FileFaultKind::ChainHeadMismatch { tree_size: 34 })
        );
        let note = signed(&signer, &events, 33);
        assert!(check(&edited, Some((&note, &key))).matches_checkpoint());

        // A forged frontier: the chain links, the root does not match.
        let mut edited = lines(&file);
        let peak = hex::encode(Frontier::<Blake3>::new().root());
        let mut header: ExportHeader = serde_json::from_str(&edited[0]).unwrap();
        header.frontier[0] = hex_to_digest(&peak);
        let mut h = Vec::new();
        header.write_line(&mut h);
        edited[0] = String::from_utf8(h).unwrap().trim_end().to_string();
        let note = signed(&signer, &events, 20);
        let f = check(&unlines(&edited), Some((&note, &key)))
            .first_bad
            .unwrap();
        assert_eq!(
            (f.position, f.kind),
            (Some(20), FileFaultKind::RootMismatch { tree_size: 20 })
        );

        // A chain fault before the checkpoint's size comes first.
        let mut edited = lines(&file);
        edited.remove(5);
        let note = signed(&signer, &events, 30);
        let f = check(&unlines(&edited), Some((&note, &key)))
            .first_bad
            .unwrap();
        assert_eq!(
            (f.position, f.kind),
            (Some(15), FileFaultKind::Chain(Fault::Missing))
        );
    }

    fn hex_to_digest(h: &str) -> Digest {
        let mut d = [0; 32];
        hex::decode_to_slice(h, &mut d).unwrap();
        d
    }

    #[test]
    fn a_checkpoint_of_another_log_does_not_match() {
        let events = chain(5);
        let other = LogSigner::generate("other.test/log").unwrap();
        let note = other.sign(&Checkpoint {
            origin: "other.test/log".into(),
            tree_size: 5,
            root: merkle::root::<Blake3>(&leaves(&events)),
            chain_head: events[4].hash,
            time: DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap(),
            hash_v2_from: None,
        });
        let f = check(
            &export(&events, None, 1, 5),
            Some((&note, &other.verifier())),
        )
        .first_bad
        .unwrap();
        assert!(
            matches!(f.kind, FileFaultKind::OriginMismatch { .. }),
            "{f}"
        );
    }

    #[test]
    fn a_checkpoint_of_a_log_v2_from_its_first_event_says_so() {
        // A log created after migration 0010: every event v2, signed `hash-v2-from 1`.
        let events = chain_from_v2(10, 1);
        let signer = LogSigner::generate(ORIGIN).unwrap();
        let note = signed(&signer, &events, 10);
        assert!(note.contains("\nhash-v2-from 1\n"), "{note}");
        // One of the organization's own events passed off as a hash-only stub at the start
        // of the file, where no v2 line before it gives it away: the checkpoint does.
        let k = (1..=10)
            .find(|p| events[*p as usize - 1].org == tenant(1))
            .unwrap();
        let mut file = lines(&export(&events, tenant(1), k, 10));
        file[1] = format!(
            "{{\"position\":{k},\"hash\":\"{}\"}}",
            hex::encode(events[k as usize - 1].hash)
        );
        let r = check(&unlines(&file), Some((&note, &signer.verifier())));
        assert_eq!(
            r.first_bad.as_ref().map(|f| (f.position, f.kind.clone())),
            Some((
                Some(k),
                FileFaultKind::HashVersionNotAsSigned {
                    v2_from: Some(1),
                    tree_size: 10
                }
            ))
        );
        // There are no v1 events before position 1 to speak of.
        assert_eq!(
            r.first_bad.unwrap().kind.to_string(),
            "hash version not as signed: the checkpoint signs every event as v2"
        );
        // From a later position, both sides of the boundary are named.
        let later = FileFaultKind::HashVersionNotAsSigned {
            v2_from: Some(13),
            tree_size: 40,
        };
        assert_eq!(
            later.to_string(),
            "hash version not as signed: the checkpoint signs v1 events before position 13 \
             and v2 events from it"
        );
    }

    #[test]
    fn subtrees_grow_the_frontier_as_merkle_frontier_does() {
        let h: Digest = std::array::from_fn(|i| i as u8);
        assert_eq!(leaf(&h), Blake3::leaf(&h));
        assert_eq!(node(&h, &[9; 32]), Blake3::node(&h, &[9; 32]));
        let all: Vec<Digest> = (0u64..70).map(|i| Blake3::leaf(&i.to_be_bytes())).collect();
        for start in [0usize, 1, 5, 32, 63] {
            let mut f = Frontier::<Blake3>::new();
            for l in &all[..start] {
                f.push(*l);
            }
            // Pieces of every length from every start, joined in order.
            for piece in 1..=7 {
                let mut p = Peaks {
                    size: f.size(),
                    peaks: f.peaks().to_vec(),
                };
                let mut at = start;
                while at < all.len() {
                    let end = (at + piece).min(all.len());
                    for (level, root) in subtrees(at as u64, &all[at..end]) {
                        p.push(level, &root);
                    }
                    at = end;
                    assert_eq!(
                        p.root(),
                        merkle::root::<Blake3>(&all[..at]),
                        "{start} {piece}"
                    );
                }
            }
        }
    }

    #[test]
    fn checking_stops_after_a_fault_and_the_first_fault_is_the_verdict() {
        let events = chain(40);
        let full = lines(&export(&events, None, 1, 40));
        let mut edited = full.clone();
        for p in [30, 5, 22] {
            edited[p] = edited[p].replacen(&format!("\"n\": {p},"), "\"n\": 0,", 1);
        }
        let file = unlines(&edited);
        // Whatever the cut and the workers, the first fault in file order, every line counted.
        let r = check(&file, None);
        assert_eq!(
            r.first_bad.as_ref().map(|f| (f.position, f.kind.clone())),
            chain_fault(5, Fault::ContentChanged)
        );
        assert_eq!((r.lines, r.full_events), (40, 4));
        // One worker takes the pieces in order: once a piece has a fault, those after it are
        // counted, not checked; and the line that does not hash is searched for a reordering
        // once, for the reading kept.
        let (r, [pieces, searches, _]) = counted(&file, 1, BLOCK);
        assert_eq!(r.first_bad.map(|f| f.position), Some(Some(5)));
        assert_eq!(r.lines, 40);
        let first = pieces_of(&file, BLOCK, 1)
            .iter()
            .position(|lines| lines.contains(&6))
            .unwrap();
        assert_eq!((pieces, searches), (first as u64 + 1, 1));
    }

    /// The lines of each piece a verification with `workers` cuts `file` into (one block of
    /// `block` bytes or more), by their line numbers (1 is the header).
    fn pieces_of(file: &[u8], block: usize, workers: usize) -> Vec<Vec<usize>> {
        let header = file.iter().position(|b| *b == b'\n').unwrap() + 1;
        assert!(file.len() - header <= block, "one block");
        let body = &file[header..];
        let mut line = 2;
        pieces(body, PIECES_PER_BLOCK.max(workers))
            .into_iter()
            .map(|r| {
                let n = body[r].iter().filter(|b| **b == b'\n').count();
                line += n;
                (line - n..line).collect()
            })
            .collect()
    }

    /// `events` with every hash recomputed from the first on, as after an edit.
    fn rehash(events: &mut [Event]) {
        let mut prev = GENESIS;
        for e in events {
            e.prev_hash = prev;
            e.hash = event_hash(&prev, &e.fields());
            prev = e.hash;
        }
    }

    #[test]
    fn a_line_longer_than_the_limit_is_malformed_at_its_position() {
        // Events whose event at `at` has a line of `len` bytes (without its newline).
        let long = |at: usize, len: usize| {
            let padded = |n: usize| {
                let mut events = chain(4);
                events[at - 1].payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(n));
                rehash(&mut events);
                events
            };
            let base = lines(&export(&padded(0), None, 1, 4))[at].len();
            padded(len - base)
        };
        let events = long(2, LINE_LIMIT);
        let file = export(&events, None, 1, 4);
        assert_eq!(lines(&file)[2].len(), LINE_LIMIT);
        let r = check(&file, None);
        assert!(r.intact(), "{:?}", r.first_bad);

        let too_long = FileFaultKind::MalformedLine(format!(
            "longer than 16 MiB ({LINE_LIMIT} bytes), which no export line is"
        ));
        let events = long(2, LINE_LIMIT + 1);
        let file = export(&events, None, 1, 4);
        assert_eq!(lines(&file)[2].len(), LINE_LIMIT + 1);
        let r = check(&file, None);
        let f = r.first_bad.clone().expect("a fault");
        assert_eq!((f.position, f.line, &f.kind), (Some(2), Some(3), &too_long));
        // The lines after it are counted, as after any fault.
        assert_eq!(r.lines, 4);
        assert!(
            r.to_string().starts_with(
                "TAMPERED: first bad position 2: malformed line: longer than 16 MiB (16777216 \
                 bytes), which no export line is ("
            ),
            "{r}"
        );
        // Two of them, the last one without a newline: the first is reported.
        let mut events = long(4, LINE_LIMIT + 2);
        events[1].payload = events[3].payload.clone();
        rehash(&mut events);
        let mut file = export(&events, None, 1, 4);
        assert_eq!(file.pop(), Some(b'\n'));
        let r = check(&file, None);
        let f = r.first_bad.clone().expect("a fault");
        assert_eq!((f.position, f.line, &f.kind), (Some(2), Some(3), &too_long));
        assert_eq!(r.lines, 4);
        // The last one alone, where a block may end with it.
        let events = long(4, LINE_LIMIT + 1);
        let mut file = export(&events, None, 1, 4);
        assert_eq!(file.pop(), Some(b'\n'));
        let f = check(&file, None).first_bad.expect("a fault");
        assert_eq!((f.position, f.line, f.kind), (Some(4), Some(5), too_long));
    }

    #[test]
    fn the_lines_after_a_dropped_line_are_counted_as_a_sequential_walk_counts_them() {
        // The lines of positions 8 and 12 are so long that each small block size reaches the
        // limit at least a block before their newline: the reader drops them (`skip_line`)
        // rather than hold them, and keeps the rest of the block where one ends (in 8 MiB
        // blocks the read that passes the limit reaches the newline: they are held whole).
        // Between them, three short stubs of other tenants' events, so that in blocks of 700
        // and 2500 bytes the rest of the block where line 8 ends holds whole lines and the
        // start of line 12.
        let len = LINE_LIMIT + 3 * 2500;
        let org = tenant(1);
        let padded = |n: &dyn Fn(usize) -> usize| {
            let mut events = chain(13);
            for at in [8, 12] {
                events[at - 1].payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(n(at)));
            }
            rehash(&mut events);
            export(&events, org, 1, 13)
        };
        let base = lines(&padded(&|_| 0));
        let file = padded(&|at| len - base[at].len());
        let all = lines(&file);
        assert_eq!((all.len(), all[8].len(), all[12].len()), (14, len, len));
        assert!(
            all[9..12].iter().all(|l| l.len() < 100),
            "{:?}",
            &all[9..12]
        );

        let r = check(&file, None);
        let f = r.first_bad.clone().expect("a fault");
        let too_long = FileFaultKind::MalformedLine(too_long());
        assert_eq!((f.position, f.line, f.kind), (Some(8), Some(9), too_long));
        assert_eq!((r.lines, r.full_events, r.stubs), (13, 3, 4));
        // The path under test ran: each small block size dropped both lines.
        for (block, workers) in [(150, 2), (700, 3), (2500, 4)] {
            let (r, [.., skipped]) = counted(&file, workers, block);
            assert_eq!((r.lines, skipped), (13, 2), "block {block}");
        }
    }

    #[test]
    fn pieces_cut_at_line_boundaries() {
        let data = b"aa\nbbbb\nc\n\ndddddd\n";
        for n in 1..8 {
            let p: Vec<&[u8]> = pieces(data, n).into_iter().map(|r| &data[r]).collect();
            assert_eq!(p.concat(), data.to_vec(), "{n}");
            assert!(
                p.iter().all(|x| x.ends_with(b"\n") && !x.is_empty()),
                "{n}: {p:?}"
            );
        }
        assert!(pieces(b"", 3).is_empty());
    }
}
