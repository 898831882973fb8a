#!/usr/bin/env bash
# Side-by-side load comparison: the reference automerge-repo sync server, then fieldsync,
# each on fresh data in a temporary directory, under the same load from examples/loadgen.rs
# (run in its own process), then one table with the ratios.
#
#   examples/compare.sh [DEVICES HOUSEHOLDS VISITS SHARED]      (default: 20 40 4 10)
#   RATE=100 STEADY_SECS=10 examples/compare.sh 50 40 4 10      (steady phase settings)
#   ONLY=fieldsync examples/compare.sh 200 40 4 10              (skip the reference)
#   BACKENDS="sled postgres" examples/compare.sh                 (fieldsync on each backend)
#   NODES=2 BACKENDS=postgres ONLY=fieldsync examples/compare.sh (two nodes on one database)
#
# BACKENDS names the stores fieldsync runs on, one run each (default: sled). `postgres`
# starts a throwaway PostgreSQL cluster (Debian's postgresql, as the tests do; as root it
# runs as the `postgres` user) on a free loopback port, and reports the CPU its backends
# used beside fieldsync's own. NODES (default 1) runs that many fieldsync processes on the
# PostgreSQL backend, the devices spread over them in turn; the report sums their CPU and
# memory and gives each node's.
# It builds first (release) and installs the reference server's pinned npm packages
# (examples/reference-server), then measures: never while something else builds.
# Reports land in target/compare/<D>x<H>x<V>+<S>/{reference,fieldsync-<backend>}.json.
set -euo pipefail
cd "$(dirname "$0")/.."

D=${1:-20}; H=${2:-40}; V=${3:-4}; S=${4:-10}
RATE=${RATE:-100}; STEADY_SECS=${STEADY_SECS:-10}; ONLY=${ONLY:-}; BACKENDS=${BACKENDS:-sled}
NODES=${NODES:-1}
LOADGEN_ARGS=(--devices "$D" --households "$H" --visits "$V" --shared "$S"
              --rate "$RATE" --steady-secs "$STEADY_SECS" --timeout-secs "${TIMEOUT_SECS:-900}")

echo "==> building fieldsync and the load generator (release)"
cargo build --release --quiet --bin fieldsync --example loadgen
if [ "$ONLY" != fieldsync ]; then
  echo "==> npm install (examples/reference-server: automerge-repo 2.5.6, nodefs storage, websocket adapter)"
  npm install --prefix examples/reference-server --no-audit --no-fund --loglevel=error
fi

out="target/compare/${D}x${H}x${V}+${S}"
mkdir -p "$out"
work=$(mktemp -d)
chmod 755 "$work"
server_pid=
node_pids=()
pg_data=
stop_nodes() {
  local pid
  for pid in ${server_pid:-} ${node_pids[@]+"${node_pids[@]}"}; do
    kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  done
  server_pid=; node_pids=()
}
cleanup() {
  stop_nodes
  if [ -n "$pg_data" ]; then as_postgres "$(pg_bin pg_ctl)" -D "$pg_data" -m immediate stop >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# PostgreSQL's tools: on PATH, or Debian's newest /usr/lib/postgresql/*/bin.
pg_bin() {
  if command -v "$1" >/dev/null; then command -v "$1"; return; fi
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -1)
  if [ -z "$found" ]; then echo "error: PostgreSQL's $1 is missing (Debian: apt-get install postgresql)" >&2; return 1; fi
  echo "$found"
}
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Starts a throwaway cluster in $pg_data (set by the caller: this runs in a subshell);
# prints its URL.
start_postgres() {
  local dir port
  dir=$(dirname "$pg_data")
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_postgres "$(pg_bin initdb)" -D "$pg_data" -U fieldsync --auth=trust -E UTF8 >/dev/null
  as_postgres "$(pg_bin pg_ctl)" -D "$pg_data" -w -l "$pg_data/log" \
    -o "-p $port -k $pg_data -c listen_addresses=127.0.0.1" start >/dev/null
  echo "postgres://fieldsync@127.0.0.1:$port/postgres"
}

# CPU seconds of the postmaster's exited children (its backends, once their connections close).
postgres_cpu() {
  local pm
  pm=$(head -1 "$pg_data/postmaster.pid")
  awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($16 + $17) / hz }' "/proc/$pm/stat"
}

# Waits until the server's first stdout line names its port; prints the port.
port_of() {
  local log=$1 pid=$2 pattern=$3
  for _ in $(seq 1 300); do
    if ! kill -0 "$pid" 2>/dev/null; then echo "error: the server exited; its output:" >&2; cat "$log" >&2; return 1; fi
    if p=$(grep -oE "$pattern" "$log" | head -1 | grep -oE '[0-9]+$'); then echo "$p"; return 0; fi
    sleep 0.1
  done
  echo "error: the server did not announce its port within 30 s" >&2
  return 1
}

if [ "$ONLY" != fieldsync ]; then
  echo "==> reference automerge-repo sync server"
  node examples/reference-server/server.mjs "$work/reference" 0 > "$work/reference.log" 2>&1 &
  server_pid=$!
  port=$(port_of "$work/reference.log" "$server_pid" 'listening on [0-9]+')
  target/release/examples/loadgen --server automerge-repo --url "ws://127.0.0.1:$port" \
    --server-pid "$server_pid" --json "$out/reference.json" "${LOADGEN_ARGS[@]}" || true
  stop_nodes
fi

for backend in $BACKENDS; do
  db_args=()
  nodes=1
  case $backend in
    sled) ;;
    postgres) pg_data="$work/pg/data"; url=$(start_postgres); db_args=(--database "$url"); nodes=$NODES ;;
    *) echo "error: unknown backend $backend (sled | postgres)" >&2; exit 1 ;;
  esac
  name="fieldsync-$backend"
  if [ "$nodes" -gt 1 ]; then name="$name-${nodes}nodes"; fi
  echo "==> fieldsync on $backend ($nodes node(s))"
  node_args=()
  for n in $(seq 1 "$nodes"); do
    target/release/fieldsync serve --data "$work/$name-$n" --listen 127.0.0.1:0 \
      ${db_args[@]+"${db_args[@]}"} > "$work/$name-$n.log" 2>&1 &
    pid=$!
    node_pids+=("$pid")
    port=$(port_of "$work/$name-$n.log" "$pid" 'ws://127\.0\.0\.1:[0-9]+')
    if [ "$n" = 1 ]; then
      node_args+=(--url "ws://127.0.0.1:$port/sync")
    else
      node_args+=(--also-url "ws://127.0.0.1:$port/sync")
    fi
    node_args+=(--server-pid "$pid")
  done
  target/release/examples/loadgen --server fieldsync "${node_args[@]}" \
    --data "$work/$name-1" --json "$out/$name.json" "${LOADGEN_ARGS[@]}"
  stop_nodes
  if [ "$backend" = postgres ]; then
    sleep 1 # the backends exit once fieldsync's connections close
    echo "PostgreSQL's backends used $(postgres_cpu) s of CPU besides fieldsync's"
    as_postgres "$(pg_bin pg_ctl)" -D "$pg_data" -m fast stop >/dev/null; pg_data=
  fi
  if [ -f "$out/reference.json" ] && [ "$ONLY" != fieldsync ]; then
    target/release/examples/loadgen --compare "$out/reference.json" "$out/$name.json"
  fi
done
echo "reports: $out/"
