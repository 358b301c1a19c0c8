//! Signed checkpoints and Merkle proofs against a real PostgreSQL: what the server serves
//! verifies with nothing but its public key, and the attacks a hash chain alone cannot see
//! (a history rewritten with every later hash recomputed, the newest events cut off, two
//! histories signed at one size, a forged signature) are caught with the right verdict.

mod common;

use std::path::PathBuf;

use common::{
    event_at, hash_of, ledgerline, ledgerline_offline, rewrite_json_from, superuser_tx, tamper,
    TestApp, POLICY,
};
use ledgerline::ledger::checkpoint::{Checkpoint, LogSigner, NoteVerifier};
use ledgerline::ledger::merkle::{self, Blake3, Digest, TreeHash};
use ledgerline::ledger::tree;
use ledgerline::ledger::verify::Fault;
use serde_json::{json, Value};
use uuid::Uuid;

/// Integrates everything and signs a checkpoint of it now; returns the signed note.
async fn sign_now(t: &TestApp) -> String {
    tree::catch_up(t.pool(), Some(&t.signer), POLICY, true)
        .await
        .expect("integrate and sign");
    let (note,): (String,) =
        sqlx::query_as("SELECT note FROM checkpoints ORDER BY tree_size DESC LIMIT 1")
            .fetch_one(t.pool())
            .await
            .unwrap();
    note
}

fn file(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("ll-{}.txt", Uuid::new_v4().simple()));
    std::fs::write(&path, text).unwrap();
    path
}

/// Exports the whole log as it is now and verifies the file offline (no database) against
/// `checkpoint`: the auditor's second, independent check. The export is made without the
/// log's name, as an operator without the server's settings would: it takes the name its
/// checkpoints are signed under (here `ledgerline.test/log`, not the default).
async fn export_and_verify(t: &TestApp, checkpoint: &std::path::Path) -> (i32, String) {
    let out = std::env::temp_dir().join(format!("ll-export-{}.jsonl", Uuid::new_v4().simple()));
    let out_s = out.to_str().unwrap();
    let (code, summary, err) = ledgerline(&t.db.url, &["export", "--out", out_s]).await;
    assert_eq!(code, 0, "export: {summary}{err}");
    let (code, report, err) = ledgerline_offline(&[
        "verify",
        "--file",
        out_s,
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--public-key",
        &key(t),
    ])
    .await;
    std::fs::remove_file(&out).ok();
    (code, format!("{report}{err}"))
}

fn key(t: &TestApp) -> String {
    t.signer.verifier().to_string()
}

/// `ledgerline verify --since` each of `checkpoints`, with the log's key.
async fn verify_since(t: &TestApp, checkpoints: &[&PathBuf]) -> (i32, String, String) {
    let mut args = vec!["verify".to_string()];
    for cp in checkpoints {
        args.extend(["--since".to_string(), cp.to_str().unwrap().to_string()]);
    }
    args.extend(["--public-key".to_string(), key(t)]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ledgerline(&t.db.url, &args).await
}

/// A log with a few organizations, users and roles.
async fn some_history(t: &TestApp) {
    for name in ["Alpha", "Beta"] {
        let org = t.create_org(name).await;
        for i in 0..3 {
            t.invite(org, &format!("p{i}@{}.example", name.to_lowercase()), "P")
                .await;
        }
    }
}

/// The Merkle root over the log's hashes recomputed from content, independently of the
/// server's tree.
async fn independent_root(t: &TestApp, size: i64) -> Digest {
    let mut prev = ledgerline::ledger::hash::GENESIS.to_vec();
    let mut leaves = Vec::new();
    for p in 1..=size {
        let e = event_at(t.pool(), p).await;
        let h = hash_of(&prev, &e);
        leaves.push(Blake3::leaf(&h));
        prev = h;
    }
    merkle::root::<Blake3>(&leaves)
}

/// Edits the payload of event `k` and recomputes every later link and hash, as a superuser
/// who read docs/ledger-format.md would: the chain alone still verifies.
fn beta_edited(text: &str) -> String {
    text.replace("Beta", "Bet4")
}

async fn rewrite_from(t: &TestApp, k: i64) {
    rewrite_json_from(t, k, "payload", beta_edited, &[]).await;
}

/// Edits the metadata of event `k` (as the walkthrough's hostile DBA did) and recomputes every
/// later link and hash.
async fn rewrite_metadata_from(t: &TestApp, k: i64) {
    rewrite_json_from(
        t,
        k,
        "metadata",
        |text| text.replacen('{', "{\"edited\": true, ", 1),
        &[],
    )
    .await;
}

/// The position of the event that created organization "Beta".
async fn beta_position(t: &TestApp) -> i64 {
    let (p,): (i64,) = sqlx::query_as(
        "SELECT position FROM events WHERE event_type = 'OrganizationCreated' \
         AND payload::text LIKE '%Beta%'",
    )
    .fetch_one(t.pool())
    .await
    .unwrap();
    p
}

#[tokio::test]
async fn checkpoints_are_signed_served_and_open_with_the_served_key() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let note = sign_now(&t).await;
    let head = t.head().await;

    let served = t.get("/v1/ledger/public-key", &t.admin_key).await;
    assert_eq!(served.status, 200, "{}", served.body);
    let verifier = NoteVerifier::parse(served.body["key"].as_str().unwrap()).unwrap();
    let latest = t.get("/v1/ledger/checkpoints/latest", &t.admin_key).await;
    assert_eq!(latest.status, 200, "{}", latest.body);
    assert_eq!(latest.body["note"], json!(note));
    let cp = verifier.open(&note).expect("the served key opens the note");
    assert_eq!(cp.origin, "ledgerline.test/log");
    assert_eq!(cp.tree_size, head as u64);
    assert_eq!(cp.chain_head.to_vec(), event_at(t.pool(), head).await.hash);
    assert_eq!(
        cp.root,
        independent_root(&t, head).await,
        "the signed root is the log's"
    );
    assert_eq!(latest.body["root"], json!(hex::encode(cp.root)));
    assert_eq!(latest.body["mismatch"], json!([]), "a row as signed");

    let list = t.get("/v1/ledger/checkpoints?limit=5", &t.admin_key).await;
    assert_eq!(list.status, 200);
    assert_eq!(list.body["items"][0]["tree_size"], json!(head));
    // Nothing about the log is served without `ledger:read`.
    let org = t.create_org("Gamma").await;
    let (_, member) = t.member_with_key(org, "member", "m@gamma.example").await;
    assert_eq!(
        t.get("/v1/ledger/checkpoints/latest", &member).await.status,
        403
    );
}

#[tokio::test]
async fn proofs_from_the_api_verify_against_signed_checkpoints() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let old = t.signer.verifier().open(&sign_now(&t).await).unwrap();
    some_history_more(&t).await;
    let new = t.signer.verifier().open(&sign_now(&t).await).unwrap();
    assert!(new.tree_size > old.tree_size);

    for position in [1, 2, old.tree_size / 2, old.tree_size, new.tree_size] {
        let r = t
            .get(
                &format!(
                    "/v1/ledger/proofs/inclusion?position={position}&tree_size={}",
                    new.tree_size
                ),
                &t.admin_key,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let event: Digest = hex::decode(r.body["event_hash"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(
            event.to_vec(),
            event_at(t.pool(), position as i64).await.hash
        );
        let proof = digests(&r.body["proof"]);
        merkle::verify_inclusion::<Blake3>(
            position - 1,
            new.tree_size,
            &Blake3::leaf(&event),
            &proof,
            &new.root,
        )
        .unwrap_or_else(|e| panic!("inclusion of {position}: {e}"));
        // The same proof does not prove another position.
        if position > 1 {
            assert!(merkle::verify_inclusion::<Blake3>(
                position - 2,
                new.tree_size,
                &Blake3::leaf(&event),
                &proof,
                &new.root
            )
            .is_err());
        }
    }
    let r = t
        .get(
            &format!(
                "/v1/ledger/proofs/consistency?from_size={}&to_size={}",
                old.tree_size, new.tree_size
            ),
            &t.admin_key,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    merkle::verify_consistency::<Blake3>(
        old.tree_size,
        new.tree_size,
        &old.root,
        &new.root,
        &digests(&r.body["proof"]),
    )
    .expect("the newer tree extends the older");

    for bad in [
        format!(
            "/v1/ledger/proofs/inclusion?position=0&tree_size={}",
            new.tree_size
        ),
        format!(
            "/v1/ledger/proofs/inclusion?position=5&tree_size={}",
            new.tree_size + 100
        ),
        format!(
            "/v1/ledger/proofs/consistency?from_size={}&to_size={}",
            new.tree_size, old.tree_size
        ),
        "/v1/ledger/proofs/inclusion?position=1".to_string(),
    ] {
        assert_eq!(t.get(&bad, &t.admin_key).await.status, 400, "{bad}");
    }
}

async fn some_history_more(t: &TestApp) {
    let org = t.create_org("Delta").await;
    t.invite(org, "d@delta.example", "D").await;
}

/// A copy of a printed proof with the first hex digit of its first hash changed, saved.
fn doctor(proof: &str) -> PathBuf {
    let mut v: Value = serde_json::from_str(proof).unwrap();
    let first = v["proof"][0].as_str().unwrap().to_string();
    let flipped = format!(
        "{}{}",
        if first.starts_with('0') { "1" } else { "0" },
        &first[1..]
    );
    v["proof"][0] = json!(flipped);
    file(&v.to_string())
}

fn digests(v: &Value) -> Vec<Digest> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| {
            hex::decode(h.as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn an_organization_key_proves_only_its_own_events() {
    let t = TestApp::spawn().await;
    let mine = t.create_org("Mine").await;
    let other = t.create_org("Other").await;
    t.invite(other, "o@other.example", "O").await;
    let (_, auditor) = t.member_with_key(mine, "auditor", "a@mine.example").await;
    let size = t
        .signer
        .verifier()
        .open(&sign_now(&t).await)
        .unwrap()
        .tree_size;
    let position_of = |org: Uuid| {
        let pool = t.pool().clone();
        async move {
            let (p,): (i64,) =
                sqlx::query_as("SELECT min(position) FROM events WHERE organization_id = $1")
                    .bind(org)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            p
        }
    };
    let path = |p: i64| format!("/v1/ledger/proofs/inclusion?position={p}&tree_size={size}");
    assert_eq!(
        t.get(&path(position_of(mine).await), &auditor).await.status,
        200
    );
    assert_eq!(
        t.get(&path(position_of(other).await), &auditor)
            .await
            .status,
        404
    );
    assert_eq!(
        t.get(&path(1), &auditor).await.status,
        404,
        "platform events too"
    );
}

#[tokio::test]
async fn the_cli_prints_proofs_that_verify_offline_and_tampered_proofs_do_not() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let old = file(&sign_now(&t).await);
    some_history_more(&t).await;
    let new = file(&sign_now(&t).await);
    let key = key(&t);
    let old_s = old.to_str().unwrap();
    let new_s = new.to_str().unwrap();
    let inclusion = [
        "prove",
        "inclusion",
        "--position",
        "3",
        "--checkpoint",
        new_s,
    ];
    let consistency = ["prove", "consistency", "--from", old_s, "--to", new_s];

    let (code, proof, err) = ledgerline(&t.db.url, &inclusion).await;
    assert_eq!(code, 0, "{err}");
    let proof_file = file(&proof);
    let p = proof_file.to_str().unwrap();
    let (code, out, err) = ledgerline(
        &t.db.url,
        &[
            "verify-proof",
            "--proof",
            p,
            "--checkpoint",
            new_s,
            "--public-key",
            &key,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("valid"), "{out}");
    // One hash of the proof altered.
    let doctored = doctor(&proof);
    let (code, out, _) = ledgerline(
        &t.db.url,
        &[
            "verify-proof",
            "--proof",
            doctored.to_str().unwrap(),
            "--checkpoint",
            new_s,
            "--public-key",
            &key,
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("INVALID"), "{out}");

    let (code, proof, err) = ledgerline(&t.db.url, &consistency).await;
    assert_eq!(code, 0, "{err}");
    let proof_file = file(&proof);
    let (code, out, err) = ledgerline(
        &t.db.url,
        &[
            "verify-proof",
            "--proof",
            proof_file.to_str().unwrap(),
            "--checkpoint",
            old_s,
            "--checkpoint",
            new_s,
            "--public-key",
            &key,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    // One hash of the consistency proof altered, for the right pair: refused as invalid.
    let doctored = doctor(&proof);
    let (code, out, _) = ledgerline(
        &t.db.url,
        &[
            "verify-proof",
            "--proof",
            doctored.to_str().unwrap(),
            "--checkpoint",
            old_s,
            "--checkpoint",
            new_s,
            "--public-key",
            &key,
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("INVALID"), "{out}");

    // A tree that is not the one signed gives no proof: the refusal goes to stderr, so a
    // proof file never holds it, for either kind of proof.
    tamper(
        t.pool(),
        &["UPDATE merkle_nodes SET hash = sha256(hash)".to_string()],
    )
    .await;
    for args in [&inclusion[..], &consistency[..]] {
        let (code, out, err) = ledgerline(&t.db.url, args).await;
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert!(err.starts_with("MISMATCH"), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn an_untouched_log_extends_every_checkpoint_also_after_an_erasure() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let first = file(&sign_now(&t).await);
    let org = t.create_org("Erasure Co").await;
    let user = t.invite(org, "gone@erasure.example", "Gone").await;
    let second = file(&sign_now(&t).await);
    let r = t
        .post(
            &format!("/v1/organizations/{org}/users/{user}/erase"),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200);
    let third = file(&sign_now(&t).await);
    let (code, out, err) = verify_since(&t, &[&first, &second, &third]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("consistent"), "{out}");
    assert!(!out.contains("past the newest"), "{out}");
    // Events after the newest checkpoint given are named as vouched for by none of them.
    let size = |cp: &PathBuf| {
        t.signer
            .verifier()
            .open(&std::fs::read_to_string(cp).unwrap())
            .unwrap()
            .tree_size
    };
    let (code, out, err) = verify_since(&t, &[&first]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "positions {} to {} are past the newest of them",
            size(&first) + 1,
            t.head().await
        )),
        "{out}"
    );
    // Without checkpoints of one's own, the database's newest is compared.
    let (code, out, err) = ledgerline(&t.db.url, &["verify"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "the database's newest checkpoint (size {}, signed",
            size(&third)
        )),
        "{out}"
    );
    for cp in [&first, &second, &third] {
        let (code, report) = export_and_verify(&t, cp).await;
        assert_eq!(code, 0, "{report}");
        assert!(report.contains("matches the checkpoint"), "{report}");
    }
}

#[tokio::test]
async fn a_rewritten_history_is_caught_against_an_earlier_checkpoint() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let early = file(&sign_now(&t).await);
    some_history_more(&t).await;
    let kept = file(&sign_now(&t).await);
    let k = beta_position(&t).await;
    rewrite_from(&t, k).await;
    assert!(
        t.verify().await.intact(),
        "the chain alone cannot see a rewrite with every later hash recomputed"
    );
    let size_early = t
        .signer
        .verifier()
        .open(&std::fs::read_to_string(&early).unwrap())
        .unwrap()
        .tree_size;
    assert!(
        k as u64 <= size_early,
        "the edit lies before the early checkpoint"
    );
    let (code, out, err) = verify_since(&t, &[&early, &kept]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with("REWRITTEN"), "{out}");
    assert!(
        out.contains(&format!("from 1 to {size_early}")),
        "names the range the edit lies in: {out}"
    );
    // An export made now, checked offline against the kept checkpoint.
    let (code, report) = export_and_verify(&t, &early).await;
    assert_eq!(code, 1, "{report}");
    assert!(report.starts_with("TAMPERED"), "{report}");
    assert!(
        report.contains("Merkle root mismatch") || report.contains("chain head mismatch"),
        "{report}"
    );
    // Plain `verify` sees it against the database's own newest checkpoint.
    let (code, out, err) = ledgerline(&t.db.url, &["verify"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with("REWRITTEN: the event at position"), "{out}");
}

#[tokio::test]
async fn cutting_off_the_newest_events_is_caught_against_a_checkpoint() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let early = file(&sign_now(&t).await);
    let early_size = t.head().await;
    t.create_org("Gamma").await;
    let kept = file(&sign_now(&t).await);
    let n = t.head().await;
    assert!(n - 3 > early_size, "the cut lies past the early checkpoint");
    tamper(
        t.pool(),
        &[format!("DELETE FROM events WHERE position > {}", n - 3)],
    )
    .await;
    // Against an auditor's checkpoint from before the cut, the database's own newer one
    // still shows it.
    let (code, out, err) = verify_since(&t, &[&early]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with(&format!("TRUNCATED: first missing position {}", n - 2)),
        "{out}"
    );
    assert!(
        t.verify().await.intact(),
        "the chain alone cannot see a cut"
    );
    let (code, out, err) = verify_since(&t, &[&kept]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with(&format!("TRUNCATED: first missing position {}", n - 2)),
        "{out}"
    );
    let (code, report) = export_and_verify(&t, &kept).await;
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("truncated"), "{report}");
    // Plain `verify` compares with the database's own newest checkpoint, and rebuilds refuse.
    let (code, out, err) = ledgerline(&t.db.url, &["verify"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with(&format!("TRUNCATED: first missing position {}", n - 2)),
        "{out}"
    );
    let (code, out, err) = ledgerline(&t.db.url, &["projections", "rebuild", "--all"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("TRUNCATED"), "{err}");
    // With the checkpoints gone too, the Merkle tree's size still tells; with it reset as
    // well, only one's own copy can.
    tamper(t.pool(), &["DELETE FROM checkpoints".to_string()]).await;
    let (code, out, err) = ledgerline(&t.db.url, &["verify"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("but the database's Merkle tree covers"),
        "{out}"
    );
    tamper(
        t.pool(),
        &[format!("UPDATE merkle_state SET size = {}", n - 3)],
    )
    .await;
    let (code, out, err) = ledgerline(&t.db.url, &["verify"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("holds no checkpoint to compare with"), "{out}");
}

#[tokio::test]
async fn two_histories_signed_at_one_size_are_a_fork() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let one = sign_now(&t).await;
    // A superuser with the signing key rewrites the log, rebuilds the tree and signs again.
    rewrite_from(&t, beta_position(&t).await).await;
    tamper(
        t.pool(),
        &[
            "DELETE FROM merkle_nodes".to_string(),
            "DELETE FROM checkpoints".to_string(),
            "UPDATE merkle_state SET size = 0, peaks = '{}'".to_string(),
        ],
    )
    .await;
    // Signed by another process holding the key: the running server, which remembers what
    // it signed, would refuse (`the_running_server_does_not_sign_a_rewritten_history`).
    let forger = LogSigner::from_hex(t.signer.name(), &t.signer.seed_hex()).unwrap();
    tree::catch_up(t.pool(), Some(&forger), POLICY, true)
        .await
        .expect("no checkpoint left to extend");
    let (two,): (String,) = sqlx::query_as("SELECT note FROM checkpoints")
        .fetch_one(t.pool())
        .await
        .unwrap();
    let (a, b) = (
        t.signer.verifier().open(&one).unwrap(),
        t.signer.verifier().open(&two).unwrap(),
    );
    assert_eq!(a.tree_size, b.tree_size);
    assert_ne!(a.root, b.root);
    let (one, two) = (file(&one), file(&two));
    let (code, out, err) = verify_since(&t, &[&one, &two]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with("FORK"), "{out}");
    // Against the first checkpoint alone, the database's log is the rewritten one.
    let (code, out, _) = verify_since(&t, &[&one]).await;
    assert_eq!(code, 1);
    assert!(out.starts_with("REWRITTEN"), "{out}");
}

/// A log signed at one size and integrated past it, with the app's own maintainer kept off
/// it (the test holds its lease): events the tree holds but no checkpoint covers yet, open to
/// a rewrite before the next integration. Returns the signed and the integrated size, the
/// second a multiple of four, so that the check of the newest leaf climbs through a stored
/// node as well as its neighbour's leaf.
async fn integrated_past_the_signed(t: &TestApp) -> (i64, i64) {
    hold_off_the_maintainer(t).await;
    some_history(t).await;
    sign_now(t).await;
    let signed = t.head().await;
    let org = t.create_org("Delta").await;
    for i in 0.. {
        if t.head().await % 4 == 0 && t.head().await >= signed + 4 {
            break;
        }
        assert!(i < 12, "invites move the head by one event each");
        t.invite(org, &format!("d{i}@delta.example"), "D").await;
    }
    let (integrated, _, _) = tree::integrate_batch(t.pool()).await.unwrap();
    assert_eq!(integrated as i64, t.head().await);
    (signed, integrated as i64)
}

/// Keeps the app's own log maintainer from integrating or signing: the test holds its lease.
async fn hold_off_the_maintainer(t: &TestApp) {
    sqlx::query(
        "INSERT INTO leases (name, holder, expires_at) \
         VALUES ($1, 'the test', now() + interval '1 hour') \
         ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, \
             expires_at = EXCLUDED.expires_at",
    )
    .bind(tree::LEASE)
    .execute(t.pool())
    .await
    .unwrap();
}

/// The tree loses the integrations its database had not flushed when it crashed
/// (integration does not wait for the flush), behind a checkpoint already signed and
/// remembered: while it catches up it is neither signed below that checkpoint nor refused as
/// cut back, since the log still reaches it; past it, it is signed again, checked against it.
#[tokio::test]
async fn a_tree_that_lost_integrations_behind_a_signed_size_catches_up() {
    let t = TestApp::spawn().await;
    hold_off_the_maintainer(&t).await;
    some_history(&t).await;
    tree::integrate_batch(t.pool()).await.unwrap();
    let (early, peaks): (i64, Vec<Vec<u8>>) =
        sqlx::query_as("SELECT size, peaks FROM merkle_state")
            .fetch_one(t.pool())
            .await
            .unwrap();
    some_history_more(&t).await;
    sign_now(&t).await;
    let signed = t.head().await;
    assert!(early < signed);
    // What the crash lost: the tree's state and nodes since `early`.
    sqlx::query("UPDATE merkle_state SET size = $1, peaks = $2")
        .bind(early)
        .bind(&peaks)
        .execute(t.pool())
        .await
        .unwrap();
    sqlx::query("DELETE FROM merkle_nodes WHERE (idx + 1) * (1::bigint << level) > $1")
        .bind(early)
        .execute(t.pool())
        .await
        .unwrap();
    let behind = tree::sign_checkpoint(t.pool(), &t.signer, None).await;
    assert!(
        matches!(behind, Ok(None)),
        "not signed, not refused: {behind:?}"
    );
    t.create_org("After").await;
    tree::catch_up(t.pool(), Some(&t.signer), POLICY, true)
        .await
        .unwrap();
    let newest: i64 = sqlx::query_scalar("SELECT max(tree_size) FROM checkpoints")
        .fetch_one(t.pool())
        .await
        .unwrap();
    assert_eq!(newest, t.head().await);
    assert!(newest > signed);
}

async fn checkpoint_count(t: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM checkpoints")
        .fetch_one(t.pool())
        .await
        .unwrap()
}

/// Events integrated but not yet signed are rewritten, every later hash recomputed, and the
/// next command links to the new head: the maintainer refuses to go on from a head that is
/// not the leaf its tree holds, where it used to sign a root of the old events under a chain
/// head through the new ones (a checkpoint that `verify` took as agreeing).
#[tokio::test]
async fn integrated_events_rewritten_before_they_are_signed_stop_the_maintainer() {
    let t = TestApp::spawn().await;
    let (signed, integrated) = integrated_past_the_signed(&t).await;
    let checkpoints = checkpoint_count(&t).await;
    assert!(integrated - 2 > signed);
    rewrite_metadata_from(&t, integrated - 2).await;
    t.create_org("Epsilon").await;
    let refused = tree::catch_up(t.pool(), Some(&t.signer), POLICY, true).await;
    assert!(
        matches!(refused, Err(tree::TreeError::Tampered(p)) if p == integrated),
        "{refused:?}"
    );
    assert_eq!(checkpoint_count(&t).await, checkpoints, "nothing signed");
}

/// The newest integrated event's format is read from the event checked against the tree, not
/// taken from its column: set back to v1 there, it would have made the next event the start
/// of v2, and the tree's recorded boundary would have moved.
#[tokio::test]
async fn the_newest_integrated_events_format_is_checked_against_its_hash() {
    let t = TestApp::spawn().await;
    let (_, integrated) = integrated_past_the_signed(&t).await;
    let checkpoints = checkpoint_count(&t).await;
    tamper(
        t.pool(),
        &[format!(
            "UPDATE events SET hash_version = 1 WHERE position = {integrated}"
        )],
    )
    .await;
    t.create_org("Epsilon").await;
    let refused = tree::catch_up(t.pool(), Some(&t.signer), POLICY, true).await;
    assert!(
        matches!(refused, Err(tree::TreeError::Tampered(p)) if p == integrated),
        "{refused:?}"
    );
    let (size, v2_from): (i64, Option<i64>) =
        sqlx::query_as("SELECT size, hash_v2_from FROM merkle_state")
            .fetch_one(t.pool())
            .await
            .unwrap();
    assert_eq!((size, v2_from), (integrated, Some(1)), "nothing integrated");
    assert_eq!(checkpoint_count(&t).await, checkpoints, "nothing signed");
}

/// Someone who can write the database but holds no key rewrites the log, rebuilds the tree
/// from it and waits for the server to sign: it refuses, as the tree does not extend the
/// checkpoint it signed (found in the stored notes after a restart, remembered while running
/// even when the notes are deleted too).
#[tokio::test]
async fn the_running_server_does_not_sign_a_rewritten_history() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    sign_now(&t).await;
    // A server that keeps its newest checkpoint in a file (`--checkpoint-anchor-file`).
    let anchor = std::env::temp_dir().join(format!("ll-anchor-{}", Uuid::new_v4().simple()));
    let with_anchor = || {
        LogSigner::from_hex(t.signer.name(), &t.signer.seed_hex())
            .unwrap()
            .with_anchor_file(anchor.clone())
            .unwrap()
    };
    tree::sign_checkpoint(t.pool(), &with_anchor(), None)
        .await
        .unwrap();
    assert!(anchor.exists());
    // Another server on the database, which has not signed but has seen the notes.
    let other = LogSigner::from_hex(t.signer.name(), &t.signer.seed_hex()).unwrap();
    assert!(tree::observe_signed(t.pool(), &other)
        .await
        .unwrap()
        .is_some());
    let signed = checkpoint_count(&t).await;
    // The tree is rebuilt from nothing in the rewrite's transaction: the app's own maintainer
    // never sees the rewritten log beside the old tree, where it would stop at once, at the
    // newest event it integrated (no longer its tree's leaf), before anything is signed.
    let tree_from_nothing = [
        "DELETE FROM merkle_nodes",
        "UPDATE merkle_state SET size = 0, peaks = '{}'",
    ];
    let beta = beta_position(&t).await;
    rewrite_json_from(&t, beta, "payload", beta_edited, &tree_from_nothing).await;
    // New commands, chained to the rewritten head: a tree larger than the signed one.
    some_history_more(&t).await;
    // A restarted server: a new signer, the stored notes.
    let restarted = LogSigner::from_hex(t.signer.name(), &t.signer.seed_hex()).unwrap();
    let refused = tree::catch_up(t.pool(), Some(&restarted), POLICY, true).await;
    assert!(
        matches!(&refused, Err(tree::TreeError::Unsignable(why)) if why.contains("chain head")),
        "{refused:?}"
    );
    let count = || checkpoint_count(&t);
    assert_eq!(count().await, signed, "nothing signed after the rewrite");
    // The app's own maintainer, woken by those commands, stopped too, and says so where an
    // operator looks (a quiet log's checkpoint ages as well).
    let ready = || async { t.call(reqwest::Method::GET, "/readyz", None, None).await };
    assert!(
        common::eventually(std::time::Duration::from_secs(10), || async {
            ready().await.status == 503
        })
        .await,
        "{}",
        ready().await.body
    );
    let message = ready().await.body["error"]["message"].to_string();
    assert!(
        message.contains("the log maintainer (its tree cannot be signed"),
        "{message}"
    );
    let metrics = t
        .client
        .get(format!("{}/metrics", t.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("\nledgerline_log_maintainer_halted 1\n"),
        "{metrics}"
    );
    // The running one, with the notes gone as well.
    tamper(t.pool(), &["DELETE FROM checkpoints".to_string()]).await;
    let refused = tree::catch_up(t.pool(), Some(&t.signer), POLICY, true).await;
    assert!(
        matches!(&refused, Err(tree::TreeError::Unsignable(_))),
        "{refused:?}"
    );
    let refused = tree::catch_up(t.pool(), Some(&other), POLICY, true).await;
    assert!(
        matches!(&refused, Err(tree::TreeError::Unsignable(_))),
        "the other server too: {refused:?}"
    );
    // Restarted with its anchor file.
    let refused = tree::catch_up(t.pool(), Some(&with_anchor()), POLICY, true).await;
    assert!(
        matches!(&refused, Err(tree::TreeError::Unsignable(_))),
        "{refused:?}"
    );
    assert_eq!(count().await, 0, "nothing signed after the rewrite");
    // An anchor file altered is refused at start.
    let note = std::fs::read_to_string(&anchor).unwrap();
    std::fs::write(&anchor, note.replacen("\n", "\n\n", 1)).unwrap();
    let opened = LogSigner::from_hex(t.signer.name(), &t.signer.seed_hex())
        .unwrap()
        .with_anchor_file(anchor.clone());
    assert!(opened.is_err());
    std::fs::remove_file(&anchor).ok();
}

#[tokio::test]
async fn a_forged_checkpoint_is_refused() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let note = sign_now(&t).await;
    let cp = t.signer.verifier().open(&note).unwrap();
    // Its size raised by hand: the signature no longer covers the text.
    let raised = note.replacen(
        &format!("\n{}\n", cp.tree_size),
        &format!("\n{}\n", cp.tree_size + 1),
        1,
    );
    // Signed by a key that is not the log's, under the log's name.
    let impostor = LogSigner::generate("ledgerline.test/log")
        .unwrap()
        .sign(&cp);
    for forged in [raised, impostor] {
        let forged = file(&forged);
        let (code, out, err) = verify_since(&t, &[&forged]).await;
        assert_eq!(code, 1, "{out}{err}");
        assert!(out.starts_with("FORGED"), "{out}");
        // Offline, the same verdict as the database path's (exit 1).
        let (code, report) = export_and_verify(&t, &forged).await;
        assert_eq!(code, 1, "{report}");
        assert!(
            report.starts_with("FORGED: checkpoint refused: "),
            "{report}"
        );
    }
}

#[tokio::test]
async fn an_export_verifies_offline_against_a_checkpoint_and_an_altered_one_does_not() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let cp = file(&sign_now(&t).await);
    let cp = cp.to_str().unwrap();
    let key = key(&t);
    let out = std::env::temp_dir().join(format!("ll-export-{}.jsonl", Uuid::new_v4().simple()));
    let out_s = out.to_str().unwrap();
    let (code, summary, err) = ledgerline(
        &t.db.url,
        &[
            "export",
            "--out",
            out_s,
            "--log-origin",
            "ledgerline.test/log",
        ],
    )
    .await;
    assert_eq!(code, 0, "{summary}{err}");
    let exported = std::fs::read_to_string(&out).unwrap();
    // A refused export leaves the file already there as it was, and nothing beside it.
    let (code, _, err) = ledgerline(
        &t.db.url,
        &[
            "export",
            "--out",
            out_s,
            "--from",
            "10",
            "--to",
            "5",
            "--log-origin",
            "ledgerline.test/log",
        ],
    )
    .await;
    assert_ne!(code, 0, "a range that ends before it starts: {err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), exported);
    assert!(!std::path::Path::new(&format!("{out_s}.partial")).exists());
    let (code, report, err) = ledgerline(
        &t.db.url,
        &[
            "verify",
            "--file",
            out_s,
            "--checkpoint",
            cp,
            "--public-key",
            &key,
        ],
    )
    .await;
    assert_eq!(code, 0, "{report}{err}");
    assert!(report.starts_with("intact"), "{report}");
    assert!(report.contains("matches the checkpoint"), "{report}");

    // One tenant's name changed in the file: caught at that event, by content.
    let k = beta_position(&t).await;
    let text = std::fs::read_to_string(&out).unwrap();
    std::fs::write(&out, text.replacen("Beta", "Bet4", 1)).unwrap();
    let (code, report, _) = ledgerline(
        &t.db.url,
        &[
            "verify",
            "--file",
            out_s,
            "--checkpoint",
            cp,
            "--public-key",
            &key,
        ],
    )
    .await;
    assert_eq!(code, 1, "{report}");
    assert!(
        report.starts_with(&format!("TAMPERED: first bad position {k}:")),
        "{report}"
    );
    std::fs::remove_file(&out).ok();
}

/// A maintainer whose lease ran out signs nothing: the note is stored in the transaction
/// that holds the lease, so a lapsed holder cannot sign beside the next one.
#[tokio::test]
async fn a_signer_that_does_not_hold_the_maintainers_lease_signs_nothing() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let signer = LogSigner::from_hex(t.signer.name(), &t.signer.seed_hex()).unwrap();
    let count = || checkpoint_count(&t);
    // Settled: the whole tree integrated and signed, so no round is skipped for a newer one.
    sign_now(&t).await;
    let before = count().await;
    let refused = tree::sign_checkpoint(t.pool(), &signer, Some("a-lapsed-holder")).await;
    assert!(
        matches!(refused, Err(tree::TreeError::NotLeaseHolder)),
        "{refused:?}"
    );
    assert_eq!(count().await, before, "nothing stored");
}

/// A checkpoint says where v2 hashes begin (`hash-v2-from`), which an export's verifier holds
/// each line to; `verify --since` refuses one whose boundary is not the log's, and the
/// maintainer will not integrate (or sign) a v1 event after a v2 one.
#[tokio::test]
async fn checkpoints_sign_where_v2_begins_and_nothing_after_it_may_be_v1() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let note = sign_now(&t).await;
    assert!(note.contains("\nhash-v2-from 1\n"), "{note}");
    let signed = t.signer.verifier().open(&note).unwrap();
    let since_note = |note: String| {
        let t = &t;
        async move {
            let path = file(&note);
            let (code, out, err) = verify_since(t, &[&path]).await;
            std::fs::remove_file(&path).ok();
            (code, format!("{out}{err}"))
        }
    };
    let (code, out) = since_note(note.clone()).await;
    assert_eq!(code, 0, "{out}");
    // Signed by the key, but with a boundary the log does not have (a signer's bug, or a
    // key used outside the maintainer).
    for wrong in [Some(2), None] {
        let note = t.signer.sign(&Checkpoint {
            hash_v2_from: wrong,
            ..signed.clone()
        });
        let (code, out) = since_note(note).await;
        assert_eq!(code, 1, "{wrong:?}: {out}");
        assert!(out.starts_with("MISMATCH"), "{out}");
    }

    // Where v2 began, as the maintainer noted it, edited in the database: it signs nothing.
    for edited in ["NULL", "3"] {
        t.create_org(&format!("Moved {edited}")).await;
        tamper(
            t.pool(),
            &[format!("UPDATE merkle_state SET hash_v2_from = {edited}")],
        )
        .await;
        let refused = tree::catch_up(t.pool(), Some(&t.signer), POLICY, true).await;
        assert!(
            matches!(&refused, Err(tree::TreeError::Unsignable(why)) if why.contains("first v2 position")),
            "{edited}: {refused:?}"
        );
        tamper(
            t.pool(),
            &["UPDATE merkle_state SET hash_v2_from = 1".to_string()],
        )
        .await;
    }
    sign_now(&t).await;

    // A v1 event appended after the v2 ones, its hash right for v1, with the triggers off.
    let head = t.head().await;
    let last = event_at(t.pool(), head).await;
    let mut v1 = last.clone();
    v1.position = head + 1;
    v1.aggregate_id = Uuid::new_v4().to_string();
    v1.sequence = 1;
    v1.prev_hash = last.hash.clone();
    v1.hash_version = 1;
    v1.hash = hash_of(&v1.prev_hash, &v1);
    let mut tx = superuser_tx(t.pool()).await;
    sqlx::query(
        "INSERT INTO events (position, aggregate_type, aggregate_id, sequence, event_type, \
         event_version, organization_id, recorded_at, payload, metadata, prev_hash, hash, \
         hash_version) \
         SELECT $1, aggregate_type, $2, 1, event_type, event_version, organization_id, \
         recorded_at, payload, metadata, $3, $4, 1 FROM events WHERE position = $5",
    )
    .bind(v1.position)
    .bind(&v1.aggregate_id)
    .bind(&v1.prev_hash)
    .bind(&v1.hash)
    .bind(head)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let refused = tree::catch_up(t.pool(), Some(&t.signer), POLICY, true).await;
    assert!(
        matches!(refused, Err(tree::TreeError::Tampered(p)) if p == head + 1),
        "{refused:?}"
    );
    let report = t.verify().await;
    assert_eq!(
        report.first_bad.map(|b| (b.position, b.fault)),
        Some((head + 1, Fault::V1AfterV2))
    );
}

/// A checkpoint row's `chain_head` column is the DBA's to set; its note is not. Plain
/// `verify` compares the log with what the note signs, and names a row whose columns are
/// not its own note's; with the log's key it also refuses a note altered to match.
#[tokio::test]
async fn plain_verify_takes_what_a_checkpoint_says_from_its_signed_note() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let early = file(&sign_now(&t).await);
    let k = t.head().await + 1;
    some_history_more(&t).await;
    sign_now(&t).await;
    let n = t.head().await;
    rewrite_metadata_from(&t, k).await;
    tamper(
        t.pool(),
        &[format!(
            "UPDATE checkpoints c SET chain_head = e.hash FROM events e \
             WHERE e.position = c.tree_size AND c.tree_size >= {k}"
        )],
    )
    .await;
    assert!(t.verify().await.intact(), "the chain alone still verifies");
    let (code, out, err) = ledgerline(&t.db.url, &["verify"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with(&format!("REWRITTEN: the event at position {n} ")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "\nMISMATCH: checkpoint row {n} disagrees with its own signed note (of size {n}): \
             its chain_head column is not what the note signs"
        )),
        "{out}"
    );
    assert!(
        out.contains("(`verify --since` with the checkpoints"),
        "{out}"
    );
    // The rewrite lies past the auditor's own checkpoint; the database's note still shows it,
    // and `--since`, given already, is not suggested again.
    let (code, out, err) = verify_since(&t, &[&early]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with(&format!("REWRITTEN: the event at position {n} ")),
        "{out}"
    );
    assert!(!out.contains("--since"), "{out}");
    // The notes' own chain heads edited to match as well: only their signatures tell. Every
    // row the rewrite reached, not only `n`'s: the app's maintainer may have signed one
    // between `k` and `n` on its own (its interval is a second), which would be a MISMATCH.
    tamper(
        t.pool(),
        &[format!(
            "UPDATE checkpoints SET note = regexp_replace(note, 'chain-head [0-9a-f]+', \
             'chain-head ' || encode(chain_head, 'hex')) WHERE tree_size >= {k}"
        )],
    )
    .await;
    let (code, out, err) = ledgerline(&t.db.url, &["verify"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("its note's signature not checked: pass --public-key"),
        "{out}"
    );
    let (code, out, err) = ledgerline(&t.db.url, &["verify", "--public-key", &key(&t)]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!(
            "FORGED: the note of checkpoint row {n} does not open under the key given"
        )),
        "{out}"
    );
}

/// Tampering with a checkpoint row alone (the log untouched) is reported as that row, not as
/// the events rewritten or cut off.
#[tokio::test]
async fn a_checkpoint_row_altered_alone_is_named_and_not_the_events() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let kept = file(&sign_now(&t).await);
    let n = t.head().await;
    tamper(
        t.pool(),
        &[format!(
            "UPDATE checkpoints SET chain_head = decode(repeat('ab', 32), 'hex') \
             WHERE tree_size = {n}"
        )],
    )
    .await;
    let (code, out, err) = ledgerline(&t.db.url, &["verify"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with(&format!(
            "MISMATCH: checkpoint row {n} disagrees with its own signed note (of size {n}): \
             its chain_head column is not what the note signs"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("newest checkpoint (size {n}")),
        "{out}"
    );
    assert!(
        !out.contains("REWRITTEN") && !out.contains("TRUNCATED"),
        "{out}"
    );
    // Put back, and a copy of the row inserted under a size the log has not reached.
    tamper(
        t.pool(),
        &[
            format!(
                "UPDATE checkpoints c SET chain_head = e.hash FROM events e \
                 WHERE e.position = c.tree_size AND c.tree_size = {n}"
            ),
            format!(
                "INSERT INTO checkpoints SELECT 999, root, chain_head, signed_at, note \
                 FROM checkpoints WHERE tree_size = {n}"
            ),
        ],
    )
    .await;
    assert!(n < 999);
    let kept = kept.to_str().unwrap();
    for args in [
        &["verify"][..],
        &["verify", "--since", kept, "--public-key", &key(&t)][..],
    ] {
        let (code, out, err) = ledgerline(&t.db.url, args).await;
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(
            out.starts_with(&format!(
                "MISMATCH: checkpoint row 999 disagrees with its own signed note (of size {n}): \
                 its tree_size column is not what the note signs"
            )),
            "{args:?}: {out}"
        );
        assert!(!out.contains("TRUNCATED"), "{args:?}: {out}");
    }
    // `prove` with a checkpoint file whose root was altered: it blames neither side unless
    // the file's signature is checked.
    let note = std::fs::read_to_string(kept).unwrap();
    let cp = Checkpoint::parse_unverified(&note).unwrap();
    let b64 = |bytes: &[u8]| {
        base64::engine::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
    };
    let forged = file(&note.replacen(&b64(&cp.root), &b64(&[7u8; 32]), 1));
    let forged = forged.to_str().unwrap();
    let (code, out, err) = ledgerline(
        &t.db.url,
        &[
            "prove",
            "inclusion",
            "--position",
            "1",
            "--checkpoint",
            forged,
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.starts_with(&format!(
            "MISMATCH: checkpoint {forged} and the database disagree"
        )) && err.contains("pass --public-key"),
        "{err}"
    );
    let (code, out, err) = ledgerline(
        &t.db.url,
        &[
            "prove",
            "inclusion",
            "--position",
            "1",
            "--checkpoint",
            forged,
            "--public-key",
            &key(&t),
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.starts_with(&format!("FORGED: checkpoint {forged}")),
        "{err}"
    );
}

/// The value of the `/metrics` sample `series` (its name and labels as printed), if present.
async fn metric(t: &TestApp, series: &str) -> Option<f64> {
    let text = t
        .client
        .get(format!("{}/metrics", t.base))
        .send()
        .await
        .expect("scraped")
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// Sets columns of the checkpoint row of `tree_size` `size`, as a DBA can.
async fn edit_row(t: &TestApp, size: i64, set: &str) {
    tamper(
        t.pool(),
        &[format!(
            "UPDATE checkpoints SET {set} WHERE tree_size = {size}"
        )],
    )
    .await;
}

/// The body of `GET /v1/ledger/checkpoints?{query}`, which must answer 200.
async fn list(t: &TestApp, query: &str) -> Value {
    let r = t
        .get(&format!("/v1/ledger/checkpoints?{query}"), &t.admin_key)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// A checkpoint as the API answers it, as `note` signs it.
fn served_as(note: &str, mismatch: &[&str]) -> Value {
    let cp = Checkpoint::parse_unverified(note).unwrap();
    json!({
        "tree_size": cp.tree_size,
        "root": hex::encode(cp.root),
        "chain_head": hex::encode(cp.chain_head),
        "signed_at": cp.time,
        "note": note,
        "mismatch": mismatch,
    })
}

/// The columns beside a checkpoint's note are the DBA's to set: the API and the metrics show
/// what the note signs, and name the columns that are not that, or a note that is no
/// checkpoint. Lists still page by the rows' own `tree_size` column.
#[tokio::test]
async fn the_api_and_the_metrics_show_what_a_note_signs_and_name_the_columns_edited() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let older = sign_now(&t).await;
    let a = Checkpoint::parse_unverified(&older).unwrap().tree_size;
    some_history_more(&t).await;
    let newest = sign_now(&t).await;
    let n = t.head().await;
    let latest = "/v1/ledger/checkpoints/latest";
    let mismatch = |column: &str| format!("ledgerline_checkpoint_mismatch{{column=\"{column}\"}}");

    // Moved above every other row (so no maintainer signs past it meanwhile), every column
    // but the note rewritten, the time an hour back.
    let set = "root = decode(repeat('ab', 32), 'hex'), chain_head = decode(repeat('cd', 32), \
               'hex'), signed_at = signed_at - interval '1 hour'";
    edit_row(&t, n, &format!("tree_size = {n} + 1000, {set}")).await;
    let all = ["tree_size", "root", "chain_head", "signed_at"];
    let served = t.get(latest, &t.admin_key).await;
    assert_eq!(served.status, 200, "{}", served.body);
    assert_eq!(served.body, served_as(&newest, &all));
    let listed = list(&t, &format!("tree_size={}", n + 1000)).await;
    assert_eq!(listed["items"], json!([served_as(&newest, &all)]));
    assert_eq!(
        metric(&t, "ledgerline_checkpoint_size").await,
        Some(n as f64)
    );
    let age = metric(&t, "ledgerline_checkpoint_age_seconds")
        .await
        .unwrap();
    assert!(
        (0.0..600.0).contains(&age),
        "the note's time, not the column's: {age}"
    );
    for column in all {
        assert_eq!(metric(&t, &mismatch(column)).await, Some(1.0), "{column}");
    }
    assert_eq!(metric(&t, &mismatch("note")).await, Some(0.0));

    // The older row moved above it: it leads the list, showing its own note's size, and the
    // next page starts below where the row is, not below the size its note signs.
    edit_row(&t, a as i64, &format!("tree_size = {n} + 2000")).await;
    let first = list(&t, "limit=1").await;
    assert_eq!(first["items"], json!([served_as(&older, &["tree_size"])]));
    assert_eq!(first["next_cursor"], json!(n + 2000));
    let second = list(&t, &format!("limit=1&before_size={}", n + 2000)).await;
    assert_eq!(second["items"], json!([served_as(&newest, &all)]));
    assert_eq!(
        metric(&t, "ledgerline_checkpoint_size").await,
        Some(a as f64)
    );
    assert_eq!(metric(&t, &mismatch("tree_size")).await, Some(1.0));
    assert_eq!(metric(&t, &mismatch("root")).await, Some(0.0));

    // A note that is no checkpoint: nothing signed to show, and it says so.
    edit_row(&t, n + 2000, "note = 'not a note'").await;
    let garbled = t.get(latest, &t.admin_key).await;
    assert_eq!(garbled.status, 200, "{}", garbled.body);
    assert_eq!(garbled.body["mismatch"], json!(["note"]));
    assert_eq!(garbled.body["tree_size"], json!(n + 2000));
    assert_eq!(metric(&t, "ledgerline_checkpoint_size").await, None);
    assert_eq!(metric(&t, "ledgerline_checkpoint_age_seconds").await, None);
    assert_eq!(metric(&t, &mismatch("note")).await, Some(1.0));
    assert_eq!(metric(&t, &mismatch("tree_size")).await, Some(0.0));
    // A time no `DateTime` holds is a column that differs, not a panic.
    edit_row(&t, n + 1000, "signed_at = 'infinity'").await;
    let listed = list(&t, &format!("tree_size={}", n + 1000)).await;
    assert_eq!(listed["items"], json!([served_as(&newest, &all)]));
}

/// `/readyz`'s message and the halted gauge, once the app's maintainer stopped.
async fn halted_readiness(t: &TestApp) -> (String, String) {
    let ready = || async { t.call(reqwest::Method::GET, "/readyz", None, None).await };
    assert!(
        common::eventually(std::time::Duration::from_secs(10), || async {
            ready().await.status == 503
        })
        .await,
        "{}",
        ready().await.body
    );
    let message = ready().await.body["error"]["message"].to_string();
    let metrics = t
        .client
        .get(format!("{}/metrics", t.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (message, metrics)
}

/// The newest events cut off under a running server: its maintainer stops (it would only
/// retry, the tree ahead of the log for ever), and says so where an operator looks.
#[tokio::test]
async fn cutting_off_events_under_a_running_server_stops_its_maintainer() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    sign_now(&t).await;
    let n = t.head().await;
    tamper(
        t.pool(),
        &[format!("DELETE FROM events WHERE position > {}", n - 3)],
    )
    .await;
    let (message, metrics) = halted_readiness(&t).await;
    assert!(
        message.contains(&format!(
            "the log maintainer (the log ends at position {}, but the Merkle tree integrated \
             {n} events",
            n - 3
        )),
        "{message}"
    );
    // No command shows a maintainer's halt (it is this process's alone): the message sends
    // the operator to what does.
    assert!(message.contains("the server's log says why"), "{message}");
    assert!(
        message.contains("`ledgerline verify --public-key`"),
        "{message}"
    );
    assert!(!message.contains("projections status"), "{message}");
    assert!(
        metrics.contains("\nledgerline_log_maintainer_halted 1\n"),
        "{metrics}"
    );
    let refused = tree::catch_up(t.pool(), None, POLICY, false).await;
    assert!(
        matches!(refused, Err(tree::TreeError::Truncated { .. })),
        "{refused:?}"
    );
}

/// The tree's state row deleted: the server's maintainer stops, and `export` and `prove` name
/// the table rather than a bare "no rows returned".
#[tokio::test]
async fn a_deleted_tree_state_row_is_named() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    let kept = file(&sign_now(&t).await);
    tamper(t.pool(), &["DELETE FROM merkle_state".to_string()]).await;
    let (message, metrics) = halted_readiness(&t).await;
    assert!(message.contains("merkle_state holds no row"), "{message}");
    assert!(
        metrics.contains("\nledgerline_log_maintainer_halted 1\n"),
        "{metrics}"
    );
    let out = std::env::temp_dir().join(format!("ll-export-{}.jsonl", Uuid::new_v4().simple()));
    for args in [
        &["export", "--out", out.to_str().unwrap()][..],
        &[
            "prove",
            "inclusion",
            "--position",
            "1",
            "--checkpoint",
            kept.to_str().unwrap(),
        ][..],
    ] {
        let (code, stdout, err) = ledgerline(&t.db.url, args).await;
        assert_eq!(code, 2, "{args:?}: {stdout}{err}");
        assert!(
            err.contains("the table merkle_state holds no row"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("no rows returned"), "{args:?}: {err}");
    }
}

/// `ledgerline serve` against `t`'s database with `signing_key` under the log's name: its exit
/// code and standard error, or `None` if it was still serving after 30 s (then stopped).
async fn serve_with_key(t: &TestApp, signing_key: &str) -> Option<(i32, String)> {
    let master = ledgerline::crypto::MasterKey::generate().to_hex();
    let serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_ledgerline"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("LEDGERLINE_DATABASE_URL", &t.db.url)
        .env("LEDGERLINE_MASTER_KEY", master)
        .env("LEDGERLINE_SIGNING_KEY", signing_key)
        .env("LEDGERLINE_LOG_ORIGIN", t.signer.name())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        // A server that does start is stopped when the wait below gives up on it.
        .kill_on_drop(true)
        .spawn()
        .expect("start ledgerline serve");
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), serve.wait_with_output())
        .await
        .ok()?
        .expect("serve's output");
    Some((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The operator's walkthrough: a server started with another signing key than the log's (a
/// new one from `keygen`) took the maintainer's lease and signed with it, silently, so that
/// auditors holding the log's public key found every new checkpoint FORGED. `serve` now
/// refuses to start with it, naming both key ids; a maintainer that meets another key's note
/// as the newest (another process signing with it) signs nothing and halts, where an
/// operator looks.
#[tokio::test]
async fn a_server_with_another_signing_key_than_the_logs_signs_nothing() {
    let t = TestApp::spawn().await;
    some_history(&t).await;
    sign_now(&t).await;
    let ours = t.signer.verifier().key_id_hex();
    let (code, keys, err) = ledgerline_offline(&["keygen", "--log-origin", t.signer.name()]).await;
    assert_eq!(code, 0, "{err}");
    let keys: Value = serde_json::from_str(&keys).unwrap();
    let other =
        LogSigner::from_hex(t.signer.name(), keys["signing_key"].as_str().unwrap()).unwrap();
    let theirs = other.verifier().key_id_hex();
    assert_ne!(ours, theirs);
    let newest = || async {
        sqlx::query_as::<_, (i64, String)>(
            "SELECT tree_size, note FROM checkpoints ORDER BY tree_size DESC LIMIT 1",
        )
        .fetch_one(t.pool())
        .await
        .unwrap()
    };

    // Started with the other key: refused before serving, naming the log's key id and its own.
    let (code, err) = serve_with_key(&t, keys["signing_key"].as_str().unwrap())
        .await
        .expect("serve with another key than the log's must not start");
    assert_eq!(code, 2, "{err}");
    for said in [
        "refusing to start with this signing key: the newest checkpoint in the database",
        &format!("is signed by `ledgerline.test/log` key id {ours}"),
        &format!("not by this server's key (`ledgerline.test/log` key id {theirs})"),
        "rotating the signing key is not supported",
    ] {
        assert!(err.contains(said), "{said}: {err}");
    }

    // Its maintainer, had it started, signs nothing over the log's checkpoints.
    some_history_more(&t).await;
    let refused = tree::catch_up(t.pool(), Some(&other), POLICY, true).await;
    assert!(
        matches!(&refused, Err(tree::TreeError::OtherKey { key_id, signed_by, .. })
            if *key_id == theirs && signed_by.contains(&ours)),
        "{refused:?}"
    );
    let notes: Vec<String> = sqlx::query_scalar("SELECT note FROM checkpoints")
        .fetch_all(t.pool())
        .await
        .unwrap();
    assert!(
        notes.iter().all(|n| other.verifier().open(n).is_err()),
        "nothing signed with the other key"
    );
    // Nor does a key of another log name (its key id differs too).
    let renamed = LogSigner::from_hex("ledgerline.test/other", &t.signer.seed_hex()).unwrap();
    let refused = tree::observe_signed(t.pool(), &renamed).await;
    assert!(
        matches!(&refused, Err(tree::TreeError::OtherKey { .. })),
        "{refused:?}"
    );

    // The app's own maintainer signs the new events with the log's key, and then rests.
    let head = t.head().await;
    assert!(
        common::eventually(std::time::Duration::from_secs(10), || async {
            newest().await.0 == head
        })
        .await
    );
    let (size, note) = newest().await;
    let cp = t.signer.verifier().open(&note).unwrap();
    // A note of the log's key altered is not another key's: it vouches for nothing, as
    // before, and an older one that opens is the anchor.
    tamper(
        t.pool(),
        &[format!(
            "UPDATE checkpoints SET note = replace(note, E'\\n{size}\\n', E'\\n{}\\n') \
             WHERE tree_size = {size}",
            size + 1
        )],
    )
    .await;
    let fresh = LogSigner::from_hex(t.signer.name(), &t.signer.seed_hex()).unwrap();
    let anchor = tree::observe_signed(t.pool(), &fresh).await.unwrap();
    assert!(anchor.is_some_and(|a| (a.tree_size as i64) < size));

    // The running server, when another key's note becomes the newest (another process
    // signing with it): it halts rather than sign on, and says so.
    tamper(
        t.pool(),
        &[format!(
            "UPDATE checkpoints SET note = '{}' WHERE tree_size = {size}",
            other.sign(&cp)
        )],
    )
    .await;
    t.create_org("Epsilon").await;
    let (message, metrics) = halted_readiness(&t).await;
    assert!(
        message.contains(&format!(
            "the log maintainer (the newest checkpoint is signed by `ledgerline.test/log` key \
             id {theirs}, not by this server's key (key id {ours})"
        )),
        "{message}"
    );
    assert!(
        metrics.contains("\nledgerline_log_maintainer_halted 1\n"),
        "{metrics}"
    );
    assert_eq!(newest().await.0, size, "nothing signed over it");
}
