//! What training relies on: the batched no-cache forward equals the engine's forward, and exporting a
//! loaded model gives back the checkpoint's tensors exactly (names, shapes, values; rope rows re-interleaved).

use std::path::{Path, PathBuf};

use moela::WeightDtype;
use moela::load::WeightSet;
use moela::model::transformer::{LogitsFor, Transformer};
use moela::{CheckpointFiles, ModelConfig};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn load(name: &str) -> (Transformer, WeightSet) {
    let files = CheckpointFiles::read_dir(&fixture(name)).unwrap();
    let config = ModelConfig::from_json_bytes(&files.config, "config.json").unwrap();
    let set = WeightSet::open_blocking(files.weights).unwrap();
    let device = moela::default_device().unwrap();
    let model = pollster::block_on(Transformer::load(
        config,
        &set,
        WeightDtype::F32,
        moela::Kernels::default(),
        &device,
        &mut |_| {},
    ))
    .unwrap();
    (model, set)
}

fn values(t: burn::tensor::Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn batched_forward_equals_one_sequence_at_a_time() {
    for name in ["v3-tiny", "v2-group-odd"] {
        let (mut model, _) = load(name);
        let v = model.config.vocab_size as u32;
        let t = 7;
        let seqs: Vec<Vec<u32>> = vec![
            (0..t as u32).map(|i| (i * 37 + 3) % v).collect(),
            (0..t as u32).map(|i| (i * 11 + 100) % v).collect(),
        ];
        let single: Vec<Vec<f32>> = seqs
            .iter()
            .map(|s| {
                let mut cache = moela::cache::LatentCache::new(&model.config, t, &model.device);
                values(model.forward(s, &mut cache, LogitsFor::All, None).unwrap())
            })
            .collect();
        // The device-side embedding table (training's) gives the same result as host rows.
        model.embedding_on_device();
        let flat: Vec<u32> = seqs.concat();
        let (logits, routing) = model.forward_batch(&flat, 2, t).unwrap();
        let batched = values(logits);
        let n = batched.len() / 2;
        for (b, want) in single.iter().enumerate() {
            let got = &batched[b * n..(b + 1) * n];
            let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "{name}: sequence {b} differs by {err}");
        }
        let moe_layers = (0..model.config.num_hidden_layers)
            .filter(|&l| model.config.is_moe_layer(l))
            .count();
        assert_eq!(routing.len(), moe_layers);
        assert_eq!(routing[0].dims(), [2 * t, model.config.num_experts_per_tok]);
    }
}

#[test]
fn export_returns_the_checkpoint_tensors() {
    // v3-tiny: q_lora, interleaved rope, noaux_tc bias, shared experts; v2-lite-tiny: plain q_proj.
    for name in ["v3-tiny", "v2-lite-tiny"] {
        let (mut model, set) = load(name);
        model.embedding_on_device();
        let exported = pollster::block_on(model.export()).unwrap();
        let names: Vec<String> = moela::model::transformer::tensor_shapes(&model.config)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(exported.len(), names.len(), "{name}: tensor count");
        for (tensor, shape, got) in &exported {
            assert!(names.contains(tensor), "{name}: unexpected {tensor}");
            let want = pollster::block_on(set.read(tensor, shape)).unwrap_or_else(|e| panic!("{name}: {tensor}: {e}"));
            assert_eq!(&want.data, got, "{name}: {tensor} differs after the round trip");
        }
    }
}
