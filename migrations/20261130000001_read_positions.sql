-- Read positions: the highest seq a user marked read in a session (MarkMessageRead,
-- MarkSessionRead). The live read seqs are in Redis, moved also by the user's own messages;
-- when Redis loses them a user's read seq is rebuilt as the larger of this and the seq of the
-- user's newest own message in the session. One row per (user, session) that was ever read,
-- written by the reader's commands only: nothing here is on the writer's insert path.
CREATE TABLE IF NOT EXISTS read_positions (
    tenant_id  TEXT        NOT NULL,
    session_id TEXT        NOT NULL,
    user_id    TEXT        NOT NULL,
    read_seq   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, session_id, user_id)
);
