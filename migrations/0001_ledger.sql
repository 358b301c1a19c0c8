-- The ledger: postgres-es's `events` table layout, extended with a gap-free global position,
-- the tenant, the commit time and the BLAKE3 hash chain. See docs/ledger-format.md.
CREATE TABLE events
(
    aggregate_type  text                         NOT NULL,
    aggregate_id    text                         NOT NULL,
    sequence        bigint CHECK (sequence >= 0) NOT NULL,
    event_type      text                         NOT NULL,
    event_version   text                         NOT NULL,
    -- `json`, not `jsonb`: the exact bytes written are the bytes hashed and read back.
    payload         json                         NOT NULL,
    metadata        json                         NOT NULL,
    position        bigint                       NOT NULL CHECK (position >= 1),
    organization_id uuid,
    recorded_at     timestamptz                  NOT NULL,
    prev_hash       bytea                        NOT NULL CHECK (length(prev_hash) = 32),
    hash            bytea                        NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE UNIQUE INDEX events_position ON events (position);
CREATE INDEX events_organization_position ON events (organization_id, position);

-- Second line of defence: the log is append-only for every role that does not bypass
-- triggers. A superuser can still disable them; `ledgerline verify` catches what follows.
CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % on events is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER events_no_update_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- Cross-aggregate uniqueness (names, slugs, e-mail blind indexes, key prefixes), taken and
-- released in the same transaction as the events that imply them.
CREATE TABLE unique_claims
(
    scope      text        NOT NULL,
    key        text        NOT NULL,
    owner      text        NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);

-- Per-subject data keys for sealed personal data, wrapped by the operator's master key.
-- They live outside the log on purpose: deleting a row is crypto-shredding.
CREATE TABLE subject_keys
(
    subject_id      uuid PRIMARY KEY,
    organization_id uuid,
    wrapped_key     bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- One checkpoint per projection: the last position applied, advanced in the same
-- transaction as the read-model changes it covers.
CREATE TABLE projection_checkpoints
(
    name       text PRIMARY KEY,
    position   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- A projection that fails on an event stops there and records why.
CREATE TABLE projection_failures
(
    name      text        NOT NULL,
    position  bigint      NOT NULL,
    error     text        NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, position)
);
