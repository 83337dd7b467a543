//! Every bad input is one clear error naming what is wrong, never a panic.

use std::path::{Path, PathBuf};

use moela::{Engine, GenerateOptions, LoadOptions, Message, SessionOptions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// A private copy of a fixture folder that a test can break.
fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moela-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    let e = Engine::load_dir(dir, LoadOptions::default(), &mut |_| {}).expect_err("load must fail");
    e.to_string()
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn truncated_weights_name_the_file() {
    let dir = copy_fixture("v2-lite-tiny", "trunc");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn garbage_header_names_the_file() {
    let dir = copy_fixture("v2-lite-tiny", "garbage");
    std::fs::write(
        dir.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}",
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn missing_shard_names_the_file() {
    let dir = copy_fixture("v3-tiny", "shard");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn wrong_shape_names_the_tensor() {
    let dir = copy_fixture("v2-lite-tiny", "shape");
    edit_config(&dir, |v| v["kv_lora_rank"] = 40.into());
    let e = load_err(&dir);
    assert!(e.contains("kv_a_proj_with_mqa.weight") && e.contains("expected"), "{e}");
}

#[test]
fn missing_tensor_names_the_tensor() {
    let dir = copy_fixture("v2-lite-tiny", "missing");
    edit_config(&dir, |v| v["num_hidden_layers"] = 4.into());
    let e = load_err(&dir);
    assert!(e.contains("model.layers.3.") && e.contains("missing tensor"), "{e}");
}

#[test]
fn unknown_architecture_names_the_field() {
    let dir = copy_fixture("v2-lite-tiny", "arch");
    edit_config(&dir, |v| {
        v["model_type"] = "llama".into();
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    });
    let e = load_err(&dir);
    assert!(e.contains("model_type") && e.contains("llama"), "{e}");
}

#[test]
fn missing_folder_and_config_are_errors() {
    let e = load_err(Path::new("/nonexistent/moela-model"));
    assert!(e.contains("/nonexistent/moela-model"), "{e}");
    let dir = copy_fixture("v2-lite-tiny", "noconfig");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    let engine =
        std::sync::Arc::new(Engine::load_dir(&fixture("v2-lite-tiny"), LoadOptions::default(), &mut |_| {}).unwrap());
    let mut session = engine.session(SessionOptions { max_context: 8 }).unwrap();
    let long = "one two three four five six seven eight nine ten eleven twelve";
    let messages = [Message {
        role: "user".into(),
        content: long.into(),
    }];
    let mut generation = session.chat(&messages, GenerateOptions::default()).unwrap();
    let e = generation
        .next_blocking()
        .unwrap()
        .expect_err("prompt exceeds the context");
    assert!(e.to_string().contains("context"), "{e}");
    let e = engine
        .session(SessionOptions { max_context: 1 << 30 })
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
    let e = pollster::block_on(engine.logits(&[1, 2, 100000]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("100000") && e.contains("vocab"), "{e}");
}

#[test]
fn a_non_finite_weight_names_the_file_tensor_and_index() {
    let dir = copy_fixture("v2-lite-tiny", "nan");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    // An expert's weight: packed straight from the file's bytes in q8 / q4, converted to f32 otherwise.
    let name = header
        .as_object()
        .unwrap()
        .keys()
        .find(|k| k.contains("experts.1.up_proj"))
        .expect("an expert weight")
        .clone();
    let t = &header[&name];
    let width = match t["dtype"].as_str().unwrap() {
        "F32" => 4,
        _ => 2,
    };
    let at = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize + 5 * width;
    // All exponent bits set: NaN in bf16, f16 and (with the mantissa) f32.
    bytes[at..at + width].copy_from_slice(&if width == 4 {
        f32::NAN.to_le_bytes().to_vec()
    } else {
        vec![0xc1, 0x7f]
    });
    std::fs::write(&path, &bytes).unwrap();
    for weights in ["q4", "f16", "f32"] {
        let options = LoadOptions {
            dtype: moela::WeightDtype::parse(weights).unwrap(),
            ..LoadOptions::default()
        };
        let e = Engine::load_dir(&dir, options, &mut |_| {})
            .expect_err("load must fail")
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains(&name) && e.contains("non-finite") && e.contains("index 5"),
            "{weights}: {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
