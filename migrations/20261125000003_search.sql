-- Full-text search over text content, for Chinese as well as space-separated languages.
--
-- content_text holds the searchable text of a message (text content, or JSON content as
-- written); it is emptied when the message is recalled. pg_trgm's GIN index serves
-- substring searches (ILIKE '%…%') of three characters and more, CJK included where the
-- database's LC_CTYPE is a UTF-8 locale. One- and two-character queries cannot use trigrams;
-- they are answered by scanning the tenant's messages in the requested time range (and
-- session, when given) through the time indexes, so a search should carry that scope.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

ALTER TABLE messages ADD COLUMN IF NOT EXISTS content_text TEXT;

CREATE INDEX IF NOT EXISTS messages_content_trgm
    ON messages USING GIN (content_text gin_trgm_ops);
CREATE INDEX IF NOT EXISTS messages_tenant_time
    ON messages (tenant_id, "timestamp" DESC, message_id DESC);
