#!/usr/bin/env bash
# Regenerate the ONNX protobuf types used by carrot-graphs:
#   graphs/src/onnx/onnx.proto3   the schema, from onnx==1.23.2 (`python -m onnx.gen_proto -o DIR onnx`)
#   graphs/src/onnx/onnx.rs       prost 0.14 code generated from it by tools/protogen (protox, no protoc)
# Both files are committed; the normal build never runs this.
#
# Usage: scripts/gen-proto.sh [--schema]
#   --schema   also refresh onnx.proto3 from the onnx package in $PYTHON (must be onnx 1.23.2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ONNX_VERSION=1.23.2
PYTHON="${PYTHON:-python3}"
DEST="$ROOT/graphs/src/onnx"

say() { echo "gen-proto: $*" >&2; }

if [[ "${1:-}" == "--schema" ]]; then
  have="$("$PYTHON" -c 'import onnx; print(onnx.__version__)')" \
    || { say "$PYTHON cannot import onnx; pip install onnx==$ONNX_VERSION"; exit 1; }
  [[ "$have" == "$ONNX_VERSION" ]] || { say "$PYTHON has onnx $have, want $ONNX_VERSION"; exit 1; }
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m onnx.gen_proto -o "$tmp" onnx >/dev/null 2>&1
  cp "$tmp/onnx.proto3" "$DEST/onnx.proto3"
  say "refreshed $DEST/onnx.proto3 from onnx $ONNX_VERSION"
fi

CARGO_TARGET_DIR="$ROOT/target/protogen" cargo run --quiet --locked \
  --manifest-path "$ROOT/tools/protogen/Cargo.toml" -- "$DEST/onnx.proto3" "$DEST"
say "wrote $DEST/onnx.rs"
