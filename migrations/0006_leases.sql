-- Leases: which process runs each background job when several `ledgerline serve` processes
-- share one database. `projection:<name>` is held by the one process that runs that
-- projection's batches; `log-maintainer` by the one that integrates the Merkle tree and
-- signs checkpoints. Times are the database's clock only, so process clocks never matter:
-- a lease is free once `expires_at` has passed, and its holder renews it well before.
CREATE TABLE leases
(
    name        text        PRIMARY KEY,
    -- `hostname:pid:random`, unique per process start.
    holder      text        NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
