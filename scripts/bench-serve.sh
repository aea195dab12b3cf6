#!/usr/bin/env bash
# carrot serve under load: one server, bench/loadgen.py with each client count in turn, and the
# aggregate throughput of the most clients as a multiple of one client's, measured in the same run.
#   scripts/bench-serve.sh [--model DIR | FORMAT] [--clients "1 16"] [--seconds 20]
#                          [--max-tokens 64] [--max-batch 16] [--device DEV] [--image PNG]
# FORMAT (default int4) exports SmolLM2-135M-Instruct (scripts/fetch-smollm2.sh) with
# `--flavor ort --dtype FORMAT` into target/bench-serve/ once. The batch run first checks that
# every client's greedy answer in one batch equals its answer alone (loadgen --check-exact).
# FEATURES (e.g. carrot/cuda) builds `carrot` with a GPU provider for --device cuda.
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
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --clients) CLIENTS="$2"; shift 2 ;;
    --seconds) SECONDS_EACH="$2"; shift 2 ;;
    --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
    --max-batch) MAX_BATCH="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
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
LOG="target/bench-serve/serve.log"
mkdir -p "$(dirname "$LOG")"
"$BIN/carrot" serve --model "$MODEL" --port "$PORT" --device "$DEVICE" --max-batch "$MAX_BATCH" \
  --max-queue 256 ${ORT_LIB:+--ort-lib "$ORT_LIB"} >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break
  kill -0 $PID 2>/dev/null || { cat "$LOG" >&2; exit 1; }
  sleep 0.2
done
echo "carrot serve --model $MODEL --max-batch $MAX_BATCH --device $DEVICE; loadgen: ${SECONDS_EACH} s per row, $MAX_TOKENS tokens per answer${IMAGE:+, an image in every 4th request}"
echo
echo "| clients | requests/s | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors | server peak RSS MB |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
declare -A RATE
EXACT=""
for c in $CLIENTS; do
  extra=()
  [[ "$c" -gt 1 ]] && extra+=(--check-exact)
  [[ -n "$IMAGE" ]] && extra+=(--image "$IMAGE")
  json="$(python3 bench/loadgen.py --url "http://127.0.0.1:$PORT" --clients "$c" --seconds "$SECONDS_EACH" \
    --max-tokens "$MAX_TOKENS" --server-pid "$PID" --json "${extra[@]}")"
  python3 - "$json" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
rss = r["server_peak_rss_mb"]
print(f"| {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
      f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | "
      f"{r['errors']} | {'—' if rss is None else f'{rss:.0f}'} |")
PY
  RATE[$c]="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["tokens_per_s"])' "$json")"
  e="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["exact"] or "")' "$json")"
  [[ -n "$e" ]] && EXACT="$e of $c"
done
first="${CLIENTS%% *}"
last="${CLIENTS##* }"
echo
python3 -c "import sys; print(f'{sys.argv[3]} clients: {float(sys.argv[2]) / float(sys.argv[1]):.2f}x the aggregate tokens/s of {sys.argv[4]}')" \
  "${RATE[$first]}" "${RATE[$last]}" "$last" "$first"
[[ -n "$EXACT" ]] && echo "token-exact: $EXACT greedy answers in one batch equal the answers alone"
