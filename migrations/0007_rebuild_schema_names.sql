-- A rebuild job's shadow schema name is read back when the job resumes and written into
-- statements as a bare identifier (`DROP SCHEMA ... CASCADE`, `search_path`, table names).
-- Only names `start_job` makes, plain lowercase identifiers, may be recorded, so a row
-- written by other means cannot turn into SQL.
ALTER TABLE projection_rebuilds
    ADD CONSTRAINT projection_rebuilds_shadow_schema_plain
    CHECK (shadow_schema ~ '^ledgerline_rebuild_[a-z0-9_]{1,44}$');
