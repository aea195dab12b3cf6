#!/usr/bin/env bash
# carrot-export on a Carrot-8B-shaped synthetic checkpoint against the disk's own time for the same
# bytes, measured in the same run.
#   scripts/bench-export.sh [--layers N] [--runs N] [--peer-python PY] [CASE...]
# CASE: fp16 (portable fp16), int4 (ort int4), lora (fp16 with a rank-128 Bunny LoRA merged),
# peer (carrot-export against onnxruntime-genai's builder, fp16 and int4 at block size 32, on a
# Llama-1B-shaped checkpoint: the largest the builder exports in this machine's memory; needs
# --peer-python, an interpreter with bench/peers/requirements.txt); default: fp16 int4 lora. Checkpoints are generated once under target/synth/ (17 GB, 46 s; the LoRA
# one 19 GB); each export is written to target/bench-export/out and removed after measuring.
# Before every export and every disk measurement the input's pages are dropped from the page cache,
# so the export reads from the disk as a first export does.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LAYERS=""
RUNS=1
PEER_PYTHON=""
CASES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --layers) LAYERS="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --peer-python) PEER_PYTHON="$2"; shift 2 ;;
    fp16 | int4 | lora | peer) CASES+=("$1"); shift ;;
    *) echo "bench-export.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ ${#CASES[@]} -gt 0 ]] || CASES=(fp16 int4 lora)
SUFFIX="${LAYERS:+-l$LAYERS}"
WORK="target/bench-export"
mkdir -p "$WORK"
cargo build --release --locked -q -p carrot-export --bin carrot-export --example synth_carrot --example synth_checkpoint
BIN=target/release

synth() { # DIR [--lora]
  [[ -d "$1" ]] || "$BIN/examples/synth_carrot" --out "$1" ${LAYERS:+--layers "$LAYERS"} "${@:2}" >&2
}
drop_cache() { # FILES...
  for f in "$@"; do dd if="$f" iflag=nocache count=0 status=none; done
}
inputs() { # DIR -> weight files
  find "$1" -name '*.safetensors' -o -name '*.bin' | sort
}
sum_bytes() { stat -c %s "$@" | awk '{s += $1} END {printf "%.0f\n", s}'; }
now() { date +%s.%N; }

# Runs CMD... under /usr/bin/time -v: sets WALL (seconds) and RSS_KB; on failure prints the end of
# the report and returns 1.
timed() {
  local report
  report="$( { /usr/bin/time -v "$@" >/dev/null; } 2>&1 )" || { echo "$report" | tail -5 >&2; return 1; }
  WALL="$(grep 'Elapsed (wall clock)' <<<"$report" | awk '{print $NF}' \
    | awk -F: '{ if (NF == 3) print $1 * 3600 + $2 * 60 + $3; else print $1 * 60 + $2 }')"
  RSS_KB="$(grep 'Maximum resident set size' <<<"$report" | awk '{print $NF}')"
}

# The disk's own time: read these files with a cold cache, write this many bytes and fsync.
disk_read_s() {
  drop_cache "$@"
  local t0; t0="$(now)"
  for f in "$@"; do dd if="$f" of=/dev/null bs=16M status=none; done
  echo "$(now) - $t0" | bc -l
}
disk_write_s() { # BYTES
  local t0; t0="$(now)"
  dd if=/dev/zero of="$WORK/disk-write" bs=16M count="$(( ($1 + (16 << 20) - 1) / (16 << 20) ))" conv=fsync status=none
  local t; t="$(echo "$(now) - $t0" | bc -l)"
  drop_cache "$WORK/disk-write"; rm -f "$WORK/disk-write"
  echo "$t"
}

# Both exporters on a Llama-1B-shaped checkpoint (16 layers, hidden 2048, vocab 128256, fp16).
peer() {
  [[ -n "$PEER_PYTHON" ]] || { echo "bench-export.sh: the peer case needs --peer-python" >&2; exit 2; }
  local model="target/synth/llama-1b"
  if [[ ! -f "$model/model.safetensors" ]]; then
    "$BIN/examples/synth_checkpoint" "$model" 16 2048 128256 >&2
    cp .cache/llama3-tokenizer/tokenizer.json .cache/llama3-tokenizer/tokenizer_config.json "$model/"
  fi
  mapfile -t files < <(inputs "$model")
  printf "\n| Llama-1B shape | exporter | wall s | peak RSS GB | written GB |\n|---|---|---:|---:|---:|\n"
  for dtype in fp16 int4; do
    for who in carrot ogenai; do
      rm -rf "$WORK/out" "$WORK/ogenai-cache"
      drop_cache "${files[@]}"
      if [[ $who == carrot ]]; then
        cmd=("$BIN/carrot-export" --model "$model" --out "$WORK/out" --dtype "$dtype" -q)
        [[ $dtype == int4 ]] && cmd+=(--flavor ort --block-size 32)
      else
        cmd=("$PEER_PYTHON" -m onnxruntime_genai.models.builder -i "$model" -o "$WORK/out" -p "$dtype" -e cpu -c "$WORK/ogenai-cache")
        [[ $dtype == int4 ]] && cmd+=(--extra_options block_size=32)
      fi
      timed "${cmd[@]}" || continue
      out_bytes="$(sum_bytes "$WORK"/out/*)"
      printf "| %s | %s | %.1f | %.2f | %.2f |\n" "$dtype" "$([[ $who == carrot ]] && echo carrot-export || echo 'onnxruntime-genai builder')" \
        "$WALL" "$(echo "$RSS_KB / 1000000" | bc -l)" "$(echo "$out_bytes / 1000000000" | bc -l)"
      rm -rf "$WORK/out" "$WORK/ogenai-cache"
    done
  done
}

if [[ " ${CASES[*]} " == *" peer "* ]]; then
  peer
  mapfile -t CASES < <(printf '%s\n' "${CASES[@]}" | grep -v '^peer$' || true)
  [[ ${#CASES[@]} -gt 0 ]] || exit 0
fi

printf "| case | read GB | written GB | export s | disk s (read + write) | ratio | peak RSS GB |\n"
printf "|---|---:|---:|---:|---:|---:|---:|\n"
for case in "${CASES[@]}"; do
  case "$case" in
    fp16) model="target/synth/carrot-8b$SUFFIX"; synth "$model"; args=(--model "$model" --dtype fp16) ;;
    int4) model="target/synth/carrot-8b$SUFFIX"; synth "$model"; args=(--model "$model" --dtype int4 --flavor ort) ;;
    lora) model="target/synth/carrot-8b-lora$SUFFIX"; synth "$model" --lora
          args=(--model "$model/lora" --base "$model/base" --dtype fp16) ;;
  esac
  mapfile -t files < <(inputs "$model")
  in_bytes="$(sum_bytes "${files[@]}")"
  for ((run = 1; run <= RUNS; run++)); do
    rm -rf "$WORK/out"
    drop_cache "${files[@]}"
    sync
    timed "$BIN/carrot-export" "${args[@]}" --out "$WORK/out" -q || exit 1
    out_bytes="$(sum_bytes "$WORK"/out/*)"
    rm -rf "$WORK/out"
    r="$(disk_read_s "${files[@]}")"
    w="$(disk_write_s "$out_bytes")"
    printf "| %s | %.2f | %.2f | %.1f | %.1f (%.1f + %.1f) | %.2f× | %.2f |\n" "$case" \
      "$(echo "$in_bytes / 1000000000" | bc -l)" "$(echo "$out_bytes / 1000000000" | bc -l)" "$WALL" \
      "$(echo "$r + $w" | bc -l)" "$r" "$w" "$(echo "$WALL / ($r + $w)" | bc -l)" "$(echo "$RSS_KB / 1000000" | bc -l)"
  done
done
