#!/usr/bin/env bash
# The main job, locally, in one command: start the services, run writer and reader, send a
# sample conversation through Kafka and read it back through gRPC.
#
#   scripts/demo.sh
#
# Writer and reader logs go to .services/demo-writer.log and .services/demo-reader.log.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# GET http://HOST:PORT/PATH with bash alone (curl may not be installed); prints the response.
http_get() {
  local address=$1 path=$2
  exec 3<>"/dev/tcp/${address%:*}/${address##*:}" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "${address%:*}" >&3
  cat <&3
  exec 3>&-
}
is_ready() { http_get "$1" /readyz 2>/dev/null | head -n1 | grep -q ' 200 '; }

step "starting services"
eval "$(scripts/services.sh up)"
scripts/services.sh env

step "building (first build takes several minutes)"
cargo build --bins
bin=target/debug

export METRICS_ADDR_WRITER=${METRICS_ADDR_WRITER:-127.0.0.1:9100}
export METRICS_ADDR_READER=${METRICS_ADDR_READER:-127.0.0.1:9101}
export STORAGE_READER_GRPC_ADDR=${STORAGE_READER_GRPC_ADDR:-127.0.0.1:50051}

step "creating topics"
"$bin/flare-storage" create-topics --partitions 8 storage-messages storage-messages-dlq

mkdir -p .services
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

step "starting writer (metrics on $METRICS_ADDR_WRITER) and reader (gRPC on $STORAGE_READER_GRPC_ADDR)"
METRICS_ADDR=$METRICS_ADDR_WRITER "$bin/flare-storage-writer" >.services/demo-writer.log 2>&1 &
pids+=($!)
METRICS_ADDR=$METRICS_ADDR_READER "$bin/flare-storage-reader" >.services/demo-reader.log 2>&1 &
pids+=($!)
for address in "$METRICS_ADDR_WRITER" "$METRICS_ADDR_READER"; do
  for _ in $(seq 1 100); do
    is_ready "$address" && break
    sleep 0.2
  done
  is_ready "$address" || { echo "not ready: $address (see .services/demo-*.log)"; exit 1; }
done

session="demo-$(date +%s)"
step "sending a sample conversation to Kafka (session $session)"
"$bin/flare-storage" send-sample --tenant demo --session "$session"

step "reading it back through gRPC QueryMessages"
"$bin/flare-storage" query --tenant demo --session "$session" --expect 8 --addr "http://$STORAGE_READER_GRPC_ADDR"

step "writer metrics (once all 8 are through every stage)"
for _ in $(seq 1 150); do
  http_get "$METRICS_ADDR_WRITER" /metrics | grep -Eq '^storage_writer_messages_processed_total ([8-9]|[1-9][0-9]+)' && break
  sleep 0.2
done
http_get "$METRICS_ADDR_WRITER" /metrics | grep -E '^storage_writer_(messages|dead)' || true

step "stopping writer and reader (SIGTERM, graceful)"
cleanup
trap - EXIT
echo "done"
