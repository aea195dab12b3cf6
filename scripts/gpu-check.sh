#!/usr/bin/env bash
# GPU parity check: build with the CUDA and TensorRT providers, run the GPU tests with CPU
# fallback disabled, measure batched serving (scripts/bench-serve.sh on cuda), print a summary.
# Needs the onnxruntime-gpu 1.31.1 library with its CUDA 13 /
# cuDNN 9 / TensorRT 10 dependencies on the machine: point CARROT_ORT_LIB at its
# libonnxruntime.so (or have the Python package `onnxruntime-gpu` installed), and make the CUDA
# libraries findable (LD_LIBRARY_PATH).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG="${OUT:-target}/gpu-check.log"
mkdir -p "$(dirname "$LOG")"

if [[ -z "${CARROT_ORT_LIB:-}" ]]; then
  lib="$(python3 - <<'PY' 2>/dev/null
import os, onnxruntime
d = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
libs = sorted(f for f in os.listdir(d) if f.startswith("libonnxruntime.so"))
print(os.path.join(d, libs[-1]) if libs else "")
PY
)"
  [[ -n "$lib" ]] && export CARROT_ORT_LIB="$lib"
fi
echo "gpu-check: ONNX Runtime library: ${CARROT_ORT_LIB:-<not set>}" | tee "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

status=0
for feature in cuda tensorrt; do
  echo "== $feature ==" | tee -a "$LOG"
  if cargo test --release -p carrot --features "$feature" --test gpu -- --nocapture --test-threads 1 >>"$LOG" 2>&1; then
    echo "gpu-check: $feature PASSED" | tee -a "$LOG"
  else
    echo "gpu-check: $feature FAILED (see $LOG)" | tee -a "$LOG"
    status=1
  fi
done
echo "== batched serving (SmolLM2 int4 ort, carrot serve --max-batch 16 on cuda) ==" | tee -a "$LOG"
if FEATURES=carrot/cuda bash scripts/bench-serve.sh int4 --device cuda --seconds 10 >>"$LOG" 2>&1; then
  grep -E "^\| carrot \||x the aggregate|token-exact" "$LOG" | sed 's/^/GPU-CHECK serve: /' | tee -a "$LOG"
else
  echo "gpu-check: batched serving FAILED (see $LOG)" | tee -a "$LOG"
  status=1
fi
echo "== summary ==" | tee -a "$LOG"
grep -E "GPU-CHECK|test result|panicked" "$LOG" | tee -a "$LOG.summary"
exit $status
