#!/usr/bin/env bash
# Builds parlance (release) and serves the default model on 127.0.0.1:8080, fetching the model
# on first use. Extra arguments go to `parlance serve` (see `parlance serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec cargo run --release -p parlance -- serve "$@"
