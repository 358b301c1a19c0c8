//! `ledgerline::ledger::merkle`'s SHA-256 instance (RFC 6962's own tree) against vectors
//! published by another implementation, transparency-dev/merkle
//! (<https://github.com/transparency-dev/merkle>, Apache-2.0), copied unchanged into
//! `tests/vectors/transparency-dev/` (its README.md names each upstream file and commit):
//!
//! * `testonly/constants.go`: the eight reference leaf inputs, the hashes of every complete
//!   subtree of their tree, and the root of every size 0..=8;
//! * `proof/verify_test.go`: its inclusion and consistency proof vectors (hex);
//! * `rfc6962/rfc6962_test.go`: the empty root and two leaf hashes;
//! * `testdata/inclusion/*/*.json` and `testdata/consistency/*/*.json`: every happy path and a
//!   selection of the invalid variants, which must be rejected.
//!
//! Black-box and database-free: only the module's public API.

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ledgerline::ledger::merkle::{
    consistency_proof, consistency_proof_from, inclusion_proof, inclusion_proof_from, root,
    root_from, verify_consistency, verify_inclusion, Digest, Frontier, ProofError, Recorder,
    Sha256, TreeHash,
};
use serde_json::Value;

const REFERENCE: &str = include_str!("vectors/transparency-dev/reference.json");
const INCLUSION: &str = include_str!("vectors/transparency-dev/inclusion.json");
const CONSISTENCY: &str = include_str!("vectors/transparency-dev/consistency.json");

fn json(text: &str) -> Value {
    serde_json::from_str(text).expect("valid JSON")
}

fn hex32(v: &Value) -> Digest {
    let s = v.as_str().expect("a hex string");
    hex::decode(s)
        .expect("hex")
        .try_into()
        .unwrap_or_else(|_| panic!("`{s}` is not 32 bytes"))
}

fn hex_list(v: &Value) -> Vec<Digest> {
    v.as_array().expect("a list").iter().map(hex32).collect()
}

/// Base64 as upstream writes it; `None` for a value that is not 32 bytes.
fn b64(v: &Value) -> Option<Digest> {
    B64.decode(v.as_str().expect("a base64 string"))
        .expect("base64")
        .try_into()
        .ok()
}

/// A proof (`null` is empty); `None` if an element is not 32 bytes.
fn b64_proof(v: &Value) -> Option<Vec<Digest>> {
    match v {
        Value::Null => Some(Vec::new()),
        Value::Array(items) => items.iter().map(b64).collect(),
        other => panic!("not a proof: {other}"),
    }
}

struct Reference {
    leaf_inputs: Vec<Vec<u8>>,
    /// Level, then index.
    nodes: Vec<Vec<Digest>>,
    /// By tree size, 0..=8.
    roots: Vec<Digest>,
}

fn reference() -> Reference {
    let r = json(REFERENCE);
    let t = &r["testonly"];
    let leaf_inputs = t["leaf_inputs_hex"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| hex::decode(v.as_str().unwrap()).unwrap())
        .collect::<Vec<_>>();
    let nodes = t["node_hashes_by_level"]
        .as_array()
        .unwrap()
        .iter()
        .map(hex_list)
        .collect::<Vec<_>>();
    let roots = hex_list(&t["root_hashes_by_size"]);
    assert_eq!(leaf_inputs.len(), 8);
    assert_eq!(roots.len(), 9);
    assert_eq!(nodes.iter().map(Vec::len).collect::<Vec<_>>(), [8, 4, 2, 1]);
    Reference {
        leaf_inputs,
        nodes,
        roots,
    }
}

impl Reference {
    fn leaf_hashes(&self) -> Vec<Digest> {
        self.leaf_inputs.iter().map(|d| Sha256::leaf(d)).collect()
    }

    /// Upstream's complete subtrees as stored nodes: nothing computed by us.
    fn node_map(&self) -> HashMap<(u32, u64), Digest> {
        let mut m = HashMap::new();
        for (level, row) in self.nodes.iter().enumerate() {
            for (index, d) in row.iter().enumerate() {
                m.insert((level as u32, index as u64), *d);
            }
        }
        m
    }

    /// The upstream nodes a tree of `size` leaves has (those complete within it).
    fn node_map_of_size(&self, size: u64) -> HashMap<(u32, u64), Digest> {
        self.node_map()
            .into_iter()
            .filter(|((level, index), _)| (index + 1) << level <= size)
            .collect()
    }
}

#[test]
fn rfc6962_hasher_vectors() {
    let r = json(REFERENCE);
    let h = &r["rfc6962_leaf_hashes"];
    assert_eq!(Sha256::empty(), hex32(&h["empty_root"]));
    let leaves = h["leaves"].as_array().unwrap();
    assert_eq!(leaves.len(), 2);
    for l in leaves {
        let input = hex::decode(l["input_hex"].as_str().unwrap()).unwrap();
        if let Some(ascii) = l.get("input_ascii") {
            assert_eq!(input, ascii.as_str().unwrap().as_bytes());
        }
        assert_eq!(Sha256::leaf(&input), hex32(&l["leaf_hash"]));
    }
    // The empty tree's root is not the hash of an empty leaf.
    assert_ne!(Sha256::empty(), Sha256::leaf(b""));
}

#[test]
fn roots_and_nodes_of_the_reference_leaves() {
    let r = reference();
    let leaves = r.leaf_hashes();
    assert_eq!(leaves, r.nodes[0], "leaf hashes");
    for n in 0..=8usize {
        assert_eq!(root::<Sha256>(&leaves[..n]), r.roots[n], "root of size {n}");
    }
    // Every upstream complete subtree is the root of its leaves.
    for (level, row) in r.nodes.iter().enumerate() {
        for (index, d) in row.iter().enumerate() {
            let s = index << level;
            assert_eq!(
                root::<Sha256>(&leaves[s..s + (1 << level)]),
                *d,
                "node {level}/{index}"
            );
        }
    }
}

#[test]
fn stored_nodes_from_upstream_give_the_roots() {
    let r = reference();
    for n in 0..=8u64 {
        let nodes = r.node_map_of_size(n);
        assert_eq!(
            root_from::<Sha256, _>(&nodes, n),
            Some(r.roots[n as usize]),
            "size {n}"
        );
        let rec = Recorder::default();
        root_from::<Sha256, _>(&rec, n).unwrap();
        for k in rec.requests() {
            assert!(nodes.contains_key(&k), "size {n} asks for {k:?}");
        }
    }
}

#[test]
fn frontier_makes_the_reference_nodes_and_roots() {
    let r = reference();
    let mut f = Frontier::<Sha256>::new();
    assert_eq!(f.root(), r.roots[0]);
    let mut made = HashMap::new();
    for (i, leaf) in r.leaf_hashes().into_iter().enumerate() {
        for (level, index, d) in f.push(leaf) {
            made.insert((level, index), d);
        }
        assert_eq!(f.root(), r.roots[i + 1], "size {}", i + 1);
    }
    assert_eq!(made, r.node_map());
}

#[test]
fn verify_test_go_inclusion_proofs() {
    let r = reference();
    let leaves = r.leaf_hashes();
    let nodes = r.node_map();
    let v = json(REFERENCE);
    let list = v["verify_test"]["inclusion_proofs"].as_array().unwrap();
    assert_eq!(list.len(), 6);
    for p in list {
        let leaf = p["leaf_1based"].as_u64().unwrap();
        let size = p["size"].as_u64().unwrap();
        let proof = hex_list(&p["proof"]);
        if leaf == 0 {
            // Upstream's first vector {0, 0, nil} is "an invalid path": no leaf, no tree.
            assert_eq!(size, 0);
            assert_eq!(inclusion_proof::<Sha256>(&leaves[..0], 0), None);
            assert_eq!(inclusion_proof_from::<Sha256, _>(&nodes, 0, 0), None);
            assert!(verify_inclusion::<Sha256>(0, 0, &leaves[0], &[], &r.roots[0]).is_err());
            continue;
        }
        let index = leaf - 1;
        let tree = &leaves[..size as usize];
        assert_eq!(
            inclusion_proof::<Sha256>(tree, index),
            Some(proof.clone()),
            "leaf {leaf} of {size}"
        );
        assert_eq!(
            inclusion_proof_from::<Sha256, _>(&r.node_map_of_size(size), index, size),
            Some(proof.clone()),
            "leaf {leaf} of {size}, from upstream's nodes"
        );
        assert_eq!(
            verify_inclusion::<Sha256>(
                index,
                size,
                &leaves[index as usize],
                &proof,
                &r.roots[size as usize]
            ),
            Ok(())
        );
    }
}

#[test]
fn verify_test_go_consistency_proofs() {
    let r = reference();
    let leaves = r.leaf_hashes();
    let v = json(REFERENCE);
    let list = v["verify_test"]["consistency_proofs"].as_array().unwrap();
    assert_eq!(list.len(), 5);
    for p in list {
        let size1 = p["size1"].as_u64().unwrap();
        let size2 = p["size2"].as_u64().unwrap();
        let proof = hex_list(&p["proof"]);
        let tree = &leaves[..size2 as usize];
        assert_eq!(
            consistency_proof::<Sha256>(tree, size1),
            Some(proof.clone()),
            "{size1} to {size2}"
        );
        assert_eq!(
            consistency_proof_from::<Sha256, _>(&r.node_map_of_size(size2), size1, size2),
            Some(proof.clone()),
            "{size1} to {size2}, from upstream's nodes"
        );
        assert_eq!(
            verify_consistency::<Sha256>(
                size1,
                size2,
                &r.roots[size1 as usize],
                &r.roots[size2 as usize],
                &proof
            ),
            Ok(())
        );
    }
}

/// One `testdata/*/*.json` entry: where it came from and the upstream object.
fn entries(text: &str) -> Vec<(String, Value)> {
    json(text)["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["commit"].as_str().unwrap().len(), 40);
            (e["file"].as_str().unwrap().to_string(), e["data"].clone())
        })
        .collect()
}

#[test]
fn testdata_inclusion() {
    let r = reference();
    let leaves = r.leaf_hashes();
    let all = entries(INCLUSION);
    let (mut happy, mut rejected, mut by_type) = (0, 0, 0);
    for (file, d) in &all {
        let index = d["leafIdx"].as_u64().unwrap();
        let size = d["treeSize"].as_u64().unwrap();
        let want_err = d["wantErr"].as_bool().unwrap();
        let (Some(root), Some(leaf), Some(proof)) =
            (b64(&d["root"]), b64(&d["leafHash"]), b64_proof(&d["proof"]))
        else {
            // Not 32-byte hashes: the typed API cannot even be called with them.
            assert!(
                want_err,
                "{file}: only invalid vectors hold malformed hashes"
            );
            by_type += 1;
            continue;
        };
        let got = verify_inclusion::<Sha256>(index, size, &leaf, &proof, &root);
        if want_err {
            assert!(got.is_err(), "{file} ({}) must be rejected", d["desc"]);
            rejected += 1;
        } else {
            assert_eq!(got, Ok(()), "{file}");
            // And we generate the same proof for the same tree.
            assert_eq!(leaf, leaves[index as usize], "{file}: a reference leaf");
            assert_eq!(root, r.roots[size as usize], "{file}: a reference root");
            assert_eq!(
                inclusion_proof::<Sha256>(&leaves[..size as usize], index),
                Some(proof),
                "{file}"
            );
            happy += 1;
        }
    }
    assert_eq!(
        (happy, rejected, by_type),
        (5, 20, 2),
        "vectors in the file"
    );
}

#[test]
fn testdata_consistency() {
    let r = reference();
    let leaves = r.leaf_hashes();
    let all = entries(CONSISTENCY);
    let (mut happy, mut rejected, mut by_type) = (0, 0, 0);
    for (file, d) in &all {
        let size1 = d["size1"].as_u64().unwrap();
        let size2 = d["size2"].as_u64().unwrap();
        let want_err = d["wantErr"].as_bool().unwrap();
        let (Some(root1), Some(root2), Some(proof)) =
            (b64(&d["root1"]), b64(&d["root2"]), b64_proof(&d["proof"]))
        else {
            assert!(
                want_err,
                "{file}: only invalid vectors hold malformed hashes"
            );
            by_type += 1;
            continue;
        };
        let got = verify_consistency::<Sha256>(size1, size2, &root1, &root2, &proof);
        if want_err {
            assert!(got.is_err(), "{file} ({}) must be rejected", d["desc"]);
            rejected += 1;
        } else {
            assert_eq!(got, Ok(()), "{file}");
            assert_eq!(root1, r.roots[size1 as usize], "{file}: a reference root");
            assert_eq!(root2, r.roots[size2 as usize], "{file}: a reference root");
            assert_eq!(
                consistency_proof::<Sha256>(&leaves[..size2 as usize], size1),
                Some(proof),
                "{file}"
            );
            happy += 1;
        }
    }
    assert_eq!(
        (happy, rejected, by_type),
        (5, 11, 1),
        "vectors in the file"
    );
}

/// The errors say why, for a few of upstream's invalid variants.
#[test]
fn rejections_name_their_reason() {
    let r = reference();
    let leaves = r.leaf_hashes();
    let proof = inclusion_proof::<Sha256>(&leaves, 0).unwrap();
    assert_eq!(
        verify_inclusion::<Sha256>(0, 8, &leaves[0], &proof[..2], &r.roots[8]),
        Err(ProofError::WrongProofLength {
            expected: 3,
            got: 2
        })
    );
    assert_eq!(
        verify_inclusion::<Sha256>(8, 8, &leaves[0], &proof, &r.roots[8]),
        Err(ProofError::IndexOutOfRange { index: 8, size: 8 })
    );
    assert_eq!(
        verify_inclusion::<Sha256>(0, 8, &leaves[0], &proof, &r.roots[7]),
        Err(ProofError::RootMismatch)
    );
    let c = consistency_proof::<Sha256>(&leaves, 6).unwrap();
    assert_eq!(
        verify_consistency::<Sha256>(6, 8, &r.roots[5], &r.roots[8], &c),
        Err(ProofError::OldRootMismatch)
    );
    assert_eq!(
        verify_consistency::<Sha256>(6, 8, &r.roots[6], &r.roots[7], &c),
        Err(ProofError::NewRootMismatch)
    );
    assert_eq!(
        verify_consistency::<Sha256>(8, 6, &r.roots[8], &r.roots[6], &c),
        Err(ProofError::SizeOrder {
            old_size: 8,
            new_size: 6
        })
    );
    // Upstream's trivial cases (TestVerifyConsistency): equal sizes need equal roots and an
    // empty proof; size 0 is consistent with anything, with an empty proof.
    assert!(verify_consistency::<Sha256>(1, 1, &r.roots[1], &r.roots[2], &[]).is_err());
    assert!(verify_consistency::<Sha256>(0, 0, &r.roots[0], &r.roots[1], &[]).is_err());
    assert_eq!(
        verify_consistency::<Sha256>(0, 1, &r.roots[1], &r.roots[2], &[]),
        Ok(())
    );
    assert_eq!(
        verify_consistency::<Sha256>(1, 1, &r.roots[2], &r.roots[2], &[]),
        Ok(())
    );
    assert!(verify_consistency::<Sha256>(0, 1, &r.roots[0], &r.roots[0], &[r.roots[0]]).is_err());
    assert!(verify_consistency::<Sha256>(1, 2, &r.roots[1], &r.roots[2], &[]).is_err());
    assert!(verify_consistency::<Sha256>(2, 1, &r.roots[1], &r.roots[2], &[]).is_err());
}
