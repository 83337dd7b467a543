//! GGUF models as llama.cpp's own tools write them (`scripts/gen_gguf_models.py`): converted from the HF
//! fixtures by its converter, and quantised by its quantiser, with llama.cpp's logits for the quantised
//! files.

use std::path::{Path, PathBuf};

use moela::{Engine, Kernels, LoadOptions, Message, ModelInfo, WeightDtype};
use serde_json::Value;

mod common;
use common::{argmax, ids, rel_l2, rows};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load(path: &Path, dtype: WeightDtype) -> Engine {
    let options = LoadOptions {
        dtype,
        kernels: Kernels::default(),
    };
    Engine::load_dir(path, options, &mut |_| {}).unwrap_or_else(|e| panic!("loading {path:?} as {dtype:?}: {e}"))
}

/// An empty folder of this test's own.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moela-gguf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("JSON")
}

/// Positions whose argmax differs.
fn argmax_differs(got: &[Vec<f32>], want: &[Vec<f32>]) -> usize {
    got.iter().zip(want).filter(|(g, w)| argmax(g) != argmax(w)).count()
}

fn worst(d: &[f64]) -> f64 {
    d.iter().copied().fold(0.0, f64::max)
}

/// The F32 file llama.cpp's converter writes from an HF folder is the same model: the same logits, tokens
/// and chat prompt as the folder (its split up-projection joined back, its stacked experts read per expert).
#[test]
fn an_f32_gguf_is_its_hf_folder() {
    let hf = load(&fixtures().join("v2-lite-tiny"), WeightDtype::F32);
    let gguf = load(&fixtures().join("gguf/v2-lite-tiny.f32.gguf"), WeightDtype::F32);
    let config = |e: &Engine| serde_json::to_value(e.config()).unwrap();
    assert_eq!(config(&hf), config(&gguf));
    let r = json(&fixtures().join("v2-lite-tiny/reference.json"));
    let tokens = ids(&r["tokens"]);
    for (what, a, b) in [
        (
            "prefill",
            pollster::block_on(hf.logits(&tokens)),
            pollster::block_on(gguf.logits(&tokens)),
        ),
        (
            "decode",
            pollster::block_on(hf.logits_decode(&tokens)),
            pollster::block_on(gguf.logits_decode(&tokens)),
        ),
    ] {
        let d = rel_l2(&b.unwrap(), &a.unwrap());
        assert!(worst(&d) <= 1e-4, "{what}: relative L2 {:.2e}", worst(&d));
    }
    let (t, g) = (hf.tokenizer().unwrap(), gguf.tokenizer().unwrap());
    for text in [
        "Hello world",
        " 12 + 345 = 357\n<think>x</think>",
        "héllo, 世界！ 1234567",
        "don't stop...\n\n   x\ty",
        "<｜User｜>2+2?<｜Assistant｜>",
    ] {
        assert_eq!(t.encode(text, true).unwrap(), g.encode(text, true).unwrap(), "{text:?}");
    }
    let messages = [Message::user("What is 2 + 2?")];
    assert_eq!(
        t.encode_chat(&messages, true).unwrap(),
        g.encode_chat(&messages, true).unwrap()
    );
}

/// A split file (any of its parts names the model), in F16, against transformers' logits.
#[test]
fn a_split_f16_gguf_loads_from_any_part() {
    let r = json(&fixtures().join("v3-tiny/reference.json"));
    let tokens = ids(&r["tokens"]);
    let want = rows(&r["logits"]);
    let engine = load(
        &fixtures().join("gguf/v3-tiny.f16-00002-of-00003.gguf"),
        WeightDtype::F16,
    );
    let got = pollster::block_on(engine.logits(&tokens)).unwrap();
    let d = rel_l2(&got, &want);
    assert!(worst(&d) <= 1e-2, "relative L2 {:.2e}", worst(&d));
    assert_eq!(argmax_differs(&got, &want), 0);
    let missing = scratch("split");
    let part = missing.join("v3-tiny.f16-00001-of-00003.gguf");
    std::fs::copy(fixtures().join("gguf/v3-tiny.f16-00001-of-00003.gguf"), &part).unwrap();
    let e = Engine::load_dir(&part, LoadOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("00002-of-00003") && e.contains("missing"), "{e}");
}

/// The converter's Q8_0 blocks go to the GPU as they are (every weight of its file is Q8_0): loaded as q8,
/// the model computes what the same file dequantised to f32 computes, up to the kernels' rounding. (Q4_0's
/// blocks, kept the same way as q4, are checked block by block in `gpu/packed.rs`.)
#[test]
fn q8_0_blocks_are_kept_exactly() {
    let path = fixtures().join("gguf/v2-lite-tiny.q8_0.gguf");
    let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 500).collect();
    let exact = pollster::block_on(load(&path, WeightDtype::F32).logits(&tokens)).unwrap();
    let packed = pollster::block_on(load(&path, WeightDtype::Q8).logits(&tokens)).unwrap();
    let d = rel_l2(&packed, &exact);
    assert!(worst(&d) <= 1e-4, "relative L2 {:.2e}", worst(&d));
    // And the converter's Q8_0 model stays near transformers' logits of the bf16 original.
    let r = json(&fixtures().join("v2-lite-tiny/reference.json"));
    let got = pollster::block_on(
        load(&fixtures().join("gguf/v2-lite-tiny.q8_0.gguf"), WeightDtype::Q8).logits(&ids(&r["tokens"])),
    )
    .unwrap();
    let mut d = rel_l2(&got, &rows(&r["logits"]));
    d.sort_by(f64::total_cmp);
    assert!(d[d.len() / 2] <= 5e-2 && worst(&d) <= 0.5, "{d:?}");
}

/// Quantised files against llama.cpp's own logits for the same file (its CPU backend): Q4_K_M holds Q4_K,
/// Q6_K and Q5_0 tensors, Q5_K_M Q5_K, Q6_K and Q5_1, the Q4_0 file Q4_0 and Q6_K, and `moela quantize
/// --type q4_k` / `q5_k` / `q6_k`'s files Q4_K / Q5_K with Q5_0 and Q8_0, and Q6_K with Q8_0 (so llama.cpp
/// reads moela's blocks as moela does). llama.cpp rounds activations to 8 bits for its quantised products;
/// moela holds the file's values exactly in f32, within 8-bit rounding in q8, and in q4k, q5k and q6k (the
/// defaults for Q4_K, Q5_K and Q6_K files) exactly for Q4_K, Q5_K, Q6_K, Q5_0 and Q8_0 tensors and within
/// 8-bit rounding for the rest, so the two agree to a few percent with the same argmax at most positions. In q4 every type but
/// Q4_0 is rounded a second time, which this small random model (as sensitive to rounding as its F32
/// logits' distance to llama.cpp's quantised ones shows) amplifies: reported, and bounded loosely so that a
/// broken unpacking cannot pass.
#[test]
fn k_quant_models_agree_with_llama_cpp() {
    let r = json(&fixtures().join("gguf/k256.llama.json"));
    let tokens = ids(&r["tokens"]);
    let f32_ref = rows(&r["f32"]);
    for name in ["q4_k_m", "q4_0", "moela.q4_k", "q5_k_m", "moela.q5_k", "moela.q6_k"] {
        let want = rows(&r["files"][name]["logits"]);
        let path = fixtures().join(format!("gguf/k256.{name}.gguf"));
        for dtype in [
            WeightDtype::F32,
            WeightDtype::Q8,
            WeightDtype::Q4,
            WeightDtype::Q4K,
            WeightDtype::Q5K,
            WeightDtype::Q6K,
        ] {
            let got = pollster::block_on(load(&path, dtype).logits(&tokens)).unwrap();
            let d = rel_l2(&got, &want);
            let to_f32 = rel_l2(&got, &f32_ref);
            let llama_to_f32 = rel_l2(&want, &f32_ref);
            let differs = argmax_differs(&got, &want);
            eprintln!(
                "k256.{name} as {dtype:?}: against llama.cpp worst {:.2e} (argmax differs at {differs} of {}); \
                 against F32 worst {:.2e} (llama.cpp's {:.2e})",
                worst(&d),
                tokens.len(),
                worst(&to_f32),
                worst(&llama_to_f32)
            );
            let (bound, most) = if dtype == WeightDtype::Q4 { (0.7, 2) } else { (0.1, 8) };
            assert!(
                worst(&d) <= bound,
                "k256.{name} as {dtype:?}: relative L2 {:.2e}",
                worst(&d)
            );
            assert!(
                differs * most <= tokens.len(),
                "k256.{name} as {dtype:?}: argmax differs at {differs}"
            );
        }
    }
}

/// The weight bytes `Engine::info` reports are those of the weights as loaded: with one format throughout
/// they are what the config predicts for it; a Q4_K_M file's mix (its Q6_K and Q5_0 tensors kept as they
/// are) takes more than Q4_K alone would.
#[test]
fn reported_weight_bytes_are_the_stored_ones() {
    let q8 = load(&fixtures().join("gguf/v2-lite-tiny.q8_0.gguf"), WeightDtype::Q8);
    let predicted = ModelInfo::new(q8.config(), WeightDtype::Q8);
    let info = q8.info();
    assert_eq!(info.gpu_weight_bytes, predicted.gpu_weight_bytes);
    assert_eq!(
        info.active_weight_bytes_per_token,
        predicted.active_weight_bytes_per_token
    );
    assert_eq!(info.host_weight_bytes, predicted.host_weight_bytes);

    let mixed = load(&fixtures().join("gguf/k256.q4_k_m.gguf"), WeightDtype::Q4K);
    let (info, q4k) = (mixed.info(), ModelInfo::new(mixed.config(), WeightDtype::Q4K));
    assert!(
        info.gpu_weight_bytes > q4k.gpu_weight_bytes,
        "{} <= {}",
        info.gpu_weight_bytes,
        q4k.gpu_weight_bytes
    );
    assert!(info.active_weight_bytes_per_token > q4k.active_weight_bytes_per_token);
    assert!(info.active_weight_bytes_per_token < info.gpu_weight_bytes);
}

/// A tensor of a type moela does not read is an error naming the tensor and the type, before the model is
/// built.
#[test]
fn an_unreadable_type_is_named() {
    let mut bytes = std::fs::read(fixtures().join("gguf/k256.q4_0.gguf")).unwrap();
    // The first tensor stored as Q4_0 (type 2) becomes IQ4_NL (type 20), whose blocks are as large.
    let header = moela::load::gguf::GgufHeader::parse(&bytes, bytes.len() as u64, "k256")
        .map(|p| match p {
            moela::load::gguf::Parsed::Header(h) => h,
            moela::load::gguf::Parsed::NeedBytes(_) => panic!("whole file"),
        })
        .unwrap();
    let victim = header.tensors.iter().find(|t| t.ggml_type.0 == 2).unwrap().name.clone();
    let name_at = bytes
        .windows(victim.len())
        .position(|w| w == victim.as_bytes())
        .unwrap();
    let type_at = name_at + victim.len() + 4 + 8 * header.tensors.iter().find(|t| t.name == victim).unwrap().dims.len();
    assert_eq!(u32::from_le_bytes(bytes[type_at..type_at + 4].try_into().unwrap()), 2);
    bytes[type_at..type_at + 4].copy_from_slice(&20u32.to_le_bytes());
    let path = scratch("damaged").join("damaged.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let e = Engine::load_dir(&path, LoadOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("IQ4_NL") && e.contains("damaged.gguf"), "{e}");
}

/// The tensors of GGUF files (a split model's parts together) by name: type, dims and bytes.
fn tensors_of(paths: &[PathBuf]) -> std::collections::BTreeMap<String, (u32, Vec<u64>, Vec<u8>)> {
    let mut out = std::collections::BTreeMap::new();
    for path in paths {
        let header = moela::load::gguf::read_header(path).unwrap();
        let bytes = std::fs::read(path).unwrap();
        for t in header.tensors {
            let data = bytes[t.offset as usize..(t.offset + t.bytes) as usize].to_vec();
            out.insert(t.name, (t.ggml_type.0, t.dims, data));
        }
    }
    out
}

/// `moela quantize` writes what llama.cpp's converter writes: for the same HF folder, the same tensors
/// (names, types, dimensions and every byte: Q8_0 rounded as llama.cpp rounds, the experts stacked, kv_b
/// split per head) and the same metadata but for the model's display name and a separator-token flag.
#[test]
fn quantize_writes_what_llama_cpp_s_converter_writes() {
    use moela::load::gguf::{GgmlType, read_header};
    let dir = scratch("quantize");
    for (fixture, ty, theirs) in [
        ("v2-lite-tiny", GgmlType::Q8_0, vec!["gguf/v2-lite-tiny.q8_0.gguf"]),
        (
            "v3-tiny",
            GgmlType::F16,
            vec![
                "gguf/v3-tiny.f16-00001-of-00003.gguf",
                "gguf/v3-tiny.f16-00002-of-00003.gguf",
                "gguf/v3-tiny.f16-00003-of-00003.gguf",
            ],
        ),
    ] {
        let out = dir.join(format!("{fixture}.gguf"));
        let mut last = None;
        let written =
            moela::load::gguf::write::quantize(&fixtures().join(fixture), &out, ty, &mut |p| last = Some(p)).unwrap();
        let last = last.unwrap();
        assert_eq!(last.loaded, last.total, "progress ends complete");
        assert_eq!(written.bytes, std::fs::metadata(&out).unwrap().len());
        let theirs: Vec<PathBuf> = theirs.iter().map(|p| fixtures().join(p)).collect();
        let (a, b) = (tensors_of(std::slice::from_ref(&out)), tensors_of(&theirs));
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{fixture}: tensor names"
        );
        for (name, (ty_b, dims_b, data_b)) in &b {
            let (ty_a, dims_a, data_a) = &a[name];
            assert_eq!((ty_a, dims_a), (ty_b, dims_b), "{fixture}: {name}'s type and dims");
            assert!(data_a == data_b, "{fixture}: {name}'s bytes differ");
        }
        let (ours, theirs) = (read_header(&out).unwrap(), read_header(&theirs[0]).unwrap());
        for (key, value) in &theirs.metadata {
            if ["general.name", "general.size_label", "tokenizer.ggml.add_sep_token"].contains(&key.as_str())
                || key.starts_with("split.")
            {
                continue;
            }
            assert_eq!(ours.metadata.get(key), Some(value), "{fixture}: metadata {key}");
        }
    }
    // A type moela does not write is refused by name.
    let e = moela::load::gguf::write::quantize(
        &fixtures().join("v2-lite-tiny"),
        &dir.join("x.gguf"),
        GgmlType::Q4_1,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("Q4_1") && e.contains("q6_k"), "{e}");
}
