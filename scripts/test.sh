#!/usr/bin/env bash
# Run Carrot's whole test suite on a fresh machine: fetch ONNX Runtime and the tokenizer into .cache/,
# make the Python test venv (ONNX checker, plain-onnxruntime host), then cargo test.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

VENV="$ROOT/.venv-test"
if [[ ! -x "$VENV/bin/python" ]] || ! cat tests/python/requirements.txt tests/python/requirements-nodeps.txt | cmp -s - "$VENV/requirements.txt"; then
  echo "test.sh: creating $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r tests/python/requirements-nodeps.txt
  cat tests/python/requirements.txt tests/python/requirements-nodeps.txt >"$VENV/requirements.txt"
fi
export CARROT_PYTHON="$VENV/bin/python"

LOG="$ROOT/target/test.log"
mkdir -p "$ROOT/target"
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$LOG" || status=$?
# One closing line over every test binary (cargo prints one result line per binary).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$LOG"
exit "$status"
