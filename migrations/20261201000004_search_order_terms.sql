-- Search entries gain order terms (common::text_search::order_terms): hashed triples of CJK
-- characters, so a query of three or more of them is looked up by terms that keep their order.
-- `terms_version` says which terms an entry has: 1, the entries written before (unigrams and
-- pairs only), or 2 with order terms. It has no default, so an indexer of an earlier version
-- still running during an upgrade fails its inserts and retries (its queue rows stay queued)
-- instead of writing entries a search by order terms would miss.
ALTER TABLE message_search ADD COLUMN terms_version SMALLINT NOT NULL DEFAULT 1;
ALTER TABLE message_search ALTER COLUMN terms_version DROP DEFAULT;

-- Whether entries without order terms may exist, for the whole database: searches look up
-- by order terms only where none can. Entries written before this migration keep version 1
-- (re-deriving them is not built), so a database that had entries stays searched as before.
CREATE TABLE search_terms_state (
    singleton                   BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    entries_without_order_terms BOOLEAN NOT NULL
);
INSERT INTO search_terms_state (entries_without_order_terms)
SELECT EXISTS (SELECT 1 FROM message_search);
