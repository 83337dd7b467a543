#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/: a small GGUF file written by llama.cpp's own Python package (`gguf` on PyPI,
the writer its converter uses), with metadata of every value type and tensors of several ggml types, and
what that package's reader (GGUFReader) finds in it, as JSON, for moela's parser to be checked against; and,
for three of the HF fixtures, the metadata llama.cpp's converter writes for them (`NAME.gguf`, zero weights),
for reading a model's config from a GGUF header.

    pip install gguf==0.19.0 numpy
    python3 scripts/gen_gguf_fixtures.py

The files are small and committed, so the tests need no Python.
"""
import json
import os

import gguf
import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gguf")


def write(path):
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_name("moela-gguf-fixture")
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4_000_000_000)
    w.add_int32("test.i32", -2_000_000_000)
    w.add_float32("test.f32", 0.1)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo, gguf")
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", 2.718281828459045)
    w.add_array("test.array_u32", [1, 2, 3])
    w.add_array("test.array_str", ["a", "", "ccc"])
    w.add_block_count(2)
    rng = np.random.default_rng(7)
    # Shapes as numpy (outermost first), as the converter passes them.
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 64)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((32, 64)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((8, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_down.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    # The package quantises to Q4_K only through llama.cpp's C code; for the header, blocks of random bytes
    # of the right size serve.
    q4k_shape = gguf.quants.quant_shape_to_byte_shape((4, 256), gguf.GGMLQuantizationType.Q4_K)
    q4k = rng.integers(0, 256, size=q4k_shape, dtype=np.uint8)
    w.add_tensor("blk.0.ffn_gate_exps.weight", q4k, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_header_of(fixture, path):
    """The metadata llama.cpp's converter (convert_hf_to_gguf.py, DeepseekV2Model.set_gguf_parameters, which
    serves V2, V2-Lite and V3) writes for the HF fixture `fixture`, through the same writer methods, and the
    tensors that tell the loader the rest: the embedding, a separate head (untied) and V3's router bias.
    The weights are zeros: these files test reading a model's config from a GGUF header."""
    root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", fixture)
    c = json.load(open(os.path.join(root, "config.json")))
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_name(fixture)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(1)  # MLA as MQA: one latent shared by the heads
    rs = c.get("rope_scaling") or {}
    if rs.get("type", rs.get("rope_type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rs["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rs["beta_slow"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rs["mscale_all_dim"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(c["n_routed_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_expert_group_count(c["n_group"])
    w.add_expert_group_used_count(c["topk_group"])
    gating = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}
    w.add_expert_gating_func(gating[c["scoring_func"]])
    w.add_leading_dense_block_count(c["first_k_dense_replace"])
    w.add_vocab_size(c["vocab_size"])
    if c.get("q_lora_rank") is not None:
        w.add_q_lora_rank(c["q_lora_rank"])
    w.add_kv_lora_rank(c["kv_lora_rank"])
    w.add_key_length(c["kv_lora_rank"] + c["qk_rope_head_dim"])
    w.add_value_length(c["kv_lora_rank"])
    w.add_key_length_mla(c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
    w.add_value_length_mla(c["v_head_dim"])
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    w.add_expert_shared_count(c.get("n_shared_experts", 0))
    w.add_expert_weights_scale(c["routed_scaling_factor"])
    if c.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(c["qk_rope_head_dim"])
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    h, v = c["hidden_size"], c["vocab_size"]
    w.add_tensor("token_embd.weight", np.zeros((v, h), dtype=np.float16))
    if not c.get("tie_word_embeddings"):
        w.add_tensor("output.weight", np.zeros((v, h), dtype=np.float16))
    if c.get("topk_method") == "noaux_tc":
        first = c["first_k_dense_replace"]
        w.add_tensor(f"blk.{first}.exp_probs_b.bias", np.zeros(c["n_routed_experts"], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def describe(path):
    r = gguf.GGUFReader(path)
    metadata = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            inner = field.types[-1]
            if inner == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode() for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
        elif kind == gguf.GGUFValueType.STRING:
            value = bytes(field.parts[field.data[0]]).decode()
        else:
            value = field.parts[field.data[0]].tolist()[0]
        metadata[name] = {"type": int(kind), "value": value}
    tensors = [
        {
            "name": t.name,
            "dims": [int(d) for d in t.shape],  # GGUF order, innermost first
            "type": int(t.tensor_type),
            "offset": int(t.data_offset),
            "bytes": int(t.n_bytes),
        }
        for t in r.tensors
    ]
    sizes = {
        int(t): list(gguf.GGML_QUANT_SIZES[t])
        for t in gguf.GGMLQuantizationType
        if t != gguf.GGMLQuantizationType.Q8_1  # not a storage type: never in a file
    }
    return {"gguf": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0", "metadata": metadata,
            "tensors": tensors, "type_sizes": sizes}


def write_quants(path):
    """Blocks of every quantised type moela decodes (random codes, scales of a sane size) and, beside each,
    its values as the `gguf` package's own dequantisation (`gguf.quants.dequantize`, a NumPy port of
    llama.cpp's) gives them: `q.TYPE` and `ref.TYPE` (F32), four rows of two blocks."""
    w = gguf.GGUFWriter(path, "deepseek2")
    rng = np.random.default_rng(11)
    T = gguf.GGMLQuantizationType
    for t in [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]:
        per, size = gguf.GGML_QUANT_SIZES[t]
        blocks = rng.integers(0, 256, size=(8, size), dtype=np.uint8)
        # The f16 fields (scale d, and the minimum or dmin where the type has one) as values of a sane size.
        half = lambda n: rng.uniform(-0.05, 0.05, size=(8, n)).astype(np.float16).view(np.uint8)
        if t == T.Q6_K:
            blocks[:, -2:] = half(1)
        elif t in (T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K):
            blocks[:, 0:4] = half(2)
        else:
            blocks[:, 0:2] = half(1)
        raw = blocks.reshape(4, 2 * size)
        w.add_tensor(f"q.{t.name}", raw, raw_dtype=t)
        w.add_tensor(f"ref.{t.name}", gguf.quants.dequantize(raw, t).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "quants.gguf")
    write_quants(path)
    print(path, os.path.getsize(path), "bytes")
    path = os.path.join(OUT, "tiny.gguf")
    write(path)
    with open(os.path.join(OUT, "tiny.json"), "w") as f:
        json.dump(describe(path), f, indent=1)
    print(path, os.path.getsize(path), "bytes")
    for fixture in ["v2-lite-tiny", "v3-tiny", "v2-group-odd"]:
        path = os.path.join(OUT, fixture + ".gguf")
        write_header_of(fixture, path)
        print(path, os.path.getsize(path), "bytes")
