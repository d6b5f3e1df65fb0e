#!/usr/bin/env bash
# The serving benchmark: `rcx serve` (dynamic batching) against a minimal PyTorch/
# transformers HTTP server doing one request per forward (scripts/serve_torch.py), on the
# same bert-tiny model folder, in the same run: throughput and p50/p99 latency at 1, 16
# and 64 concurrent clients. Each request is one prompt of the shipped set's eval split
# with its 8 completions (POST /score); every client sends its next request as soon as
# the previous is answered, over one keep-alive connection.
#
# Usage: scripts/bench-serve.sh [--model DIR] [--seconds S] [--clients "1 16 64"]
#                               [--max-batch N] [--max-wait-ms T] [--threads N]
#   --model    default: a bert-tiny trained for 2 steps on the shipped set (weights do not
#              change the speed), written under target/tmp/bench-serve/
#   --seconds  measured seconds per (server, clients) point, after 1 s of warm-up (default 10)
#   --threads  compute threads of each server (default: all cores)
# Needs a python with torch and transformers in $PYTHON (default python3). Loopback only.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODEL=""
SECONDS_PER_POINT=10
CLIENTS="1 16 64"
MAX_BATCH=64
MAX_WAIT_MS=5
THREADS="$(nproc)"
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --seconds) SECONDS_PER_POINT="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --max-batch) MAX_BATCH="$2"; shift 2 ;;
        --max-wait-ms) MAX_WAIT_MS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        *) echo "bench-serve: unknown argument '$1'" >&2; exit 2 ;;
    esac
done

cd "$ROOT"
cargo build --release -q
RCX="$ROOT/target/release/rcx"
WORK="$ROOT/target/tmp/bench-serve"
mkdir -p "$WORK"
if [ -z "$MODEL" ]; then
    MODEL="$WORK/model"
    if [ ! -s "$MODEL/model.safetensors" ]; then
        sed -e "s|^output_dir:.*|output_dir: $MODEL|" -e "s|^max_steps:.*|max_steps: 2|" \
            -e "s|^eval_steps:.*|eval_steps: 2|" -e "s|^save_steps:.*|save_steps: 2|" \
            -e "s|^device:.*|device: cpu|" configs/x_adaptive.yml > "$WORK/model.yml"
        "$RCX" train "$WORK/model.yml" --quiet --overwrite
    fi
fi

SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
trap stop_server EXIT

# Starts "$@" in the background, its stderr to $WORK/server.err; sets SERVER_PID and PORT
# from its "listening on http://127.0.0.1:PORT" line (60 s at most).
start_server() {
    "$@" 2> "$WORK/server.err" &
    SERVER_PID=$!
    PORT=""
    for _ in $(seq 600); do
        PORT="$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$WORK/server.err" | grep -o '[0-9]*$' || true)"
        [ -n "$PORT" ] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "bench-serve: the server did not start:" >&2
    cat "$WORK/server.err" >&2
    exit 1
}

RESULTS="$WORK/results.txt"
: > "$RESULTS"
for impl in rcx torch; do
    case "$impl" in
        rcx) start_server env RAYON_NUM_THREADS="$THREADS" "$RCX" serve --model "$MODEL" --port 0 \
                 --max-batch "$MAX_BATCH" --max-wait-ms "$MAX_WAIT_MS" ;;
        torch) start_server env OMP_NUM_THREADS="$THREADS" "$PYTHON" scripts/serve_torch.py \
                 --model "$MODEL" --port 0 --threads "$THREADS" ;;
    esac
    for clients in $CLIENTS; do
        echo "bench-serve: $impl, $clients clients" >&2
        "$PYTHON" - "$impl" "$PORT" "$clients" "$SECONDS_PER_POINT" \
            data/kjv-jargon/eval.jsonl <<'PY' | tee -a "$RESULTS" >&2
# The load: `clients` threads, each on one keep-alive connection, sending the eval
# prompts round-robin; latencies of requests that end inside the measured window.
import http.client, json, sys, threading, time
impl, port, clients, seconds, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
bodies = [json.dumps({"prompt": r["prompt"], "completions": r["completions"]}).encode()
          for r in map(json.loads, open(data))]
warmup = 1.0
start = time.perf_counter()
measure_from, measure_to = start + warmup, start + warmup + seconds
latencies, errors, lock = [], [0], threading.Lock()
def client(c):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i = c
    while True:
        sent = time.perf_counter()
        if sent >= measure_to:
            break
        conn.request("POST", "/score", bodies[i % len(bodies)], {"content-type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        done = time.perf_counter()
        ok = response.status == 200 and len(json.loads(body)["rewards"]) > 0
        if sent >= measure_from and done <= measure_to:
            with lock:
                latencies.append(done - sent)
                errors[0] += not ok
        i += clients
threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
latencies.sort()
q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000
print(f"RESULT impl={impl} clients={clients} requests={len(latencies)} errors={errors[0]} "
      f"rps={len(latencies) / seconds:.1f} p50_ms={q(0.5):.1f} p99_ms={q(0.99):.1f}")
PY
    done
    stop_server
done

"$PYTHON" - "$RESULTS" "$THREADS" "$SECONDS_PER_POINT" "$MAX_BATCH" "$MAX_WAIT_MS" <<'PY'
import sys
rows = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in open(sys.argv[1]) if line.startswith("RESULT")]
threads, seconds, max_batch, max_wait = sys.argv[2:6]
print(f"threads per server: {threads}; {seconds} s per point; rcx --max-batch {max_batch} --max-wait-ms {max_wait}; "
      "one request = one prompt with 8 completions")
print("| clients | rcx req/s | rcx p50 ms | rcx p99 ms | torch req/s | torch p50 ms | torch p99 ms | throughput ratio |")
print("|---|---|---|---|---|---|---|---|")
by = {(r["impl"], r["clients"]): r for r in rows}
for clients in sorted({r["clients"] for r in rows}, key=int):
    a, b = by.get(("rcx", clients)), by.get(("torch", clients))
    if not (a and b):
        continue
    ratio = float(a["rps"]) / float(b["rps"]) if float(b["rps"]) > 0 else float("inf")
    print(f"| {clients} | {a['rps']} | {a['p50_ms']} | {a['p99_ms']} | {b['rps']} | {b['p50_ms']} | {b['p99_ms']} | {ratio:.2f}x |")
errors = sum(int(r["errors"]) for r in rows)
if errors:
    print(f"bench-serve: {errors} answers were not 200 with rewards", file=sys.stderr)
    sys.exit(1)
PY
