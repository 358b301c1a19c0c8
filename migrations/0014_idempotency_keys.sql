-- `Idempotency-Key` (src/api/idempotency.rs): a command sent again with the key of one already
-- carried out gets the first one's answer, not a second effect. Numbered 0014, not 0013: another
-- branch was adding a 0013 at the same time; sqlx applies a missing lower version later, and
-- `MigrationMismatch` counts a gap as "not applied", not as a conflict.
--
-- Not a read model (nothing derives it from the log) and not evidence: a cache of answers
-- kept 24 hours, pruned by the API as it inserts.
CREATE TABLE idempotency_keys
(
    -- The API key that sent it: a key is never seen through another API key.
    api_key_id      uuid        NOT NULL,
    key             text        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    -- BLAKE3 of the method, path and query, and body: the same key with another request is
    -- refused (422), naming the method and path it was used for.
    fingerprint     bytea       NOT NULL CHECK (length(fingerprint) = 32),
    method          text        NOT NULL,
    path            text        NOT NULL,
    -- Of the first request: its events carry it, which the audit view filters by.
    request_id      text        NOT NULL,
    -- The ledger head when it began: its events, if any, come after.
    since_position  bigint      NOT NULL,
    state           text        NOT NULL CHECK (state IN ('running', 'done')),
    status          smallint,
    content_type    text,
    -- The answer's body, sealed under a key derived from the master key (it can hold
    -- personal data); NULL once forgotten because a subject it names was erased or deleted.
    body            bytea,
    -- Every id the answer names: an erasure or deletion forgets the answers naming its subject.
    subjects        uuid[]      NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, key),
    CHECK (state = 'running' OR status IS NOT NULL)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
CREATE INDEX idempotency_keys_subjects ON idempotency_keys USING gin (subjects);
