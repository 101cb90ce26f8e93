-- message_search, the search side table, partitioned by month on "timestamp" like messages, so
-- retention drops its months whole instead of deleting entries one by one. An entry's time is
-- its message's, so both tables have the same months: one function creates a month's
-- partition of each (where the table is partitioned). A search reads the newest entries of a
-- tenant across months in order (one index descent per month) and asks each month's term index.
--
-- A new database (message_search empty, messages partitioned) is converted here. A table that
-- holds entries stays plain until `flare-storage partition-messages` moves it, as it moves
-- messages: an index on its new key built concurrently, a validated check constraint, one short
-- swap that attaches the old table as the partition of everything before a month boundary.

-- Every partition of a table partitioned by "timestamp" with its bounds (MINVALUE read as
-- -infinity) and whether a concurrent detach of it is unfinished. The bounds are read back
-- from their text, which the date style must not make ambiguous.
CREATE OR REPLACE FUNCTION flare_partitions_of(parent REGCLASS)
RETURNS TABLE (partition REGCLASS, lower_bound TIMESTAMPTZ, upper_bound TIMESTAMPTZ, detach_pending BOOLEAN)
LANGUAGE sql STABLE SET datestyle = 'ISO, MDY' AS $$
    SELECT c.oid::regclass,
           coalesce(substring(b.bound FROM 'FROM \(''([^'']+)''\)')::timestamptz, '-infinity'),
           coalesce(substring(b.bound FROM 'TO \(''([^'']+)''\)')::timestamptz, 'infinity'),
           i.inhdetachpending
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) AS b
    WHERE i.inhparent = parent
$$;

CREATE OR REPLACE FUNCTION flare_message_partitions()
RETURNS TABLE (partition REGCLASS, lower_bound TIMESTAMPTZ, upper_bound TIMESTAMPTZ, detach_pending BOOLEAN)
LANGUAGE sql STABLE AS $$
    SELECT * FROM flare_partitions_of('messages')
$$;

-- Makes sure a partition of messages and one of message_search (each where it is
-- partitioned) hold `at`: where none does, creates the partition of its month (UTC), named
-- <table>_YYYY_MM (<table>_YYYY_MM_bc before the common era); the month that holds PostgreSQL's
-- first instant starts at -infinity, the first day of that month being out of range. A time
-- existing partitions cover (an old table before its boundary included) takes no lock at all.
-- A month's partition is created as a table of its own and then attached, which takes only a
-- SHARE UPDATE EXCLUSIVE lock on the parent: no reader, writer or indexer waits for it, and a
-- search (which locks message_search, then messages) cannot deadlock with it. It waits at most
-- five seconds for that lock (the caller retries); concurrent callers serialise on an advisory
-- lock.
CREATE OR REPLACE FUNCTION flare_ensure_message_partition(at TIMESTAMPTZ) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    local_time  TIMESTAMP := at AT TIME ZONE 'UTC';
    lower_bound TIMESTAMPTZ;
    upper_bound TIMESTAMPTZ := date_trunc('month', local_time + INTERVAL '1 month') AT TIME ZONE 'UTC';
    suffix      TEXT := to_char(local_time, 'YYYY_MM')
                        || CASE WHEN local_time < TIMESTAMP '0001-01-01' THEN '_bc' ELSE '' END;
    parent      TEXT;
    locked      BOOLEAN := false;
BEGIN
    BEGIN
        lower_bound := date_trunc('month', local_time) AT TIME ZONE 'UTC';
    EXCEPTION WHEN datetime_field_overflow THEN
        lower_bound := '-infinity';
    END;
    FOREACH parent IN ARRAY ARRAY['messages', 'message_search'] LOOP
        CONTINUE WHEN (SELECT relkind FROM pg_class WHERE oid = parent::regclass) <> 'p';
        CONTINUE WHEN EXISTS (SELECT 1 FROM flare_partitions_of(parent::regclass) p
                              WHERE p.lower_bound <= at AND at < p.upper_bound);
        IF NOT locked THEN
            PERFORM set_config('lock_timeout', '5s', true);
            PERFORM pg_advisory_xact_lock(hashtext('flare_message_partitions'));
            locked := true;
            CONTINUE WHEN EXISTS (SELECT 1 FROM flare_partitions_of(parent::regclass) p
                                  WHERE p.lower_bound <= at AND at < p.upper_bound);
        END IF;
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION)',
                       parent || '_' || suffix, parent);
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       parent, parent || '_' || suffix, lower_bound, upper_bound);
    END LOOP;
END
$$;

-- Turns the plain message_search table into the partitioned layout in one transaction, as
-- flare_partition_messages does messages: the old table, when it holds entries, becomes the
-- partition of everything before `boundary` — quick only with a validated check constraint
-- (message_search_before_partitioning) and a unique constraint on the new key
-- (message_search_key), which partition-messages builds beforehand: the partitioned table's key
-- is a unique constraint of the same kind, so attaching reuses it rather than building one. Then every range messages
-- has a partition for gets one here too, and the months from `boundary` on.
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

-- A new database: an empty message_search beside a partitioned messages. Locked before it is
-- found empty, so an indexer of an earlier version cannot add an entry in between.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       AND (SELECT relkind FROM pg_class WHERE oid = 'messages'::regclass) = 'p'
       AND (SELECT relkind FROM pg_class WHERE oid = 'message_search'::regclass) = 'r' THEN
        LOCK TABLE message_search IN ACCESS EXCLUSIVE MODE;
        IF NOT EXISTS (SELECT 1 FROM message_search) THEN
            PERFORM flare_partition_message_search(date_trunc('month', now(), 'UTC'));
        END IF;
    END IF;
END
$$;
