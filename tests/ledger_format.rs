//! docs/ledger-format.md against the code: the test vectors parsed out of the page must be
//! what `event_hash` computes, their hex encodings must be the hash inputs, an encoder written
//! from the page alone must agree with `event_hash`, and the page's SQL must read a real
//! database into exactly the values that were hashed.

mod common;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use common::{TestApp, TestDb};
use ledgerline::ledger::hash::{event_hash, EventFields, GENESIS};
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

/// One test vector as written in the page.
#[derive(Debug, Clone)]
struct Vector {
    n: u32,
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
}

impl Vector {
    fn fields(&self) -> EventFields<'_> {
        EventFields {
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
        assert!(VECTOR_KEYS.contains(&k), "unknown field `{k}` in a vector");
        assert!(m.insert(k, v).is_none(), "field `{k}` twice in a vector");
    }
    for k in VECTOR_KEYS {
        assert!(
            m.contains_key(k),
            "vector {:?} lacks `{k}`",
            m.get("vector")
        );
    }
    let micros: i64 = m["recorded_at_micros"].parse().unwrap();
    let recorded_at = DateTime::from_timestamp_micros(micros).unwrap();
    let readable: DateTime<Utc> = m["recorded_at"].parse().expect("recorded_at is RFC 3339");
    assert_eq!(
        readable, recorded_at,
        "recorded_at and recorded_at_micros agree"
    );
    Vector {
        n: m["vector"].parse().unwrap(),
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

/// `encoding: n` blocks: hex, with `#` comments and whitespace ignored.
fn encodings() -> BTreeMap<u32, Vec<u8>> {
    let mut out = BTreeMap::new();
    for b in fenced_blocks(&doc()) {
        let Some(n) = b.lines.first().and_then(|l| l.strip_prefix("encoding: ")) else {
            continue;
        };
        let n: u32 = n.trim().parse().unwrap();
        let hex_text: String = b.lines[1..]
            .iter()
            .map(|l| l.split('#').next().unwrap())
            .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
            .collect();
        let bytes = hex::decode(&hex_text).unwrap_or_else(|e| panic!("encoding {n}: {e}"));
        assert!(out.insert(n, bytes).is_none(), "encoding {n} twice");
    }
    out
}

/// The v1 encoding, written from the table in docs/ledger-format.md section 3 and nothing else.
fn encode_v1(prev_hash: &[u8; 32], e: &EventFields<'_>) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_be_bytes());
        out.extend_from_slice(s);
    }
    let mut out = Vec::new();
    string(&mut out, b"ledgerline.event.v1");
    out.extend_from_slice(prev_hash);
    out.extend_from_slice(&u64::try_from(e.position).unwrap().to_be_bytes());
    string(&mut out, e.aggregate_type.as_bytes());
    string(&mut out, e.aggregate_id.as_bytes());
    out.extend_from_slice(&u64::try_from(e.sequence).unwrap().to_be_bytes());
    string(&mut out, e.event_type.as_bytes());
    string(&mut out, e.event_version.as_bytes());
    match e.organization_id {
        None => out.push(0x00),
        Some(org) => {
            out.push(0x01);
            // RFC 4122 order: the 32 hex digits of the canonical text form, in order.
            out.extend_from_slice(&hex::decode(org.to_string().replace('-', "")).unwrap());
        }
    }
    out.extend_from_slice(&e.recorded_at.timestamp_micros().to_be_bytes());
    string(&mut out, e.payload.as_bytes());
    string(&mut out, e.metadata.as_bytes());
    out
}

#[test]
fn the_page_has_at_least_three_vectors_each_with_its_encoding() {
    let v = vectors();
    assert!(v.len() >= 3, "at least three vectors, found {}", v.len());
    let enc = encodings();
    for vector in &v {
        assert!(
            enc.contains_key(&vector.n),
            "vector {} has no `encoding: {}` block",
            vector.n,
            vector.n
        );
    }
    assert_eq!(
        enc.len(),
        v.len(),
        "an encoding block for every vector and no other"
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

#[test]
fn encodings_are_the_hash_inputs() {
    let enc = encodings();
    for v in vectors() {
        let bytes = &enc[&v.n];
        assert_eq!(bytes.len(), v.input_length, "vector {}: input_length", v.n);
        assert_eq!(
            blake3::hash(bytes).as_bytes(),
            &v.hash,
            "vector {}: BLAKE3 of the encoding",
            v.n
        );
        assert_eq!(
            hex::encode(encode_v1(&v.prev_hash, &v.fields())),
            hex::encode(bytes),
            "vector {}: the encoder written from the page",
            v.n
        );
        // The page's length formula: 132 bytes (no tenant) or 148 (tenant) plus the strings.
        let strings = [
            &v.aggregate_type,
            &v.aggregate_id,
            &v.event_type,
            &v.event_version,
            &v.payload,
            &v.metadata,
        ];
        let fixed = if v.organization_id.is_some() {
            148
        } else {
            132
        };
        assert_eq!(
            bytes.len(),
            fixed + strings.iter().map(|s| s.len()).sum::<usize>(),
            "vector {}",
            v.n
        );
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
    let mut prev = GENESIS;
    for (i, &t) in times.iter().enumerate() {
        for (j, &org) in orgs.iter().enumerate() {
            for p in payloads {
                let e = EventFields {
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
                assert_eq!(blake3::hash(&encode_v1(&prev, &e)).as_bytes(), &h, "{e:?}");
                prev = h;
            }
        }
    }
    let big = EventFields {
        position: i64::MAX,
        sequence: i64::MAX,
        ..sample()
    };
    assert_eq!(
        blake3::hash(&encode_v1(&GENESIS, &big)).as_bytes(),
        &event_hash(&GENESIS, &big)
    );
}

fn sample() -> EventFields<'static> {
    EventFields {
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
/// change the hash: otherwise a forger could rewrite an event's meaning under the same hash.
#[test]
fn the_encoding_is_unambiguous() {
    let h = |e: &EventFields<'_>| event_hash(&GENESIS, e);
    let base = sample();

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

/// The page's Python reference code prints vector 1's hash (skipped where python3 or its
/// `blake3` package is missing; `pip install blake3`).
#[test]
fn the_python_reference_computes_vector_1() {
    let blocks = fenced_blocks(&doc());
    let python: Vec<&Block> = blocks.iter().filter(|b| b.info == "python").collect();
    assert_eq!(python.len(), 1, "one Python block in the page");
    let code = python[0].lines.join("\n");
    let expected = hex::encode(vectors()[0].hash);
    assert!(
        code.contains(&expected),
        "the snippet states vector 1's hash"
    );
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
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
}

// ---------------------------------------------------------------------------------------
// The page's SQL, against a real database.

type AuditorRow = (
    i64,
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

/// An independent verifier: reads with `sql` (under `time_zone`) and follows only the page.
/// Returns the number of events and the head hash.
async fn verify_as_auditor(pool: &PgPool, sql: &str, time_zone: &str) -> (i64, [u8; 32]) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("SET LOCAL TimeZone = '{time_zone}'"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let rows: Vec<AuditorRow> = sqlx::query_as(sql).fetch_all(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    let mut prev = GENESIS;
    for (i, row) in rows.iter().enumerate() {
        let (
            position,
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
        let stored_prev: [u8; 32] = prev_hash.as_slice().try_into().unwrap();
        let fields = EventFields {
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
        let recomputed: [u8; 32] = *blake3::hash(&encode_v1(&stored_prev, &fields)).as_bytes();
        assert_eq!(
            hex::encode(recomputed),
            hex::encode(hash),
            "position {position} under {time_zone} with:\n{sql}\n{fields:?}"
        );
        assert_eq!(stored_prev, prev, "position {position}: link");
        prev = recomputed;
    }
    (rows.len() as i64, prev)
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
            let (events, head) = verify_as_auditor(t.pool(), &sql, tz).await;
            assert_eq!(events as u64, report.events);
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
/// future, JSON with spaces and escapes kept verbatim, non-ASCII text in every text column.
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
    let mut prev = GENESIS;
    for (i, (micros, payload, metadata)) in cases.iter().enumerate() {
        let position = i as i64 + 1;
        let aggregate_id = format!("ünïcode-{i}");
        let e = EventFields {
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
                                 organization_id, recorded_at, payload, metadata, prev_hash, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::json, $10::text::json, $11, $12)",
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
            let (events, head) = verify_as_auditor(&db.pool, &sql, tz).await;
            assert_eq!(events, cases.len() as i64);
            assert_eq!(head, prev);
        }
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
