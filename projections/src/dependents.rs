//! What hangs on the live read-model tables besides what the migrations made, which a
//! rebuild's swap (drop the live tables, move the copies into their place) cannot keep.
//!
//! Objects that depend on a table (a view, a materialized view, another relation's rule, a
//! foreign key of another table, a function with a SQL body, a table inheriting it) make
//! the swap's `DROP TABLE` fail, after all the job's work; publications, triggers, policies,
//! rules and statistics objects of the table go with it without a word (a publication's
//! subscribers would keep the old rows besides: logical replication does not carry a
//! swap). A job refuses to start while any is there, naming them, and the swap looks again
//! under its locks. Comments are carried over instead ([`comment_statements`]): simple, and
//! nothing reads them but people. So are the tables' own settings, which `CREATE TABLE ...
//! (LIKE ... INCLUDING ALL)` leaves behind: storage parameters and columns' statistics
//! targets ([`storage_statements`], given to the copies when made, so that the build writes
//! with them, and again at the swap), and the owner, privileges and replica identity
//! ([`access_statements`], at the swap): without them a rebuild would lock a reporting role
//! out of `audit_events`, or undo an operator's autovacuum tuning of `messages`.

use sqlx::PgConnection;

/// Each object outside the `tables` (in `public`) of a job that depends on them, or would
/// be lost with them, described for an operator; none when the swap can go ahead.
pub(crate) async fn of_tables(
    conn: &mut PgConnection,
    tables: &[&str],
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "WITH t AS (SELECT oid, reltype, relname, relrowsecurity FROM pg_class \
             WHERE relnamespace = 'public'::regnamespace AND relname = ANY($1) AND relkind = 'r'), \
         found(what) AS ( \
           SELECT CASE WHEN d.classid = 'pg_rewrite'::regclass THEN \
                    (SELECT CASE WHEN r.rulename = '_RETURN' \
                            THEN pg_describe_object('pg_class'::regclass, r.ev_class, 0) \
                            ELSE pg_describe_object(d.classid, d.objid, 0) END \
                     FROM pg_rewrite r WHERE r.oid = d.objid) \
                  ELSE pg_describe_object(d.classid, d.objid, d.objsubid) END \
                  || ' (depends on ' || t.relname || ')' \
           FROM pg_depend d JOIN t ON (d.refclassid = 'pg_class'::regclass AND d.refobjid = t.oid) \
                OR (d.refclassid = 'pg_type'::regclass AND d.refobjid = t.reltype) \
           WHERE d.deptype = 'n' \
           AND NOT (d.classid = 'pg_class'::regclass AND d.objid IN (SELECT oid FROM t)) \
           AND NOT (d.classid = 'pg_constraint'::regclass AND EXISTS (SELECT FROM pg_constraint k \
                    WHERE k.oid = d.objid AND k.conrelid IN (SELECT oid FROM t))) \
           AND NOT (d.classid = 'pg_trigger'::regclass AND EXISTS (SELECT FROM pg_trigger g \
                    WHERE g.oid = d.objid AND g.tgrelid IN (SELECT oid FROM t))) \
           AND NOT (d.classid = 'pg_rewrite'::regclass AND EXISTS (SELECT FROM pg_rewrite r \
                    WHERE r.oid = d.objid AND r.ev_class IN (SELECT oid FROM t))) \
           UNION ALL \
           SELECT format('publication %I (of %s)', pubname, string_agg(tablename::text, ', ' ORDER BY tablename)) \
           FROM pg_publication_tables WHERE schemaname = 'public' AND tablename = ANY($1) \
           GROUP BY pubname \
           UNION ALL \
           SELECT pg_describe_object('pg_trigger'::regclass, g.oid, 0) FROM pg_trigger g \
           WHERE g.tgrelid IN (SELECT oid FROM t) AND NOT g.tgisinternal \
           UNION ALL \
           SELECT pg_describe_object('pg_rewrite'::regclass, r.oid, 0) FROM pg_rewrite r \
           WHERE r.ev_class IN (SELECT oid FROM t) \
           UNION ALL \
           SELECT pg_describe_object('pg_policy'::regclass, p.oid, 0) FROM pg_policy p \
           WHERE p.polrelid IN (SELECT oid FROM t) \
           UNION ALL \
           SELECT 'row-level security on table ' || relname FROM t WHERE relrowsecurity \
           UNION ALL \
           SELECT pg_describe_object('pg_statistic_ext'::regclass, s.oid, 0) \
                  || ' on table ' || s.stxrelid::regclass \
           FROM pg_statistic_ext s WHERE s.stxrelid IN (SELECT oid FROM t)) \
         SELECT DISTINCT what FROM found ORDER BY what",
    )
    .bind(owned(tables))
    .fetch_all(conn)
    .await
}

/// The statements that give the copies in `schema` of `tables`, once moved into `public`,
/// the live tables' comments (on the table, its columns, indexes and constraints; `LIKE`
/// copies only some, and only as they were when the job began): read before the live
/// tables are dropped, run after the copies took their place.
pub(crate) async fn comment_statements(
    conn: &mut PgConnection,
    schema: &str,
    tables: &[&str],
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "WITH t AS (SELECT c.oid, n.nspname, c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname IN ('public', $2) AND c.relname = ANY($1) AND c.relkind = 'r'), \
         said(nspname, kind, tab, sub, description) AS ( \
           SELECT t.nspname, 'TABLE', t.relname, '', d.description FROM t \
           JOIN pg_description d ON d.classoid = 'pg_class'::regclass AND d.objoid = t.oid \
                AND d.objsubid = 0 \
           UNION ALL \
           SELECT t.nspname, 'COLUMN', t.relname, a.attname, d.description FROM t \
           JOIN pg_description d ON d.classoid = 'pg_class'::regclass AND d.objoid = t.oid \
                AND d.objsubid > 0 \
           JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.objsubid \
           UNION ALL \
           SELECT t.nspname, 'INDEX', t.relname, i.relname, d.description FROM t \
           JOIN pg_index x ON x.indrelid = t.oid JOIN pg_class i ON i.oid = x.indexrelid \
           JOIN pg_description d ON d.classoid = 'pg_class'::regclass AND d.objoid = i.oid \
           UNION ALL \
           SELECT t.nspname, 'CONSTRAINT', t.relname, k.conname, d.description FROM t \
           JOIN pg_constraint k ON k.conrelid = t.oid \
           JOIN pg_description d ON d.classoid = 'pg_constraint'::regclass AND d.objoid = k.oid), \
         live AS (SELECT * FROM said WHERE nspname = 'public'), \
         copy AS (SELECT * FROM said WHERE nspname = $2) \
         SELECT CASE kind \
           WHEN 'TABLE' THEN format('COMMENT ON TABLE public.%I IS %L', tab, live.description) \
           WHEN 'COLUMN' THEN format('COMMENT ON COLUMN public.%I.%I IS %L', tab, sub, live.description) \
           WHEN 'INDEX' THEN format('COMMENT ON INDEX public.%I IS %L', sub, live.description) \
           ELSE format('COMMENT ON CONSTRAINT %I ON public.%I IS %L', sub, tab, live.description) END \
         FROM live FULL JOIN copy USING (kind, tab, sub) \
         WHERE live.description IS DISTINCT FROM copy.description ORDER BY 1",
    )
    .bind(owned(tables))
    .bind(schema.to_string())
    .fetch_all(conn)
    .await
}

/// The statements that give the copies in `schema` of `tables` the live tables' storage
/// parameters (`WITH (...)`, their TOAST tables' included) and columns' statistics targets,
/// where they differ, naming each copy as `target.table`: `schema` while the job builds,
/// `public` for the swap, which runs them once the copies have moved there.
pub(crate) async fn storage_statements(
    conn: &mut PgConnection,
    schema: &str,
    tables: &[&str],
    target: &str,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "WITH pair AS ( \
           SELECT l.relname, l.oid AS live, c.oid AS copy \
           FROM pg_class l JOIN pg_class c ON c.relname = l.relname \
           WHERE l.relnamespace = 'public'::regnamespace AND c.relnamespace = $2::regnamespace \
           AND l.relname = ANY($1) AND l.relkind = 'r' AND c.relkind = 'r'), \
         options(oid, list) AS ( \
           SELECT r.oid, coalesce(r.reloptions, '{}') || coalesce(array(SELECT 'toast.' || o \
                    FROM pg_class x, unnest(x.reloptions) o WHERE x.oid = r.reltoastrelid), '{}') \
           FROM pg_class r WHERE r.oid IN (SELECT live FROM pair UNION ALL SELECT copy FROM pair)), \
         differ AS ( \
           SELECT pair.relname, l.list AS live_options, c.list AS copy_options FROM pair \
           JOIN options l ON l.oid = pair.live JOIN options c ON c.oid = pair.copy \
           WHERE l.list <> c.list), \
         step(n, statement) AS ( \
           SELECT 1, format('ALTER TABLE %I.%I RESET (%s)', $3, relname, \
                  (SELECT string_agg(split_part(o, '=', 1), ', ') FROM unnest(copy_options) o)) \
           FROM differ WHERE copy_options <> '{}' \
           UNION ALL \
           SELECT 2, format('ALTER TABLE %I.%I SET (%s)', $3, relname, \
                  (SELECT string_agg(format('%s = %L', split_part(o, '=', 1), \
                                            substr(o, strpos(o, '=') + 1)), ', ') \
                   FROM unnest(live_options) o)) \
           FROM differ WHERE live_options <> '{}' \
           UNION ALL \
           SELECT 3, format('ALTER TABLE %I.%I ALTER COLUMN %I SET STATISTICS %s', $3, \
                            pair.relname, l.attname, l.attstattarget) \
           FROM pair JOIN pg_attribute l ON l.attrelid = pair.live \
           JOIN pg_attribute c ON c.attrelid = pair.copy AND c.attname = l.attname \
           WHERE l.attnum > 0 AND NOT l.attisdropped AND l.attstattarget <> c.attstattarget) \
         SELECT statement FROM step ORDER BY n, statement",
    )
    .bind(owned(tables))
    .bind(schema.to_string())
    .bind(target.to_string())
    .fetch_all(conn)
    .await
}

/// The statements that give the copies in `schema` of `tables`, once moved into `public`,
/// the live tables' privileges (on the table and on its columns), replica identity and
/// owner, read before the live tables are dropped. The grants are made by the role running
/// the swap (a member of the owner's), so they read as granted by the owner, whoever granted
/// them on the live table. Handing a copy to the live owner rewrites its old owner's entries
/// as the new owner's, so the grants to the old owner (the role that made the copies) come
/// after that.
pub(crate) async fn access_statements(
    conn: &mut PgConnection,
    schema: &str,
    tables: &[&str],
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "WITH pair AS ( \
           SELECT l.relname, l.oid AS live, c.oid AS copy, l.relacl AS live_acl, \
                  c.relacl AS copy_acl, l.relowner AS live_owner, c.relowner AS copy_owner, \
                  l.relreplident AS live_identity, c.relreplident AS copy_identity \
           FROM pg_class l JOIN pg_class c ON c.relname = l.relname \
           WHERE l.relnamespace = 'public'::regnamespace AND c.relnamespace = $2::regnamespace \
           AND l.relname = ANY($1) AND l.relkind = 'r' AND c.relkind = 'r'), \
         who(oid, name) AS ( \
           SELECT 0::oid, 'PUBLIC' UNION ALL SELECT oid, quote_ident(rolname) FROM pg_roles), \
         granted(live_owner, copy_owner, grantee, statement) AS ( \
           SELECT live_owner, copy_owner, a.grantee, \
                  format('GRANT %s ON public.%I TO %s%s', a.privilege_type, relname, who.name, \
                         CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END) \
           FROM pair, aclexplode(live_acl) a JOIN who ON who.oid = a.grantee \
           WHERE a.grantee <> live_owner \
           UNION ALL \
           SELECT live_owner, copy_owner, a.grantee, \
                  format('GRANT %s (%I) ON public.%I TO %s%s', a.privilege_type, att.attname, \
                         relname, who.name, \
                         CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END) \
           FROM pair JOIN pg_attribute att ON att.attrelid = pair.live AND att.attnum > 0 \
                AND NOT att.attisdropped, \
                aclexplode(att.attacl) a JOIN who ON who.oid = a.grantee), \
         step(n, statement) AS ( \
           SELECT 1, format('REVOKE ALL ON public.%I FROM %s', relname, who.name) \
           FROM pair, aclexplode(copy_acl) a JOIN who ON who.oid = a.grantee \
           WHERE a.grantee <> copy_owner \
           UNION \
           SELECT 2, statement FROM granted WHERE grantee <> copy_owner OR live_owner = copy_owner \
           UNION ALL \
           SELECT 3, format('ALTER TABLE public.%I REPLICA IDENTITY %s', relname, \
                            CASE live_identity WHEN 'd' THEN 'DEFAULT' WHEN 'f' THEN 'FULL' \
                              WHEN 'n' THEN 'NOTHING' \
                              ELSE (SELECT format('USING INDEX %I', i.relname) FROM pg_index x \
                                    JOIN pg_class i ON i.oid = x.indexrelid \
                                    WHERE x.indrelid = pair.live AND x.indisreplident) END) \
           FROM pair WHERE live_identity <> copy_identity \
           UNION ALL \
           SELECT 4, format('ALTER TABLE public.%I OWNER TO %s', relname, who.name) \
           FROM pair JOIN who ON who.oid = live_owner WHERE live_owner <> copy_owner \
           UNION ALL \
           SELECT 5, statement FROM granted WHERE grantee = copy_owner AND live_owner <> copy_owner) \
         SELECT statement FROM step ORDER BY n, statement",
    )
    .bind(owned(tables))
    .bind(schema.to_string())
    .fetch_all(conn)
    .await
}

/// Bound by value: a borrowed bind makes the rebuild's future one that cannot be sent to
/// another thread ("implementation of `Send` is not general enough").
fn owned(tables: &[&str]) -> Vec<String> {
    tables.iter().map(|t| t.to_string()).collect()
}
