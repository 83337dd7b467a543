"""Aggregate decode speed of a running `moela serve` with 1, 4 and 8 concurrent streams (or --streams), and
the time to the first token under that load: the numbers docs/benchmarks.md reports for the server.

    moela serve --parallel 8 &
    python3 scripts/bench_serve.py http://127.0.0.1:8080 [--streams 1,4,8] [--requests-per-stream 3]

Each stream sends its requests one after the other (chat, streamed, greedy, with `usage`); the questions
are long additions, so that every answer is a few hundred tokens of reasoning. Prints JSON.
"""

import argparse
import json
import threading
import time
import urllib.request


def stream_once(base, question, max_tokens):
    """One streamed chat request: (seconds to the first token, seconds in all, completion tokens)."""
    body = json.dumps({
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
    }).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", body, {"content-type": "application/json"})
    start = time.perf_counter()
    first = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if first is None and choices and (choices[0]["delta"].get("content") or choices[0]["delta"].get("reasoning_content")):
                first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start, tokens


def run(base, streams, per_stream, max_tokens):
    results = []
    lock = threading.Lock()

    def worker(i):
        for j in range(per_stream):
            a = 10 ** 17 + 7919 * (i * per_stream + j + 1)
            q = f"What is {a} + {a // 3}?"
            r = stream_once(base, q, max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    firsts = sorted(r[0] for r in results)
    return {
        "streams": streams,
        "requests": len(results),
        "completion_tokens": tokens,
        "seconds": round(wall, 3),
        "aggregate_tokens_per_second": round(tokens / wall, 2),
        "per_stream_tokens_per_second": round(tokens / wall / streams, 2),
        "first_token_seconds_median": round(firsts[len(firsts) // 2], 3),
        "first_token_seconds_max": round(firsts[-1], 3),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base", help="the server, e.g. http://127.0.0.1:8080")
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--requests-per-stream", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=600)
    a = ap.parse_args()
    base = a.base.rstrip("/")
    model = json.load(urllib.request.urlopen(f"{base}/v1/models"))["data"][0]["id"]
    rows = [run(base, int(n), a.requests_per_stream, a.max_tokens) for n in a.streams.split(",")]
    one = rows[0]["aggregate_tokens_per_second"]
    for r in rows:
        r["aggregate_over_one_stream"] = round(r["aggregate_tokens_per_second"] / one, 2) if one else None
    print(json.dumps({"model": model, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
