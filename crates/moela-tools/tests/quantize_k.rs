//! `moela quantize --type q4_k` and `q5_k` end to end on a random model whose widths are whole K-quant
//! super-blocks (and whose expert width is not): the file holds the types llama.cpp's quantiser would
//! choose, and the model it holds runs through the q4k / q5k kernels with the logits of the same file
//! decoded to f32 (the kernels add only rounding of f32 sums), near the original's.

use moela::load::gguf::{GgmlType, read_header, write::write_gguf};
use moela::{CheckpointFiles, Engine, LoadOptions, WeightDtype};

/// A small DeepSeek-V2 config: hidden 256 and dense width 512 (whole super-blocks: Q4_K / Q5_K), expert
/// width 160 (five blocks of 32: Q5_0), no q_lora_rank.
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
    a_k_quant_file_runs_in_its_kernels(GgmlType::Q4_K, WeightDtype::Q4K, 0.3);
}

#[test]
fn a_q5_k_file_runs_in_the_q5k_kernels() {
    a_k_quant_file_runs_in_its_kernels(GgmlType::Q5_K, WeightDtype::Q5K, 0.15);
}

#[test]
fn a_q6_k_file_runs_in_the_q6k_kernels() {
    a_k_quant_file_runs_in_its_kernels(GgmlType::Q6_K, WeightDtype::Q6K, 0.1);
}

/// `moela quantize --type` `ty` (Q4_K, Q5_K or Q6_K), read back as `format`; `bound`: the file's median
/// distance to the original model's logits.
fn a_k_quant_file_runs_in_its_kernels(ty: GgmlType, format: WeightDtype, bound: f64) {
    let Ok(device) = moela::default_device() else {
        eprintln!("no GPU adapter: skipped");
        return;
    };
    let dir = std::env::temp_dir().join(format!("moela-{}-{}", format.name(), std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("random.gguf");
    write_gguf(files(), &path, ty, "random", &mut |_| {}).unwrap();

    // The types llama.cpp's quantiser gives a K-quant file: the type where rows are whole super-blocks,
    // Q5_0 for the 160-wide expert rows (Q5_1 there for Q5_K; Q8_0 for Q6_K); the head Q8_0 here (Q6_K
    // there); norms and the router F32.
    let header = read_header(&path).unwrap();
    let type_of = |name: &str| header.tensors.iter().find(|t| t.name == name).unwrap().ggml_type;
    let (narrow, head) = match ty {
        GgmlType::Q6_K => (GgmlType::Q8_0, GgmlType::Q6_K),
        _ => (GgmlType::Q5_0, GgmlType::Q8_0),
    };
    for (name, ty) in [
        ("blk.1.ffn_gate_exps.weight", ty),
        ("blk.1.ffn_down_exps.weight", narrow),
        ("blk.0.ffn_down.weight", ty),
        ("blk.0.attn_kv_a_mqa.weight", ty),
        ("output.weight", head),
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
    let (kquant, stored) = logits(CheckpointFiles::read_dir(&path).unwrap(), format);
    let (exact, _) = logits(CheckpointFiles::read_dir(&path).unwrap(), WeightDtype::F32);
    let (original, _) = logits(files(), WeightDtype::F32);
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(
        stored.first().map(|s| s.name.as_str()),
        Some(ty.name().as_str()),
        "{stored:?}"
    );
    let kernels = rel_l2(&kquant, &exact);
    let rounding = rel_l2(&exact, &original);
    let median = |d: &[f64]| d[d.len() / 2];
    eprintln!(
        "{format:?} kernels against the file in f32: median {:.2e}, worst {:.2e}; the file against the bf16 model: median {:.2e}",
        median(&kernels),
        kernels[kernels.len() - 1],
        median(&rounding)
    );
    // The K-quant products hold the file's values exactly (and the q5 / q8 ones: Q5_0 and Q8_0 blocks are copied);
    // the attention input, rebuilt from its values, is rounded to 8 bits, which alone moves these logits by
    // about 1e-2. A position whose router sees a near tie may pick another expert: one such is allowed.
    assert!(median(&kernels) <= 1.5e-2, "{format:?} against f32: {kernels:?}");
    assert!(
        kernels[kernels.len() - 2] <= 3e-2,
        "{format:?} against f32: {kernels:?}"
    );
    // 4- or 5-bit weights against bf16 ones: tens of percent on a random model, as llama.cpp's own.
    assert!(
        median(&rounding) <= bound,
        "{ty:?} file against the original: {rounding:?}"
    );
}
