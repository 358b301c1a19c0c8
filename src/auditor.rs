//! The auditor's commands beyond `verify`: checking the database's log against checkpoints
//! kept earlier (`verify --since`), printing proofs (`prove`), checking them offline
//! (`verify-proof`), and making signing keys (`keygen`). Exit codes as `verify`'s: 0 holds,
//! 1 tampered (or forged), 2 could not run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;

use crate::ledger::checkpoint::{describe_v2_from, Checkpoint, LogSigner, NoteError, NoteVerifier};
use crate::ledger::checkpoint_row::{self, CheckpointRow};
use crate::ledger::count;
use crate::ledger::merkle::{self, Blake3, Digest, Frontier, TreeHash};
use crate::ledger::tree;
use crate::ledger::verify::{verify_database, Report};
use crate::out::{out, outln};

/// A verifier key given as its text or as a file holding it.
pub fn load_verifier(given: &str) -> anyhow::Result<NoteVerifier> {
    if let Ok(key) = NoteVerifier::parse(given) {
        return Ok(key);
    }
    let text = std::fs::read_to_string(given)
        .with_context(|| format!("`{given}` is neither a verifier key nor a readable file"))?;
    NoteVerifier::parse(&text).with_context(|| format!("reading the verifier key in {given}"))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// A checkpoint file's claims for `prove`: opened with `key` when given (`Err` carries the
/// FORGED verdict), else read without checking its signature (whoever checks the proof
/// checks the signature).
fn claims(
    path: &Path,
    key: Option<&NoteVerifier>,
) -> anyhow::Result<Result<(PathBuf, Checkpoint), ExitCode>> {
    let note = read(path)?;
    let Some(key) = key else {
        let cp = Checkpoint::parse_unverified(&note)
            .with_context(|| format!("reading {}", path.display()))?;
        return Ok(Ok((path.to_path_buf(), cp)));
    };
    Ok(match key.open(&note) {
        Ok(cp) => Ok((path.to_path_buf(), cp)),
        // On stderr, as any refusal of `prove`: its standard output is only ever a proof.
        Err(e) => {
            eprintln!("FORGED: checkpoint {}: {e}", path.display());
            Err(ExitCode::from(1))
        }
    })
}

fn fail(message: String) -> ExitCode {
    outln!("{message}");
    ExitCode::from(1)
}

/// Opens every checkpoint with `key`; `Err` carries the verdict when one is forged or two
/// of the same size disagree (a fork: the log signed two different histories).
fn open_all(
    paths: &[PathBuf],
    key: &NoteVerifier,
) -> anyhow::Result<Result<Vec<(PathBuf, Checkpoint)>, ExitCode>> {
    let mut out: Vec<(PathBuf, Checkpoint)> = Vec::new();
    for path in paths {
        match key.open(&read(path)?) {
            Ok(cp) => out.push((path.clone(), cp)),
            Err(e) => {
                return Ok(Err(fail(format!(
                    "FORGED: checkpoint {}: {e}",
                    path.display()
                ))))
            }
        }
    }
    for (i, (pa, a)) in out.iter().enumerate() {
        for (pb, b) in &out[i + 1..] {
            if a.tree_size == b.tree_size && (a.root != b.root || a.chain_head != b.chain_head) {
                return Ok(Err(fail(format!(
                    "FORK: checkpoints {} and {} are both validly signed at tree size {} but name different logs",
                    pa.display(),
                    pb.display(),
                    a.tree_size
                ))));
            }
        }
    }
    out.sort_by_key(|(_, c)| c.tree_size);
    Ok(Ok(out))
}

/// `verify --since CP...`: recompute the whole chain, then prove the log as it is now
/// extends every checkpoint: its first `size` events have the signed root and chain head.
/// Stored hashes are used for the tree only after the chain check recomputed them all.
pub async fn verify_since(
    pool: &PgPool,
    workers: usize,
    since: &[PathBuf],
    key: &NoteVerifier,
) -> anyhow::Result<ExitCode> {
    let checkpoints = match open_all(since, key)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let report = verify_database(pool, workers)
        .await
        .context("reading the ledger")?;
    if let Some(bad) = &report.first_bad {
        return Ok(fail(format!(
            "TAMPERED: first bad position {}: {}",
            bad.position, bad.fault
        )));
    }
    let head = report.head_position as u64;
    let largest = checkpoints.last().map_or(0, |(_, c)| c.tree_size).min(head);
    // The chain verified, so each row's format is the one it was hashed in, and no v1 event
    // follows a v2 one: the first v2 position is where every checkpoint must say v2 begins.
    let first_v2 = first_v2(pool, report.head_position)
        .await
        .context("reading the ledger")?;
    let mut hashes = sqlx::query_as::<_, (Vec<u8>,)>(
        "SELECT hash FROM events WHERE position <= $1 ORDER BY position",
    )
    .bind(largest as i64)
    .fetch(pool);
    let mut frontier = Frontier::<Blake3>::new();
    let mut last: Digest = crate::ledger::hash::GENESIS;
    let mut matched: u64 = 0;
    for (path, cp) in &checkpoints {
        if cp.tree_size > head {
            return Ok(fail(format!(
                "TRUNCATED: first missing position {}: the log ends at position {head}, but checkpoint {} signed {}",
                head + 1,
                path.display(),
                count(cp.tree_size, "event", "events")
            )));
        }
        while frontier.size() < cp.tree_size {
            let (h,) = hashes
                .try_next()
                .await?
                .context("the ledger ended while reading")?;
            last = h
                .as_slice()
                .try_into()
                .context("a stored hash is not 32 bytes")?;
            frontier.push(Blake3::leaf(&last));
        }
        if frontier.root() != cp.root || last != cp.chain_head {
            return Ok(fail(format!(
                "REWRITTEN: the log's first {} not those checkpoint {} signed: an event at a position from {} to {} was changed and the chain recomputed after it",
                count(cp.tree_size, "event is", "events are"),
                path.display(),
                matched + 1,
                cp.tree_size
            )));
        }
        let signed_boundary = first_v2.map(|p| p as u64).filter(|p| *p <= cp.tree_size);
        if cp.hash_v2_from != signed_boundary {
            return Ok(fail(format!(
                "MISMATCH: checkpoint {} signs v2 hashes from {}, but the log's first v2 event among its {} is {}",
                path.display(),
                describe_v2_from(cp.hash_v2_from),
                cp.tree_size,
                signed_boundary.map_or("none".into(), |p| format!("at position {p}"))
            )));
        }
        matched = cp.tree_size;
    }
    // Past the checkpoints given, the database's own may still show a cut or a rewrite.
    let records = check_records(pool, &report, Some(key), true)
        .await
        .context("reading the log's checkpoints")?;
    if !records.intact() {
        return Ok(fail(records.to_string()));
    }
    out!(
        "consistent: the log ({}, intact) extends every checkpoint given (tree sizes {})",
        count(head, "event", "events"),
        checkpoints
            .iter()
            .map(|(_, c)| c.tree_size.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if head > largest {
        // As for an export (`OfflineReport::unsigned_from`): anyone can extend a chain.
        out!(
            "; positions {} to {head} are past the newest of them: they extend the signed \
             prefix, but no checkpoint given vouches for them (check them against a later one)",
            largest + 1
        );
    }
    outln!();
    Ok(ExitCode::SUCCESS)
}

/// What the database's own records of the log say about a chain that verified: its newest
/// signed checkpoint and how far the Merkle tree integrated. The chain alone cannot show a
/// cut tail or a rewrite with every later hash recomputed; these records can, unless the
/// same hand removed them too, which is why an auditor keeps checkpoints of their own.
///
/// What a checkpoint says is taken from its signed note, never from the row's other columns
/// (`tree_size`, `root`, `chain_head`, `signed_at`), which anyone who can write the database
/// can set: a row whose columns are not its note's is a finding of its own ([`RowFault`]).
#[derive(Debug)]
pub struct Records {
    /// What the newest note and the tree's size say of the events.
    pub verdict: Verdict,
    /// Checkpoint rows that are not what their own note says (or whose note is unreadable, or
    /// does not open under the key given), in the order of their `tree_size` column.
    pub rows: Vec<RowFault>,
    /// How many such rows there are in all (`rows` keeps the first few).
    pub rows_total: usize,
    /// The auditor passed checkpoints of their own (`--since`): not suggested again.
    since_given: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No checkpoint the database holds lies within the positions verified.
    None,
    /// The newest note's chain head is this log's at its size.
    Agree {
        size: u64,
        signed_at: String,
        /// Whether its signature was checked (`--public-key`).
        opened: bool,
    },
    /// The records covered positions the log no longer holds.
    Truncated {
        head: i64,
        covered: u64,
        by: &'static str,
    },
    /// The event at a note's size is not the one it signed.
    Rewritten { size: u64, signed_at: String },
}

/// A checkpoint row that cannot stand for its note, named by its `tree_size` column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowFault {
    /// The note is not a checkpoint at all.
    Unreadable { row: i64, why: String },
    /// The note does not open under the key given.
    Forged { row: i64, why: String },
    /// These columns are not what the note (of `note_size` events) signs.
    Disagrees {
        row: i64,
        columns: Vec<&'static str>,
        note_size: u64,
    },
}

/// How many faulty rows a report names.
const ROWS_NAMED: usize = 5;

impl std::fmt::Display for RowFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RowFault::Unreadable { row, why } => write!(
                f,
                "MISMATCH: checkpoint row {row} holds no readable signed note ({why}); it was \
                 ignored"
            ),
            RowFault::Forged { row, why } => write!(
                f,
                "FORGED: the note of checkpoint row {row} does not open under the key given \
                 ({why}); it was ignored"
            ),
            RowFault::Disagrees {
                row,
                columns,
                note_size,
            } => write!(
                f,
                "MISMATCH: checkpoint row {row} disagrees with its own signed note (of size \
                 {note_size}): its {} column{} {} not what the note signs; the row was changed \
                 or copied after signing (the signature covers the note alone, which is what \
                 was compared with the log)",
                columns.join(", "),
                if columns.len() == 1 { "" } else { "s" },
                if columns.len() == 1 { "is" } else { "are" }
            ),
        }
    }
}

impl std::fmt::Display for Records {
    /// The verdict first when it is on the events, then each faulty row on a line of its own.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut lines: Vec<String> = Vec::new();
        let verdict = self.verdict_text();
        if !self.verdict.intact() {
            lines.push(verdict.clone());
        }
        lines.extend(self.rows.iter().map(ToString::to_string));
        if self.rows_total > self.rows.len() {
            lines.push(format!(
                "and {} more",
                count(
                    (self.rows_total - self.rows.len()) as u64,
                    "checkpoint row",
                    "checkpoint rows"
                )
            ));
        }
        if self.verdict.intact() {
            lines.push(verdict);
        }
        f.write_str(&lines.join("\n"))
    }
}

impl Records {
    pub fn intact(&self) -> bool {
        self.verdict.intact() && self.rows_total == 0
    }

    fn verdict_text(&self) -> String {
        match &self.verdict {
            Verdict::None => "the database holds no checkpoint to compare with: a cut tail, or a \
                 rewrite with every later hash recomputed, reads as intact (keep checkpoints and \
                 pass --since)"
                .into(),
            Verdict::Agree {
                size,
                signed_at,
                opened,
            } => format!(
                "the database's newest checkpoint (size {size}, signed {signed_at}) agrees{}; \
                 positions past it, and a database whose checkpoints were rewritten too, are \
                 proven only against checkpoints kept outside it (pass --since)",
                if *opened {
                    ", its note opening under the key given"
                } else {
                    " (its note's signature not checked: pass --public-key)"
                }
            ),
            Verdict::Truncated { head, covered, by } => format!(
                "TRUNCATED: first missing position {}: the log ends at position {head}, but \
                 {by} covers {}",
                head + 1,
                count(*covered, "event", "events")
            ),
            Verdict::Rewritten { size, signed_at } => format!(
                "REWRITTEN: the event at position {size} is not the one the database's \
                 checkpoint signed {signed_at}: an event at or before it was changed and the \
                 chain recomputed after it{}",
                if self.since_given {
                    ""
                } else {
                    " (`verify --since` with the checkpoints kept outside narrows where)"
                }
            ),
        }
    }
}

impl Verdict {
    fn intact(&self) -> bool {
        matches!(self, Verdict::None | Verdict::Agree { .. })
    }
}

/// What a job that takes the log as the truth (a rebuild, a check, a claims repair) makes
/// sure of first, as plain `verify` does: the chain, then the database's checkpoints and tree
/// against it (a cut or a rewrite behind a signed checkpoint leaves a chain that links).
/// `Ok(Err(why))`: the log does not verify, and why, in `verify`'s words.
pub async fn verify_before_trusting(pool: &PgPool) -> Result<Result<Report, String>, sqlx::Error> {
    let report = verify_database(pool, 2).await?;
    if let Some(bad) = &report.first_bad {
        return Ok(Err(format!(
            "first bad position {}: {}",
            bad.position, bad.fault
        )));
    }
    let records = check_records(pool, &report, None, false).await?;
    if !records.intact() {
        return Ok(Err(records.to_string()));
    }
    Ok(Ok(report))
}

/// Compares a verified chain (`report`) with the database's records of the log: each
/// checkpoint row's note (opened with `key` when given) and the tree's size. Appends go on
/// meanwhile: a checkpoint is compared only if the walk reached its size, and a cut is one
/// below what the log holds now, not what the walk read. `since_given`: the caller compared
/// with the auditor's own checkpoints already.
pub async fn check_records(
    pool: &PgPool,
    report: &Report,
    key: Option<&NoteVerifier>,
    since_given: bool,
) -> Result<Records, sqlx::Error> {
    let (now_head, tree_size): (i64, i64) = sqlx::query_as(
        "SELECT coalesce((SELECT max(position) FROM events), 0),
                coalesce((SELECT size FROM merkle_state), 0)",
    )
    .fetch_one(pool)
    .await?;
    let sql = format!(
        "SELECT {} FROM checkpoints ORDER BY tree_size",
        checkpoint_row::COLUMNS
    );
    let mut rows = sqlx::query_as::<_, CheckpointRow>(&sql).fetch(pool);
    let mut faults = Vec::new();
    let mut rows_total = 0;
    // The newest note of all (for a cut), and the newest within the walk (for a rewrite).
    let mut newest: Option<Checkpoint> = None;
    let mut compared: Option<Checkpoint> = None;
    while let Some(row) = rows.try_next().await? {
        let read = match key {
            Some(key) => key.open(&row.note).map_err(|e| match e {
                NoteError::Malformed(_) => RowFault::Unreadable {
                    row: row.tree_size,
                    why: e.to_string(),
                },
                e => RowFault::Forged {
                    row: row.tree_size,
                    why: e.to_string(),
                },
            }),
            None => Checkpoint::parse_unverified(&row.note).map_err(|e| RowFault::Unreadable {
                row: row.tree_size,
                why: e.to_string(),
            }),
        };
        let fault = match &read {
            Err(fault) => Some(fault.clone()),
            Ok(cp) => {
                let columns = row.differs_from(cp);
                (!columns.is_empty()).then_some(RowFault::Disagrees {
                    row: row.tree_size,
                    columns,
                    note_size: cp.tree_size,
                })
            }
        };
        if let Some(fault) = fault {
            rows_total += 1;
            if faults.len() < ROWS_NAMED {
                faults.push(fault);
            }
        }
        // A note that does not open says nothing; one that opens says what it signs, whatever
        // row it was put in.
        if let Ok(cp) = read {
            let newer = |held: &Option<Checkpoint>| {
                held.as_ref().is_none_or(|h| h.tree_size < cp.tree_size)
            };
            if cp.tree_size <= report.head_position as u64 && newer(&compared) {
                compared = Some(cp.clone());
            }
            if newer(&newest) {
                newest = Some(cp);
            }
        }
    }
    let records = |verdict| Records {
        verdict,
        rows: faults,
        rows_total,
        since_given,
    };
    for (covered, by) in [
        (
            newest.map_or(0, |c| c.tree_size),
            "the database's newest signed checkpoint",
        ),
        (tree_size as u64, "the database's Merkle tree"),
    ] {
        if covered > now_head as u64 {
            return Ok(records(Verdict::Truncated {
                head: now_head,
                covered,
                by,
            }));
        }
    }
    let Some(cp) = compared else {
        return Ok(records(Verdict::None));
    };
    let held: Option<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM events WHERE position = $1")
        .bind(cp.tree_size as i64)
        .fetch_optional(pool)
        .await?;
    let signed_at = cp.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // The walk recomputed every stored hash up to its head, so the stored one stands for it.
    Ok(records(if held.as_deref() != Some(&cp.chain_head[..]) {
        Verdict::Rewritten {
            size: cp.tree_size,
            signed_at,
        }
    } else {
        Verdict::Agree {
            size: cp.tree_size,
            signed_at,
            opened: key.is_some(),
        }
    }))
}

/// The first position up to `head` whose event is v2, found by halving: a verified log is v1
/// events, then v2 ones (a few index look-ups, where a filter would read every v1 row).
async fn first_v2(pool: &PgPool, head: i64) -> Result<Option<i64>, sqlx::Error> {
    let v2_at = |position: i64| async move {
        let version: Option<i16> =
            sqlx::query_scalar("SELECT hash_version FROM events WHERE position = $1")
                .bind(position)
                .fetch_optional(pool)
                .await?;
        Ok::<_, sqlx::Error>(version == Some(2))
    };
    if head < 1 || !v2_at(head).await? {
        return Ok(None);
    }
    let (mut lo, mut hi) = (1, head);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if v2_at(mid).await? {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(Some(hi))
}

fn hexes(proof: &[Digest]) -> Vec<String> {
    proof.iter().map(hex::encode).collect()
}

/// A proof as `prove` prints it and `verify-proof` reads it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Proof {
    Inclusion {
        position: u64,
        tree_size: u64,
        event_hash: String,
        proof: Vec<String>,
    },
    Consistency {
        from_size: u64,
        to_size: u64,
        proof: Vec<String>,
    },
}

/// A proof from a tree that is not the one a checkpoint signed would not verify against it:
/// refused, on stderr, so that what goes to a proof file is only ever a proof (exit 1).
/// Which of the two is wrong, the file or the database, only the file's signature can tell:
/// `opened` says whether it was checked.
async fn tree_differs(
    pool: &PgPool,
    checkpoints: &[&(PathBuf, Checkpoint)],
    opened: bool,
) -> anyhow::Result<Option<ExitCode>> {
    for (path, cp) in checkpoints {
        if tree::root_at(pool, cp.tree_size).await? != cp.root {
            let size = cp.tree_size;
            if opened {
                eprintln!(
                    "MISMATCH: checkpoint {} opens under the key given, but the database's tree \
                     at size {size} is not the one it signed: the database's tree or log was \
                     changed (`ledgerline verify --since {}` says more)",
                    path.display(),
                    path.display()
                );
            } else {
                eprintln!(
                    "MISMATCH: checkpoint {} and the database disagree: its root at size {size} \
                     is not the database's tree's. Its signature was not checked, so either \
                     may be wrong: pass --public-key to check it",
                    path.display()
                );
            }
            return Ok(Some(ExitCode::from(1)));
        }
    }
    Ok(None)
}

pub async fn prove_inclusion(
    pool: &PgPool,
    position: u64,
    checkpoint: &Path,
    key: Option<&NoteVerifier>,
) -> anyhow::Result<ExitCode> {
    let file = match claims(checkpoint, key)? {
        Ok(file) => file,
        Err(code) => return Ok(code),
    };
    let cp = &file.1;
    let proof = tree::inclusion_proof(pool, position, cp.tree_size).await?;
    let (hash,): (Vec<u8>,) = sqlx::query_as("SELECT hash FROM events WHERE position = $1")
        .bind(position as i64)
        .fetch_one(pool)
        .await?;
    if let Some(code) = tree_differs(pool, &[&file], key.is_some()).await? {
        return Ok(code);
    }
    let out = Proof::Inclusion {
        position,
        tree_size: cp.tree_size,
        event_hash: hex::encode(hash),
        proof: hexes(&proof),
    };
    outln!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

pub async fn prove_consistency(
    pool: &PgPool,
    from: &Path,
    to: &Path,
    key: Option<&NoteVerifier>,
) -> anyhow::Result<ExitCode> {
    let (old, new) = match (claims(from, key)?, claims(to, key)?) {
        (Ok(old), Ok(new)) => (old, new),
        (Err(code), _) | (_, Err(code)) => return Ok(code),
    };
    let proof = tree::consistency_proof(pool, old.1.tree_size, new.1.tree_size).await?;
    if let Some(code) = tree_differs(pool, &[&old, &new], key.is_some()).await? {
        return Ok(code);
    }
    let out = Proof::Consistency {
        from_size: old.1.tree_size,
        to_size: new.1.tree_size,
        proof: hexes(&proof),
    };
    outln!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

fn digests(hexes: &[String]) -> anyhow::Result<Vec<Digest>> {
    hexes
        .iter()
        .map(|h| {
            hex::decode(h)
                .ok()
                .and_then(|b| b.try_into().ok())
                .with_context(|| format!("`{h}` is not a 32-byte hex hash"))
        })
        .collect()
}

/// `verify-proof`: checks a proof against signed checkpoints; no database.
pub fn verify_proof(proof: &Path, checkpoints: &[PathBuf], key: &str) -> anyhow::Result<ExitCode> {
    let key = load_verifier(key)?;
    let proof: Proof = serde_json::from_str(&read(proof)?).context("reading the proof")?;
    let opened = match open_all(checkpoints, &key)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let verdict = match (&proof, opened.as_slice()) {
        (
            Proof::Inclusion {
                position,
                tree_size,
                event_hash,
                proof,
            },
            [(_, cp)],
        ) => {
            anyhow::ensure!(
                *tree_size == cp.tree_size,
                "the proof is for tree size {tree_size}, the checkpoint for {}",
                cp.tree_size
            );
            anyhow::ensure!(*position >= 1, "positions start at 1");
            let event = digests(std::slice::from_ref(event_hash))?[0];
            merkle::verify_inclusion::<Blake3>(
                position - 1,
                *tree_size,
                &Blake3::leaf(&event),
                &digests(proof)?,
                &cp.root,
            )
            .map(|_| format!("valid: event {event_hash} is at position {position} of the log signed at size {tree_size}"))
        }
        (
            Proof::Consistency {
                from_size,
                to_size,
                proof,
            },
            [(_, old), (_, new)],
        ) => {
            anyhow::ensure!(
                (*from_size, *to_size) == (old.tree_size, new.tree_size),
                "the proof is for sizes {from_size} -> {to_size}, the checkpoints for {} -> {}",
                old.tree_size,
                new.tree_size
            );
            merkle::verify_consistency::<Blake3>(
                *from_size,
                *to_size,
                &old.root,
                &new.root,
                &digests(proof)?,
            )
            .map(|_| format!("valid: the log signed at size {to_size} extends the one signed at size {from_size}"))
        }
        (Proof::Inclusion { .. }, _) => anyhow::bail!("an inclusion proof needs one checkpoint"),
        (Proof::Consistency { .. }, _) => {
            anyhow::bail!("a consistency proof needs two checkpoints, the older first")
        }
    };
    Ok(match verdict {
        Ok(message) => {
            outln!("{message}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("INVALID: {e}")),
    })
}

/// `keygen`: a new checkpoint signing key and its verifier key.
pub fn keygen(origin: &str) -> anyhow::Result<ExitCode> {
    let signer = LogSigner::generate(origin)?;
    outln!(
        "{}",
        json!({
            "signing_key": signer.seed_hex(),
            "verifier_key": signer.verifier().to_string(),
        })
    );
    Ok(ExitCode::SUCCESS)
}
