#!/usr/bin/env python3
"""Independent from-scratch forward pass for the moela fixtures (no transformers).

    python3 scripts/ref_forward.py                 # checks every tests/fixtures/*/reference.json
    python3 scripts/ref_forward.py tests/fixtures/v3-tiny

Reads config.json (either `rope_theta` + `rope_scaling` or `rope_parameters`) and the safetensors
files by their hub names, runs the DeepSeek-V2/V3 forward pass in float64 exactly as written in
the DeepSeek architecture notes (interleaved RoPE pairs, YaRN with the
mscale/mscale_all_dim amplitude and the mscale_all_dim^2 softmax factor, q_a/kv_a norms with eps
1e-6, V2 softmax routers / V3 sigmoid noaux_tc router), and compares with the transformers logits
stored in reference.json. It is a readable model of what the Rust runtime has to compute and a
check that the reference document and transformers agree on these fixtures.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

torch.set_num_threads(1)
DT = torch.float64

# Deliberate bugs for --mutations (shows which fixture catches which porting mistake).
MUTATIONS = [
    "neox_rope",            # pair (x[i], x[i + d/2]) instead of (x[2i], x[2i+1])
    "no_mscale_sq",         # softmax scale without the m(s, mscale_all_dim)^2 factor
    "no_yarn_freq",         # plain RoPE frequencies despite rope_scaling yarn
    "no_yarn_amp",          # ignore the mscale/mscale_all_dim cos/sin amplitude
    "latent_norm_eps_cfg",  # q_a/kv_a layernorm with rms_norm_eps instead of 1e-6
    "eps_1e6",              # hard-coded 1e-6 instead of rms_norm_eps
    "biased_weights",       # V3: expert weights from the bias-corrected scores
    "no_bias",              # V3: ignore e_score_correction_bias
    "group_max",            # V3: group score = max instead of sum of top-2
    "group_sum",            # V2: group score = sum instead of max
    "mask_zero",            # V3: masked groups filled with 0 instead of -inf
    "no_rsf",               # routed_scaling_factor not applied
    "flip_norm",            # norm_topk_prob inverted
]
MUT: set[str] = set()


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    w = {}
    for f in files:
        w.update(load_file(str(folder / f)))
    return {k: v.to(DT) for k, v in w.items()}


def rope_params(cfg: dict) -> dict:
    if "rope_parameters" in cfg:
        rp = dict(cfg["rope_parameters"] or {})
    else:
        rp = dict(cfg.get("rope_scaling") or {})
        rp["rope_theta"] = cfg.get("rope_theta", 10000.0)
    rp["rope_type"] = rp.get("rope_type", rp.get("type", "default"))
    return rp


def yarn_m(scale: float, k: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0


def rope_tables(cfg: dict, positions: int):
    """inv_freq per pair i (pairs (2i, 2i+1)), cos/sin amplitude and the softmax scale."""
    rp = rope_params(cfg)
    d = cfg["qk_rope_head_dim"]
    theta = float(rp["rope_theta"])
    inv = theta ** (-torch.arange(0, d, 2, dtype=DT) / d)
    amp = 1.0
    scale = (cfg["qk_nope_head_dim"] + d) ** -0.5
    if rp["rope_type"] == "yarn":
        s = float(rp["factor"])
        L0 = rp["original_max_position_embeddings"]
        bf, bs = rp.get("beta_fast", 32), rp.get("beta_slow", 1)

        def corr(n):
            return d * math.log(L0 / (n * 2 * math.pi)) / (2 * math.log(theta))

        low, high = max(math.floor(corr(bf)), 0), min(math.ceil(corr(bs)), d - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=DT) - low) / (high - low)).clamp(0, 1)
        inv = inv / s * ramp + inv * (1 - ramp)
        mscale, mad = rp.get("mscale"), rp.get("mscale_all_dim")
        amp = yarn_m(s, mscale) / yarn_m(s, mad) if (mscale and mad) else yarn_m(s, 1.0)
        if mad:
            scale *= yarn_m(s, mad) ** 2
    if "no_yarn_freq" in MUT:
        inv = theta ** (-torch.arange(0, d, 2, dtype=DT) / d)
    if "no_yarn_amp" in MUT:
        amp = 1.0
    if "no_mscale_sq" in MUT:
        scale = (cfg["qk_nope_head_dim"] + d) ** -0.5
    ang = torch.arange(positions, dtype=DT)[:, None] * inv[None, :]
    return torch.cos(ang) * amp, torch.sin(ang) * amp, scale


def rope(x, cos, sin):
    # x [..., T, d]; interleaved pairs (x[2i], x[2i+1]) rotated by angle p * inv_freq[i]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    if "neox_rope" in MUT:
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def mlp(x, w, p):
    g = x @ w[p + "gate_proj.weight"].T
    u = x @ w[p + "up_proj.weight"].T
    return (torch.nn.functional.silu(g) * u) @ w[p + "down_proj.weight"].T


def route(x, w, p, cfg):
    """returns (idx [T, K], weights [T, K])"""
    E, K = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    G, TG = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    logits = x @ w[p + "gate.weight"].T
    if cfg["model_type"] == "deepseek_v2":
        s = logits.softmax(-1)
        choice = s
        if cfg.get("topk_method") == "group_limited_greedy":
            gs = s.view(-1, G, E // G).max(-1).values
            if "group_sum" in MUT:
                gs = s.view(-1, G, E // G).sum(-1)
            keep = torch.zeros_like(gs).scatter_(1, gs.topk(TG, -1).indices, 1.0).repeat_interleave(E // G, 1)
            choice = s.masked_fill(keep == 0, 0.0)
        idx = choice.topk(K, -1).indices
        wts = s.gather(1, idx)
        # transformers' DeepseekV2 router always multiplies by routed_scaling_factor and ignores
        # norm_topk_prob (the remote-code model normalises instead when norm_topk_prob is true).
        if "flip_norm" in MUT:
            wts = wts / wts.sum(-1, keepdim=True)
        return idx, wts * (1.0 if "no_rsf" in MUT else cfg["routed_scaling_factor"])
    s = logits.sigmoid()
    sc = s + (0.0 if "no_bias" in MUT else w[p + "gate.e_score_correction_bias"])
    gs = sc.view(-1, G, E // G).topk(2, -1).values.sum(-1)
    if "group_max" in MUT:
        gs = sc.view(-1, G, E // G).max(-1).values
    keep = torch.zeros_like(gs).scatter_(1, gs.topk(TG, -1).indices, 1.0).repeat_interleave(E // G, 1)
    idx = sc.masked_fill(keep == 0, 0.0 if "mask_zero" in MUT else float("-inf")).topk(K, -1).indices
    wts = (sc if "biased_weights" in MUT else s).gather(1, idx)
    if cfg.get("norm_topk_prob", True) != ("flip_norm" in MUT):
        wts = wts / (wts.sum(-1, keepdim=True) + 1e-20)
    return idx, wts * (1.0 if "no_rsf" in MUT else cfg["routed_scaling_factor"])


def forward(cfg: dict, w: dict, tokens: list[int]) -> torch.Tensor:
    T = len(tokens)
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    rkv = cfg["kv_lora_rank"]
    eps = 1e-6 if "eps_1e6" in MUT else cfg["rms_norm_eps"]
    leps = cfg["rms_norm_eps"] if "latent_norm_eps_cfg" in MUT else 1e-6
    cos, sin, scale = rope_tables(cfg, T)
    mask = torch.full((T, T), float("-inf"), dtype=DT).triu(1)
    h = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"], eps)
        if cfg.get("q_lora_rank"):
            qa = rms(x @ w[p + "self_attn.q_a_proj.weight"].T, w[p + "self_attn.q_a_layernorm.weight"], leps)
            q = qa @ w[p + "self_attn.q_b_proj.weight"].T
        else:
            q = x @ w[p + "self_attn.q_proj.weight"].T
        q = q.view(T, nh, dn + dr).transpose(0, 1)  # [nh, T, dqk]
        q_nope, q_pe = q[..., :dn], rope(q[..., dn:], cos, sin)
        a = x @ w[p + "self_attn.kv_a_proj_with_mqa.weight"].T
        c = rms(a[:, :rkv], w[p + "self_attn.kv_a_layernorm.weight"], leps)
        k_pe = rope(a[:, rkv:], cos, sin)  # [T, dr], shared by all heads
        kv = (c @ w[p + "self_attn.kv_b_proj.weight"].T).view(T, nh, dn + dv).transpose(0, 1)
        k_nope, v = kv[..., :dn], kv[..., dn:]
        scores = (q_nope @ k_nope.transpose(1, 2) + q_pe @ k_pe.T[None]) * scale + mask
        o = scores.softmax(-1) @ v  # [nh, T, dv]
        h = h + o.transpose(0, 1).reshape(T, nh * dv) @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"], eps)
        if i < cfg["first_k_dense_replace"]:
            y = mlp(x, w, p + "mlp.")
        else:
            idx, wts = route(x, w, p + "mlp.", cfg)
            y = mlp(x, w, p + "mlp.shared_experts.")
            for t in range(T):
                for j in range(idx.shape[1]):
                    e = int(idx[t, j])
                    y[t] += wts[t, j] * mlp(x[t : t + 1], w, f"{p}mlp.experts.{e}.")[0]
        h = h + y
    return rms(h, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


def check(folder: Path) -> float:
    cfg = json.loads((folder / "config.json").read_text())
    ref = json.loads((folder / "reference.json").read_text())
    w = load_weights(folder)
    worst = 0.0
    runs = [(ref["tokens"], ref["logits"])]
    if "long" in ref:
        runs.append((ref["long"]["tokens"], ref["long"]["logits"]))
    for tokens, logits in runs:
        got = forward(cfg, w, tokens)
        want = torch.tensor(logits, dtype=DT)
        worst = max(worst, float((got - want).abs().max()))
    return worst


def main() -> None:
    root = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    folders = [Path(a) for a in args] or sorted(p for p in root.iterdir() if (p / "reference.json").exists())
    bad = False
    for f in folders:
        d = check(f)
        ok = d < 1e-3
        bad |= not ok
        print(f"{f.name}: max |independent f64 - transformers f32| = {d:.2e} {'OK' if ok else 'MISMATCH'}")
    if "--mutations" in sys.argv:
        print("max logit error caused by each deliberate bug (\"-\" = below 1e-3, not caught):")
        print("mutation".ljust(22) + "".join(f.name[:16].rjust(18) for f in folders))
        for m in MUTATIONS:
            MUT.clear()
            MUT.add(m)
            cells = []
            for f in folders:
                d = check(f)
                cells.append((f"{d:.2e}" if d >= 1e-3 else "-").rjust(18))
            print(m.ljust(22) + "".join(cells))
        MUT.clear()
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
