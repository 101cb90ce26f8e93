-- Search entries gain order terms (common::text_search::order_terms): hashed triples of CJK
-- characters, so a query of three or more of them is looked up by terms that keep their order.
-- `terms_version` says which terms an entry has: 1, the entries written before (no order
-- terms), or 2 with them. It has no default, so an indexer of an earlier version still running
-- during an upgrade fails its inserts and retries (its queue rows stay queued) instead of
-- writing entries a lookup by order terms would miss.
ALTER TABLE message_search ADD COLUMN terms_version SMALLINT NOT NULL DEFAULT 1;
ALTER TABLE message_search ALTER COLUMN terms_version DROP DEFAULT;

-- The entries without order terms, by tenant: a search looks up by order terms only where its
-- tenant has none, which the reader asks of this index (empty on a new database; on an
-- upgraded one it holds the earlier entries until retention drops their months).
CREATE INDEX message_search_without_order_terms ON message_search (tenant_id) WHERE terms_version < 2;

-- partition-messages builds a new partitioned message_search: as in 20261201000003, with the
-- index above.
CREATE OR REPLACE FUNCTION flare_partition_message_search(boundary TIMESTAMPTZ) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    index_name TEXT;
    part       RECORD;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'message_search'::regclass) = 'p' THEN
        RETURN;
    END IF;
    LOCK TABLE message_search IN ACCESS EXCLUSIVE MODE;
    IF EXISTS (SELECT 1 FROM message_search) AND NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'message_search'::regclass AND conname = 'message_search_before_partitioning'
          AND convalidated) THEN
        RAISE EXCEPTION 'message_search has no validated constraint message_search_before_partitioning: run partition-messages again with a larger --margin-days';
    END IF;
    ALTER TABLE message_search RENAME TO message_search_unpartitioned;
    FOR index_name IN SELECT indexname FROM pg_indexes WHERE tablename = 'message_search_unpartitioned' LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', index_name,
                       'message_search_unpartitioned' || substring(index_name FROM length('message_search') + 1));
    END LOOP;
    CREATE TABLE message_search
        (LIKE message_search_unpartitioned INCLUDING DEFAULTS INCLUDING STORAGE INCLUDING COMPRESSION)
        PARTITION BY RANGE ("timestamp");
    ALTER TABLE message_search ADD CONSTRAINT message_search_key UNIQUE (tenant_id, message_id, "timestamp");
    CREATE INDEX message_search_terms ON message_search USING GIN (tenant_id, session_id, terms);
    CREATE INDEX message_search_time ON message_search (tenant_id, "timestamp", message_id);
    CREATE INDEX message_search_session_time ON message_search (tenant_id, session_id, "timestamp", message_id);
    CREATE INDEX message_search_time_brin ON message_search USING BRIN ("timestamp");
    CREATE INDEX message_search_without_order_terms ON message_search (tenant_id) WHERE terms_version < 2;
    IF EXISTS (SELECT 1 FROM message_search_unpartitioned) THEN
        EXECUTE format('ALTER TABLE message_search ATTACH PARTITION message_search_unpartitioned FOR VALUES FROM (MINVALUE) TO (%L)',
                       boundary);
    ELSE
        DROP TABLE message_search_unpartitioned;
    END IF;
    -- An entry's time is its message's: every range messages has a partition for gets one.
    IF (SELECT relkind FROM pg_class WHERE oid = 'messages'::regclass) = 'p' THEN
        FOR part IN SELECT p.partition::text AS name, p.lower_bound, p.upper_bound
                    FROM flare_partitions_of('messages') p WHERE NOT p.detach_pending LOOP
            CONTINUE WHEN EXISTS (SELECT 1 FROM flare_partitions_of('message_search') s
                                  WHERE s.lower_bound < part.upper_bound AND part.lower_bound < s.upper_bound);
            EXECUTE format('CREATE TABLE %I PARTITION OF message_search FOR VALUES FROM (%L) TO (%L)',
                           'message_search' || substring(part.name FROM length('messages') + 1),
                           part.lower_bound, part.upper_bound);
        END LOOP;
    END IF;
    PERFORM flare_ensure_message_partition(boundary);
    PERFORM flare_create_message_partitions(2);
END
$$;
