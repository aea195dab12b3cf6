#!/usr/bin/env python3
"""Run a Carrot export with plain ONNX Runtime: no torch, no transformers, only `carrot.json`.

    python carrot_host.py --model OUT [--image PATH] --prompt TEXT [--max-new-tokens N] [--json]

Everything the graphs need is read from the exported directory: the manifest (carrot.json), the
three graphs, and the tokenizer files. Decoding is greedy.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

BUNNY_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ACTIVATION_DTYPES = {"float32": np.float32, "float16": np.float16}


class Model:
    def __init__(self, out: Path):
        self.dir = out
        self.manifest = json.loads((out / "carrot.json").read_text())
        major = self.manifest.get("format", "").split(".")[0]
        if major != "carrot/1":
            raise SystemExit(f"{out}/carrot.json: format {self.manifest.get('format')!r}, this host reads carrot/1")
        # This host feeds present.* back as past.*; the `ort` flavor's "shared" graphs accept that too
        # (binding one buffer as both is an optimisation, see docs/contract.md).
        if self.manifest.get("kv_cache", "concat") not in ("concat", "shared"):
            raise SystemExit(f"kv_cache {self.manifest['kv_cache']!r}: this host feeds present.* back as past (concat)")
        act = self.manifest["activation_dtype"]
        if act not in ACTIVATION_DTYPES:
            raise SystemExit(f"activation dtype {act} is not supported by this host (float32, float16)")
        self.act = ACTIVATION_DTYPES[act]
        graphs = self.manifest["graphs"]
        opts = ort.SessionOptions()
        load = lambda name: ort.InferenceSession(str(out / name), opts, providers=["CPUExecutionProvider"])
        self.vision = load(graphs["vision"]) if graphs.get("vision") else None
        self.embed = load(graphs["embed"])
        self.decoder = load(graphs["decoder"])
        self.tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
        cfg_path = out / "tokenizer_config.json"
        self.tokenizer_config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    # ---- prompt -------------------------------------------------------------------------------
    def chat_template(self) -> str:
        path = self.dir / "chat_template.jinja"
        if path.is_file():
            return path.read_text()
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: prefer "default"
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", template[0]["template"])
        if not template:
            raise SystemExit(f"{self.dir}: no chat template (chat_template.jinja or tokenizer_config.json)")
        return template

    def special_token(self, key: str) -> str:
        value = self.tokenizer_config.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    def render_chat(self, messages) -> str:
        import jinja2  # only chat-template models need it

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt, time.gmtime())
        return env.from_string(self.chat_template()).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self.special_token("bos_token"),
            eos_token=self.special_token("eos_token"),
        )

    def encode_with_images(self, text: str) -> list[int]:
        """Bunny's tokenizer_image_token: each chunk between image markers tokenized on its own."""
        p = self.manifest["prompt"]
        chunks = [self.tokenizer.encode(c, add_special_tokens=True).ids for c in text.split(p["image_token"])]
        offset = 1 if chunks[0] and chunks[0][0] == p.get("bos_token_id") else 0
        ids = chunks[0][:1] if offset else []
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(p["image_token_index"])
            ids.extend(chunk[offset:])
        return ids

    def prompt_ids(self, question: str, image: bool, raw: bool) -> list[int]:
        p = self.manifest["prompt"]
        if raw:
            return self.encode_with_images(question)
        if p["template"] == "bunny-llama":
            marker = p["image_token"] + "\n" if image and p["image_token"] not in question else ""
            return self.encode_with_images(f"{BUNNY_SYSTEM} USER: {marker}{question} ASSISTANT:")
        if p["template"] == "chat-template":
            text = self.render_chat([{"role": "user", "content": question}])
            return self.tokenizer.encode(text, add_special_tokens=False).ids  # the template writes BOS
        return self.tokenizer.encode(question, add_special_tokens=True).ids

    # ---- image --------------------------------------------------------------------------------
    def pixel_values(self, path: Path) -> np.ndarray:
        v = self.manifest["vision"]
        image = Image.open(path).convert("RGB")
        w, h = image.size
        if v["image_aspect_ratio"] == "pad" and w != h:
            side = max(w, h)
            square = Image.new("RGB", (side, side), tuple(v["pad_color"]))
            square.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
            image = square
        size = v["image_size"]
        image = image.resize((size, size), Image.Resampling.BICUBIC)
        x = (np.asarray(image, dtype=np.float64) * v["rescale"]).astype(np.float32)
        x = (x - np.asarray(v["mean"], np.float32)) / np.asarray(v["std"], np.float32)
        return x.transpose(2, 0, 1)[None]

    # ---- generation ---------------------------------------------------------------------------
    def inputs_embeds(self, ids: list[int], image_features) -> np.ndarray:
        sentinel = self.manifest["prompt"]["image_token_index"]
        text_ids = np.array([[i for i in ids if i != sentinel]], dtype=np.int64)
        text = self.embed.run(["inputs_embeds"], {"input_ids": text_ids})[0][0]
        rows, t, k = [], 0, 0
        for i in ids:
            if i == sentinel:
                rows.append(image_features[k])
                k += 1
            else:
                rows.append(text[t : t + 1])
                t += 1
        return np.concatenate(rows)[None].astype(self.act)

    def generate(self, ids, image_features, max_new_tokens: int, ignore_eos: bool):
        text = self.manifest["text"]
        eos = set(self.manifest["prompt"]["eos_token_ids"])
        max_length = self.manifest["prompt"]["max_length"]
        shape = (1, text["num_kv_heads"], 0, text["head_dim"])
        past = {}
        for i in range(text["num_layers"]):
            for kind in ("key", "value"):
                past[f"past_key_values.{i}.{kind}"] = np.zeros(shape, self.act)
        outputs = [o.name for o in self.decoder.get_outputs()]
        embeds = self.inputs_embeds(ids, image_features)
        if embeds.shape[1] + 1 > max_length:
            raise SystemExit(f"the prompt has {embeds.shape[1]} positions; max_length {max_length} leaves no room")
        length, generated, finish = 0, [], "length"
        timings = {"prefill_ms": 0.0, "decode_ms": 0.0}
        while len(generated) < max_new_tokens:
            if length + embeds.shape[1] > max_length:
                break
            start = time.perf_counter()
            seq = embeds.shape[1]
            feed = {
                "inputs_embeds": embeds,
                "attention_mask": np.ones((1, length + seq), np.int64),
                "position_ids": np.arange(length, length + seq, dtype=np.int64)[None],
                **past,
            }
            result = dict(zip(outputs, self.decoder.run(outputs, feed)))
            past = {f"past_key_values.{n[len('present.'):]}": v for n, v in result.items() if n.startswith("present.")}
            length += seq
            token = int(np.argmax(result["logits"][0, -1]))
            timings["decode_ms" if generated else "prefill_ms"] += (time.perf_counter() - start) * 1e3
            generated.append(token)
            if token in eos and not ignore_eos:
                finish = "stop"
                break
            embeds = self.inputs_embeds([token], None)
        return generated, finish, length, timings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="exported directory (with carrot.json)")
    ap.add_argument("--image", type=Path)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--raw", action="store_true", help="tokenize the prompt as it is, no template")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    model = Model(args.model)
    load_ms = (time.perf_counter() - start) * 1e3
    if args.image and model.vision is None:
        raise SystemExit(f"{args.model} is a text-only model; it cannot take images")
    ids = model.prompt_ids(args.prompt, args.image is not None, args.raw)
    sentinel = model.manifest["prompt"]["image_token_index"]
    if ids.count(sentinel) != (1 if args.image else 0):
        raise SystemExit(f"the prompt has {ids.count(sentinel)} image markers but {int(bool(args.image))} image(s) were given")

    start = time.perf_counter()
    features = None
    if args.image:
        pixels = model.pixel_values(args.image)
        features = model.vision.run(["image_features"], {"pixel_values": pixels})[0]
    vision_ms = (time.perf_counter() - start) * 1e3
    max_new = args.max_new_tokens or model.manifest["sampling_defaults"]["max_new_tokens"]
    tokens, finish, _, timings = model.generate(ids, features, max_new, args.ignore_eos)
    text = model.tokenizer.decode(tokens, skip_special_tokens=True)
    image_tokens = model.manifest.get("vision", {}).get("num_image_tokens", 0)
    if args.json:
        print(json.dumps({
            "text": text,
            "token_ids": tokens,
            "prompt_ids": ids,
            "prompt_tokens": len(ids) + ids.count(sentinel) * (image_tokens - 1),
            "generated_tokens": len(tokens),
            "finish_reason": finish,
            "timings": {"load_ms": load_ms, "vision_ms": vision_ms, **timings},
        }))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
