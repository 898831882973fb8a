#!/usr/bin/env bash
# Side-by-side load comparison: the reference automerge-repo sync server, then fieldsync,
# each on fresh data in a temporary directory, under the same load from examples/loadgen.rs
# (run in its own process), then one table with the ratios.
#
#   examples/compare.sh [DEVICES HOUSEHOLDS VISITS SHARED]      (default: 20 40 4 10)
#   RATE=100 STEADY_SECS=10 examples/compare.sh 50 40 4 10      (steady phase settings)
#   ONLY=fieldsync examples/compare.sh 200 40 4 10              (skip the reference)
#
# It builds first (release) and installs the reference server's pinned npm packages
# (examples/reference-server), then measures: never while something else builds.
# Reports land in target/compare/<D>x<H>x<V>+<S>/{reference,fieldsync}.json.
set -euo pipefail
cd "$(dirname "$0")/.."

D=${1:-20}; H=${2:-40}; V=${3:-4}; S=${4:-10}
RATE=${RATE:-100}; STEADY_SECS=${STEADY_SECS:-10}; ONLY=${ONLY:-}
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
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

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
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=
fi

echo "==> fieldsync"
target/release/fieldsync serve --data "$work/fieldsync" --listen 127.0.0.1:0 > "$work/fieldsync.log" 2>&1 &
server_pid=$!
port=$(port_of "$work/fieldsync.log" "$server_pid" 'ws://127\.0\.0\.1:[0-9]+')
target/release/examples/loadgen --server fieldsync --url "ws://127.0.0.1:$port/sync" \
  --data "$work/fieldsync" --server-pid "$server_pid" --json "$out/fieldsync.json" "${LOADGEN_ARGS[@]}"
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=

if [ -f "$out/reference.json" ] && [ "$ONLY" != fieldsync ]; then
  target/release/examples/loadgen --compare "$out/reference.json" "$out/fieldsync.json"
fi
echo "reports: $out/"
