-- The write floor of a rebuild: how long PostgreSQL takes just to write every row of the
-- read models a rebuild of this log ends with, with nothing computed. Each table is copied
-- from its live read model with one INSERT ... SELECT into an empty copy that has only
-- the unique indexes (as a rebuild's shadow tables have while rows pour in); then its
-- secondary indexes are built and it is vacuumed, as a rebuild's finish does. A rebuild
-- that writes these tables the way ledgerline's does (logged tables, unique indexes kept
-- while rows pour in) cannot be much faster than this on the same server settings,
-- whatever its batching; it does not bound tricks such as unlogged tables or COPY FREEZE.
-- The copies also read their source tables, which a rebuild does not. docs/benchmarks.md
-- compares.
--
--   psql -h 127.0.0.1 -U postgres -d ll_rebuild_1m -f benches/write-floor.sql
--
-- It leaves the live tables alone and drops its scratch schema at the end.
\set ON_ERROR_STOP on
\timing on
DROP SCHEMA IF EXISTS write_floor CASCADE;
CREATE SCHEMA write_floor;

-- The read models' tables and their indexes (the copies' names), largest table first.
CREATE TABLE write_floor.indexes AS
SELECT c.relname AS tbl, pg_total_relation_size(c.oid) AS size, i.indisunique AS is_unique,
       regexp_replace(replace(pg_get_indexdef(i.indexrelid), ' ON public.', ' ON write_floor.'),
                      '^CREATE (UNIQUE )?INDEX \S+ ', 'CREATE \1INDEX ') AS def
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
WHERE c.relnamespace = 'public'::regnamespace
  AND c.relname IN ('organizations', 'users', 'roles', 'role_permissions', 'user_roles',
                    'api_keys', 'audit_events', 'conversations', 'conversation_participants',
                    'messages', 'message_attachments', 'message_reactions', 'message_reads');
CREATE VIEW write_floor.tables AS
SELECT tbl, max(size) AS size FROM write_floor.indexes GROUP BY tbl;

-- Empty copies with the unique indexes only; the secondary ones are built at the end.
SELECT format('CREATE TABLE write_floor.%I (LIKE public.%I INCLUDING DEFAULTS)', tbl, tbl)
FROM write_floor.tables \gexec
SELECT def FROM write_floor.indexes WHERE is_unique \gexec

-- The rows, one table after another (the largest first), on one connection; each
-- statement is timed.
SELECT now() AS rows_started \gset
SELECT format('INSERT INTO write_floor.%I SELECT * FROM public.%I', tbl, tbl)
FROM write_floor.tables ORDER BY size DESC \gexec
SELECT round(extract(epoch FROM clock_timestamp() - :'rows_started'::timestamptz)::numeric, 1)
  AS rows_seconds;

-- The finish: secondary indexes, then statistics and visibility maps.
SELECT now() AS finish_started \gset
SET maintenance_work_mem = '256MB';
SELECT def FROM write_floor.indexes WHERE NOT is_unique ORDER BY size DESC \gexec
SELECT format('VACUUM (ANALYZE) write_floor.%I', tbl)
FROM write_floor.tables ORDER BY size DESC \gexec
SELECT round(extract(epoch FROM clock_timestamp() - :'finish_started'::timestamptz)::numeric, 1)
  AS finish_seconds;

-- Reading the log once, in order, as a rebuild does (payloads included; in the server
-- only: nothing is sent to a client or decoded).
SELECT count(*) AS events, pg_size_pretty(sum(pg_column_size(e.*))) AS read
FROM (SELECT * FROM events ORDER BY position) e;

SET client_min_messages = warning;
DROP SCHEMA write_floor CASCADE;
