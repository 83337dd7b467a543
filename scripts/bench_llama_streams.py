#!/usr/bin/env python3
"""Aggregate decode speed of llama.cpp with 1, 4, 8 ... sequences decoded in one batch, for the side-by-side
with `moela bench --streams` in docs/benchmarks.md.

llama.cpp's server (`llama-server --parallel N`) serves concurrent requests by putting one token of each
active sequence into one `llama_decode` batch, each sequence with its own positions and cache cells. This
script does exactly that through llama.cpp's C API as the `llama-cpp-python` package builds it (the same
package `gen_gguf_models.py` uses), so no llama.cpp checkout or server is needed:

    pip install llama-cpp-python numpy
    python3 scripts/bench_llama_streams.py --model FILE.gguf --streams 1,4,8 --threads 2
    moela bench --model FILE.gguf --streams 1,4,8 --json           # moela on the same file

Each stream gets its own prompt (`--prompt-tokens` ids, prefilled in one batch for all streams), then
`--gen-tokens` greedy steps are timed, each one batch of one token per stream. Prints one JSON object: per
stream count the aggregate decode tokens per second, the mean step time, and the prompts' prefill speed
(with `--streams 1`, what `moela bench` reports as prefill and decode). The wheel's backend is llama.cpp's
CPU backend unless the package was built with another: with `CMAKE_ARGS=-DGGML_VULKAN=on pip install
llama-cpp-python`, llama.cpp's Vulkan backend takes `--gpu-layers` of the model's layers (all by default,
as llama.cpp offloads them; 0 keeps them on the CPU), on the device `GGML_VK_VISIBLE_DEVICES` picks.
Each stream count runs once untimed first (2 steps), so a GPU backend's pipelines are built before the
timed round.
"""

import argparse
import ctypes
import json
import os
import sys
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a GGUF file llama.cpp reads")
    ap.add_argument("--streams", default="1,4,8", help="comma-separated stream counts")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gpu-layers", type=int, default=None,
                    help="layers llama.cpp offloads to a GPU backend (default: llama.cpp's, all of them)")
    a = ap.parse_args()
    streams = sorted({int(s) for s in a.streams.split(",")})
    if not streams or streams[0] < 1 or a.prompt_tokens < 1 or a.gen_tokens < 1:
        sys.exit("streams, prompt and generated tokens must be at least 1")

    import llama_cpp as L

    # llama.cpp's own log (every tensor it loads) stays quiet; errors still end the script below.
    quiet = L.llama_log_callback(lambda level, text, user_data: None)
    L.llama_log_set(quiet, ctypes.c_void_p(0))
    L.llama_backend_init()
    model_params = L.llama_model_default_params()
    if a.gpu_layers is not None:
        model_params.n_gpu_layers = a.gpu_layers
    model = L.llama_model_load_from_file(a.model.encode(), model_params)
    if not model:
        sys.exit(f"llama.cpp cannot load {a.model}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    most = streams[-1]
    per_seq = a.prompt_tokens + a.gen_tokens + 8
    params = L.llama_context_default_params()
    params.n_ctx = most * per_seq
    params.n_batch = max(most * a.prompt_tokens, most)
    params.n_ubatch = params.n_batch
    params.n_seq_max = most
    params.n_threads = a.threads
    params.n_threads_batch = a.threads
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        sys.exit("llama.cpp cannot make a context")
    batch = L.llama_batch_init(params.n_batch, 0, most)

    def decode(entries):
        """entries: (token, position, sequence, wants logits). Returns the batch indices with logits."""
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        if L.llama_decode(ctx, batch) != 0:
            sys.exit("llama_decode failed")

    def argmaxes(n):
        """The greedy token of each of the last batch's n outputs (its entries with logits, in order)."""
        rows = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(n, n_vocab))
        return [int(r.argmax()) for r in rows]

    def run(s, gen_tokens):
        """s streams' prompts, then gen_tokens steps: (prefill tok/s, seconds of the steps)."""
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        # Each stream's own prompt: ids spread over the vocabulary, different per stream.
        prompts = [[(7 + 37 * (i + 1) + 101 * seq) % (n_vocab - 8) + 4 for i in range(a.prompt_tokens)]
                   for seq in range(s)]
        start = time.perf_counter()
        decode([(t, i, seq, i == a.prompt_tokens - 1) for seq in range(s) for i, t in enumerate(prompts[seq])])
        last = argmaxes(s)
        prefill = s * a.prompt_tokens / (time.perf_counter() - start)
        start = time.perf_counter()
        for step in range(gen_tokens):
            pos = a.prompt_tokens + step
            decode([(last[seq], pos, seq, True) for seq in range(s)])
            last = argmaxes(s)
        return prefill, time.perf_counter() - start

    results = {"engine": "llama.cpp (llama-cpp-python " + L.__version__ + ")", "model": a.model,
               "gpu_offload": bool(L.llama_supports_gpu_offload()), "gpu_layers": model_params.n_gpu_layers,
               "threads": a.threads, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "streams": []}
    for s in streams:
        run(s, 2)
    for s in streams:
        prefill, took = run(s, a.gen_tokens)
        results["streams"].append({
            "streams": s,
            "tokens_per_second": s * a.gen_tokens / took,
            "step_ms": 1000 * took / a.gen_tokens,
            "prefill_tokens_per_second": prefill,
        })
        print(f"{s} streams: {s * a.gen_tokens / took:.1f} tok/s ({1000 * took / a.gen_tokens:.1f} ms per step), "
              f"prompts prefilled at {prefill:.1f} tok/s", file=sys.stderr)
    one = results["streams"][0]["tokens_per_second"]
    for r in results["streams"]:
        r["x_one_stream"] = r["tokens_per_second"] / one
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
