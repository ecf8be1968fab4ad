#!/usr/bin/env bash
# Runs every check and test, as CI does: installs what is missing, fetches the default model,
# starts private PostgreSQL and Redis servers on loopback (stopped again on exit), then format,
# lints, the Rust suites (unit, property, storage on SQLite/PostgreSQL/Redis, end-to-end against
# the real binary and model) and the official-SDK suite in Python.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
python3 -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt

jobs="${CARGO_BUILD_JOBS:-$(nproc)}"
echo "== services" >&2
# shellcheck source=scripts/services.sh
source scripts/services.sh start
trap 'scripts/services.sh stop' EXIT
echo "== format" >&2
cargo fmt --all --check
echo "== build" >&2
cargo build -p parlance --bin parlance --example mock_upstream -j "$jobs"
echo "== default model" >&2
export PARLANCE_BIN="${PARLANCE_BIN:-${CARGO_TARGET_DIR:-target}/debug/parlance}"
export PARLANCE_MOCK_UPSTREAM="${PARLANCE_MOCK_UPSTREAM:-${CARGO_TARGET_DIR:-target}/debug/examples/mock_upstream}"
"$PARLANCE_BIN" pull
PARLANCE_TEST_THINKING_MODEL="$(scripts/thinking-model.sh)"
export PARLANCE_TEST_THINKING_MODEL
echo "== clippy" >&2
cargo clippy --all-targets -j "$jobs" -- -D warnings
echo "== rust tests" >&2
# The tests run several servers (and in-process engines) on the same cores: llama.cpp's OpenMP
# threads sleep at their barriers rather than spin against each other. Halves the end-to-end
# suites' time here; a server alone on its cores keeps the default (spinning decodes faster).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# Without backtraces a failing test's message is the last thing it prints.
RUST_BACKTRACE=0 cargo test --workspace -j "$jobs" -- --test-threads 2
echo "== openai SDK suite" >&2
python3 -m pytest tests/python -q -p no:cacheprovider
