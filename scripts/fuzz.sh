#!/usr/bin/env bash
# Fuzz Carrot's parsers of untrusted input with cargo-fuzz (libFuzzer), each target for a budget.
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 600 s, every target
# Needs a nightly toolchain and cargo-fuzz (`cargo +nightly install cargo-fuzz`), and
# .cache/llama3-tokenizer (scripts/setup.sh) for the prompt target. Not part of CI.
# Corpora grow in target/fuzz/corpus/TARGET, seeded from fixtures/ and fuzz/seeds/. A crash is
# written to fuzz/artifacts/TARGET/; keep it as a regression input in fuzz/regressions/TARGET/
# (scripts/fuzz.sh replays those first) once the bug is fixed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"

SECONDS_PER_TARGET="${1:-600}"
shift || true
ALL=(safetensors_file safetensors_index model_config adapter_config manifest torch_bin image_preprocess prompt)
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=("${ALL[@]}")

seeds() { # TARGET -> seed files
  case "$1" in
    safetensors_file) ls "$ROOT"/fixtures/goldens/decoder_*16.safetensors "$ROOT"/fixtures/lora_merge/*/adapter_model.safetensors ;;
    safetensors_index) ls "$ROOT"/fixtures/models/*/model.safetensors.index.json ;;
    model_config) ls "$ROOT"/fixtures/models/*/config.json "$ROOT"/fixtures/models/*/preprocessor_config.json ;;
    adapter_config) ls "$ROOT"/fixtures/models/*/adapter_config.json "$ROOT"/fixtures/lora_merge/*/adapter_config.json ;;
    torch_bin) ls "$ROOT"/fixtures/torch_bin/*.bin ;;
    *) ls "$ROOT/fuzz/seeds/$1"/* ;;
  esac
}

cargo +nightly fuzz build -O
status=0
for t in "${TARGETS[@]}"; do
  corpus="$ROOT/target/fuzz/corpus/$t"
  mkdir -p "$corpus"
  seeds "$t" | while read -r f; do cp -n "$f" "$corpus/" 2>/dev/null || true; done
  if [[ -d "$ROOT/fuzz/regressions/$t" ]]; then
    for f in "$ROOT/fuzz/regressions/$t"/*; do
      cargo +nightly fuzz run -O "$t" "$f" >/dev/null 2>&1 || { echo "$t: regression input $f fails again"; status=1; }
    done
  fi
  log="$ROOT/target/fuzz/$t.log"
  echo "$t: fuzzing for $SECONDS_PER_TARGET s (log $log)"
  if cargo +nightly fuzz run -O "$t" "$corpus" -- -max_total_time="$SECONDS_PER_TARGET" -timeout=10 \
      -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
    echo "$t: $(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}') runs, $(ls "$corpus" | wc -l) corpus inputs, nothing found"
  else
    echo "$t: FOUND a failure — see $log and fuzz/artifacts/$t/"
    status=1
  fi
done
exit $status
