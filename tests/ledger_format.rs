//! docs/ledger-format.md against the code: the test vectors parsed out of the page must be
//! what `event_hash` computes, their hex encodings must be the hash inputs, an encoder written
//! from the page alone must agree with `event_hash` in both formats (v1 and v2), the page's SQL
//! must read a real database into exactly the values that were hashed, and the page's example
//! export file must be what the exporter writes and must verify as the page says.

mod common;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use common::{TestApp, TestDb};
use ledgerline::ledger::hash::{self, event_hash, EventFields, HashVersion, RawFields, GENESIS};
use ledgerline::ledger::verify::verify_database;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/ledger-format.md");

fn doc() -> String {
    std::fs::read_to_string(DOC).unwrap_or_else(|e| panic!("reading {DOC}: {e}"))
}

/// A fenced block: the text after the opening fence, and the lines inside.
struct Block {
    info: String,
    lines: Vec<String>,
}

fn fenced_blocks(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for line in text.lines() {
        match open.take() {
            None => {
                if let Some(info) = line.strip_prefix("```") {
                    open = Some(Block {
                        info: info.trim().to_string(),
                        lines: Vec::new(),
                    });
                }
            }
            Some(mut b) => {
                if line.trim_end() == "```" {
                    blocks.push(b);
                } else {
                    b.lines.push(line.to_string());
                    open = Some(b);
                }
            }
        }
    }
    assert!(open.is_none(), "an unclosed fenced block in {DOC}");
    blocks
}

/// The fields every vector has.
const VECTOR_KEYS: [&str; 15] = [
    "vector",
    "position",
    "aggregate_type",
    "aggregate_id",
    "sequence",
    "event_type",
    "event_version",
    "organization_id",
    "recorded_at",
    "recorded_at_micros",
    "payload",
    "metadata",
    "prev_hash",
    "input_length",
    "hash",
];

/// The fields a v2 vector has besides, and a v1 vector must not have: the two parts of a v2
/// hash, which an export's stub carries.
const V2_KEYS: [&str; 4] = [
    "tenant_tag_input_length",
    "tenant_tag",
    "content_digest_input_length",
    "content_digest",
];

/// One test vector as written in the page.
#[derive(Debug, Clone)]
struct Vector {
    n: u32,
    hash_version: HashVersion,
    position: i64,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    organization_id: Option<Uuid>,
    recorded_at: DateTime<Utc>,
    payload: String,
    metadata: String,
    prev_hash: [u8; 32],
    input_length: usize,
    hash: [u8; 32],
    /// A v2 vector's tenant tag and content digest.
    v2: Option<V2Parts>,
}

#[derive(Debug, Clone)]
struct V2Parts {
    tenant_tag_input_length: usize,
    tenant_tag: [u8; 32],
    content_digest_input_length: usize,
    content_digest: [u8; 32],
}

impl Vector {
    fn fields(&self) -> EventFields<'_> {
        EventFields {
            hash_version: self.hash_version,
            position: self.position,
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            sequence: self.sequence,
            event_type: &self.event_type,
            event_version: &self.event_version,
            organization_id: self.organization_id,
            recorded_at: self.recorded_at,
            payload: &self.payload,
            metadata: &self.metadata,
        }
    }
}

fn hash32(s: &str) -> [u8; 32] {
    hex::decode(s)
        .unwrap_or_else(|e| panic!("`{s}`: {e}"))
        .try_into()
        .expect("32 bytes")
}

/// `name: value` lines; the value is everything after the first `": "` (or nothing after a
/// bare `name:`), untrimmed.
fn parse_vector(lines: &[String]) -> Vector {
    let mut m: BTreeMap<&str, &str> = BTreeMap::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("not `name: value`: {line}"));
        let v = v.strip_prefix(' ').unwrap_or(v);
        assert!(
            VECTOR_KEYS.contains(&k) || V2_KEYS.contains(&k) || k == "hash_version",
            "unknown field `{k}` in a vector"
        );
        assert!(m.insert(k, v).is_none(), "field `{k}` twice in a vector");
    }
    for k in VECTOR_KEYS {
        assert!(
            m.contains_key(k),
            "vector {:?} lacks `{k}`",
            m.get("vector")
        );
    }
    // Absent means 1, as in an export line.
    let hash_version = match m.get("hash_version").copied() {
        None | Some("1") => HashVersion::V1,
        Some("2") => HashVersion::V2,
        Some(v) => panic!("vector {:?}: hash_version `{v}`", m.get("vector")),
    };
    let v2 = match hash_version {
        HashVersion::V1 => {
            for k in V2_KEYS {
                assert!(
                    !m.contains_key(k),
                    "v1 vector {:?} has `{k}`",
                    m.get("vector")
                );
            }
            None
        }
        HashVersion::V2 => {
            for k in V2_KEYS {
                assert!(
                    m.contains_key(k),
                    "v2 vector {:?} lacks `{k}`",
                    m.get("vector")
                );
            }
            Some(V2Parts {
                tenant_tag_input_length: m["tenant_tag_input_length"].parse().unwrap(),
                tenant_tag: hash32(m["tenant_tag"]),
                content_digest_input_length: m["content_digest_input_length"].parse().unwrap(),
                content_digest: hash32(m["content_digest"]),
            })
        }
    };
    let micros: i64 = m["recorded_at_micros"].parse().unwrap();
    let recorded_at = DateTime::from_timestamp_micros(micros).unwrap();
    let readable: DateTime<Utc> = m["recorded_at"].parse().expect("recorded_at is RFC 3339");
    assert_eq!(
        readable, recorded_at,
        "recorded_at and recorded_at_micros agree"
    );
    Vector {
        n: m["vector"].parse().unwrap(),
        hash_version,
        position: m["position"].parse().unwrap(),
        aggregate_type: m["aggregate_type"].to_string(),
        aggregate_id: m["aggregate_id"].to_string(),
        sequence: m["sequence"].parse().unwrap(),
        event_type: m["event_type"].to_string(),
        event_version: m["event_version"].to_string(),
        organization_id: match m["organization_id"] {
            "none" => None,
            s => Some(s.parse().unwrap()),
        },
        recorded_at,
        payload: m["payload"].to_string(),
        metadata: m["metadata"].to_string(),
        prev_hash: hash32(m["prev_hash"]),
        input_length: m["input_length"].parse().unwrap(),
        hash: hash32(m["hash"]),
        v2,
    }
}

fn vectors() -> Vec<Vector> {
    let v: Vec<Vector> = fenced_blocks(&doc())
        .iter()
        .filter(|b| b.lines.first().is_some_and(|l| l.starts_with("vector:")))
        .map(|b| parse_vector(&b.lines))
        .collect();
    let numbers: Vec<u32> = v.iter().map(|v| v.n).collect();
    assert_eq!(
        numbers,
        (1..=v.len() as u32).collect::<Vec<_>>(),
        "vectors are numbered 1, 2, …"
    );
    v
}

/// Vector `n` (numbered from 1).
fn vector(n: u32) -> Vector {
    vectors()
        .into_iter()
        .find(|v| v.n == n)
        .unwrap_or_else(|| panic!("no vector {n} in the page"))
}

/// Which of a vector's inputs an `encoding:` block gives: `encoding: n` is the input whose
/// BLAKE3 is the event hash; a v2 vector also has `encoding: n tenant_tag` and
/// `encoding: n content_digest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Input {
    Event,
    TenantTag,
    ContentDigest,
}

/// `encoding: n [part]` blocks: hex, with `#` comments and whitespace ignored.
fn encodings() -> BTreeMap<(u32, Input), Vec<u8>> {
    let mut out = BTreeMap::new();
    for b in fenced_blocks(&doc()) {
        let Some(label) = b.lines.first().and_then(|l| l.strip_prefix("encoding: ")) else {
            continue;
        };
        let (n, input) = match label.trim().split_once(' ') {
            None => (label.trim(), Input::Event),
            Some((n, "tenant_tag")) => (n, Input::TenantTag),
            Some((n, "content_digest")) => (n, Input::ContentDigest),
            Some(_) => panic!("unknown encoding block `{label}`"),
        };
        let n: u32 = n.parse().unwrap();
        let hex_text: String = b.lines[1..]
            .iter()
            .map(|l| l.split('#').next().unwrap())
            .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
            .collect();
        let bytes = hex::decode(&hex_text).unwrap_or_else(|e| panic!("encoding {label}: {e}"));
        assert!(
            out.insert((n, input), bytes).is_none(),
            "encoding {label} twice"
        );
    }
    out
}

// ---------------------------------------------------------------------------------------
// An encoder written from the page alone (sections 3 and 3b), not from src/ledger/hash.rs:
// where the two agree, the page specifies what the code computes.

/// A string: its u64 big-endian byte length, then the bytes.
fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_be_bytes());
    out.extend_from_slice(s);
}

/// v1 field 9, also the tenant in v2's tenant and content inputs.
fn tenant(out: &mut Vec<u8>, org: Option<Uuid>) {
    match org {
        None => out.push(0x00),
        Some(org) => {
            out.push(0x01);
            // RFC 4122 order: the 32 hex digits of the canonical text form, in order.
            out.extend_from_slice(&hex::decode(org.to_string().replace('-', "")).unwrap());
        }
    }
}

fn u64_be(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(&u64::try_from(n).unwrap().to_be_bytes());
}

/// The v1 encoding, written from the table in docs/ledger-format.md section 3 and nothing else.
fn encode_v1(prev_hash: &[u8; 32], e: &EventFields<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    string(&mut out, b"ledgerline.event.v1");
    out.extend_from_slice(prev_hash);
    u64_be(&mut out, e.position);
    v1_fields_4_to_12(&mut out, e);
    out
}

/// Fields 4 to 12 of section 3's table (`aggregate_type` to `metadata`), which are also, in the
/// same order, section 3b's content input after its domain.
fn v1_fields_4_to_12(out: &mut Vec<u8>, e: &EventFields<'_>) {
    string(out, e.aggregate_type.as_bytes());
    string(out, e.aggregate_id.as_bytes());
    u64_be(out, e.sequence);
    string(out, e.event_type.as_bytes());
    string(out, e.event_version.as_bytes());
    tenant(out, e.organization_id);
    out.extend_from_slice(&e.recorded_at.timestamp_micros().to_be_bytes());
    string(out, e.payload.as_bytes());
    string(out, e.metadata.as_bytes());
}

/// Section 3b's tenant input.
fn tenant_input_v2(position: i64, org: Option<Uuid>) -> Vec<u8> {
    let mut out = Vec::new();
    string(&mut out, b"ledgerline.tenant.v2");
    u64_be(&mut out, position);
    tenant(&mut out, org);
    out
}

/// Section 3b's content input: v1's fields but prev_hash and position (the tenant included).
fn content_input_v2(e: &EventFields<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    string(&mut out, b"ledgerline.content.v2");
    v1_fields_4_to_12(&mut out, e);
    out
}

/// Section 3b's event input: no position (the tag binds it).
fn event_input_v2(prev_hash: &[u8; 32], tag: &[u8; 32], digest: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::new();
    string(&mut out, b"ledgerline.event.v2");
    out.extend_from_slice(prev_hash);
    out.extend_from_slice(tag);
    out.extend_from_slice(digest);
    out
}

fn blake3_of(input: &[u8]) -> [u8; 32] {
    *blake3::hash(input).as_bytes()
}

/// The event's hash as the page defines it, in `e.hash_version`.
fn page_hash(prev_hash: &[u8; 32], e: &EventFields<'_>) -> [u8; 32] {
    match e.hash_version {
        HashVersion::V1 => blake3_of(&encode_v1(prev_hash, e)),
        HashVersion::V2 => {
            let tag = blake3_of(&tenant_input_v2(e.position, e.organization_id));
            let digest = blake3_of(&content_input_v2(e));
            blake3_of(&event_input_v2(prev_hash, &tag, &digest))
        }
    }
}

#[test]
fn the_page_has_at_least_three_vectors_each_with_its_encoding() {
    let v = vectors();
    assert!(v.len() >= 3, "at least three vectors, found {}", v.len());
    let enc = encodings();
    let mut expected = 0;
    for vector in &v {
        let inputs: &[Input] = match vector.hash_version {
            HashVersion::V1 => &[Input::Event],
            HashVersion::V2 => &[Input::Event, Input::TenantTag, Input::ContentDigest],
        };
        for input in inputs {
            assert!(
                enc.contains_key(&(vector.n, *input)),
                "vector {} has no {input:?} encoding block",
                vector.n,
            );
        }
        expected += inputs.len();
    }
    assert_eq!(
        enc.len(),
        expected,
        "encoding blocks for every vector's inputs and no other"
    );
}

#[test]
fn event_hash_reproduces_every_vector() {
    for v in vectors() {
        assert_eq!(
            hex::encode(event_hash(&v.prev_hash, &v.fields())),
            hex::encode(v.hash),
            "vector {}",
            v.n
        );
    }
}

/// The code's parts of a v2 hash (what an export's v2 stub carries) are the page's.
#[test]
fn the_v2_parts_are_the_codes() {
    let mut input = Vec::new();
    for v in vectors() {
        let Some(parts) = &v.v2 else { continue };
        let org = v.organization_id.map(|o| *o.as_bytes());
        let f = v.fields();
        let raw = RawFields {
            hash_version: v.hash_version,
            position: v.position,
            aggregate_type: f.aggregate_type.as_bytes(),
            aggregate_id: f.aggregate_id.as_bytes(),
            sequence: v.sequence,
            event_type: f.event_type.as_bytes(),
            event_version: f.event_version.as_bytes(),
            organization_id: org.as_ref(),
            recorded_at_micros: v.recorded_at.timestamp_micros(),
            payload: f.payload.as_bytes(),
            metadata: f.metadata.as_bytes(),
        };
        let tag = hash::tenant_tag(v.position, org.as_ref());
        let digest = hash::content_digest(&mut input, &raw);
        assert_eq!(
            hex::encode(tag),
            hex::encode(parts.tenant_tag),
            "vector {}",
            v.n
        );
        assert_eq!(
            hex::encode(digest),
            hex::encode(parts.content_digest),
            "vector {}",
            v.n
        );
        assert_eq!(hash::stub_parts(&f), (tag, digest), "vector {}", v.n);
        assert_eq!(
            hash::chain_v2(&v.prev_hash, &tag, &digest),
            v.hash,
            "vector {}: the hash from a stub's parts",
            v.n
        );
        assert_eq!(hash::raw_hash(&mut input, &v.prev_hash, &raw), v.hash);
    }
}

#[test]
fn vectors_one_to_three_form_a_chain() {
    let v = vectors();
    assert_eq!(v[0].prev_hash, GENESIS, "vector 1 starts at genesis");
    for (i, x) in v.iter().take(3).enumerate() {
        assert_eq!(
            x.position,
            i as i64 + 1,
            "vector {} is at its own number",
            i + 1
        );
    }
    assert_eq!(v[1].prev_hash, v[0].hash, "vector 2 links to vector 1");
    assert_eq!(v[2].prev_hash, v[1].hash, "vector 3 links to vector 2");
    // What they are meant to cover.
    assert_eq!(v[0].organization_id, None, "vector 1 is a platform event");
    assert!(v[1].organization_id.is_some(), "vector 2 has a tenant");
    assert!(
        !v[2].payload.is_ascii(),
        "vector 3 has non-ASCII text in its payload"
    );
    assert!(v[2].payload.contains("Zoë"));
    // The payloads and metadata are JSON, as the table's columns require.
    for x in &v {
        serde_json::from_str::<serde_json::Value>(&x.payload)
            .unwrap_or_else(|e| panic!("vector {}: {e}", x.n));
        serde_json::from_str::<serde_json::Value>(&x.metadata)
            .unwrap_or_else(|e| panic!("vector {}: {e}", x.n));
    }
}

/// What section 8 says of vectors 5–7: v2 events continuing the chain of vectors 1–3 as in a
/// log upgraded after three events, a tenant-less one, and vector 4's edge cases in v2.
#[test]
fn vectors_five_to_seven_are_v2_after_the_v1_chain() {
    let v = vectors();
    assert_eq!(v.len(), 7, "vectors 1–7");
    for x in &v[..4] {
        assert_eq!(x.hash_version, HashVersion::V1, "vector {} is v1", x.n);
    }
    for x in &v[4..] {
        assert_eq!(x.hash_version, HashVersion::V2, "vector {} is v2", x.n);
    }
    let (v3, v4, v5, v6, v7) = (&v[2], &v[3], &v[4], &v[5], &v[6]);
    assert_eq!(
        (v5.position, v5.prev_hash),
        (4, v3.hash),
        "vector 5 follows vector 3"
    );
    assert_eq!(
        (v6.position, v6.prev_hash),
        (5, v5.hash),
        "vector 6 follows vector 5"
    );
    assert_eq!(
        v5.organization_id, v3.organization_id,
        "vector 5 is of vectors 2 and 3's tenant"
    );
    assert_eq!(v6.organization_id, None, "vector 6 is a platform event");
    let as_v2 = EventFields {
        hash_version: HashVersion::V2,
        ..v4.fields()
    };
    assert_eq!(
        format!("{:?}", v7.fields()),
        format!("{as_v2:?}"),
        "vector 7 is vector 4's fields in v2"
    );
    assert_eq!(v7.prev_hash, v4.prev_hash);
    assert_ne!(
        v7.hash, v4.hash,
        "the two formats hash the same fields differently"
    );
}

#[test]
fn encodings_are_the_hash_inputs() {
    let enc = encodings();
    for v in vectors() {
        let bytes = &enc[&(v.n, Input::Event)];
        assert_eq!(bytes.len(), v.input_length, "vector {}: input_length", v.n);
        assert_eq!(
            blake3_of(bytes),
            v.hash,
            "vector {}: BLAKE3 of the encoding",
            v.n
        );
        let f = v.fields();
        // Each string's length: the fixed-width parts come from the page's length formulas.
        let strings: usize = [
            f.aggregate_type,
            f.aggregate_id,
            f.event_type,
            f.event_version,
            f.payload,
            f.metadata,
        ]
        .iter()
        .map(|s| s.len())
        .sum();
        match &v.v2 {
            None => {
                assert_eq!(
                    hex::encode(encode_v1(&v.prev_hash, &f)),
                    hex::encode(bytes),
                    "vector {}: the encoder written from the page",
                    v.n
                );
                // 132 bytes (no tenant) or 148 (tenant) plus the strings.
                let fixed = if v.organization_id.is_some() {
                    148
                } else {
                    132
                };
                assert_eq!(bytes.len(), fixed + strings, "vector {}", v.n);
            }
            Some(parts) => {
                let tenant_bytes = &enc[&(v.n, Input::TenantTag)];
                let content_bytes = &enc[&(v.n, Input::ContentDigest)];
                assert_eq!(tenant_bytes.len(), parts.tenant_tag_input_length);
                assert_eq!(content_bytes.len(), parts.content_digest_input_length);
                assert_eq!(blake3_of(tenant_bytes), parts.tenant_tag, "vector {}", v.n);
                assert_eq!(
                    blake3_of(content_bytes),
                    parts.content_digest,
                    "vector {}",
                    v.n
                );
                assert_eq!(
                    hex::encode(tenant_input_v2(v.position, v.organization_id)),
                    hex::encode(tenant_bytes),
                    "vector {}: the tenant input written from the page",
                    v.n
                );
                assert_eq!(
                    hex::encode(content_input_v2(&f)),
                    hex::encode(content_bytes),
                    "vector {}: the content input written from the page",
                    v.n
                );
                assert_eq!(
                    hex::encode(event_input_v2(
                        &v.prev_hash,
                        &parts.tenant_tag,
                        &parts.content_digest
                    )),
                    hex::encode(bytes),
                    "vector {}: the event input written from the page",
                    v.n
                );
                // The page's lengths: 37 or 53, 94 or 110 plus the strings, always 123.
                let (tenant_len, content_fixed) = if v.organization_id.is_some() {
                    (53, 110)
                } else {
                    (37, 94)
                };
                assert_eq!(tenant_bytes.len(), tenant_len, "vector {}", v.n);
                assert_eq!(
                    content_bytes.len(),
                    content_fixed + strings,
                    "vector {}",
                    v.n
                );
                assert_eq!(bytes.len(), 123, "vector {}", v.n);
                assert!(
                    bytes.len() <= 2 * 64,
                    "within two BLAKE3 blocks (section 3b)"
                );
            }
        }
    }
}

#[test]
fn the_encoder_from_the_page_agrees_with_event_hash() {
    let payloads = [
        "{}",
        r#"{"a": 1 , "b":"\u00e9"}"#,
        "{\"name\":\"Zoë 🦀\"}",
        "",
    ];
    let times = [
        -8_000_000_000_000_000_000,
        -62_135_596_800_000_000,
        -1,
        0,
        1,
        1_767_268_800_123_456,
        253_402_300_799_999_999,
    ];
    let orgs = [
        None,
        Some(Uuid::nil()),
        Some(Uuid::max()),
        Some(Uuid::new_v4()),
    ];
    for version in [HashVersion::V1, HashVersion::V2] {
        let mut prev = GENESIS;
        for (i, &t) in times.iter().enumerate() {
            for (j, &org) in orgs.iter().enumerate() {
                for p in payloads {
                    let e = EventFields {
                        hash_version: version,
                        position: 1 + (i as i64) * 1_000_003 + j as i64,
                        aggregate_type: ["", "ApiKey", "Édition"][j % 3],
                        aggregate_id: &format!("id-{i}-{j}"),
                        sequence: (i * j) as i64,
                        event_type: "Tested",
                        event_version: "1",
                        organization_id: org,
                        recorded_at: DateTime::from_timestamp_micros(t).unwrap(),
                        payload: p,
                        metadata: r#"{"actor_kind":"test"}"#,
                    };
                    let h = event_hash(&prev, &e);
                    assert_eq!(page_hash(&prev, &e), h, "{e:?}");
                    prev = h;
                }
            }
        }
        let big = EventFields {
            hash_version: version,
            position: i64::MAX,
            sequence: i64::MAX,
            ..sample()
        };
        assert_eq!(page_hash(&GENESIS, &big), event_hash(&GENESIS, &big));
    }
}

fn sample() -> EventFields<'static> {
    EventFields {
        hash_version: HashVersion::V1,
        position: 7,
        aggregate_type: "Role",
        aggregate_id: "59656f97-644d-57a4-818b-33b54646d1db",
        sequence: 2,
        event_type: "RoleUpdated",
        event_version: "1",
        organization_id: Some(Uuid::from_u128(0x0123_4567_89ab_4cde_8f01_2345_6789_abcd)),
        recorded_at: DateTime::from_timestamp_micros(1_767_268_800_123_456).unwrap(),
        payload: r#"{"RoleUpdated":{"name":"support"}}"#,
        metadata: r#"{"actor_kind":"api_key"}"#,
    }
}

/// Moving bytes between adjacent fields, or a tenant between absent and the nil UUID, must
/// change the hash, in either format: otherwise a forger could rewrite an event's meaning under
/// the same hash.
#[test]
fn the_encoding_is_unambiguous() {
    unambiguous_in(HashVersion::V1);
    unambiguous_in(HashVersion::V2);
}

/// The two formats and the three v2 inputs are kept apart by their domain strings, and a v2
/// hash splits as section 3b says: the tag covers the position and the tenant only, the digest
/// every field but the position (the tenant too), so that a stub's two parts carry the chain
/// without the content, and its digest confirms a guess of the content only with its tenant.
#[test]
fn the_formats_and_the_v2_parts_are_separate() {
    let v1 = sample();
    let v2 = EventFields {
        hash_version: HashVersion::V2,
        ..v1
    };
    assert_ne!(event_hash(&GENESIS, &v1), event_hash(&GENESIS, &v2));
    let (tag, digest) = hash::stub_parts(&v2);
    assert_ne!(tag, digest);
    let org = v2.organization_id.map(|o| *o.as_bytes());
    assert_eq!(tag, hash::tenant_tag(v2.position, org.as_ref()));
    // The tag changes with the position and the tenant, and with nothing else.
    let moved = EventFields { position: 8, ..v2 };
    let other_tenant = EventFields {
        organization_id: None,
        ..v2
    };
    let other_content = EventFields {
        payload: "{}",
        sequence: 9,
        recorded_at: DateTime::from_timestamp_micros(0).unwrap(),
        ..v2
    };
    assert_ne!(hash::stub_parts(&moved).0, tag);
    assert_eq!(
        hash::stub_parts(&moved).1,
        digest,
        "the digest has no position"
    );
    assert_ne!(hash::stub_parts(&other_tenant).0, tag);
    assert_ne!(
        hash::stub_parts(&other_tenant).1,
        digest,
        "the digest covers the tenant"
    );
    let nil_tenant = EventFields {
        organization_id: Some(Uuid::nil()),
        ..v2
    };
    let nil_digest = hash::stub_parts(&nil_tenant).1;
    assert!(
        nil_digest != digest && nil_digest != hash::stub_parts(&other_tenant).1,
        "absent, the nil UUID and another tenant give three digests"
    );
    assert_eq!(
        hash::stub_parts(&other_content).0,
        tag,
        "the tag has no content"
    );
    assert_ne!(hash::stub_parts(&other_content).1, digest);
}

fn unambiguous_in(version: HashVersion) {
    let h = |e: &EventFields<'_>| event_hash(&GENESIS, e);
    let base = EventFields {
        hash_version: version,
        ..sample()
    };

    // Adjacent string fields: the length prefixes keep the boundary.
    let pairs: [(EventFields<'_>, EventFields<'_>); 6] = [
        (
            EventFields {
                aggregate_type: "ab",
                aggregate_id: "c",
                ..base
            },
            EventFields {
                aggregate_type: "a",
                aggregate_id: "bc",
                ..base
            },
        ),
        (
            EventFields {
                aggregate_type: "abc",
                aggregate_id: "",
                ..base
            },
            EventFields {
                aggregate_type: "",
                aggregate_id: "abc",
                ..base
            },
        ),
        (
            EventFields {
                event_type: "RoleUpdated1",
                event_version: "",
                ..base
            },
            EventFields {
                event_type: "RoleUpdated",
                event_version: "1",
                ..base
            },
        ),
        (
            EventFields {
                payload: r#"{"a":1}{"#,
                metadata: "}",
                ..base
            },
            EventFields {
                payload: r#"{"a":1}"#,
                metadata: "{}",
                ..base
            },
        ),
        (
            EventFields {
                payload: "",
                metadata: "{}",
                ..base
            },
            EventFields {
                payload: "{}",
                metadata: "",
                ..base
            },
        ),
        // A string's bytes cannot pose as the following fixed-width field.
        (
            EventFields {
                aggregate_id: "x\0\0\0\0\0\0\0\x02",
                sequence: 3,
                ..base
            },
            EventFields {
                aggregate_id: "x",
                sequence: 2,
                ..base
            },
        ),
    ];
    for (a, b) in &pairs {
        assert_ne!(h(a), h(b), "{a:?}\n{b:?}");
    }
    // Without the length prefixes these pairs would have been one byte string.
    assert_eq!(["ab", "c"].concat(), ["a", "bc"].concat());

    // The tenant: absent, the nil UUID and another UUID are three different inputs.
    let none = EventFields {
        organization_id: None,
        ..base
    };
    let nil = EventFields {
        organization_id: Some(Uuid::nil()),
        ..base
    };
    let other = EventFields {
        organization_id: Some(Uuid::from_u128(1)),
        ..base
    };
    assert_ne!(h(&none), h(&nil));
    assert_ne!(h(&nil), h(&other));
    assert_ne!(h(&none), h(&other));

    // Every field is covered: change any one and the hash changes.
    let later = base.recorded_at + chrono::Duration::microseconds(1);
    let variants = [
        EventFields {
            position: 8,
            ..base
        },
        EventFields {
            aggregate_type: "Rolf",
            ..base
        },
        EventFields {
            aggregate_id: "59656f97-644d-57a4-818b-33b54646d1dc",
            ..base
        },
        EventFields {
            sequence: 3,
            ..base
        },
        EventFields {
            event_type: "RoleDeleted",
            ..base
        },
        EventFields {
            event_version: "2",
            ..base
        },
        EventFields {
            organization_id: Some(Uuid::from_u128(2)),
            ..base
        },
        EventFields {
            recorded_at: later,
            ..base
        },
        EventFields {
            payload: r#"{"RoleUpdated":{"name":"suppOrt"}}"#,
            ..base
        },
        EventFields {
            payload: r#"{"RoleUpdated": {"name":"support"}}"#,
            ..base
        },
        EventFields {
            metadata: r#"{"actor_kind":"cli"}"#,
            ..base
        },
    ];
    let mut seen = std::collections::HashSet::from([h(&base)]);
    for v in &variants {
        assert!(seen.insert(h(v)), "{v:?}");
    }
    let mut prev = GENESIS;
    prev[31] = 1;
    assert_ne!(event_hash(&prev, &base), h(&base), "prev_hash is covered");
}

/// Whether python3 with the `blake3` package is here to run the page's Python snippets.
/// Missing, they are skipped, unless `LEDGERLINE_REQUIRE_PYTHON_BLAKE3` is set (CI sets it
/// after installing the package), so that a skip can never pass for a check there.
fn python_blake3() -> bool {
    let available = std::process::Command::new("python3")
        .args(["-c", "import blake3"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            std::env::var_os("LEDGERLINE_REQUIRE_PYTHON_BLAKE3").is_none(),
            "python3 with the blake3 package is required (pip install blake3)"
        );
        eprintln!("skipped: python3 with the blake3 package is not installed");
    }
    available
}

/// The page's Python reference code prints vector 1's hash (v1), then vector 5's (v2)
/// (skipped where python3 or its `blake3` package is missing; `pip install blake3`).
#[test]
fn the_python_reference_computes_vectors_1_and_5() {
    let blocks = fenced_blocks(&doc());
    let python: Vec<&Block> = blocks.iter().filter(|b| b.info == "python").collect();
    assert_eq!(python.len(), 1, "one Python block in the page");
    let code = python[0].lines.join("\n");
    let expected = [vector(1), vector(5)].map(|v| hex::encode(v.hash));
    for (n, h) in [1, 5].iter().zip(&expected) {
        assert!(
            code.contains(h.as_str()),
            "the snippet states vector {n}'s hash"
        );
    }
    if !python_blake3() {
        return;
    }
    let out = std::process::Command::new("python3")
        .args(["-c", &code])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected);
}

// ---------------------------------------------------------------------------------------
// The page's SQL, against a real database.

type AuditorRow = (
    i64,
    i16,
    String,
    String,
    i64,
    String,
    String,
    Option<String>,
    i64,
    String,
    String,
    Vec<u8>,
    Vec<u8>,
);

fn auditor_queries() -> Vec<String> {
    let q: Vec<String> = fenced_blocks(&doc())
        .into_iter()
        .filter(|b| {
            b.info == "sql"
                && b.lines
                    .first()
                    .is_some_and(|l| l.starts_with("-- auditor query"))
        })
        .map(|b| b.lines.join("\n"))
        .collect();
    assert!(
        q.len() >= 2,
        "the page gives the auditor's query (two forms)"
    );
    q
}

/// An independent verifier: reads with `sql` (under `time_zone`) and follows only the page
/// (section 4, with the encoder written from sections 3 and 3b). Returns the number of events,
/// how many of them are v1, and the head hash.
async fn verify_as_auditor(pool: &PgPool, sql: &str, time_zone: &str) -> (i64, i64, [u8; 32]) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("SET LOCAL TimeZone = '{time_zone}'"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let rows: Vec<AuditorRow> = sqlx::query_as(sql).fetch_all(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    let mut prev = GENESIS;
    let mut seen_v2 = false;
    let mut v1 = 0;
    for (i, row) in rows.iter().enumerate() {
        let (
            position,
            hash_version,
            aggregate_type,
            aggregate_id,
            sequence,
            event_type,
            event_version,
            org,
            micros,
            payload,
            metadata,
            prev_hash,
            hash,
        ) = row;
        assert_eq!(*position, i as i64 + 1, "positions 1..N without gaps");
        let hash_version = match hash_version {
            1 => HashVersion::V1,
            2 => HashVersion::V2,
            n => panic!("position {position}: hash_version {n}"),
        };
        assert!(
            !(seen_v2 && hash_version == HashVersion::V1),
            "position {position}: v1 after v2"
        );
        seen_v2 |= hash_version == HashVersion::V2;
        v1 += i64::from(hash_version == HashVersion::V1);
        let stored_prev: [u8; 32] = prev_hash.as_slice().try_into().unwrap();
        let fields = EventFields {
            hash_version,
            position: *position,
            aggregate_type,
            aggregate_id,
            sequence: *sequence,
            event_type,
            event_version,
            organization_id: org.as_deref().map(|s| s.parse().unwrap()),
            recorded_at: DateTime::from_timestamp_micros(*micros).unwrap(),
            payload,
            metadata,
        };
        let recomputed = page_hash(&stored_prev, &fields);
        assert_eq!(
            hex::encode(recomputed),
            hex::encode(hash),
            "position {position} under {time_zone} with:\n{sql}\n{fields:?}"
        );
        assert_eq!(stored_prev, prev, "position {position}: link");
        prev = recomputed;
    }
    (rows.len() as i64, v1, prev)
}

#[tokio::test]
async fn the_auditor_queries_reproduce_a_real_chain() {
    let t = TestApp::spawn().await;
    let r = t
        .post(
            "/v1/organizations",
            &t.admin_key,
            json!({"name": "Zoë's Bäckerei", "slug": "zoes-baeckerei", "country_code": "DE"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let org: Uuid = r.body["id"].as_str().unwrap().parse().unwrap();
    t.member_with_key(org, "auditor", "zoe@example.com").await;
    t.invite(org, "bjorn@example.com", "Bjørn Ødegård").await;

    let report = t.verify().await;
    assert!(report.intact(), "{:?}", report.first_bad);
    for sql in auditor_queries() {
        for tz in ["UTC", "Pacific/Chatham", "Asia/Kolkata"] {
            let (events, v1, head) = verify_as_auditor(t.pool(), &sql, tz).await;
            assert_eq!(events as u64, report.events);
            // A log created after migration 0010 holds no v1 event (section 1).
            assert_eq!(v1, 0, "the writer writes v2");
            assert_eq!(head, report.head_hash);
        }
    }
    // The non-ASCII name is in a hashed payload as UTF-8, not as an escape.
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM events WHERE payload::text LIKE '%Zoë''s Bäckerei%'")
            .fetch_one(t.pool())
            .await
            .unwrap();
    assert_eq!(n, 1);
}

/// Rows the application never writes but the format allows: times before 1970 and far in the
/// future, JSON with spaces and escapes kept verbatim, non-ASCII text in every text column. The
/// first half are v1, as rows written before migration 0010 are (inserted with its trigger
/// switched off, as only the table's owner can), and the rest v2.
#[tokio::test]
async fn the_auditor_queries_read_edge_cases_exactly() {
    let db = TestDb::new().await;
    let tenant = Uuid::new_v4();
    let cases: [(i64, &str, &str); 8] = [
        (-1, "{}", "{}"),
        (
            -500_000,
            r#"{ "spaced" : [ 1 , 2 ] }"#,
            r#"{"note":"\u00e9 \"q\" \\ \t"}"#,
        ),
        (0, r#"{"name":"Zoë 🦀"}"#, r#"{"name":"Zo\u00eb"}"#),
        (-2_208_988_800_000_001, r#"{"year":1899}"#, "{}"),
        (-100_000_000_000_000_000, "[]", "{}"),
        (
            1_767_268_800_123_456,
            r#"{"n":1.50,"big":12345678901234567890}"#,
            "{}",
        ),
        (253_402_300_799_999_999, r#"{"year":9999}"#, "{}"),
        (1, "\"just a string\"", "null"),
    ];
    const V1_ROWS: usize = 4;
    let trigger = |on: bool| {
        format!(
            "ALTER TABLE events {} TRIGGER events_hash_version_2",
            if on { "ENABLE" } else { "DISABLE" }
        )
    };
    sqlx::query(&trigger(false))
        .execute(&db.pool)
        .await
        .unwrap();
    let mut prev = GENESIS;
    for (i, (micros, payload, metadata)) in cases.iter().enumerate() {
        if i == V1_ROWS {
            sqlx::query(&trigger(true)).execute(&db.pool).await.unwrap();
        }
        let position = i as i64 + 1;
        let aggregate_id = format!("ünïcode-{i}");
        let hash_version = if i < V1_ROWS {
            HashVersion::V1
        } else {
            HashVersion::V2
        };
        let e = EventFields {
            hash_version,
            position,
            aggregate_type: "Édition",
            aggregate_id: &aggregate_id,
            sequence: i as i64,
            event_type: "Tested",
            event_version: "1",
            organization_id: (i % 2 == 0).then_some(tenant),
            recorded_at: DateTime::from_timestamp_micros(*micros).unwrap(),
            payload,
            metadata,
        };
        let hash = event_hash(&prev, &e);
        sqlx::query(
            "INSERT INTO events (position, aggregate_type, aggregate_id, sequence, event_type, event_version,
                                 organization_id, recorded_at, payload, metadata, prev_hash, hash,
                                 hash_version)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::json, $10::text::json, $11, $12, $13)",
        )
        .bind(position)
        .bind(e.aggregate_type)
        .bind(e.aggregate_id)
        .bind(e.sequence)
        .bind(e.event_type)
        .bind(e.event_version)
        .bind(e.organization_id)
        .bind(e.recorded_at)
        .bind(e.payload)
        .bind(e.metadata)
        .bind(prev.to_vec())
        .bind(hash.to_vec())
        .bind(hash_version.number())
        .execute(&db.pool)
        .await
        .unwrap();
        prev = hash;
    }
    let report = verify_database(&db.pool, 2).await.unwrap();
    assert!(report.intact(), "{:?}", report.first_bad);
    for sql in auditor_queries() {
        for tz in [
            "UTC",
            "Europe/Amsterdam",
            "America/St_Johns",
            "Pacific/Chatham",
        ] {
            let (events, v1, head) = verify_as_auditor(&db.pool, &sql, tz).await;
            assert_eq!(events, cases.len() as i64);
            assert_eq!(v1, V1_ROWS as i64);
            assert_eq!(head, prev);
        }
    }
    // Section 1: with the trigger on, a row in v1, or one that leaves the column to its
    // default (as an older ledgerline's writer does), is refused.
    for (column, value) in [(", hash_version", ", 1"), ("", "")] {
        let err = sqlx::query(&format!(
            "INSERT INTO events (position, aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, organization_id, recorded_at, payload, metadata,
                                 prev_hash, hash{column})
             VALUES (9, 'T', 'old-writer', 0, 'Tested', '1', NULL, now(), '{{}}', '{{}}',
                     $1, $1{value})"
        ))
        .bind(prev.to_vec())
        .execute(&db.pool)
        .await
        .expect_err("the trigger refuses a v1 row");
        assert!(
            err.to_string().contains("format v2 since migration 0010"),
            "{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Section 10: the example export file, against the exporter and the offline verifier.

mod export_example {
    use super::*;
    use ledgerline::ledger::checkpoint::{Checkpoint, LogSigner};
    use ledgerline::ledger::export::{
        write_event_line, write_stub_line, write_stub_v2_line, ExportHeader, VERSION,
    };
    use ledgerline::ledger::merkle::{event_leaf, root, Blake3};
    use ledgerline::ledger::offline::{verify_reader, FileFaultKind, OfflineReport};
    use ledgerline::ledger::verify::Fault;

    /// The first `text` block of section 10, as lines.
    fn example() -> Vec<String> {
        let text = doc();
        let section = &text[text.find("## 10. Export files").expect("section 10")..];
        let block = fenced_blocks(section)
            .into_iter()
            .find(|b| b.info == "text")
            .expect("the example in section 10");
        block.lines
    }

    fn check(lines: &[String], checkpoint: Option<(&str, &LogSigner)>) -> OfflineReport {
        let file = lines.join("\n") + "\n";
        let verifier = checkpoint.map(|(note, signer)| (note, signer.verifier()));
        verify_reader(
            file.as_bytes(),
            verifier.as_ref().map(|(note, v)| (*note, v)),
            2,
        )
        .unwrap()
    }

    /// The lines the exporter writes for positions 2–5 of the chain of vectors 1, 2, 3, 5, 6,
    /// exported for the tenant of vectors 2 and 5 (vector 3 shown as a stub, as the page says).
    fn written() -> Vec<String> {
        let v = vectors();
        let (v1, v2, v3, v5, v6) = (&v[0], &v[1], &v[2], &v[4], &v[5]);
        let header = ExportHeader {
            format: "ledgerline-export".into(),
            version: VERSION,
            origin: "ledgerline".into(),
            organization_id: v2.organization_id,
            from: 2,
            to: 5,
            prev_hash: v1.hash,
            frontier: vec![event_leaf(&v1.hash)],
            exported_at: "2026-01-02T09:00:00Z".parse().unwrap(),
        };
        let mut out = Vec::new();
        header.write_line(&mut out);
        write_event_line(&mut out, &v2.fields(), &v2.prev_hash, &v2.hash);
        write_stub_line(&mut out, v3.position, &v3.hash);
        write_event_line(&mut out, &v5.fields(), &v5.prev_hash, &v5.hash);
        let (tag, digest) = hash::stub_parts(&v6.fields());
        write_stub_v2_line(
            &mut out,
            v6.position,
            &v6.prev_hash,
            &tag,
            &digest,
            &v6.hash,
        );
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_example_is_what_the_exporter_writes() {
        assert_eq!(VERSION, 2, "the page's example is of version 2");
        let page = example();
        let ours = written();
        assert_eq!(page.len(), ours.len());
        for (i, (p, o)) in page.iter().zip(&ours).enumerate() {
            assert_eq!(p, o, "line {}", i + 1);
        }
    }

    #[test]
    fn the_example_verifies_as_the_page_says() {
        let lines = example();
        let r = check(&lines, None);
        assert!(r.intact(), "{r}");
        assert_eq!(
            (r.lines, r.full_events, r.stubs, r.v1_stubs),
            (4, 2, 2, 1),
            "{r}"
        );
        assert_eq!((r.head_position, r.head_hash), (5, vector(6).hash));
        // What the intact report says of the stubs (section 10).
        let said = r.to_string();
        for phrase in [
            // Tags are authenticated only under a checkpoint that covers them.
            "intact: 4 events (2 full, 2 stubs) read in ",
            "1 position is a stub whose tenant tag says it is not this organization's event \
             (shown only against a checkpoint that covers it)",
            "1 position is a stub of a v1 event, another organization's by the exporter's \
             word: the file cannot show it is not this one's",
        ] {
            assert!(said.contains(phrase), "{said}");
        }

        // Against checkpoints at sizes 3 (section 9's `merkle: events` root) and 5.
        let signer = LogSigner::generate("ledgerline").unwrap();
        let chain: Vec<[u8; 32]> = [1, 2, 3, 5, 6].map(|n| vector(n).hash).to_vec();
        let leaves: Vec<[u8; 32]> = chain.iter().map(event_leaf).collect();
        assert_eq!(
            hex::encode(root::<Blake3>(&leaves[..3])),
            "a4a462393e691cf4fb02f1cd7041abe98945282fd0ab15c135a185d503951acf"
        );
        for size in [3u64, 5] {
            let note = signer.sign(&Checkpoint {
                origin: "ledgerline".into(),
                tree_size: size,
                root: root::<Blake3>(&leaves[..size as usize]),
                chain_head: chain[size as usize - 1],
                time: DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap(),
                // Vector 5, at position 4, is the chain's first v2 event.
                hash_v2_from: (size >= 4).then_some(4),
            });
            let r = check(&lines, Some((&note, &signer)));
            assert!(r.matches_checkpoint(), "size {size}: {r}");
            assert_eq!(r.unsigned_from(), (size < 5).then_some(4));
            assert_eq!(
                r.to_string().contains(
                    "1 position is a stub whose tenant tag shows it is not this organization's \
                     event"
                ),
                size == 5,
                "shown only when the checkpoint covers the whole file: {r}"
            );
        }

        // A version 1 header reads with the same grammar.
        let mut v1_file = lines.clone();
        v1_file[0] = v1_file[0].replace("\"version\":2", "\"version\":1");
        assert!(check(&v1_file, None).intact());
        let mut v3_file = lines.clone();
        v3_file[0] = v3_file[0].replace("\"version\":2", "\"version\":3");
        assert!(matches!(
            check(&v3_file, None).first_bad.map(|f| f.kind),
            Some(FileFaultKind::MalformedHeader(_))
        ));
    }

    /// The faults section 10 names for v2 stubs and for v1 after v2.
    #[test]
    fn the_v2_rules_of_the_example() {
        let lines = example();
        let fault_at = |lines: &[String]| {
            let bad = check(lines, None).first_bad.expect("a fault");
            (bad.position, bad.kind)
        };

        // Vector 5, the organization's own event, hidden as a v2 stub.
        let v5 = vector(5);
        let (tag, digest) = hash::stub_parts(&v5.fields());
        let mut stub = Vec::new();
        write_stub_v2_line(&mut stub, 4, &v5.prev_hash, &tag, &digest, &v5.hash);
        let mut hidden = lines.clone();
        hidden[3] = String::from_utf8(stub).unwrap().trim_end().to_string();
        assert_eq!(fault_at(&hidden), (Some(4), FileFaultKind::OwnEventAsStub));

        // Vector 6 as a v1 stub, after the v2 event at position 4.
        let mut v1_stub = lines.clone();
        v1_stub[4] = format!(
            "{{\"position\":5,\"hash\":\"{}\"}}",
            hex::encode(vector(6).hash)
        );
        assert_eq!(
            fault_at(&v1_stub),
            (Some(5), FileFaultKind::Chain(Fault::V1AfterV2))
        );

        // A v2 stub's tag or link edited.
        let v6 = vector(6);
        let mut other_tag = lines.clone();
        other_tag[4] = other_tag[4].replace(
            &hex::encode(v6.v2.as_ref().unwrap().tenant_tag),
            &hex::encode([7u8; 32]),
        );
        assert_eq!(
            fault_at(&other_tag),
            (Some(5), FileFaultKind::Chain(Fault::ContentChanged))
        );
        // The stub's own prev_hash is not the line before's hash; its hash, recomputed from
        // that prev_hash, is the stub's (an exporter that forged it would have to).
        let forged_prev = [9u8; 32];
        let forged_hash = hash::chain_v2(
            &forged_prev,
            &v6.v2.as_ref().unwrap().tenant_tag,
            &v6.v2.as_ref().unwrap().content_digest,
        );
        let mut unlinked = lines.clone();
        unlinked[4] = unlinked[4]
            .replace(&hex::encode(v6.prev_hash), &hex::encode(forged_prev))
            .replace(&hex::encode(v6.hash), &hex::encode(forged_hash));
        assert_eq!(
            fault_at(&unlinked),
            (Some(5), FileFaultKind::Chain(Fault::LinkBroken))
        );
    }
}

// ---------------------------------------------------------------------------------------
// Section 9: the Merkle tree's vectors, parsed out of the page, against src/ledger/merkle.rs.

mod merkle_tree {
    use super::*;
    use ledgerline::ledger::merkle::{
        consistency_proof, event_leaf, inclusion_proof, root, verify_consistency, verify_inclusion,
        Blake3, Digest, Frontier, TreeHash,
    };

    /// The `merkle: <kind>` blocks, each as its `name: value` lines.
    fn merkle_blocks() -> BTreeMap<String, BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for b in fenced_blocks(&doc()) {
            let Some(kind) = b.lines.first().and_then(|l| l.strip_prefix("merkle: ")) else {
                continue;
            };
            let mut m = BTreeMap::new();
            for line in &b.lines[1..] {
                let (k, v) = line
                    .split_once(':')
                    .unwrap_or_else(|| panic!("not `name: value`: {line}"));
                let v = v.strip_prefix(' ').unwrap_or(v);
                assert!(
                    m.insert(k.to_string(), v.to_string()).is_none(),
                    "`{k}` twice in merkle: {kind}"
                );
            }
            assert!(
                out.insert(kind.trim().to_string(), m).is_none(),
                "two `merkle: {kind}` blocks"
            );
        }
        out
    }

    fn get<'a>(m: &'a BTreeMap<String, String>, k: &str) -> &'a str {
        m.get(k).unwrap_or_else(|| panic!("no `{k}`"))
    }

    /// `name[0]`, `name[1]`, … in order, until the first missing index.
    fn list(m: &BTreeMap<String, String>, name: &str) -> Vec<String> {
        (0..)
            .map_while(|i| m.get(&format!("{name}[{i}]")).cloned())
            .collect()
    }

    fn digests(m: &BTreeMap<String, String>, name: &str) -> Vec<Digest> {
        list(m, name).iter().map(|s| hash32(s)).collect()
    }

    /// The reference leaves' hashes, as computed from the page's leaf inputs.
    fn reference_leaves(roots: &BTreeMap<String, String>) -> Vec<Digest> {
        list(roots, "leaf_input")
            .iter()
            .map(|s| Blake3::leaf(&hex::decode(s).unwrap()))
            .collect()
    }

    #[test]
    fn the_page_has_the_merkle_vectors() {
        let blocks = merkle_blocks();
        assert_eq!(
            blocks.keys().collect::<Vec<_>>(),
            ["consistency", "events", "inclusion", "roots"]
        );
        let roots = &blocks["roots"];
        assert_eq!(list(roots, "leaf_input").len(), 8);
        assert_eq!(list(roots, "leaf_hash").len(), 8);
        assert_eq!(list(roots, "root").len(), 9, "roots of sizes 0..=8");
        assert_eq!(roots.len(), 8 + 8 + 9, "no stray lines in `merkle: roots`");
    }

    #[test]
    fn the_roots_vectors_match_the_code() {
        let blocks = merkle_blocks();
        let roots = &blocks["roots"];
        let leaves = reference_leaves(roots);
        assert_eq!(leaves, digests(roots, "leaf_hash"));
        let want = digests(roots, "root");
        assert_eq!(want[0], *blake3::hash(b"").as_bytes(), "the empty tree");
        let mut f = Frontier::<Blake3>::new();
        for (n, r) in want.iter().enumerate() {
            assert_eq!(
                hex::encode(root::<Blake3>(&leaves[..n])),
                hex::encode(r),
                "root[{n}]"
            );
            assert_eq!(f.root(), *r, "the frontier's root[{n}]");
            if n < leaves.len() {
                f.push(leaves[n]);
            }
        }
    }

    #[test]
    fn the_proof_vectors_match_the_code() {
        let blocks = merkle_blocks();
        let leaves = reference_leaves(&blocks["roots"]);
        let roots = digests(&blocks["roots"], "root");

        let inc = &blocks["inclusion"];
        let size: u64 = get(inc, "tree_size").parse().unwrap();
        let index: u64 = get(inc, "leaf_index").parse().unwrap();
        let leaf = hash32(get(inc, "leaf_hash"));
        let r = hash32(get(inc, "root"));
        let proof = digests(inc, "proof");
        assert_eq!(inc.len(), 4 + proof.len(), "no stray lines");
        assert_eq!(leaf, leaves[index as usize]);
        assert_eq!(r, roots[size as usize]);
        assert_eq!(
            inclusion_proof::<Blake3>(&leaves[..size as usize], index),
            Some(proof.clone())
        );
        assert_eq!(
            verify_inclusion::<Blake3>(index, size, &leaf, &proof, &r),
            Ok(())
        );

        let con = &blocks["consistency"];
        let old: u64 = get(con, "old_size").parse().unwrap();
        let new: u64 = get(con, "new_size").parse().unwrap();
        let old_root = hash32(get(con, "old_root"));
        let new_root = hash32(get(con, "new_root"));
        let proof = digests(con, "proof");
        assert_eq!(con.len(), 4 + proof.len(), "no stray lines");
        assert_eq!(old_root, roots[old as usize]);
        assert_eq!(new_root, roots[new as usize]);
        assert_eq!(
            consistency_proof::<Blake3>(&leaves[..new as usize], old),
            Some(proof.clone())
        );
        assert_eq!(
            verify_consistency::<Blake3>(old, new, &old_root, &new_root, &proof),
            Ok(())
        );
    }

    #[test]
    fn the_events_vector_is_the_tree_over_vectors_1_to_3() {
        let blocks = merkle_blocks();
        let ev = &blocks["events"];
        let hashes = digests(ev, "event_hash");
        let chain: Vec<Digest> = vectors().iter().take(3).map(|v| v.hash).collect();
        assert_eq!(hashes, chain, "the event hashes are vectors 1–3's");
        let leaves: Vec<Digest> = hashes.iter().map(event_leaf).collect();
        assert_eq!(leaves, digests(ev, "leaf_hash"));
        // A leaf hash is BLAKE3(0x00 || event hash), as the page says.
        let mut input = vec![0u8];
        input.extend_from_slice(&hashes[0]);
        assert_eq!(leaves[0], *blake3::hash(&input).as_bytes());
        assert_eq!(root::<Blake3>(&leaves), hash32(get(ev, "root")));
        assert_eq!(ev.len(), 3 + 3 + 1, "no stray lines");
    }

    /// The section's Python snippet prints `root[3]` (skipped where python3 or its `blake3`
    /// package is missing; `pip install blake3`).
    #[test]
    fn the_python_merkle_snippet_computes_root_3() {
        let blocks = fenced_blocks(&doc());
        let python: Vec<&Block> = blocks
            .iter()
            .filter(|b| b.info == "python merkle")
            .collect();
        assert_eq!(python.len(), 1, "one `python merkle` block in the page");
        let code = python[0].lines.join("\n");
        let expected = merkle_blocks()["roots"]["root[3]"].clone();
        assert!(code.contains(&expected), "the snippet states root[3]");
        if !super::python_blake3() {
            return;
        }
        let out = std::process::Command::new("python3")
            .args(["-c", &code])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    }
}
