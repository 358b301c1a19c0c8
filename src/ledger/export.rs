//! Export files (version 2): a self-describing JSON Lines file of a range of the ledger that
//! `offline::verify_file` checks with no database. docs/ledger-format.md ("Export files")
//! specifies it; this file writes it.
//!
//! Line 1 is the header (origin, range, the hash before the range, the Merkle frontier before
//! it); then one line per position: a full event with every hashed field exactly as stored,
//! or, for another tenant's event in an organization's export, a stub, so that the chain still
//! links end to end: a v2 event's previous hash, tenant tag, content digest and hash (the tag
//! shows it is not the organization's own), a v1 event's hash alone.

use chrono::{DateTime, SecondsFormat, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use sqlx::PgPool;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use uuid::Uuid;

use super::hash::{stub_parts, EventFields, HashVersion, GENESIS};
use super::merkle::{Blake3, Digest, Frontier, TreeHash};
use super::tree::{self, TreeError};

/// The header's `format`.
pub const FORMAT: &str = "ledgerline-export";
/// The header's `version`. Version 2 added `hash_version` to full event lines and the v2
/// stub; a reader takes files of either (a version 1 file holds neither).
pub const VERSION: u32 = 2;

/// Positions read per query while exporting.
const PAGE: i64 = 10_000;

/// The first line of an export file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportHeader {
    pub format: String,
    pub version: u32,
    /// The log's name, as its signed checkpoints give it.
    pub origin: String,
    /// The one organization whose events are in full; `None`: every event is in full.
    pub organization_id: Option<Uuid>,
    /// The first and last position of the file (`to = from - 1`: no events).
    pub from: i64,
    pub to: i64,
    /// The hash of the event at `from - 1` (genesis zeros when `from` is 1).
    #[serde(with = "hex_digest")]
    pub prev_hash: Digest,
    /// The peaks of the Blake3 Merkle tree over the leaves of events `1..from`, as
    /// `merkle::Frontier::peaks` gives them: with the lines, they give the root of any size
    /// from `from - 1` to `to` without the earlier events.
    #[serde(with = "hex_digests")]
    pub frontier: Vec<Digest>,
    pub exported_at: DateTime<Utc>,
}

impl ExportHeader {
    /// The header line, ending in a newline.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(&mut *out, self).expect("a header serializes");
        out.push(b'\n');
    }
}

/// One full event line (see [`write_event_line`]). Field order is the hash input's order.
#[derive(Serialize)]
struct EventLine<'a> {
    position: i64,
    hash_version: i16,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    sequence: i64,
    event_type: &'a str,
    event_version: &'a str,
    organization_id: Option<Uuid>,
    recorded_at: String,
    recorded_at_micros: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata_text: Option<&'a str>,
    prev_hash: String,
    hash: String,
}

/// The stored JSON text as a raw JSON value if it reads back as exactly the same bytes and
/// fits on one line; `None`: it goes in a string field (`*_text`) instead.
fn raw_json(text: &str) -> Option<&RawValue> {
    if text.contains(['\n', '\r']) {
        return None;
    }
    let raw: &RawValue = serde_json::from_str(text).ok()?;
    (raw.get() == text).then_some(raw)
}

/// Appends one full event line: every hashed field exactly as stored, `recorded_at` both as
/// the integer microseconds the hash covers and as RFC 3339 for reading.
pub fn write_event_line(out: &mut Vec<u8>, e: &EventFields<'_>, prev_hash: &Digest, hash: &Digest) {
    let payload = raw_json(e.payload);
    let metadata = raw_json(e.metadata);
    let line = EventLine {
        position: e.position,
        hash_version: e.hash_version.number(),
        aggregate_type: e.aggregate_type,
        aggregate_id: e.aggregate_id,
        sequence: e.sequence,
        event_type: e.event_type,
        event_version: e.event_version,
        organization_id: e.organization_id,
        recorded_at: e.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        recorded_at_micros: e.recorded_at.timestamp_micros(),
        payload,
        payload_text: payload.is_none().then_some(e.payload),
        metadata,
        metadata_text: metadata.is_none().then_some(e.metadata),
        prev_hash: hex::encode(prev_hash),
        hash: hex::encode(hash),
    };
    serde_json::to_writer(&mut *out, &line).expect("an event line serializes");
    out.push(b'\n');
}

/// Appends a stub line for another tenant's v1 event: its position and hash only.
pub fn write_stub_line(out: &mut Vec<u8>, position: i64, hash: &Digest) {
    out.extend_from_slice(b"{\"position\":");
    out.extend_from_slice(position.to_string().as_bytes());
    hex_field(out, b"hash", hash);
    out.extend_from_slice(b"}\n");
}

/// Appends a stub line for another tenant's v2 event: what its hash is computed from but
/// the content, so that the verifier recomputes the hash and checks that the tenant tag is
/// not the exported organization's.
pub fn write_stub_v2_line(
    out: &mut Vec<u8>,
    position: i64,
    prev_hash: &Digest,
    tenant_tag: &Digest,
    content_digest: &Digest,
    hash: &Digest,
) {
    out.extend_from_slice(b"{\"position\":");
    out.extend_from_slice(position.to_string().as_bytes());
    hex_field(out, b"prev_hash", prev_hash);
    hex_field(out, b"tenant_tag", tenant_tag);
    hex_field(out, b"content_digest", content_digest);
    hex_field(out, b"hash", hash);
    out.extend_from_slice(b"}\n");
}

/// `,"<name>":"<hex>"`
fn hex_field(out: &mut Vec<u8>, name: &[u8], digest: &Digest) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name);
    out.extend_from_slice(b"\":\"");
    out.extend_from_slice(hex::encode(digest).as_bytes());
    out.push(b'"');
}

/// What to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportScope {
    /// Only this organization's events in full; every other position as a stub.
    pub organization: Option<Uuid>,
    /// The first position (at least 1).
    pub from: i64,
    /// The last position; `None`: the head when the export starts.
    pub to: Option<i64>,
}

impl Default for ExportScope {
    fn default() -> Self {
        Self {
            organization: None,
            from: 1,
            to: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportSummary {
    pub from: i64,
    pub to: i64,
    pub full_events: u64,
    pub stubs: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The requested range does not fit the ledger (a caller's mistake).
    #[error("{0}")]
    Range(String),
    /// The ledger itself is damaged where the export needs it (`ledgerline verify` says how).
    #[error("cannot export: {0}")]
    Damaged(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
}

/// An export whose range is checked and whose header is computed: what is left is to write it.
/// The HTTP handler prepares first, so that a bad range is an error response, not a broken
/// stream.
#[derive(Debug, Clone)]
pub struct PreparedExport {
    pub header: ExportHeader,
}

/// Checks the range against the head and computes the header: the hash before the range and
/// the Merkle frontier of the positions before it, from just their stored hashes (they are
/// authenticated later, when the verifier matches a root against a signed checkpoint).
pub async fn prepare(
    pool: &PgPool,
    scope: ExportScope,
    origin: &str,
) -> Result<PreparedExport, ExportError> {
    let (head,): (Option<i64>,) = sqlx::query_as("SELECT max(position) FROM events")
        .fetch_one(pool)
        .await?;
    let head = head.unwrap_or(0);
    let from = scope.from;
    let to = scope.to.unwrap_or(head);
    if from < 1 {
        return Err(ExportError::Range(format!(
            "from must be at least 1, got {from}"
        )));
    }
    if to > head {
        return Err(ExportError::Range(format!(
            "to ({to}) is beyond the head of the ledger ({head})"
        )));
    }
    if to < from - 1 {
        return Err(ExportError::Range(format!(
            "to ({to}) is before from ({from})"
        )));
    }
    // The integrated tree gives the frontier of its part of the prefix in one node per peak;
    // only the events past it (the maintainer's last fraction of a second, or all of them
    // where no maintainer runs) are read and pushed. Either way the frontier is authenticated
    // by the verifier, against a signed checkpoint, not here.
    let before = u64::try_from(from - 1).expect("from is at least 1");
    let integrated = tree::integrated_size(pool)
        .await
        .map_err(damaged)?
        .min(before);
    let mut frontier = if integrated == 0 {
        Frontier::<Blake3>::new()
    } else {
        tree::frontier_at(pool, integrated).await.map_err(damaged)?
    };
    let mut expected = integrated as i64 + 1;
    let mut prev_hash = match expected - 1 {
        0 => GENESIS,
        p => {
            let hash: Option<Vec<u8>> =
                sqlx::query_scalar("SELECT hash FROM events WHERE position = $1")
                    .bind(p)
                    .fetch_optional(pool)
                    .await?;
            let hash = hash.ok_or_else(|| {
                ExportError::Damaged(format!(
                    "no event holds position {p}, before the export's range"
                ))
            })?;
            stored_digest(p, "hash", &hash)?
        }
    };
    let mut rows = sqlx::query_as::<_, (i64, Vec<u8>)>(
        "SELECT position, hash FROM events WHERE position >= $1 AND position < $2 \
         ORDER BY position",
    )
    .bind(expected)
    .bind(from)
    .fetch(pool);
    while let Some((position, hash)) = rows.try_next().await? {
        if position != expected {
            return Err(ExportError::Damaged(format!(
                "no event holds position {expected}, before the export's range"
            )));
        }
        prev_hash = stored_digest(position, "hash", &hash)?;
        frontier.push(Blake3::leaf(&prev_hash));
        expected += 1;
    }
    if expected != from {
        return Err(ExportError::Damaged(format!(
            "no event holds position {expected}, before the export's range"
        )));
    }
    Ok(PreparedExport {
        header: ExportHeader {
            format: FORMAT.to_string(),
            version: VERSION,
            origin: origin.to_string(),
            organization_id: scope.organization,
            from,
            to,
            prev_hash,
            frontier: frontier.peaks().to_vec(),
            exported_at: Utc::now(),
        },
    })
}

/// A stored hash (`what`: `hash` or `prev_hash`) as read at `position`: a length other than
/// 32 bytes is damage.
fn stored_digest(position: i64, what: &str, b: &[u8]) -> Result<Digest, ExportError> {
    b.try_into().map_err(|_| {
        ExportError::Damaged(format!(
            "the {what} of position {position} is {} bytes, not 32",
            b.len()
        ))
    })
}

/// The stored tree cannot give the frontier: a lost connection stays a database error.
fn damaged(e: TreeError) -> ExportError {
    match e {
        TreeError::Database(e) => ExportError::Database(e),
        e => ExportError::Damaged(format!("the stored Merkle tree: {e}")),
    }
}

/// One row of the range: `full` rows and v2 stubs carry every hashed field (a v2 stub's tag
/// and digest are computed from them here: the file gets only those, but the exporter reads
/// every tenant's content of the range); v1 stubs only position and hash.
#[derive(sqlx::FromRow)]
struct Row {
    position: i64,
    hash: Vec<u8>,
    hash_version: i16,
    full: bool,
    prev_hash: Option<Vec<u8>>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    sequence: Option<i64>,
    event_type: Option<String>,
    event_version: Option<String>,
    organization_id: Option<Uuid>,
    recorded_at: Option<DateTime<Utc>>,
    /// A time no writer stores (`infinity`, or past what `DateTime` holds), left out of
    /// `recorded_at`: decoding it would panic.
    impossible_time: bool,
    payload: Option<String>,
    metadata: Option<String>,
}

const ROWS_SQL: &str = concat!(
    r#"
    SELECT position, hash, hash_version, "full",
           CASE WHEN read THEN prev_hash END AS prev_hash,
           CASE WHEN read THEN aggregate_type END AS aggregate_type,
           CASE WHEN read THEN aggregate_id END AS aggregate_id,
           CASE WHEN read THEN sequence END AS sequence,
           CASE WHEN read THEN event_type END AS event_type,
           CASE WHEN read THEN event_version END AS event_version,
           CASE WHEN read THEN organization_id END AS organization_id,
           CASE WHEN read AND NOT impossible_time THEN recorded_at END AS recorded_at,
           read AND impossible_time AS impossible_time,
           CASE WHEN read THEN payload::text END AS payload,
           CASE WHEN read THEN metadata::text END AS metadata
    FROM (SELECT *, "full" OR hash_version <> 1 AS read
          FROM (SELECT *, coalesce($3::uuid IS NULL OR organization_id = $3, false) AS "full",
                 coalesce("#,
    ledgerline_projections::impossible_time!(),
    r#", false) AS impossible_time
                FROM events WHERE position BETWEEN $1 AND $2) e) r
    ORDER BY position"#
);

impl PreparedExport {
    /// Writes the header and every position of the range, reading it in pages of positions.
    /// What the database holds is written as it is: a damaged range makes a file that does
    /// not verify, which is what an auditor needs to see.
    pub async fn write(
        &self,
        pool: &PgPool,
        mut out: impl AsyncWrite + Unpin,
    ) -> Result<ExportSummary, ExportError> {
        let h = &self.header;
        let mut summary = ExportSummary {
            from: h.from,
            to: h.to,
            full_events: 0,
            stubs: 0,
            bytes: 0,
        };
        let mut buf = Vec::with_capacity(1 << 20);
        h.write_line(&mut buf);
        let mut start = h.from;
        while start <= h.to {
            let end = start.saturating_add(PAGE - 1).min(h.to);
            let rows: Vec<Row> = sqlx::query_as(ROWS_SQL)
                .bind(start)
                .bind(end)
                .bind(h.organization_id)
                .fetch_all(pool)
                .await?;
            for row in &rows {
                write_row(&mut buf, row, &mut summary)?;
            }
            out.write_all(&buf).await?;
            summary.bytes += buf.len() as u64;
            buf.clear();
            start = end + 1;
        }
        out.write_all(&buf).await?;
        summary.bytes += buf.len() as u64;
        out.flush().await?;
        Ok(summary)
    }
}

fn write_row(buf: &mut Vec<u8>, row: &Row, summary: &mut ExportSummary) -> Result<(), ExportError> {
    let hash = stored_digest(row.position, "hash", &row.hash)?;
    if !row.full {
        // Another tenant's event: a v1 one by its hash alone, a v2 one by what its hash is
        // computed from. A v2 row that cannot be hashed ends the export as a damaged one of
        // the organization's own would: a hash-only stub in its place could pass unnoticed.
        if row.hash_version == HashVersion::V1.number() {
            write_stub_line(buf, row.position, &hash);
        } else {
            let (fields, prev_hash) = row_fields(row)?;
            let (tenant_tag, content_digest) = stub_parts(&fields);
            write_stub_v2_line(
                buf,
                row.position,
                &prev_hash,
                &tenant_tag,
                &content_digest,
                &hash,
            );
        }
        summary.stubs += 1;
        return Ok(());
    }
    let (fields, prev_hash) = row_fields(row)?;
    write_event_line(buf, &fields, &prev_hash, &hash);
    summary.full_events += 1;
    Ok(())
}

/// The hashed fields of a row read in full (a v1 stub's are not read), and its `prev_hash`.
fn row_fields(row: &Row) -> Result<(EventFields<'_>, Digest), ExportError> {
    let hash_version = HashVersion::from_number(row.hash_version.into()).ok_or_else(|| {
        ExportError::Damaged(format!(
            "position {}: hash_version holds {}, which no writer stores",
            row.position, row.hash_version
        ))
    })?;
    if row.impossible_time {
        return Err(ExportError::Damaged(format!(
            "position {}: recorded_at holds a time no writer stores",
            row.position
        )));
    }
    // Every column of `events` but organization_id is NOT NULL.
    let missing = || ExportError::Damaged(format!("a NULL field at position {}", row.position));
    let fields = EventFields {
        hash_version,
        position: row.position,
        aggregate_type: row.aggregate_type.as_deref().ok_or_else(missing)?,
        aggregate_id: row.aggregate_id.as_deref().ok_or_else(missing)?,
        sequence: row.sequence.ok_or_else(missing)?,
        event_type: row.event_type.as_deref().ok_or_else(missing)?,
        event_version: row.event_version.as_deref().ok_or_else(missing)?,
        organization_id: row.organization_id,
        recorded_at: row.recorded_at.ok_or_else(missing)?,
        payload: row.payload.as_deref().ok_or_else(missing)?,
        metadata: row.metadata.as_deref().ok_or_else(missing)?,
    };
    let prev_hash = stored_digest(
        row.position,
        "prev_hash",
        row.prev_hash.as_deref().ok_or_else(missing)?,
    )?;
    Ok((fields, prev_hash))
}

/// Exports `scope` to `out`: [`prepare`], then [`PreparedExport::write`]. Streams: at most one
/// page of events is in memory at a time.
pub async fn export(
    pool: &PgPool,
    scope: ExportScope,
    origin: &str,
    out: impl AsyncWrite + Unpin,
) -> Result<ExportSummary, ExportError> {
    prepare(pool, scope, origin).await?.write(pool, out).await
}

/// A digest as 64 lowercase hex digits.
mod hex_digest {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    pub fn parse(text: &str) -> Result<Digest, String> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out)
            .map_err(|_| format!("`{text}` is not 64 hex digits"))?;
        Ok(out)
    }
}

mod hex_digests {
    use super::*;

    pub fn serialize<S: Serializer>(ds: &[Digest], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(ds.iter().map(hex::encode))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Digest>, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        texts
            .iter()
            .map(|t| hex_digest::parse(t).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_json_only_when_it_reads_back_byte_for_byte_on_one_line() {
        for exact in [
            r#"{"a":1}"#,
            r#"{"b": [1, 2.50, "\u00e9 é"], "a":null}"#,
            "{}",
            r#""text""#,
            "1e5",
        ] {
            assert_eq!(raw_json(exact).map(RawValue::get), Some(exact));
        }
        for other in [" {} ", "{}\n", "{\n}", "{\r}", "{} ", "not json"] {
            assert!(raw_json(other).is_none(), "{other:?}");
        }
    }

    #[test]
    fn an_event_line_keeps_the_stored_json_text() {
        let e = EventFields {
            hash_version: HashVersion::V2,
            position: 7,
            aggregate_type: "User",
            aggregate_id: "u-1",
            sequence: 2,
            event_type: "UserInvited",
            event_version: "1",
            organization_id: Some(Uuid::from_u128(5)),
            recorded_at: DateTime::from_timestamp_micros(1_767_268_801_000_007).unwrap(),
            payload: r#"{"name":  "Zo\u00eb"}"#,
            metadata: "{\"a\":\n1}",
        };
        let mut out = Vec::new();
        write_event_line(&mut out, &e, &[1; 32], &[2; 32]);
        let line = String::from_utf8(out).unwrap();
        assert!(line.ends_with("}\n") && !line[..line.len() - 1].contains('\n'));
        assert!(
            line.contains(r#""payload":{"name":  "Zo\u00eb"}"#),
            "{line}"
        );
        assert!(line.contains(r#""metadata_text":"{\"a\":\n1}""#), "{line}");
        assert!(line.contains(
            r#""recorded_at":"2026-01-01T12:00:01.000007Z","recorded_at_micros":1767268801000007"#
        ));
        let mut stub = Vec::new();
        write_stub_line(&mut stub, 9, &[0xab; 32]);
        assert_eq!(
            String::from_utf8(stub).unwrap(),
            format!("{{\"position\":9,\"hash\":\"{}\"}}\n", "ab".repeat(32))
        );
    }
}
