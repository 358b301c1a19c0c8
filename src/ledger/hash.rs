//! The ledger's hash chain: how one event's hash is computed from the previous hash and every
//! stored field. docs/ledger-format.md specifies the same bytes for auditors.
//!
//! Two formats exist; each row says which in `events.hash_version`. v1 hashes every field in
//! one input. v2 (every event written since migration 0010) hashes the previous hash, a
//! *tenant tag* (of the position and the tenant) and a *content digest*, so that an
//! organization's export can show another tenant's event as its tag and digest: the chain
//! still links through it, and the tag proves it is not the exported organization's own (a
//! v1 stub, its hash alone, could hide one of them).

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The `prev_hash` of the event at position 1.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// Domain separation: no two of these inputs, nor any other BLAKE3 use, share bytes.
const DOMAIN_V1: &[u8] = b"ledgerline.event.v1";
const DOMAIN_V2: &[u8] = b"ledgerline.event.v2";
const DOMAIN_TENANT_V2: &[u8] = b"ledgerline.tenant.v2";
const DOMAIN_CONTENT_V2: &[u8] = b"ledgerline.content.v2";

/// Which format an event's hash is in: the `hash_version` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashVersion {
    V1,
    V2,
}

impl HashVersion {
    /// The format the writer uses.
    pub const CURRENT: HashVersion = HashVersion::V2;

    /// The column's value; `None` for a number no writer stores.
    pub fn from_number(n: i64) -> Option<Self> {
        match n {
            1 => Some(Self::V1),
            2 => Some(Self::V2),
            _ => None,
        }
    }

    pub fn number(self) -> i16 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }
}

/// The hash formats of a run of events, in position order, against the rule that no v1 event
/// follows a v2 one (the writer switched to v2 for good). The verifiers check ranges apart and
/// join them: each range keeps one of these, and the join asks whether a range may follow the
/// ranges before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FormatRun {
    first: Option<HashVersion>,
    has_v2: bool,
}

impl FormatRun {
    /// Takes the next event's format; `false` (and nothing taken) if it is v1 after v2.
    pub fn admit(&mut self, version: HashVersion) -> bool {
        if self.has_v2 && version == HashVersion::V1 {
            return false;
        }
        self.first.get_or_insert(version);
        self.has_v2 |= version == HashVersion::V2;
        true
    }

    /// Whether the run holds a v2 event.
    pub fn has_v2(&self) -> bool {
        self.has_v2
    }

    /// Whether this run may follow `before`.
    pub fn may_follow(&self, before: &FormatRun) -> bool {
        !(before.has_v2 && self.first == Some(HashVersion::V1))
    }

    /// `before` followed by this run, as one.
    pub fn after(&self, before: &FormatRun) -> FormatRun {
        FormatRun {
            first: before.first.or(self.first),
            has_v2: before.has_v2 || self.has_v2,
        }
    }
}

/// The fields of one event that the chain covers, borrowed from wherever they live.
#[derive(Debug, Clone, Copy)]
pub struct EventFields<'a> {
    /// The format the hash is (to be) computed in.
    pub hash_version: HashVersion,
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
            // A number no writer stores is hashed as v1, so that it matches nothing the
            // writer wrote in v2; `verify` reports the number itself, and the maintainer
            // refuses it before hashing.
            hash_version: HashVersion::from_number(e.hash_version.into())
                .unwrap_or(HashVersion::V1),
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

/// The hashed fields as bytes: text as its stored bytes, the tenant as its 16 raw
/// UUID bytes, the time as microseconds since the Unix epoch. The verifier reads rows in this
/// form straight from the database; [`event_hash`] converts [`EventFields`] to it.
#[derive(Debug, Clone, Copy)]
pub struct RawFields<'a> {
    pub hash_version: HashVersion,
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
/// `prev_hash` ([`written_at`] rewrites it in place to find where a moved event was written).
const POSITION_AT: usize = 8 + DOMAIN_V1.len() + 32;

/// Writes the v1 hash input into `out` (cleared first), the one definition of the format:
/// every variable-length field is length-prefixed (u64, big-endian), integers are fixed-width
/// big-endian, the tenant is tagged present/absent. BLAKE3 then runs over it in one call.
fn encode_v1(out: &mut Vec<u8>, prev_hash: &[u8; 32], f: &RawFields<'_>) {
    out.clear();
    length_prefixed(out, DOMAIN_V1);
    out.extend_from_slice(prev_hash);
    debug_assert_eq!(out.len(), POSITION_AT);
    out.extend_from_slice(&(f.position as u64).to_be_bytes());
    content_fields(out, f);
}

/// The fields after the position in v1, which are also v2's content: from `aggregate_type` to
/// `metadata`, the tenant included.
fn content_fields(out: &mut Vec<u8>, f: &RawFields<'_>) {
    length_prefixed(out, f.aggregate_type);
    length_prefixed(out, f.aggregate_id);
    out.extend_from_slice(&(f.sequence as u64).to_be_bytes());
    length_prefixed(out, f.event_type);
    length_prefixed(out, f.event_version);
    tenant(out, f.organization_id);
    out.extend_from_slice(&f.recorded_at_micros.to_be_bytes());
    length_prefixed(out, f.payload);
    length_prefixed(out, f.metadata);
}

impl<'a> EventFields<'a> {
    /// The same fields as the bytes that are hashed; `org` holds the tenant's bytes.
    fn raw(&self, org: &'a Option<[u8; 16]>) -> RawFields<'a> {
        RawFields {
            hash_version: self.hash_version,
            position: self.position,
            aggregate_type: self.aggregate_type.as_bytes(),
            aggregate_id: self.aggregate_id.as_bytes(),
            sequence: self.sequence,
            event_type: self.event_type.as_bytes(),
            event_version: self.event_version.as_bytes(),
            organization_id: org.as_ref(),
            recorded_at_micros: self.recorded_at.timestamp_micros(),
            payload: self.payload.as_bytes(),
            metadata: self.metadata.as_bytes(),
        }
    }
}

/// The hash of `e`, in its `hash_version`, chained to `prev_hash`.
pub fn event_hash(prev_hash: &[u8; 32], e: &EventFields<'_>) -> [u8; 32] {
    let org = e.organization_id.map(|o| *o.as_bytes());
    let mut input = Vec::with_capacity(256 + e.payload.len() + e.metadata.len());
    raw_hash(&mut input, prev_hash, &e.raw(&org))
}

/// The v2 parts of `e` that an organization's export shows for another tenant's event.
pub fn stub_parts(e: &EventFields<'_>) -> ([u8; 32], [u8; 32]) {
    let org = e.organization_id.map(|o| *o.as_bytes());
    let raw = e.raw(&org);
    let mut input = Vec::with_capacity(256 + e.payload.len() + e.metadata.len());
    (
        tenant_tag(raw.position, raw.organization_id),
        content_digest(&mut input, &raw),
    )
}

/// The hash of `f` chained to `prev_hash`, in `f.hash_version`, with `input` as scratch space
/// (the verifiers reuse one buffer for every row).
pub fn raw_hash(input: &mut Vec<u8>, prev_hash: &[u8; 32], f: &RawFields<'_>) -> [u8; 32] {
    match f.hash_version {
        HashVersion::V1 => {
            encode_v1(input, prev_hash, f);
            *blake3::hash(input).as_bytes()
        }
        HashVersion::V2 => {
            let digest = content_digest(input, f);
            let tag = tenant_tag(f.position, f.organization_id);
            chain_v2(prev_hash, &tag, &digest)
        }
    }
}

/// For an event whose recomputed hash is not `stored`: the position near `f.position` (within
/// `window`) at which its fields do hash to `stored`, if any, i.e. where a moved event was
/// written. Both verifiers use it.
pub fn written_at(
    input: &mut Vec<u8>,
    prev_hash: &[u8; 32],
    f: &RawFields<'_>,
    window: i64,
    stored: &[u8; 32],
) -> Option<i64> {
    let at = f.position;
    let mut candidates =
        (at.saturating_sub(window).max(1)..=at.saturating_add(window)).filter(|q| *q != at);
    match f.hash_version {
        HashVersion::V1 => {
            encode_v1(input, prev_hash, f);
            candidates.find(|q| {
                input[POSITION_AT..POSITION_AT + 8].copy_from_slice(&(*q as u64).to_be_bytes());
                blake3::hash(input) == *stored
            })
        }
        HashVersion::V2 => {
            // The content digest does not depend on the position; the tag and the link do.
            let digest = content_digest(input, f);
            candidates.find(|q| {
                let tag = tenant_tag(*q, f.organization_id);
                chain_v2(prev_hash, &tag, &digest) == *stored
            })
        }
    }
}

fn length_prefixed(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_be_bytes());
    out.extend_from_slice(b);
}

fn tenant(out: &mut Vec<u8>, organization_id: Option<&[u8; 16]>) {
    match organization_id {
        None => out.push(0),
        Some(org) => {
            out.push(1);
            out.extend_from_slice(org);
        }
    }
}

/// v2: BLAKE3 over the tenant tag's domain, the position and the tenant. Tied to the
/// position, so that tags do not link one tenant's events to each other; whoever knows an
/// organization's id can compute its tag at any position, which is how an export's verifier
/// tells that a stub is not the exported organization's. So can anyone for the platform (no
/// tenant): an export shows which positions are platform events.
pub fn tenant_tag(position: i64, organization_id: Option<&[u8; 16]>) -> [u8; 32] {
    // The tenant as `tenant` encodes it: a tag byte, then the UUID's bytes if there is one.
    let (present, org): (&[u8], &[u8]) = match organization_id {
        None => (&[0], &[]),
        Some(org) => (&[1], org),
    };
    hash_parts::<{ 8 + DOMAIN_TENANT_V2.len() + 8 + 17 }>(&[
        &(DOMAIN_TENANT_V2.len() as u64).to_be_bytes(),
        DOMAIN_TENANT_V2,
        &(position as u64).to_be_bytes(),
        present,
        org,
    ])
}

/// BLAKE3 of `parts` laid end to end in a stack buffer of at most `N` bytes: the small v2
/// inputs, which every verifier hashes per event, without an allocation each.
fn hash_parts<const N: usize>(parts: &[&[u8]]) -> [u8; 32] {
    let mut input = [0u8; N];
    let mut at = 0;
    for part in parts {
        input[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    *blake3::hash(&input[..at]).as_bytes()
}

/// v2: BLAKE3 over the content's domain and every hashed field but the position, encoded as
/// in v1. The tenant is in it too (the tag covers it already), so that confirming a guess of
/// an event's content from its digest needs its tenant as well, as it does for a v1 hash.
/// `input` is scratch space.
pub fn content_digest(input: &mut Vec<u8>, f: &RawFields<'_>) -> [u8; 32] {
    input.clear();
    length_prefixed(input, DOMAIN_CONTENT_V2);
    content_fields(input, f);
    *blake3::hash(input).as_bytes()
}

/// v2: the event hash from the previous hash, the tag and the digest: all a verifier needs of
/// a stub to carry the chain through it. The position is bound through the tag; leaving it out
/// here keeps the input within two BLAKE3 blocks (123 bytes), a compression less per event for
/// the writer and every verifier.
pub fn chain_v2(prev_hash: &[u8; 32], tag: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    hash_parts::<V2_INPUT_LEN>(&[
        &(DOMAIN_V2.len() as u64).to_be_bytes(),
        DOMAIN_V2,
        prev_hash,
        tag,
        digest,
    ])
}

/// The v2 event input's length: domain (8 + 19), previous hash, tag, digest.
pub const V2_INPUT_LEN: usize = 8 + DOMAIN_V2.len() + 32 + 32 + 32;

/// PostgreSQL keeps microseconds; a time is truncated to them before it is hashed and
/// stored, so that the hash recomputed from the row is the hash written.
pub fn truncate_to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).expect("in range")
}
