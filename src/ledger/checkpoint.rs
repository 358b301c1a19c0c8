//! Signed checkpoints in the C2SP `tlog-checkpoint` format: a `signed-note` whose text names
//! the log (origin), the tree size and the Merkle root, with extension lines of ours: the
//! chain head hash, the time and, once the tree holds a v2 event, the first v2 position.
//! Ed25519 keys as the signed-note spec defines them (signature type 0x01, key ID =
//! SHA-256(name || 0x0A || 0x01 || public key)[:4]).
//!
//! ```text
//! ledgerline.example/log
//! 1042
//! <base64 Merkle root>
//! chain-head <hex hash of event 1042>
//! time 2026-11-22T03:04:05Z
//! hash-v2-from 1001
//!
//! — ledgerline.example/log <base64(key ID || signature)>
//! ```

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::RngCore;
use sha2::{Digest as _, Sha256};

use super::hash::HashVersion;
use super::merkle::Digest;

/// A checkpoint's `hash_v2_from` in words, for reports.
pub fn describe_v2_from(v2_from: Option<u64>) -> String {
    v2_from.map_or("no position".into(), |p| format!("position {p}"))
}

/// The signed-note signature type of Ed25519.
const ED25519: u8 = 0x01;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub tree_size: u64,
    pub root: Digest,
    /// The hash of the event at position `tree_size` (genesis zeros for an empty log).
    pub chain_head: Digest,
    /// Whole seconds: the note's text must be reproducible.
    pub time: DateTime<Utc>,
    /// The first position of the tree whose event is hashed in v2 (docs/ledger-format.md);
    /// `None`: every event of the tree is v1. It tells an export's verifier which format each
    /// line must be in, so that no v2 event can pass for a v1 one (whose stub shows nothing of
    /// whose it is).
    pub hash_v2_from: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
    #[error("the checkpoint carries no signature by key `{0}`")]
    NoSignature(String),
    /// Signed under the key's name by another key: an impostor's, or the auditor holds
    /// another key than the log's. Which of the two, the note cannot tell.
    #[error(
        "the checkpoint is signed as `{name}` by key id {signed_by}, not by the key given (id \
         {key_id}): it is forged, or the key given is not the log's"
    )]
    OtherKey {
        name: String,
        key_id: String,
        signed_by: String,
    },
    #[error("the signature by key `{0}` does not verify: the checkpoint is forged or altered")]
    BadSignature(String),
    #[error("malformed verifier key: {0}")]
    BadKey(String),
}

impl Checkpoint {
    /// The format this checkpoint signs for the event at `position`: v2 from `hash_v2_from`
    /// on (past the tree too, as the writer never goes back), v1 before it; v1 up to the
    /// tree's size when it signs no v2 event, and nothing past that.
    pub fn signed_format(&self, position: u64) -> Option<HashVersion> {
        match self.hash_v2_from {
            Some(from) if position >= from => Some(HashVersion::V2),
            Some(_) => Some(HashVersion::V1),
            None => (position <= self.tree_size).then_some(HashVersion::V1),
        }
    }

    /// The note text: every line the signature covers, ending in a newline.
    pub fn text(&self) -> String {
        let mut text = format!(
            "{}\n{}\n{}\nchain-head {}\ntime {}\n",
            self.origin,
            self.tree_size,
            B64.encode(self.root),
            hex::encode(self.chain_head),
            self.time.to_rfc3339_opts(SecondsFormat::Secs, true)
        );
        if let Some(p) = self.hash_v2_from {
            text.push_str(&format!("hash-v2-from {p}\n"));
        }
        text
    }

    /// Parses a note text (without signatures).
    pub fn parse_text(text: &str) -> Result<Checkpoint, NoteError> {
        let bad = |m: &str| NoteError::Malformed(m.to_string());
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| bad("the text must end in a newline"))?;
        let mut lines = body.split('\n');
        let mut next = |what: &str| {
            lines
                .next()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| bad(&format!("missing {what}")))
        };
        let origin = next("origin")?.to_string();
        let size_text = next("tree size")?;
        if size_text.len() > 1 && size_text.starts_with('0') {
            return Err(bad("the tree size has a leading zero"));
        }
        let tree_size = size_text
            .parse::<u64>()
            .map_err(|_| bad("the tree size is not a decimal number"))?;
        let root = digest(
            &B64.decode(next("root hash")?)
                .map_err(|_| bad("root hash"))?,
        )
        .ok_or_else(|| bad("the root hash is not 32 bytes"))?;
        let head_text = next("chain head")?
            .strip_prefix("chain-head ")
            .ok_or_else(|| bad("expected `chain-head <hex>`"))?;
        let chain_head = digest(&hex::decode(head_text).map_err(|_| bad("chain head"))?)
            .ok_or_else(|| bad("the chain head is not 32 bytes"))?;
        let time_text = next("time")?
            .strip_prefix("time ")
            .ok_or_else(|| bad("expected `time <RFC 3339>`"))?;
        let time = DateTime::parse_from_rfc3339(time_text)
            .map_err(|_| bad("time"))?
            .with_timezone(&Utc);
        let hash_v2_from = match lines.next() {
            None => None,
            Some(line) => {
                let p = line
                    .strip_prefix("hash-v2-from ")
                    .filter(|p| !p.starts_with('0') && p.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|p| p.parse::<u64>().ok())
                    .filter(|p| *p <= tree_size)
                    .ok_or_else(|| {
                        bad("expected `hash-v2-from <position>`, a position of the tree")
                    })?;
                Some(p)
            }
        };
        if lines.next().is_some() {
            return Err(bad("unexpected extension line"));
        }
        let checkpoint = Checkpoint {
            origin,
            tree_size,
            root,
            chain_head,
            time,
            hash_v2_from,
        };
        // One checkpoint, one text: the parsers above also take `+42`, capital hex and other
        // times than whole seconds in UTC, which no signer here writes.
        if checkpoint.text() != text {
            return Err(bad(
                "not in the form ledgerline writes (a tree size with a sign, a chain head in \
                 capitals, a time not in whole seconds with Z?)",
            ));
        }
        Ok(checkpoint)
    }

    /// A whole signed note's claims, its signature NOT checked: for comparing what a note says
    /// with what is stored beside it, or to find the size a proof is wanted for. Whoever relies
    /// on the claims opens the note with [`NoteVerifier::open`]. Split as `open` splits it, so
    /// what it refuses in form (control characters, a line below the blank one that is no
    /// signature line) no reader takes either.
    pub fn parse_unverified(note: &str) -> Result<Checkpoint, NoteError> {
        let (text, signatures) = split_note(note)?;
        for line in signature_lines(signatures) {
            line?;
        }
        Checkpoint::parse_text(text)
    }
}

/// Who a note says signed it, no signature checked: each signature line's key name and key id
/// (hex), when the note is well formed (its text parses, and every signature line is an
/// Ed25519 one: `— <name> base64(key id || 64-byte signature)`). Tells a note that another
/// key signed from one that was damaged, which names no signer, or not in this form.
pub fn note_signers(note: &str) -> Result<Vec<(String, String)>, NoteError> {
    let (text, signatures) = split_note(note)?;
    Checkpoint::parse_text(text)?;
    signature_lines(signatures)
        .map(|line| {
            let (name, blob) = line?;
            if blob.len() != 4 + Signature::BYTE_SIZE {
                return Err(NoteError::Malformed("not an Ed25519 signature".into()));
            }
            Ok((name.to_string(), hex::encode(&blob[..4])))
        })
        .collect()
}

/// A signed note's text (through the newline before its blank line) and its signatures,
/// nothing checked but their form: no control characters but newlines, and a blank line.
fn split_note(note: &str) -> Result<(&str, &str), NoteError> {
    let bad = |m: &str| NoteError::Malformed(m.to_string());
    if note.chars().any(|c| c.is_control() && c != '\n') {
        return Err(bad("control characters"));
    }
    let split = note
        .find("\n\n")
        .ok_or_else(|| bad("no blank line before the signatures"))?;
    Ok((&note[..=split], &note[split + 2..]))
}

/// Each signature line's key name and decoded blob (key id, then signature), in order, each
/// line refused if it is not `— <name> <base64>`. Blank lines after the signatures (a file
/// saved with an extra newline) are ignored.
fn signature_lines(
    signatures: &str,
) -> impl Iterator<Item = Result<(&str, Vec<u8>), NoteError>> + '_ {
    let bad = |m: &str| NoteError::Malformed(m.to_string());
    signatures
        .lines()
        .filter(|l| !l.is_empty())
        .map(move |line| {
            let rest = line
                .strip_prefix("\u{2014} ")
                .ok_or_else(|| bad("a signature line must start with an em dash"))?;
            let (name, blob) = rest
                .split_once(' ')
                .ok_or_else(|| bad("a signature line needs a name and a signature"))?;
            let blob = B64
                .decode(blob)
                .map_err(|_| bad("signature is not base64"))?;
            Ok((name, blob))
        })
}

fn digest(bytes: &[u8]) -> Option<Digest> {
    bytes.try_into().ok()
}

fn key_id(name: &str, public: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ED25519]);
    h.update(public.as_bytes());
    h.finalize()[..4].try_into().expect("4 bytes")
}

/// The log's signing key and name. Never printed.
pub struct LogSigner {
    name: String,
    key: SigningKey,
    /// The newest checkpoint signed with this instance, which every later one must extend
    /// (`tree::sign_checkpoint`): kept outside the database it vouches for.
    last_signed: std::sync::Mutex<Option<Checkpoint>>,
    /// Where that checkpoint's note is kept across restarts, if anywhere.
    anchor_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for LogSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogSigner({}, ***)", self.name)
    }
}

impl LogSigner {
    /// From the 32-byte Ed25519 seed in hex, as the operator provides it.
    pub fn from_hex(name: &str, seed_hex: &str) -> Result<Self, NoteError> {
        let t = seed_hex.trim();
        let seed: [u8; 32] = hex::decode(t)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                NoteError::BadKey(format!(
                    "the signing key must be 64 hex characters (a 32-byte Ed25519 seed); got {} characters",
                    t.len()
                ))
            })?;
        Self::new(name, SigningKey::from_bytes(&seed))
    }

    pub fn generate(name: &str) -> Result<Self, NoteError> {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        Self::new(name, SigningKey::from_bytes(&seed))
    }

    fn new(name: &str, key: SigningKey) -> Result<Self, NoteError> {
        check_name(name)?;
        Ok(Self {
            name: name.to_string(),
            key,
            last_signed: std::sync::Mutex::new(None),
            anchor_file: None,
        })
    }

    /// Keeps the newest signed note in `path` from now on, starting from the one there (a
    /// note that does not open under this key is refused: the file was altered, or is
    /// another key's).
    pub fn with_anchor_file(mut self, path: std::path::PathBuf) -> Result<Self, NoteError> {
        match std::fs::read_to_string(&path) {
            Ok(note) => {
                let checkpoint = self.verifier().open(&note)?;
                self.remember(&checkpoint, None);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(NoteError::BadKey(format!(
                    "reading the checkpoint anchor {}: {e}",
                    path.display()
                )))
            }
        }
        // Found out now, not at the first signing: an anchor that cannot be kept protects
        // nothing after a restart.
        let probe = aside(&path);
        keep_file(&probe, "").map_err(|e| {
            NoteError::BadKey(format!(
                "the checkpoint anchor {} cannot be written: {e}",
                path.display()
            ))
        })?;
        let _ = std::fs::remove_file(probe);
        self.anchor_file = Some(path);
        Ok(self)
    }

    /// The file the newest signed note is kept in, if any.
    pub fn anchor_file(&self) -> Option<&std::path::Path> {
        self.anchor_file.as_deref()
    }

    /// The newest checkpoint this instance signed, if any.
    pub fn last_signed(&self) -> Option<Checkpoint> {
        self.last_signed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records `checkpoint` as signed, unless a larger one already is; with its `note`, also
    /// in the anchor file (written aside and renamed, so a crash leaves the old one whole).
    pub fn remember(&self, checkpoint: &Checkpoint, note: Option<&str>) {
        let mut last = self.last_signed.lock().unwrap_or_else(|e| e.into_inner());
        // One it already holds at the same size is not news (nor written again).
        if last
            .as_ref()
            .is_some_and(|l| l.tree_size >= checkpoint.tree_size)
        {
            return;
        }
        *last = Some(checkpoint.clone());
        if let (Some(path), Some(note)) = (&self.anchor_file, note) {
            let aside = aside(path);
            let kept = keep_file(&aside, note).and_then(|()| {
                std::fs::rename(&aside, path)?;
                // The rename itself, durable.
                match path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    Some(dir) => std::fs::File::open(dir)?.sync_all(),
                    None => Ok(()),
                }
            });
            if let Err(e) = kept {
                let _ = std::fs::remove_file(&aside);
                // The process still remembers it; only a restart would not.
                tracing::warn!(error = %e, path = %path.display(), "could not keep the checkpoint anchor");
            }
        }
    }

    pub fn seed_hex(&self) -> String {
        hex::encode(self.key.to_bytes())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            id: key_id(&self.name, &self.key.verifying_key()),
            key: self.key.verifying_key(),
        }
    }

    /// The whole signed note: text, blank line, one signature line.
    pub fn sign(&self, checkpoint: &Checkpoint) -> String {
        let text = checkpoint.text();
        let signature = self.key.sign(text.as_bytes());
        let id = key_id(&self.name, &self.key.verifying_key());
        let blob = [id.as_slice(), &signature.to_bytes()].concat();
        format!("{text}\n\u{2014} {} {}\n", self.name, B64.encode(blob))
    }
}

/// A file of its own beside `path` to write before renaming over it: another process with
/// the same anchor (a rolling restart) must not truncate it under this one.
fn aside(path: &std::path::Path) -> std::path::PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{}.partial", uuid::Uuid::new_v4().simple()))
}

/// Writes `text` to a new file `path` and flushes it to disk.
fn keep_file(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create_new(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Key names may not contain spaces or `+` (they appear in signature lines and key texts),
/// nor control characters, which no note may hold: a key of such a name could sign notes
/// that no reader takes.
fn check_name(name: &str) -> Result<(), NoteError> {
    if name.is_empty()
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '+')
    {
        return Err(NoteError::BadKey(format!(
            "the log name {name:?} must be non-empty, without spaces, control characters or `+`"
        )));
    }
    Ok(())
}

/// A public key in the signed-note verifier-key text form `<name>+<hex key ID>+<base64(0x01 ||
/// public key)>`: what an auditor keeps to check checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    id: [u8; 4],
    key: VerifyingKey,
}

impl fmt::Display for NoteVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let blob = [[ED25519].as_slice(), self.key.as_bytes()].concat();
        write!(
            f,
            "{}+{}+{}",
            self.name,
            hex::encode(self.id),
            B64.encode(blob)
        )
    }
}

impl NoteVerifier {
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let bad = |m: &str| NoteError::BadKey(m.to_string());
        let mut parts = text.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(blob)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected `<name>+<hex key id>+<base64 key>`"));
        };
        check_name(name)?;
        let id: [u8; 4] = hex::decode(id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("the key id is not 8 hex characters"))?;
        let blob = B64.decode(blob).map_err(|_| bad("the key is not base64"))?;
        // `split_first`: an empty key (`...+`) is refused, not sliced past its end.
        let raw = match blob.split_first() {
            Some((&ED25519, rest)) => <[u8; 32]>::try_from(rest).ok(),
            _ => None,
        };
        let Some(raw) = raw else {
            return Err(bad("not an Ed25519 (type 0x01) 32-byte public key"));
        };
        let key = VerifyingKey::from_bytes(&raw).map_err(|_| bad("not an Ed25519 point"))?;
        if key_id(name, &key) != id {
            return Err(bad("the key id does not match the name and key"));
        }
        Ok(Self {
            name: name.to_string(),
            id,
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }

    /// The key id in hex, as verifier keys and [`NoteError::OtherKey`] show it.
    pub fn key_id_hex(&self) -> String {
        hex::encode(self.id)
    }

    /// Checks the note's signature by this key and parses its text. Signatures by other keys
    /// are ignored, as the signed-note spec requires.
    pub fn open(&self, note: &str) -> Result<Checkpoint, NoteError> {
        let (text, signatures) = split_note(note)?;
        let mut found = false;
        let mut others = Vec::new();
        for line in signature_lines(signatures) {
            let (name, blob) = line?;
            if name != self.name || blob.len() < 4 {
                continue;
            }
            if blob[..4] != self.id {
                others.push(hex::encode(&blob[..4]));
                continue;
            }
            found = true;
            let signature = Signature::from_slice(&blob[4..])
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
            self.key
                .verify(text.as_bytes(), &signature)
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
        }
        if !found && !others.is_empty() {
            return Err(NoteError::OtherKey {
                name: self.name.clone(),
                key_id: self.key_id_hex(),
                signed_by: others.join(", "),
            });
        }
        if !found {
            return Err(NoteError::NoSignature(self.name.clone()));
        }
        let checkpoint = Checkpoint::parse_text(text)?;
        // A log signs as itself (C2SP: the key name matches the origin line); a note of
        // another origin under this key is not this log's checkpoint.
        if checkpoint.origin != self.name {
            return Err(NoteError::Malformed(format!(
                "the origin `{}` is not the signing key's log `{}`",
                checkpoint.origin, self.name
            )));
        }
        Ok(checkpoint)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;

    /// A checkpoint of 42 events, for tests here and of what reads checkpoints.
    pub(crate) fn checkpoint() -> Checkpoint {
        Checkpoint {
            origin: "ledgerline.test/log".into(),
            tree_size: 42,
            root: [7u8; 32],
            chain_head: [9u8; 32],
            time: Utc.with_ymd_and_hms(2026, 11, 22, 3, 4, 5).unwrap(),
            hash_v2_from: None,
        }
    }

    #[test]
    fn a_signed_checkpoint_opens_with_its_key_and_round_trips() {
        let signer = LogSigner::generate("ledgerline.test/log").unwrap();
        let note = signer.sign(&checkpoint());
        assert!(note.starts_with("ledgerline.test/log\n42\n"));
        assert!(note.contains("\n\n\u{2014} ledgerline.test/log "));
        let verifier = NoteVerifier::parse(&signer.verifier().to_string()).unwrap();
        assert_eq!(verifier.open(&note).unwrap(), checkpoint());
    }

    #[test]
    fn the_first_v2_position_is_signed_when_there_is_one() {
        let signer = LogSigner::generate("ledgerline.test/log").unwrap();
        let upgraded = Checkpoint {
            hash_v2_from: Some(40),
            ..checkpoint()
        };
        let note = signer.sign(&upgraded);
        assert!(
            note.contains("\ntime 2026-11-22T03:04:05Z\nhash-v2-from 40\n\n"),
            "{note}"
        );
        assert_eq!(signer.verifier().open(&note).unwrap(), upgraded);
        assert!(!signer.sign(&checkpoint()).contains("hash-v2-from"));
        for bad in [
            "hash-v2-from 43",
            "hash-v2-from 040",
            "hash-v2-from 0",
            "hash-v2-from +40",
            "hash-v2-from x",
            "hash-v2 40",
        ] {
            let text = checkpoint().text() + bad + "\n";
            assert!(Checkpoint::parse_text(&text).is_err(), "{bad}");
        }
        let text = upgraded.text() + "more 1\n";
        assert!(Checkpoint::parse_text(&text).is_err());
    }

    #[test]
    fn a_note_saved_with_a_trailing_newline_still_opens() {
        let signer = LogSigner::generate("ledgerline.test/log").unwrap();
        let note = format!("{}\n", signer.sign(&checkpoint()));
        assert_eq!(signer.verifier().open(&note).unwrap(), checkpoint());
    }

    #[test]
    fn any_change_to_the_text_breaks_the_signature() {
        let signer = LogSigner::generate("ledgerline.test/log").unwrap();
        let note = signer.sign(&checkpoint());
        let altered = note.replacen("\n42\n", "\n43\n", 1);
        assert_eq!(
            signer.verifier().open(&altered),
            Err(NoteError::BadSignature("ledgerline.test/log".into()))
        );
    }

    #[test]
    fn another_key_of_the_same_name_is_not_trusted() {
        let signer = LogSigner::generate("ledgerline.test/log").unwrap();
        let impostor = LogSigner::generate("ledgerline.test/log").unwrap();
        let note = impostor.sign(&checkpoint());
        let refused = signer.verifier().open(&note).unwrap_err();
        let id = |s: &LogSigner| {
            s.verifier()
                .to_string()
                .split('+')
                .nth(1)
                .unwrap()
                .to_string()
        };
        let (ours, theirs) = (id(&signer), id(&impostor));
        assert_eq!(
            refused,
            NoteError::OtherKey {
                name: "ledgerline.test/log".into(),
                key_id: ours,
                signed_by: theirs,
            }
        );
        assert!(refused
            .to_string()
            .contains("or the key given is not the log's"));
        // A note that no key of the name signed.
        let unsigned = note.split("\n\n").next().unwrap().to_string() + "\n\n";
        assert!(matches!(
            signer.verifier().open(&unsigned),
            Err(NoteError::NoSignature(_)) | Err(NoteError::Malformed(_))
        ));
    }

    #[test]
    fn a_note_names_its_signers_unless_it_is_damaged() {
        let signer = LogSigner::generate("ledgerline.test/log").unwrap();
        let note = signer.sign(&checkpoint());
        let id = signer.verifier().key_id_hex();
        assert_eq!(
            note_signers(&note).unwrap(),
            vec![("ledgerline.test/log".to_string(), id)]
        );
        // Whatever its signature says: this only reads who it names.
        let altered = note.replacen("\n42\n", "\n43\n", 1);
        assert_eq!(note_signers(&altered).unwrap().len(), 1);
        let (text, line) = note.split_once("\n\n").unwrap();
        let (sig_name, blob) = line.trim_end().rsplit_once(' ').unwrap();
        let short = B64.encode(&B64.decode(blob).unwrap()[..20]);
        for damaged in [
            format!("{text}\nmore 1\n\n{line}"),
            format!("{text}\n\n{sig_name} {short}\n"),
            format!("{text}\n\n- ledgerline.test/log {blob}"),
            format!("{text}\n\n{sig_name} not*base64\n"),
            text.to_string(),
        ] {
            assert!(note_signers(&damaged).is_err(), "{damaged:?}");
        }
    }

    #[test]
    fn verifier_keys_are_checked() {
        let signer = LogSigner::generate("a.test/log").unwrap();
        let text = signer.verifier().to_string();
        assert!(NoteVerifier::parse(&text.replacen("a.test", "b.test", 1)).is_err());
        assert!(NoteVerifier::parse("nonsense").is_err());
        // An empty key, a type byte alone, a key a byte short: refused, not a panic.
        // Split after the id, not at the last `+`: base64 has `+` too, and a key ending in one
        // would give back the whole key with the empty blob (about one run in 64).
        let (name, rest) = text.split_once('+').unwrap();
        let (id, _) = rest.split_once('+').unwrap();
        let name_and_id = format!("{name}+{id}");
        for blob in ["", "AQ==", &B64.encode([1u8; 32])] {
            assert!(matches!(
                NoteVerifier::parse(&format!("{name_and_id}+{blob}")),
                Err(NoteError::BadKey(_))
            ));
        }
        assert!(LogSigner::from_hex("a.test/log", "abcd").is_err());
        let again = LogSigner::from_hex("a.test/log", &signer.seed_hex()).unwrap();
        assert_eq!(again.verifier(), signer.verifier());
    }

    /// `parse_unverified` reads a note as `open` does: what it takes in form, so does the
    /// other, and only the signature tells them apart.
    #[test]
    fn an_unverified_note_is_split_as_an_opened_one() {
        let signer = LogSigner::generate("ledgerline.test/log").unwrap();
        let note = signer.sign(&checkpoint());
        assert_eq!(Checkpoint::parse_unverified(&note).unwrap(), checkpoint());
        let saved = format!("{note}\n");
        assert_eq!(Checkpoint::parse_unverified(&saved).unwrap(), checkpoint());
        let (text, signatures) = note.split_once("\n\n").unwrap();
        for damaged in [
            format!("{text}\n\n\u{7}{signatures}"),
            format!("{text}\n\n{}\r\n", signatures.trim_end()),
            format!("{}\u{0}\n\n{signatures}", text),
            note.replacen("ledgerline.test/log\n", "ledgerline.test/log\u{1b}\n", 1),
        ] {
            assert_eq!(
                Checkpoint::parse_unverified(&damaged),
                Err(NoteError::Malformed("control characters".into())),
                "{damaged:?}"
            );
            assert_eq!(
                signer.verifier().open(&damaged),
                Err(NoteError::Malformed("control characters".into()))
            );
        }
        // No log can sign such a note: its name may not hold one either.
        assert!(LogSigner::generate("ledgerline.test/\u{1}log").is_err());
        // Nor a line under the blank one that is not a signature line.
        for damaged in [
            format!("{text}\n\nnot a signature\n"),
            format!("{note}\u{2014} other-log not*base64\n"),
        ] {
            assert!(
                Checkpoint::parse_unverified(&damaged).is_err(),
                "{damaged:?}"
            );
            assert!(signer.verifier().open(&damaged).is_err(), "{damaged:?}");
        }
    }

    #[test]
    fn malformed_texts_are_refused() {
        for text in [
            "o\n01\nAAAA\n",
            "o\n1\n",
            "o\nx\nAAAA\nchain-head 00\ntime 2026-01-01T00:00:00Z\n",
        ] {
            assert!(Checkpoint::parse_text(text).is_err(), "{text:?}");
        }
        // What the line parsers take but no signer writes: one checkpoint has one text.
        let cp = Checkpoint {
            chain_head: [0xab; 32],
            ..checkpoint()
        };
        let text = cp.text();
        let size = format!("\n{}\n", cp.tree_size);
        let head = hex::encode(cp.chain_head);
        for other in [
            text.replace(&size, &format!("\n+{}\n", cp.tree_size)),
            text.replace(&head, &head.to_uppercase()),
            text.replace("05Z\n", "05.000Z\n"),
            text.replace("03:04:05Z", "04:04:05+01:00"),
        ] {
            assert_ne!(other, text);
            assert!(Checkpoint::parse_text(&other).is_err(), "{other:?}");
        }
        assert_eq!(Checkpoint::parse_text(&text).unwrap(), cp);
    }
}
