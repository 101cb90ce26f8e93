-- Every stored message of every tenant.
--
-- Identity is (tenant_id, message_id, "timestamp"): TimescaleDB requires every unique index of a
-- hypertable to contain the partitioning column, so message_id alone cannot be the key. The
-- writer derives "timestamp" deterministically (the message's own time, else the Kafka record
-- time), so a redelivered message hits the same key and ON CONFLICT DO NOTHING keeps it once.
-- GetMessage by id uses the primary key's (tenant_id, message_id) prefix.
--
-- The columns carry what is queried or changed after the write; payload keeps the protobuf
-- Message exactly as first stored (attachments, mentions, audit, timeline...), and readers
-- overlay the columns on it.
CREATE TABLE IF NOT EXISTS messages (
    tenant_id          TEXT        NOT NULL DEFAULT '',
    message_id         TEXT        NOT NULL,
    session_id         TEXT        NOT NULL,
    seq                BIGINT,
    sender_id          TEXT        NOT NULL DEFAULT '',
    sender_type        TEXT        NOT NULL DEFAULT '',
    receiver_id        TEXT        NOT NULL DEFAULT '',
    receiver_ids       TEXT[]      NOT NULL DEFAULT '{}',
    content            BYTEA,
    content_type       TEXT        NOT NULL DEFAULT '',
    message_type       INT         NOT NULL DEFAULT 0,
    business_type      TEXT        NOT NULL DEFAULT '',
    session_type       TEXT        NOT NULL DEFAULT '',
    status             TEXT        NOT NULL DEFAULT '',
    "timestamp"        TIMESTAMPTZ NOT NULL,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at         TIMESTAMPTZ,
    is_recalled        BOOLEAN     NOT NULL DEFAULT false,
    recalled_at        TIMESTAMPTZ,
    is_burn_after_read BOOLEAN     NOT NULL DEFAULT false,
    burn_after_seconds INT         NOT NULL DEFAULT 0,
    extra              JSONB       NOT NULL DEFAULT '{}',
    tags               TEXT[]      NOT NULL DEFAULT '{}',
    attributes         JSONB       NOT NULL DEFAULT '{}',
    payload            BYTEA       NOT NULL,
    PRIMARY KEY (tenant_id, message_id, "timestamp")
);

-- Session history, newest first, with message_id as the keyset tie-breaker.
CREATE INDEX IF NOT EXISTS messages_tenant_session_time
    ON messages (tenant_id, session_id, "timestamp" DESC, message_id DESC);
CREATE INDEX IF NOT EXISTS messages_tenant_sender_time
    ON messages (tenant_id, sender_id, "timestamp" DESC);
CREATE INDEX IF NOT EXISTS messages_session_time
    ON messages (session_id, "timestamp" DESC);

-- TimescaleDB, where the server has it: a hypertable on "timestamp" with one-month chunks.
-- A hypertable cannot hold a unique index without "timestamp", so only a plain table also
-- enforces (tenant_id, message_id) alone (an upstream resend with a new timestamp stays one
-- row) and per-session seq uniqueness; on a hypertable those indexes only serve lookups and
-- the writer's idempotency marker and seq assignment are the guard.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        PERFORM create_hypertable('messages', 'timestamp',
            chunk_time_interval => INTERVAL '1 month',
            if_not_exists => TRUE,
            migrate_data => TRUE);
        CREATE INDEX IF NOT EXISTS messages_tenant_session_seq
            ON messages (tenant_id, session_id, seq);
    ELSE
        CREATE UNIQUE INDEX IF NOT EXISTS messages_tenant_message
            ON messages (tenant_id, message_id);
        CREATE UNIQUE INDEX IF NOT EXISTS messages_tenant_session_seq
            ON messages (tenant_id, session_id, seq) WHERE seq IS NOT NULL;
    END IF;
END
$$;
