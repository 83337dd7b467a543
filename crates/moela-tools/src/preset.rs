//! Random-weight models in the shapes of real checkpoints, made from a seed, so anyone can benchmark a real
//! shape, up to a whole DeepSeek-V2-Lite, without downloading anything. A preset's tensors are generated as the
//! loader reads them (`load/synthetic.rs`): no file and no whole copy of the weights exists.

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use moela::ModelConfig;
use moela::load::synthetic::{Fill, Synthetic, SyntheticTensor};
use moela::load::{CheckpointFiles, FileData, WeightFile};
use moela::model::transformer::tensor_shapes;
use moela::{Error, Result};

/// Names accepted by [`preset_files`], with a line each.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "v2-lite",
        "DeepSeek-V2-Lite at full size: 27 layers, hidden 2048, 64 experts top-6, 2 shared, vocab 102400 (15.7B parameters)",
    ),
    (
        "v3-layer",
        "One DeepSeek-V3 MoE layer at full width: hidden 7168, 128 heads, q_lora 1536, 256 experts top-8 in 8 groups, vocab 129280",
    ),
    (
        "v2-lite-mini",
        "DeepSeek-V2-Lite scaled down: 8 layers, hidden 1024, 16 heads, kv_lora 256, 32 experts top-4, 2 shared, vocab 32000",
    ),
    (
        "v3-mini",
        "DeepSeek-V3 scaled down: 4 layers, hidden 512, q_lora 192, 16 experts in 4 groups, sigmoid noaux_tc, YaRN",
    ),
];

/// The config.json of preset `name` (one of [`PRESETS`]): for `v2-lite` and `v3-layer`, the published model's.
pub fn preset_config(name: &str) -> Result<String> {
    let json = match name {
        "v2-lite" => serde_json::json!({
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
            "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
            "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6, "routed_scaling_factor": 1.0,
            "kv_lora_rank": 512, "q_lora_rank": null, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
            "norm_topk_prob": false, "scoring_func": "softmax", "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
            "bos_token_id": 100000, "eos_token_id": 100001,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                             "original_max_position_embeddings": 4096, "type": "yarn"},
            "tie_word_embeddings": false, "torch_dtype": "bfloat16"
        }),
        // V3's widths with its first MoE layer only (no dense layers): the largest per-layer shapes moela meets.
        "v3-layer" => serde_json::json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
            "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8, "routed_scaling_factor": 2.5,
            "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
            "norm_topk_prob": true, "scoring_func": "sigmoid", "first_k_dense_replace": 0, "moe_layer_freq": 1,
            "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
            "bos_token_id": 0, "eos_token_id": 1,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                             "original_max_position_embeddings": 4096, "type": "yarn"},
            "tie_word_embeddings": false, "torch_dtype": "bfloat16"
        }),
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

/// A preset checkpoint (config.json and one synthetic weight file, no tokenizer) from `seed`.
///
/// Weights are uniform with standard deviation 0.02, generated row by row as the loader reads them; norms
/// are 1; the router correction bias is small noise.
pub fn preset_files(name: &str, seed: u64) -> Result<CheckpointFiles> {
    let config_json = preset_config(name)?;
    let config = ModelConfig::from_json_bytes(config_json.as_bytes(), "config.json")?;
    let amp = 0.02 * 3f32.sqrt();
    let tensors = tensor_shapes(&config)
        .into_iter()
        .map(|(name, shape)| SyntheticTensor {
            fill: fill_of(&name, amp),
            name,
            shape,
        })
        .collect();
    Ok(CheckpointFiles {
        config: config_json.into_bytes(),
        tokenizer: None,
        tokenizer_config: None,
        weights: vec![WeightFile {
            name: format!("{name} (random, seed {seed})"),
            data: FileData::Synthetic(std::sync::Arc::new(Synthetic::new(tensors, seed))),
        }],
    })
}

/// What a random tensor holds: norms 1, the router correction bias small f32 noise, the rest uniform.
fn fill_of(name: &str, amp: f32) -> Fill {
    if name.ends_with("e_score_correction_bias") {
        Fill::UniformF32(0.01)
    } else if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
        Fill::Ones
    } else {
        Fill::Uniform(amp)
    }
}

/// A random checkpoint for any supported `config.json` text, in memory: projections and embeddings uniform
/// with standard deviation `std`, norms 1, router correction bias small noise (the start of training). One
/// bf16 safetensors file, no tokenizer; the values are a pure function of `seed` and the config.
pub fn random_files(config_json: String, seed: u64, std: f32) -> Result<CheckpointFiles> {
    let config = ModelConfig::from_json_bytes(config_json.as_bytes(), "config.json")?;
    let name = "random";
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let amp = std * 3f32.sqrt();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = Vec::new();
    for (name, shape) in tensor_shapes(&config) {
        let n: usize = shape.iter().product();
        let (bytes, dtype) = match fill_of(&name, amp) {
            Fill::UniformF32(a) => {
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-a..a)).collect();
                (bytemuck::cast_slice(&v).to_vec(), Dtype::F32)
            }
            Fill::Ones => (bytemuck::cast_slice(&vec![bf16::ONE; n]).to_vec(), Dtype::BF16),
            Fill::Uniform(a) => {
                let v: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.random_range(-a..a))).collect();
                (bytemuck::cast_slice(&v).to_vec(), Dtype::BF16)
            }
        };
        tensors.push((name, shape, bytes, dtype));
    }
    let views = tensors
        .iter()
        .map(|(n, s, b, d)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::InvalidArgument(format!("random tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::InvalidArgument(format!("building {name} weights: {e}")))?;
    Ok(CheckpointFiles {
        config: config_json.into_bytes(),
        tokenizer: None,
        tokenizer_config: None,
        weights: vec![WeightFile::from_bytes(format!("{name}.safetensors"), bytes)],
    })
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
