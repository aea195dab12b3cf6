#!/usr/bin/env bash
# carrot serve under load: one server, bench/loadgen.py with each client count in turn, and the
# aggregate throughput of the most clients as a multiple of one client's, measured in the same run.
#   scripts/bench-serve.sh [--model DIR | FORMAT] [--clients "1 16"] [--seconds 20]
#                          [--max-tokens 64] [--max-batch 16] [--device DEV] [--image PNG]
#                          [--peer-llama-server BIN [--peer-gguf FILE]]
# FORMAT (default int4) exports SmolLM2-135M-Instruct (scripts/fetch-smollm2.sh) with
# `--flavor ort --dtype FORMAT` into target/bench-serve/ once. The batch run first checks that
# every client's greedy answer in one batch equals its answer alone (loadgen --check-exact).
# FEATURES (e.g. carrot/cuda) builds `carrot` with a GPU provider for --device cuda.
# --peer-llama-server runs llama.cpp's server (`--parallel` = --max-batch slots, continuous
# batching, 2 threads) on the GGUF the SmolLM2 checkpoint was converted from (its own Q4_1
# quantization; --peer-gguf for another) under the same load, after carrot, and reports carrot's
# tokens/s as a multiple of the peer's for each client count (scripts/build-llama-server.sh builds
# it into target/peers/llama-server/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL=""
FORMAT=int4
CLIENTS="1 16"
SECONDS_EACH=20
MAX_TOKENS=64
MAX_BATCH=16
DEVICE=cpu
IMAGE=""
PEER_BIN=""
PEER_GGUF="${CARROT_CACHE:-$ROOT/.cache}/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --clients) CLIENTS="$2"; shift 2 ;;
    --seconds) SECONDS_EACH="$2"; shift 2 ;;
    --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
    --max-batch) MAX_BATCH="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
    --peer-llama-server) PEER_BIN="$2"; shift 2 ;;
    --peer-gguf) PEER_GGUF="$2"; shift 2 ;;
    fp32 | fp16 | int4 | int8) FORMAT="$1"; shift ;;
    *) echo "bench-serve.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-${CARROT_PYTHON:-python3}}"
cargo build --release --locked -q -p carrot -p carrot-export --bin carrot --bin carrot-export \
  ${FEATURES:+--features "$FEATURES"}
BIN=target/release
if [[ -z "$MODEL" ]]; then
  MODEL="target/bench-serve/smollm2-$FORMAT-ort"
  if [[ ! -f "$MODEL/carrot.json" ]]; then
    hf="${CARROT_CACHE:-$ROOT/.cache}/smollm2-135m-instruct"
    PYTHON="$PYTHON" bash scripts/fetch-smollm2.sh "$hf" >&2
    "$BIN/carrot-export" --model "$hf" --out "$MODEL" --dtype "$FORMAT" --flavor ort -q >&2
  fi
fi
ORT_LIB="${CARROT_ORT_LIB:-$(ls "${CARROT_CACHE:-$ROOT/.cache}"/onnxruntime/*/libonnxruntime.so.* 2>/dev/null | head -1)}"
PORT="${PORT:-18123}"
WORK="target/bench-serve"
mkdir -p "$WORK"
PID=""
trap '[[ -n "$PID" ]] && kill $PID 2>/dev/null; wait 2>/dev/null || true' EXIT

start() { # LOG URL_PATH COMMAND...: start a server, wait until URL_PATH answers 200
  local log="$1" path="$2"
  shift 2
  "$@" >"$log" 2>&1 &
  PID=$!
  for _ in $(seq 1 900); do
    curl -sf "http://127.0.0.1:$PORT$path" >/dev/null && return 0
    kill -0 $PID 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.2
  done
  echo "bench-serve.sh: the server did not become ready (see $log)" >&2
  exit 1
}
stop() {
  kill $PID 2>/dev/null
  wait $PID 2>/dev/null || true
  PID=""
}

declare -A RATE
EXACT=""
measure() { # LABEL [--check-exact]: one table row per client count against the running server
  local label="$1" check="${2:-}" c json
  for c in $CLIENTS; do
    extra=()
    [[ "$c" -gt 1 && -n "$check" ]] && extra+=(--check-exact)
    [[ -n "$IMAGE" ]] && extra+=(--image "$IMAGE")
    json="$(python3 bench/loadgen.py --url "http://127.0.0.1:$PORT" --clients "$c" --seconds "$SECONDS_EACH" \
      --max-tokens "$MAX_TOKENS" --server-pid "$PID" --json "${extra[@]}")"
    python3 - "$label" "$json" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
rss = r["server_peak_rss_mb"]
print(f"| {sys.argv[1]} | {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
      f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | "
      f"{r['errors']} | {'—' if rss is None else f'{rss:.0f}'} |")
PY
    RATE[$label,$c]="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["tokens_per_s"])' "$json")"
    e="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["exact"] or "")' "$json")"
    if [[ -n "$e" ]]; then EXACT="$e of $c"; fi
  done
}
ratio() { python3 -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}")' "$1" "$2"; }

echo "carrot serve --model $MODEL --max-batch $MAX_BATCH --device $DEVICE${PEER_BIN:+; llama.cpp llama-server -m $PEER_GGUF --parallel $MAX_BATCH}"
echo "loadgen: ${SECONDS_EACH} s per row, $MAX_TOKENS greedy tokens per answer${IMAGE:+, an image in every 4th request}"
echo
echo "| server | clients | requests/s | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors | server peak RSS MB |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
start "$WORK/serve.log" /ready "$BIN/carrot" serve --model "$MODEL" --port "$PORT" --device "$DEVICE" \
  --max-batch "$MAX_BATCH" --max-queue 256 ${ORT_LIB:+--ort-lib "$ORT_LIB"}
measure carrot check
stop
if [[ -n "$PEER_BIN" ]]; then
  # Each slot gets 512 positions of context: a prompt and its answer fit.
  start "$WORK/llama-server.log" /health "$PEER_BIN" -m "$PEER_GGUF" --host 127.0.0.1 --port "$PORT" \
    -t 2 --parallel "$MAX_BATCH" -c $((512 * MAX_BATCH))
  measure llama.cpp
  stop
fi
first="${CLIENTS%% *}"
last="${CLIENTS##* }"
echo
echo "carrot, $last clients: $(ratio "${RATE[carrot,$last]}" "${RATE[carrot,$first]}")x the aggregate tokens/s of $first"
if [[ -n "$EXACT" ]]; then
  echo "carrot, token-exact: $EXACT greedy answers in one batch equal the answers alone"
fi
if [[ -n "$PEER_BIN" ]]; then
  echo "llama.cpp, $last clients: $(ratio "${RATE[llama.cpp,$last]}" "${RATE[llama.cpp,$first]}")x the aggregate tokens/s of $first"
  for c in $CLIENTS; do
    echo "carrot / llama.cpp tokens/s, $c clients: $(ratio "${RATE[carrot,$c]}" "${RATE[llama.cpp,$c]}")"
  done
fi
