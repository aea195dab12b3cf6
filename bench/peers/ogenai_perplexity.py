"""Perplexity of a text under an onnxruntime-genai export (the builder's output directory).

    python bench/peers/ogenai_perplexity.py --model OGENAI_DIR --text FILE [--context C|full] [--json]

Same definition as fixtures/perplexity/make_goldens.py: ids = the file's text (UTF-8, exactly)
tokenized by the export's own tokenizer without special tokens. For a context length C the windows
are ids[s : s + C] for s = 0, C - 1, 2(C - 1), ... while s < n - 1; "full" is one window holding all
ids. Each window runs from a fresh og.Generator (no cache carried over, positions from 0) with one
append_tokens call, whose "logits" output holds every position; every window position j >= 1 is
scored with nll_j = -log_softmax(logits[j - 1])[window[j]] in float64, so the n - 1 tokens after the
first are scored once each. perplexity = exp(sum of nll / (n - 1)).

The export must keep the logits of every position (the builder's default; not prune_lm_head).
"""

import argparse
import json
import math
import sys
import time

import numpy as np
import onnxruntime_genai as og


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="onnxruntime-genai model directory (genai_config.json)")
    p.add_argument("--text", required=True, help="UTF-8 text file, read exactly (trailing newline included)")
    p.add_argument("--context", default="full", help="window length C >= 2, or 'full' (default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    if args.context != "full":
        try:
            args.context = int(args.context)
        except ValueError:
            p.error(f"--context must be an integer or 'full', not {args.context!r}")
        if args.context < 2:
            p.error("--context must be at least 2")
    return args


def windows(n: int, context: int):
    """Start and end of each window: s = 0, C-1, 2(C-1), ... while s < n-1."""
    start = 0
    while start < n - 1:
        yield start, min(start + context, n)
        start += context - 1


def window_nll(model: og.Model, window: list[int]) -> np.ndarray:
    """nll of window[1:] given everything before it in the window, from a fresh generator."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(window), batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(window, dtype=np.int32))
    logits = np.asarray(generator.get_output("logits"))
    if logits.shape[:2] != (1, len(window)):
        raise SystemExit(
            f"logits output has shape {logits.shape}, expected (1, {len(window)}, vocab): "
            "the export must keep every position's logits (build it without prune_lm_head)"
        )
    x = logits[0, :-1].astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    lse = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=-1))
    target = np.asarray(window[1:])
    return lse - x[np.arange(len(target)), target]


def main() -> int:
    args = parse_args()
    config = og.Config(args.model)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="false")

    with open(args.text, "rb") as f:
        text = f.read().decode("utf-8")
    ids = [int(i) for i in tokenizer.encode(text)]
    n = len(ids)
    if n < 2:
        raise SystemExit(f"{args.text}: {n} token(s), need at least 2")
    with open(f"{args.model}/genai_config.json") as f:
        limit = json.load(f)["model"]["context_length"]
    size = n if args.context == "full" else args.context
    if min(size, n) > limit:
        raise SystemExit(f"windows of {min(size, n)} tokens exceed the model's context_length {limit}")

    start = time.perf_counter()
    total = 0.0
    scored = 0
    count = 0
    for s, e in windows(n, size):
        for v in window_nll(model, ids[s:e]).tolist():  # summed in token order
            total += v
        scored += e - s - 1
        count += 1
    assert scored == n - 1, (scored, n)
    elapsed = time.perf_counter() - start
    mean = total / scored
    result = {
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "tokens": scored,
        "windows": count,
        "context": args.context,
        "seconds": elapsed,
    }
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(
            f"perplexity {result['perplexity']:.4f} (mean nll {mean:.6f}) over {scored} tokens, "
            f"context {args.context}, {count} window(s), {elapsed:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
