"""llama.cpp (llama-cpp-python) on a GGUF as shipped, in its own quantization.

    python bench/peers/llamacpp_generate.py --model GGUF --prompt TEXT [--max-new-tokens N] [--threads T]
    python bench/peers/llamacpp_generate.py --model GGUF --perplexity FILE [--threads T]
    python bench/peers/llamacpp_generate.py --model GGUF --weights

--prompt: greedy generation of exactly N tokens past EOS. The user message goes through the GGUF's
own chat template (tokenizer.chat_template, rendered as Llama.create_chat_completion renders it) and
is tokenized with special tokens parsed and no BOS added, as create_chat_completion does. The loop is
llama.cpp's eval and the argmax of the last position's logits: the prompt in one eval, then one token
per step; the last token picked is not evaluated. Prints the JSON line of common.report.

--perplexity: same definition as ogenai_perplexity.py --context full: the file's text exactly,
tokenized without BOS or special tokens, one window, every token after the first scored with
nll_j = -log_softmax(logits[j - 1])[ids[j]] in float64; perplexity = exp(mean nll). Prints one JSON
object.

--weights: the GGUF's file type and weight bytes, from its tensor table (the gguf package): every
tensor is read once per token except token_embd, of which one row is read unless it is also the
output projection (no output.weight). Prints one JSON object.
"""

import argparse
import json
import math
import sys
import time

import numpy as np

from common import report


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="GGUF file")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="user message, put through the GGUF's chat template")
    mode.add_argument("--perplexity", metavar="FILE", help="UTF-8 text file, read exactly")
    mode.add_argument("--weights", action="store_true", help="print the GGUF's weight bytes")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def load(path: str, n_ctx: int, threads: int, logits_all: bool = False):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        seed=1234,
        verbose=False,
    )


def chat_prompt(llm, message: str) -> list[int]:
    """The message through the GGUF's chat template, tokenized as create_chat_completion does."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if template is None:
        raise SystemExit(f"{llm.model_path} has no tokenizer.chat_template")

    def text_of(token: int) -> str:
        return llm._model.token_get_text(token) if token != -1 else ""

    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=text_of(llm.token_eos()),
        bos_token=text_of(llm.token_bos()),
        add_generation_prompt=True,
    )
    rendered = formatter(messages=[{"role": "user", "content": message}])
    return llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)


def generate(args: argparse.Namespace) -> None:
    import llama_cpp

    # The KV cache is sized for this prompt plus the new tokens; the prompt's length comes from
    # the vocabulary alone, loaded before the timed load.
    vocab = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    ids = chat_prompt(vocab, args.prompt)
    del vocab

    t = time.perf_counter()
    llm = load(args.model, len(ids) + args.max_new_tokens, args.threads)
    load_s = time.perf_counter() - t
    if chat_prompt(llm, args.prompt) != ids:
        raise SystemExit("the prompt tokenizes differently with the full model")
    n_vocab = llm.n_vocab()

    def pick() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    tokens: list[int] = []
    start = time.perf_counter()
    llm.eval(ids)
    tokens.append(pick())
    first = time.perf_counter()
    while len(tokens) < args.max_new_tokens:
        llm.eval(tokens[-1:])
        tokens.append(pick())
    last = time.perf_counter()
    report(ids, tokens, load_s, start, first, last)


def perplexity(args: argparse.Namespace) -> None:
    with open(args.perplexity, "rb") as f:
        text = f.read()
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    ids = vocab.tokenize(text, add_bos=False, special=False)
    del vocab
    n = len(ids)
    if n < 2:
        raise SystemExit(f"{args.perplexity}: {n} token(s), need at least 2")

    llm = load(args.model, n, args.threads, logits_all=True)
    limit = llama_cpp.llama_model_n_ctx_train(llm.model)
    if n > limit:
        raise SystemExit(f"{n} tokens exceed the model's training context {limit}")
    start = time.perf_counter()
    llm.eval(ids)
    x = llm.scores[: n - 1].astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    lse = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=-1))
    target = np.asarray(ids[1:])
    total = 0.0
    for v in (lse - x[np.arange(n - 1), target]).tolist():  # summed in token order
        total += v
    mean = total / (n - 1)
    result = {
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "tokens": n - 1,
        "windows": 1,
        "context": "full",
        "seconds": time.perf_counter() - start,
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


def weights(args: argparse.Namespace) -> None:
    import gguf

    reader = gguf.GGUFReader(args.model)
    field = reader.fields.get("general.file_type")
    file_type = "unknown"
    if field is not None:
        value = int(field.parts[field.data[0]][0])
        try:
            file_type = gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
        except ValueError:
            file_type = f"file type {value}"
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    total = per_token = lm_head = gathered = 0
    for t in reader.tensors:
        size = int(t.n_bytes)
        total += size
        if t.name == "token_embd.weight" and not tied:
            gathered += size
            per_token += size // max(int(t.shape[-1]), 1)  # one row of n_vocab
        else:
            per_token += size
        if t.name == "output.weight" or (t.name == "token_embd.weight" and tied):
            lm_head += size
    json.dump(
        {
            "file_type": file_type,
            "total_bytes": total,
            "per_token_bytes": per_token,
            "lm_head_bytes": lm_head,
            "gathered_bytes": gathered,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


def main() -> None:
    args = parse_args()
    if args.weights:
        weights(args)
    elif args.perplexity is not None:
        perplexity(args)
    else:
        generate(args)


if __name__ == "__main__":
    main()
