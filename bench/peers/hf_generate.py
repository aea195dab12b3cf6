"""Greedy generation with transformers `generate` (fp32, CPU) on the Hugging Face directory.

EOS is held off with min_new_tokens so that exactly --max-new-tokens tokens are produced. A
streamer timestamps every step: its first call carries the prompt, the second the first new token.
"""

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import parse_args, report


class Clock:
    """A generate streamer that only records when each call happens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, _value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t

    input_ids = torch.tensor([ids], dtype=torch.long)
    clock = Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            streamer=clock,
        )
    tokens = out[0, len(ids):].tolist()
    report(ids, tokens, load_s, start, clock.times[1], clock.times[-1])


if __name__ == "__main__":
    main()
