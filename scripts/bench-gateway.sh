#!/usr/bin/env bash
# G1 of ../shared/design/performance.md: parlance proxying to a mock upstream that answers at
# once, against the mock called directly, at fixed request rates (open loop). Also the server's
# CPU time per 1,000 requests and its resident memory.
# Usage: scripts/bench-gateway.sh [rates] [seconds]   (builds the release binary and the mock)
set -euo pipefail
cd "$(dirname "$0")/.."
rates="${1:-500,1000,2000}"
secs="${2:-10}"
cargo build --release -p parlance --bin parlance --example mock_upstream >/dev/null 2>&1
bin=target/release/parlance
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
mock_port=$((19000 + RANDOM % 500))
target/release/examples/mock_upstream "127.0.0.1:$mock_port" >/dev/null &
cat > "$work/parlance.toml" <<TOML
[[providers]]
name = "mock"
kind = "openai"
base_url = "http://127.0.0.1:$mock_port/v1"
api_key = "sk-mock"

[[models]]
name = "proxied"
deployments = [{ provider = "mock", model = "ok" }]
TOML
port=$((19500 + RANDOM % 500))
RUST_LOG=warn "$bin" serve --addr "127.0.0.1:$port" --config "$work/parlance.toml" \
  --database-url "sqlite://$work/g1.db" --api-key sk-bench 2>"$work/server.log" &
pid=$!
for _ in $(seq 100); do curl -sf "127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
sleep 0.5
echo "## the mock upstream called directly"
"$bin" bench --url "http://127.0.0.1:$mock_port/v1" --model ok --workload rate --rate "$rates" --duration "$secs" --max-tokens 8 | tail -n +4
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
before=$(cpu)
echo "## through parlance (static key; the request streamed from the upstream, answered plain)"
"$bin" bench --url "http://127.0.0.1:$port/v1" --model proxied --workload rate --rate "$rates" --duration "$secs" --max-tokens 8 --api-key sk-bench | tail -n +4
after=$(cpu)
IFS=, read -ra rs <<<"$rates"
total=0; for r in "${rs[@]}"; do total=$((total + r * secs)); done
total=$((total + 200))  # the warm-up requests
ticks=$(getconf CLK_TCK)
echo "server CPU: $(( (after - before) * 1000 / ticks )) ms for $total requests ($(( (after - before) * 1000 * 1000 / ticks / total )) ms per 1,000)"
echo "server RSS: $(ps -o rss= -p $pid) KiB"
