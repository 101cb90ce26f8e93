-- Messages partitioned by month, and the id index that finds a message's month.
--
-- message_ids holds every stored message's (tenant_id, message_id) once, with the session, seq
-- and "timestamp" of its row. It carries the uniqueness of a message id and of a session's seq
-- wherever the messages table cannot (a partitioned table or a TimescaleDB hypertable only has
-- unique keys that contain "timestamp"), and it is how a lookup by id reaches one partition:
-- queries compare "timestamp" with the id's entry and PostgreSQL prunes every other partition
-- at run time. The writer's INSERT records a batch's ids in the same statement that stores its
-- rows, and a session's highest seq is one probe of it.
--
-- Without TimescaleDB an empty messages table (a new database) becomes a table partitioned by
-- range of "timestamp", one partition a month (UTC), created ahead by the writer at start and
-- by retention, and on demand for a message whose month has none yet
-- (flare_ensure_message_partition). A messages table that already holds rows stays as it is
-- until the operator runs `flare-storage-cli partition-messages`, which makes it the partition
-- of everything before a month boundary without copying it (README "Partitioned messages").

CREATE TABLE IF NOT EXISTS message_ids (
    tenant_id   TEXT        NOT NULL,
    message_id  TEXT        NOT NULL,
    session_id  TEXT        NOT NULL,
    seq         BIGINT,
    "timestamp" TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, message_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS message_ids_session_seq ON message_ids (tenant_id, session_id, seq)
    WHERE seq IS NOT NULL;
-- Retention finds expired ids by time.
CREATE INDEX IF NOT EXISTS message_ids_time_brin ON message_ids USING BRIN ("timestamp");

-- Writers of an earlier version store messages without recording their ids. They also queue
-- search work, so renaming the queue makes their INSERT fail (and retry until replaced) rather
-- than store a message the id index does not know; until this transaction commits they wait.
LOCK TABLE messages IN SHARE ROW EXCLUSIVE MODE;
ALTER TABLE IF EXISTS search_queue RENAME TO search_index_queue;
ALTER INDEX IF EXISTS search_queue_live RENAME TO search_index_queue_live;
ALTER INDEX IF EXISTS search_queue_backfill RENAME TO search_index_queue_backfill;

-- The earliest row of an id stands for the message, as lookups by id have always taken it. A
-- hypertable may hold one seq twice in a session: the earlier message keeps it in the index.
INSERT INTO message_ids (tenant_id, message_id, session_id, seq, "timestamp")
SELECT tenant_id, message_id, session_id,
       CASE WHEN row_number() OVER (PARTITION BY tenant_id, session_id, seq ORDER BY created_at, "timestamp") = 1
            THEN seq END,
       "timestamp"
FROM (SELECT DISTINCT ON (tenant_id, message_id) * FROM messages
      ORDER BY tenant_id, message_id, created_at, "timestamp") AS first_rows
ON CONFLICT DO NOTHING;

-- Every partition of messages with its bounds (the old table attached by partition-messages
-- starts at -infinity) and whether a concurrent detach of it is unfinished.
-- The bounds are read back from their text, which the date style must not make ambiguous.
CREATE OR REPLACE FUNCTION flare_message_partitions()
RETURNS TABLE (partition REGCLASS, lower_bound TIMESTAMPTZ, upper_bound TIMESTAMPTZ, detach_pending BOOLEAN)
LANGUAGE sql STABLE SET datestyle = 'ISO, MDY' AS $$
    SELECT c.oid::regclass,
           coalesce(substring(b.bound FROM 'FROM \(''([^'']+)''\)')::timestamptz, '-infinity'),
           coalesce(substring(b.bound FROM 'TO \(''([^'']+)''\)')::timestamptz, 'infinity'),
           i.inhdetachpending
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) AS b
    WHERE i.inhparent = 'messages'::regclass
$$;

-- Makes sure a partition holds `at`: when none does, creates the partition of its month (UTC).
-- Names read messages_YYYY_MM (messages_YYYY_MM_bc before the common era); the month that holds
-- PostgreSQL's first instant starts at -infinity, the first day of that month being out of
-- range. A time an existing partition covers (the old table before its boundary included)
-- takes no lock at all. Creating one locks messages: it waits at most five seconds for that
-- (the caller retries) so writers never queue behind a long read; concurrent callers
-- serialise on an advisory lock. Does nothing where messages is not partitioned.
CREATE OR REPLACE FUNCTION flare_ensure_message_partition(at TIMESTAMPTZ) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    local_time  TIMESTAMP := at AT TIME ZONE 'UTC';
    lower_bound TIMESTAMPTZ;
    upper_bound TIMESTAMPTZ := date_trunc('month', local_time + INTERVAL '1 month') AT TIME ZONE 'UTC';
    name        TEXT := 'messages_' || to_char(local_time, 'YYYY_MM')
                        || CASE WHEN local_time < TIMESTAMP '0001-01-01' THEN '_bc' ELSE '' END;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'messages'::regclass) <> 'p' THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM flare_message_partitions() p WHERE p.lower_bound <= at AND at < p.upper_bound) THEN
        RETURN;
    END IF;
    PERFORM set_config('lock_timeout', '5s', true);
    PERFORM pg_advisory_xact_lock(hashtext('flare_message_partitions'));
    IF EXISTS (SELECT 1 FROM flare_message_partitions() p WHERE p.lower_bound <= at AND at < p.upper_bound) THEN
        RETURN;
    END IF;
    BEGIN
        lower_bound := date_trunc('month', local_time) AT TIME ZONE 'UTC';
    EXCEPTION WHEN datetime_field_overflow THEN
        lower_bound := '-infinity';
    END;
    EXECUTE format('CREATE TABLE %I PARTITION OF messages FOR VALUES FROM (%L) TO (%L)',
                   name, lower_bound, upper_bound);
END
$$;

-- The partitions of this month and the next `months_ahead`.
CREATE OR REPLACE FUNCTION flare_create_message_partitions(months_ahead INT) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    FOR month IN 0..months_ahead LOOP
        PERFORM flare_ensure_message_partition(now() + make_interval(months => month));
    END LOOP;
END
$$;

-- Turns the plain messages table into the partitioned layout in one transaction: the table
-- and its indexes take the name messages_unpartitioned, a partitioned messages takes their
-- place with the same columns and indexes, and the old table, when it holds rows, becomes the
-- partition of everything before `boundary` (a first day of a month). Attaching it reads no
-- row when a validated check constraint already proves every row is before `boundary`, and
-- reuses its indexes where they match the new table's. Then the months from `boundary` on
-- get partitions.
CREATE OR REPLACE FUNCTION flare_partition_messages(boundary TIMESTAMPTZ) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    index_name TEXT;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'messages'::regclass) = 'p' THEN
        RETURN;
    END IF;
    LOCK TABLE messages IN ACCESS EXCLUSIVE MODE;
    -- Attaching a table with rows is only quick with the validated constraint; without it the
    -- attach would read the whole table under this lock.
    IF EXISTS (SELECT 1 FROM messages) AND NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'messages'::regclass AND conname = 'messages_before_partitioning' AND convalidated) THEN
        RAISE EXCEPTION 'messages has no validated constraint messages_before_partitioning: a writer removes it when a message is dated past its boundary; run partition-messages again with a larger --margin-days';
    END IF;
    ALTER TABLE messages RENAME TO messages_unpartitioned;
    FOR index_name IN SELECT indexname FROM pg_indexes WHERE tablename = 'messages_unpartitioned' LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', index_name,
                       'messages_unpartitioned' || substring(index_name FROM length('messages') + 1));
    END LOOP;
    CREATE TABLE messages (LIKE messages_unpartitioned INCLUDING DEFAULTS INCLUDING STORAGE INCLUDING COMPRESSION)
        PARTITION BY RANGE ("timestamp");
    ALTER TABLE messages ADD PRIMARY KEY (tenant_id, message_id, "timestamp");
    CREATE INDEX messages_tenant_session_time ON messages (tenant_id, session_id, "timestamp" DESC, message_id DESC);
    CREATE INDEX messages_tenant_sender_time ON messages (tenant_id, sender_id, "timestamp" DESC);
    CREATE INDEX messages_session_time ON messages (session_id, "timestamp" DESC);
    CREATE INDEX messages_tenant_time ON messages (tenant_id, "timestamp" DESC, message_id DESC);
    CREATE INDEX messages_tenant_session_seq ON messages (tenant_id, session_id, seq);
    CREATE INDEX messages_burn_due ON messages (burned_at) WHERE burned_at IS NOT NULL AND content IS NOT NULL;
    CREATE INDEX messages_time_brin ON messages USING BRIN ("timestamp");
    IF EXISTS (SELECT 1 FROM messages_unpartitioned) THEN
        EXECUTE format('ALTER TABLE messages ATTACH PARTITION messages_unpartitioned FOR VALUES FROM (MINVALUE) TO (%L)',
                       boundary);
    ELSE
        DROP TABLE messages_unpartitioned;
    END IF;
    PERFORM flare_ensure_message_partition(boundary);
    PERFORM flare_create_message_partitions(2);
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       AND NOT EXISTS (SELECT 1 FROM messages) THEN
        PERFORM flare_partition_messages(date_trunc('month', now(), 'UTC'));
    END IF;
END
$$;
