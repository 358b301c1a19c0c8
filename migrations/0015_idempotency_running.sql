-- The rows of requests still running (src/api/idempotency.rs): an erasure or a message's
-- deletion marks each of them, as it may have read what the destroyed key sealed. Few at a
-- time, among a day of kept answers.
CREATE INDEX idempotency_keys_running ON idempotency_keys (api_key_id) WHERE state = 'running';
