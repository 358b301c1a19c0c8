-- Every read-model row names its tenant, as the log partitioned by organization (Citus,
-- docs/scaling.md) needs of every table it distributes: message_reads and role_permissions
-- were the two without it. Filled from the rows they belong to (a receipt is only ever
-- written for a message that exists, a role's permissions only while the role does).
-- Nullable for now: servers older than this migration may still be running while it is
-- applied (a rolling deploy), and their inserts do not name the column; a NOT NULL would
-- stop their projections for good. Every server from this one on writes it; a later
-- migration can require it once no older server runs.
ALTER TABLE message_reads ADD COLUMN organization_id uuid;
UPDATE message_reads r SET organization_id = m.organization_id
    FROM messages m WHERE m.id = r.message_id;

ALTER TABLE role_permissions ADD COLUMN organization_id uuid;
UPDATE role_permissions p SET organization_id = r.organization_id
    FROM roles r WHERE r.id = p.role_id;
