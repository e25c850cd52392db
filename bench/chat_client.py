#!/usr/bin/env python3
"""Streams chat completions through the gateway the way `chat_bench` asks the
engine directly: the same prompts, seed, temperature and token count; a warm-up,
then one stream alone, then N at once. Prints one JSON line of figures in the
example's format. Used by bench/chat.sh.

    chat_client.py --url http://127.0.0.1:PORT --key KEY [--streams 4] [--tokens 128] [--seed 7]
"""

import argparse
import http.client
import json
import sys
import threading
import time
from urllib.parse import urlsplit

# Kept in step with crates/provider/examples/chat_bench.rs.
PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how bread is made, step by step, in detail.",
    "Write a long essay about the history of sailing ships.",
    "Write a long letter to a friend about a trip to the mountains.",
]
MODEL = "gemma-3-270m"


def one(url, key, prompt, tokens, seed):
    """One streamed request: (completion tokens, seconds to first text, seconds in all, prompt tokens)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    body = json.dumps({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={
        "authorization": f"Bearer {key}",
        "content-type": "application/json",
    })
    res = conn.getresponse()
    if res.status != 200:
        raise SystemExit(f"chat answered {res.status}: {res.read()[:500]!r}")
    first = None
    usage = None
    for raw in res:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            if first is None and choice.get("delta", {}).get("content"):
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    conn.close()
    if usage is None:
        raise SystemExit("the stream ended without usage")
    return usage["completion_tokens"], (first if first is not None else total), total, usage["prompt_tokens"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()

    one(a.url, a.key, PROMPTS[0], 8, a.seed)  # warm-up, as the example does
    tokens, first, total, prompt = one(a.url, a.key, PROMPTS[0], a.tokens, a.seed)
    single = {"tokens": tokens, "secs": total, "first_secs": first, "prompt_tokens": [prompt]}

    results = [None] * a.streams
    def run(i):
        results[i] = one(a.url, a.key, PROMPTS[i % len(PROMPTS)], a.tokens, a.seed)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(a.streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if any(r is None for r in results):
        raise SystemExit("a stream failed")
    batch = {
        "streams": a.streams,
        "tokens": sum(r[0] for r in results),
        "secs": wall,
        "first_secs": max(r[1] for r in results),
        # What each request's prompt came to after the chat format: the
        # lengths bench/llama-cpp.sh gives llama.cpp's own tool for the same work.
        "prompt_tokens": [r[3] for r in results],
    }
    print(json.dumps({"single": single, "batch": batch}))


if __name__ == "__main__":
    sys.exit(main())
