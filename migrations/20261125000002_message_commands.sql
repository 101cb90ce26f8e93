-- State changed by the reader's commands after a message is stored.
--
-- For everyone: deleted_at (already in messages), recall, burn-after-read (burned_at: when the
-- content is gone for everyone), read receipts and the operations log.
ALTER TABLE messages
    ADD COLUMN IF NOT EXISTS burned_at  TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS read_by    JSONB NOT NULL DEFAULT '[]',
    ADD COLUMN IF NOT EXISTS operations JSONB NOT NULL DEFAULT '[]';

-- Per user: messages hidden for one user only (DeleteMessageForUser). A row, not a rewrite of
-- the message, so hiding costs the same whatever the session's size.
CREATE TABLE IF NOT EXISTS message_hidden (
    tenant_id  TEXT        NOT NULL,
    session_id TEXT        NOT NULL,
    user_id    TEXT        NOT NULL,
    message_id TEXT        NOT NULL,
    permanent  BOOLEAN     NOT NULL DEFAULT false,
    hidden_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id, message_id)
);
CREATE INDEX IF NOT EXISTS message_hidden_session ON message_hidden (tenant_id, session_id);

-- Per user and session: ClearSession's watermark. Messages at or before cleared_before are
-- gone for that user; clearing a 100k-message session writes one row.
CREATE TABLE IF NOT EXISTS session_clears (
    tenant_id      TEXT        NOT NULL,
    session_id     TEXT        NOT NULL,
    user_id        TEXT        NOT NULL,
    cleared_before TIMESTAMPTZ NOT NULL,
    cleared_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, session_id, user_id)
);
