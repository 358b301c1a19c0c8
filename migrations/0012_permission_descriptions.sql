-- The catalogue says what each permission grants, as ledgerline_aggregates::Permission does.
-- 0002 described `organizations:write` as "Update, suspend and reactivate the organization",
-- but suspending and reactivating are the platform operator's acts (`platform:admin`); and
-- `keys:write` as "Issue, revoke and rotate API keys", without the limits a key meets.
UPDATE permissions
SET description = 'Update the organization''s profile (suspending and reactivating it needs platform:admin)'
WHERE name = 'organizations:write';
UPDATE permissions
SET description = 'Issue, revoke and rotate API keys: a user key only its own user''s, and a key revokes or rotates only keys listing no more than it holds'
WHERE name = 'keys:write';
