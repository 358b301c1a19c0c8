//! Export files and their offline verification (docs/ledger-format.md, "Export files"):
//! what an auditor gets from `ledgerline export` or the API, and what `verify --file` finds
//! in it, untouched, edited, cut short, or against a signed checkpoint.

mod common;

use std::path::{Path, PathBuf};

use chrono::{SubsecRound, Utc};
use common::TestApp;
use ledgerline::ledger::checkpoint::{Checkpoint, LogSigner, NoteError};
use ledgerline::ledger::export::{export, write_stub_v2_line, ExportScope, ExportSummary};
use ledgerline::ledger::hash::{stub_parts, EventFields};
use ledgerline::ledger::merkle::{self, Blake3, Digest, Frontier, TreeHash};
use ledgerline::ledger::offline::{verify_file, FileFaultKind, OfflineReport};
use ledgerline::ledger::tree;
use ledgerline::ledger::verify::Fault;
use serde_json::{json, Value};
use uuid::Uuid;

/// A file in the temp directory, deleted on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new() -> Self {
        Self(std::env::temp_dir().join(format!("ll_export_{}.jsonl", Uuid::new_v4().simple())))
    }
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.0)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
    /// Another file holding `lines`.
    fn with_lines(lines: &[String]) -> Self {
        let f = Self::new();
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&f.0, text).unwrap();
        f
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Log {
    acme: Uuid,
    globex: Uuid,
}

/// Two organizations whose events interleave: created, users invited (one with a non-ASCII
/// name), a profile update, keys issued.
async fn build_log(t: &TestApp) -> Log {
    let acme = t.create_org("Acme").await;
    let globex = t.create_org("Globex").await;
    t.invite(acme, "ada@example.com", "Ada Lovelace").await;
    t.invite(globex, "hidden@globex.example", "Gloria Geheim")
        .await;
    t.invite(acme, "zoe@example.com", "Zoë Ångström").await;
    let r = t
        .patch(
            &format!("/v1/organizations/{globex}"),
            &t.admin_key,
            json!({"name": "Globex Secret Projects", "country_code": "DE"}),
        )
        .await;
    assert_eq!(r.status, 200, "update: {}", r.body);
    t.invite(acme, "grace@example.com", "Grace Hopper").await;
    let report = t.verify().await;
    assert!(
        report.intact(),
        "the fresh log verifies: {:?}",
        report.first_bad
    );
    assert!(t.head().await >= 15, "a log of some length");
    Log { acme, globex }
}

async fn export_file(t: &TestApp, scope: ExportScope) -> (TempFile, ExportSummary) {
    let f = TempFile::new();
    let file = tokio::fs::File::create(&f.0).await.unwrap();
    let summary = export(
        t.pool(),
        scope,
        t.app.origin(),
        tokio::io::BufWriter::new(file),
    )
    .await
    .unwrap();
    (f, summary)
}

fn verify(path: &Path) -> OfflineReport {
    verify_file(path, None, 2).expect("the verifier runs")
}

fn first_bad(path: &Path) -> (Option<i64>, FileFaultKind) {
    let bad = verify(path).first_bad.expect("a fault is found");
    (bad.position, bad.kind)
}

fn scope(organization: Option<Uuid>, from: i64, to: Option<i64>) -> ExportScope {
    ExportScope {
        organization,
        from,
        to,
    }
}

fn is_stub(line: &str) -> bool {
    let v: Value = serde_json::from_str(line).unwrap();
    !v.as_object().unwrap().contains_key("aggregate_type")
}

fn position_of(line: &str) -> i64 {
    let v: Value = serde_json::from_str(line).unwrap();
    v["position"].as_i64().unwrap()
}

/// Every event's stored hash, by position.
async fn hashes(t: &TestApp) -> Vec<Digest> {
    let rows: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT hash FROM events ORDER BY position")
        .fetch_all(t.pool())
        .await
        .unwrap();
    rows.into_iter().map(|(h,)| h.try_into().unwrap()).collect()
}

/// A checkpoint of the log's first `size` events, signed by `signer`, with the real root.
fn checkpoint(signer: &LogSigner, hashes: &[Digest], size: usize) -> String {
    let leaves: Vec<Digest> = hashes[..size].iter().map(|h| Blake3::leaf(h)).collect();
    signer.sign(&Checkpoint {
        origin: signer.name().into(),
        tree_size: size as u64,
        root: merkle::root::<Blake3>(&leaves),
        chain_head: hashes[size - 1],
        time: Utc::now().trunc_subsecs(0),
        // These tests' logs are written by today's writer: v2 throughout.
        hash_v2_from: Some(1),
    })
}

#[tokio::test]
async fn an_untouched_log_exports_and_verifies_offline() {
    let t = TestApp::spawn().await;
    build_log(&t).await;
    let head = t.head().await;
    let (f, summary) = export_file(&t, ExportScope::default()).await;
    assert_eq!(
        (summary.from, summary.to, summary.full_events, summary.stubs),
        (1, head, head as u64, 0)
    );
    let report = verify(&f.0);
    assert!(report.intact(), "{report}");
    assert_eq!(
        (report.lines, report.full_events),
        (head as u64, head as u64)
    );
    let db = t.verify().await;
    assert_eq!(
        (report.head_position, report.head_hash),
        (db.head_position, db.head_hash)
    );
    let header: Value = serde_json::from_str(&f.lines()[0]).unwrap();
    assert_eq!(header["format"], "ledgerline-export");
    assert_eq!(header["version"], 2);
    assert_eq!(header["organization_id"], Value::Null);
    assert_eq!(header["prev_hash"], "0".repeat(64));
}

#[tokio::test]
async fn an_organizations_export_reveals_no_other_tenant_and_still_verifies() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let head = t.head().await;
    let (f, summary) = export_file(&t, scope(Some(log.acme), 1, None)).await;
    let text = std::fs::read_to_string(&f.0).unwrap();
    let lines = f.lines();
    assert_eq!(lines.len() as i64, head + 1);
    let (acme_events,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM events WHERE organization_id = $1")
            .bind(log.acme)
            .fetch_one(t.pool())
            .await
            .unwrap();
    assert_eq!(summary.full_events as i64, acme_events);
    assert_eq!(summary.stubs as i64, head - acme_events);
    for line in &lines[1..] {
        let v: Value = serde_json::from_str(line).unwrap();
        if !is_stub(line) {
            assert_eq!(v["organization_id"], json!(log.acme), "{line}");
        }
    }
    let others: Vec<(String, String)> = sqlx::query_as(
        "SELECT payload::text, metadata::text FROM events WHERE organization_id IS DISTINCT FROM $1",
    )
    .bind(log.acme)
    .fetch_all(t.pool())
    .await
    .unwrap();
    assert!(others.len() > 5);
    for (payload, metadata) in others {
        assert!(
            !text.contains(&payload),
            "another tenant's payload: {payload}"
        );
        assert!(
            !text.contains(&metadata),
            "another tenant's metadata: {metadata}"
        );
    }
    for secret in ["Globex", "Secret Projects", &log.globex.to_string()] {
        assert!(!text.contains(secret), "{secret} appears in Acme's export");
    }

    let report = verify(&f.0);
    assert!(report.intact(), "{report}");
    assert_eq!(report.head_hash, t.verify().await.head_hash);
}

#[tokio::test]
async fn edits_of_an_export_are_found_at_their_position() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let (f, _) = export_file(&t, scope(Some(log.acme), 1, None)).await;
    let lines = f.lines();

    // Another tenant's stub with another content digest: it no longer hashes to its hash.
    let i = (1..lines.len() - 1)
        .find(|&i| is_stub(&lines[i]) && !is_stub(&lines[i + 1]))
        .expect("a stub before a full event");
    let stub: Value = serde_json::from_str(&lines[i]).unwrap();
    let digest = stub["content_digest"].as_str().unwrap();
    let mut edited = lines.clone();
    edited[i] = lines[i].replacen(digest, &"ab".repeat(32), 1);
    assert_eq!(
        first_bad(&TempFile::with_lines(&edited).0),
        (
            Some(position_of(&lines[i])),
            FileFaultKind::Chain(Fault::ContentChanged)
        )
    );
    // With its hash changed to match, the next full event no longer links to it.
    let forged = ledgerline::ledger::hash::chain_v2(
        &hex::decode(stub["prev_hash"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap(),
        &hex::decode(stub["tenant_tag"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap(),
        &[0xab; 32],
    );
    edited[i] = edited[i].replacen(stub["hash"].as_str().unwrap(), &hex::encode(forged), 1);
    assert_eq!(
        first_bad(&TempFile::with_lines(&edited).0),
        (
            Some(position_of(&lines[i + 1])),
            FileFaultKind::Chain(Fault::LinkBroken)
        )
    );

    // One byte of a full event's payload.
    let i = (1..lines.len())
        .rev()
        .find(|&i| lines[i].contains("\"payload\":{\""))
        .expect("a full event with a raw payload");
    let at = lines[i].find("\"payload\":{\"").unwrap() + "\"payload\":{\"".len();
    let mut bytes = lines[i].clone().into_bytes();
    bytes[at] = bytes[at].to_ascii_lowercase();
    assert_ne!(bytes, lines[i].as_bytes(), "a byte changed");
    let mut edited = lines.clone();
    edited[i] = String::from_utf8(bytes).unwrap();
    assert_eq!(
        first_bad(&TempFile::with_lines(&edited).0),
        (
            Some(position_of(&lines[i])),
            FileFaultKind::Chain(Fault::ContentChanged)
        )
    );

    // A line deleted.
    let mut deleted = lines.clone();
    let gone = deleted.remove(7);
    assert_eq!(
        first_bad(&TempFile::with_lines(&deleted).0),
        (
            Some(position_of(&gone)),
            FileFaultKind::Chain(Fault::Missing)
        )
    );
}

/// An exporter that leaves one of the organization's own events out, showing it as a stub:
/// the v2 stub's tenant tag gives it away, though its hash and links are the real ones; a
/// stub of the v1 kind (its hash alone, which showed nothing of whose it was) is refused.
#[tokio::test]
async fn an_export_that_hides_one_of_the_organizations_events_as_a_stub_is_refused() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let (f, _) = export_file(&t, scope(Some(log.acme), 1, None)).await;
    let lines = f.lines();
    let report = verify(&f.0);
    assert!(
        report.intact() && report.stubs > 0 && report.v1_stubs == 0,
        "{report}"
    );
    assert!(
        report
            .to_string()
            .contains("tenant tags say they are not this organization's"),
        "{report}"
    );
    // Acme's last invitation, say: an event an operator might want an auditor not to see.
    let i = (1..lines.len())
        .rev()
        .find(|&i| !is_stub(&lines[i]))
        .unwrap();
    let position = position_of(&lines[i]);
    let event = common::event_at(t.pool(), position).await;
    assert_eq!(event.organization_id, Some(log.acme));
    let fields = EventFields::of(&event);
    let (tag, digest) = stub_parts(&fields);
    let mut stub = Vec::new();
    write_stub_v2_line(
        &mut stub,
        position,
        &event.prev_hash.clone().try_into().unwrap(),
        &tag,
        &digest,
        &event.hash.clone().try_into().unwrap(),
    );
    let mut hidden = lines.clone();
    hidden[i] = String::from_utf8(stub).unwrap().trim_end().to_string();
    assert_eq!(
        first_bad(&TempFile::with_lines(&hidden).0),
        (Some(position), FileFaultKind::OwnEventAsStub)
    );
    // ... under a header naming another organization, whose tag the stub's is not: Acme's
    // events still in full give the file away, the first of them at its position.
    let other = Uuid::new_v4();
    hidden[0] = hidden[0].replacen(&log.acme.to_string(), &other.to_string(), 1);
    assert_ne!(hidden[0], lines[0]);
    let first = (1..lines.len()).find(|&i| !is_stub(&lines[i])).unwrap();
    assert_eq!(
        first_bad(&TempFile::with_lines(&hidden).0),
        (
            Some(position_of(&lines[first])),
            FileFaultKind::OtherTenantInFull {
                tenant: Some(log.acme),
                organization: other
            }
        )
    );
    // The intact report says whose export it vouches for, and of which positions.
    let head = t.head().await;
    assert!(
        report.to_string().contains(&format!(
            "; covers positions 1 to {head} for organization {}: its events in full, every \
             other position a stub; ",
            log.acme
        )),
        "{report}"
    );
    let mut hidden = lines.clone();
    hidden[i] = format!(
        "{{\"position\":{position},\"hash\":\"{}\"}}",
        hex::encode(&event.hash)
    );
    assert_eq!(
        first_bad(&TempFile::with_lines(&hidden).0),
        (Some(position), FileFaultKind::Chain(Fault::V1AfterV2))
    );
    // A hash-only stub with no v2 line before it (the file starting there) is what a log
    // written before v2 would show; only a checkpoint, which signs where v2 begins, tells.
    let (f, _) = export_file(&t, scope(Some(log.acme), position, None)).await;
    let mut late = f.lines();
    late[1] = hidden[i].clone();
    let late = TempFile::with_lines(&late);
    let report = verify(&late.0);
    assert!(report.intact() && report.v1_stubs == 1, "{report}");
    // The checkpoint the server's maintainer signs, which says where v2 began.
    tree::catch_up(t.pool(), Some(&t.signer), common::POLICY, true)
        .await
        .unwrap();
    let note: String =
        sqlx::query_scalar("SELECT note FROM checkpoints ORDER BY tree_size DESC LIMIT 1")
            .fetch_one(t.pool())
            .await
            .unwrap();
    assert!(note.contains("\nhash-v2-from 1\n"), "{note}");
    let report = verify_file(&late.0, Some((&note, &t.signer.verifier())), 2).unwrap();
    assert_eq!(
        report.first_bad.map(|f| (f.position, f.kind)),
        Some((
            Some(position),
            FileFaultKind::HashVersionNotAsSigned {
                v2_from: Some(1),
                tree_size: t.head().await as u64
            }
        ))
    );
}

#[tokio::test]
async fn an_export_of_a_later_range_verifies_with_its_frontier_against_a_checkpoint() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let head = t.head().await;
    let hashes = hashes(&t).await;
    let signer = LogSigner::generate(t.app.origin()).unwrap();
    let key = signer.verifier();
    let from = 7;
    for org in [None, Some(log.globex)] {
        let (f, summary) = export_file(&t, scope(org, from, None)).await;
        assert_eq!((summary.from, summary.to), (from, head));
        let header: Value = serde_json::from_str(&f.lines()[0]).unwrap();
        assert_eq!(header["prev_hash"], hex::encode(hashes[from as usize - 2]));
        assert_eq!(
            header["frontier"].as_array().unwrap().len(),
            (from - 1).count_ones() as usize
        );
        assert!(verify(&f.0).intact());
        for size in [
            from as usize - 1,
            from as usize,
            head as usize - 3,
            head as usize,
        ] {
            let note = checkpoint(&signer, &hashes, size);
            let report = verify_file(&f.0, Some((&note, &key)), 2).unwrap();
            assert!(report.matches_checkpoint(), "size {size}: {report}");
            // What lies past the checkpoint is said to be unsigned, and only that.
            let past = (size < head as usize).then(|| size as i64 + 1);
            assert_eq!(report.unsigned_from(), past, "size {size}");
            assert_eq!(
                report.to_string().contains("no signature vouches for them"),
                past.is_some(),
                "size {size}: {report}"
            );
            let leaves: Vec<Digest> = hashes[..size].iter().map(|h| Blake3::leaf(h)).collect();
            assert_eq!(report.root, Some(merkle::root::<Blake3>(&leaves)));
        }
    }
}

/// An export's header takes the frontier from the stored Merkle tree (one node per peak, not
/// a read of every event before the range) and pushes only the events past the tree: the same
/// header either way. A damaged stored tree is reported, not passed over.
#[tokio::test]
async fn the_header_comes_from_the_stored_tree_and_the_events_past_it() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    tree::integrate_batch(t.pool()).await.unwrap();
    let integrated = t.head().await;
    // The app's maintainer integrates new events within a fraction of a second; holding
    // the tree's state row keeps it from integrating the next ones until the end.
    let mut hold = t.pool().begin().await.unwrap();
    sqlx::query("SELECT size FROM merkle_state FOR UPDATE")
        .execute(&mut *hold)
        .await
        .unwrap();
    t.invite(log.acme, "edsger@example.com", "Edsger Dijkstra")
        .await;
    t.invite(log.globex, "barbara@example.com", "Barbara Liskov")
        .await;
    let head = t.head().await;
    assert!(head > integrated + 1, "events past the tree");
    let hashes = hashes(&t).await;
    for from in 1..=head + 1 {
        let (f, _) = export_file(&t, scope(None, from, None)).await;
        let header: Value = serde_json::from_str(&f.lines()[0]).unwrap();
        let mut expected = Frontier::<Blake3>::new();
        for h in &hashes[..from as usize - 1] {
            expected.push(Blake3::leaf(h));
        }
        let peaks: Vec<Value> = expected
            .peaks()
            .iter()
            .map(|p| json!(hex::encode(p)))
            .collect();
        assert_eq!(header["frontier"], json!(peaks), "from {from}");
        let prev = match from {
            1 => "0".repeat(64),
            _ => hex::encode(hashes[from as usize - 2]),
        };
        assert_eq!(header["prev_hash"], json!(prev), "from {from}");
        assert!(verify(&f.0).intact(), "from {from}");
    }
    assert_eq!(
        tree::integrated_size(t.pool()).await.unwrap(),
        integrated as u64,
        "the exports past position {integrated} read the events after the tree"
    );
    hold.rollback().await.unwrap();
    // The 5 events before position 6 are a stored node of 4 leaves and a leaf.
    common::tamper(t.pool(), &["DELETE FROM merkle_nodes".to_string()]).await;
    let out = TempFile::new();
    let file = tokio::fs::File::create(&out.0).await.unwrap();
    let err = export(t.pool(), scope(None, 6, None), t.app.origin(), file)
        .await
        .expect_err("the tree's nodes are gone");
    assert!(
        err.to_string().contains("Merkle tree"),
        "names the stored tree: {err}"
    );
}

#[tokio::test]
async fn forged_checkpoints_and_truncated_exports_are_refused() {
    let t = TestApp::spawn().await;
    build_log(&t).await;
    let head = t.head().await as usize;
    let hashes = hashes(&t).await;
    let signer = LogSigner::generate(t.app.origin()).unwrap();
    let key = signer.verifier();
    let (f, _) = export_file(&t, ExportScope::default()).await;

    // Signed by another key of the same name.
    let impostor = LogSigner::generate(t.app.origin()).unwrap();
    let forged = checkpoint(&impostor, &hashes, head);
    let bad = verify_file(&f.0, Some((&forged, &key)), 2)
        .unwrap()
        .first_bad
        .unwrap();
    assert!(
        matches!(
            &bad.kind,
            FileFaultKind::Checkpoint(NoteError::OtherKey { name, .. }) if name == t.app.origin()
        ),
        "{}",
        bad.kind
    );
    // A genuine note with its size changed.
    let note = checkpoint(&signer, &hashes, head);
    let altered = note.replacen(&format!("\n{head}\n"), &format!("\n{}\n", head - 1), 1);
    let bad = verify_file(&f.0, Some((&altered, &key)), 2)
        .unwrap()
        .first_bad
        .unwrap();
    assert_eq!(
        bad.kind,
        FileFaultKind::Checkpoint(NoteError::BadSignature(t.app.origin().into()))
    );
    assert!(verify_file(&f.0, Some((&note, &key)), 2)
        .unwrap()
        .matches_checkpoint());

    // An export that stops before the checkpoint's size: intact on its own, truncated
    // against the checkpoint.
    let cut = head as i64 - 4;
    let (short, _) = export_file(&t, scope(None, 1, Some(cut))).await;
    assert!(verify(&short.0).intact());
    let bad = verify_file(&short.0, Some((&note, &key)), 2)
        .unwrap()
        .first_bad
        .unwrap();
    // The verifier cannot tell a cut from a range asked for (the header is the exporter's
    // word): it says both.
    let said = bad.kind.to_string();
    assert!(
        said.contains("events it signed are not in the file") && said.contains("`export --to`"),
        "{said}"
    );
    assert_eq!(
        (bad.position, bad.kind),
        (
            Some(cut + 1),
            FileFaultKind::Truncated {
                tree_size: head as u64
            }
        )
    );
    // The same cut made by deleting the last lines and rewriting the header's `to`.
    let mut lines = f.lines();
    lines.truncate(cut as usize + 1);
    lines[0] = lines[0].replacen(&format!("\"to\":{head}"), &format!("\"to\":{cut}"), 1);
    let edited = TempFile::with_lines(&lines);
    assert!(verify(&edited.0).intact());
    let bad = verify_file(&edited.0, Some((&note, &key)), 2)
        .unwrap()
        .first_bad
        .unwrap();
    assert_eq!(bad.position, Some(cut + 1));
}

#[tokio::test]
async fn tampering_in_the_database_shows_in_the_export() {
    let t = TestApp::spawn().await;
    build_log(&t).await;
    let k = 9;
    common::tamper(
        t.pool(),
        &[format!(
            "UPDATE events SET metadata = (metadata::text || ' ')::json WHERE position = {k}"
        )],
    )
    .await;
    let db = t
        .verify()
        .await
        .first_bad
        .expect("the database verifier sees it");
    let (f, _) = export_file(&t, ExportScope::default()).await;
    assert_eq!(
        first_bad(&f.0),
        (Some(db.position), FileFaultKind::Chain(db.fault))
    );
    assert_eq!(db.position, k);
}

#[tokio::test]
async fn the_api_serves_the_organizations_export() {
    let t = TestApp::spawn().await;
    let log = build_log(&t).await;
    let (_, acme_key) = t
        .member_with_key(log.acme, "auditor", "audit@acme.example")
        .await;
    let (_, globex_key) = t
        .member_with_key(log.globex, "auditor", "audit@globex.example")
        .await;
    let head = t.head().await;
    let url = format!("{}/v1/organizations/{}/ledger/export", t.base, log.acme);

    let res = t
        .client
        .get(format!("{url}?from=3&to={head}"))
        .bearer_auth(&acme_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let body = res.text().await.unwrap();
    let served: Vec<&str> = body.lines().collect();
    let (f, _) = export_file(&t, scope(Some(log.acme), 3, Some(head))).await;
    let library = f.lines();
    assert_eq!(served.len(), library.len());
    assert_eq!(&served[1..], &library[1..], "the same event and stub lines");
    let mut a: Value = serde_json::from_str(served[0]).unwrap();
    let mut b: Value = serde_json::from_str(&library[0]).unwrap();
    a["exported_at"] = Value::Null;
    b["exported_at"] = Value::Null;
    assert_eq!(a, b, "the same header but for the time");
    let served_file = TempFile::new();
    std::fs::write(&served_file.0, &body).unwrap();
    assert!(verify(&served_file.0).intact());

    // Another organization's key: not found, as for every resource of another tenant.
    let r = t
        .get(
            &format!("/v1/organizations/{}/ledger/export", log.acme),
            &globex_key,
        )
        .await;
    common::assert_error(&r, 404);
    // A range beyond the head, or before position 1.
    for query in [format!("?to={}", head + 1), "?from=0".to_string()] {
        let r = t
            .get(
                &format!("/v1/organizations/{}/ledger/export{query}", log.acme),
                &acme_key,
            )
            .await;
        common::assert_error(&r, 400);
    }
}
