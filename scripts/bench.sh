#!/usr/bin/env bash
# carrot against its peers on SmolLM2-135M-Instruct, on CPU, side by side in one run:
#   scripts/bench.sh [carrot-bench flags]        e.g. --runs 5, --threads 4
# 1. scripts/setup.sh (ONNX Runtime into .cache/);
# 2. .venv-bench from bench/peers/requirements.txt: onnxruntime-genai 0.18.0 (builder and og.Generator),
#    torch + transformers (the builder's loader and the transformers peer), llama-cpp-python (llama.cpp,
#    built from source for this CPU: a C++ compiler and several minutes), gguf (for step 3); about 3 GB
#    to download, 6 GB on disk;
# 3. scripts/fetch-smollm2.sh (the real weights into .cache/smollm2-135m-instruct);
# 4. release builds of carrot-export, carrot and carrot-bench, then carrot-bench.
# Prints the table; writes target/bench/results.json (exports and per-run logs beside it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

VENV="$ROOT/.venv-bench"
REQ="$ROOT/bench/peers/requirements.txt"
if [[ ! -x "$VENV/bin/python" ]] || ! cmp -s "$REQ" "$VENV/requirements.txt"; then
  echo "bench.sh: creating $VENV (about 3 GB)" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # llama-cpp-python builds llama.cpp from source with these CMake flags.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"
  cp "$REQ" "$VENV/requirements.txt"
fi

PYTHON="$VENV/bin/python" bash scripts/fetch-smollm2.sh

cargo build --release --locked -p carrot -p carrot-export -p carrot-bench
exec target/release/carrot-bench "$@"
