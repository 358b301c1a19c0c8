-- Read models: the tables the projections write and the API reads. Every row is derived from
-- the ledger and can be rebuilt from it (`permissions` excepted: it is reference data).
-- No foreign keys between read models: each projection applies the log in order on its own
-- and projections progress independently, so one table may briefly be ahead of another.
-- Times are the `recorded_at` of the events that set them; `version` is the sequence of the
-- aggregate's last event (what optimistic-concurrency checks compare against).

CREATE TABLE organizations
(
    id                uuid PRIMARY KEY,
    name              text        NOT NULL,
    slug              text        NOT NULL,
    country_code      char(2),
    domain            text,
    settings          jsonb       NOT NULL DEFAULT '{}',
    status            text        NOT NULL CHECK (status IN ('active', 'suspended')),
    suspended_at      timestamptz,
    suspension_reason text,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    version           bigint      NOT NULL
);
-- Not unique: uniqueness is enforced at write time by `unique_claims`; a unique index here
-- could only turn a harmless ordering quirk into a stopped projection.
CREATE INDEX organizations_slug ON organizations (slug);

-- Personal data stays sealed; the API opens it with the subject's key. Erasure clears the
-- sealed columns and the blind index, and the schema refuses any other combination.
CREATE TABLE users
(
    id                  uuid PRIMARY KEY,
    organization_id     uuid        NOT NULL,
    email_sealed        text,
    full_name_sealed    text,
    email_blind_index   text,
    status              text        NOT NULL CHECK (status IN ('active', 'deactivated', 'erased')),
    deactivation_reason text,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    deactivated_at      timestamptz,
    erased_at           timestamptz,
    version             bigint      NOT NULL,
    CHECK ((status = 'erased') =
           (email_sealed IS NULL AND full_name_sealed IS NULL AND email_blind_index IS NULL))
);
CREATE INDEX users_organization ON users (organization_id, created_at, id);
CREATE INDEX users_email_blind_index ON users (organization_id, email_blind_index);

CREATE TABLE roles
(
    id              uuid PRIMARY KEY,
    organization_id uuid        NOT NULL,
    name            text        NOT NULL,
    description     text        NOT NULL,
    parent_role_id  uuid,
    is_built_in     boolean     NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    version         bigint      NOT NULL
);
CREATE INDEX roles_organization ON roles (organization_id, name);
CREATE INDEX roles_parent ON roles (parent_role_id) WHERE parent_role_id IS NOT NULL;

-- The fixed catalogue (ledgerline_aggregates::Permission), reference data rather than a
-- projection: it is neither truncated nor rebuilt.
CREATE TABLE permissions
(
    name        text PRIMARY KEY,
    description text NOT NULL
);
INSERT INTO permissions (name, description)
VALUES ('organizations:read', 'Read the organization''s profile'),
       ('organizations:write', 'Update, suspend and reactivate the organization'),
       ('users:read', 'List and read users'),
       ('users:write', 'Invite, update, deactivate and reactivate users'),
       ('users:erase', 'Erase a user''s personal data'),
       ('roles:read', 'List and read roles and role assignments'),
       ('roles:write', 'Create, change and delete roles; assign and revoke them'),
       ('keys:read', 'List and read API keys'),
       ('keys:write', 'Issue, revoke and rotate API keys'),
       ('audit:read', 'Read the audit events'),
       ('ledger:read', 'Read the raw ledger events and hashes'),
       ('platform:admin', 'Operate the whole platform: every permission everywhere');

-- A role's own permissions; inherited ones are resolved at read time through parent_role_id.
CREATE TABLE role_permissions
(
    role_id    uuid NOT NULL,
    permission text NOT NULL REFERENCES permissions (name),
    PRIMARY KEY (role_id, permission)
);

-- The primary key is the seeds' UNIQUE(user_id, role_id) and serves look-ups by user.
-- Expired assignments stay until revoked; readers compare expires_at with the clock.
CREATE TABLE user_roles
(
    user_id             uuid        NOT NULL,
    role_id             uuid        NOT NULL,
    organization_id     uuid        NOT NULL,
    assigned_by_user_id uuid,
    assigned_by_key_id  uuid,
    reason              text,
    expires_at          timestamptz,
    assigned_at         timestamptz NOT NULL,
    PRIMARY KEY (user_id, role_id)
);
CREATE INDEX user_roles_role ON user_roles (role_id);
CREATE INDEX user_roles_organization ON user_roles (organization_id);

-- Only the secret's hash and its visible prefix, never the secret.
CREATE TABLE api_keys
(
    id                uuid PRIMARY KEY,
    organization_id   uuid,
    user_id           uuid,
    label             text        NOT NULL,
    prefix            text        NOT NULL UNIQUE,
    key_hash          text        NOT NULL CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    permissions       text[]      NOT NULL,
    status            text        NOT NULL CHECK (status IN ('active', 'revoked')),
    expires_at        timestamptz,
    created_at        timestamptz NOT NULL,
    revoked_at        timestamptz,
    revocation_reason text,
    rotated_at        timestamptz,
    created_by_key_id uuid,
    version           bigint      NOT NULL
);
CREATE INDEX api_keys_organization ON api_keys (organization_id, created_at, id);
CREATE INDEX api_keys_user ON api_keys (user_id) WHERE user_id IS NOT NULL;

-- One row per ledger event, keyed by its position. event_data is the payload as stored:
-- personal fields stay sealed, so erasing a subject's key also blinds its audit trail.
CREATE TABLE audit_events
(
    position        bigint PRIMARY KEY,
    organization_id uuid,
    actor_kind      text,
    actor_user_id   uuid,
    actor_key_id    uuid,
    event_type      text        NOT NULL,
    event_version   text        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    sequence        bigint      NOT NULL,
    event_data      jsonb       NOT NULL,
    request_id      text,
    client_ip       text,
    user_agent      text,
    recorded_at     timestamptz NOT NULL
);
-- Each filter ends in position so that keyset pagination (position > cursor) stays indexed.
CREATE INDEX audit_events_organization ON audit_events (organization_id, position);
CREATE INDEX audit_events_actor ON audit_events (organization_id, actor_user_id, position);
CREATE INDEX audit_events_type ON audit_events (organization_id, event_type, position);
CREATE INDEX audit_events_aggregate
    ON audit_events (organization_id, aggregate_type, aggregate_id, position);
CREATE INDEX audit_events_recorded_at ON audit_events (organization_id, recorded_at, position);
