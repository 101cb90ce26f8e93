-- Full-text search apart from the message rows, maintained off the writer's insert.
--
-- The writer's INSERT of a batch also appends each new text or JSON message to search_queue
-- (same statement, same transaction: a stored message is always queued). The indexer
-- (writer/src/search_index.rs) takes queued rows in batches, computes the message's normal-form
-- text and its terms (common/src/text_search.rs: CJK characters and pairs, trigrams of other
-- words) and writes message_search; its transaction deletes what it took, so a crash puts the
-- batch back. Recalls, burn wipes, deletes and retention remove a message's search row.
-- Messages stored before this version are queued as `backfill`, which the indexer takes only
-- when no new message waits, so new messages are findable at once during the catch-up.
--
-- A search reads the newest entries in time order, then looks up its terms in the GIN index of
-- (tenant_id, session_id, terms) — the session is there for searches within one conversation —
-- and checks the exact
-- substring on normal_text, then reads the message row for every other condition: nothing gone
-- is returned even where the search row is still there.
CREATE EXTENSION IF NOT EXISTS btree_gin;

CREATE TABLE IF NOT EXISTS search_queue (
    id          BIGSERIAL   PRIMARY KEY,
    tenant_id   TEXT        NOT NULL,
    message_id  TEXT        NOT NULL,
    "timestamp" TIMESTAMPTZ NOT NULL,
    queued_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    backfill    BOOLEAN     NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS search_queue_live ON search_queue (id) WHERE NOT backfill;
CREATE INDEX IF NOT EXISTS search_queue_backfill ON search_queue (id) WHERE backfill;

CREATE TABLE IF NOT EXISTS message_search (
    tenant_id   TEXT        NOT NULL,
    message_id  TEXT        NOT NULL,
    session_id  TEXT        NOT NULL,
    "timestamp" TIMESTAMPTZ NOT NULL,
    terms       TEXT[]      NOT NULL,
    normal_text TEXT        NOT NULL,
    PRIMARY KEY (tenant_id, message_id)
);

CREATE INDEX IF NOT EXISTS message_search_terms ON message_search USING GIN (tenant_id, session_id, terms);
-- A search first reads the newest entries of a tenant or a session in time order.
CREATE INDEX IF NOT EXISTS message_search_time ON message_search (tenant_id, "timestamp", message_id);
CREATE INDEX IF NOT EXISTS message_search_session_time
    ON message_search (tenant_id, session_id, "timestamp", message_id);
-- Retention finds old search rows by time.
CREATE INDEX IF NOT EXISTS message_search_time_brin ON message_search USING BRIN ("timestamp");

-- Writers of an earlier version write content_text, which goes below: from here until this
-- transaction commits they wait, and then fail and retry until replaced, losing nothing. So
-- every message they stored is in the backfill, and none is stored without being queued.
LOCK TABLE messages IN SHARE ROW EXCLUSIVE MODE;

-- Messages stored before this version are indexed like new ones, by the same rule as the
-- writer's INSERT (text and JSON content, not recalled), after any new message.
INSERT INTO search_queue (tenant_id, message_id, "timestamp", backfill)
SELECT tenant_id, message_id, "timestamp", true FROM messages
WHERE content_type IN ('text', 'json') AND NOT is_recalled AND deleted_at IS NULL
ORDER BY "timestamp" DESC;

-- The trigram index and its column were the insert's largest cost.
DROP INDEX IF EXISTS messages_content_trgm;
ALTER TABLE messages DROP COLUMN IF EXISTS content_text;
