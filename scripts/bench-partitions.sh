#!/usr/bin/env bash
# GetMessage's PostgreSQL lookup with `messages` partitioned into 24 months, measured with
# pgbench (PostgreSQL's own load generator) beside the server's limit in the same run:
#   limit      SELECT 1 (a round trip and nothing else)
#   pruned     the reader's lookup: the time from message_ids, then the one partition
#   unpruned   the same lookup without message_ids (every month's primary key is probed)
#   plain      the lookup on one plain table holding the same rows (the layout before)
# Ids are drawn uniformly over all rows, so most lookups miss shared_buffers and read the
# operating system's cache, as lookups of old messages do. Then the insert of the two layouts,
# in the writer's statement shape.
#
#   scripts/bench-partitions.sh            # ROWS=1200000 CLIENTS=8 SECONDS_EACH=20
#   KEEP=1 scripts/bench-partitions.sh     # keeps the database flare_bench_partitions
#
# Needs the services of scripts/services.sh (PostgreSQL) and a built `flare-storage` binary
# (FLARE_STORAGE_BIN, default target/release/flare-storage, else target/debug/flare-storage).
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-1200000}
CLIENTS=${CLIENTS:-8}
SECONDS_EACH=${SECONDS_EACH:-20}
ADMIN_URL=${POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DATABASE=flare_bench_partitions
URL="${ADMIN_URL%/*}/$DATABASE"
BIN=${FLARE_STORAGE_BIN:-target/release/flare-storage}
[[ -x $BIN ]] || BIN=target/debug/flare-storage
[[ -x $BIN ]] || { echo "build flare-storage first (cargo build --release -p flare-storage-cli)" >&2; exit 1; }

psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DATABASE WITH (FORCE)" -c "CREATE DATABASE $DATABASE"
"$BIN" migrate --postgres-url "$URL" >/dev/null

echo "loading $ROWS messages over 24 months (2,000 sessions, 192-byte payloads)"
psql -q -v ON_ERROR_STOP=1 "$URL" -v rows="$ROWS" <<'SQL'
SELECT flare_ensure_message_partition(date_trunc('month', now()) - make_interval(months => m))
FROM generate_series(0, 23) AS m;
INSERT INTO messages (tenant_id, message_id, session_id, seq, sender_id, "timestamp", content_type, payload)
SELECT 'acme', md5(g::text), 's' || (g % 2000), g / 2000 + 1, 'u' || (g % 97),
       date_trunc('month', now()) - INTERVAL '23 months' + (g::float8 / :rows) * INTERVAL '720 days',
       'text', decode(repeat(md5(g::text), 12), 'hex')
FROM generate_series(1, :rows) AS g;
INSERT INTO message_ids (tenant_id, message_id, session_id, seq, "timestamp")
SELECT tenant_id, message_id, session_id, seq, "timestamp" FROM messages;
CREATE TABLE messages_plain (LIKE messages INCLUDING DEFAULTS INCLUDING INDEXES);
INSERT INTO messages_plain SELECT * FROM messages;
VACUUM ANALYZE;
SELECT count(*) AS partitions FROM pg_inherits WHERE inhparent = 'messages'::regclass;
SQL

scripts=$(mktemp -d)
trap 'rm -rf "$scripts"' EXIT
echo 'SELECT 1;' >"$scripts/limit.sql"
cat >"$scripts/pruned.sql" <<SQL
\set n random(1, $ROWS)
SELECT payload FROM messages WHERE tenant_id = 'acme' AND message_id = md5(:n::text)
  AND "timestamp" = (SELECT i."timestamp" FROM message_ids i WHERE i.tenant_id = 'acme' AND i.message_id = md5(:n::text))
  AND deleted_at IS NULL;
SQL
cat >"$scripts/unpruned.sql" <<SQL
\set n random(1, $ROWS)
SELECT payload FROM messages WHERE tenant_id = 'acme' AND message_id = md5(:n::text) AND deleted_at IS NULL
  ORDER BY "timestamp" LIMIT 1;
SQL
sed 's/FROM messages /FROM messages_plain /' "$scripts/unpruned.sql" >"$scripts/plain.sql"

printf '\n%-10s %12s %14s\n' lookup "per second" "mean latency"
for name in limit pruned unpruned plain; do
  out=$(pgbench -n -M prepared -c "$CLIENTS" -j 2 -T "$SECONDS_EACH" -f "$scripts/$name.sql" "$URL" 2>&1)
  tps=$(grep -oP 'tps = \K[0-9.]+' <<<"$out" | head -1)
  latency=$(grep -oP 'latency average = \K[0-9.]+ ms' <<<"$out")
  printf '%-10s %12.0f %14s\n' "$name" "$tps" "$latency"
done

# The insert, in the writer's statement shape (batches of 500, ids first), against the layout
# before (one plain table with its unique indexes on the id and the seq); 100,000 rows each,
# twice, in this month.
psql -q "$URL" -c "TRUNCATE messages, message_ids"
psql -q -v ON_ERROR_STOP=1 "$URL" <<'SQL' 2>&1 | grep -oP 'NOTICE:  \K.*'
CREATE TABLE plain_messages (LIKE messages INCLUDING DEFAULTS);
ALTER TABLE plain_messages ADD PRIMARY KEY (tenant_id, message_id, "timestamp");
CREATE UNIQUE INDEX ON plain_messages (tenant_id, message_id);
CREATE UNIQUE INDEX ON plain_messages (tenant_id, session_id, seq) WHERE seq IS NOT NULL;
CREATE INDEX ON plain_messages (tenant_id, session_id, "timestamp" DESC, message_id DESC);
CREATE INDEX ON plain_messages (tenant_id, sender_id, "timestamp" DESC);
CREATE INDEX ON plain_messages (session_id, "timestamp" DESC);
CREATE INDEX ON plain_messages (tenant_id, "timestamp" DESC, message_id DESC);
CREATE INDEX ON plain_messages (burned_at) WHERE burned_at IS NOT NULL AND content IS NOT NULL;
CREATE INDEX ON plain_messages USING BRIN ("timestamp");
CREATE FUNCTION insert_rates(round TEXT) RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE started TIMESTAMPTZ; batches INT := 200;
BEGIN
  started := clock_timestamp();
  FOR b IN 0..batches - 1 LOOP
    INSERT INTO plain_messages (tenant_id, message_id, session_id, seq, sender_id, "timestamp", content_type, payload)
    SELECT 'acme', md5(round || g), 's' || (g % 2000), g / 2000 + 1, 'u' || (g % 97),
           now() - make_interval(secs => g / 1000.0), 'text', decode(repeat(md5(g::text), 19), 'hex')
    FROM generate_series(b * 500, b * 500 + 499) AS g
    ON CONFLICT DO NOTHING;
  END LOOP;
  RAISE NOTICE 'insert %: plain table %/s', round, round(batches * 500 / extract(epoch FROM clock_timestamp() - started));
  started := clock_timestamp();
  FOR b IN 0..batches - 1 LOOP
    WITH batch AS (
      SELECT 'acme'::text AS tenant_id, md5(round || g) AS message_id, 's' || (g % 2000) AS session_id,
             (g / 2000 + 1)::int8 AS seq, 'u' || (g % 97) AS sender_id, now() - make_interval(secs => g / 1000.0) AS ts,
             decode(repeat(md5(g::text), 19), 'hex') AS payload
      FROM generate_series(b * 500, b * 500 + 499) AS g
    ), new_ids AS (
      INSERT INTO message_ids (tenant_id, message_id, session_id, seq, "timestamp")
      SELECT tenant_id, message_id, session_id, seq, ts FROM batch ON CONFLICT DO NOTHING
      RETURNING tenant_id, message_id, "timestamp"
    )
    INSERT INTO messages (tenant_id, message_id, session_id, seq, sender_id, "timestamp", content_type, payload)
    SELECT t.tenant_id, t.message_id, t.session_id, t.seq, t.sender_id, t.ts, 'text', t.payload
    FROM batch t JOIN new_ids n ON n.tenant_id = t.tenant_id AND n.message_id = t.message_id AND n."timestamp" = t.ts
    ON CONFLICT DO NOTHING;
  END LOOP;
  RAISE NOTICE 'insert %: partitioned + message_ids %/s', round, round(batches * 500 / extract(epoch FROM clock_timestamp() - started));
END
$$;
SELECT insert_rates('a');
SELECT insert_rates('b');
SQL
[[ -n ${KEEP:-} ]] || psql -q "$ADMIN_URL" -c "DROP DATABASE $DATABASE WITH (FORCE)"
