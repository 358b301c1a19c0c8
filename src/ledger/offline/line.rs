//! Reading one line of an export file (docs/ledger-format.md, "Export files").
//!
//! Two readers with one result. The fast path reads exactly the layout `export.rs` writes
//! (fields in order, no whitespace, strings without escapes, payload and metadata as raw
//! values) in one pass; any other line goes to serde_json, which reads every valid form and
//! names what is wrong with an invalid one. The fast path only accepts lines that serde_json
//! reads to the same values: keys and punctuation are matched literally, numbers are canonical
//! integers, strings stop at any escape or control character (serde_json then takes over).
//! The one leniency is inside `payload` and `metadata`: the fast path finds where the raw
//! value ends without validating it as JSON. That is safe because those bytes are hashed: a
//! line verifies only if they are exactly the bytes the ledger stored, which PostgreSQL's
//! `json` type had validated (anything else is reported as a content change).

use std::borrow::Cow;

use chrono::DateTime;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::ledger::hash::{HashVersion, RawFields};
use crate::ledger::merkle::Digest;

/// A checked line: a stub, or a full event ready to hash.
// Lives on the stack for one line at a time: boxing the large variant would allocate per line.
#[allow(clippy::large_enum_variant)]
pub(super) enum Parsed<'a> {
    /// Another tenant's v1 event: its hash alone.
    Stub {
        position: i64,
        hash: Digest,
    },
    /// Another tenant's v2 event: what its hash is computed from, but the content.
    StubV2(StubV2),
    Full(FullEvent<'a>),
}

pub(super) struct StubV2 {
    pub position: i64,
    pub prev_hash: Digest,
    pub tenant_tag: Digest,
    pub content_digest: Digest,
    pub hash: Digest,
}

pub(super) struct FullEvent<'a> {
    text: EventText<'a>,
    pub hash_version: HashVersion,
    position: i64,
    pub organization_id: Option<[u8; 16]>,
    pub prev_hash: Digest,
    pub hash: Digest,
}

impl FullEvent<'_> {
    /// The hashed fields, as `hash::raw_hash` takes them.
    pub fn fields(&self) -> RawFields<'_> {
        let t = &self.text;
        RawFields {
            hash_version: self.hash_version,
            position: self.position,
            aggregate_type: t.aggregate_type,
            aggregate_id: t.aggregate_id,
            sequence: t.sequence,
            event_type: t.event_type,
            event_version: t.event_version,
            organization_id: self.organization_id.as_ref(),
            recorded_at_micros: t.recorded_at_micros,
            payload: t.payload,
            metadata: t.metadata,
        }
    }
}

impl Parsed<'_> {
    pub fn position(&self) -> i64 {
        match self {
            Parsed::Stub { position, .. } => *position,
            Parsed::StubV2(s) => s.position,
            Parsed::Full(e) => e.position,
        }
    }
}

/// Reads and checks the next line of `rest` (which starts at a line) and hands it to `f`;
/// advances `rest` past the line and its newline. The line's fields are borrowed from it, or
/// from strings unescaped while reading it. `Err` says why the line is malformed. In an
/// export of every organization (`full_export`) a stub is malformed.
///
/// `f` hashes a full event and says whether it hashed to its stored hash: a reading that
/// found `payload` and `metadata` by the line's tail (see [`Split::ByTail`]) is only kept if
/// so; otherwise the line is read again by its structure, and that reading is final. `f`'s
/// second argument says whether its reading is final (kept whatever it says), so that work
/// only a kept reading needs (the search for where a moved event was written) is done once.
pub(super) fn read_next<T>(
    rest: &mut &[u8],
    full_export: bool,
    mut f: impl FnMut(&Parsed<'_>, bool) -> (T, bool),
) -> Result<T, String> {
    let line = next_line(rest);
    if let Some(Ok(parsed)) = fast(line, Split::ByTail).map(|t| t.check(full_export)) {
        let (result, authentic) = f(&parsed, false);
        if authentic {
            return Ok(result);
        }
    }
    // A line the fast path cannot read, or reads but finds wrong, goes to serde_json, so
    // that every verdict on a line is serde_json's.
    if let Some(Ok(parsed)) = fast(line, Split::ByStructure).map(|t| t.check(full_export)) {
        return Ok(f(&parsed, true).0);
    }
    let json: LineJson<'_> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let text = json.text()?;
    Ok(f(&text.check(full_export)?, true).0)
}

/// The next line of `rest` without its newline; advances `rest` past both.
pub(super) fn next_line<'a>(rest: &mut &'a [u8]) -> &'a [u8] {
    use std::io::BufRead;
    let data = *rest;
    let n = rest.skip_until(b'\n').expect("reading a slice cannot fail");
    let line = &data[..n];
    line.strip_suffix(b"\n").unwrap_or(line)
}

/// A line's fields as the bytes of their text, before checking.
struct LineText<'a> {
    position: i64,
    /// Every line's but a v2 stub's.
    hash: Option<&'a [u8]>,
    /// A v2 stub's `prev_hash`, `tenant_tag` and `content_digest`.
    stub_v2: Option<[&'a [u8]; 3]>,
    /// A full event's `hash_version` (absent: 1).
    hash_version: Option<i64>,
    event: Option<EventText<'a>>,
}

struct EventText<'a> {
    aggregate_type: &'a [u8],
    aggregate_id: &'a [u8],
    sequence: i64,
    event_type: &'a [u8],
    event_version: &'a [u8],
    organization_id: Option<&'a [u8]>,
    recorded_at: &'a [u8],
    recorded_at_micros: i64,
    payload: &'a [u8],
    metadata: &'a [u8],
    prev_hash: &'a [u8],
}

impl<'a> LineText<'a> {
    fn check(self, full_export: bool) -> Result<Parsed<'a>, String> {
        let Some(text) = self.event else {
            if full_export {
                return Err("a stub in an export of every organization".into());
            }
            if self.hash_version.is_some() {
                return Err("`hash_version` in a stub".into());
            }
            return match (self.hash, self.stub_v2) {
                (Some(hash), None) => Ok(Parsed::Stub {
                    position: self.position,
                    hash: hex_digest("hash", hash)?,
                }),
                (Some(hash), Some([prev_hash, tenant_tag, content_digest])) => {
                    Ok(Parsed::StubV2(StubV2 {
                        position: self.position,
                        prev_hash: hex_digest("prev_hash", prev_hash)?,
                        tenant_tag: hex_digest("tenant_tag", tenant_tag)?,
                        content_digest: hex_digest("content_digest", content_digest)?,
                        hash: hex_digest("hash", hash)?,
                    }))
                }
                (None, _) => Err(missing("hash")),
            };
        };
        if self.stub_v2.is_some() {
            return Err("`tenant_tag` or `content_digest` in a full event".into());
        }
        let hash = hex_digest("hash", self.hash.ok_or_else(|| missing("hash"))?)?;
        let hash_version = match self.hash_version {
            None => HashVersion::V1,
            Some(n) => HashVersion::from_number(n)
                .ok_or_else(|| format!("`hash_version` {n} is not 1 or 2"))?,
        };
        let organization_id = match text.organization_id {
            None => None,
            Some(t) => Some(
                *Uuid::try_parse_ascii(t)
                    .map_err(|_| {
                        format!(
                            "organization_id `{}` is not a UUID",
                            String::from_utf8_lossy(t)
                        )
                    })?
                    .as_bytes(),
            ),
        };
        if !same_instant(text.recorded_at, text.recorded_at_micros) {
            return Err(format!(
                "recorded_at `{}` is not recorded_at_micros {}",
                String::from_utf8_lossy(text.recorded_at),
                text.recorded_at_micros
            ));
        }
        let prev_hash = hex_digest("prev_hash", text.prev_hash)?;
        Ok(Parsed::Full(FullEvent {
            text,
            hash_version,
            position: self.position,
            organization_id,
            prev_hash,
            hash,
        }))
    }
}

// ---------------------------------------------------------------------------------------
// The fast path.

/// How the fast path finds where `payload` ends and `metadata` begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    /// By the line's end: the hashes are the fixed-length tail
    /// `,"prev_hash":"<64>","hash":"<64>"}`, and the last `,"metadata":` before it starts
    /// `metadata` (a key of that name nested in `metadata` itself would mislead it). Nothing
    /// inside the two values is read: a reading is kept only if the event then hashes to its
    /// stored hash, which proves the two values are the stored bytes, so that any JSON parser
    /// finds the same values there.
    ByTail,
    /// By parsing the two values' structure (strings, escapes, nesting).
    ByStructure,
}

/// The layout `export.rs` writes, read in one pass over a whole `line`; `None` for anything
/// else.
fn fast(line: &[u8], split: Split) -> Option<LineText<'_>> {
    let mut c = Cursor { b: line, i: 0 };
    c.lit(b"{\"position\":")?;
    let position = c.int()?;
    // A stub: a v1 one's hash alone, or a v2 one's parts and then its hash.
    let stub = if c.eat(b",\"hash\":\"") {
        Some(None)
    } else if c.eat(b",\"prev_hash\":\"") {
        let prev_hash = c.str64()?;
        c.lit(b",\"tenant_tag\":\"")?;
        let tenant_tag = c.str64()?;
        c.lit(b",\"content_digest\":\"")?;
        let content_digest = c.str64()?;
        c.lit(b",\"hash\":\"")?;
        Some(Some([prev_hash, tenant_tag, content_digest]))
    } else {
        None
    };
    if let Some(stub_v2) = stub {
        let hash = c.str64()?;
        c.lit(b"}")?;
        return (c.i == line.len()).then_some(LineText {
            position,
            hash: Some(hash),
            stub_v2,
            hash_version: None,
            event: None,
        });
    }
    let hash_version = if c.eat(b",\"hash_version\":") {
        Some(c.int()?)
    } else {
        None
    };
    c.lit(b",\"aggregate_type\":\"")?;
    let aggregate_type = c.plain_str()?;
    c.lit(b",\"aggregate_id\":\"")?;
    let aggregate_id = c.plain_str()?;
    c.lit(b",\"sequence\":")?;
    let sequence = c.int()?;
    c.lit(b",\"event_type\":\"")?;
    let event_type = c.plain_str()?;
    c.lit(b",\"event_version\":\"")?;
    let event_version = c.plain_str()?;
    c.lit(b",\"organization_id\":")?;
    let organization_id = if c.eat(b"null") {
        None
    } else {
        c.lit(b"\"")?;
        Some(c.plain_str()?)
    };
    c.lit(b",\"recorded_at\":\"")?;
    let recorded_at = c.plain_str()?;
    c.lit(b",\"recorded_at_micros\":")?;
    let recorded_at_micros = c.int()?;
    c.lit(b",\"payload\":")?;
    let (payload, metadata, prev_hash, hash) = match split {
        Split::ByTail => by_tail(line, c.i)?,
        Split::ByStructure => {
            let payload = c.raw()?;
            c.lit(b",\"metadata\":")?;
            let metadata = c.raw()?;
            c.lit(b",\"prev_hash\":\"")?;
            let prev_hash = c.str64()?;
            c.lit(b",\"hash\":\"")?;
            let hash = c.str64()?;
            c.lit(b"}")?;
            if c.i != line.len() {
                return None;
            }
            (payload, metadata, prev_hash, hash)
        }
    };
    let text = LineText {
        position,
        hash: Some(hash),
        stub_v2: None,
        hash_version,
        event: Some(EventText {
            aggregate_type,
            aggregate_id,
            sequence,
            event_type,
            event_version,
            organization_id,
            recorded_at,
            recorded_at_micros,
            payload,
            metadata,
            prev_hash,
        }),
    };
    Some(text)
}

/// [`Split::ByTail`] from `start`, just after `"payload":`: payload, metadata, prev_hash and
/// hash.
#[allow(clippy::type_complexity)]
fn by_tail(line: &[u8], start: usize) -> Option<(&[u8], &[u8], &[u8], &[u8])> {
    const TAIL: usize = 154; // ,"prev_hash":"<64>","hash":"<64>"}
    const METADATA: &[u8; 12] = b",\"metadata\":";
    let tail_at = line.len().checked_sub(TAIL).filter(|t| *t > start)?;
    let tail = &line[tail_at..];
    let framed = tail.starts_with(b",\"prev_hash\":\"")
        && tail[78..88] == *b"\",\"hash\":\""
        && tail.ends_with(b"\"}");
    if !framed {
        return None;
    }
    let values = &line[start..tail_at];
    let mut end = values.len();
    let sep = loop {
        let comma = rfind_comma(&values[..end])?;
        if values[comma..].starts_with(METADATA) {
            break comma;
        }
        end = comma;
    };
    let (payload, metadata) = (&values[..sep], &values[sep + METADATA.len()..]);
    (!payload.is_empty() && !metadata.is_empty()).then_some((
        payload,
        metadata,
        &tail[14..78],
        &tail[88..152],
    ))
}

/// The last `,` in `b`, eight bytes at a time.
fn rfind_comma(b: &[u8]) -> Option<usize> {
    let mut end = b.len();
    while end >= 8 {
        let x = u64::from_le_bytes(b[end - 8..end].try_into().expect("8 bytes")) ^ (LO * 0x2c);
        // Exactly the zero bytes (no borrow between bytes): a high bit per comma.
        let commas = !(((x & !HI).wrapping_add(!HI)) | x | !HI);
        if commas != 0 {
            return Some(end - 1 - (commas.leading_zeros() / 8) as usize);
        }
        end -= 8;
    }
    b[..end].iter().rposition(|c| *c == b',')
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat<const N: usize>(&mut self, s: &[u8; N]) -> bool {
        let hit = self
            .b
            .get(self.i..self.i + N)
            .is_some_and(|w| w == s.as_slice());
        if hit {
            self.i += N;
        }
        hit
    }

    fn lit<const N: usize>(&mut self, s: &[u8; N]) -> Option<()> {
        self.eat(s).then_some(())
    }

    /// The rest of a string of 64 characters whose opening quote was read (a hash: its hex
    /// digits are checked when decoded, and the line goes to serde_json if they are not).
    fn str64(&mut self) -> Option<&'a [u8]> {
        let text = self.b.get(self.i..self.i + 64)?;
        if self.b.get(self.i + 64) != Some(&b'"') {
            return None;
        }
        self.i += 65;
        Some(text)
    }

    /// A JSON integer in canonical form (`-?(0|[1-9][0-9]*)`) that fits an i64.
    fn int(&mut self) -> Option<i64> {
        let negative = self.eat(b"-");
        let start = self.i;
        let mut v: i64 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            let d = i64::from(d - b'0');
            v = v.checked_mul(10).and_then(|v| {
                if negative {
                    v.checked_sub(d)
                } else {
                    v.checked_add(d)
                }
            })?;
            self.i += 1;
        }
        let digits = &self.b[start..self.i];
        let canonical = digits == b"0" && !negative || digits.first().is_some_and(|d| *d != b'0');
        canonical.then_some(v)
    }

    /// The rest of a string whose opening quote was read: its bytes, if it has no escape and
    /// no control character (else the line goes to serde_json).
    fn plain_str(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        let at = find_special(self.b, start)?;
        if self.b[at] != b'"' {
            return None;
        }
        self.i = at + 1;
        Some(&self.b[start..at])
    }

    /// Skips the rest of a string whose opening quote was read, escapes included.
    fn skip_str(&mut self) -> Option<()> {
        loop {
            let at = find_special(self.b, self.i)?;
            match self.b[at] {
                b'"' => {
                    self.i = at + 1;
                    return Some(());
                }
                b'\\' => self.i = at + 2,
                _ => return None, // a control character: not JSON
            }
        }
    }

    /// A JSON value's bytes, found by its structure (strings, nesting) and not validated
    /// further (see the module's comment).
    fn raw(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        match self.peek()? {
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    let b = self.peek()?;
                    self.i += 1;
                    match b {
                        b'"' => self.skip_str()?,
                        b'\n' => return None,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
            }
            b'"' => {
                self.i += 1;
                self.skip_str()?;
            }
            _ => {
                while !matches!(self.peek()?, b',' | b'}' | b']' | b'\n') {
                    self.i += 1;
                }
            }
        }
        let raw = self.b.get(start..self.i)?;
        (!raw.is_empty()).then_some(raw)
    }
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// The first byte at or after `from` that is `"`, `\` or a control character (< 0x20),
/// sixteen bytes at a time.
fn find_special(b: &[u8], from: usize) -> Option<usize> {
    let zero = |v: u64| v.wrapping_sub(LO) & !v & HI;
    // Each test's lowest hit is exact (borrows only cause hits above a true one).
    let hits = |x: u64| {
        zero(x ^ (LO * u64::from(b'"')))
            | zero(x ^ (LO * u64::from(b'\\')))
            | (x.wrapping_sub(LO * 0x20) & !x & HI)
    };
    let word = |w: &[u8]| u64::from_le_bytes(w.try_into().expect("8 bytes"));
    let mut i = from;
    while let Some(two) = b.get(i..i + 16) {
        let (a, c) = (hits(word(&two[..8])), hits(word(&two[8..])));
        if a | c != 0 {
            let at = if a != 0 {
                a.trailing_zeros()
            } else {
                64 + c.trailing_zeros()
            };
            return Some(i + (at / 8) as usize);
        }
        i += 16;
    }
    b.get(i..)?
        .iter()
        .position(|c| matches!(c, b'"' | b'\\') || *c < 0x20)
        .map(|p| i + p)
}

/// Hex digit values; 0xff for every other byte.
const HEX: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = match c as u8 {
            d @ b'0'..=b'9' => d - b'0',
            d @ b'a'..=b'f' => d - b'a' + 10,
            d @ b'A'..=b'F' => d - b'A' + 10,
            _ => 0xff,
        };
        c += 1;
    }
    t
};

/// 64 hex digits as 32 bytes, without a branch per digit.
fn hex_digest(field: &str, text: &[u8]) -> Result<Digest, String> {
    let bad = || format!("`{field}` is not 64 hex digits");
    if text.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    let mut invalid = 0u8;
    for (o, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let (hi, lo) = (HEX[usize::from(pair[0])], HEX[usize::from(pair[1])]);
        invalid |= hi | lo;
        *o = (hi << 4) | (lo & 0x0f);
    }
    if invalid > 0x0f {
        return Err(bad());
    }
    Ok(out)
}

/// Whether the readable `recorded_at` is the instant `micros` (µs since the Unix epoch).
/// The form the exporter writes (`2026-01-01T12:00:00.123456Z`) is read directly; any other
/// RFC 3339 form through chrono.
fn same_instant(text: &[u8], micros: i64) -> bool {
    if let Some(m) = canonical_micros(text) {
        return m == micros;
    }
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .is_some_and(|t| t.timestamp_micros() == micros && t.timestamp_subsec_nanos() % 1000 == 0)
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` as microseconds since the Unix epoch; `None` for any other
/// form or an impossible date.
fn canonical_micros(t: &[u8]) -> Option<i64> {
    if t.len() != 27 || [t[4], t[7], t[10], t[13], t[16], t[19], t[26]] != *b"--T::.Z" {
        return None;
    }
    let num = |r: std::ops::Range<usize>| {
        t[r].iter().try_fold(0i64, |v, c| {
            c.is_ascii_digit().then(|| v * 10 + i64::from(c - b'0'))
        })
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s, frac) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..26)?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || d < 1 || d > month_days[(mo - 1) as usize] {
        return None;
    }
    if h > 23 || mi > 59 || s > 59 {
        return None;
    }
    // Days from 1970-01-01 to the date (H. Hinnant, "chrono-Compatible Low-Level Date
    // Algorithms", days_from_civil).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + s) * 1_000_000) + frac)
}

// ---------------------------------------------------------------------------------------
// Any other valid form, through serde_json.

/// A JSON string, borrowed from the line unless it has escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
        }
        d.deserialize_str(V).map(Text)
    }
}

/// A field that may be absent, `null`, or a value: `null` is not absent here.
#[derive(Default)]
enum Present<T> {
    #[default]
    Absent,
    Null,
    Value(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Present<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            None => Present::Null,
            Some(v) => Present::Value(v),
        })
    }
}

/// A raw JSON value, `null` included.
#[derive(Default)]
enum Json<'a> {
    #[default]
    Absent,
    Raw(&'a RawValue),
}

impl<'de: 'a, 'a> Deserialize<'de> for Json<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(Json::Raw)
    }
}

/// Every field a line may have; which are present says whether it is a full event or a stub.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineJson<'a> {
    position: i64,
    #[serde(default)]
    hash_version: Present<i64>,
    #[serde(default, borrow)]
    aggregate_type: Option<Text<'a>>,
    #[serde(default, borrow)]
    aggregate_id: Option<Text<'a>>,
    #[serde(default)]
    sequence: Option<i64>,
    #[serde(default, borrow)]
    event_type: Option<Text<'a>>,
    #[serde(default, borrow)]
    event_version: Option<Text<'a>>,
    #[serde(default, borrow)]
    organization_id: Present<Text<'a>>,
    #[serde(default, borrow)]
    recorded_at: Option<Text<'a>>,
    #[serde(default)]
    recorded_at_micros: Option<i64>,
    #[serde(default, borrow)]
    payload: Json<'a>,
    #[serde(default, borrow)]
    payload_text: Option<Text<'a>>,
    #[serde(default, borrow)]
    metadata: Json<'a>,
    #[serde(default, borrow)]
    metadata_text: Option<Text<'a>>,
    #[serde(default, borrow)]
    prev_hash: Option<Text<'a>>,
    #[serde(default, borrow)]
    tenant_tag: Option<Text<'a>>,
    #[serde(default, borrow)]
    content_digest: Option<Text<'a>>,
    #[serde(default, borrow)]
    hash: Option<Text<'a>>,
}

fn missing(name: &str) -> String {
    format!("`{name}` is missing")
}

fn string<'b>(name: &str, t: &'b Option<Text<'_>>) -> Result<&'b [u8], String> {
    t.as_ref()
        .map(|t| t.0.as_bytes())
        .ok_or_else(|| missing(name))
}

/// The stored JSON text: the raw value, or the `*_text` string, exactly one of them.
fn stored_json<'b>(
    name: &str,
    raw: &Json<'b>,
    text: &'b Option<Text<'_>>,
) -> Result<&'b [u8], String> {
    match (raw, text) {
        (Json::Raw(r), None) => Ok(r.get().as_bytes()),
        (Json::Absent, Some(t)) => Ok(t.0.as_bytes()),
        (Json::Absent, None) => Err(missing(name)),
        (Json::Raw(_), Some(_)) => Err(format!("both `{name}` and `{name}_text`")),
    }
}

impl LineJson<'_> {
    fn text(&self) -> Result<LineText<'_>, String> {
        let is_stub = self.aggregate_type.is_none()
            && self.aggregate_id.is_none()
            && self.sequence.is_none()
            && self.event_type.is_none()
            && self.event_version.is_none()
            && matches!(self.organization_id, Present::Absent)
            && self.recorded_at.is_none()
            && self.recorded_at_micros.is_none()
            && matches!(self.payload, Json::Absent)
            && self.payload_text.is_none()
            && matches!(self.metadata, Json::Absent)
            && self.metadata_text.is_none();
        let stub_v2 = match (&self.tenant_tag, &self.content_digest) {
            (None, None) => None,
            (tag, digest) => Some([
                string("prev_hash", &self.prev_hash)?,
                string("tenant_tag", tag)?,
                string("content_digest", digest)?,
            ]),
        };
        let event = if is_stub && (stub_v2.is_some() || self.prev_hash.is_none()) {
            None
        } else {
            Some(EventText {
                aggregate_type: string("aggregate_type", &self.aggregate_type)?,
                aggregate_id: string("aggregate_id", &self.aggregate_id)?,
                sequence: self.sequence.ok_or_else(|| missing("sequence"))?,
                event_type: string("event_type", &self.event_type)?,
                event_version: string("event_version", &self.event_version)?,
                organization_id: match &self.organization_id {
                    Present::Absent => return Err(missing("organization_id")),
                    Present::Null => None,
                    Present::Value(t) => Some(t.0.as_bytes()),
                },
                recorded_at: string("recorded_at", &self.recorded_at)?,
                recorded_at_micros: self
                    .recorded_at_micros
                    .ok_or_else(|| missing("recorded_at_micros"))?,
                payload: stored_json("payload", &self.payload, &self.payload_text)?,
                metadata: stored_json("metadata", &self.metadata, &self.metadata_text)?,
                prev_hash: string("prev_hash", &self.prev_hash)?,
            })
        };
        Ok(LineText {
            position: self.position,
            hash: self.hash.as_ref().map(|h| h.0.as_bytes()),
            stub_v2,
            hash_version: match self.hash_version {
                Present::Absent => None,
                Present::Null => return Err("`hash_version` is null".into()),
                Present::Value(n) => Some(n),
            },
            event,
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::ledger::export::{write_event_line, write_stub_line, write_stub_v2_line};
    use crate::ledger::hash::{event_hash, raw_hash, EventFields};

    fn event<'a>(payload: &'a str, metadata: &'a str, aggregate_id: &'a str) -> EventFields<'a> {
        EventFields {
            hash_version: HashVersion::V2,
            position: 42,
            aggregate_type: "User",
            aggregate_id,
            sequence: 3,
            event_type: "UserInvited",
            event_version: "1",
            organization_id: Some(Uuid::from_u128(0xabc)),
            recorded_at: DateTime::from_timestamp_micros(-1).unwrap(),
            payload,
            metadata,
        }
    }

    /// A line as the exporter writes it, with the event's real hash.
    fn line_of(e: &EventFields<'_>) -> String {
        let mut line = Vec::new();
        write_event_line(&mut line, e, &[1; 32], &event_hash(&[1; 32], e));
        String::from_utf8(line).unwrap().trim_end().to_string()
    }

    /// Reads `line` as the verifier does (a reading is authentic if the event hashes to its
    /// stored hash) and hands every reading to `f`.
    fn read(line: &[u8], full_export: bool, mut f: impl FnMut(&Parsed<'_>)) -> Result<(), String> {
        let mut rest = line;
        let mut input = Vec::new();
        read_next(&mut rest, full_export, |p, _| {
            f(p);
            let authentic = match p {
                Parsed::Full(e) => raw_hash(&mut input, &e.prev_hash, &e.fields()) == e.hash,
                Parsed::Stub { .. } | Parsed::StubV2(_) => true,
            };
            ((), authentic)
        })?;
        assert!(rest.is_empty());
        Ok(())
    }

    fn describe(p: &Parsed<'_>) -> String {
        match p {
            Parsed::Full(e) => format!("{:?} {:?}", e.fields(), (e.prev_hash, e.hash)),
            Parsed::Stub { position, hash } => format!("stub {position} {hash:?}"),
            Parsed::StubV2(s) => format!(
                "stub v2 {} {:?}",
                s.position,
                (s.prev_hash, s.tenant_tag, s.content_digest, s.hash)
            ),
        }
    }

    /// What the fast path reads with `split`, if it reads the line.
    fn fast_read(line: &[u8], split: Split) -> Option<String> {
        Some(describe(&fast(line, split)?.check(false).ok()?))
    }

    fn is_fast(line: &[u8]) -> bool {
        let (tail, structure) = (
            fast_read(line, Split::ByTail),
            fast_read(line, Split::ByStructure),
        );
        assert_eq!(tail, structure, "{}", String::from_utf8_lossy(line));
        structure.is_some()
    }

    /// The fields as the encoder sees them, through one reader or the other.
    fn read_back(line: &[u8]) -> (bool, String) {
        let fast = is_fast(line);
        let mut fields = String::new();
        read(line, false, |p| fields = describe(p)).unwrap();
        (fast, fields)
    }

    #[test]
    fn both_readers_read_the_same_fields() {
        let cases = [
            (r#"{"a":[1,{"b":"\"}]"}],"c":"\\"}"#, "{}", "id"),
            (r#""just a string""#, "17", "id"),
            ("{\"tab\":\"\\t\",\"é\":\"\\u00e9\"}", "[]", "id"),
            ("{}", "{\"x\": \t 1 }", "with \"quotes\""),
            ("{\n}", "null", "id"),
        ];
        for (payload, metadata, id) in cases {
            let line = line_of(&event(payload, metadata, id));
            let line = line.as_bytes();
            let (fast_read, fields) = read_back(line);
            // serde_json alone must see exactly the same.
            let json: LineJson<'_> = serde_json::from_slice(line).unwrap();
            let by_serde = describe(&json.text().unwrap().check(false).unwrap());
            assert_eq!(fields, by_serde, "{}", String::from_utf8_lossy(line));
            assert!(fields.contains(&format!("{:?}", payload.as_bytes())));
            let expect_fast = !id.contains('"') && !payload.contains('\n') && metadata != "null";
            assert_eq!(fast_read, expect_fast, "{}", String::from_utf8_lossy(line));
        }
        let mut stub = Vec::new();
        write_stub_line(&mut stub, 7, &[3; 32]);
        let (fast_read, fields) = read_back(stub.strip_suffix(b"\n").unwrap());
        assert!(fast_read);
        assert_eq!(fields, format!("stub 7 {:?}", [3u8; 32]));
        let mut stub = Vec::new();
        write_stub_v2_line(&mut stub, 8, &[1; 32], &[2; 32], &[3; 32], &[4; 32]);
        let stub = stub.strip_suffix(b"\n").unwrap();
        let (fast_read, fields) = read_back(stub);
        assert!(fast_read);
        assert_eq!(
            fields,
            format!(
                "stub v2 8 {:?}",
                ([1u8; 32], [2u8; 32], [3u8; 32], [4u8; 32])
            )
        );
        let json: LineJson<'_> = serde_json::from_slice(stub).unwrap();
        assert_eq!(
            describe(&json.text().unwrap().check(false).unwrap()),
            fields
        );
        // A line of a version 1 file has no `hash_version`: the event is v1.
        let v1 = EventFields {
            hash_version: HashVersion::V1,
            ..event("{}", "{}", "id")
        };
        let line = line_of(&v1).replacen(",\"hash_version\":1", "", 1);
        let (fast_read, fields) = read_back(line.as_bytes());
        assert!(fast_read);
        assert!(fields.contains("hash_version: V1"), "{fields}");
    }

    #[test]
    fn the_fast_path_gives_up_on_anything_unusual() {
        let line = line_of(&event("{}", "{}", "id"));
        assert!(is_fast(line.as_bytes()));
        for other in [
            line.replacen("{\"position\":42", "{\"position\":042", 1),
            line.replacen("{\"position\":42", "{\"position\": 42", 1),
            line.replacen("{\"position\":42", "{\"position\":42.0", 1),
            line.replacen("\"sequence\":3", "\"sequence\":99999999999999999999", 1),
            line.replacen("\"User\"", "\"Us\\u0065r\"", 1),
            line.replacen("\"User\"", "\"Us\ter\"", 1),
            format!("{line} "),
            format!("{line},"),
            line.replacen("\"aggregate_id\":\"id\",", "", 1),
        ] {
            assert!(!is_fast(other.as_bytes()), "{other}");
        }
        // serde_json reads the escaped form to the same bytes, refuses the others.
        let escaped = line.replacen("\"User\"", "\"Us\\u0065r\"", 1);
        assert_eq!(
            read_back(escaped.as_bytes()).1,
            read_back(line.as_bytes()).1
        );
        for bad in [
            line.replacen("{\"position\":42", "{\"position\":042", 1),
            line.replacen("\"User\"", "\"Us\ter\"", 1),
            format!("{line},"),
            line.replacen("\"aggregate_id\":\"id\",", "", 1),
            line.replacen(",\"hash\":\"", ",\"hash\":\"0", 1),
            line.replacen("}", "},\"x\":1}", 1),
            line.replacen("\"hash_version\":2", "\"hash_version\":3", 1),
            line.replacen(
                "{\"position\":42",
                "{\"position\":42,\"tenant_tag\":\"00\"",
                1,
            ),
            format!(
                r#"{{"position":8,"hash_version":2,"hash":"{}"}}"#,
                "0".repeat(64)
            ),
            format!(
                r#"{{"position":8,"hash_version":2,"prev_hash":"{0}","tenant_tag":"{0}","content_digest":"{0}","hash":"{0}"}}"#,
                "0".repeat(64)
            ),
            line.replacen("\"hash_version\":2", "\"hash_version\":null", 1),
            format!(
                r#"{{"position":8,"tenant_tag":"{0}","content_digest":"{0}","hash":"{0}"}}"#,
                "0".repeat(64)
            ),
        ] {
            assert!(read(bad.as_bytes(), false, |_| ()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_misleading_metadata_key_is_read_again_by_structure() {
        let nested_in_payload = r#"{"a":{"b":1},"metadata":{"c":[2,"},\"metadata\":"]}}"#;
        for (payload, metadata, by_tail_is_right) in [
            (nested_in_payload, r#"{"k":"v"}"#, true),
            (r#"{"a":1}"#, r#"{"k":"v","metadata":{"x":1}}"#, false),
            (nested_in_payload, r#"{"k":"v","metadata":"x"}"#, false),
        ] {
            let line = line_of(&event(payload, metadata, "id"));
            let line = line.as_bytes();
            let by_tail = fast(line, Split::ByTail)
                .unwrap()
                .check(false)
                .ok()
                .unwrap();
            let Parsed::Full(t) = &by_tail else { panic!() };
            assert_eq!(t.fields().payload == payload.as_bytes(), by_tail_is_right);
            // The verifier's hash check rejects a wrong split; the structure then decides.
            let mut readings = Vec::new();
            read(line, false, |p| {
                let Parsed::Full(e) = p else { panic!() };
                readings.push(e.fields().payload.to_vec());
            })
            .unwrap();
            assert_eq!(readings.len(), if by_tail_is_right { 1 } else { 2 });
            assert_eq!(readings.last().unwrap(), payload.as_bytes());
        }
    }

    #[test]
    fn special_bytes_are_found_in_every_position() {
        for len in 0..40 {
            for at in 0..len {
                for special in [b'"', b'\\', 0x00, 0x1f] {
                    let mut b = vec![b'a'; len];
                    b[at] = special;
                    if at + 1 < len {
                        b[at + 1] = b'"';
                    }
                    assert_eq!(find_special(&b, 0), Some(at), "{b:?}");
                }
            }
            assert_eq!(find_special(&vec![0xe9; len], 0), None);
            for at in 0..len {
                let mut b = vec![b'a'; len];
                b[at] = b',';
                if at > 0 {
                    b[at - 1] = b',';
                }
                assert_eq!(rfind_comma(&b), Some(at), "{b:?}");
            }
            assert_eq!(rfind_comma(&vec![0xac; len]), None);
        }
    }

    #[test]
    fn canonical_times_read_as_chrono_reads_them() {
        let mut t = Utc.with_ymd_and_hms(1600, 2, 28, 23, 59, 58).unwrap();
        while t.timestamp() < 5_000_000_000 {
            let text = t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            assert_eq!(
                canonical_micros(text.as_bytes()),
                Some(t.timestamp_micros()),
                "{text}"
            );
            t += chrono::Duration::microseconds(86_400_000_000 * 37 + 3_600_000_123 * 5 + 7);
        }
        for bad in [
            "2026-02-29T00:00:00.000000Z",
            "2026-13-01T00:00:00.000000Z",
            "2026-01-01T24:00:00.000000Z",
            "2026-01-01T00:00:00.000000+00:00",
            "2026-01-01 00:00:00.000000Z",
        ] {
            assert_eq!(canonical_micros(bad.as_bytes()), None, "{bad}");
        }
        assert!(same_instant(
            b"2024-02-29T00:00:00.000001Z",
            1_709_164_800_000_001
        ));
        assert!(same_instant(
            b"2024-02-29T01:00:00.000001+01:00",
            1_709_164_800_000_001
        ));
        assert!(!same_instant(
            b"2024-02-29T00:00:00.0000015Z",
            1_709_164_800_000_001
        ));
        assert!(same_instant(b"1969-12-31T23:59:59.999999Z", -1));
    }
}
