-- The audit view filters by the acting key (`?actor_key=`): what a leaked service key did is
-- asked of its key id, as a service key acts for no user. Ends in position, as 0002's
-- filters do, so that a keyset page (position beyond the cursor) starts where the index's
-- range does. Built in the migration's transaction: the audit_events projection waits for
-- it (reads go on), as for 0011's indexes.
CREATE INDEX audit_events_actor_key ON audit_events (organization_id, actor_key_id, position);
