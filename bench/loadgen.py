#!/usr/bin/env python3
"""Load generator for `carrot serve` (or any OpenAI-compatible chat server): N concurrent clients
for T seconds on loopback, streaming, some requests with an image.

Usage:
  python3 bench/loadgen.py --url http://127.0.0.1:8080 [--clients 16] [--seconds 60]
                           [--max-tokens 64] [--image fixtures/images/chelsea.png --image-every 4]
                           [--server-pid PID] [--api-key KEY] [--check-exact] [--json]

Each client sends one request at a time (greedy, `max_tokens` new tokens, `stream: true` with
`stream_options.include_usage`) and starts the next as soon as the previous ends. Reports
requests/s, aggregate generated tokens/s, p50/p99 time to first token and inter-token latency
(from the arrival of content chunks), errors, and the server's peak RSS (`VmHWM` of --server-pid).
With --check-exact it first asks each client's first question alone, one after another, then all
at once, and reports how many answers in the batch equal the answer alone (greedy decoding must
give the same tokens). Standard library only.
"""

import argparse
import base64
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "Write a story about a rabbit who grows carrots in a small garden.",
    "Explain how a bicycle stays upright.",
    "List five uses for a cardboard box.",
    "Describe the view from a mountain at sunrise.",
]


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = []
        self.itl = []
        self.tokens = 0
        self.requests = 0
        self.errors = []

    def add(self, ttft, itl, tokens):
        with self.lock:
            self.ttft.append(ttft)
            self.itl.extend(itl)
            self.tokens += tokens
            self.requests += 1

    def error(self, what):
        with self.lock:
            self.errors.append(what)


def one_request(url, body, headers, stats):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            stats.error(f"HTTP {resp.status}: {resp.read()[:200]!r}")
            return
        first, last, gaps, tokens = None, None, [], None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                stats.error(str(event["error"])[:200])
                return
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            choices = event.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
        if first is None or tokens is None:
            stats.error("stream ended without content or usage")
            return
        stats.add(first - start, gaps, tokens)
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        stats.error(f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def answer(url, body, headers):
    """The content of a non-streamed answer to `body` (a JSON string)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            return f"HTTP {resp.status}: {data[:200]!r}"
        return json.loads(data)["choices"][0]["message"]["content"]
    finally:
        conn.close()


def check_exact(url, bodies, headers):
    """How many of `bodies` get the same answer in one concurrent batch as alone."""
    alone = [answer(url, b, headers) for b in bodies]
    together = [None] * len(bodies)

    def ask(i):
        together[i] = answer(url, bodies[i], headers)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(a == b for a, b in zip(alone, together))


def peak_rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--image", help="image file sent in some requests (data URL)")
    ap.add_argument("--image-every", type=int, default=4, help="every Nth request of a client carries the image")
    ap.add_argument("--server-pid", type=int)
    ap.add_argument("--api-key")
    ap.add_argument("--check-exact", action="store_true",
                    help="first check that answers in a batch equal the answers alone")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()

    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    image_url = None
    if args.image:
        with open(args.image, "rb") as f:
            kind = "png" if args.image.lower().endswith(".png") else "jpeg"
            image_url = f"data:image/{kind};base64,{base64.b64encode(f.read()).decode()}"

    def body(client, i, stream=True):
        text = PROMPTS[(client + i) % len(PROMPTS)]
        if client >= len(PROMPTS):
            text = f"{text} Answer as reader number {client}."
        content = text
        if image_url and args.image_every > 0 and i % args.image_every == 0:
            content = [{"type": "text", "text": "What is in this picture?"},
                       {"type": "image_url", "image_url": {"url": image_url}}]
        return json.dumps({
            "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        })

    exact = None
    if args.check_exact:
        exact = check_exact(args.url, [body(c, 0, stream=False) for c in range(args.clients)], headers)

    stats = Stats()
    deadline = time.perf_counter() + args.seconds

    def client(c):
        i = 0
        while time.perf_counter() < deadline:
            one_request(args.url, body(c, i), headers, stats)
            i += 1

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0

    result = {
        "clients": args.clients,
        "seconds": round(elapsed, 2),
        "requests": stats.requests,
        "requests_per_s": stats.requests / elapsed,
        "tokens_per_s": stats.tokens / elapsed,
        "ttft_p50_ms": percentile(stats.ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(stats.ttft, 99) * 1e3,
        "itl_p50_ms": percentile(stats.itl, 50) * 1e3,
        "itl_p99_ms": percentile(stats.itl, 99) * 1e3,
        "errors": len(stats.errors),
        "server_peak_rss_mb": peak_rss_mb(args.server_pid) if args.server_pid else None,
        "exact": exact,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print("| clients | requests/s | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors | server peak RSS MB |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        rss = result["server_peak_rss_mb"]
        print(f"| {args.clients} | {result['requests_per_s']:.2f} | {result['tokens_per_s']:.1f} | "
              f"{result['ttft_p50_ms']:.0f} / {result['ttft_p99_ms']:.0f} | "
              f"{result['itl_p50_ms']:.1f} / {result['itl_p99_ms']:.1f} | {result['errors']} | "
              f"{'—' if rss is None else f'{rss:.0f}'} |")
        if exact is not None:
            print(f"\ntoken-exact: {exact} of {args.clients} answers in one batch equal the answers alone")
    for e in stats.errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    if stats.requests == 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
