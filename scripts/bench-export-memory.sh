#!/usr/bin/env bash
# Export memory must not grow with model size: synthesize two Llama checkpoints that differ only
# in depth (same largest tensor), export both with /usr/bin/time -v, and compare peak RSS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="${1:-target/bench-export-memory}"
SMALL="${SMALL_LAYERS:-4}"
LARGE="${LARGE_LAYERS:-24}"
cargo build --release -q -p carrot-export --bin carrot-export --example synth_checkpoint
mkdir -p "$WORK"
printf "%-8s %12s %12s %10s\n" layers weights_MB peak_RSS_MB seconds
for layers in "$SMALL" "$LARGE"; do
  model="$WORK/llama-$layers"
  [[ -f "$model/model.safetensors" ]] || target/release/examples/synth_checkpoint "$model" "$layers" 2>/dev/null
  rm -rf "$WORK/out-$layers"
  report="$( { /usr/bin/time -v target/release/carrot-export --model "$model" --out "$WORK/out-$layers" --dtype fp16 -q >/dev/null; } 2>&1 )"
  rss_kb="$(grep 'Maximum resident set size' <<<"$report" | awk '{print $NF}')"
  wall="$(grep 'Elapsed (wall clock)' <<<"$report" | awk '{print $NF}')"
  mb="$(du -m "$model/model.safetensors" | cut -f1)"
  printf "%-8s %12s %12s %10s\n" "$layers" "$mb" "$((rss_kb / 1024))" "$wall"
done
