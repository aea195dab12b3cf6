"""Shared by the peer scripts: arguments and the one JSON line they print."""

import argparse
import json
import sys


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="model directory for this runtime")
    p.add_argument("--prompt", required=True, help="user message, put through the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def report(prompt: list[int], tokens: list[int], load_s: float, start: float, first: float, last: float) -> None:
    """One JSON object on stdout. Prefill is the time to the first new token; decode the rest."""
    json.dump(
        {
            "prompt_tokens": len(prompt),
            "generated_tokens": len(tokens),
            "token_ids": tokens,
            "load_ms": load_s * 1e3,
            "prefill_ms": (first - start) * 1e3,
            "decode_ms": (last - first) * 1e3,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
