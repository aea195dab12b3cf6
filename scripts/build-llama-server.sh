#!/usr/bin/env bash
# llama.cpp's `llama-server`, the serving peer of scripts/bench-serve.sh, built for this CPU from the
# llama.cpp sources that the PyPI sdist of llama-cpp-python 0.3.36 vendors (sha256 checked):
#   scripts/build-llama-server.sh [OUT]      OUT defaults to target/peers/llama-server
# Needs a C++ compiler and Python 3 (cmake and ninja come from PyPI into target/peers/build-venv).
# Takes about 5 minutes on 2 cores. The binary is static (no shared libraries to carry along), CPU
# only, without the web UI and HTTPS; it prints its version with --version.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-target/peers/llama-server}"
VERSION=0.3.36
SDIST="llama_cpp_python-$VERSION.tar.gz"
SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
WORK=target/peers/build
VENV=target/peers/build-venv
mkdir -p "$WORK" "$OUT"
if [[ ! -x "$VENV/bin/cmake" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check cmake ninja
fi
if [[ ! -f "$WORK/$SDIST" ]] || [[ "$(sha256sum "$WORK/$SDIST" | cut -d' ' -f1)" != "$SHA" ]]; then
  url="$(curl -sf "https://pypi.org/simple/llama-cpp-python/" | grep -o "https://[^\"#]*$SDIST" | head -1)"
  [[ -n "$url" ]] || { echo "build-llama-server.sh: $SDIST not found on PyPI" >&2; exit 1; }
  curl -sfL "$url" -o "$WORK/$SDIST"
  [[ "$(sha256sum "$WORK/$SDIST" | cut -d' ' -f1)" == "$SHA" ]] || {
    echo "build-llama-server.sh: $SDIST does not have sha256 $SHA" >&2
    exit 1
  }
fi
rm -rf "$WORK/src"
mkdir -p "$WORK/src"
tar -xzf "$WORK/$SDIST" -C "$WORK/src"
SRC="$WORK/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
PATH="$ROOT/$VENV/bin:$PATH" cmake -S "$SRC" -B "$WORK/out" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF >"$WORK/configure.log"
PATH="$ROOT/$VENV/bin:$PATH" cmake --build "$WORK/out" --target llama-server -j"$(nproc)" >"$WORK/build.log"
cp "$WORK/out/bin/llama-server" "$OUT/"
"$OUT/llama-server" --version 2>&1 | head -1 >&2
echo "$OUT/llama-server"
