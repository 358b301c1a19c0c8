-- Every read-model row names its tenant, as the log partitioned by organization (Citus,
-- docs/scaling.md) needs of every table it distributes: message_reads and role_permissions
-- were the two without it. Filled from the rows they belong to (a receipt is only ever
-- written for a message that exists, a role's permissions only while the role does), then
-- required, so that a row without its parent stops the migration rather than pass unnoticed.
ALTER TABLE message_reads ADD COLUMN organization_id uuid;
UPDATE message_reads r SET organization_id = m.organization_id
    FROM messages m WHERE m.id = r.message_id;
ALTER TABLE message_reads ALTER COLUMN organization_id SET NOT NULL;

ALTER TABLE role_permissions ADD COLUMN organization_id uuid;
UPDATE role_permissions p SET organization_id = r.organization_id
    FROM roles r WHERE r.id = p.role_id;
ALTER TABLE role_permissions ALTER COLUMN organization_id SET NOT NULL;
