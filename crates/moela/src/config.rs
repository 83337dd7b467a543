//! HF `config.json` -> [`ModelConfig`], validated.
//!
//! Both DeepSeek-V2 (`deepseek_v2`) and DeepSeek-V3 (`deepseek_v3`) configs are read, with the class
//! defaults of each type for missing keys (`docs/architecture.md` §1.2) and both spellings of the
//! rope settings (`rope_theta` + `rope_scaling`, or the newer `rope_parameters`).

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Which DeepSeek generation a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Arch {
    /// `deepseek_v2` / `DeepseekV2ForCausalLM` (V2, V2-Lite, Coder-V2).
    V2,
    /// `deepseek_v3` / `DeepseekV3ForCausalLM` (V3, R1, Moonlight).
    V3,
}

/// How the router turns gate logits into scores (`scoring_func`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ScoringFunc {
    /// `softmax` over all routed experts (V2).
    Softmax,
    /// element-wise `sigmoid` (V3).
    Sigmoid,
}

/// How the router picks experts (`topk_method`), `docs/architecture.md` §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TopkMethod {
    /// Plain top-k over the scores.
    Greedy,
    /// Keep the `topk_group` groups with the highest max score, then top-k.
    GroupLimitedGreedy,
    /// Bias-corrected scores, groups ranked by the sum of their top-2, then top-k (V3).
    NoauxTc,
}

impl TopkMethod {
    /// The name as config.json spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TopkMethod::Greedy => "greedy",
            TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
            TopkMethod::NoauxTc => "noaux_tc",
        }
    }
}

/// YaRN context extension (`rope_scaling.type == "yarn"`), `docs/architecture.md` §3.3.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Yarn {
    /// `factor`: the context extension ratio s.
    pub factor: f64,
    /// `original_max_position_embeddings`: L0.
    pub original_max_position_embeddings: f64,
    /// `beta_fast` (default 32).
    pub beta_fast: f64,
    /// `beta_slow` (default 1).
    pub beta_slow: f64,
    /// `mscale` (optional).
    pub mscale: Option<f64>,
    /// `mscale_all_dim` (optional; squares into the softmax scale).
    pub mscale_all_dim: Option<f64>,
    /// `attention_factor` (optional explicit cos/sin amplitude).
    pub attention_factor: Option<f64>,
}

/// A validated DeepSeek-V2/V3 model configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    /// V2 or V3.
    pub arch: Arch,
    /// Vocabulary rows of the embedding and head.
    pub vocab_size: usize,
    /// H: width of the residual stream.
    pub hidden_size: usize,
    /// Width of the dense MLP of the first `first_k_dense_replace` layers.
    pub intermediate_size: usize,
    /// Width of one routed (and one shared) expert.
    pub moe_intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// n_h: attention heads.
    pub num_attention_heads: usize,
    /// r_q: rank of the query compression, `None` for a plain `q_proj` (V2-Lite).
    pub q_lora_rank: Option<usize>,
    /// r_kv: rank of the compressed KV latent (what the cache stores).
    pub kv_lora_rank: usize,
    /// d_n: per-head query/key dims without rope.
    pub qk_nope_head_dim: usize,
    /// d_r: per-head rope dims (one shared rope key).
    pub qk_rope_head_dim: usize,
    /// d_v: per-head value dims.
    pub v_head_dim: usize,
    /// E: routed experts (0 for a dense model).
    pub n_routed_experts: usize,
    /// Shared experts, fused into one MLP of width `n_shared_experts * moe_intermediate_size`.
    pub n_shared_experts: usize,
    /// K: routed experts per token.
    pub num_experts_per_tok: usize,
    /// Multiplier of the routed output.
    pub routed_scaling_factor: f64,
    /// Expert selection method.
    pub topk_method: TopkMethod,
    /// Router score function.
    pub scoring_func: ScoringFunc,
    /// Expert groups for group-limited routing.
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// Renormalise the top-k weights to sum to 1.
    pub norm_topk_prob: bool,
    /// The first this many layers use the dense MLP.
    pub first_k_dense_replace: usize,
    /// Epsilon of the input / post-attention / final RMSNorms.
    pub rms_norm_eps: f64,
    /// Rope base.
    pub rope_theta: f64,
    /// YaRN settings when present.
    pub yarn: Option<Yarn>,
    /// Rope dims are stored as interleaved pairs (all released checkpoints).
    pub rope_interleave: bool,
    /// Longest context the checkpoint claims.
    pub max_position_embeddings: usize,
    /// Begin-of-sentence id from config.json (the tokenizer is the authority when they differ).
    pub bos_token_id: Option<u32>,
    /// End-of-sentence id from config.json.
    pub eos_token_id: Option<u32>,
    /// The head shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

/// Reads a config field with a default, naming the field in any type error.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    file: &'a str,
}

impl Fields<'_> {
    fn type_error(&self, field: &str, want: &str) -> Error {
        Error::ConfigParse {
            file: self.file.to_string(),
            message: format!("field {field} must be {want}, found {}", self.map[field]),
        }
    }

    fn present(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn usize_or(&self, field: &str, default: usize) -> Result<usize> {
        match self.present(field) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.type_error(field, "a non-negative integer")),
        }
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.present(field) {
            None => Ok(None),
            Some(_) => self.usize_or(field, 0).map(Some),
        }
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.present(field) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.type_error(field, "a number")),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.present(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.type_error(field, "true or false")),
        }
    }

    fn str_or<'b>(&'b self, field: &str, default: &'b str) -> Result<&'b str> {
        match self.present(field) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.type_error(field, "a string")),
        }
    }

    /// A token id field that may be an integer or a list (first entry used).
    fn token_id(&self, field: &str, default: Option<u32>) -> Result<Option<u32>> {
        match self.present(field) {
            None => Ok(default),
            Some(Value::Array(a)) => Ok(a.first().and_then(|v| v.as_u64()).map(|x| x as u32)),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as u32))
                .ok_or_else(|| self.type_error(field, "an integer")),
        }
    }
}

fn unsupported(field: &str, value: impl std::fmt::Display, hint: &str) -> Error {
    Error::Unsupported {
        field: field.to_string(),
        value: value.to_string(),
        hint: hint.to_string(),
    }
}

fn invalid(field: &str, message: impl Into<String>) -> Error {
    Error::InvalidConfig {
        field: field.to_string(),
        message: message.into(),
    }
}

impl ModelConfig {
    /// Parses config.json bytes (`file` names the source in errors).
    pub fn from_json_bytes(bytes: &[u8], file: &str) -> Result<Self> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::ConfigParse {
            file: file.to_string(),
            message: format!("not valid JSON: {e}"),
        })?;
        let map = value.as_object().ok_or_else(|| Error::ConfigParse {
            file: file.to_string(),
            message: "top level must be a JSON object".into(),
        })?;
        Self::from_map(map, file)
    }

    fn from_map(map: &Map<String, Value>, file: &str) -> Result<Self> {
        let f = Fields { map, file };
        let model_type = f.str_or("model_type", "")?;
        let arch_name = map
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .unwrap_or("");
        let arch = match (model_type, arch_name) {
            ("deepseek_v2", _) | ("", "DeepseekV2ForCausalLM") => Arch::V2,
            ("deepseek_v3", _) | ("kimi_k2", _) | ("", "DeepseekV3ForCausalLM") => Arch::V3,
            ("", "") => {
                return Err(invalid(
                    "model_type",
                    "missing (and no architectures entry): expected deepseek_v2 or deepseek_v3",
                ));
            }
            (t, a) => {
                return Err(unsupported(
                    "model_type",
                    format!("{t:?} (architectures {a:?})"),
                    "moela runs deepseek_v2 (DeepseekV2ForCausalLM) and deepseek_v3 (DeepseekV3ForCausalLM)",
                ));
            }
        };
        let v3 = arch == Arch::V3;

        // Class defaults differ per type (docs/architecture.md §1.2).
        let hidden_size = f.usize_or("hidden_size", if v3 { 7168 } else { 4096 })?;
        let num_attention_heads = f.usize_or("num_attention_heads", if v3 { 128 } else { 32 })?;
        let q_lora_rank = if map.contains_key("q_lora_rank") {
            f.opt_usize("q_lora_rank")?
        } else {
            Some(1536)
        };
        let n_routed = if map.contains_key("n_routed_experts") {
            f.opt_usize("n_routed_experts")?.unwrap_or(0)
        } else if v3 {
            256
        } else {
            64
        };

        let scoring = f.str_or("scoring_func", if v3 { "sigmoid" } else { "softmax" })?;
        let scoring_func = match scoring {
            "softmax" => ScoringFunc::Softmax,
            "sigmoid" => ScoringFunc::Sigmoid,
            other => return Err(unsupported("scoring_func", other, "expected softmax or sigmoid")),
        };
        let method = f.str_or("topk_method", if v3 { "noaux_tc" } else { "greedy" })?;
        let topk_method = match method {
            "greedy" => TopkMethod::Greedy,
            "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
            "noaux_tc" => TopkMethod::NoauxTc,
            other => {
                return Err(unsupported(
                    "topk_method",
                    other,
                    "expected greedy, group_limited_greedy or noaux_tc",
                ));
            }
        };

        let moe_layer_freq = f.usize_or("moe_layer_freq", 1)?;
        if moe_layer_freq != 1 {
            return Err(unsupported(
                "moe_layer_freq",
                moe_layer_freq,
                "only 1 (every layer after first_k_dense_replace is MoE) is supported",
            ));
        }
        let act = f.str_or("hidden_act", "silu")?;
        if act != "silu" {
            return Err(unsupported("hidden_act", act, "only silu is supported"));
        }
        if f.bool_or("attention_bias", false)? {
            return Err(unsupported("attention_bias", true, "DeepSeek attention has no biases"));
        }
        if map.get("quantization_config").is_some_and(|q| !q.is_null()) {
            return Err(unsupported(
                "quantization_config",
                map["quantization_config"].to_string(),
                "FP8 checkpoints are not supported yet; use a bf16 checkpoint",
            ));
        }

        let (rope_theta, yarn) = parse_rope(&f)?;

        let cfg = ModelConfig {
            arch,
            vocab_size: f.usize_or("vocab_size", if v3 { 129280 } else { 102400 })?,
            hidden_size,
            intermediate_size: f.usize_or("intermediate_size", if v3 { 18432 } else { 11008 })?,
            moe_intermediate_size: f.usize_or("moe_intermediate_size", if v3 { 2048 } else { 1407 })?,
            num_hidden_layers: f.usize_or("num_hidden_layers", if v3 { 61 } else { 30 })?,
            num_attention_heads,
            q_lora_rank,
            kv_lora_rank: f.usize_or("kv_lora_rank", 512)?,
            qk_nope_head_dim: f.usize_or("qk_nope_head_dim", 128)?,
            qk_rope_head_dim: f.usize_or("qk_rope_head_dim", 64)?,
            v_head_dim: f.usize_or("v_head_dim", 128)?,
            n_routed_experts: n_routed,
            n_shared_experts: f
                .opt_usize("n_shared_experts")?
                .unwrap_or(if map.contains_key("n_shared_experts") {
                    0
                } else if v3 {
                    1
                } else {
                    2
                }),
            num_experts_per_tok: f.opt_usize("num_experts_per_tok")?.unwrap_or(if v3 { 8 } else { 6 }),
            routed_scaling_factor: f.f64_or("routed_scaling_factor", if v3 { 2.5 } else { 1.0 })?,
            topk_method,
            scoring_func,
            n_group: f.opt_usize("n_group")?.unwrap_or(if v3 { 8 } else { 1 }),
            topk_group: f.opt_usize("topk_group")?.unwrap_or(if v3 { 4 } else { 1 }),
            norm_topk_prob: f.bool_or("norm_topk_prob", v3)?,
            first_k_dense_replace: f.usize_or("first_k_dense_replace", if v3 { 3 } else { 0 })?,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            yarn,
            rope_interleave: f.bool_or("rope_interleave", true)?,
            max_position_embeddings: f.usize_or("max_position_embeddings", if v3 { 4096 } else { 2048 })?,
            bos_token_id: f.token_id("bos_token_id", Some(if v3 { 0 } else { 100000 }))?,
            eos_token_id: f.token_id("eos_token_id", Some(if v3 { 1 } else { 100001 }))?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations between fields that the model code relies on.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(invalid(name, "must be greater than 0"));
            }
        }
        // Upper bounds, far above every DeepSeek model (V3's value in the comment), so that no size computed
        // from a damaged config.json can overflow, hang a loop or ask for an allocation the machine cannot make
        // before the weight files are checked against it.
        let limits = [
            ("vocab_size", self.vocab_size, 1 << 22),                           // 129280
            ("hidden_size", self.hidden_size, 1 << 16),                         // 7168
            ("intermediate_size", self.intermediate_size, 1 << 18),             // 18432
            ("moe_intermediate_size", self.moe_intermediate_size, 1 << 18),     // 2048
            ("num_hidden_layers", self.num_hidden_layers, 1 << 10),             // 61
            ("num_attention_heads", self.num_attention_heads, 1 << 12),         // 128
            ("n_routed_experts", self.n_routed_experts, 1 << 12),               // 256
            ("n_shared_experts", self.n_shared_experts, 1 << 8),                // 1
            ("num_experts_per_tok", self.num_experts_per_tok, 1 << 12),         // 8
            ("n_group", self.n_group, 1 << 12),                                 // 8
            ("topk_group", self.topk_group, 1 << 12),                           // 4
            ("kv_lora_rank", self.kv_lora_rank, 1 << 14),                       // 512
            ("q_lora_rank", self.q_lora_rank.unwrap_or(0), 1 << 16),            // 1536
            ("qk_nope_head_dim", self.qk_nope_head_dim, 1 << 12),               // 128
            ("qk_rope_head_dim", self.qk_rope_head_dim, 1 << 12),               // 64
            ("v_head_dim", self.v_head_dim, 1 << 12),                           // 128
            ("first_k_dense_replace", self.first_k_dense_replace, 1 << 10),     // 3
            ("max_position_embeddings", self.max_position_embeddings, 1 << 24), // 163840
        ];
        for (name, v, max) in limits {
            if v > max {
                return Err(invalid(name, format!("{v} is larger than moela's limit of {max}")));
            }
        }
        if self.q_lora_rank == Some(0) {
            return Err(invalid("q_lora_rank", "must be null or greater than 0"));
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(invalid(
                "qk_rope_head_dim",
                format!("{} must be even (rope rotates pairs)", self.qk_rope_head_dim),
            ));
        }
        if self.first_k_dense_replace < self.num_hidden_layers
            && self.intermediate_size == 0
            && self.first_k_dense_replace > 0
        {
            return Err(invalid(
                "intermediate_size",
                "must be greater than 0 for the dense layers",
            ));
        }
        if self.has_moe() {
            if self.moe_intermediate_size == 0 {
                return Err(invalid("moe_intermediate_size", "must be greater than 0"));
            }
            let e = self.n_routed_experts;
            let k = self.num_experts_per_tok;
            if k == 0 || k > e {
                return Err(invalid(
                    "num_experts_per_tok",
                    format!("{k} must be between 1 and n_routed_experts ({e})"),
                ));
            }
            if self.topk_method != TopkMethod::Greedy {
                if self.n_group == 0 || !e.is_multiple_of(self.n_group) {
                    return Err(invalid(
                        "n_group",
                        format!("{} must divide n_routed_experts ({e})", self.n_group),
                    ));
                }
                if self.topk_group == 0 || self.topk_group > self.n_group {
                    return Err(invalid(
                        "topk_group",
                        format!("{} must be between 1 and n_group ({})", self.topk_group, self.n_group),
                    ));
                }
                let per_group = e / self.n_group;
                if self.topk_method == TopkMethod::NoauxTc && per_group < 2 {
                    return Err(invalid(
                        "n_group",
                        "noaux_tc ranks groups by their top-2 scores: each group needs at least 2 experts",
                    ));
                }
                if self.topk_group * per_group < k {
                    return Err(invalid(
                        "topk_group",
                        format!(
                            "the {} kept groups hold fewer than num_experts_per_tok ({k}) experts",
                            self.topk_group
                        ),
                    ));
                }
            }
        }
        if let Some(y) = &self.yarn
            && (y.factor <= 0.0 || y.original_max_position_embeddings <= 0.0)
        {
            return Err(invalid(
                "rope_scaling",
                "yarn needs factor > 0 and original_max_position_embeddings > 0",
            ));
        }
        Ok(())
    }

    /// Whether any layer is a mixture-of-experts layer.
    pub fn has_moe(&self) -> bool {
        self.n_routed_experts > 0 && self.first_k_dense_replace < self.num_hidden_layers
    }

    /// Whether layer `i` uses DeepSeekMoE (else the dense MLP).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts > 0 && i >= self.first_k_dense_replace
    }

    /// d_qk = d_n + d_r.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values the latent cache stores per token per layer: r_kv + d_r.
    pub fn latent_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// The attention softmax scale: d_qk^-1/2, times mscale(s, mscale_all_dim)^2 under YaRN (§3.3).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.yarn {
            Some(y) => match y.mscale_all_dim {
                Some(m) if m != 0.0 => {
                    let ms = yarn_mscale(y.factor, m);
                    base * ms * ms
                }
                _ => base,
            },
            None => base,
        }
    }

    /// Rope inverse frequencies (length d_r/2), with YaRN applied, and the cos/sin amplitude.
    pub fn rope_frequencies(&self) -> (Vec<f64>, f64) {
        let d = self.qk_rope_head_dim;
        let half = d / 2;
        let base = self.rope_theta;
        let inv: Vec<f64> = (0..half).map(|i| base.powf(-((2 * i) as f64) / d as f64)).collect();
        let Some(y) = &self.yarn else {
            return (inv, 1.0);
        };
        // Correction dims as in HF's `find_correction_range` (truncated, clamped to [0, d-1]).
        let corr = |rot: f64| {
            d as f64 * (y.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let low = corr(y.beta_fast).floor().max(0.0);
        let mut high = corr(y.beta_slow).ceil().min(d as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        let freqs = inv
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                f / y.factor * ramp + f * (1.0 - ramp)
            })
            .collect();
        let amplitude = match (y.attention_factor, y.mscale, y.mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => yarn_mscale(y.factor, m) / yarn_mscale(y.factor, ma),
            _ => yarn_mscale(y.factor, 1.0),
        };
        (freqs, amplitude)
    }
}

/// m(s, k) = 0.1 k ln(s) + 1 for s > 1, else 1 (§3.3).
fn yarn_mscale(scale: f64, k: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * k * scale.ln() + 1.0 }
}

/// Reads the rope base and YaRN settings from either spelling.
fn parse_rope(f: &Fields) -> Result<(f64, Option<Yarn>)> {
    let (params, field, theta) = if let Some(p) = f.present("rope_parameters") {
        let obj = p
            .as_object()
            .ok_or_else(|| f.type_error("rope_parameters", "an object"))?;
        let theta = obj
            .get("rope_theta")
            .and_then(|v| v.as_f64())
            .or(f.present("rope_theta").and_then(|v| v.as_f64()))
            .unwrap_or(10000.0);
        (Some(obj), "rope_parameters", theta)
    } else {
        let theta = f.f64_or("rope_theta", 10000.0)?;
        let p = match f.present("rope_scaling") {
            Some(p) => Some(
                p.as_object()
                    .ok_or_else(|| f.type_error("rope_scaling", "an object or null"))?,
            ),
            None => None,
        };
        (p, "rope_scaling", theta)
    };
    if theta <= 0.0 {
        return Err(invalid("rope_theta", "must be greater than 0"));
    }
    let Some(p) = params else { return Ok((theta, None)) };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match kind {
        "default" | "none" => Ok((theta, None)),
        "yarn" => {
            let num = |k: &str| p.get(k).and_then(|v| v.as_f64());
            let yarn = Yarn {
                factor: num("factor").ok_or_else(|| invalid(field, "yarn needs a numeric factor"))?,
                original_max_position_embeddings: num("original_max_position_embeddings")
                    .or(f.present("max_position_embeddings").and_then(|v| v.as_f64()))
                    .unwrap_or(4096.0),
                beta_fast: num("beta_fast").unwrap_or(32.0),
                beta_slow: num("beta_slow").unwrap_or(1.0),
                mscale: num("mscale"),
                mscale_all_dim: num("mscale_all_dim"),
                attention_factor: num("attention_factor"),
            };
            Ok((theta, Some(yarn)))
        }
        other => Err(unsupported(
            &format!("{field}.type"),
            other,
            "supported rope scalings: none, default, yarn",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_bytes(json.as_bytes(), "config.json")
    }

    const V2_LITE: &str = r#"{
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
        "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6, "routed_scaling_factor": 1.0,
        "kv_lora_rank": 512, "q_lora_rank": null, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": false, "scoring_func": "softmax",
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "hidden_act": "silu", "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "bos_token_id": 100000, "eos_token_id": 100001,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "attention_bias": false, "tie_word_embeddings": false, "torch_dtype": "bfloat16"
    }"#;

    #[test]
    fn v2_lite_scale_matches_reference() {
        let c = parse(V2_LITE).unwrap();
        assert_eq!(c.arch, Arch::V2);
        assert_eq!(c.q_lora_rank, None);
        assert_eq!(c.latent_width(), 576);
        // docs/architecture.md §3.3: V2-Lite 0.114721.
        assert!((c.softmax_scale() - 0.114721).abs() < 1e-5, "{}", c.softmax_scale());
        let (freqs, amp) = c.rope_frequencies();
        assert_eq!(freqs.len(), 32);
        assert!((amp - 1.0).abs() < 1e-12);
        assert!(freqs[0] == 1.0 && freqs[31] < 1e-3);
    }

    #[test]
    fn v3_defaults_and_rope_parameters_spelling() {
        let c = parse(
            r#"{"model_type":"deepseek_v3","rope_parameters":{"rope_type":"yarn","rope_theta":10000,"factor":40,
               "original_max_position_embeddings":4096,"beta_fast":32,"beta_slow":1,"mscale":1.0,"mscale_all_dim":1.0}}"#,
        )
        .unwrap();
        assert_eq!(c.arch, Arch::V3);
        assert_eq!(c.n_routed_experts, 256);
        assert_eq!(c.topk_method, TopkMethod::NoauxTc);
        assert_eq!(c.q_lora_rank, Some(1536));
        assert!((c.softmax_scale() - 0.135234).abs() < 1e-5, "{}", c.softmax_scale());
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(r#"{"model_type":"llama"}"#).unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains("llama"), "{e}");
        let e = parse(&V2_LITE.replace("\"moe_layer_freq\": 1", "\"moe_layer_freq\": 2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("moe_layer_freq = 2"), "{e}");
        let e = parse(&V2_LITE.replace("\"greedy\"", "\"random\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("topk_method") && e.contains("random"), "{e}");
        let e = parse(&V2_LITE.replace("\"softmax\"", "\"tanh\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("scoring_func"), "{e}");
        let e = parse(&V2_LITE.replace("\"yarn\"", "\"linear\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_scaling.type") && e.contains("linear"), "{e}");
        let e = parse(&V2_LITE.replace("\"hidden_size\": 2048", "\"hidden_size\": \"big\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let e = parse(&V2_LITE.replace("\"num_experts_per_tok\": 6", "\"num_experts_per_tok\": 65"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_experts_per_tok"), "{e}");
        let e = parse("{not json").unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
        // Absurd sizes are refused before anything is sized from them.
        for (field, value) in [
            (
                "\"num_hidden_layers\": 27",
                "\"num_hidden_layers\": 9223372036854775807",
            ),
            ("\"n_routed_experts\": 64", "\"n_routed_experts\": 2147483648"),
            ("\"vocab_size\": 102400", "\"vocab_size\": 4294967296"),
        ] {
            let e = parse(&V2_LITE.replace(field, value)).unwrap_err().to_string();
            let name = field.split('"').nth(1).unwrap();
            assert!(e.contains(name) && e.contains("limit"), "{e}");
        }
    }
}
