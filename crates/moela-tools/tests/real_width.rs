//! A checkpoint with DeepSeek-V2-Lite's widths (fewer layers, experts and tokens: a few hundred MB, written at
//! test time) loads from its mapped file with host memory bounded by what the GPU holds plus one slice, and
//! gives the same logits as the same bytes loaded from memory.
//!
//! Its own test binary (one process): the peak resident memory it measures is this load's alone.

use std::io::Write;
use std::path::{Path, PathBuf};

use moela::load::synthetic::{Fill, Synthetic, SyntheticTensor};
use moela::load::{FileData, WeightFile};
use moela::model::transformer::tensor_shapes;
use moela::{CheckpointFiles, Engine, LoadOptions, ModelConfig, WeightDtype};

/// DeepSeek-V2-Lite's published config.json (the `v2-lite` preset's) with 2 layers, 8 of its 64 routed experts
/// (top-2) and a 4096-token vocabulary: every width is the real one.
fn checkpoint_config() -> String {
    let mut c: serde_json::Value =
        serde_json::from_str(&moela_tools::preset::preset_config("v2-lite").unwrap()).unwrap();
    for (key, value) in [
        ("num_hidden_layers", 2),
        ("n_routed_experts", 8),
        ("num_experts_per_tok", 2),
        ("vocab_size", 4096),
        ("bos_token_id", 0),
        ("eos_token_id", 1),
    ] {
        c[key] = value.into();
    }
    c.to_string()
}

/// Writes the checkpoint tensor by tensor (never whole in memory): bf16 values from a seeded generator
/// (`load::synthetic`, read back as f32 rows and rounded). Returns the file's path and size.
fn write_checkpoint(dir: &Path) -> (PathBuf, u64) {
    let config = ModelConfig::from_json_bytes(checkpoint_config().as_bytes(), "config.json").unwrap();
    let mut shapes = tensor_shapes(&config);
    shapes.sort();
    let amp = 0.02 * 3f32.sqrt();
    let tensors: Vec<SyntheticTensor> = shapes
        .iter()
        .map(|(name, shape)| SyntheticTensor {
            name: name.clone(),
            shape: shape.clone(),
            fill: if name.ends_with("norm.weight") {
                Fill::Ones
            } else {
                Fill::Uniform(amp)
            },
        })
        .collect();
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for t in &tensors {
        let bytes = t.bytes();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let path = dir.join("model.safetensors");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    file.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    // The values come from a synthetic file of the same tensors, a slice of rows at a time.
    let source = moela::load::WeightSet::open_blocking(vec![WeightFile {
        name: "source".into(),
        data: FileData::Synthetic(std::sync::Arc::new(Synthetic::new(tensors.clone(), 7))),
    }])
    .unwrap();
    for t in &tensors {
        let rows = t.shape[0];
        let per = (1 << 20) / t.shape.iter().skip(1).product::<usize>().max(1);
        for first in (0..rows).step_by(per.max(1)) {
            let part = pollster::block_on(source.read_rows(&t.name, &t.shape, first..(first + per).min(rows))).unwrap();
            let bytes: Vec<u8> = part
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect();
            file.write_all(&bytes).unwrap();
        }
    }
    file.flush().unwrap();
    drop(file);
    std::fs::write(dir.join("config.json"), checkpoint_config()).unwrap();
    (path, 8 + text.len() as u64 + offset)
}

#[test]
fn a_real_width_checkpoint_loads_within_its_memory_budget_and_matches_the_bytes_path() {
    let Ok(device) = moela::default_device() else {
        eprintln!("no GPU adapter: skipped");
        return;
    };
    let dir = std::env::temp_dir().join(format!("moela-real-width-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (path, size) = write_checkpoint(&dir);
    let options = LoadOptions {
        dtype: WeightDtype::Q4,
        ..LoadOptions::default()
    };
    let tokens = [0u32, 17, 400, 4095, 9];

    let before = moela::memory::resident_bytes();
    let mapped = CheckpointFiles::read_dir(&dir).unwrap();
    let engine = pollster::block_on(Engine::load(mapped, options, &device, &mut |_| {})).unwrap();
    let peak = moela::memory::peak_resident_bytes();
    let from_map = pollster::block_on(engine.logits(&tokens)).unwrap();
    let info = engine.info();
    drop(engine);

    if let (Some(before), Some(peak)) = (before, peak) {
        // What the load may hold beyond the device's copies and the embedding table: the largest weight's
        // packed words and the texture's staging copy of them (48 MiB here: the dense MLP's gate and up), the
        // pages of the tensor being read, the device's own start-up, and the allocator's slack.
        let budget = 192u64 << 20;
        // On a CPU adapter (lavapipe) the GPU's memory is the process's own.
        let gpu = if moela::gpu::texture::cpu_adapter() {
            info.gpu_weight_bytes * 11 / 10
        } else {
            0
        };
        let grown = peak.saturating_sub(before);
        eprintln!(
            "{size} bytes of bf16 loaded as q4: peak resident grew {grown} bytes ({} of q4 weights on the device)",
            info.gpu_weight_bytes
        );
        assert!(
            grown <= gpu + info.host_weight_bytes + budget,
            "the load grew resident memory by {grown} bytes: more than {} (device) + {} (embedding) + {budget}",
            gpu,
            info.host_weight_bytes
        );
        // Reading the file whole would hold all of it: the load holds far less (q4 weights are 0.28x the
        // bf16 file).
        assert!(
            grown < size * 3 / 4,
            "the load grew resident memory by {grown} bytes: 3/4 of the {size}-byte file"
        );
    }

    let bytes = std::fs::read(&path).unwrap();
    let in_memory = CheckpointFiles {
        config: checkpoint_config().into_bytes(),
        tokenizer: None,
        tokenizer_config: None,
        weights: vec![WeightFile::from_bytes("model.safetensors", bytes)],
    };
    let engine = pollster::block_on(Engine::load(in_memory, options, &device, &mut |_| {})).unwrap();
    let from_bytes = pollster::block_on(engine.logits(&tokens)).unwrap();
    assert_eq!(
        from_map, from_bytes,
        "the mapped file and its bytes give the same logits"
    );
    assert!(from_map.iter().flatten().all(|v| v.is_finite()));
    for row in &from_map {
        let (lo, hi) = row
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        eprintln!("logits from {lo} to {hi}");
        assert!(
            hi - lo > 1e-3,
            "the logits of a random model differ from token to token: {lo}..{hi}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
