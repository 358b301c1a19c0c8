//! Merkle trees in the shape of RFC 6962 §2.1 (re-specified by RFC 9162 §2.1), generic over
//! the hash function: tree hashes (§2.1.1), inclusion proofs (§2.1.3) and consistency proofs
//! (§2.1.4), generated from the leaves in memory or from stored complete subtrees, the
//! verifiers of RFC 9162 §2.1.3.2 and §2.1.4.2, and the right frontier an incremental
//! integrator keeps. Pure: no I/O.
//!
//! Two instances: [`Sha256`] is RFC 6962's own tree (so its output can be checked against
//! other implementations' published vectors) and [`Blake3`] is ledgerline's tree, whose leaves
//! are the events' chain hashes ([`event_leaf`]; docs/ledger-format.md, "Merkle tree (BLAKE3)").
//!
//! Proofs are lists of digests in exactly RFC 9162's order: an inclusion proof runs from the
//! leaf's sibling up to the root's child; a consistency proof is `SUBPROOF(m, D[n], true)`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::marker::PhantomData;
use std::sync::Mutex;

/// A 32-byte hash: a leaf hash, an interior node or a tree root.
pub type Digest = [u8; 32];

/// The hash function of a tree, with RFC 6962's domain separation between leaves and nodes.
pub trait TreeHash {
    /// The root of the empty tree: the hash of the empty string.
    fn empty() -> Digest;
    /// The hash of a leaf: `HASH(0x00 || data)`.
    fn leaf(data: &[u8]) -> Digest;
    /// The hash of an interior node: `HASH(0x01 || left || right)`.
    fn node(left: &Digest, right: &Digest) -> Digest;
}

/// RFC 6962's tree: SHA-256, leaves `SHA-256(0x00 || data)`, nodes `SHA-256(0x01 || l || r)`.
#[derive(Debug)]
pub enum Sha256 {}

impl TreeHash for Sha256 {
    fn empty() -> Digest {
        use sha2::Digest as _;
        sha2::Sha256::digest(b"").into()
    }

    fn leaf(data: &[u8]) -> Digest {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update([0x00]);
        h.update(data);
        h.finalize().into()
    }

    fn node(left: &Digest, right: &Digest) -> Digest {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update([0x01]);
        h.update(left);
        h.update(right);
        h.finalize().into()
    }
}

/// Ledgerline's tree: RFC 6962's structure and domain separation with BLAKE3 (unkeyed, 32
/// bytes): leaves `BLAKE3(0x00 || data)`, nodes `BLAKE3(0x01 || l || r)`, empty `BLAKE3("")`.
#[derive(Debug)]
pub enum Blake3 {}

impl TreeHash for Blake3 {
    fn empty() -> Digest {
        *blake3::hash(b"").as_bytes()
    }

    fn leaf(data: &[u8]) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(&[0x00]);
        h.update(data);
        *h.finalize().as_bytes()
    }

    fn node(left: &Digest, right: &Digest) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(&[0x01]);
        h.update(left);
        h.update(right);
        *h.finalize().as_bytes()
    }
}

/// The leaf hash of an event in ledgerline's tree: `BLAKE3(0x00 || event hash)`.
pub fn event_leaf(event_hash: &Digest) -> Digest {
    Blake3::leaf(event_hash)
}

/// The largest power of two strictly smaller than `n` (RFC 6962's split point `k`); `n >= 2`.
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// MTH over a slice of leaf hashes (RFC 9162 §2.1.1). Recursion depth is at most 64.
fn mth<H: TreeHash>(leaves: &[Digest]) -> Digest {
    match leaves.len() {
        0 => H::empty(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
            H::node(&mth::<H>(&leaves[..k]), &mth::<H>(&leaves[k..]))
        }
    }
}

/// `PATH(index, D[size])` (RFC 9162 §2.1.3.1), with `sub(start, len)` giving the hash of the
/// leaves `[start, start + len)`. Walks down from the root and reverses, so the proof runs
/// from the leaf's sibling upwards.
fn inclusion_with(
    index: u64,
    size: u64,
    mut sub: impl FnMut(u64, u64) -> Option<Digest>,
) -> Option<Vec<Digest>> {
    if index >= size {
        return None;
    }
    let (mut start, mut n, mut m) = (0u64, size, index);
    let mut path = Vec::with_capacity(64);
    while n > 1 {
        let k = split(n);
        if m < k {
            path.push(sub(start + k, n - k)?);
            n = k;
        } else {
            path.push(sub(start, k)?);
            start += k;
            m -= k;
            n -= k;
        }
    }
    path.reverse();
    Some(path)
}

/// `PROOF(old_size, D[size]) = SUBPROOF(old_size, D[size], true)` (RFC 9162 §2.1.4.1), with
/// `sub` as in [`inclusion_with`].
fn consistency_with(
    old_size: u64,
    size: u64,
    mut sub: impl FnMut(u64, u64) -> Option<Digest>,
) -> Option<Vec<Digest>> {
    if old_size > size {
        return None;
    }
    if old_size == 0 || old_size == size {
        return Some(Vec::new());
    }
    let (mut start, mut n, mut m, mut b) = (0u64, size, old_size, true);
    let mut siblings = Vec::with_capacity(64);
    while m != n {
        let k = split(n);
        if m <= k {
            siblings.push(sub(start + k, n - k)?);
            n = k;
        } else {
            siblings.push(sub(start, k)?);
            start += k;
            m -= k;
            n -= k;
            b = false;
        }
    }
    let mut proof = Vec::with_capacity(siblings.len() + 1);
    if !b {
        // [start, start + m) is a complete subtree here: the last step went left (to a power
        // of two), since a right step keeps m != n.
        proof.push(sub(start, m)?);
    }
    proof.extend(siblings.into_iter().rev());
    Some(proof)
}

/// The Merkle tree hash `MTH(D[n])` of these leaf hashes; the empty slice gives `H::empty()`.
pub fn root<H: TreeHash>(leaf_hashes: &[Digest]) -> Digest {
    mth::<H>(leaf_hashes)
}

/// The inclusion proof (RFC 9162 §2.1.3.1) of leaf `index` in the tree of these leaf hashes;
/// `None` if `index >= leaf_hashes.len()`.
pub fn inclusion_proof<H: TreeHash>(leaf_hashes: &[Digest], index: u64) -> Option<Vec<Digest>> {
    let size = leaf_hashes.len() as u64;
    inclusion_with(index, size, |start, len| {
        Some(mth::<H>(
            &leaf_hashes[start as usize..(start + len) as usize],
        ))
    })
}

/// The consistency proof (RFC 9162 §2.1.4.1, `SUBPROOF(old_size, D[n], true)`) from the first
/// `old_size` leaves to all of them; `None` if `old_size > len`, empty when `old_size` is 0
/// or `len`.
pub fn consistency_proof<H: TreeHash>(
    leaf_hashes: &[Digest],
    old_size: u64,
) -> Option<Vec<Digest>> {
    let size = leaf_hashes.len() as u64;
    consistency_with(old_size, size, |start, len| {
        Some(mth::<H>(
            &leaf_hashes[start as usize..(start + len) as usize],
        ))
    })
}

/// Stored complete subtrees: the node at `level` covering leaves `[index << level, (index + 1)
/// << level)`; level 0 = leaf hashes.
pub trait Nodes {
    /// The stored node, or `None` if it is not available.
    fn node(&self, level: u32, index: u64) -> Option<Digest>;
}

impl<N: Nodes + ?Sized> Nodes for &N {
    fn node(&self, level: u32, index: u64) -> Option<Digest> {
        (**self).node(level, index)
    }
}

impl<S: BuildHasher> Nodes for HashMap<(u32, u64), Digest, S> {
    fn node(&self, level: u32, index: u64) -> Option<Digest> {
        self.get(&(level, index)).copied()
    }
}

impl Nodes for BTreeMap<(u32, u64), Digest> {
    fn node(&self, level: u32, index: u64) -> Option<Digest> {
        self.get(&(level, index)).copied()
    }
}

/// The hash of leaves `[start, start + len)` from stored nodes: one node when the range is a
/// complete subtree (`len` a power of two, `start` a multiple of it), else split at the largest
/// power of two below `len`. Every range an RFC 6962 tree or proof needs is aligned, so this
/// asks for at most about 64 nodes and recurses at most about 64 deep (an unaligned range is
/// computed correctly too, just from more nodes).
fn range_from<H: TreeHash, N: Nodes + ?Sized>(nodes: &N, start: u64, len: u64) -> Option<Digest> {
    if len == 0 {
        return Some(H::empty());
    }
    if len.is_power_of_two() && start & (len - 1) == 0 {
        let level = len.trailing_zeros();
        return nodes.node(level, start >> level);
    }
    let k = split(len);
    let left = range_from::<H, N>(nodes, start, k)?;
    let right = range_from::<H, N>(nodes, start + k, len - k)?;
    Some(H::node(&left, &right))
}

/// The root of the tree of the first `size` leaves, from stored nodes (the complete subtrees of
/// `size`'s binary decomposition); `None` if a node is missing. Size 0 gives `H::empty()`.
pub fn root_from<H: TreeHash, N: Nodes>(nodes: &N, size: u64) -> Option<Digest> {
    range_from::<H, N>(nodes, 0, size)
}

/// The peaks of the tree of the first `size` leaves, as [`Frontier::peaks`] gives them (the
/// complete subtrees of `size`'s binary decomposition, largest first), from stored nodes; `None`
/// if a node is missing. One node per set bit of `size`: a frontier without its leaves.
pub fn peaks_from<H: TreeHash, N: Nodes>(nodes: &N, size: u64) -> Option<Vec<Digest>> {
    let mut start = 0u64;
    (0..64u32)
        .rev()
        .filter(|level| size >> level & 1 == 1)
        .map(|level| {
            let peak = nodes.node(level, start >> level);
            start += 1 << level;
            peak
        })
        .collect()
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves, from stored nodes; `None`
/// if `index >= size` or a node is missing.
pub fn inclusion_proof_from<H: TreeHash, N: Nodes>(
    nodes: &N,
    index: u64,
    size: u64,
) -> Option<Vec<Digest>> {
    inclusion_with(index, size, |start, len| {
        range_from::<H, N>(nodes, start, len)
    })
}

/// The consistency proof from the tree of `old_size` leaves to the tree of `new_size`, from
/// stored nodes; `None` if `old_size > new_size` or a node is missing.
pub fn consistency_proof_from<H: TreeHash, N: Nodes>(
    nodes: &N,
    old_size: u64,
    new_size: u64,
) -> Option<Vec<Digest>> {
    consistency_with(old_size, new_size, |start, len| {
        range_from::<H, N>(nodes, start, len)
    })
}

/// Records which nodes a computation asks for, answering each with a placeholder (32 zero
/// bytes), so that a caller can fetch exactly those nodes in one query and run the computation
/// again over a `HashMap<(u32, u64), Digest>`.
#[derive(Debug, Default)]
pub struct Recorder {
    asked: Mutex<BTreeSet<(u32, u64)>>,
}

impl Recorder {
    /// The distinct `(level, index)` pairs asked for so far, in ascending order.
    pub fn requests(&self) -> Vec<(u32, u64)> {
        self.asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }
}

impl Nodes for Recorder {
    fn node(&self, level: u32, index: u64) -> Option<Digest> {
        self.asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((level, index));
        Some([0u8; 32])
    }
}

/// Why a proof does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// An inclusion proof for a leaf the tree does not have.
    #[error("leaf index {index} is out of range for a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    /// A consistency proof from a larger tree to a smaller one.
    #[error("the old tree size {old_size} is larger than the new tree size {new_size}")]
    SizeOrder { old_size: u64, new_size: u64 },
    /// The proof has the wrong number of hashes for these sizes.
    #[error("the proof has {got} hashes where these tree sizes need {expected}")]
    WrongProofLength { expected: usize, got: usize },
    /// The inclusion proof does not lead from the leaf to the given root.
    #[error("the inclusion proof does not lead to the given root")]
    RootMismatch,
    /// The consistency proof does not reproduce the old tree's root.
    #[error("the consistency proof does not reproduce the old root")]
    OldRootMismatch,
    /// The consistency proof does not reproduce the new tree's root.
    #[error("the consistency proof does not reproduce the new root")]
    NewRootMismatch,
    /// Two trees of the same size with different roots: they are not the same tree.
    #[error("two trees of the same size {size} have different roots")]
    RootsDiffer { size: u64 },
}

/// The length of the inclusion proof of `index` in a tree of `size` leaves (`index < size`):
/// the inner part (below the point where the paths to `index` and to the last leaf meet) plus
/// one hash for every left sibling above it.
fn inclusion_len(index: u64, size: u64) -> usize {
    let inner = 64 - (index ^ (size - 1)).leading_zeros();
    let border = if inner >= 64 {
        0
    } else {
        (index >> inner).count_ones()
    };
    (inner + border) as usize
}

/// Verifies an inclusion proof (RFC 9162 §2.1.3.2): the leaf hash at `index` with `proof`
/// leads to `root` in a tree of `size` leaves.
pub fn verify_inclusion<H: TreeHash>(
    index: u64,
    size: u64,
    leaf_hash: &Digest,
    proof: &[Digest],
    root: &Digest,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let expected = inclusion_len(index, size);
    if proof.len() != expected {
        return Err(ProofError::WrongProofLength {
            expected,
            got: proof.len(),
        });
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if snode == 0 {
            // Unreachable after the length check; kept from the RFC's algorithm.
            return Err(ProofError::WrongProofLength {
                expected,
                got: proof.len(),
            });
        }
        if fnode & 1 == 1 || fnode == snode {
            r = H::node(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = H::node(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongProofLength {
            expected,
            got: proof.len(),
        });
    }
    if &r != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Verifies a consistency proof (RFC 9162 §2.1.4.2): the tree of `old_size` leaves with
/// `old_root` is a prefix of the tree of `new_size` leaves with `new_root`. Equal sizes need an
/// empty proof and equal roots; an old size of 0 is consistent with anything (empty proof).
pub fn verify_consistency<H: TreeHash>(
    old_size: u64,
    new_size: u64,
    old_root: &Digest,
    new_root: &Digest,
    proof: &[Digest],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizeOrder { old_size, new_size });
    }
    if old_size == 0 || old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongProofLength {
                expected: 0,
                got: proof.len(),
            });
        }
        if old_size == new_size && old_root != new_root {
            return Err(ProofError::RootsDiffer { size: old_size });
        }
        return Ok(());
    }
    // The proof's length: the inclusion proof of the old tree's last leaf in the new tree,
    // less the levels below the old tree's rightmost complete subtree, plus that subtree's own
    // hash unless it is the whole old tree (old_size a power of two: the old root stands in).
    let shift = old_size.trailing_zeros() as usize;
    let seeded = old_size.is_power_of_two();
    let expected = inclusion_len(old_size - 1, new_size) - shift + usize::from(!seeded);
    if proof.len() != expected {
        return Err(ProofError::WrongProofLength {
            expected,
            got: proof.len(),
        });
    }
    let (first, rest) = if seeded {
        (old_root, proof)
    } else {
        (&proof[0], &proof[1..])
    };
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return Err(ProofError::WrongProofLength {
                expected,
                got: proof.len(),
            });
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = H::node(c, &fr);
            sr = H::node(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = H::node(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongProofLength {
            expected,
            got: proof.len(),
        });
    }
    if &fr != old_root {
        return Err(ProofError::OldRootMismatch);
    }
    if &sr != new_root {
        return Err(ProofError::NewRootMismatch);
    }
    Ok(())
}

/// The right frontier of a growing tree (a compact range from 0): what an incremental
/// integrator keeps.
pub struct Frontier<H: TreeHash> {
    size: u64,
    /// The complete subtrees of `size`'s binary decomposition, largest (leftmost) first.
    peaks: Vec<Digest>,
    hash: PhantomData<fn() -> H>,
}

impl<H: TreeHash> Frontier<H> {
    /// The frontier of the empty tree.
    pub fn new() -> Self {
        Self {
            size: 0,
            peaks: Vec::new(),
            hash: PhantomData,
        }
    }

    /// Rebuilds from a size and its peaks (the complete subtrees of the binary decomposition of
    /// `size`, largest/leftmost first) as returned by [`Frontier::peaks`]; `None` if the count
    /// does not match `size`'s popcount.
    pub fn from_parts(size: u64, peaks: Vec<Digest>) -> Option<Self> {
        if peaks.len() != size.count_ones() as usize {
            return None;
        }
        Some(Self {
            size,
            peaks,
            hash: PhantomData,
        })
    }

    /// The number of leaves pushed.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The complete subtrees of `size`'s binary decomposition, largest (leftmost) first.
    pub fn peaks(&self) -> &[Digest] {
        &self.peaks
    }

    /// The levels of the peaks, in the order of [`Frontier::peaks`]: the set bits of `size`,
    /// highest first. The peak at level `l` covers the `2^l` leaves before the next peaks'.
    pub fn peak_levels(&self) -> Vec<u32> {
        (0..64u32)
            .rev()
            .filter(|l| self.size >> l & 1 == 1)
            .collect()
    }

    /// Appends one leaf hash; returns every complete node this makes, as `(level, index,
    /// digest)`, the leaf itself (level 0) first.
    ///
    /// # Panics
    /// When the tree already has `u64::MAX` leaves.
    pub fn push(&mut self, leaf_hash: Digest) -> Vec<(u32, u64, Digest)> {
        assert!(self.size < u64::MAX, "the tree is full");
        let mut made = vec![(0, self.size, leaf_hash)];
        let mut h = leaf_hash;
        let mut level = 0u32;
        while self.size >> level & 1 == 1 {
            let left = self
                .peaks
                .pop()
                .expect("a peak for every set bit of the size");
            h = H::node(&left, &h);
            level += 1;
            made.push((level, self.size >> level, h));
        }
        self.peaks.push(h);
        self.size += 1;
        made
    }

    /// The root of the tree of every leaf pushed: equals [`root`] over them.
    pub fn root(&self) -> Digest {
        let mut peaks = self.peaks.iter().rev();
        let Some(last) = peaks.next() else {
            return H::empty();
        };
        peaks.fold(*last, |acc, p| H::node(p, &acc))
    }
}

impl<H: TreeHash> Default for Frontier<H> {
    fn default() -> Self {
        Self::new()
    }
}

impl<H: TreeHash> Clone for Frontier<H> {
    fn clone(&self) -> Self {
        Self {
            size: self.size,
            peaks: self.peaks.clone(),
            hash: PhantomData,
        }
    }
}

impl<H: TreeHash> PartialEq for Frontier<H> {
    fn eq(&self, other: &Self) -> bool {
        self.size == other.size && self.peaks == other.peaks
    }
}

impl<H: TreeHash> Eq for Frontier<H> {}

impl<H: TreeHash> fmt::Debug for Frontier<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frontier")
            .field("size", &self.size)
            .field("peaks", &self.peaks.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Every tree size up to this is tested exhaustively.
    const MAX: u64 = 64;
    /// Sizes up to this are also tried against each other's proofs.
    const CROSS: u64 = 24;

    fn leaves<H: TreeHash>(n: u64) -> Vec<Digest> {
        (0..n).map(|i| H::leaf(&i.to_be_bytes())).collect()
    }

    /// Every complete node of the tree of `n` leaves, computed from the definition.
    fn all_nodes<H: TreeHash>(l: &[Digest]) -> HashMap<(u32, u64), Digest> {
        let mut out = HashMap::new();
        let n = l.len() as u64;
        for level in 0..64u32 {
            let width = 1u64 << level;
            if width > n {
                break;
            }
            for index in 0..n / width {
                let s = (index * width) as usize;
                out.insert((level, index), root::<H>(&l[s..s + width as usize]));
            }
        }
        out
    }

    /// The nodes a map is actually asked for.
    struct Counting<'a> {
        map: &'a HashMap<(u32, u64), Digest>,
        asked: RefCell<BTreeSet<(u32, u64)>>,
    }

    impl Nodes for Counting<'_> {
        fn node(&self, level: u32, index: u64) -> Option<Digest> {
            self.asked.borrow_mut().insert((level, index));
            self.map.node(level, index)
        }
    }

    /// Runs `f` over a Recorder, fetches what it asked for from `full`, runs it again over only
    /// those: the result must be what `full` gives, and every fetched node must be used.
    fn through_recorder<T: PartialEq + fmt::Debug>(
        full: &HashMap<(u32, u64), Digest>,
        f: impl Fn(&dyn Fn(u32, u64) -> Option<Digest>) -> Option<T>,
    ) -> Option<T> {
        let direct = f(&|l, i| full.node(l, i));
        let rec = Recorder::default();
        let _ = f(&|l, i| rec.node(l, i));
        let wanted = rec.requests();
        let fetched: HashMap<(u32, u64), Digest> = wanted
            .iter()
            .filter_map(|k| full.get(k).map(|d| (*k, *d)))
            .collect();
        let counting = Counting {
            map: &fetched,
            asked: RefCell::new(BTreeSet::new()),
        };
        let again = f(&|l, i| counting.node(l, i));
        assert_eq!(again, direct);
        if direct.is_some() {
            assert_eq!(fetched.len(), wanted.len(), "every requested node exists");
            let used: Vec<_> = counting.asked.into_inner().into_iter().collect();
            assert_eq!(used, wanted, "exactly the fetched nodes are used");
        }
        direct
    }

    /// Nodes answered by a closure, so one test body serves every kind of store.
    struct ByFn<'a>(&'a dyn Fn(u32, u64) -> Option<Digest>);

    impl Nodes for ByFn<'_> {
        fn node(&self, level: u32, index: u64) -> Option<Digest> {
            (self.0)(level, index)
        }
    }

    /// Which bytes of a hash the tamper tests flip in a tree of `n` leaves: every byte up to
    /// 32 leaves, then the first, a middle and the last (debug-build hashing is slow).
    fn bytes_for(n: u64) -> Vec<usize> {
        if n <= 32 {
            (0..32).collect()
        } else {
            vec![0, 15, 31]
        }
    }

    /// The proof with one bit flipped in one of `bytes` of one hash, for every hash.
    fn flips<'a>(
        proof: &'a [Digest],
        bytes: &'a [usize],
    ) -> impl Iterator<Item = Vec<Digest>> + 'a {
        (0..proof.len()).flat_map(move |i| {
            bytes.iter().map(move |&b| {
                let mut p = proof.to_vec();
                p[i][b] ^= 1 << (b % 8);
                p
            })
        })
    }

    fn from_matches_in_memory<H: TreeHash>() {
        let l = leaves::<H>(MAX);
        for n in 0..=MAX {
            let lv = &l[..n as usize];
            let full = all_nodes::<H>(lv);
            let r = through_recorder(&full, |g| root_from::<H, _>(&ByFn(g), n));
            assert_eq!(r, Some(root::<H>(lv)), "root, size {n}");
            for i in 0..=n + 1 {
                let p = through_recorder(&full, |g| inclusion_proof_from::<H, _>(&ByFn(g), i, n));
                assert_eq!(p, inclusion_proof::<H>(lv, i), "inclusion {i} of {n}");
                assert_eq!(p.is_some(), i < n);
            }
            for m in 0..=n + 1 {
                let p = through_recorder(&full, |g| consistency_proof_from::<H, _>(&ByFn(g), m, n));
                assert_eq!(p, consistency_proof::<H>(lv, m), "consistency {m} to {n}");
                assert_eq!(p.is_some(), m <= n);
                if m == 0 || m == n {
                    assert_eq!(p, Some(vec![]));
                }
            }
            // A missing node makes the computation fail rather than guess.
            if n >= 2 {
                let without = |f: &dyn Fn(&dyn Nodes) -> bool| {
                    let rec = Recorder::default();
                    f(&rec);
                    for k in rec.requests() {
                        let mut holed = full.clone();
                        holed.remove(&k);
                        assert!(!f(&holed), "{k:?} missing at size {n}");
                    }
                };
                without(&|g| root_from::<H, _>(&g, n).is_some());
                without(&|g| inclusion_proof_from::<H, _>(&g, n / 3, n).is_some());
                without(&|g| consistency_proof_from::<H, _>(&g, n / 2 + 1, n).is_some());
            }
        }
    }

    #[test]
    fn stored_nodes_give_the_in_memory_results_sha256() {
        from_matches_in_memory::<Sha256>();
    }

    #[test]
    fn stored_nodes_give_the_in_memory_results_blake3() {
        from_matches_in_memory::<Blake3>();
    }

    fn inclusion_proofs_verify_and_nothing_else<H: TreeHash>() {
        let l = leaves::<H>(MAX);
        let roots: Vec<Digest> = (0..=MAX).map(|n| root::<H>(&l[..n as usize])).collect();
        let all: HashMap<(u64, u64), Vec<Digest>> = (1..=MAX)
            .flat_map(|n| (0..n).map(move |i| (i, n)))
            .map(|(i, n)| ((i, n), inclusion_proof::<H>(&l[..n as usize], i).unwrap()))
            .collect();
        let proof = |i: u64, n: u64| Some(all[&(i, n)].clone());
        for n in 1..=MAX {
            let root_n = roots[n as usize];
            for i in 0..n {
                let p = proof(i, n).unwrap();
                let leaf = l[i as usize];
                assert_eq!(verify_inclusion::<H>(i, n, &leaf, &p, &root_n), Ok(()));
                for bad in flips(&p, &bytes_for(n)) {
                    assert!(verify_inclusion::<H>(i, n, &leaf, &bad, &root_n).is_err());
                }
                for b in bytes_for(n) {
                    let mut r = root_n;
                    r[b] ^= 0x80;
                    assert_eq!(
                        verify_inclusion::<H>(i, n, &leaf, &p, &r),
                        Err(ProofError::RootMismatch)
                    );
                    let mut lf = leaf;
                    lf[b] ^= 0x80;
                    assert!(verify_inclusion::<H>(i, n, &lf, &p, &root_n).is_err());
                }
                // Another tree's root, the empty root, a longer or shorter proof.
                assert!(verify_inclusion::<H>(i, n, &leaf, &p, &roots[n as usize - 1]).is_err());
                assert!(verify_inclusion::<H>(i, n, &leaf, &p, &H::empty()).is_err());
                let mut longer = p.clone();
                longer.push(root_n);
                assert!(matches!(
                    verify_inclusion::<H>(i, n, &leaf, &longer, &root_n),
                    Err(ProofError::WrongProofLength { .. })
                ));
                let mut front = vec![root_n];
                front.extend(&p);
                assert!(verify_inclusion::<H>(i, n, &leaf, &front, &root_n).is_err());
                if !p.is_empty() {
                    assert!(
                        verify_inclusion::<H>(i, n, &leaf, &p[..p.len() - 1], &root_n).is_err()
                    );
                    let mut swapped = p.clone();
                    swapped.reverse();
                    if swapped != p {
                        assert!(verify_inclusion::<H>(i, n, &leaf, &swapped, &root_n).is_err());
                    }
                }
                // Claiming another index or size (with that tree's true root and leaf): it
                // verifies only where this proof is that position's true proof.
                for n2 in 1..=CROSS {
                    for i2 in 0..n2 {
                        if n > CROSS || (i2, n2) == (i, n) {
                            continue;
                        }
                        let ok =
                            verify_inclusion::<H>(i2, n2, &l[i2 as usize], &p, &roots[n2 as usize])
                                .is_ok();
                        assert_eq!(ok, proof(i2, n2).unwrap() == p, "({i},{n}) as ({i2},{n2})");
                    }
                    // The original leaf and root under another index or size.
                    if n2 != n {
                        let ok = verify_inclusion::<H>(i, n2, &leaf, &p, &root_n).is_ok();
                        if ok {
                            // Possible only where both sizes give the same path shape.
                            assert!(i < n2);
                            assert_eq!(inclusion_len(i, n2), p.len());
                        }
                    }
                }
                for i2 in 0..n {
                    if i2 != i {
                        assert!(verify_inclusion::<H>(i2, n, &leaf, &p, &root_n).is_err());
                    }
                }
                assert_eq!(
                    verify_inclusion::<H>(n, n, &leaf, &p, &root_n),
                    Err(ProofError::IndexOutOfRange { index: n, size: n })
                );
            }
        }
        assert_eq!(
            verify_inclusion::<H>(0, 0, &H::empty(), &[], &H::empty()),
            Err(ProofError::IndexOutOfRange { index: 0, size: 0 })
        );
    }

    #[test]
    fn inclusion_proofs_verify_and_nothing_else_sha256() {
        inclusion_proofs_verify_and_nothing_else::<Sha256>();
    }

    #[test]
    fn inclusion_proofs_verify_and_nothing_else_blake3() {
        inclusion_proofs_verify_and_nothing_else::<Blake3>();
    }

    fn consistency_proofs_verify_and_nothing_else<H: TreeHash>() {
        let l = leaves::<H>(MAX);
        let roots: Vec<Digest> = (0..=MAX).map(|n| root::<H>(&l[..n as usize])).collect();
        let all: HashMap<(u64, u64), Vec<Digest>> = (0..=MAX)
            .flat_map(|n| (0..=n).map(move |m| (m, n)))
            .map(|(m, n)| ((m, n), consistency_proof::<H>(&l[..n as usize], m).unwrap()))
            .collect();
        let proof = |m: u64, n: u64| Some(all[&(m, n)].clone());
        for n in 0..=MAX {
            let rn = roots[n as usize];
            for m in 0..=n {
                let rm = roots[m as usize];
                let p = proof(m, n).unwrap();
                assert_eq!(verify_consistency::<H>(m, n, &rm, &rn, &p), Ok(()));
                for bad in flips(&p, &bytes_for(n)) {
                    assert!(verify_consistency::<H>(m, n, &rm, &rn, &bad).is_err());
                }
                for b in bytes_for(n) {
                    let mut r = rm;
                    r[b] ^= 0x80;
                    let old_bad = verify_consistency::<H>(m, n, &r, &rn, &p);
                    let mut r = rn;
                    r[b] ^= 0x80;
                    let new_bad = verify_consistency::<H>(m, n, &rm, &r, &p);
                    if m == 0 && n > 0 {
                        // Every tree extends the empty one, whatever its root is said to be.
                        assert!(old_bad.is_ok() && new_bad.is_ok());
                    } else {
                        assert!(old_bad.is_err(), "old root flipped, {m} to {n}");
                        assert!(new_bad.is_err(), "new root flipped, {m} to {n}");
                    }
                }
                if m > 0 && m < n {
                    assert!(verify_consistency::<H>(m, n, &rn, &rm, &p).is_err());
                    assert!(verify_consistency::<H>(m, n, &rm, &rn, &[]).is_err());
                    assert!(verify_consistency::<H>(m, n, &rm, &rn, &p[..p.len() - 1]).is_err());
                    for extra in [rm, rn, p[0]] {
                        let mut longer = p.clone();
                        longer.push(extra);
                        assert!(verify_consistency::<H>(m, n, &rm, &rn, &longer).is_err());
                        let mut front = vec![extra];
                        front.extend(&p);
                        assert!(verify_consistency::<H>(m, n, &rm, &rn, &front).is_err());
                    }
                } else {
                    // Trivial cases take an empty proof only.
                    assert!(verify_consistency::<H>(m, n, &rm, &rn, &[rm]).is_err());
                }
                // Other sizes, with those trees' true roots: it verifies only where this proof
                // is the true proof for those sizes.
                for n2 in 0..=CROSS {
                    for m2 in 0..=n2 {
                        if n > CROSS || (m2, n2) == (m, n) {
                            continue;
                        }
                        let ok = verify_consistency::<H>(
                            m2,
                            n2,
                            &roots[m2 as usize],
                            &roots[n2 as usize],
                            &p,
                        )
                        .is_ok();
                        assert_eq!(ok, proof(m2, n2).unwrap() == p, "({m},{n}) as ({m2},{n2})");
                    }
                }
                // The original roots under other sizes.
                for m2 in 1..=n {
                    if m2 != m && m > 0 {
                        assert!(verify_consistency::<H>(m2, n, &rm, &rn, &p).is_err());
                    }
                }
                if m > 0 {
                    assert!(verify_consistency::<H>(m, n * 2, &rm, &rn, &p).is_err());
                    // Another new size can pass only where its proof has this one's shape
                    // (4 to 6 and 4 to 5 are both `[node]` with old root on the left): the
                    // claim then is about a tree with root `rn`, which the roots decide.
                    for n2 in m.max(1)..=MAX {
                        if n2 != n && verify_consistency::<H>(m, n2, &rm, &rn, &p).is_ok() {
                            assert_eq!(all[&(m, n2)].len(), p.len(), "{m} to {n} as to {n2}");
                            assert!(m != n && m != n2);
                        }
                    }
                }
            }
            if n > 0 {
                assert_eq!(
                    verify_consistency::<H>(n, n - 1, &rn, &roots[n as usize - 1], &[]),
                    Err(ProofError::SizeOrder {
                        old_size: n,
                        new_size: n - 1
                    })
                );
                assert_eq!(
                    verify_consistency::<H>(n, n, &rn, &roots[n as usize - 1], &[]),
                    Err(ProofError::RootsDiffer { size: n })
                );
            }
        }
    }

    #[test]
    fn consistency_proofs_verify_and_nothing_else_sha256() {
        consistency_proofs_verify_and_nothing_else::<Sha256>();
    }

    #[test]
    fn consistency_proofs_verify_and_nothing_else_blake3() {
        consistency_proofs_verify_and_nothing_else::<Blake3>();
    }

    fn frontier_matches<H: TreeHash>() {
        let l = leaves::<H>(MAX);
        let mut f = Frontier::<H>::new();
        assert_eq!(f.root(), H::empty());
        let mut made = HashMap::new();
        for n in 1..=MAX {
            let out = f.push(l[n as usize - 1]);
            assert_eq!(out[0], (0, n - 1, l[n as usize - 1]), "the leaf first");
            for (level, index, d) in out {
                assert!(made.insert((level, index), d).is_none(), "made once");
            }
            assert_eq!(f.size(), n);
            assert_eq!(f.root(), root::<H>(&l[..n as usize]), "size {n}");
            assert_eq!(made, all_nodes::<H>(&l[..n as usize]), "size {n}");
            assert_eq!(f.peaks().len(), n.count_ones() as usize);
            for (p, level) in f.peaks().iter().zip(f.peak_levels()) {
                let before: u64 = f
                    .peak_levels()
                    .iter()
                    .filter(|&&x| x > level)
                    .map(|x| 1u64 << x)
                    .sum();
                assert_eq!(made[&(level, before >> level)], *p);
            }
            // The stored nodes alone give the same peaks.
            assert_eq!(
                peaks_from::<H, _>(&all_nodes::<H>(&l[..n as usize]), n).as_deref(),
                Some(f.peaks())
            );
            // Rebuilt from its parts, it continues identically.
            let mut g = Frontier::<H>::from_parts(f.size(), f.peaks().to_vec()).unwrap();
            assert_eq!(g, f);
            let mut h = f.clone();
            for k in n..MAX {
                let leaf = l[k as usize];
                assert_eq!(g.push(leaf), h.push(leaf));
                assert_eq!(g.root(), h.root());
            }
            assert_eq!(g.root(), root::<H>(&l));
            assert!(
                Frontier::<H>::from_parts(n, vec![[0; 32]; n.count_ones() as usize + 1]).is_none()
            );
        }
        assert!(Frontier::<H>::from_parts(0, vec![]).is_some());
        assert!(Frontier::<H>::from_parts(0, vec![[0; 32]]).is_none());
        assert!(Frontier::<H>::from_parts(3, vec![[0; 32]]).is_none());
    }

    #[test]
    fn frontier_matches_the_tree_sha256() {
        frontier_matches::<Sha256>();
    }

    #[test]
    fn frontier_matches_the_tree_blake3() {
        frontier_matches::<Blake3>();
    }

    /// A tree of any size whose leaves are all the same: the node at level `l` is the same
    /// everywhere, so every stored node of a 2^40-leaf tree is at hand.
    struct Uniform(Vec<Digest>);

    impl Uniform {
        fn new<H: TreeHash>() -> Self {
            let mut v = vec![H::leaf(b"same")];
            for l in 1..64 {
                let c = v[l - 1];
                v.push(H::node(&c, &c));
            }
            Self(v)
        }
    }

    impl Nodes for Uniform {
        fn node(&self, level: u32, _index: u64) -> Option<Digest> {
            self.0.get(level as usize).copied()
        }
    }

    #[test]
    fn huge_trees_stay_small() {
        let u = Uniform::new::<Blake3>();
        let leaf = u.0[0];
        let sizes = [
            (1u64 << 40) - 1,
            1 << 40,
            (1 << 40) + 1,
            (1 << 40) + 12345,
            (1 << 41) - 3,
            u64::MAX / 2,
            u64::MAX,
        ];
        for &size in &sizes {
            let rec = Recorder::default();
            root_from::<Blake3, _>(&rec, size).unwrap();
            assert_eq!(rec.requests().len(), size.count_ones() as usize);
            let r = root_from::<Blake3, _>(&u, size).unwrap();
            let peaks: Vec<Digest> = (0..64)
                .rev()
                .filter(|l| size >> l & 1 == 1)
                .map(|l| u.0[l as usize])
                .collect();
            assert_eq!(
                Frontier::<Blake3>::from_parts(size, peaks).unwrap().root(),
                r
            );
            for index in [0, 1, size / 3, size / 2, size - 2, size - 1] {
                let rec = Recorder::default();
                inclusion_proof_from::<Blake3, _>(&rec, index, size).unwrap();
                assert!(rec.requests().len() <= 2 * 64);
                let p = inclusion_proof_from::<Blake3, _>(&u, index, size).unwrap();
                assert_eq!(p.len(), inclusion_len(index, size));
                assert_eq!(
                    verify_inclusion::<Blake3>(index, size, &leaf, &p, &r),
                    Ok(())
                );
            }
            for old in [1, 2, 3, size / 2 + 1, size - 1, size] {
                let old_root = root_from::<Blake3, _>(&u, old).unwrap();
                let rec = Recorder::default();
                consistency_proof_from::<Blake3, _>(&rec, old, size).unwrap();
                assert!(rec.requests().len() <= 2 * 64);
                let p = consistency_proof_from::<Blake3, _>(&u, old, size).unwrap();
                assert_eq!(
                    verify_consistency::<Blake3>(old, size, &old_root, &r, &p),
                    Ok(())
                );
            }
        }
    }

    #[test]
    fn hash_functions_separate_leaves_from_nodes() {
        // RFC 6962's SHA-256 of the empty string, and BLAKE3's.
        assert_eq!(
            hex::encode(Sha256::empty()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Blake3::empty(), *blake3::hash(b"").as_bytes());
        let a = Blake3::leaf(b"a");
        let b = Blake3::leaf(b"b");
        let mut cat = a.to_vec();
        cat.extend_from_slice(&b);
        assert_ne!(Blake3::node(&a, &b), Blake3::leaf(&cat));
        assert_ne!(Blake3::node(&a, &b), Blake3::node(&b, &a));
        let mut input = vec![1u8];
        input.extend_from_slice(&cat);
        assert_eq!(Blake3::node(&a, &b), *blake3::hash(&input).as_bytes());
        assert_eq!(event_leaf(&a), Blake3::leaf(&a));
        assert_ne!(Sha256::leaf(b""), Sha256::empty());
    }

    #[test]
    fn recorder_asks_once_per_node() {
        let rec = Recorder::default();
        let _ = root_from::<Sha256, _>(&rec, 7);
        let _ = root_from::<Sha256, _>(&rec, 7);
        assert_eq!(rec.requests(), vec![(0, 6), (1, 2), (2, 0)]);
        let rec = Recorder::default();
        assert_eq!(root_from::<Sha256, _>(&rec, 0), Some(Sha256::empty()));
        assert!(rec.requests().is_empty());
    }
}
