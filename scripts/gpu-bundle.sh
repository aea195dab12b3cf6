#!/usr/bin/env bash
# Build, on a machine with Rust, everything the GPU check needs into one small bundle that runs on a
# GPU host with only the NVIDIA driver, the CUDA 13 / cuDNN 9 runtime libraries and Python 3:
#   scripts/gpu-bundle.sh [OUT]          OUT defaults to target/gpu-bundle.tar.xz
# The bundle holds stripped `carrot`, `carrot-export` (CUDA and TensorRT providers compiled in) and
# `synth_carrot`, the carrot-tiny fixture (with the siglip-tiny tower it names), its golden tokens, a photo, the Llama 3 tokenizer,
# scripts/gpu-run.sh and bench/loadgen.py. The ONNX Runtime GPU library is not in it: the run step takes its path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-target/gpu-bundle.tar.xz}"
bash scripts/setup.sh >/dev/null

cargo build --release --locked -p carrot --features cuda,tensorrt --bin carrot
cargo build --release --locked -p carrot-export --bin carrot-export --example synth_carrot

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
B="$STAGE/carrot-gpu"
mkdir -p "$B/bin" "$B/fixtures/models" "$B/fixtures/images" "$B/fixtures/goldens" "$B/tokenizer"
for bin in target/release/carrot target/release/carrot-export target/release/examples/synth_carrot; do
  strip -o "$B/bin/$(basename "$bin")" "$bin"
done
cp -r fixtures/models/carrot-tiny fixtures/models/siglip-tiny "$B/fixtures/models/"
cp fixtures/images/chelsea.png "$B/fixtures/images/"
cp fixtures/goldens/generate.json "$B/fixtures/goldens/"
cp .cache/llama3-tokenizer/tokenizer.json .cache/llama3-tokenizer/tokenizer_config.json "$B/tokenizer/"
cp scripts/gpu-run.sh bench/loadgen.py "$B/"
mkdir -p "$(dirname "$OUT")"
tar -C "$STAGE" -cJf "$OUT" carrot-gpu
echo "gpu-bundle: $OUT ($(du -h "$OUT" | cut -f1)); on the GPU host: tar xf it, then" >&2
echo "  CARROT_ORT_LIB=/path/libonnxruntime.so.1.31.1 LD_LIBRARY_PATH=<CUDA libs> carrot-gpu/gpu-run.sh" >&2
