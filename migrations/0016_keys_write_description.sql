-- `keys:write` said a key revokes only keys listing no more than it holds, but a user key
-- revokes any key of its own user (`api::api_keys::revoke`): the catalogue says so, as
-- ledgerline_aggregates::Permission does.
UPDATE permissions
SET description = 'Issue, revoke and rotate API keys: a user key only its own user''s, and a key revokes or rotates only keys listing no more than it holds (a user key revokes any of its own user''s)'
WHERE name = 'keys:write';
