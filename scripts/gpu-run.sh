#!/usr/bin/env bash
# The GPU check, run from an unpacked scripts/gpu-bundle.sh bundle on a host with the NVIDIA
# driver, CUDA 13 / cuDNN 9 and Python 3 (no Rust, no network):
#   CARROT_ORT_LIB=/path/libonnxruntime.so.1.31.1 LD_LIBRARY_PATH=... carrot-gpu/gpu-run.sh [WORK]
# Environment: DEVICE (default cuda; `tensorrt` where TensorRT is installed; `cpu` checks the bundle
# itself anywhere), SYNTH_8B=1 to also generate, export and run a Carrot-8B-shaped int4 model
# (needs about 25 GB of disk and a GPU with 10 GB). Both also run `carrot serve --max-batch 16` under
# bench/loadgen.py (1 and 8 clients on the tiny model, 1 and 16 on the 8B one) for the batched
# figures. Every line of the result starts with GPU-CHECK.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${1:-$HERE/work}"
DEVICE="${DEVICE:-cuda}"
: "${CARROT_ORT_LIB:?set CARROT_ORT_LIB to the onnxruntime-gpu 1.31.1 libonnxruntime.so}"
export CARROT_ORT_LIB
BIN="$HERE/bin"
mkdir -p "$WORK"
say() { echo "GPU-CHECK $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU-CHECK gpu: /'

export_tiny() { # NAME DTYPE FLAVOR
  local out="$WORK/$1"
  rm -rf "$out"
  "$BIN/carrot-export" --model "$HERE/fixtures/models/carrot-tiny" --out "$out" --dtype "$2" --flavor "$3" -q \
    >/dev/null 2>"$WORK/$1.export.err" && cp "$HERE/tokenizer/"*.json "$out/"
}

generate() { # DIR DEVICE N -> JSON line
  "$BIN/carrot" generate --model "$1" --device "$2" --image "$HERE/fixtures/images/chelsea.png" \
    --prompt "What is in this picture?" --temperature 0 --ignore-eos --max-new-tokens "$3" --json
}

compare() { # LABEL GOT.json WANT.json|golden MODE(exact|report)
  python3 - "$@" <<'PY'
import json, sys
label, got_path, want, mode = sys.argv[1:5]
got = json.load(open(got_path))
if want == "golden":
    g = json.load(open(sys.argv[5]))
    ids = g["records"]["carrot_image"]["output_ids"]
else:
    ids = json.load(open(want))["token_ids"]
ours = got["token_ids"][: len(ids)]
same = next((i for i, (a, b) in enumerate(zip(ours, ids)) if a != b), min(len(ours), len(ids)))
t = got["timings"]
tok_s = (got["generated_tokens"] - 1) / t["decode_ms"] * 1e3 if t["decode_ms"] > 0 else float("nan")
ok = same == len(ids) if mode == "exact" else same > 0
print(f"GPU-CHECK {label}: {'PASS' if ok else 'FAIL'} first {same} of {len(ids)} tokens equal; "
      f"load {t['load_ms']:.0f} ms, prefill {t['prefill_ms']:.1f} ms, decode {tok_s:.1f} tok/s")
sys.exit(0 if ok else 1)
PY
}

# carrot serve with continuous batching on DEVICE: loadgen with each client count in turn (the
# batch runs first check that answers in one batch equal the answers alone).
serve_load() { # LABEL DIR SECONDS CLIENTS...
  local label="$1" dir="$2" secs="$3" port=18181
  shift 3
  "$BIN/carrot" serve --model "$dir" --device "$DEVICE" --port "$port" --max-batch 16 --max-queue 256 \
    >"$WORK/$label.serve.log" 2>&1 &
  local pid=$! ready=0
  for _ in $(seq 1 1500); do
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
      "http://127.0.0.1:$port/ready" 2>/dev/null && { ready=1; break; }
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if [[ $ready != 1 ]]; then
    say "$label serve on $DEVICE: FAIL $(tail -1 "$WORK/$label.serve.log")"; kill "$pid" 2>/dev/null; return 1
  fi
  local c extra rc=0
  for c in "$@"; do
    extra=()
    [[ $c -gt 1 ]] && extra=(--check-exact)
    if python3 "$HERE/loadgen.py" --url "http://127.0.0.1:$port" --clients "$c" --seconds "$secs" \
      --max-tokens 64 --server-pid "$pid" --json "${extra[@]}" >"$WORK/$label.$c.json" 2>"$WORK/$label.$c.err"; then
      python3 - "$label on $DEVICE" "$WORK/$label.$c.json" <<'PY' || rc=1
import json, sys
r = json.load(open(sys.argv[2]))
exact = "" if r["exact"] is None else f"; {r['exact']} of {r['clients']} greedy answers in one batch equal the answers alone"
ok = r["errors"] == 0 and (r["exact"] is None or r["exact"] == r["clients"])
print(f"GPU-CHECK {sys.argv[1]} serve --max-batch 16, {r['clients']} clients: {'PASS' if ok else 'FAIL'} "
      f"{r['tokens_per_s']:.1f} tok/s, {r['requests_per_s']:.2f} req/s, TTFT p50/p99 {r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f} ms, "
      f"ITL p50/p99 {r['itl_p50_ms']:.1f}/{r['itl_p99_ms']:.1f} ms, {r['errors']} errors{exact}")
sys.exit(0 if ok else 1)
PY
    else
      say "$label serve, $c clients: FAIL $(tail -1 "$WORK/$label.$c.err")"; rc=1
    fi
  done
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  return $rc
}

status=0
N="$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['records']['carrot_image']['output_ids']))" "$HERE/fixtures/goldens/generate.json")"
for spec in "fp32 portable exact" "fp16 portable half" "fp32 ort exact" "fp16 ort half" "int4 ort same-export"; do
  set -- $spec
  name="tiny-$1-$2"
  export_tiny "$name" "$1" "$2" || { say "$name: FAIL export: $(tail -1 "$WORK/$name.export.err")"; status=1; continue; }
  if ! generate "$WORK/$name" "$DEVICE" "$N" >"$WORK/$name.$DEVICE.json" 2>"$WORK/$name.$DEVICE.err"; then
    say "$name on $DEVICE: FAIL $(tail -1 "$WORK/$name.$DEVICE.err")"; status=1; continue
  fi
  case "$3" in
    exact) compare "$name on $DEVICE vs the transformers golden" "$WORK/$name.$DEVICE.json" golden exact "$HERE/fixtures/goldens/generate.json" || status=1 ;;
    # The golden's smallest top-1 margin over its tokens (0.034) is ten times fp16's logit error
    # (3.8e-3 on the CPU, where fp16 gives every golden token), so fp16 must give them all.
    half) compare "$name on $DEVICE vs the transformers golden (fp16: every token)" "$WORK/$name.$DEVICE.json" golden exact "$HERE/fixtures/goldens/generate.json" || status=1 ;;
    same-export)
      generate "$WORK/$name" cpu "$N" >"$WORK/$name.cpu.json" 2>/dev/null
      compare "$name on $DEVICE vs the same export on the CPU" "$WORK/$name.$DEVICE.json" "$WORK/$name.cpu.json" report || status=1 ;;
  esac
done

serve_load tiny-fp32-ort "$WORK/tiny-fp32-ort" 5 1 8 || status=1

if [[ "${SYNTH_8B:-0}" == 1 ]]; then
  "$BIN/synth_carrot" --out "$WORK/carrot-8b" >/dev/null 2>&1 || say "8B: FAIL synth_carrot"
  "$BIN/carrot-export" --model "$WORK/carrot-8b" --out "$WORK/carrot-8b-int4-ort" --dtype int4 --flavor ort -q \
    >/dev/null 2>"$WORK/8b-export.err" || say "8B: FAIL export: $(tail -1 "$WORK/8b-export.err")"
  rm -rf "$WORK/carrot-8b"
  if generate "$WORK/carrot-8b-int4-ort" "$DEVICE" 64 >"$WORK/8b.json" 2>"$WORK/8b.err"; then
    python3 - "$WORK/8b.json" "$WORK/carrot-8b-int4-ort/decoder.onnx.data" <<'PY'
import json, os, sys
d = json.load(open(sys.argv[1])); t = d["timings"]; gb = os.path.getsize(sys.argv[2]) / 1e9
tok_s = (d["generated_tokens"] - 1) / t["decode_ms"] * 1e3
print(f"GPU-CHECK 8B int4 ort: load {t['load_ms']/1e3:.1f} s, vision {t['vision_ms']:.0f} ms, prefill {t['prefill_ms']:.0f} ms "
      f"({d['prompt_tokens']} positions), decode {tok_s:.1f} tok/s = {tok_s*gb:.0f} GB/s of decoder weights read")
PY
    serve_load 8B-int4-ort "$WORK/carrot-8b-int4-ort" 20 1 16 || status=1
  else
    say "8B on $DEVICE: FAIL $(tail -1 "$WORK/8b.err")"; status=1
  fi
fi
say "done: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
