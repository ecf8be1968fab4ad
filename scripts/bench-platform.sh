#!/usr/bin/env bash
# Measures what the platform path adds to a request: the same server, the same instant model
# (the `echo` provider), requests at fixed rates with a static operator key (no account, no
# limits, no credits) and then with a managed key (key lookup, rate limits, credit reservation
# and settlement). Once with SQLite and in-process counters, once with PostgreSQL and Redis.
# Usage: scripts/bench-platform.sh [rates] [seconds]   (needs a release build and
# `source scripts/services.sh start` for the PostgreSQL/Redis run)
set -euo pipefail
cd "$(dirname "$0")/.."
rates="${1:-500,1000}"
secs="${2:-10}"
bin="${PARLANCE_BIN:-target/release/parlance}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/parlance.toml" <<TOML
[[models]]
name = "echo"
provider = "echo"
price = { prompt = 1000000, completion = 2000000 }
TOML

run() {
  local label="$1"; shift
  local port=$((18000 + RANDOM % 1000))
  RUST_LOG="${RUST_LOG:-warn}" "$bin" serve --addr "127.0.0.1:$port" --config "$work/parlance.toml" \
    --api-key sk-static-bench --admin-token adm "$@" 2>"$work/server.log" &
  local pid=$!
  for _ in $(seq 100); do curl -sf "127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
  local acct="bench-$RANDOM$RANDOM"
  curl -sf -H 'Authorization: Bearer adm' -d "{\"name\":\"$acct\"}" "127.0.0.1:$port/admin/accounts" >/dev/null
  curl -sf -H 'Authorization: Bearer adm' -d '{"amount":1000000000000}' "127.0.0.1:$port/admin/accounts/$acct/credits" >/dev/null
  local key
  key="$(curl -sf -H 'Authorization: Bearer adm' -d "{\"account\":\"$acct\",\"rpm\":1000000,\"tpm\":1000000000}" "127.0.0.1:$port/admin/keys" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')"
  echo "## $label: static key (no platform path)"
  "$bin" bench --url "http://127.0.0.1:$port/v1" --model echo --workload rate --rate "$rates" --duration "$secs" --max-tokens 8 --api-key sk-static-bench | tail -n +3
  echo "## $label: managed key (auth lookup, RPM+TPM limits, credit reserve and settle, usage)"
  "$bin" bench --url "http://127.0.0.1:$port/v1" --model echo --workload rate --rate "$rates" --duration "$secs" --max-tokens 8 --api-key "$key" | tail -n +3
  echo "server RSS: $(ps -o rss= -p $pid) KiB"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  [ -z "${BENCH_LOG:-}" ] || cp "$work/server.log" "$BENCH_LOG.$label"
}

run "SQLite" --database-url "sqlite://$work/bench.db"
if [ -n "${PARLANCE_TEST_POSTGRES_URL:-}" ] && [ -n "${PARLANCE_TEST_REDIS_URL:-}" ]; then
  # A fresh database for the run.
  db="bench_$(date +%s)_$RANDOM"
  psql "$PARLANCE_TEST_POSTGRES_URL" -qc "CREATE DATABASE $db" >/dev/null
  run "PostgreSQL + Redis" --database-url "${PARLANCE_TEST_POSTGRES_URL%/*}/$db" --redis-url "$PARLANCE_TEST_REDIS_URL"
fi
