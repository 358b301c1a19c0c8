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

-- Empty copies with the unique indexes only; the secondary ones are built at the end.
CREATE TABLE write_floor.indexes AS
SELECT c.relname AS tbl, i.indisunique AS is_unique,
       regexp_replace(replace(pg_get_indexdef(i.indexrelid), ' ON public.', ' ON write_floor.'),
                      '^CREATE (UNIQUE )?INDEX \S+ ', 'CREATE \1INDEX ') AS def
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
WHERE c.relnamespace = 'public'::regnamespace
  AND c.relname IN ('organizations', 'users', 'roles', 'role_permissions', 'user_roles',
                    'api_keys', 'audit_events', 'conversations', 'conversation_participants',
                    'messages', 'message_attachments', 'message_reactions', 'message_reads');
DO $$
DECLARE t text; d text;
BEGIN
  FOR t IN SELECT DISTINCT tbl FROM write_floor.indexes LOOP
    EXECUTE format('CREATE TABLE write_floor.%I (LIKE public.%I INCLUDING DEFAULTS)', t, t);
  END LOOP;
  FOR d IN SELECT def FROM write_floor.indexes WHERE is_unique LOOP
    EXECUTE d;
  END LOOP;
END $$;

-- The rows, one table after another (the largest first), on one connection.
SELECT now() AS rows_started \gset
INSERT INTO write_floor.audit_events SELECT * FROM public.audit_events;
INSERT INTO write_floor.messages SELECT * FROM public.messages;
INSERT INTO write_floor.message_reads SELECT * FROM public.message_reads;
INSERT INTO write_floor.message_reactions SELECT * FROM public.message_reactions;
INSERT INTO write_floor.message_attachments SELECT * FROM public.message_attachments;
INSERT INTO write_floor.users SELECT * FROM public.users;
INSERT INTO write_floor.api_keys SELECT * FROM public.api_keys;
INSERT INTO write_floor.user_roles SELECT * FROM public.user_roles;
INSERT INTO write_floor.roles SELECT * FROM public.roles;
INSERT INTO write_floor.role_permissions SELECT * FROM public.role_permissions;
INSERT INTO write_floor.conversations SELECT * FROM public.conversations;
INSERT INTO write_floor.conversation_participants SELECT * FROM public.conversation_participants;
INSERT INTO write_floor.organizations SELECT * FROM public.organizations;
SELECT round(extract(epoch FROM clock_timestamp() - :'rows_started'::timestamptz)::numeric, 1)
  AS rows_seconds;

-- The finish: secondary indexes, then statistics and visibility maps.
SELECT now() AS finish_started \gset
SET maintenance_work_mem = '256MB';
DO $$
DECLARE d text;
BEGIN
  FOR d IN SELECT def FROM write_floor.indexes WHERE NOT is_unique LOOP
    EXECUTE d;
  END LOOP;
END $$;
VACUUM (ANALYZE) write_floor.audit_events, write_floor.messages, write_floor.message_reads,
  write_floor.message_reactions, write_floor.message_attachments, write_floor.users,
  write_floor.api_keys, write_floor.user_roles, write_floor.roles, write_floor.role_permissions,
  write_floor.conversations, write_floor.conversation_participants, write_floor.organizations;
SELECT round(extract(epoch FROM clock_timestamp() - :'finish_started'::timestamptz)::numeric, 1)
  AS finish_seconds;

-- Reading the log once, in order, as a rebuild does (payloads included; in the server
-- only: nothing is sent to a client or decoded).
SELECT count(*) AS events, pg_size_pretty(sum(pg_column_size(e.*))) AS read
FROM (SELECT * FROM events ORDER BY position) e;

SET client_min_messages = warning;
DROP SCHEMA write_floor CASCADE;
