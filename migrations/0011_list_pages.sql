-- Keyset pages of the lists (src/api/page.rs): each page starts after the sort key of the
-- previous page's last row, where an index on that order starts its range, instead of
-- reading and sorting every row before it. Users and API keys have theirs since 0002
-- (organization_id, created_at, id).

-- Every organization in order of creation: the platform operator's list.
CREATE INDEX organizations_created ON organizations (created_at, id);

-- An organization's roles in order of creation, names breaking ties.
CREATE INDEX roles_organization_created ON roles (organization_id, created_at, name);

-- An organization's conversations, most recently active first, in the list's exact order:
-- COALESCE puts those without a message last (as NULLS LAST did) in an expression that a
-- row-value comparison can bound; ties go by creation, newest first, then by id. It
-- replaces 0003's index, which lacked created_at, so that a post, which moves
-- last_message_at, still updates one index of this kind rather than two.
DROP INDEX conversations_organization_activity;
CREATE INDEX conversations_organization_recent
    ON conversations (organization_id, COALESCE(last_message_at, '-infinity') DESC,
                      created_at DESC, id);
