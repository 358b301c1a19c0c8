-- Each event's hash format (docs/ledger-format.md, section 3). Events written before this
-- migration are v1 and stay so; the writer writes v2 from now on, whose hash keeps the tenant
-- and the content separable, so that an organization's export can prove that a stub is not
-- one of that organization's own events. The column is not hashed: an event read in a format
-- it was not written in does not match its hash.

-- The first v2 position the log maintainer integrated, which its signed checkpoints state
-- (`hash-v2-from`), so that an export's verifier knows where v1 ends without trusting the
-- exporter. NULL: no v2 event integrated yet. Altered before `events`: a maintainer locks
-- `merkle_state` and then reads `events`, so taking them in the other order could deadlock
-- with one still running.
ALTER TABLE merkle_state ADD COLUMN hash_v2_from bigint CHECK (hash_v2_from >= 1);

-- A constant default adds the column without rewriting the table. The check is NOT VALID so
-- that adding it does not scan the whole log under this lock (every row present holds the
-- default); new rows are checked all the same.
ALTER TABLE events ADD COLUMN hash_version smallint NOT NULL DEFAULT 1;
ALTER TABLE events ADD CONSTRAINT events_hash_version CHECK (hash_version IN (1, 2)) NOT VALID;

-- From here on every event is v2. A process of an older ledgerline still running against
-- this database (which writes v1 hashes and does not know the column) has its appends
-- refused, rather than writing v1 events after v2 ones, which `verify` reports.
CREATE FUNCTION ledger_refuse_old_hash_version() RETURNS trigger LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION 'events are hashed in format v2 since migration 0010: this writer is of an older ledgerline'
        USING ERRCODE = 'object_not_in_prerequisite_state';
END
$$;
CREATE TRIGGER events_hash_version_2
    BEFORE INSERT ON events
    FOR EACH ROW WHEN (NEW.hash_version <> 2) EXECUTE FUNCTION ledger_refuse_old_hash_version();
