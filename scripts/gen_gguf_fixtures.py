#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/: a small GGUF file written by llama.cpp's own Python package (`gguf` on PyPI,
the writer its converter uses), with metadata of every value type and tensors of several ggml types, and
what that package's reader (GGUFReader) finds in it, as JSON, for moela's parser to be checked against.

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


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "tiny.gguf")
    write(path)
    with open(os.path.join(OUT, "tiny.json"), "w") as f:
        json.dump(describe(path), f, indent=1)
    print(path, os.path.getsize(path), "bytes")
