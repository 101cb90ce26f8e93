#!/usr/bin/env bash
# Runs every test against real services: starts (or reuses) PostgreSQL, Redis (a single node and
# a Redis Cluster), the Kafka-protocol broker and the MongoDB-protocol server, then runs the
# workspace's tests — and the suites that use Redis once more against the Redis Cluster.
#
#   scripts/test.sh [extra arguments for cargo nextest / cargo test]
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/services.sh up)"

# Crash tests run the real writer binary and kill it; build the binaries first.
cargo build --bins

# The second pass: the writer pipeline, reads, commands and the reliability streams, with
# REDIS_URL naming the cluster's seed nodes. Left out of it: the tests whose Redis outage is a
# TCP proxy in front of one node or a Redis of their own (a cluster client does not go through
# them), and the failover, slot-migration and replica-wait tests, which use the cluster in the first pass
# (one at a time: .config/nextest.toml).
CLUSTER_SUITES='binary(writer_pipeline) | binary(reader_reads) | binary(reader_commands) | binary(reliability)'
NOT_ON_CLUSTER='test(postgres_and_redis_outages_lose_nothing) | test(reads_survive_a_redis_outage) | test(redis_losing_its_data_mid_stream_loses_and_duplicates_nothing) | test(a_redis_cluster_master_killed_mid_stream_loses_and_duplicates_nothing) | test(redis_cluster_slots_moving_mid_stream_lose_and_duplicate_nothing) | test(the_cache_stage_waits_for_a_replica_when_asked) | test(a_command_waits_for_a_replica_when_asked)'

# Both passes run whatever the first gives; extra arguments go to both nextest passes.
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" || status=1
  echo "[test] the Redis suites again, on the Redis Cluster ($REDIS_CLUSTER_URL)" >&2
  REDIS_URL="$REDIS_CLUSTER_URL" cargo nextest run --workspace --no-fail-fast \
    -E "($CLUSTER_SUITES) & not ($NOT_ON_CLUSTER)" "$@" || status=1
else
  cargo test --workspace --no-fail-fast "$@" || status=1
  echo "[test] the Redis suites again, on the Redis Cluster ($REDIS_CLUSTER_URL)" >&2
  REDIS_URL="$REDIS_CLUSTER_URL" cargo test --no-fail-fast \
    --test writer_pipeline --test reader_reads --test reader_commands --test reliability -- \
    --skip postgres_and_redis_outages_lose_nothing --skip reads_survive_a_redis_outage \
    --skip redis_losing_its_data_mid_stream_loses_and_duplicates_nothing \
    --skip a_redis_cluster_master_killed_mid_stream_loses_and_duplicates_nothing \
    --skip redis_cluster_slots_moving_mid_stream_lose_and_duplicate_nothing \
    --skip the_cache_stage_waits_for_a_replica_when_asked --skip a_command_waits_for_a_replica_when_asked || status=1
fi
exit "$status"
