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

fn put_bytes(h: &mut blake3::Hasher, b: &[u8]) {
    h.update(&(b.len() as u64).to_be_bytes());
    h.update(b);
}

/// BLAKE3 over the v1 encoding: every variable-length field is length-prefixed (u64,
/// big-endian), integers are fixed-width big-endian, the tenant is tagged present/absent.
pub fn event_hash(prev_hash: &[u8; 32], e: &EventFields<'_>) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    put_bytes(&mut h, DOMAIN_V1);
    h.update(prev_hash);
    h.update(&(e.position as u64).to_be_bytes());
    put_bytes(&mut h, e.aggregate_type.as_bytes());
    put_bytes(&mut h, e.aggregate_id.as_bytes());
    h.update(&(e.sequence as u64).to_be_bytes());
    put_bytes(&mut h, e.event_type.as_bytes());
    put_bytes(&mut h, e.event_version.as_bytes());
    match e.organization_id {
        None => {
            h.update(&[0u8]);
        }
        Some(org) => {
            h.update(&[1u8]);
            h.update(org.as_bytes());
        }
    }
    h.update(&e.recorded_at.timestamp_micros().to_be_bytes());
    put_bytes(&mut h, e.payload.as_bytes());
    put_bytes(&mut h, e.metadata.as_bytes());
    *h.finalize().as_bytes()
}

/// PostgreSQL keeps microseconds; a time is truncated to them before it is hashed and
/// stored, so that the hash recomputed from the row is the hash written.
pub fn truncate_to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).expect("in range")
}
