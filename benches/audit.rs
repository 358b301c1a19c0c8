//! Audit benchmark: offline verification of an export file (`ledger::offline::verify_file`)
//! against the goal of 1,000,000 events/s using both cores. No database: the bench writes an
//! export of synthesized, typical events with correctly chained hashes, then verifies it.
//! A plain binary (`harness = false`): `cargo bench --bench audit`. See docs/benchmarks.md.
//!
//! Environment:
//! - `LEDGERLINE_BENCH_AUDIT_EVENTS`: events in the export (default 1000000).
//! - `LEDGERLINE_BENCH_AUDIT_WORKERS`: comma-separated worker counts (default `1,2`).
//! - `LEDGERLINE_BENCH_AUDIT_RUNS`: timed runs per configuration; the best is reported with
//!   the others (default 3).
//! - `LEDGERLINE_BENCH_AUDIT_DIR`: where the export is written (default the temp directory);
//!   it is deleted at the end.
//!
//! A report that is not intact, or that does not cover every event, makes the run exit
//! non-zero.

use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use base64::Engine as _;
use chrono::{DateTime, SubsecRound, Utc};
use ledgerline::ledger::checkpoint::{Checkpoint, LogSigner};
use ledgerline::ledger::export::{write_event_line, ExportHeader, FORMAT, VERSION};
use ledgerline::ledger::hash::{
    content_digest, event_hash, truncate_to_micros, EventFields, HashVersion, RawFields, GENESIS,
};
use ledgerline::ledger::merkle::{Blake3, Frontier, TreeHash};
use ledgerline::ledger::offline::{verify_file, OfflineReport};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use uuid::Uuid;

const GOAL_EVENTS_PER_S: f64 = 1_000_000.0;
const ORIGIN: &str = "bench.ledgerline/log";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

/// The export file; deleted on drop (also on failure or panic).
struct TempExport(PathBuf);

impl Drop for TempExport {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whole-machine CPU time from /proc/stat: (busy, total) jiffies.
fn cpu_now() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Some((total - idle, total))
}

fn busy_share(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> String {
    match (a, b) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            format!("{:.0}%", 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64)
        }
        _ => "n/a".into(),
    }
}

const WORDS: [&str; 16] = [
    "laptop", "rack", "switch", "north", "spare", "leased", "primary", "backup", "floor", "london",
    "berlin", "audit", "finance", "ops", "edge", "cold",
];

/// Typical events of the app: the four aggregate types, creations and follow-ups, personal
/// data sealed, app-style metadata, one commit time per group of 1 to 64 events.
struct Gen {
    rng: StdRng,
    tenants: Vec<Uuid>,
    position: i64,
    prev: [u8; 32],
    recorded_at: DateTime<Utc>,
    left_in_commit: u32,
    hashed_bytes: u64,
    json_bytes: u64,
}

impl Gen {
    fn word(&mut self) -> &'static str {
        WORDS[self.rng.gen_range(0..WORDS.len())]
    }

    fn sealed(&mut self, len: usize) -> String {
        let bytes: Vec<u8> = (0..len).map(|_| self.rng.gen()).collect();
        format!(
            "sealed:v1:{}:{}",
            Uuid::from_u128(self.rng.gen()),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    fn hex(&mut self, n: usize) -> String {
        let bytes: Vec<u8> = (0..n).map(|_| self.rng.gen()).collect();
        hex::encode(bytes)
    }

    /// (aggregate type, event type, payload) of the next event.
    fn payload(&mut self, org: Option<Uuid>, id: Uuid) -> (&'static str, &'static str, String) {
        let v = match self.rng.gen_range(0..10) {
            0..=2 => (
                "User",
                "UserInvited",
                json!({"UserInvited": {"user_id": id, "organization_id": org, "email": self.sealed(32),
                       "full_name": self.sealed(16), "email_blind_index": self.hex(32)}}),
            ),
            3 | 4 => (
                "User",
                "UserRoleAssigned",
                json!({"UserRoleAssigned": {"role_id": Uuid::from_u128(self.rng.gen()), "expires_at": null,
                       "reason": format!("{} {} access", self.word(), self.word())}}),
            ),
            5 | 6 => (
                "ApiKey",
                "ApiKeyIssued",
                json!({"ApiKeyIssued": {"key_id": id, "organization_id": org, "user_id": null,
                       "label": format!("{} key", self.word()), "permissions": ["users:read", "audit:read"],
                       "expires_at": null, "prefix": format!("ll_{}", self.hex(6)), "secret_hash": self.hex(32),
                       "bootstrap": false}}),
            ),
            7 => (
                "ApiKey",
                "ApiKeyRevoked",
                json!({"ApiKeyRevoked": {"reason": "rotated out by the owner"}}),
            ),
            8 => (
                "Role",
                "RoleCreated",
                json!({"RoleCreated": {"role_id": id, "organization_id": org, "built_in": false,
                       "spec": {"name": format!("{} {}", self.word(), self.rng.gen_range(0..1000)),
                                "permissions": ["users:read"], "parent_role_id": null}}}),
            ),
            _ => (
                "Organization",
                "OrganizationUpdated",
                json!({"OrganizationUpdated": {"before": {"name": format!("{} GmbH", self.word())},
                       "after": {"name": format!("{} AG", self.word()), "country_code": "DE"}}}),
            ),
        };
        (v.0, v.1, v.2.to_string())
    }

    fn metadata(&mut self, org: Option<Uuid>) -> String {
        json!({
            "actor_key_id": Uuid::from_u128(self.rng.gen()),
            "actor_kind": "api_key",
            "client_ip": format!("10.{}.{}.{}", self.rng.gen_range(0..256), self.rng.gen_range(0..256), self.rng.gen_range(1..255)),
            "organization_id": org,
            "request_id": Uuid::from_u128(self.rng.gen()),
        })
        .to_string()
    }

    /// Appends the next event's export line to `out`; returns its hash.
    fn next_line(&mut self, out: &mut Vec<u8>) -> [u8; 32] {
        if self.left_in_commit == 0 {
            self.left_in_commit = self.rng.gen_range(1..=64);
            self.recorded_at += chrono::Duration::microseconds(self.rng.gen_range(200..3000));
        }
        self.left_in_commit -= 1;
        let org = if self.rng.gen_bool(0.02) {
            None
        } else {
            Some(self.tenants[self.rng.gen_range(0..self.tenants.len())])
        };
        let id = Uuid::from_u128(self.rng.gen()).to_string();
        let (aggregate_type, event_type, payload) =
            self.payload(org, Uuid::parse_str(&id).unwrap());
        let metadata = self.metadata(org);
        self.position += 1;
        let fields = EventFields {
            hash_version: HashVersion::CURRENT,
            position: self.position,
            aggregate_type,
            aggregate_id: &id,
            sequence: self.rng.gen_range(1..20),
            event_type,
            event_version: "1",
            organization_id: org,
            recorded_at: self.recorded_at,
            payload: &payload,
            metadata: &metadata,
        };
        let hash = event_hash(&self.prev, &fields);
        write_event_line(out, &fields, &self.prev, &hash);
        let org_bytes = org.map(|o| *o.as_bytes());
        let mut input = Vec::new();
        content_digest(
            &mut input,
            &RawFields {
                hash_version: fields.hash_version,
                position: fields.position,
                aggregate_type: aggregate_type.as_bytes(),
                aggregate_id: id.as_bytes(),
                sequence: fields.sequence,
                event_type: event_type.as_bytes(),
                event_version: b"1",
                organization_id: org_bytes.as_ref(),
                recorded_at_micros: fields.recorded_at.timestamp_micros(),
                payload: payload.as_bytes(),
                metadata: metadata.as_bytes(),
            },
        );
        // v2 hashes the content's input, then the tenant tag's and the event's.
        let tag_input = 8 + 20 + 8 + if org.is_some() { 17 } else { 1 };
        let event_input = ledgerline::ledger::hash::V2_INPUT_LEN;
        self.hashed_bytes += (input.len() + tag_input + event_input) as u64;
        self.json_bytes += (payload.len() + metadata.len()) as u64;
        self.prev = hash;
        hash
    }
}

/// Writes an export of `n` events from position 1; returns the checkpoint note of its head,
/// and the average bytes per event of hash input and of payload and metadata.
fn write_export(path: &PathBuf, n: u64, signer: &LogSigner) -> anyhow::Result<(String, f64, f64)> {
    let mut gen = Gen {
        rng: StdRng::seed_from_u64(0xa0d17),
        tenants: (0..500u128)
            .map(|i| Uuid::from_u128(0x7e4a_0000 + i))
            .collect(),
        position: 0,
        prev: GENESIS,
        recorded_at: truncate_to_micros(Utc::now()),
        left_in_commit: 0,
        hashed_bytes: 0,
        json_bytes: 0,
    };
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(1 << 20);
    ExportHeader {
        format: FORMAT.into(),
        version: VERSION,
        origin: ORIGIN.into(),
        organization_id: None,
        from: 1,
        to: n as i64,
        prev_hash: GENESIS,
        frontier: Vec::new(),
        exported_at: Utc::now(),
    }
    .write_line(&mut buf);
    let mut frontier = Frontier::<Blake3>::new();
    for _ in 0..n {
        let hash = gen.next_line(&mut buf);
        frontier.push(Blake3::leaf(&hash));
        if buf.len() > 1 << 20 {
            w.write_all(&buf)?;
            buf.clear();
        }
    }
    w.write_all(&buf)?;
    w.flush()?;
    let note = signer.sign(&Checkpoint {
        origin: ORIGIN.into(),
        tree_size: n,
        root: frontier.root(),
        chain_head: gen.prev,
        time: Utc::now().trunc_subsecs(0),
        // Every generated event is in the current format.
        hash_v2_from: (n > 0).then_some(1),
    });
    Ok((
        note,
        gen.hashed_bytes as f64 / n as f64,
        gen.json_bytes as f64 / n as f64,
    ))
}

/// Reads the file once in 32 MiB blocks, discarding it: what reading alone costs.
fn read_only(path: &PathBuf) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 32 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(started.elapsed())
}

fn main() -> anyhow::Result<()> {
    let n = env_num("LEDGERLINE_BENCH_AUDIT_EVENTS", 1_000_000).max(1);
    let workers = env_list("LEDGERLINE_BENCH_AUDIT_WORKERS", &[1, 2]);
    let runs = env_num("LEDGERLINE_BENCH_AUDIT_RUNS", 3).max(1);
    let dir = std::env::var("LEDGERLINE_BENCH_AUDIT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let path = TempExport(dir.join(format!("ll_bench_export_{}.jsonl", Uuid::new_v4().simple())));
    let signer = LogSigner::generate(ORIGIN)?;
    let key = signer.verifier();

    let started = Instant::now();
    let (note, hashed, json) = write_export(&path.0, n, &signer)?;
    let size = std::fs::metadata(&path.0)?.len();
    println!(
        "export: {n} events, {:.1} MB ({:.0} bytes per line; per event {json:.0} bytes of \
         payload and metadata, {hashed:.0} bytes of hash input) written in {:.1}s to {}",
        size as f64 / 1e6,
        size as f64 / n as f64,
        started.elapsed().as_secs_f64(),
        path.0.display()
    );
    // Warm the page cache, and measure what reading alone costs.
    read_only(&path.0)?;
    let read = read_only(&path.0)?;
    println!(
        "reading the file alone (page cache): {:.3}s, {:.0} MB/s",
        read.as_secs_f64(),
        size as f64 / 1e6 / read.as_secs_f64()
    );
    println!();
    println!("| workers | checkpoint | events | seconds (best) | events/s (best) | all runs, events/s | CPU busy (best) | goal 1M/s |");
    println!("|--:|---|--:|--:|--:|---|--:|---|");
    for with_checkpoint in [false, true] {
        for &w in &workers {
            let mut results: Vec<(OfflineReport, String)> = Vec::new();
            for _ in 0..runs {
                let cp = with_checkpoint.then_some((note.as_str(), &key));
                let before = cpu_now();
                let report = verify_file(&path.0, cp, w)?;
                let cpu = busy_share(before, cpu_now());
                if !report.intact() || report.lines != n || report.head_position != n as i64 {
                    bail!("verification failed: {report}");
                }
                ensure!(
                    !with_checkpoint || report.matches_checkpoint(),
                    "the checkpoint did not match: {report}"
                );
                results.push((report, cpu));
            }
            let all: Vec<String> = results
                .iter()
                .map(|(r, _)| format!("{:.0}", r.rate()))
                .collect();
            let (best, cpu) = results
                .iter()
                .max_by(|a, b| a.0.rate().total_cmp(&b.0.rate()))
                .expect("at least one run");
            let met = best.rate() >= GOAL_EVENTS_PER_S;
            println!(
                "| {w} | {} | {} | {:.3} | {:.0} | {} | {cpu} | {} |",
                if with_checkpoint { "yes" } else { "no" },
                best.lines,
                best.elapsed.as_secs_f64(),
                best.rate(),
                all.join(", "),
                if met { "met" } else { "not met" }
            );
        }
    }
    Ok(())
}
