#!/usr/bin/env python3
"""Write a checkpoint folder with a real DeepSeek model's exact config.json and tensor shapes, and random values.

moela's loader and kernels have to be measured at the size people actually download (DeepSeek-V2-Lite: 15.7B
parameters, 31.4 GB of bf16 in shards), which no test fixture can be. This script writes such a folder from a
seed, so anyone can reproduce the measurements in docs/benchmarks.md without downloading a model:

    pip install numpy
    python3 scripts/write_real_shape.py --out /data/v2-lite-shape                 # 31.4 GB, 27 layers
    python3 scripts/write_real_shape.py --out /data/v2-lite-4l --layers 4          # the same widths, 4 layers
    python3 scripts/write_real_shape.py --out /data/v3-2l --preset v3 --layers 2   # V3's widths, 2 layers
    python3 scripts/write_real_shape.py --out /data/mini --preset v2-lite-mini     # moela's v2-lite-mini, 0.95 GB

    moela run --model /data/v2-lite-shape --weights q4 --prompt "1 + 1" --max-tokens 4
    /usr/bin/time -v moela bench --model /data/v2-lite-shape --weights q4 --json

The folder is what the hub's own looks like: config.json (the published one, with num_hidden_layers changed by
--layers), bf16 shards `model-0000N-of-0000M.safetensors` holding whole layers in model order (each shard's
tensors sorted by name, as the safetensors library writes them), model.safetensors.index.json, and the tokenizer
of moela's default model (its vocabulary is smaller than the config's, which moela accepts), so `moela run`
and `moela chat` work on it. Values are uniform with standard deviation 0.02, norms are 1, V3's router
correction bias is small f32 noise: the outputs are meaningless, the shapes, dtypes, layout and sizes are real.
Never commit such a folder.
"""

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The published config.json files (DeepSeek-V2-Lite and DeepSeek-V3), with the fields moela reads.
PRESETS = {
    "v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
        "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6, "routed_scaling_factor": 1.0,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "norm_topk_prob": False, "scoring_func": "softmax", "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "bos_token_id": 100000, "eos_token_id": 100001,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
        "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    # Not a published model: moela's own DeepSeek-V2-Lite scaled down (`moela bench --preset v2-lite-mini`),
    # whose widths are whole 256-value super-blocks, so llama.cpp's K-quant mixes apply to every matrix.
    "v2-lite-mini": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 512,
        "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
        "n_shared_experts": 2, "n_routed_experts": 32, "num_experts_per_tok": 4, "routed_scaling_factor": 1.0,
        "kv_lora_rank": 256, "q_lora_rank": None, "qk_rope_head_dim": 32, "v_head_dim": 64,
        "qk_nope_head_dim": 64, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "norm_topk_prob": False, "scoring_func": "softmax", "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "hidden_act": "silu", "max_position_embeddings": 16384, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "bos_token_id": 0, "eos_token_id": 1,
        "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "first_k_dense_replace": 3, "moe_layer_freq": 1,
        "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "bos_token_id": 0, "eos_token_id": 1,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
}


def layer_tensors(c, i):
    """(name, shape, kind) of layer i, kind one of 'w' (random bf16), 'norm' (ones), 'bias' (f32 noise)."""
    h, n_h = c["hidden_size"], c["num_attention_heads"]
    d_qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    r_kv, d_v = c["kv_lora_rank"], c["v_head_dim"]
    p = f"model.layers.{i}."
    out = [(p + "input_layernorm.weight", [h], "norm"), (p + "post_attention_layernorm.weight", [h], "norm")]
    a = p + "self_attn."
    if c["q_lora_rank"] is None:
        out.append((a + "q_proj.weight", [n_h * d_qk, h], "w"))
    else:
        r_q = c["q_lora_rank"]
        out += [(a + "q_a_proj.weight", [r_q, h], "w"), (a + "q_a_layernorm.weight", [r_q], "norm"),
                (a + "q_b_proj.weight", [n_h * d_qk, r_q], "w")]
    out += [(a + "kv_a_proj_with_mqa.weight", [r_kv + c["qk_rope_head_dim"], h], "w"),
            (a + "kv_a_layernorm.weight", [r_kv], "norm"),
            (a + "kv_b_proj.weight", [n_h * (c["qk_nope_head_dim"] + d_v), r_kv], "w"),
            (a + "o_proj.weight", [h, n_h * d_v], "w")]

    def mlp(prefix, width):
        return [(prefix + "gate_proj.weight", [width, h], "w"), (prefix + "up_proj.weight", [width, h], "w"),
                (prefix + "down_proj.weight", [h, width], "w")]

    if i < c["first_k_dense_replace"]:
        out += mlp(p + "mlp.", c["intermediate_size"])
    else:
        e, moe_i = c["n_routed_experts"], c["moe_intermediate_size"]
        out.append((p + "mlp.gate.weight", [e, h], "w"))
        if c["topk_method"] == "noaux_tc":
            out.append((p + "mlp.gate.e_score_correction_bias", [e], "bias"))
        for x in range(e):
            out += mlp(f"{p}mlp.experts.{x}.", moe_i)
        if c["n_shared_experts"]:
            out += mlp(p + "mlp.shared_experts.", c["n_shared_experts"] * moe_i)
    return out


def all_tensors(c):
    """Every tensor in model order, grouped by layer (the embedding first, the final norm and head last)."""
    v, h = c["vocab_size"], c["hidden_size"]
    groups = [[("model.embed_tokens.weight", [v, h], "w")]]
    groups += [layer_tensors(c, i) for i in range(c["num_hidden_layers"])]
    groups.append([("model.norm.weight", [h], "norm"), ("lm_head.weight", [v, h], "w")])
    return groups


def nbytes(shape, kind):
    return int(np.prod(shape)) * (4 if kind == "bias" else 2)


class Values:
    """bf16 bit patterns of uniform values (std 0.02), drawn once into a pool that tensors take windows of."""

    def __init__(self, seed, pool=1 << 25):
        self.rng = np.random.default_rng(seed)
        amp = 0.02 * np.sqrt(3.0)
        f = self.rng.uniform(-amp, amp, size=pool).astype(np.float32)
        # Round to nearest bf16 (the top half of the f32 bits).
        bits = f.view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        self.pool = np.concatenate([bits, bits]).astype("<u2")
        self.size = pool

    def bf16(self, n):
        """n values as little-endian bytes: windows of the pool at random offsets."""
        parts = []
        while n > 0:
            take = min(n, self.size)
            start = int(self.rng.integers(0, self.size))
            parts.append(self.pool[start:start + take])
            n -= take
        return parts

    def bias(self, n):
        return [self.rng.uniform(-0.01, 0.01, size=n).astype("<f4")]


def write_shard(path, tensors, values):
    """One safetensors file: an 8-byte header length, the JSON header, then the tensors in name order."""
    tensors = sorted(tensors, key=lambda t: t[0])
    header, offset = {}, 0
    for name, shape, kind in tensors:
        size = nbytes(shape, kind)
        header[name] = {"dtype": "F32" if kind == "bias" else "BF16", "shape": shape,
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, shape, kind in tensors:
            n = int(np.prod(shape))
            if kind == "norm":
                parts = [np.full(n, 0x3F80, dtype="<u2")]  # bf16 1.0
            elif kind == "bias":
                parts = values.bias(n)
            else:
                parts = values.bf16(n)
            for part in parts:
                f.write(part.tobytes())
    return offset


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write (created; must not exist)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="v2-lite")
    ap.add_argument("--layers", type=int, help="num_hidden_layers (default: the real model's)")
    ap.add_argument("--shard-bytes", type=float, default=6.5e9,
                    help="start a new shard past this many bytes (default 6.5e9: V2-Lite in 5 shards)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    c = dict(PRESETS[args.preset])
    if args.layers is not None:
        if args.layers < 1:
            sys.exit("--layers must be at least 1")
        c["num_hidden_layers"] = args.layers
    if os.path.exists(args.out):
        sys.exit(f"{args.out} exists; choose a new folder")
    groups = all_tensors(c)
    total = sum(nbytes(s, k) for g in groups for _, s, k in g)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.out)) or ".").free
    if total > free:
        sys.exit(f"{total / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")

    # Whole layers per shard, in model order.
    shards, current, size = [], [], 0
    for g in groups:
        g_size = sum(nbytes(s, k) for _, s, k in g)
        if current and size + g_size > args.shard_bytes:
            shards.append(current)
            current, size = [], 0
        current += g
        size += g_size
    shards.append(current)

    os.makedirs(args.out)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    tok = os.path.join(ROOT, "models", "moela-arith-tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok, name), os.path.join(args.out, name))

    values = Values(args.seed)
    weight_map, t0, done = {}, time.time(), 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        done += write_shard(os.path.join(args.out, name), tensors, values)
        for t in tensors:
            weight_map[t[0]] = name
        rate = done / max(time.time() - t0, 1e-9) / 1e9
        print(f"{name}: {len(tensors)} tensors, {done / 1e9:.1f} / {total / 1e9:.1f} GB ({rate:.2f} GB/s)",
              flush=True)
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    print(f"wrote {args.out}: {c['num_hidden_layers']} layers, {total / 1e9:.2f} GB in {len(shards)} shards")


if __name__ == "__main__":
    main()
