#!/usr/bin/env bash
# parlance against llama.cpp's llama-server, side by side on this machine: the same model, the
# same prompts, `parlance bench` driving both, runs alternating (parlance, llama-server, ...).
# Prints each table, the idle resident memory of both servers, and the memory bandwidth
# measured beside each run. Results go to docs/benchmarks.md by hand.
#
#   LLAMA_SERVER=/path/to/llama-server scripts/bench-peer.sh
#
# Knobs: RUNS (W1–W3 repetitions, default 3), SLOTS (llama-server -np and parlance
# --max-sequences, default 16), W2_CONCURRENCY (default 4,16), W2_REQUESTS (default 16).
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_SERVER=${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}
MODEL=${MODEL:-${PARLANCE_CACHE_DIR:-$HOME/.cache/parlance}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
RUNS=${RUNS:-3}
SLOTS=${SLOTS:-16}
W2_CONCURRENCY=${W2_CONCURRENCY:-4,16}
W2_REQUESTS=${W2_REQUESTS:-16}
PARLANCE=target/release/parlance
[ -x "$PARLANCE" ] || cargo build --release --bin parlance

PP=127.0.0.1:8091
LP=127.0.0.1:8092
PARLANCE_DATA_DIR=$(mktemp -d) "$PARLANCE" serve --addr "$PP" --model "smollm2=$MODEL" \
    --max-sequences "$SLOTS" --allow-unauthenticated >/tmp/bench-parlance.log 2>&1 &
PPID_=$!
"$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port 8092 -t 2 -np "$SLOTS" \
    -c $((SLOTS * 2048)) >/tmp/bench-llama.log 2>&1 &
LPID=$!
trap 'kill $PPID_ $LPID 2>/dev/null || true' EXIT
for url in "http://$PP/readyz" "http://$LP/health"; do
    for _ in $(seq 1 120); do curl -sf "$url" >/dev/null && break; sleep 0.5; done
done
sleep 2
rss() { awk '/VmRSS/ {printf "%.0f MiB", $2 / 1024}' "/proc/$1/status"; }
echo "idle resident memory: parlance $(rss $PPID_), llama-server $(rss $LPID)"

bandwidth() {
    python3 - <<'EOF'
import time, numpy as np
a = np.ones(1 << 27)  # 1 GiB of float64
best = 0
for _ in range(5):
    t = time.perf_counter(); a.sum(); d = time.perf_counter() - t
    best = max(best, a.nbytes / d / 1e9)
print(f"memory read bandwidth: {best:.1f} GB/s (one core, numpy sum over 1 GiB, best of 5)")
EOF
}

bench() {
    local name=$1 url=$2; shift 2
    echo "== $name"
    "$PARLANCE" bench --url "$url/v1" --model smollm2 "$@"
}

for run in $(seq 1 "$RUNS"); do
    for target in "parlance http://$PP" "llama-server http://$LP"; do
        set -- $target
        bandwidth
        bench "$1 (run $run)" "$2" --workload w1,w2,w3 --requests "$W2_REQUESTS" \
            --concurrency "$W2_CONCURRENCY" --w3-requests 16 --max-tokens 128
    done
done
for target in "parlance http://$PP" "llama-server http://$LP"; do
    set -- $target
    bench "$1" "$2" --workload w4,w5
done
echo "after the runs: parlance $(rss $PPID_), llama-server $(rss $LPID)"
