-- Rebuild jobs (`ledgerline projections rebuild`): read models are rebuilt from the log into
-- a shadow schema while the live tables keep serving, then swapped in by one transaction.
-- A job and its per-projection positions commit with every batch it applies, so a job
-- killed at any point resumes where it stopped.

CREATE TABLE projection_rebuilds
(
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The projections rebuilt, by stable name, sorted.
    projections     text[]      NOT NULL,
    -- Where the new tables are built: `ledgerline_rebuild_<id>`.
    shadow_schema   text        NOT NULL UNIQUE,
    -- The ledger head the job is working towards; moved on when events arrive meanwhile.
    target_position bigint      NOT NULL,
    status          text        NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'swapped', 'abandoned')),
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

-- One job at a time: two jobs would race to swap the same tables.
CREATE UNIQUE INDEX projection_rebuilds_one_running ON projection_rebuilds ((true))
    WHERE status = 'running';

CREATE TABLE projection_rebuild_progress
(
    rebuild_id bigint      NOT NULL REFERENCES projection_rebuilds (id),
    name       text        NOT NULL,
    -- The last position applied to this projection's shadow tables.
    position   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rebuild_id, name)
);
