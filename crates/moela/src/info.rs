//! Facts about a model computed from its config: parameter counts and what the latent cache saves.

use serde::Serialize;

use crate::config::{Arch, ModelConfig, TopkMethod};
use crate::gpu::WeightDtype;

/// Cache sizes per token, MLA against an uncompressed multi-head cache (`docs/architecture.md` §3.4).
#[derive(Debug, Clone, Serialize)]
pub struct CacheInfo {
    /// layers x (kv_lora_rank + qk_rope_head_dim).
    pub values_per_token: u64,
    /// `values_per_token` x bytes per cached value (moela caches f32).
    pub bytes_per_token: u64,
    /// Bytes per cached value.
    pub dtype_bytes: u64,
    /// layers x heads x (qk_head_dim + v_head_dim): what an expanded K/V cache would hold.
    pub mha_equivalent_values_per_token: u64,
    /// `mha_equivalent_values_per_token / values_per_token`.
    pub compression: f64,
}

/// Facts about a model, as `moela info` prints them.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// `deepseek_v2` or `deepseek_v3`.
    pub architecture: String,
    /// All parameters.
    pub total_parameters: u64,
    /// Parameters used for one token: routed experts count only the K selected, and the embedding table
    /// not at all (one row of it is read), as DeepSeek counts activated parameters.
    pub active_parameters_per_token: u64,
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Attention heads.
    pub heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Dense (non-MoE) layers.
    pub dense_layers: usize,
    /// Routed experts per MoE layer.
    pub routed_experts: usize,
    /// Experts chosen per token.
    pub experts_per_token: usize,
    /// Shared experts per MoE layer.
    pub shared_experts: usize,
    /// Router method.
    pub topk_method: String,
    /// q_lora_rank (null when the query is a plain projection).
    pub q_lora_rank: Option<usize>,
    /// kv_lora_rank.
    pub kv_lora_rank: usize,
    /// Rope scaling in use.
    pub rope_scaling: String,
    /// Longest context the checkpoint claims.
    pub max_position_embeddings: usize,
    /// Weight dtype on the GPU.
    pub weight_dtype: String,
    /// Bytes of weights on the GPU (embedding kept on the host is excluded).
    pub gpu_weight_bytes: u64,
    /// Bytes of the embedding table, kept on the host in the weight format.
    pub host_weight_bytes: u64,
    /// Bytes of weights one decoded token reads (the active parameters in their stored formats).
    pub active_weight_bytes_per_token: u64,
    /// The cache.
    pub cache: CacheInfo,
    /// How the checkpoint's files store the weights, the most bytes first (`BF16`, or a GGUF's mix such as
    /// `Q4_K`, `Q6_K`, `F32`); empty when not known (facts from a config alone).
    pub stored_types: Vec<StoredType>,
}

/// Tensors of one stored type in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredType {
    /// The type as llama.cpp names it (`BF16`, `Q8_0`, `Q4_K`).
    #[serde(rename = "type")]
    pub name: String,
    /// Tensors of this type.
    pub tensors: usize,
    /// Their bytes in the files.
    pub bytes: u64,
}

impl ModelInfo {
    /// Computes the facts for a config and weight dtype.
    pub fn new(c: &ModelConfig, dtype: WeightDtype) -> Self {
        let (h, v) = (c.hidden_size as u64, c.vocab_size as u64);
        let (n_h, d_n, d_r, d_v) = (
            c.num_attention_heads as u64,
            c.qk_nope_head_dim as u64,
            c.qk_rope_head_dim as u64,
            c.v_head_dim as u64,
        );
        let r_kv = c.kv_lora_rank as u64;
        let attn = match c.q_lora_rank {
            Some(r_q) => h * r_q as u64 + r_q as u64 + r_q as u64 * n_h * (d_n + d_r),
            None => h * n_h * (d_n + d_r),
        } + h * (r_kv + d_r)
            + r_kv
            + r_kv * n_h * (d_n + d_v)
            + n_h * d_v * h
            + 2 * h;
        let i_moe = c.moe_intermediate_size as u64;
        let expert = 3 * h * i_moe;
        let e = c.n_routed_experts as u64;
        let k = c.num_experts_per_tok as u64;
        let mut total = v * h + h + if c.tie_word_embeddings { 0 } else { v * h };
        let mut inactive = 0;
        let mut dense_layers = 0;
        // What stays f32 whatever the weight format: norms, the absorbed kv_b factors, routers.
        let norms = 2 * h + r_kv + c.q_lora_rank.unwrap_or(0) as u64;
        let mut kept_f32 = h;
        for l in 0..c.num_hidden_layers {
            total += attn;
            kept_f32 += norms + r_kv * n_h * (d_n + d_v);
            if c.is_moe_layer(l) {
                let bias = if c.topk_method == TopkMethod::NoauxTc { e } else { 0 };
                kept_f32 += e * h + bias;
                total += e * h + bias + e * expert + c.n_shared_experts as u64 * expert;
                inactive += (e - k) * expert;
            } else {
                dense_layers += 1;
                total += 3 * h * c.intermediate_size as u64;
            }
        }
        let layers = c.num_hidden_layers as u64;
        let values = layers * (r_kv + d_r);
        let active = total - inactive - v * h;
        // The embedding table stays on the host; a tied head is a second, GPU copy of it.
        let on_gpu = total - v * h + if c.tie_word_embeddings { v * h } else { 0 };
        let bytes = |params: u64| kept_f32 * 4 + ((params - kept_f32) as f64 * dtype.bits() / 8.0).round() as u64;
        let mha = layers * n_h * (d_n + d_r + d_v);
        ModelInfo {
            architecture: match c.arch {
                Arch::V2 => "deepseek_v2".into(),
                Arch::V3 => "deepseek_v3".into(),
            },
            total_parameters: total,
            active_parameters_per_token: active,
            layers: c.num_hidden_layers,
            hidden_size: c.hidden_size,
            heads: c.num_attention_heads,
            vocab_size: c.vocab_size,
            dense_layers,
            routed_experts: c.n_routed_experts,
            experts_per_token: if c.has_moe() { c.num_experts_per_tok } else { 0 },
            shared_experts: c.n_shared_experts,
            topk_method: c.topk_method.as_str().into(),
            q_lora_rank: c.q_lora_rank,
            kv_lora_rank: c.kv_lora_rank,
            rope_scaling: match &c.yarn {
                Some(y) => format!("yarn (factor {})", y.factor),
                None => "none".into(),
            },
            max_position_embeddings: c.max_position_embeddings,
            weight_dtype: dtype.name().into(),
            gpu_weight_bytes: bytes(on_gpu),
            host_weight_bytes: (v as f64 * h as f64 * dtype.bits() / 8.0).round() as u64,
            active_weight_bytes_per_token: bytes(active),
            cache: CacheInfo {
                values_per_token: values,
                bytes_per_token: values * 4,
                dtype_bytes: 4,
                mha_equivalent_values_per_token: mha,
                compression: mha as f64 / values as f64,
            },
            stored_types: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_lite_counts_match_the_published_sizes() {
        let json = r#"{"model_type":"deepseek_v2","vocab_size":102400,"hidden_size":2048,"intermediate_size":10944,
            "moe_intermediate_size":1408,"num_hidden_layers":27,"num_attention_heads":16,"n_shared_experts":2,
            "n_routed_experts":64,"num_experts_per_tok":6,"kv_lora_rank":512,"q_lora_rank":null,"qk_rope_head_dim":64,
            "v_head_dim":128,"qk_nope_head_dim":128,"topk_method":"greedy","first_k_dense_replace":1}"#;
        let c = ModelConfig::from_json_bytes(json.as_bytes(), "config.json").unwrap();
        let i = ModelInfo::new(&c, WeightDtype::F32);
        // 15.7B total, 2.4B active (docs/architecture.md §6).
        assert!(
            (i.total_parameters as f64 / 1e9 - 15.7).abs() < 0.1,
            "{}",
            i.total_parameters
        );
        assert!(
            (i.active_parameters_per_token as f64 / 1e9 - 2.4).abs() < 0.25,
            "{}",
            i.active_parameters_per_token
        );
        assert_eq!(i.cache.values_per_token, 27 * 576);
        // q8 keeps norms, routers and the absorbed kv_b in f32 and stores the rest in 8.5 bits.
        let q8 = ModelInfo::new(&c, WeightDtype::Q8);
        let ratio = q8.active_weight_bytes_per_token as f64 / i.active_weight_bytes_per_token as f64;
        assert!((0.265..0.3).contains(&ratio), "{ratio}");
        assert_eq!(i.cache.mha_equivalent_values_per_token, 27 * 16 * 320);
    }
}
