"""Greedy generation with onnxruntime-genai's og.Generator loop on a model from its builder.

EOS is held off with min_length so that exactly --max-new-tokens tokens are produced.
"""

import json
import time

import onnxruntime_genai as og

from common import parse_args, report


def main() -> None:
    args = parse_args(__doc__)
    t = time.perf_counter()
    config = og.Config(args.model)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t

    tokenizer = og.Tokenizer(model)
    messages = json.dumps([{"role": "user", "content": args.prompt}])
    ids = [int(i) for i in tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))]

    total = len(ids) + args.max_new_tokens
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
    generator = og.Generator(model, params)

    tokens: list[int] = []
    start = time.perf_counter()
    first = start
    generator.append_tokens(ids)
    while not generator.is_done() and len(tokens) < args.max_new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        if len(tokens) == 1:
            first = time.perf_counter()
    last = time.perf_counter()
    report(ids, tokens, load_s, start, first, last)


if __name__ == "__main__":
    main()
