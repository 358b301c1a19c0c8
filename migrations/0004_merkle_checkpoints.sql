-- The Merkle tree over the ledger (RFC 6962 shape, BLAKE3; docs/ledger-format.md) and the
-- signed checkpoints of its heads. Maintained by the log maintainer task, which follows the
-- ledger by position after recomputing each event's hash; like `events`, these tables are
-- written only forward.

-- Every complete subtree of two or more leaves: the node at `level` covers the leaves
-- [idx * 2^level, (idx + 1) * 2^level). Leaves (level 0) are not stored: each is
-- BLAKE3(0x00 || events.hash) of its position.
CREATE TABLE merkle_nodes
(
    level smallint NOT NULL CHECK (level > 0),
    idx   bigint   NOT NULL CHECK (idx >= 0),
    hash  bytea    NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, idx)
);

-- How far the tree has integrated the ledger, and its right frontier (the peaks of the
-- complete subtrees of `size`, largest first), so integration resumes without rereading.
CREATE TABLE merkle_state
(
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    size      bigint  NOT NULL CHECK (size >= 0),
    peaks     bytea[] NOT NULL
);
INSERT INTO merkle_state (size, peaks) VALUES (0, '{}');

-- Signed tree heads in the C2SP tlog-checkpoint format; `note` is the exact signed text.
CREATE TABLE checkpoints
(
    tree_size  bigint PRIMARY KEY CHECK (tree_size > 0),
    root       bytea       NOT NULL CHECK (length(root) = 32),
    chain_head bytea       NOT NULL CHECK (length(chain_head) = 32),
    signed_at  timestamptz NOT NULL,
    note       text        NOT NULL
);
