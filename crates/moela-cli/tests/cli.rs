//! The `moela` binary end to end on the committed fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn moela(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moela"))
        .args(args)
        .output()
        .expect("moela runs")
}

fn ok(args: &[&str]) -> String {
    let out = moela(args);
    assert!(
        out.status.success(),
        "moela {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn logits_prefill_and_decode_match_the_reference() {
    let dir = fixture("v2-group-odd");
    let reference = json(&std::fs::read_to_string(dir.join("reference.json")).unwrap());
    let tokens: Vec<String> = reference["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let tokens = tokens.join(",");
    for extra in [None, Some("--decode")] {
        let mut args = vec!["logits", "--model", dir.to_str().unwrap(), "--tokens", &tokens];
        args.extend(extra);
        let out = json(&ok(&args));
        assert_eq!(out["tokens"], reference["tokens"]);
        let got = out["logits"].as_array().unwrap();
        let want = reference["logits"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            let g: Vec<f64> = g.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let w: Vec<f64> = w.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let num: f64 = g.iter().zip(&w).map(|(a, b)| (a - b).powi(2)).sum();
            let den: f64 = w.iter().map(|b| b * b).sum();
            assert!(
                (num / den).sqrt() <= 1e-2,
                "{extra:?}: relative L2 {}",
                (num / den).sqrt()
            );
        }
    }
}

#[test]
fn info_reports_the_cache_saving() {
    let out = json(&ok(&[
        "info",
        "--model",
        fixture("v3-tiny").to_str().unwrap(),
        "--json",
    ]));
    // 3 layers x (kv_lora 32 + rope 8); MHA: 3 x 4 heads x (16 + 8 + 16).
    assert_eq!(out["cache"]["values_per_token"], 120);
    assert_eq!(out["cache"]["bytes_per_token"], 480);
    assert_eq!(out["cache"]["mha_equivalent_values_per_token"], 480);
    assert_eq!(out["architecture"], "deepseek_v3");
    assert!(out["active_parameters_per_token"].as_u64() < out["total_parameters"].as_u64());
}

#[test]
fn run_streams_reasoning_apart_and_reports_stats() {
    let out = moela(&[
        "run",
        "--model",
        fixture("v3-tiny").to_str().unwrap(),
        "--prompt",
        "What is 2 + 3?",
        "--max-tokens",
        "12",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    // The R1 template opens <think>, so the (random) model's text is reasoning, marked apart when piped.
    assert!(stdout.starts_with("<think>\n"), "{stdout:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("generated") && stderr.contains("decode"), "{stderr}");
    let hidden = ok(&[
        "run",
        "--model",
        fixture("v3-tiny").to_str().unwrap(),
        "--prompt",
        "What is 2 + 3?",
        "--max-tokens",
        "12",
        "--hide-reasoning",
    ]);
    assert!(!hidden.contains("<think>"), "{hidden:?}");
}

#[test]
fn bad_inputs_fail_with_a_clear_message() {
    let out = moela(&["run", "--model", "/nonexistent/model", "--prompt", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model"), "{err}");
    let out = moela(&["bench", "--preset", "gpt-5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("v2-lite-mini"));
    let out = moela(&[
        "logits",
        "--model",
        fixture("v3-tiny").to_str().unwrap(),
        "--tokens",
        "1,99999",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("99999"));
}

#[test]
fn the_default_model_answers_the_readme_question_with_its_reasoning_apart() {
    // No --model: the shipped models/moela-arith-tiny.
    let out = ok(&["run", "--prompt", "What is 457 + 389?"]);
    let (reasoning, answer) = out
        .split_once("</think>")
        .unwrap_or_else(|| panic!("no reasoning block: {out:?}"));
    assert!(reasoning.starts_with("<think>\n"), "{out:?}");
    assert!(reasoning.contains("ones: 7 + 9 = 16"), "{out:?}");
    assert_eq!(answer.trim(), "The answer is 846.", "{out:?}");
    // burn's CPU backend runs the same model to the same greedy text.
    assert_eq!(ok(&["run", "--device", "cpu", "--prompt", "What is 457 + 389?"]), out);
}

#[test]
fn eval_reports_every_split() {
    let report = json(&ok(&["eval", "--device", "cpu", "--problems", "4"]));
    let splits = report["splits"].as_array().expect("splits");
    let names: Vec<&str> = splits.iter().map(|s| s["split"].as_str().unwrap()).collect();
    assert_eq!(names, ["add_3digit", "sub_3digit", "word_problems", "add_4digit"]);
    for s in splits {
        assert_eq!(s["problems"], 4);
        let acc = s["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{s}");
        assert_eq!(s["correct"].as_u64().unwrap() as f64 / 4.0, acc);
    }
    assert!(report["generated_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn info_reads_a_gguf_header_and_run_runs_a_whole_gguf_model() {
    let file = fixture("gguf/tiny.gguf");
    let path = file.to_str().unwrap();
    let out = json(&ok(&["info", "--model", path, "--json"]));
    assert_eq!(out["architecture"], "deepseek2");
    assert_eq!(out["tensors"], 5);
    assert_eq!(out["metadata"]["test.i16"], -30000);
    assert_eq!(out["metadata"]["test.array_str"]["array"], 3);
    let types: Vec<&str> = out["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["F32", "F16", "Q4_K", "Q8_0"], "the most bytes first");
    let text = ok(&["info", "--model", path]);
    assert!(text.contains("Q4_K") && text.contains("deepseek2"), "{text}");
    // The metadata's model is the HF fixture's: the same parameter counts and cache.
    let gguf = json(&ok(&[
        "info",
        "--model",
        fixture("gguf/v3-tiny.gguf").to_str().unwrap(),
        "--json",
    ]));
    let hf = json(&ok(&[
        "info",
        "--model",
        fixture("v3-tiny").to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(gguf["model"]["architecture"], "deepseek_v3");
    for field in ["total_parameters", "active_parameters_per_token", "cache"] {
        assert_eq!(gguf["model"][field], hf[field], "{field}");
    }
    assert!(out["model_error"].as_str().unwrap().contains("rope.dimension_count"));
    // That file is a header without a whole model: run names what is missing.
    let run = moela(&["run", "--model", path, "--prompt", "hi", "--device", "cpu"]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("rope.dimension_count") && err.contains("tiny.gguf"),
        "{err}"
    );
    // A whole one runs, its weights stored in the format nearest the file's main type.
    let q8_0 = fixture("gguf/v2-lite-tiny.q8_0.gguf");
    let run = moela(&[
        "run",
        "--model",
        q8_0.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "4",
    ]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("holds mostly Q8_0") && err.contains("as q8"), "{err}");
}

#[test]
fn without_a_gpu_driver_run_falls_back_to_the_cpu_and_mesa_stays_quiet() {
    // No Vulkan driver at all (the loader is pointed at none), and no XDG_RUNTIME_DIR.
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_moela"))
            .args(["run", "--prompt", "What is 2 + 2?", "--max-tokens", "8"])
            .args(extra)
            .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
            .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
            .env_remove("XDG_RUNTIME_DIR")
            .output()
            .expect("moela runs")
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("no GPU adapter, so this runs on the CPU"), "{err}");
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
    assert!(!out.stdout.is_empty());
    // Asked for the GPU explicitly, it says what is missing instead.
    let out = run(&["--device", "gpu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no usable GPU adapter"), "{err}");
}
