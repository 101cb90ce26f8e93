-- Full-text search apart from the message rows, maintained off the writer's insert.
--
-- The writer's INSERT of a batch also appends each new text or JSON message to search_queue
-- (same statement, same transaction: a stored message is always queued). The indexer
-- (writer/src/search_index.rs) takes queued rows in batches, computes the message's normal-form
-- text and its terms (common/src/text_search.rs: CJK characters and pairs, trigrams of other
-- words) and writes message_search; its transaction deletes what it took, so a crash puts the
-- batch back. Recalls, burn wipes, deletes and retention remove a message's search row.
--
-- A search looks up its terms in the GIN index of (tenant_id, terms) and checks the exact
-- substring on normal_text, then reads the message row for every other condition: nothing gone
-- is returned even where the search row is still there.
CREATE EXTENSION IF NOT EXISTS btree_gin;

CREATE TABLE IF NOT EXISTS search_queue (
    id          BIGSERIAL   PRIMARY KEY,
    tenant_id   TEXT        NOT NULL,
    message_id  TEXT        NOT NULL,
    "timestamp" TIMESTAMPTZ NOT NULL,
    queued_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS message_search (
    tenant_id   TEXT        NOT NULL,
    message_id  TEXT        NOT NULL,
    "timestamp" TIMESTAMPTZ NOT NULL,
    terms       TEXT[]      NOT NULL,
    normal_text TEXT        NOT NULL,
    PRIMARY KEY (tenant_id, message_id)
);

CREATE INDEX IF NOT EXISTS message_search_terms ON message_search USING GIN (tenant_id, terms);
-- Retention finds old search rows by time.
CREATE INDEX IF NOT EXISTS message_search_time_brin ON message_search USING BRIN ("timestamp");

-- Messages stored before this version are indexed by the indexer like new ones.
INSERT INTO search_queue (tenant_id, message_id, "timestamp")
SELECT tenant_id, message_id, "timestamp" FROM messages
WHERE content_text IS NOT NULL AND NOT is_recalled AND deleted_at IS NULL
ORDER BY "timestamp";

-- The trigram index and its column were the insert's largest cost. A writer of an earlier
-- version cannot insert once they are gone: it retries until replaced, losing nothing.
DROP INDEX IF EXISTS messages_content_trgm;
ALTER TABLE messages DROP COLUMN IF EXISTS content_text;
