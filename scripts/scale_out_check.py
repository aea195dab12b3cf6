"""The checks of scripts/scale-out-check.sh (standard library only)."""

import argparse
import base64
import http.client
import json
import os
import signal
import sys
import threading
import time

QUESTION = "What is in this picture?"
failures = []


def check(name, ok, detail=""):
    print(f"CHECK {name}: {'PASS' if ok else 'FAIL'}{' ' + detail if detail else ''}")
    if not ok:
        failures.append(name)


def request(addr, method, path, body=None, key=None, stream=False):
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
    resp = conn.getresponse()
    if stream:
        return conn, resp
    data = resp.read().decode()
    conn.close()
    return resp.status, data


def metric(addr, name):
    status, text = request(addr, "GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def wait_ready(addr, deadline=60):
    end = time.time() + deadline
    while time.time() < end:
        try:
            if request(addr, "GET", "/ready")[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def body(image=None, stream=False, max_tokens=8):
    content = QUESTION
    if image:
        content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": image}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


def text_of(status, data, stream):
    if status != 200:
        return None
    if not stream:
        return json.loads(data)["choices"][0]["message"]["content"]
    out = []
    for line in data.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            if event.get("choices"):
                out.append(event["choices"][0]["delta"].get("content") or "")
    return "".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--balancer")
    ap.add_argument("--replicas")
    ap.add_argument("--pids")
    ap.add_argument("--image")
    ap.add_argument("--key")
    args = ap.parse_args()
    replicas = args.replicas.split(",")
    pids = [int(p) for p in args.pids.split(",")]
    with open(args.image, "rb") as f:
        image = "data:image/png;base64," + base64.b64encode(f.read()).decode()

    check("both replicas become ready", all(wait_ready(r) for r in replicas))
    # The reference: one replica alone.
    expected = {}
    for with_image in (False, True):
        status, data = request(replicas[0], "POST", "/v1/chat/completions", body(image if with_image else None), args.key)
        expected[with_image] = text_of(status, data, False)
    before = [metric(r, 'carrot_requests_total{outcome="ok"}') for r in replicas]

    same = True
    for i in range(8):
        with_image, stream = i % 2 == 1, i % 4 >= 2
        status, data = request(args.balancer, "POST", "/v1/chat/completions",
                               body(image if with_image else None, stream), args.key)
        got = text_of(status, data, stream)
        if got != expected[with_image]:
            same = False
            print(f"  request {i}: {status} {got!r} != {expected[with_image]!r}")
    check("answers through nginx equal a single replica's (streamed and whole, with and without image)", same)
    after = [metric(r, 'carrot_requests_total{outcome="ok"}') for r in replicas]
    check("both replicas' request counters moved", all(a > b for a, b in zip(after, before)), f"{before} -> {after}")

    status, _ = request(args.balancer, "POST", "/v1/chat/completions", body(), "wrong")
    check("the API key is enforced behind the balancer", status == 401, f"status {status}")

    # A long stream through the balancer; find the replica serving it and stop that one.
    conn, resp = request(args.balancer, "POST", "/v1/chat/completions", body(stream=True, max_tokens=1500), args.key, stream=True)
    first = resp.readline()
    busy = [i for i, r in enumerate(replicas) if metric(r, "carrot_requests_running") > 0]
    check("the long stream runs on one replica", len(busy) == 1, f"running on {busy}")
    victim = busy[0] if busy else 0
    os.kill(pids[victim], signal.SIGTERM)
    results = []

    def during():
        for _ in range(4):
            s, d = request(args.balancer, "POST", "/v1/chat/completions", body(), args.key)
            results.append(text_of(s, d, False) == expected[False])

    t = threading.Thread(target=during)
    t.start()
    rest = first + resp.read()
    conn.close()
    t.join()
    check("the stream in flight on the stopped replica finishes", b"data: [DONE]" in rest)
    check("requests sent during the drain are answered by the other replica", results == [True] * 4, f"{results}")
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(pids[victim], 0)
            time.sleep(0.1)
        except OSError:
            break
    else:
        failures.append("exit")
    check("the stopped replica exits after its drain", "exit" not in failures)
    status, data = request(args.balancer, "POST", "/v1/chat/completions", body(), args.key)
    check("no request lost afterwards", text_of(status, data, False) == expected[False], f"status {status}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
