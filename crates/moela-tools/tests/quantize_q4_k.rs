//! `moela quantize --type q4_k` end to end on a random model whose widths are whole `Q4_K` super-blocks (and
//! whose expert width is not): the file holds the types llama.cpp's quantiser would choose, and the model it
//! holds runs through the q4k kernels with the logits of the same file decoded to f32 (the kernels add only
//! rounding of f32 sums), near the original's.

use moela::load::gguf::{GgmlType, read_header, write::write_gguf};
use moela::{CheckpointFiles, Engine, LoadOptions, WeightDtype};

/// A small DeepSeek-V2 config: hidden 256 and dense width 512 (whole super-blocks: Q4_K), expert width 160
/// (five blocks of 32: Q5_0), no q_lora_rank.
fn config() -> String {
    serde_json::json!({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "routed_scaling_factor": 1.0,
        "kv_lora_rank": 256, "q_lora_rank": null, "qk_rope_head_dim": 32, "v_head_dim": 64,
        "qk_nope_head_dim": 64, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "norm_topk_prob": false, "scoring_func": "softmax", "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false, "torch_dtype": "bfloat16"
    })
    .to_string()
}

fn files() -> CheckpointFiles {
    moela_tools::preset::random_files(config(), 7, 0.05).unwrap()
}

/// Relative L2 distance of each position's logits, smallest first.
fn rel_l2(got: &[Vec<f32>], want: &[Vec<f32>]) -> Vec<f64> {
    let mut d: Vec<f64> = got
        .iter()
        .zip(want)
        .map(|(g, w)| {
            let num: f64 = g.iter().zip(w).map(|(a, b)| f64::from(a - b).powi(2)).sum();
            let den: f64 = w.iter().map(|b| f64::from(*b).powi(2)).sum();
            (num / den).sqrt()
        })
        .collect();
    d.sort_by(f64::total_cmp);
    d
}

#[test]
fn a_q4_k_file_runs_in_the_q4k_kernels() {
    let Ok(device) = moela::default_device() else {
        eprintln!("no GPU adapter: skipped");
        return;
    };
    let dir = std::env::temp_dir().join(format!("moela-q4k-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("random.q4_k.gguf");
    write_gguf(files(), &path, GgmlType::Q4_K, "random", &mut |_| {}).unwrap();

    // The types llama.cpp's quantiser gives a Q4_K file: Q4_K where rows are whole super-blocks, Q5_0 for
    // the 160-wide expert rows; the head Q8_0 here (Q6_K there); norms and the router F32.
    let header = read_header(&path).unwrap();
    let type_of = |name: &str| header.tensors.iter().find(|t| t.name == name).unwrap().ggml_type;
    for (name, ty) in [
        ("blk.1.ffn_gate_exps.weight", GgmlType::Q4_K),
        ("blk.1.ffn_down_exps.weight", GgmlType::Q5_0),
        ("blk.0.ffn_down.weight", GgmlType::Q4_K),
        ("blk.0.attn_kv_a_mqa.weight", GgmlType::Q4_K),
        ("output.weight", GgmlType::Q8_0),
        ("blk.1.ffn_gate_inp.weight", GgmlType::F32),
    ] {
        assert_eq!(type_of(name), ty, "{name}");
    }

    let tokens = [0u32, 17, 300, 511, 9, 42, 256, 3, 77, 128, 5, 400];
    let logits = |files: CheckpointFiles, dtype: WeightDtype| {
        let options = LoadOptions {
            dtype,
            ..LoadOptions::default()
        };
        let engine = pollster::block_on(Engine::load(files, options, &device, &mut |_| {})).unwrap();
        let stored = engine.info().stored_types;
        (pollster::block_on(engine.logits(&tokens)).unwrap(), stored)
    };
    let (q4k, stored) = logits(CheckpointFiles::read_dir(&path).unwrap(), WeightDtype::Q4K);
    let (exact, _) = logits(CheckpointFiles::read_dir(&path).unwrap(), WeightDtype::F32);
    let (original, _) = logits(files(), WeightDtype::F32);
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(stored.first().map(|s| s.name.as_str()), Some("Q4_K"), "{stored:?}");
    let kernels = rel_l2(&q4k, &exact);
    let rounding = rel_l2(&exact, &original);
    let median = |d: &[f64]| d[d.len() / 2];
    eprintln!(
        "q4k kernels against the file in f32: median {:.2e}, worst {:.2e}; the file against the bf16 model: median {:.2e}",
        median(&kernels),
        kernels[kernels.len() - 1],
        median(&rounding)
    );
    // The q4k products hold the file's values exactly (and the q8 ones: Q5_0 and Q8_0 blocks are copied);
    // the attention input, rebuilt from its values, is rounded to 8 bits, which alone moves these logits by
    // about 1e-2. A position whose router sees a near tie may pick another expert: one such is allowed.
    assert!(median(&kernels) <= 1.5e-2, "q4k against f32: {kernels:?}");
    assert!(kernels[kernels.len() - 2] <= 3e-2, "q4k against f32: {kernels:?}");
    // 4-bit weights against bf16 ones: a few tens of percent on a random model, as llama.cpp's own.
    assert!(median(&rounding) <= 0.3, "Q4_K file against the original: {rounding:?}");
}
