#!/usr/bin/env bash
# The serving benchmark: `rcx serve` (dynamic batching) against a minimal PyTorch/
# transformers HTTP server doing one request per forward (scripts/serve_torch.py), on the
# same bert-tiny model folder, in the same run: throughput and p50/p99 latency at 1, 16
# and 64 concurrent clients. Each request is one prompt of the shipped set's eval split
# with its first K completions (POST /score; K = 8, all of them, by default); every client
# sends its next request as soon as the previous is answered, over one keep-alive
# connection; the clients are coroutines of one Python thread.
#
# Usage: scripts/bench-serve.sh [--model DIR] [--seconds S] [--clients "1 16 64"]
#                               [--completions K] [--max-batch N] [--max-wait-ms T]
#                               [--threads N]
#   --model    default: a bert-tiny trained for 2 steps on the shipped set (weights do not
#              change the speed), written under target/tmp/bench-serve/
#   --seconds  measured seconds per (server, clients) point, after 1 s of warm-up (default 10)
#   --max-batch  rcx's gather (default 256: on a CPU a forward gains little past ~8
#              sequences, but a larger gather sorts by length better, so pads less)
#   --threads  compute threads of each server (default: all cores)
# Needs a python with torch and transformers in $PYTHON (default python3). Loopback only.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODEL=""
SECONDS_PER_POINT=10
CLIENTS="1 16 64"
COMPLETIONS=8
MAX_BATCH=256
MAX_WAIT_MS=5
THREADS="$(nproc)"
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --seconds) SECONDS_PER_POINT="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --completions) COMPLETIONS="$2"; shift 2 ;;
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

SERVER_PIDS=()
stop_servers() {
    for pid in "${SERVER_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    SERVER_PIDS=()
}
trap stop_servers EXIT

# Starts "$@" in the background, its stderr to $WORK/NAME.err; sets PORT from its
# "listening on http://127.0.0.1:PORT" line (120 s at most: torch imports slowly).
start_server() {
    local name="$1"
    shift
    "$@" 2> "$WORK/$name.err" &
    local pid=$!
    SERVER_PIDS+=("$pid")
    PORT=""
    for _ in $(seq 1200); do
        PORT="$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$WORK/$name.err" | grep -o '[0-9]*$' || true)"
        [ -n "$PORT" ] && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "bench-serve: the $name server did not start:" >&2
    cat "$WORK/$name.err" >&2
    exit 1
}

# Both servers up at once, and each load level run on one then the other, so that a
# change in the machine's load between levels touches both alike.
start_server rcx env RAYON_NUM_THREADS="$THREADS" "$RCX" serve --model "$MODEL" --port 0 \
    --max-batch "$MAX_BATCH" --max-wait-ms "$MAX_WAIT_MS"
RCX_PORT="$PORT"
start_server torch env OMP_NUM_THREADS="$THREADS" "$PYTHON" scripts/serve_torch.py \
    --model "$MODEL" --port 0 --threads "$THREADS"
TORCH_PORT="$PORT"

RESULTS="$WORK/results.txt"
: > "$RESULTS"
for clients in $CLIENTS; do
    for impl in rcx torch; do
        port="$RCX_PORT"
        [ "$impl" = torch ] && port="$TORCH_PORT"
        echo "bench-serve: $impl, $clients clients" >&2
        "$PYTHON" - "$impl" "$port" "$clients" "$SECONDS_PER_POINT" \
            data/kjv-jargon/eval.jsonl "$COMPLETIONS" <<'PY' | tee -a "$RESULTS" >&2
# The load: `clients` coroutines on one thread (so that the load generator is one
# runnable thread on a shared machine, however many clients), each on one keep-alive
# connection, sending the eval prompts round-robin; latencies of requests that end inside
# the measured window. A failed request (not 200, the wrong count, a dropped connection)
# counts as an error and reconnects.
import asyncio, json, sys, time
impl, port, clients, seconds, data, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], int(sys.argv[6])
records = [json.loads(line) for line in open(data)]
requests = []
for r in records:
    body = json.dumps({"prompt": r["prompt"], "completions": r["completions"][:k]}).encode()
    head = (f"POST /score HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    requests.append((head + body, len(r["completions"][:k])))
latencies, errors = [], 0

async def exchange(reader, writer, raw, n):
    writer.write(raw)
    await writer.drain()
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    answer = await reader.readexactly(length)
    return status.split()[1:2] == [b"200"] and len(json.loads(answer)["rewards"]) == n

async def client(c, measure_from, measure_to):
    global errors
    i = c
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while (sent := time.perf_counter()) < measure_to:
        raw, n = requests[i % len(requests)]
        try:
            ok = await asyncio.wait_for(exchange(reader, writer, raw, n), 60)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, KeyError, IndexError):
            ok = False
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        done = time.perf_counter()
        if not ok:
            errors += 1
        elif sent >= measure_from and done <= measure_to:
            latencies.append(done - sent)
        i += clients
    writer.close()

async def main():
    start = time.perf_counter()
    measure_from = start + 1.0  # warm-up
    await asyncio.gather(*(client(c, measure_from, measure_from + seconds) for c in range(clients)))

asyncio.run(main())
latencies.sort()
q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")
print(f"RESULT impl={impl} clients={clients} requests={len(latencies)} errors={errors} "
      f"rps={len(latencies) / seconds:.1f} p50_ms={q(0.5):.1f} p99_ms={q(0.99):.1f}")
PY
    done
done
stop_servers

"$PYTHON" - "$RESULTS" "$THREADS" "$SECONDS_PER_POINT" "$MAX_BATCH" "$MAX_WAIT_MS" "$COMPLETIONS" <<'PY'
import sys
rows = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in open(sys.argv[1]) if line.startswith("RESULT")]
threads, seconds, max_batch, max_wait, k = sys.argv[2:7]
print(f"threads per server: {threads}; {seconds} s per point; rcx --max-batch {max_batch} --max-wait-ms {max_wait}; "
      f"one request = one prompt with {k} completion(s)")
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
