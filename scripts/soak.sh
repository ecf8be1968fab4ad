#!/usr/bin/env bash
# Memory over a W2 soak: starts `parlance serve` on the default model, drives W2 (concurrency
# 16, streaming, 128 tokens a request) for SOAK_SECONDS (default 600), and prints the server's
# resident memory at the start, every SAMPLE seconds (default 30) and at the end. WORKLOADS
# (default w2) names the rounds to repeat in turn: w2,w3 alternates W2 with W3 (a new
# 1,000-token shared prefix each round, computed in the long-prompt context), so that both
# contexts and both prefix caches fill and evict.
#
#   scripts/soak.sh            # 10 minutes
#   SOAK_SECONDS=60 scripts/soak.sh
#   WORKLOADS=w2,w3 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK_SECONDS=${SOAK_SECONDS:-600}
SAMPLE=${SAMPLE:-30}
WORKLOADS=${WORKLOADS:-w2}
PARLANCE=target/release/parlance
[ -x "$PARLANCE" ] || cargo build --release --bin parlance
ADDR=127.0.0.1:8093
PARLANCE_DATA_DIR=$(mktemp -d) "$PARLANCE" serve --addr "$ADDR" --allow-unauthenticated \
    >/tmp/soak-parlance.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do curl -sf "http://$ADDR/readyz" >/dev/null && break; sleep 0.5; done
rss() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$PID/status"; }
# KV streams ever written (their cells stay resident for the prefix cache: growth that follows
# this column is the cache warming up, bounded by the streams there are, not a leak).
warm() {
    curl -sf "http://$ADDR/metrics" |
        awk '/^parlance_kv_cache_warm_streams[{ ]/ {n += $NF} END {printf "%d", n}'
}
echo "| seconds | resident MiB | warm KV streams | rounds done ($WORKLOADS) |"
echo "|---:|---:|---:|---:|"
echo "| 0 | $(rss) | $(warm) | 0 |"
rounds=0
(
    while true; do
        for w in ${WORKLOADS//,/ }; do
            case $w in
                w2) "$PARLANCE" bench --url "http://$ADDR/v1" --workload w2 --concurrency 16 \
                    --requests 64 >/dev/null 2>&1 || true ;;
                *) "$PARLANCE" bench --url "http://$ADDR/v1" --workload "$w" >/dev/null 2>&1 || true ;;
            esac
            echo >>/tmp/soak-rounds
        done
    done
) &
LOAD=$!
: >/tmp/soak-rounds
start=$(date +%s)
while [ $(( $(date +%s) - start )) -lt "$SOAK_SECONDS" ]; do
    sleep "$SAMPLE"
    rounds=$(wc -l </tmp/soak-rounds)
    echo "| $(( $(date +%s) - start )) | $(rss) | $(warm) | $rounds |"
done
kill $LOAD 2>/dev/null || true
pkill -P $LOAD 2>/dev/null || true
sleep 2
echo "| idle after | $(rss) | $(warm) | $(wc -l </tmp/soak-rounds) |"
