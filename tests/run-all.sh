#!/usr/bin/env bash
# The whole test suite from a clean checkout (the README's test command; .ci/run calls it).
# Installs what the tests need (the official automerge-repo JS client from npm, Debian's
# chromium for the staff page, Debian's postgresql for the PostgreSQL backend; each test
# starts its own throwaway cluster; Debian's systemd for its unit checker), then checks
# formatting, lints, keeps the sans-IO layers free of I/O crates, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cc >/dev/null || ! command -v make >/dev/null; then
  echo "==> installing a C compiler and make (the build compiles jemalloc, the server's allocator)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential
  else
    echo "error: cc or make is missing; install them (Debian: sudo apt-get install build-essential) and re-run" >&2
    exit 1
  fi
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "==> installing Node.js (needed to run the official JS client as a test peer)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq nodejs npm
  else
    echo "error: node and npm are missing; install them (Debian: sudo apt-get install nodejs npm) and re-run" >&2
    exit 1
  fi
fi

if ! command -v chromium >/dev/null; then
  echo "==> installing Debian's chromium (the staff page is tested in a real headless browser)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else
    echo "error: chromium is missing; install it (Debian: sudo apt-get install chromium) and re-run" >&2
    exit 1
  fi
fi

if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "==> installing Debian's postgresql (the PostgreSQL backend is tested against a real server)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
  else
    echo "error: PostgreSQL is missing; install it (Debian: sudo apt-get install postgresql) and re-run" >&2
    exit 1
  fi
fi

if ! command -v systemd-analyze >/dev/null; then
  echo "==> installing Debian's systemd (its checker verifies the service unit in deploy/)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd
  else
    echo "error: systemd-analyze is missing; install it (Debian: sudo apt-get install systemd) and re-run" >&2
    exit 1
  fi
fi

echo "==> npm install (tests/js: @automerge/automerge-repo and its websocket adapter, pinned)"
# `npm install`, not `npm ci`: npm 11 rejects this lock file in `ci` because of cbor-x's
# optional platform packages; the direct dependencies are pinned exactly in package.json and
# the lock file is honoured.
npm install --prefix tests/js --no-audit --no-fund --loglevel=error
echo "==> npm install (examples/js: the JS example the suite runs, same pinned packages)"
npm install --prefix examples/js --no-audit --no-fund --loglevel=error

echo "==> sans-IO check: src/protocol, src/records, src/auth must not use tokio, warp or sled"
if grep -rnE '^\s*use (tokio|warp|sled)\b|(tokio|warp|sled)::' src/protocol src/records src/auth; then
  echo "error: the lines above bring I/O into a sans-IO layer" >&2
  exit 1
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo test, linted by clippy while it builds"
# `cargo clippy` is `cargo check` with clippy-driver wrapping rustc for this package's own
# crates. Wrapping the test build the same way lints every target `cargo clippy --all-targets
# -- -D warnings` would (lib, bin, tests, examples), but compiles the dependencies once
# instead of twice (a check pass, then a build): the biggest cost of this suite on 2 cores.
# Plain `cargo test` also builds the examples as binaries (target/debug/examples), which the
# tour test runs; `--all-targets` would build them only as test harnesses.
if ! command -v clippy-driver >/dev/null; then
  echo "error: clippy is missing; install it with: rustup component add clippy" >&2
  exit 1
fi
RUSTC_WORKSPACE_WRAPPER="$(command -v clippy-driver)" CLIPPY_ARGS="-Dwarnings__CLIPPY_HACKERY__" \
  cargo test

echo "==> the integration suite again, its in-process servers on PostgreSQL (a throwaway cluster each)"
# Same build (same wrapper and flags), so nothing is compiled again. Tests that start the
# server binary keep the embedded store, except those written for PostgreSQL.
FIELDSYNC_TEST_BACKEND=postgres RUSTC_WORKSPACE_WRAPPER="$(command -v clippy-driver)" \
  CLIPPY_ARGS="-Dwarnings__CLIPPY_HACKERY__" cargo test --test it
