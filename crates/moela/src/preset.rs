//! Random-weight models in the shapes of real checkpoints, built in memory from a seed, so anyone can
//! benchmark a real shape without downloading anything.

use std::sync::Arc;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::config::ModelConfig;
use crate::engine::CheckpointFiles;
use crate::error::{Error, Result};
use crate::load::WeightFile;
use crate::model::transformer::all_names;

/// Names accepted by [`preset_files`], with a line each.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "v2-lite-mini",
        "DeepSeek-V2-Lite scaled down: 8 layers, hidden 1024, 16 heads, kv_lora 256, 32 experts top-4, 2 shared, vocab 32000",
    ),
    (
        "v3-mini",
        "DeepSeek-V3 scaled down: 4 layers, hidden 512, q_lora 192, 16 experts in 4 groups, sigmoid noaux_tc, YaRN",
    ),
];

fn preset_config(name: &str) -> Result<String> {
    let json = match name {
        "v2-lite-mini" => serde_json::json!({
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 512,
            "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
            "n_shared_experts": 2, "n_routed_experts": 32, "num_experts_per_tok": 4, "routed_scaling_factor": 1.0,
            "kv_lora_rank": 256, "q_lora_rank": null, "qk_rope_head_dim": 32, "v_head_dim": 64, "qk_nope_head_dim": 64,
            "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": false, "scoring_func": "softmax",
            "first_k_dense_replace": 1, "moe_layer_freq": 1, "hidden_act": "silu", "max_position_embeddings": 16384,
            "rms_norm_eps": 1e-6, "rope_theta": 10000, "bos_token_id": 0, "eos_token_id": 1,
            "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "beta_fast": 32,
                              "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
            "tie_word_embeddings": false, "torch_dtype": "bfloat16"
        }),
        "v3-mini" => serde_json::json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": 16000, "hidden_size": 512, "intermediate_size": 1408, "moe_intermediate_size": 256,
            "num_hidden_layers": 4, "num_attention_heads": 8, "n_shared_experts": 1, "n_routed_experts": 16,
            "num_experts_per_tok": 4, "routed_scaling_factor": 2.5, "kv_lora_rank": 128, "q_lora_rank": 192,
            "qk_rope_head_dim": 32, "v_head_dim": 64, "qk_nope_head_dim": 64, "topk_method": "noaux_tc",
            "n_group": 4, "topk_group": 2, "norm_topk_prob": true, "scoring_func": "sigmoid",
            "first_k_dense_replace": 1, "moe_layer_freq": 1, "max_position_embeddings": 16384, "rms_norm_eps": 1e-6,
            "rope_theta": 10000, "bos_token_id": 0, "eos_token_id": 1,
            "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "beta_fast": 32,
                              "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
            "tie_word_embeddings": false, "torch_dtype": "bfloat16"
        }),
        other => {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
            return Err(Error::InvalidArgument(format!(
                "unknown preset {other:?}: expected one of {}",
                names.join(", ")
            )));
        }
    };
    Ok(json.to_string())
}

/// Builds a preset checkpoint (config.json + one bf16 safetensors file, no tokenizer) from `seed`.
///
/// Weights are uniform with standard deviation 0.02; norms are 1; the router correction bias is small noise.
pub fn preset_files(name: &str, seed: u64) -> Result<CheckpointFiles> {
    random_files(preset_config(name)?, seed, 0.02)
}

/// A random checkpoint for any supported `config.json` text: projections and embeddings uniform with
/// standard deviation `std`, norms 1, router correction bias small noise (the start of training, or a
/// benchmark shape). One bf16 safetensors file, no tokenizer.
pub fn random_files(config_json: String, seed: u64, std: f32) -> Result<CheckpointFiles> {
    let config = ModelConfig::from_json_bytes(config_json.as_bytes(), "config.json")?;
    let name = "random";
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let amp = std * 3f32.sqrt();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = Vec::new();
    for name in all_names(&config) {
        let shape = expected_shape(&config, &name);
        let n: usize = shape.iter().product();
        let (bytes, dtype) = if name.ends_with("e_score_correction_bias") {
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.01f32..0.01)).collect();
            (bytemuck::cast_slice(&v).to_vec(), Dtype::F32)
        } else if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
            (bytemuck::cast_slice(&vec![bf16::ONE; n]).to_vec(), Dtype::BF16)
        } else {
            let v: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.random_range(-amp..amp))).collect();
            (bytemuck::cast_slice(&v).to_vec(), Dtype::BF16)
        };
        tensors.push((name, shape, bytes, dtype));
    }
    let views = tensors
        .iter()
        .map(|(n, s, b, d)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::InvalidArgument(format!("preset tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::InvalidArgument(format!("building preset {name}: {e}")))?;
    Ok(CheckpointFiles {
        config: config_json.into_bytes(),
        tokenizer: None,
        tokenizer_config: None,
        weights: vec![WeightFile {
            name: format!("{name}.safetensors"),
            bytes: Arc::new(bytes),
        }],
    })
}

/// The HF shape of a tensor named by [`all_names`].
fn expected_shape(c: &ModelConfig, name: &str) -> Vec<usize> {
    let (h, v) = (c.hidden_size, c.vocab_size);
    let n_h = c.num_attention_heads;
    let d_qk = c.qk_head_dim();
    let r_kv = c.kv_lora_rank;
    let last = |s: &str| name.ends_with(s);
    let moe_i = c.moe_intermediate_size;
    let i = if name.contains("shared_experts") {
        c.n_shared_experts * moe_i
    } else if name.contains("experts.") {
        moe_i
    } else {
        c.intermediate_size
    };
    if last("embed_tokens.weight") || last("lm_head.weight") {
        vec![v, h]
    } else if last("q_a_layernorm.weight") {
        vec![c.q_lora_rank.unwrap_or(0)]
    } else if last("kv_a_layernorm.weight") {
        vec![r_kv]
    } else if last("norm.weight") || last("layernorm.weight") {
        vec![h]
    } else if last("q_proj.weight") {
        vec![n_h * d_qk, h]
    } else if last("q_a_proj.weight") {
        vec![c.q_lora_rank.unwrap_or(0), h]
    } else if last("q_b_proj.weight") {
        vec![n_h * d_qk, c.q_lora_rank.unwrap_or(0)]
    } else if last("kv_a_proj_with_mqa.weight") {
        vec![r_kv + c.qk_rope_head_dim, h]
    } else if last("kv_b_proj.weight") {
        vec![n_h * (c.qk_nope_head_dim + c.v_head_dim), r_kv]
    } else if last("o_proj.weight") {
        vec![h, n_h * c.v_head_dim]
    } else if last("mlp.gate.weight") {
        vec![c.n_routed_experts, h]
    } else if last("e_score_correction_bias") {
        vec![c.n_routed_experts]
    } else if last("down_proj.weight") {
        vec![h, i]
    } else {
        // gate_proj / up_proj
        vec![i, h]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let e = preset_files("nope", 0).err().unwrap().to_string();
        assert!(e.contains("v2-lite-mini"), "{e}");
    }
}
