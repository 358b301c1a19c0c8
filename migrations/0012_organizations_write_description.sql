-- 0002 described `organizations:write` as "Update, suspend and reactivate the organization",
-- but suspending and reactivating are the platform operator's acts (`platform:admin`): the
-- catalogue says what the permission grants, as ledgerline_aggregates::Permission does.
UPDATE permissions
SET description = 'Update the organization''s profile (suspending and reactivating it needs platform:admin)'
WHERE name = 'organizations:write';
