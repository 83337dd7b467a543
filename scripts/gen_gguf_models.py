#!/usr/bin/env python3
"""Writes the GGUF models in tests/fixtures/gguf/ with llama.cpp's own tools, and llama.cpp's logits for them:

* `v2-lite-tiny.f32.gguf`, `v2-lite-tiny.q8_0.gguf`: tests/fixtures/v2-lite-tiny converted by llama.cpp's
  converter (`convert_hf_to_gguf.py --outtype f32 / q8_0`).
* `v3-tiny.f16-0000K-of-0000N.gguf`: tests/fixtures/v3-tiny converted to F16 and split into parts
  (`--split-max-tensors`), as large models are published.
* `k256.q4_k_m.gguf` (Q4_K, Q6_K and Q5_0 tensors), `k256.q5_k_m.gguf` (Q5_K, Q6_K and Q5_1),
  `k256.q4_0.gguf`: a random DeepSeek-V2 model 256 values wide (so that
  llama.cpp's K-quants apply: they need rows of whole 256-value super-blocks), made with transformers,
  converted to F32 and quantised by llama.cpp's quantiser (`llama_model_quantize` through llama-cpp-python),
  and `k256.llama.json`: llama.cpp's own logits for each of those files (CPU backend) over one token
  sequence, and the F32 file's.
* `k256.moela.q4_k.gguf`, `k256.moela.q5_k.gguf`, `k256.moela.q6_k.gguf`: the same model written by
  `moela quantize --type q4_k` / `q5_k` / `q6_k` (Q4_K / Q5_K with Q5_0 where rows are not whole
  super-blocks and a Q8_0 head; Q6_K with Q8_0), and llama.cpp's logits for them in `k256.llama.json`.

The converter runs unchanged but for one thing: it names a BPE pre-tokenizer by hashing a real vocabulary's
output, and the fixtures' tokenizer is a small one trained with DeepSeek-V3's pre-tokenizer rules
(scripts/gen_fixtures.py), so it is told that name.

    pip install -r scripts/requirements-fixtures.txt llama-cpp-python==0.3.36
    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/src
    tar xzf /tmp/src/llama_cpp_python-0.3.36.tar.gz -C /tmp/src
    python3 scripts/gen_gguf_models.py --llama-cpp /tmp/src/llama_cpp_python-0.3.36/vendor/llama.cpp

The files are small and committed, so the tests need none of this.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIXTURES, "gguf")

RUN_CONVERTER = """
import runpy, sys
llama = sys.argv[1]
sys.path.insert(0, llama)
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "deepseek-v3"
sys.argv = [llama + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(llama + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert(llama, hf_dir, out, outtype, *extra):
    subprocess.run([sys.executable, "-c", RUN_CONVERTER, llama, hf_dir, "--outtype", outtype, "--outfile", out, *extra],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def quantize(src, out, ftype):
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), params)
    assert rc == 0, f"llama_model_quantize {out}: {rc}"


def llama_logits(path, tokens):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False,
                          seed=0)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def type_mix(path):
    import gguf
    mix = {}
    for t in gguf.GGUFReader(path).tensors:
        mix[t.tensor_type.name] = mix.get(t.tensor_type.name, 0) + 1
    return mix


def k256_model(folder):
    """A random DeepSeek-V2 model, 256 wide, with the fixtures' tokenizer: one dense block and one MoE block.
    Its queries are low-rank (q_lora_rank): llama.cpp takes a deepseek2 model without one for V2-Lite only
    when it has V2-Lite's 26 or 27 layers."""
    import shutil

    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(256)
    cfg = DeepseekV2Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=1, kv_lora_rank=256, q_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=32,
        v_head_dim=64, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    model = DeepseekV2ForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                gain = 3.0 if name.endswith("mlp.gate.weight") else 1.0
                p.copy_(gain * torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(FIXTURES, "v2-lite-tiny", f), folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp's source (convert_hf_to_gguf.py)")
    ap.add_argument("--moela", default="moela", help="the moela binary (for its `quantize --type q4_k / q5_k / q6_k`)")
    args = ap.parse_args()
    llama, moela = os.path.abspath(args.llama_cpp), args.moela
    import llama_cpp

    convert(llama, os.path.join(FIXTURES, "v2-lite-tiny"), os.path.join(OUT, "v2-lite-tiny.f32.gguf"), "f32")
    convert(llama, os.path.join(FIXTURES, "v2-lite-tiny"), os.path.join(OUT, "v2-lite-tiny.q8_0.gguf"), "q8_0")
    for old in glob.glob(os.path.join(OUT, "v3-tiny.f16-*.gguf")):
        os.remove(old)
    convert(llama, os.path.join(FIXTURES, "v3-tiny"), os.path.join(OUT, "v3-tiny.f16.gguf"), "f16",
            "--split-max-tensors", "24")


    with tempfile.TemporaryDirectory() as tmp:
        hf = os.path.join(tmp, "k256")
        k256_model(hf)
        f32 = os.path.join(tmp, "k256.f32.gguf")
        convert(llama, hf, f32, "f32")
        tokens = [0] + list(np.random.default_rng(5).integers(2, 512, size=15))
        tokens = [int(t) for t in tokens]
        out = {"tokens": tokens, "f32": llama_logits(f32, tokens).astype(np.float64).round(4).tolist(), "files": {}}
        for name, ftype in [("q4_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M), ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
                            ("q5_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M)]:
            path = os.path.join(OUT, f"k256.{name}.gguf")
            quantize(f32, path, ftype)
            out["files"][name] = {"types": type_mix(path), "logits": llama_logits(path, tokens).astype(np.float64).round(4).tolist()}
            print(path, os.path.getsize(path), "bytes", type_mix(path))
        # moela's own K-quant writer, read by llama.cpp.
        for ty in ["q4_k", "q5_k", "q6_k"]:
            path = os.path.join(OUT, f"k256.moela.{ty}.gguf")
            subprocess.run([moela, "quantize", "--model", hf, "--out", path, "--type", ty], check=True)
            out["files"][f"moela.{ty}"] = {"types": type_mix(path), "logits": llama_logits(path, tokens).astype(np.float64).round(4).tolist()}
        out["llama_cpp_python"] = llama_cpp.__version__
        with open(os.path.join(OUT, "k256.llama.json"), "w") as f:
            json.dump(out, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
