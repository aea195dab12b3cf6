#!/usr/bin/env python3
"""One decode step of an `ort`-flavor export in ONNX Runtime alone, by batch size: the ceiling
that batching can reach on a machine, without Carrot's host code.

Usage:
  python bench/decode_batch.py --model DIR [--batch 1,4,8,16] [--past 100] [--capacity 256]
                               [--threads 2] [--steps 20] [--profile]

Each row holds `--past` positions in a shared KV buffer of `--capacity` positions (bound in place
as past and present, as `carrot` binds it) and decodes one token per step. Prints milliseconds
per step and tokens per second for each batch size, and each batch size's throughput as a
multiple of the first's; `--profile` adds the share of kernel time per operator over the run.
Needs numpy and onnxruntime (tests/python/requirements.txt).
"""

import argparse
import collections
import json
import os
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", default="1,4,8,16")
    ap.add_argument("--past", type=int, default=100)
    ap.add_argument("--capacity", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    manifest = json.load(open(os.path.join(args.model, "carrot.json")))
    if manifest.get("kv_cache") != "shared":
        raise SystemExit(f"{args.model}: kv_cache is not \"shared\"; export with --flavor ort")
    text = manifest["text"]
    layers, kv, head_dim, hidden = text["num_layers"], text["num_kv_heads"], text["head_dim"], text["hidden_size"]
    act = np.float16 if manifest["activation_dtype"] == "float16" else np.float32
    if args.past + 1 > args.capacity:
        raise SystemExit("--past must be below --capacity")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = args.profile
    session = ort.InferenceSession(os.path.join(args.model, manifest["graphs"]["decoder"]), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    first = None
    for batch in [int(b) for b in args.batch.split(",")]:
        buffers = [ort.OrtValue.ortvalue_from_numpy(
            rng.standard_normal((batch, kv, args.capacity, head_dim)).astype(act)) for _ in range(2 * layers)]
        binding = session.io_binding()
        binding.bind_cpu_input("inputs_embeds", (rng.standard_normal((batch, 1, hidden)) * 0.02).astype(act))
        binding.bind_cpu_input("attention_mask", np.ones((batch, args.past + 1), np.int64))
        binding.bind_cpu_input("position_ids", np.full((batch, 1), args.past, np.int64))
        for i in range(layers):
            for j, kind in enumerate(("key", "value")):
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buffers[2 * i + j])
                binding.bind_ortvalue_output(f"present.{i}.{kind}", buffers[2 * i + j])
        binding.bind_output("logits")
        for _ in range(3):
            session.run_with_iobinding(binding)
        start = time.perf_counter()
        for _ in range(args.steps):
            session.run_with_iobinding(binding)
        step = (time.perf_counter() - start) / args.steps
        rate = batch / step
        first = first or rate
        print(f"batch {batch:3d}: {step * 1e3:6.1f} ms/step, {rate:7.1f} tokens/s ({rate / first:.2f}x batch 1's)")
    if args.profile:
        path = session.end_profiling()
        events = json.load(open(path))
        os.remove(path)
        per_op = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_op[e["args"]["op_name"]] += e["dur"]
        total = sum(per_op.values())
        for op, us in per_op.most_common(6):
            print(f"  {op}: {100 * us / total:.1f} % of kernel time")


if __name__ == "__main__":
    main()
