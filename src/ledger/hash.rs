//! The ledger's hash chain, format v1: how one event's hash is computed from the previous
//! hash and every stored field. docs/ledger-format.md specifies the same bytes for auditors.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The `prev_hash` of the event at position 1.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// Domain separation: a v1 event hash can never be confused with any other BLAKE3 use.
const DOMAIN_V1: &[u8] = b"ledgerline.event.v1";

/// The fields of one event that the chain covers, borrowed from wherever they live.
#[derive(Debug, Clone, Copy)]
pub struct EventFields<'a> {
    pub position: i64,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_type: &'a str,
    pub event_version: &'a str,
    pub organization_id: Option<Uuid>,
    pub recorded_at: DateTime<Utc>,
    /// The exact JSON text stored in the `payload` column.
    pub payload: &'a str,
    /// The exact JSON text stored in the `metadata` column.
    pub metadata: &'a str,
}

impl<'a> EventFields<'a> {
    pub fn of(e: &'a ledgerline_projections::StoredEvent) -> Self {
        Self {
            position: e.position,
            aggregate_type: &e.aggregate_type,
            aggregate_id: &e.aggregate_id,
            sequence: e.sequence,
            event_type: &e.event_type,
            event_version: &e.event_version,
            organization_id: e.organization_id,
            recorded_at: e.recorded_at,
            payload: &e.payload,
            metadata: &e.metadata,
        }
    }
}

/// The v1 hash input's fields as bytes: text as its stored bytes, the tenant as its 16 raw
/// UUID bytes, the time as microseconds since the Unix epoch. The verifier reads rows in this
/// form straight from the database; [`event_hash`] converts [`EventFields`] to it.
#[derive(Debug, Clone, Copy)]
pub struct RawFields<'a> {
    pub position: i64,
    pub aggregate_type: &'a [u8],
    pub aggregate_id: &'a [u8],
    pub sequence: i64,
    pub event_type: &'a [u8],
    pub event_version: &'a [u8],
    pub organization_id: Option<&'a [u8; 16]>,
    pub recorded_at_micros: i64,
    pub payload: &'a [u8],
    pub metadata: &'a [u8],
}

/// Where the position sits in the v1 hash input: after the length-prefixed domain and
/// `prev_hash` (the verifier rewrites it in place to find where a moved event was written).
pub const POSITION_AT: usize = 8 + DOMAIN_V1.len() + 32;

/// Writes the v1 hash input into `out` (cleared first), the one definition of the format:
/// every variable-length field is length-prefixed (u64, big-endian), integers are fixed-width
/// big-endian, the tenant is tagged present/absent. BLAKE3 then runs over it in one call.
pub fn encode_v1(out: &mut Vec<u8>, prev_hash: &[u8; 32], f: &RawFields<'_>) {
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u64).to_be_bytes());
        out.extend_from_slice(b);
    }
    out.clear();
    bytes(out, DOMAIN_V1);
    out.extend_from_slice(prev_hash);
    debug_assert_eq!(out.len(), POSITION_AT);
    out.extend_from_slice(&(f.position as u64).to_be_bytes());
    bytes(out, f.aggregate_type);
    bytes(out, f.aggregate_id);
    out.extend_from_slice(&(f.sequence as u64).to_be_bytes());
    bytes(out, f.event_type);
    bytes(out, f.event_version);
    match f.organization_id {
        None => out.push(0),
        Some(org) => {
            out.push(1);
            out.extend_from_slice(org);
        }
    }
    out.extend_from_slice(&f.recorded_at_micros.to_be_bytes());
    bytes(out, f.payload);
    bytes(out, f.metadata);
}

/// BLAKE3 over the v1 encoding of `e` chained to `prev_hash`.
pub fn event_hash(prev_hash: &[u8; 32], e: &EventFields<'_>) -> [u8; 32] {
    let org = e.organization_id.map(|o| *o.as_bytes());
    let raw = RawFields {
        position: e.position,
        aggregate_type: e.aggregate_type.as_bytes(),
        aggregate_id: e.aggregate_id.as_bytes(),
        sequence: e.sequence,
        event_type: e.event_type.as_bytes(),
        event_version: e.event_version.as_bytes(),
        organization_id: org.as_ref(),
        recorded_at_micros: e.recorded_at.timestamp_micros(),
        payload: e.payload.as_bytes(),
        metadata: e.metadata.as_bytes(),
    };
    let mut input = Vec::with_capacity(256 + e.payload.len() + e.metadata.len());
    encode_v1(&mut input, prev_hash, &raw);
    *blake3::hash(&input).as_bytes()
}

/// PostgreSQL keeps microseconds; a time is truncated to them before it is hashed and
/// stored, so that the hash recomputed from the row is the hash written.
pub fn truncate_to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).expect("in range")
}
