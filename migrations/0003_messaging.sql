-- Messaging: conversations and their participants, messages with their attachments,
-- reactions and read marks, as the `messaging` projection derives them from the Conversation
-- and Message aggregates. The rules of 0002 hold: every row can be rebuilt from the ledger,
-- no foreign keys between read models, times are the `recorded_at` of the events that set
-- them, `version` is the sequence of the aggregate's last event. `message_keys` is the
-- exception: like `subject_keys` it lives outside the log and is never rebuilt.

-- `version` is the Conversation aggregate's own: posts are events of Message aggregates and
-- leave it alone, so a message command guarded by the conversation's version (membership,
-- archive state) is not refused because someone else posted in between.
-- `message_count` counts messages posted and not deleted; unread counts are computed at read
-- time from `conversation_participants.last_read_position`, so a post updates one row here
-- and none per participant.
CREATE TABLE conversations
(
    id              uuid PRIMARY KEY,
    organization_id uuid        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('direct', 'group', 'channel')),
    title           text,
    description     text,
    created_by      uuid        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('active', 'archived')),
    archived_at     timestamptz,
    last_message_at timestamptz,
    message_count   bigint      NOT NULL DEFAULT 0 CHECK (message_count >= 0),
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    version         bigint      NOT NULL,
    CHECK ((status = 'archived') = (archived_at IS NOT NULL))
);
-- An organization's conversations, most recently active first (id breaks ties for keyset
-- pagination).
CREATE INDEX conversations_organization_activity
    ON conversations (organization_id, last_message_at DESC NULLS LAST, id);

-- A participant has read everything up to `last_read_position` (a message's `position`);
-- it only moves forward.
CREATE TABLE conversation_participants
(
    conversation_id      uuid        NOT NULL,
    user_id              uuid        NOT NULL,
    organization_id      uuid        NOT NULL,
    role                 text        NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    muted                boolean     NOT NULL DEFAULT false,
    joined_at            timestamptz NOT NULL,
    last_read_message_id uuid,
    last_read_position   bigint      NOT NULL DEFAULT 0,
    last_read_at         timestamptz,
    PRIMARY KEY (conversation_id, user_id)
);
-- A user's conversations.
CREATE INDEX conversation_participants_user ON conversation_participants (user_id, conversation_id);

-- `position` is the ledger position of the message's MessagePosted event: the order of a
-- conversation and its pagination cursor. Content is sealed under the message's own key
-- (`message_keys`); deletion clears it, and the schema refuses any other combination.
CREATE TABLE messages
(
    id                uuid PRIMARY KEY,
    conversation_id   uuid        NOT NULL,
    organization_id   uuid        NOT NULL,
    author_id         uuid        NOT NULL,
    parent_message_id uuid,
    thread_root_id    uuid,
    content_sealed    text,
    message_type      text        NOT NULL DEFAULT 'text',
    position          bigint      NOT NULL,
    created_at        timestamptz NOT NULL,
    edited_at         timestamptz,
    deleted_at        timestamptz,
    deleted_by        uuid,
    version           bigint      NOT NULL,
    CHECK ((deleted_at IS NULL) = (content_sealed IS NOT NULL))
);
-- Unique, unlike the slug index of 0002: that uniqueness is a domain rule enforced at write
-- time elsewhere, whereas a position is the ledger's own key, held by exactly one event, so
-- two messages can share it only if one event were applied twice. The index can only ever
-- stop the projection on a real inconsistency, and it tells readers the cursor is a total
-- order. Descending: pages are read newest first.
-- It also carries what an unread count filters on, so counting is an index-only scan.
CREATE UNIQUE INDEX messages_conversation_position ON messages (conversation_id, position DESC)
    INCLUDE (author_id, deleted_at);
CREATE INDEX messages_thread ON messages (thread_root_id, position) WHERE thread_root_id IS NOT NULL;

-- What the poster described; ledgerline keeps no files. The name is sealed under the
-- message's key and cleared when the message is deleted.
CREATE TABLE message_attachments
(
    message_id       uuid        NOT NULL,
    ordinal          int         NOT NULL CHECK (ordinal >= 0),
    organization_id  uuid        NOT NULL,
    file_name_sealed text,
    mime_type        text        NOT NULL,
    size_bytes       bigint      NOT NULL CHECK (size_bytes >= 0),
    blake3           text        NOT NULL CHECK (blake3 ~ '^[0-9a-f]{64}$'),
    created_at       timestamptz NOT NULL,
    PRIMARY KEY (message_id, ordinal)
);

-- One reaction per user, message and emoji.
CREATE TABLE message_reactions
(
    message_id      uuid        NOT NULL,
    user_id         uuid        NOT NULL,
    emoji           text        NOT NULL,
    conversation_id uuid        NOT NULL,
    organization_id uuid        NOT NULL,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (message_id, user_id, emoji)
);

-- Read receipts: when each user marked each message read.
CREATE TABLE message_reads
(
    message_id      uuid        NOT NULL,
    user_id         uuid        NOT NULL,
    conversation_id uuid        NOT NULL,
    read_at         timestamptz NOT NULL,
    PRIMARY KEY (message_id, user_id)
);

-- Not a read model. Each message's content is sealed under a data key of its own, wrapped by
-- its author's user data key and written here by the service layer. Deleting a row is
-- crypto-shredding: the projection does it when the message is deleted or its author erased,
-- and a rebuild never truncates this table.
CREATE TABLE message_keys
(
    message_id      uuid PRIMARY KEY,
    author_id       uuid        NOT NULL,
    organization_id uuid        NOT NULL,
    wrapped_key     bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX message_keys_author ON message_keys (author_id);

INSERT INTO permissions (name, description)
VALUES ('conversations:read',
        'Read conversations and messages: a user key its own, a service key all'),
       ('conversations:write',
        'Create and manage conversations; post, edit, delete and react to messages');
