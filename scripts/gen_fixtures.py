#!/usr/bin/env python3
"""Generate tiny DeepSeek-V2/V3 reference fixtures for moela's tests.

Run from the repository root:

    pip install -r scripts/requirements-fixtures.txt
    python3 scripts/gen_fixtures.py            # (re)writes every tests/fixtures/<name>/
    python3 scripts/gen_fixtures.py --only v3-tiny

Nothing is downloaded: the tokenizer is trained here on a small built-in corpus and every model is a
random tiny checkpoint. Output is deterministic (fixed seeds, single-threaded torch/tokenizers);
running it twice gives byte-identical files for a given set of package versions
(scripts/requirements-fixtures.txt pins the versions the committed fixtures were made with).

What each fixture folder contains (a normal Hugging Face checkpoint folder):

* config.json - written by hand from a dict, spelled the way the original hub checkpoints spell it
  (`rope_theta` + `rope_scaling {"type": "yarn", ...}`), except `v3-moonlight-odd`, which uses the
  newer `rope_parameters` spelling. Every field of the architecture reference section 1 is present.
* model.safetensors (or model-0000X-of-00002.safetensors + model.safetensors.index.json) - weights
  with the hub tensor names (per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`, nn.Linear
  [out, in] layout), stored in bf16 (f16 for `v3-moonlight-odd`); `mlp.gate.e_score_correction_bias`
  (V3) is stored in f32 like on the hub.
* tokenizer.json / tokenizer_config.json - a byte-level BPE (DeepSeek-V3 pre-tokenizer regexes,
  ByteLevel decoder) with the DeepSeek-R1 special tokens and the R1 chat template.
* reference.json - float32 logits of one forward pass (see "reference.json layout" below).

How the reference is made consistent with the files: random weights are drawn in float32, rounded
to the storage dtype (bf16/f16), loaded back into the transformers model in float32, and the logits
are computed in float32 with `attn_implementation="eager"` and `experts_implementation="eager"`.
After writing, every folder is re-loaded with `from_pretrained` (float32, eager) and the logits are
recomputed from the files; the script fails if they differ by more than 1e-5. The script also
checks that routing is non-degenerate (different expert sets across tokens, the V3 correction bias
changes some selections) and that no routing decision is a near tie (margin >= MIN_ROUTE_MARGIN), so
an f32 implementation with a different summation order makes the same expert choices.

Weight initialisation (per tensor, in-memory transformers names):
  embed_tokens ~ N(0, embed_std^2) (embed_std 1, except 0.004 for v3-moonlight-odd);
  RMSNorm weights ~ 1 + N(0, 0.1^2); every Linear [out, in] ~ N(0, (g/sqrt(in))^2) with g = 1
  (LM_HEAD_GAIN for lm_head, ROUTER_GAIN for mlp.gate.weight, kv_latent_gain for the first
  kv_lora_rank rows of kv_a_proj_with_mqa: 0.003 for v3-moonlight-odd so that the kv_a_layernorm eps
  matters); V3 e_score_correction_bias ~ U(bias_range) (default +-BIAS_RANGE; v3-tiny (-0.85, -0.45)
  so some bias-corrected scores are negative and a 0-instead-of--inf group mask changes the choice).
  For each fixture the first init seed (spec seed * 1000 + attempt) passing the routing checks is used.

reference.json layout:
  {
    "fixture": name, "transformers_version": ..., "torch_version": ...,
    "model_class": "DeepseekV3ForCausalLM", "weights_dtype": "bfloat16", "attn_implementation": "eager",
    "init_seed": int,
    "tokens": [ids...],                        # bos first, then ids spread over [2, vocab), incl. vocab-1
    "logits": [[vocab floats] per position],   # float32 logits, 6 significant digits
    "long": {"tokens": [...], "logits": [[...]]},   # only v3-tiny: 40 positions
    "prompt_text": str, "prompt_ids": [...],   # HF tokenizer(prompt_text) (adds bos via add_bos_token)
    "chat_messages": [...], "chat_prompt": str,  # apply_chat_template(chat_messages, tokenize=False,
    "chat_prompt_ids": [...],                    #   add_generation_prompt=True); ids = tokenizer(
                                                 #   chat_prompt, add_special_tokens=False)
    "chat_examples": [{"messages", "add_generation_prompt", "rendered", "ids"}, ...],  # [0] = the above,
                                                 #   [1] = system + multi-turn with </think> stripping
    "special_token_ids": {token: id},
    "routing": {"layerN": {...}}               # diagnostics (min decision margin, expert sets per token)
  }

Shipped models (`--model models/<name>`): loads an existing checkpoint folder with transformers (float32,
eager) and writes tests/fixtures/<name>.reference.json: the chat prompt rendered and tokenised by the HF
tokenizer, a worked solution appended, float32 logits of every position, and transformers' own greedy
continuation of the prompt (`generate`, do_sample=False). moela's tests compare all three.

Companion: scripts/ref_forward.py re-computes every reference from the files alone (float64, no
transformers), following the architecture reference document; `--mutations` shows which fixture
catches which classic porting bug.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoTokenizer,
    DeepseekV2ForCausalLM,
    DeepseekV3ForCausalLM,
)

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"

LM_HEAD_GAIN = 2.0
ROUTER_GAIN = 1.5
BIAS_RANGE = 0.15
MIN_ROUTE_MARGIN = 1e-3
REF_LEN = 14
LONG_LEN = 40

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
THINK_END = "</think>"
TOKENIZER_SIZE = 512  # trained BPE vocab (incl. bos/eos) + 4 added tokens

# DeepSeek-V3 / R1 tokenizer.json pre-tokenizer: three isolated regex splits, then ByteLevel
# without its own regex (llama.cpp LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM uses the same three).
DS3_SPLIT_REGEXES = [
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]

# DeepSeek-R1 chat_template (hub tokenizer_config.json, version with `<think>\n` generation prompt).
# `\n` below is a backslash-n inside Jinja string literals, exactly as in the hub JSON ("\\n").
R1_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n'"
    " + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n'"
    " + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}"
    "{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}"
    "{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

CORPUS_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can still learn the shape of language.
What is 2 + 3? The answer is 5. What is 12 + 30? The answer is 42. Let me think about it step by step.
First, we add the ones. Then we add the tens. Finally, we check the result and write the answer.
Mixture of experts models route each token to a few experts. Attention compresses keys and values
into a small latent vector, and rotary position embeddings encode where each token is.
The weather today is sunny with a light breeze. She said that the meeting would start at nine o'clock.
Numbers like 1024, 2048, 4096 and 65536 are powers of two. Pi is about 3.14159 and e is about 2.71828.
Please answer the question: how many apples are left if you have 7 apples and eat 3? There are 4 left.
Café, naïve, résumé, déjà vu, élève, crème brûlée, and fiancée are French loanwords.
中文文本也需要被正确地切分。我们今天学习数学：二加三等于五。你好，世界！
日本語のひらがなとカタカナ：こんにちは、カタカナ。
Emoji are multi-byte too: 😀 🚀 🎉 👍 ❤️ and the thinking face 🤔.
<think> reasoning goes here </think> The final answer is boxed.
User: Hello! Assistant: Hi, how can I help you today?
def add(a, b):
    return a + b
print(add(2, 3))  # prints 5
for i in range(10): total = total * 2 - i
"""


def build_corpus() -> list[str]:
    lines = CORPUS_TEXT.splitlines()
    # arithmetic drill, deterministic
    rng = np.random.RandomState(1234)
    for _ in range(300):
        a, b = int(rng.randint(0, 1000)), int(rng.randint(0, 1000))
        op = ["+", "-", "*"][int(rng.randint(0, 3))]
        val = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"What is {a} {op} {b}? {a} {op} {b} = {val}.")
    return lines * 3


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in DS3_SPLIT_REGEXES]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    n_added = 4
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_SIZE - n_added,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(BOS, special=True, normalized=False), AddedToken(EOS, special=True, normalized=False)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    trained = tok.get_vocab_size()
    if trained != TOKENIZER_SIZE - n_added:
        raise SystemExit(f"BPE trainer produced {trained} tokens, wanted {TOKENIZER_SIZE - n_added}: extend the corpus")
    # R1: User/Assistant/think markers are added tokens with "special": false.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (USER, ASSISTANT, THINK, THINK_END)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    assert tok.get_vocab_size() == TOKENIZER_SIZE
    return tok


def write_tokenizer_json(tok: Tokenizer, path: Path) -> None:
    """Save like the hub files: merges as "a b" strings (byte-level tokens never contain a space)."""
    data = json.loads(tok.to_str())
    merges = data["model"]["merges"]
    if merges and isinstance(merges[0], list):
        assert all(" " not in a and " " not in b for a, b in merges)
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    # the file must encode exactly like the trained object
    again = Tokenizer.from_file(str(path))
    for line in build_corpus()[:400] + [CHAT_PROBE]:
        assert again.encode(line).ids == tok.encode(line).ids, line


CHAT_PROBE = BOS + USER + "Hi<think>x</think>" + ASSISTANT + "ok" + EOS


def added_token_dict(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def tokenizer_config() -> dict:
    # Field set and values as in DeepSeek-R1's tokenizer_config.json.
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added_token_dict(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": added_token_dict(EOS),
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": added_token_dict(EOS),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": R1_CHAT_TEMPLATE,
    }


# --------------------------------------------------------------------------------------------
# Fixture specifications
# --------------------------------------------------------------------------------------------
def common_fields(vocab_size: int, bos: int, eos: int) -> dict:
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "ep_size": 1,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "moe_layer_freq": 1,
        "pretraining_tp": 1,
        "seq_aux": True,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def fixture_specs(bos: int, eos: int) -> list[dict]:
    specs = []

    # 1. V2-Lite shape
    cfg = common_fields(512, bos, eos)
    cfg.update({
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-06,
        "torch_dtype": "bfloat16",
    })
    specs.append({"name": "v2-lite-tiny", "config": cfg, "seed": 101, "dtype": torch.bfloat16, "shards": 1})

    # 2. V3 shape, YaRN that bends frequencies inside the tested range, sharded
    cfg = common_fields(512, bos, eos)
    cfg.update({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 48,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "first_k_dense_replace": 1,
        "topk_method": "noaux_tc",
        "n_group": 4,
        "topk_group": 2,
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": 0,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 64,
            "type": "yarn",
        },
        "max_position_embeddings": 2560,
        "rms_norm_eps": 1e-06,
        "torch_dtype": "bfloat16",
    })
    # The correction bias is shifted negative so that some bias-corrected scores are < 0: then filling
    # the masked groups with 0 instead of -inf picks a masked expert (caught by this fixture).
    specs.append({"name": "v3-tiny", "config": cfg, "seed": 202, "dtype": torch.bfloat16, "shards": 2,
                  "long": True, "bias_range": (-0.85, -0.45), "need_mask_zero_sensitive": True})

    # 3. V2 236B-style router (group_limited_greedy, rsf 16) with odd sizes, q_lora, no dense layer
    cfg = common_fields(520, bos, eos)
    cfg.update({
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "hidden_size": 72,
        "intermediate_size": 100,
        "moe_intermediate_size": 20,
        "num_hidden_layers": 3,
        "num_attention_heads": 3,
        "num_key_value_heads": 3,
        "q_lora_rank": 40,
        "kv_lora_rank": 24,
        "qk_nope_head_dim": 12,
        "qk_rope_head_dim": 6,
        "v_head_dim": 10,
        "n_routed_experts": 12,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "first_k_dense_replace": 0,
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 16.0,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 16,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
            "original_max_position_embeddings": 32,
            "type": "yarn",
        },
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-06,
        "torch_dtype": "bfloat16",
    })
    specs.append({"name": "v2-group-odd", "config": cfg, "seed": 303, "dtype": torch.bfloat16, "shards": 1})

    # 4. Moonlight-like V3: no YaRN, rope_parameters spelling, f16 weights
    cfg = common_fields(512, bos, eos)
    cfg.update({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": 80,
        "intermediate_size": 120,
        "moe_intermediate_size": 28,
        "num_hidden_layers": 3,
        "num_attention_heads": 5,
        "num_key_value_heads": 5,
        "q_lora_rank": None,
        "kv_lora_rank": 20,
        "qk_nope_head_dim": 10,
        "qk_rope_head_dim": 4,
        "v_head_dim": 14,
        "n_routed_experts": 10,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "first_k_dense_replace": 1,
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.446,
        "num_nextn_predict_layers": 0,
        # newer transformers spelling (what 5.x save_pretrained writes): rope_parameters, dtype,
        # rope_interleave, and head_dim == qk_rope_head_dim (NOT the attention head size).
        "rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"},
        "rope_interleave": True,
        "head_dim": 4,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "dtype": "float16",
    })
    # embed_std / kv_latent_gain make mean(x^2) at layer 0's input_layernorm and at every kv_a_layernorm
    # ~1e-5, so using the wrong eps (1e-6 vs rms_norm_eps 1e-5) visibly changes the logits.
    specs.append({"name": "v3-moonlight-odd", "config": cfg, "seed": 404, "dtype": torch.float16, "shards": 1,
                  "embed_std": 0.004, "kv_latent_gain": 0.003})
    return specs


# --------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------
def model_class(cfg: dict):
    return {"deepseek_v2": DeepseekV2ForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM}[cfg["model_type"]]


def init_weights(model: torch.nn.Module, seed: int, spec: dict) -> dict[str, torch.Tensor]:
    """Draw every persistent tensor (state_dict, in-memory names) in float32."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    kv_lora = spec["config"]["kv_lora_rank"]
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith("e_score_correction_bias"):
            lo, hi = spec.get("bias_range", (-BIAS_RANGE, BIAS_RANGE))
            v = lo + torch.rand(shape, generator=gen) * (hi - lo)
        elif name.endswith("embed_tokens.weight"):
            v = torch.randn(shape, generator=gen) * spec.get("embed_std", 1.0)
        elif name.endswith("kv_a_proj_with_mqa.weight"):
            v = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
            v[:kv_lora] *= spec.get("kv_latent_gain", 1.0)
        elif "norm" in name.split(".")[-2] or "layernorm" in name:
            v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            fan_in = shape[-1]  # [E, out, in]
            v = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        elif name.endswith(".weight") and len(shape) == 2:
            gain = LM_HEAD_GAIN if name == "lm_head.weight" else ROUTER_GAIN if name.endswith("mlp.gate.weight") else 1.0
            v = torch.randn(shape, generator=gen) * gain / math.sqrt(shape[1])
        else:
            raise SystemExit(f"no init rule for {name} {shape}")
        out[name] = v.float()
    return out


def round_to_storage(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith("e_score_correction_bias"):
            out[k] = v.float()  # stored as f32 on the hub
        else:
            out[k] = v.to(dtype).float()
    return out


def to_hub_tensors(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> "collections.OrderedDict[str, torch.Tensor]":
    """In-memory transformers names -> original hub names/layout, cast to the storage dtype."""
    hub = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            prefix = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2  # [E, 2*I, H]: rows [gate | up] (conversion_mapping: Concatenate(dim=1))
            for e in range(v.shape[0]):
                hub[f"{prefix}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                hub[f"{prefix}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            prefix = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                hub[f"{prefix}{e}.down_proj.weight"] = v[e].contiguous()  # [H, I]
        else:
            hub[k] = v.contiguous()
    out = collections.OrderedDict()
    for k in sorted(hub, key=hub_sort_key):
        v = hub[k]
        out[k] = v.float() if k.endswith("e_score_correction_bias") else v.to(dtype)
    return out


def hub_sort_key(name: str):
    parts = name.split(".")
    if name.startswith("model.embed_tokens"):
        return (0, 0, name)
    if name.startswith("model.layers."):
        layer = int(parts[2])
        rest = ".".join(parts[3:])
        if ".experts." in name:
            e = int(parts[parts.index("experts") + 1])
            rest = f"mlp.experts.{e:05d}." + ".".join(parts[parts.index("experts") + 2:])
        return (1, layer, rest)
    return (2, 0, name)


def save_weights(folder: Path, tensors: "collections.OrderedDict[str, torch.Tensor]", shards: int) -> None:
    meta = {"format": "pt"}
    if shards == 1:
        save_file(dict(tensors), str(folder / "model.safetensors"), metadata=meta)
        os.chmod(folder / "model.safetensors", 0o644)
        return
    assert shards == 2
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    total = sum(sizes.values())
    names = list(tensors)
    acc, cut = 0, len(names)
    for i, k in enumerate(names):
        if acc >= total / 2:
            cut = i
            break
        acc += sizes[k]
    parts = [names[:cut], names[cut:]]
    weight_map = {}
    for idx, part in enumerate(parts):
        fname = f"model-{idx + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / fname), metadata=meta)
        os.chmod(folder / fname, 0o644)
        for k in part:
            weight_map[k] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Routing diagnostics (re-implements the transformers routers to measure decision margins)
# --------------------------------------------------------------------------------------------
def topk_margin(scores: torch.Tensor, k: int) -> torch.Tensor:
    s = torch.sort(scores, dim=-1, descending=True).values
    return s[:, k - 1] - s[:, k]


@torch.no_grad()
def analyse_router(gate: torch.nn.Module, x: torch.Tensor, cfg: dict) -> dict:
    x = x.reshape(-1, x.shape[-1]).float()
    logits = x @ gate.weight.float().t()
    E, K = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    G, TG = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    margins = []
    bias_changed = None
    mask_zero_changed = None
    if cfg["model_type"] == "deepseek_v2":
        scores = logits.softmax(-1)
        if cfg["topk_method"] == "greedy":
            choice = scores
        else:
            gs = scores.view(-1, G, E // G).max(-1).values
            margins.append(topk_margin(gs, TG))
            keep = torch.zeros_like(gs).scatter_(1, gs.topk(TG, -1).indices, 1.0)
            choice = scores.masked_fill(~keep.repeat_interleave(E // G, 1).bool(), 0.0)
        idx = choice.topk(K, -1).indices
        margins.append(topk_margin(choice, K))
    else:
        scores = logits.sigmoid()
        sfc = scores + gate.e_score_correction_bias.float()

        def select(s, fill=float("-inf")):
            gs = s.view(-1, G, E // G).topk(2, -1).values.sum(-1)
            keep = torch.zeros_like(gs).scatter_(1, gs.topk(TG, -1).indices, 1.0)
            masked = s.masked_fill(~keep.repeat_interleave(E // G, 1).bool(), fill)
            return gs, masked

        gs, masked = select(sfc)
        if G > 1:
            margins.append(topk_margin(gs, TG))
        margins.append(topk_margin(masked, K))
        idx = masked.topk(K, -1).indices
        _, masked_nobias = select(scores)
        idx_nobias = masked_nobias.topk(K, -1).indices
        bias_changed = int(sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(idx, idx_nobias)))
        # tokens whose choice would change if masked groups were filled with 0 instead of -inf
        _, masked_zero = select(sfc, 0.0)
        mask_zero_changed = int(sum(set(a.tolist()) != set(b.tolist())
                                    for a, b in zip(idx, masked_zero.topk(K, -1).indices)))
    m = torch.stack(margins, 0).min(0).values
    sets = [tuple(sorted(r.tolist())) for r in idx]
    return {
        "min_margin": float(m.min()),
        "distinct_expert_sets": len(set(sets)),
        "tokens": len(sets),
        "bias_changed_tokens": bias_changed,
        "mask_zero_changed_tokens": mask_zero_changed,
        "sets": sets,
        "idx": idx,
    }


def forward_with_routing(model, cfg, tokens: list[int]):
    captured = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            def hook(mod, args, out, i=i):
                captured[i] = (args[0].detach().clone(), out[2].detach().clone())
            hooks.append(gate.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), use_cache=False).logits[0].float()
    for h in hooks:
        h.remove()
    report = {}
    for i, (x, tf_idx) in sorted(captured.items()):
        r = analyse_router(model.model.layers[i].mlp.gate, x, cfg)
        mine = [set(a.tolist()) for a in r.pop("idx")]
        theirs = [set(a.tolist()) for a in tf_idx]
        if mine != theirs:
            raise SystemExit(f"layer {i}: re-implemented router disagrees with transformers")
        report[f"layer{i}"] = r
    return logits, report


# --------------------------------------------------------------------------------------------
# Main per-fixture work
# --------------------------------------------------------------------------------------------
def fmt(x: float) -> str:
    s = f"{x:.6g}"
    return s


def logits_json(rows: torch.Tensor) -> str:
    return "[\n" + ",\n".join("    [" + ",".join(fmt(v) for v in row.tolist()) + "]" for row in rows) + "\n  ]"


def write_reference(path: Path, head: dict, logits: torch.Tensor, tail: dict, long=None) -> None:
    """reference.json: `head` fields, the logits one row per line, the optional long run, then `tail` fields."""
    parts = ["{"]
    for k, v in head.items():
        parts.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},")
    parts.append(f'  "logits": {logits_json(logits)},')
    if long is not None:
        parts.append(f'  "long": {{"tokens": {json.dumps(long[0])}, "logits": {logits_json(long[1])}}},')
    items = list(tail.items())
    for i, (k, v) in enumerate(items):
        sep = "," if i < len(items) - 1 else ""
        parts.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}{sep}")
    parts.append("}")
    path.write_text("\n".join(parts) + "\n")


def make_tokens(seed: int, n: int, vocab: int, bos: int) -> list[int]:
    """bos, then n-1 distinct ids spread over [2, vocab); always includes vocab-1 (the last embedding
    row: for v2-group-odd that is a padding row beyond the tokenizer's 512 ids)."""
    rng = np.random.RandomState(seed)
    ids = list(rng.choice(np.arange(2, vocab - 1), size=n - 2, replace=False)) + [vocab - 1]
    rng.shuffle(ids)
    return [bos] + [int(i) for i in ids]


def build_fixture(spec: dict, tok_dir: Path, out_root: Path) -> dict:
    name, cfg = spec["name"], spec["config"]
    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / f, folder / f)

    # Config through transformers' own loader (exercises the hub spelling of every field).
    config = AutoConfig.from_pretrained(folder)
    cls = model_class(cfg)
    torch.manual_seed(spec["seed"])
    model = cls._from_config(config, attn_implementation="eager", experts_implementation="eager",
                             dtype=torch.float32)
    model.eval()

    tokens = make_tokens(spec["seed"], REF_LEN, cfg["vocab_size"], cfg["bos_token_id"])
    long_tokens = make_tokens(spec["seed"] + 1, LONG_LEN, cfg["vocab_size"], cfg["bos_token_id"]) if spec.get("long") else None

    # Seed search: the first seed whose routing has no near-ties is kept (deterministic).
    for attempt in range(50):
        seed = spec["seed"] * 1000 + attempt
        sd32 = init_weights(model, seed, spec)
        sd = round_to_storage(sd32, spec["dtype"])
        model.load_state_dict(sd, strict=True)
        logits, routing = forward_with_routing(model, cfg, tokens)
        routes = [routing]
        long_logits = None
        if long_tokens is not None:
            long_logits, long_routing = forward_with_routing(model, cfg, long_tokens)
            routes.append(long_routing)
        min_margin = min(r["min_margin"] for rr in routes for r in rr.values())
        ok = min_margin >= MIN_ROUTE_MARGIN
        for rr in routes:
            for r in rr.values():
                ok &= r["distinct_expert_sets"] >= min(3, r["tokens"])
                if r["bias_changed_tokens"] is not None:
                    ok &= r["bias_changed_tokens"] >= 1
            if spec.get("need_mask_zero_sensitive"):
                ok &= any(r["mask_zero_changed_tokens"] for r in rr.values())
        if ok:
            break
        print(f"  {name}: seed {seed} rejected (min routing margin {min_margin:.2e}, "
              f"0-mask sensitive {[r['mask_zero_changed_tokens'] for rr in routes for r in rr.values()]})",
              file=sys.stderr)
    else:
        raise SystemExit(f"{name}: no acceptable seed")

    # Non-degenerate logits.
    std_over_vocab = logits.std(-1)
    if float(std_over_vocab.min()) < 0.5:
        raise SystemExit(f"{name}: logits nearly constant over the vocab (std {std_over_vocab.min():.3f})")
    if float((logits[1:] - logits[:-1]).abs().max(-1).values.min()) < 0.1:
        raise SystemExit(f"{name}: logits nearly identical between positions")

    hub = to_hub_tensors(sd, spec["dtype"])
    save_weights(folder, hub, spec["shards"])

    # Tokenizer data through the HF tokenizer.
    hf_tok = AutoTokenizer.from_pretrained(folder)
    raw_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt_text = "Hello, world! What is 12 + 30? Café 中文 😀"
    prompt_ids = hf_tok(prompt_text).input_ids
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    chat_prompt = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_prompt_ids = hf_tok(chat_prompt, add_special_tokens=False).input_ids
    assert raw_tok.encode(prompt_text).ids == prompt_ids, "tokenizers vs transformers disagree (prompt)"
    assert raw_tok.encode(chat_prompt, add_special_tokens=False).ids == chat_prompt_ids, "chat ids disagree"
    # A second, multi-turn conversation: system prompt, an earlier assistant turn whose reasoning the
    # R1 template strips (everything up to </think>), no generation prompt.
    multi = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Café? 中文 😀"},
        {"role": "assistant", "content": "<think>\nThe user greets.\n</think>\n\nHello! 😀"},
        {"role": "user", "content": "What is 12 * 3?"},
    ]
    multi_prompt = hf_tok.apply_chat_template(multi, tokenize=False, add_generation_prompt=False)
    multi_ids = hf_tok(multi_prompt, add_special_tokens=False).input_ids
    assert raw_tok.encode(multi_prompt, add_special_tokens=False).ids == multi_ids
    special_ids = {t: hf_tok.convert_tokens_to_ids(t) for t in (BOS, EOS, USER, ASSISTANT, THINK, THINK_END)}
    assert special_ids[BOS] == cfg["bos_token_id"] and special_ids[EOS] == cfg["eos_token_id"]

    routing_summary = {
        k: {kk: vv for kk, vv in v.items() if kk != "sets"} | {"expert_sets": [list(s) for s in v["sets"]]}
        for k, v in routing.items()
    }
    head = {
        "fixture": name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "model_class": cfg["architectures"][0],
        "weights_dtype": str(spec["dtype"]).replace("torch.", ""),
        "attn_implementation": "eager",
        "init_seed": seed,
        "tokens": tokens,
    }
    tail = {
        "prompt_text": prompt_text,
        "prompt_ids": prompt_ids,
        "chat_messages": messages,
        "chat_prompt": chat_prompt,
        "chat_prompt_ids": chat_prompt_ids,
        "chat_examples": [
            {"messages": messages, "add_generation_prompt": True, "rendered": chat_prompt, "ids": chat_prompt_ids},
            {"messages": multi, "add_generation_prompt": False, "rendered": multi_prompt, "ids": multi_ids},
        ],
        "special_token_ids": special_ids,
        "routing": routing_summary,
    }
    long = None if long_logits is None else (long_tokens, long_logits)
    write_reference(folder / "reference.json", head, logits, tail, long)

    # Round trip: reload the written folder with transformers and recompute from the files.
    verify_fixture(folder, logits, tokens, long_logits, long_tokens)
    return {"name": name, "seed": seed, "routing": routing_summary, "logits_std": float(std_over_vocab.mean())}


def verify_fixture(folder: Path, logits, tokens, long_logits, long_tokens) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cls = model_class(cfg)
    for impl in ("eager", None):
        kw = {"experts_implementation": impl} if impl else {}
        m = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", **kw)
        m.eval()
        with torch.no_grad():
            got = m(torch.tensor([tokens]), use_cache=False).logits[0].float()
            diff = float((got - logits).abs().max())
            if long_tokens is not None:
                got_l = m(torch.tensor([long_tokens]), use_cache=False).logits[0].float()
                diff = max(diff, float((got_l - long_logits).abs().max()))
        if diff > 1e-5:
            raise SystemExit(f"{folder.name}: reloaded checkpoint (experts={impl}) differs by {diff}")
        # Incremental decoding with the cache must agree too (prefill 1 token, then step by step).
        if impl == "eager":
            with torch.no_grad():
                out = m(torch.tensor([tokens[:1]]), use_cache=True)
                cache = out.cache if hasattr(out, "cache") else out.past_key_values
                steps = [out.logits[0, -1]]
                for t in tokens[1:]:
                    out = m(torch.tensor([[t]]), cache=cache, use_cache=True)
                    cache = out.cache if hasattr(out, "cache") else out.past_key_values
                    steps.append(out.logits[0, -1])
                dd = float((torch.stack(steps).float() - logits).abs().max())
            if dd > 1e-4:
                raise SystemExit(f"{folder.name}: cached decode differs from prefill by {dd}")
        del m


MODEL_QUESTION = "What is 457 + 389?"
MODEL_SOLUTION = ("457 + 389\nones: 7 + 9 = 16, write 6 carry 1, so far 6\n"
                  "tens: 5 + 8 + 1 = 14, write 4 carry 1, so far 46\n"
                  "hundreds: 4 + 3 + 1 = 8, write 8, so far 846\n457 + 389 = 846\n</think>\n\nThe answer is 846.")
MODEL_GREEDY_QUESTION = "A shop had 512 apples. It sold 137 in the morning and 88 in the afternoon. How many apples are left?"


def reference_for_model(folder: Path, out_dir: Path) -> None:
    """Reference logits and greedy tokens of a shipped checkpoint folder, from transformers."""
    cfg = json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    model = model_class(cfg).from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    messages = [{"role": "user", "content": MODEL_QUESTION}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    solution_ids = tok(MODEL_SOLUTION, add_special_tokens=False)["input_ids"]
    tokens = prompt_ids + solution_ids + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), use_cache=False).logits[0].float()
    greedy_prompt = tok.apply_chat_template(
        [{"role": "user", "content": MODEL_GREEDY_QUESTION}], tokenize=False, add_generation_prompt=True
    )
    greedy_prompt_ids = tok(greedy_prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([greedy_prompt_ids]), max_new_tokens=400, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        )
    greedy = out[0, len(greedy_prompt_ids):].tolist()
    head = {
        "model": folder.name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "model_class": type(model).__name__,
        "chat_messages": messages,
        "chat_prompt": prompt,
        "chat_prompt_ids": prompt_ids,
        "tokens": tokens,
    }
    tail = {
        "greedy_question": MODEL_GREEDY_QUESTION,
        "greedy_prompt_ids": greedy_prompt_ids,
        "greedy_tokens": greedy,
        "greedy_text": tok.decode(greedy),
    }
    path = out_dir / f"{folder.name}.reference.json"
    write_reference(path, head, logits, tail)
    print(f"{path}: {len(tokens)} positions; greedy: {tok.decode(greedy)!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", help="fixture name(s) to (re)generate")
    ap.add_argument("--out", type=Path, default=FIXTURES_DIR)
    ap.add_argument("--model", type=Path, help="a shipped checkpoint folder: write <out>/<name>.reference.json")
    args = ap.parse_args()

    if args.model:
        torch.use_deterministic_algorithms(True)
        reference_for_model(args.model, args.out)
        return

    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        tok_dir = Path(td)
        tok = train_tokenizer()
        write_tokenizer_json(tok, tok_dir / "tokenizer.json")
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
        bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
        for spec in fixture_specs(bos, eos):
            if args.only and spec["name"] not in args.only:
                continue
            info = build_fixture(spec, tok_dir, args.out)
            rs = "; ".join(
                f"{k}: margin {v['min_margin']:.1e}, {v['distinct_expert_sets']}/{v['tokens']} sets"
                + (f", bias changed {v['bias_changed_tokens']}" if v["bias_changed_tokens"] is not None else "")
                + (f", 0-mask changed {v['mask_zero_changed_tokens']}" if v["mask_zero_changed_tokens"] else "")
                for k, v in info["routing"].items()
            )
            size = sum(p.stat().st_size for p in (args.out / spec["name"]).iterdir())
            print(f"{spec['name']}: seed {info['seed']}, mean logit std {info['logits_std']:.2f}, "
                  f"{size / 1024:.0f} KiB; {rs}")


if __name__ == "__main__":
    main()
