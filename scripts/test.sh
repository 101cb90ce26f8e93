#!/usr/bin/env bash
# Runs every test against real services: starts (or reuses) PostgreSQL, Redis, the Kafka-protocol
# broker and the MongoDB-protocol server, then runs the workspace's tests.
#
#   scripts/test.sh [extra arguments for cargo nextest / cargo test]
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/services.sh up)"

# Crash tests run the real writer binary and kill it; build the binaries first.
cargo build --bins

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
