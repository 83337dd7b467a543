//! The loader meets untrusted files: damaged copies of the shipped model (random header bytes, header fields,
//! truncations, absurd config values, broken tokenizer files) must each give a clear error or load and run,
//! never a panic, a hang, or an allocation the machine cannot make.
//!
//! Seeded and bounded: a fixed number of cases within a time budget (fewer cases where the machine is slow;
//! the count run is printed). Each case runs on its own thread; one that does not finish within `HANG`
//! fails the test and names its damage.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use moela::{CheckpointFiles, Engine, GenerateOptions, LoadOptions, Message, SessionOptions, WeightFile};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

const CASES: usize = 400;
const BUDGET: Duration = Duration::from_secs(150);
const HANG: Duration = Duration::from_secs(60);

struct Model {
    config: Vec<u8>,
    weights: Vec<u8>,
    tokenizer: Vec<u8>,
    tokenizer_config: Vec<u8>,
}

fn shipped() -> Model {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/moela-arith-tiny");
    let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
    Model {
        config: read("config.json"),
        weights: read("model.safetensors"),
        tokenizer: read("tokenizer.json"),
        tokenizer_config: read("tokenizer_config.json"),
    }
}

/// A value a damaged config might hold in place of a number.
fn absurd(rng: &mut ChaCha8Rng) -> Value {
    let choices: [Value; 14] = [
        0.into(),
        1.into(),
        (-1).into(),
        3.into(),
        (1u64 << 31).into(),
        ((1u64 << 32) + 1).into(),
        i64::MAX.into(),
        u64::MAX.into(),
        1e30.into(),
        0.5.into(),
        "x".into(),
        Value::Null,
        true.into(),
        Value::Array(vec![]),
    ];
    choices[rng.random_range(0..choices.len())].clone()
}

/// One damage to the model's files, described for the failure message.
fn damage(m: &Model, rng: &mut ChaCha8Rng) -> (String, Model) {
    let mut out = Model {
        config: m.config.clone(),
        weights: m.weights.clone(),
        tokenizer: m.tokenizer.clone(),
        tokenizer_config: m.tokenizer_config.clone(),
    };
    let header = 8 + u64::from_le_bytes(m.weights[..8].try_into().unwrap()) as usize;
    let what = match rng.random_range(0..9) {
        0 | 1 => {
            // A config field set to an absurd value, or removed.
            let mut v: Value = serde_json::from_slice(&m.config).unwrap();
            let map = v.as_object_mut().unwrap();
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = keys[rng.random_range(0..keys.len())].clone();
            let what = if rng.random_bool(0.15) {
                map.remove(&key);
                format!("config.json without {key}")
            } else if key == "rope_scaling" && rng.random_bool(0.5) {
                let value = absurd(rng);
                let field =
                    ["factor", "original_max_position_embeddings", "beta_fast", "mscale"][rng.random_range(0..4)];
                if let Some(o) = map[&key].as_object_mut() {
                    o.insert(field.into(), value.clone());
                }
                format!("config.json rope_scaling.{field} = {value}")
            } else {
                let value = absurd(rng);
                map.insert(key.clone(), value.clone());
                format!("config.json {key} = {value}")
            };
            out.config = serde_json::to_vec(&v).unwrap();
            what
        }
        2 => {
            let n = rng.random_range(1..8);
            for _ in 0..n {
                let at = rng.random_range(8..header);
                out.weights[at] = rng.random();
            }
            format!("{n} random bytes in the safetensors header")
        }
        3 => {
            let at = rng.random_range(0..8);
            out.weights[at] = rng.random();
            format!("byte {at} of the safetensors header length")
        }
        4 => {
            let len = rng.random_range(0..m.weights.len());
            out.weights.truncate(len);
            format!("model.safetensors truncated to {len} bytes")
        }
        5 => {
            let n = rng.random_range(1..32);
            for _ in 0..n {
                let at = rng.random_range(header..m.weights.len());
                out.weights[at] = rng.random();
            }
            format!("{n} random bytes in the tensor data")
        }
        6 => {
            // A number in the header rewritten (offsets, shapes).
            let text = String::from_utf8_lossy(&m.weights[8..header]).into_owned();
            let digits: Vec<usize> = text
                .match_indices(|c: char| c.is_ascii_digit())
                .map(|(i, _)| i)
                .collect();
            let at = 8 + digits[rng.random_range(0..digits.len())];
            out.weights[at] = b"0123456789"[rng.random_range(0..10)];
            format!("a digit of the safetensors header at byte {at}")
        }
        7 => {
            let len = rng.random_range(0..m.tokenizer.len());
            if rng.random_bool(0.5) {
                out.tokenizer.truncate(len);
                format!("tokenizer.json truncated to {len} bytes")
            } else {
                out.tokenizer[len] = rng.random();
                format!("byte {len} of tokenizer.json")
            }
        }
        _ => {
            let len = rng.random_range(0..m.tokenizer_config.len());
            if rng.random_bool(0.5) {
                out.tokenizer_config.truncate(len);
                format!("tokenizer_config.json truncated to {len} bytes")
            } else {
                out.tokenizer_config[len] = rng.random();
                format!("byte {len} of tokenizer_config.json")
            }
        }
    };
    (what, out)
}

/// Loads the files and, when they load, answers a question: `Ok(true)` when it ran, `Ok(false)` for a clear
/// error.
fn load_and_run(m: Model) -> Result<bool, String> {
    let files = CheckpointFiles {
        config: m.config,
        tokenizer: Some(m.tokenizer),
        tokenizer_config: Some(m.tokenizer_config),
        weights: vec![WeightFile::from_bytes("model.safetensors", m.weights)],
    };
    #[cfg(feature = "cpu")]
    let device = moela::cpu_device();
    #[cfg(not(feature = "cpu"))]
    let device = moela::default_device().map_err(|e| e.to_string())?;
    let engine = match pollster::block_on(Engine::load(files, LoadOptions::default(), &device, &mut |_| {})) {
        Ok(e) => Arc::new(e),
        Err(e) => return clear(e),
    };
    let mut session = match engine.session(SessionOptions { max_context: 64 }) {
        Ok(s) => s,
        Err(e) => return clear(e),
    };
    let messages = [Message {
        role: "user".into(),
        content: "What is 12 + 34?".into(),
    }];
    let options = GenerateOptions {
        max_tokens: 6,
        ..GenerateOptions::default()
    };
    let mut events = match session.chat(&messages, options) {
        Ok(g) => g,
        Err(e) => return clear(e),
    };
    while let Some(ev) = events.next_blocking() {
        if let Err(e) = ev {
            return clear(e);
        }
    }
    Ok(true)
}

/// An error is clear when it says something: a file, field, tensor or limit.
fn clear(e: moela::Error) -> Result<bool, String> {
    let text = e.to_string();
    if text.trim().len() < 12 {
        return Err(format!("unclear error: {text:?}"));
    }
    Ok(false)
}

/// Runs up to `CASES` damaged copies made by `damage`, each through `run` on a thread of its own, and fails
/// on a panic, an unclear error or a case that does not finish within `HANG`.
fn fuzz<M: Send + 'static>(
    what: &str,
    seed: u64,
    mut damage: impl FnMut(&mut ChaCha8Rng) -> (String, M),
    run: fn(M) -> Result<bool, String>,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = Instant::now();
    let (mut ran, mut errors, mut done) = (0, 0, 0);
    for case in 0..CASES {
        if start.elapsed() > BUDGET {
            break;
        }
        let (damaged, files) = damage(&mut rng);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(files)));
            let _ = tx.send(result);
        });
        match rx.recv_timeout(HANG) {
            Ok(Ok(Ok(true))) => ran += 1,
            Ok(Ok(Ok(false))) => errors += 1,
            Ok(Ok(Err(e))) => panic!("case {case} ({damaged}): {e}"),
            Ok(Err(_)) => panic!("case {case} ({damaged}): panicked"),
            Err(_) => panic!("case {case} ({damaged}): no answer within {HANG:?}"),
        }
        done += 1;
    }
    eprintln!("{done} damaged {what}: {errors} clear errors, {ran} loaded and ran");
    assert!(done >= 50, "only {done} cases ran within {BUDGET:?}");
    assert!(
        errors > 0 && ran > 0,
        "{errors} errors, {ran} ran: the damage is not varied"
    );
}

#[test]
fn damaged_checkpoints_give_clear_errors_or_run() {
    let model = shipped();
    fuzz("checkpoints", 0x10ad, |rng| damage(&model, rng), load_and_run);
}

/// A GGUF file from llama.cpp's converter (v2-lite-tiny, Q8_0), damaged: random bytes in its header (metadata,
/// tensor table), a rewritten dimension or offset, truncation, random bytes in its data.
#[test]
fn damaged_gguf_files_give_clear_errors_or_run() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/v2-lite-tiny.q8_0.gguf");
    let bytes = std::fs::read(&path).unwrap();
    let header = moela::load::gguf::read_header(&path).unwrap();
    let data_start = header.data_start as usize;
    // Where the tensor table's dimensions and offsets are: after each tensor's name.
    let fields: Vec<usize> = header
        .tensors
        .iter()
        .filter_map(|t| {
            bytes
                .windows(t.name.len())
                .position(|w| w == t.name.as_bytes())
                .map(|at| at + t.name.len())
        })
        .collect();
    let damage = |rng: &mut ChaCha8Rng| {
        let mut out = bytes.clone();
        let what = match rng.random_range(0..4) {
            0 => {
                let n = rng.random_range(1..8);
                for _ in 0..n {
                    out[rng.random_range(0..data_start)] = rng.random();
                }
                format!("{n} random bytes in the header")
            }
            1 => {
                let at = fields[rng.random_range(0..fields.len())] + rng.random_range(0..28);
                out[at] = rng.random();
                format!("byte {at} in a tensor's dimensions, type or offset")
            }
            2 => {
                let len = rng.random_range(0..bytes.len());
                out.truncate(len);
                format!("truncated to {len} bytes")
            }
            _ => {
                let n = rng.random_range(1..32);
                for _ in 0..n {
                    out[rng.random_range(data_start..bytes.len())] = rng.random();
                }
                format!("{n} random bytes in the tensor data")
            }
        };
        (what, out)
    };
    fuzz("GGUF files", 0x66_75_66, damage, load_gguf_and_run);
}

/// Loads a GGUF file from its bytes and computes logits: `Ok(true)` when it ran, `Ok(false)` for a clear error.
fn load_gguf_and_run(bytes: Vec<u8>) -> Result<bool, String> {
    let weights = vec![WeightFile::from_bytes("damaged.gguf", bytes)];
    let (files, _) = match pollster::block_on(moela::load::gguf::checkpoint(weights)) {
        Ok(f) => f,
        Err(e) => return clear(e),
    };
    #[cfg(feature = "cpu")]
    let device = moela::cpu_device();
    #[cfg(not(feature = "cpu"))]
    let device = moela::default_device().map_err(|e| e.to_string())?;
    let options = LoadOptions {
        dtype: moela::WeightDtype::Q8,
        ..LoadOptions::default()
    };
    let engine = match pollster::block_on(Engine::load(files, options, &device, &mut |_| {})) {
        Ok(e) => e,
        Err(e) => return clear(e),
    };
    match pollster::block_on(engine.logits(&[0, 17, 300, 5])) {
        Ok(_) => Ok(true),
        Err(e) => clear(e),
    }
}
