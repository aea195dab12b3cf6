"""Run a bfloat16 carrot-tiny export through ONNX's reference evaluator and compare it with the
bfloat16 transformers goldens (ONNX Runtime's CPU provider has no bfloat16 kernels).

Usage:  python tests/python/bf16_reference.py EXPORT_DIR GOLDENS_DIR

EXPORT_DIR is `carrot-export --model fixtures/models/carrot-tiny --dtype bf16 --logits all`.
Checks, printing one line per graph and exiting 1 on the first failure:
  embed.onnx   rows equal the bfloat16 rounding of decoder.safetensors' inputs_embeds (exact);
  vision.onnx  image_features no farther from vision_bf16.safetensors (transformers in bf16) than twice
               that reference's own distance from the fp32 golden;
  decoder.onnx prefill -> decode -> chunk, feeding its own presents back as the past: every
               position's argmax equals decoder_bf16.safetensors' and its top-1 logit is within 2
               bf16 steps of the reference's.
"""

import json
import os
import sys

import ml_dtypes
import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from safetensors.numpy import load_file

BF16 = ml_dtypes.bfloat16


def bf16_step(x):
    """The spacing of bfloat16 values at |x| (8 significant bits)."""
    x = np.maximum(np.abs(np.asarray(x, np.float32)), np.float32(2.0**-126))
    return np.exp2(np.floor(np.log2(x)) - 7).astype(np.float32)


def evaluator(export, name):
    model = onnx.load(os.path.join(export, name))
    return ReferenceEvaluator(model), [i.name for i in model.graph.input]


def fail(msg):
    print(f"FAIL {msg}")
    sys.exit(1)


def check_embed(export, g):
    ev, _ = evaluator(export, "embed.onnx")
    for case in ("prefill", "decode", "chunk"):
        (rows,) = ev.run(None, {"input_ids": g[f"{case}.input_ids"].astype(np.int64)})
        if rows.dtype != BF16:
            fail(f"embed.onnx returns {rows.dtype}, expected bfloat16")
        want = g[f"{case}.inputs_embeds"].astype(BF16)
        if not np.array_equal(rows.view(np.uint16), want.view(np.uint16)):
            fail(f"embed.onnx {case}: rows differ from the bf16 rounding of the checkpoint's rows")
    print("embed.onnx: rows equal the checkpoint's bf16 rows")


def check_vision(export, goldens):
    ev, _ = evaluator(export, "vision.onnx")
    fp32 = load_file(os.path.join(goldens, "vision.safetensors"))
    ref = load_file(os.path.join(goldens, "vision_bf16.safetensors"))["image_features"]
    (feats,) = ev.run(None, {"pixel_values": fp32["pixel_values"].astype(BF16)})
    feats = feats.astype(np.float32)
    if feats.shape != ref.shape:
        fail(f"vision.onnx image_features shape {feats.shape}, reference {ref.shape}")
    # Rounding to bf16 in every layer moves the features away from fp32 by a few per mille; two bf16
    # implementations round at different points, so they agree only as well as each agrees with fp32.
    # The graph passes when it is no farther from transformers-bf16 than twice transformers-bf16's own
    # distance from fp32 (a wrong op or layer is off by the features' whole size).
    def dist(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    own = dist(ref, fp32["image_features"])
    got = dist(feats, ref)
    if not got <= 2 * own:
        fail(f"vision.onnx image_features: relative distance {got:.4g} from transformers bf16, more than twice bf16's own {own:.4g} from fp32")
    print(f"vision.onnx: image_features at relative distance {got:.4g} from transformers bf16 (bf16 vs fp32: {own:.4g})")


def check_decoder(export, g, ref, layers):
    ev, _ = evaluator(export, "decoder.onnx")
    past = None
    worst, positions = 0.0, 0
    for case in ("prefill", "decode", "chunk"):
        feeds = {
            "inputs_embeds": g[f"{case}.inputs_embeds"].astype(BF16),
            "attention_mask": g[f"{case}.attention_mask"].astype(np.int64),
            "position_ids": g[f"{case}.position_ids"].astype(np.int64),
        }
        for i in range(layers):
            for kv in ("key", "value"):
                name = f"past_key_values.{i}.{kv}"
                if past is None:
                    shape = list(g[f"prefill.present.{i}.{kv}"].shape)
                    shape[2] = 0
                    feeds[name] = np.zeros(shape, BF16)
                else:
                    feeds[name] = past[f"present.{i}.{kv}"]
        outs = ev.run(None, feeds)
        named = dict(zip([o.name for o in ev.proto_.graph.output], outs))
        past = named
        logits = named["logits"].astype(np.float32)[0]
        want_arg = ref[f"{case}.argmax"][0]
        want_top = ref[f"{case}.top1_logit"][0]
        margin = ref[f"{case}.top1_margin"][0]
        if logits.shape[0] != want_arg.shape[0]:
            fail(f"decoder.onnx {case}: {logits.shape[0]} logit rows, reference {want_arg.shape[0]} (export with --logits all)")
        arg = logits.argmax(-1)
        top = logits.max(-1)
        bound = 2 * bf16_step(want_top)
        for p in range(len(arg)):
            if arg[p] != want_arg[p] and margin[p] > bound[p]:
                fail(f"decoder.onnx {case} position {p}: argmax {arg[p]}, reference {want_arg[p]} (margin {margin[p]})")
            d = abs(top[p] - want_top[p])
            if d > bound[p]:
                fail(f"decoder.onnx {case} position {p}: top-1 logit {top[p]}, reference {want_top[p]}")
            worst = max(worst, d)
            positions += 1
    print(f"decoder.onnx: argmax equal at all {positions} positions, top-1 logits within 2 bf16 steps (max |diff| {worst:.4g})")


def main():
    export, goldens = sys.argv[1], sys.argv[2]
    with open(os.path.join(export, "carrot.json")) as f:
        manifest = json.load(f)
    if manifest["activation_dtype"] != "bfloat16":
        fail(f"{export} has activation_dtype {manifest['activation_dtype']}, not bfloat16")
    g = load_file(os.path.join(goldens, "decoder.safetensors"))
    ref = load_file(os.path.join(goldens, "decoder_bf16.safetensors"))
    check_embed(export, g)
    check_vision(export, goldens)
    check_decoder(export, g, ref, manifest["text"]["num_layers"])


if __name__ == "__main__":
    main()
