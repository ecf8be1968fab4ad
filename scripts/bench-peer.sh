#!/usr/bin/env bash
# parlance against llama.cpp's llama-server, side by side on this machine: the same model, the
# same prompts, `parlance bench` driving both with every workload (W1–W5), runs alternating
# (parlance, llama-server, parlance, ...). Prints each run's tables, the memory bandwidth
# measured before each run, both servers' resident memory idle and after the runs, and at the
# end the median of every figure over the runs. Results go to docs/benchmarks.md by hand.
#
#   LLAMA_SERVER=/path/to/llama-server scripts/bench-peer.sh
#
# parlance runs with its defaults; llama-server with its best settings for these workloads:
# as many slots as the highest concurrency (SLOTS, default 32), 2,048 tokens of context each,
# 2 threads. Knobs: RUNS (default 3), SLOTS, W2_LOW / W2_LOW_REQUESTS (concurrency levels run
# with fewer requests, default 1,4,8 with 32), W2_HIGH / W2_HIGH_REQUESTS (default 16,32 with
# 64), TAIL (the workloads run after W2 in every run, default w3,w4,w5; W5 alone takes minutes
# against llama-server, which queues every request), OUT (folder for the raw tables, default a
# fresh temporary one).
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_SERVER=${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}
MODEL=${MODEL:-${PARLANCE_CACHE_DIR:-$HOME/.cache/parlance}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
RUNS=${RUNS:-3}
SLOTS=${SLOTS:-32}
W2_LOW=${W2_LOW:-1,4,8}
W2_LOW_REQUESTS=${W2_LOW_REQUESTS:-32}
W2_HIGH=${W2_HIGH:-16,32}
W2_HIGH_REQUESTS=${W2_HIGH_REQUESTS:-64}
TAIL=${TAIL:-w3,w4,w5}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PARLANCE=target/release/parlance
[ -x "$PARLANCE" ] || cargo build --release --bin parlance

PP=127.0.0.1:8091
LP=127.0.0.1:8092
PARLANCE_DATA_DIR=$(mktemp -d) "$PARLANCE" serve --addr "$PP" --model "smollm2=$MODEL" \
    --allow-unauthenticated >"$OUT/parlance.log" 2>&1 &
PPID_=$!
"$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port 8092 -t 2 -np "$SLOTS" \
    -c $((SLOTS * 2048)) >"$OUT/llama-server.log" 2>&1 &
LPID=$!
trap 'kill $PPID_ $LPID 2>/dev/null || true' EXIT
for url in "http://$PP/readyz" "http://$LP/health"; do
    for _ in $(seq 1 120); do curl -sf "$url" >/dev/null && break; sleep 0.5; done
done
sleep 2
rss() { awk '/VmRSS/ {printf "%.0f MiB", $2 / 1024}' "/proc/$1/status"; }
echo "idle resident memory: parlance $(rss $PPID_), llama-server $(rss $LPID)"
echo "commit $(git rev-parse --short HEAD); llama-server -np $SLOTS -c $((SLOTS * 2048)) -t 2"

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
    "$PARLANCE" bench --url "$1/v1" --model smollm2 "${@:2}"
}

for run in $(seq 1 "$RUNS"); do
    for target in "parlance http://$PP" "llama-server http://$LP"; do
        set -- $target
        file="$OUT/run$run-$1.md"
        echo "== $1, run $run"
        bandwidth
        {
            bench "$2" --workload w1
            bench "$2" --workload w2 --concurrency "$W2_LOW" --requests "$W2_LOW_REQUESTS"
            bench "$2" --workload w2 --concurrency "$W2_HIGH" --requests "$W2_HIGH_REQUESTS"
            bench "$2" --workload "$TAIL"
        } | tee "$file"
    done
done
echo "after the runs: parlance $(rss $PPID_), llama-server $(rss $LPID)"

# Medians over the runs, cell by cell: rows are matched by workload and first column (W2's
# concurrency, W4's turn).
python3 - "$OUT" "$RUNS" <<'EOF'
import re, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
for server in ("parlance", "llama-server"):
    tables = {}  # (workload, header) -> {key: [rows]}
    for run in range(1, runs + 1):
        workload = header = None
        for line in open(f"{out}/run{run}-{server}.md"):
            m = re.match(r"(W\d)\b", line)
            if m:
                workload, header = m.group(1), None
            elif line.startswith("|") and workload:
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if header is None:
                    header = cells
                elif not set("".join(cells)) <= set("-:"):
                    key = cells[0] if workload in ("W2", "W4") else ""
                    tables.setdefault((workload, tuple(header)), {}).setdefault(key, []).append(cells)
    print(f"\n## {server}: medians of {runs} runs")
    for (workload, header), rows in tables.items():
        print(f"\n{workload}\n| {' | '.join(header)} |\n|{'---:|' * len(header)}")
        for key, runs_rows in rows.items():
            med = []
            for col in zip(*runs_rows):
                try:
                    med.append(f"{statistics.median(float(x) for x in col):g}")
                except ValueError:
                    med.append(col[0])
            print(f"| {' | '.join(med)} |")
EOF
echo "raw tables in $OUT"
