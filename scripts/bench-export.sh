#!/usr/bin/env bash
# carrot-export on a Carrot-8B-shaped synthetic checkpoint against the disk's own time for the same
# bytes, measured in the same run.
#   scripts/bench-export.sh [--layers N] [--runs N] [CASE...]
# CASE: fp16 (portable fp16), int4 (ort int4), lora (fp16 with a rank-128 Bunny LoRA merged);
# default: all three. Checkpoints are generated once under target/synth/ (17 GB, 46 s; the LoRA
# one 19 GB); each export is written to target/bench-export/out and removed after measuring.
# Before every export and every disk measurement the input's pages are dropped from the page cache,
# so the export reads from the disk as a first export does.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LAYERS=""
RUNS=1
CASES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --layers) LAYERS="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    fp16 | int4 | lora) CASES+=("$1"); shift ;;
    *) echo "bench-export.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ ${#CASES[@]} -gt 0 ]] || CASES=(fp16 int4 lora)
SUFFIX="${LAYERS:+-l$LAYERS}"
WORK="target/bench-export"
mkdir -p "$WORK"
cargo build --release --locked -q -p carrot-export --bin carrot-export --example synth_carrot
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
    report="$( { /usr/bin/time -v "$BIN/carrot-export" "${args[@]}" --out "$WORK/out" -q >/dev/null; } 2>&1 )" \
      || { echo "$report" >&2; exit 1; }
    wall="$(grep 'Elapsed (wall clock)' <<<"$report" | awk '{print $NF}' | awk -F: '{ if (NF == 3) print $1 * 3600 + $2 * 60 + $3; else print $1 * 60 + $2 }')"
    rss_kb="$(grep 'Maximum resident set size' <<<"$report" | awk '{print $NF}')"
    out_bytes="$(sum_bytes "$WORK"/out/*)"
    rm -rf "$WORK/out"
    r="$(disk_read_s "${files[@]}")"
    w="$(disk_write_s "$out_bytes")"
    printf "| %s | %.2f | %.2f | %.1f | %.1f (%.1f + %.1f) | %.2f× | %.2f |\n" "$case" \
      "$(echo "$in_bytes / 1000000000" | bc -l)" "$(echo "$out_bytes / 1000000000" | bc -l)" "$wall" \
      "$(echo "$r + $w" | bc -l)" "$r" "$w" "$(echo "$wall / ($r + $w)" | bc -l)" "$(echo "$rss_kb / 1000000" | bc -l)"
  done
done
