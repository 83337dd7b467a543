//! `moela-train`: trains moela's embedded default model from nothing but a seed.
//!
//! 1. generates arithmetic problems with worked solutions (`moela_tools::arith`), holding out the evaluation sets;
//! 2. trains a byte-level BPE tokenizer on them (R1's special tokens, R1-style chat template);
//! 3. initialises a tiny DeepSeek-V3 (MLA + DeepSeekMoE) and trains it with burn's autodiff on the engine's
//!    own model definition: SFT, then GRPO with rule-based rewards and a KL penalty to the SFT model, while
//!    the routers' correction biases balance expert load the DeepSeek-V3 way;
//! 4. evaluates after each stage and writes an HF folder with a model card.

mod card;
mod corpus;
mod optim;
mod train;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use burn::tensor::Device;
use clap::Parser;
use moela::{CheckpointFiles, Engine, LoadOptions, ModelInfo, Tokenizer};
use moela_tools::arith::{self, Report};

use crate::corpus::ProblemStream;
use crate::train::Settings;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Train moela's embedded default model (tiny DeepSeek-V3 arithmetic reasoner)"
)]
struct Args {
    /// Output folder (an HF checkpoint folder with a model card).
    #[arg(long, default_value = "models/moela-arith-tiny")]
    out: PathBuf,
    /// Seed of everything: data, tokenizer corpus, initial weights, sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// SFT optimiser steps.
    #[arg(long, default_value_t = 2400)]
    sft_steps: usize,
    /// Sequences per SFT step.
    #[arg(long, default_value_t = 32)]
    sft_batch: usize,
    /// SFT peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    sft_lr: f64,
    /// GRPO steps (0 skips the stage).
    #[arg(long, default_value_t = 40)]
    grpo_steps: usize,
    /// Prompts per GRPO step.
    #[arg(long, default_value_t = 16)]
    grpo_prompts: usize,
    /// Completions sampled per prompt.
    #[arg(long, default_value_t = 8)]
    grpo_group: usize,
    /// GRPO learning rate.
    #[arg(long, default_value_t = 3e-5)]
    grpo_lr: f64,
    /// KL penalty weight.
    #[arg(long, default_value_t = 0.04)]
    kl_beta: f64,
    /// Held-out problems per evaluation split.
    #[arg(long, default_value_t = 200)]
    eval_problems: usize,
    /// Tokenizer vocabulary size.
    #[arg(long, default_value_t = 512)]
    vocab: usize,
    /// Also write the model as it is after SFT (f32 weights, with `sft.json`: its log and timing) to this
    /// folder, for `--from-sft`.
    #[arg(long)]
    save_sft: Option<PathBuf>,
    /// Skip SFT: start GRPO from a folder written by `--save-sft` (tokenizer and config come from there).
    #[arg(long, conflicts_with = "save_sft")]
    from_sft: Option<PathBuf>,
    /// Where to train: cpu (burn's CPU backend) or gpu (wgpu). On a machine without a GPU, cpu is several
    /// times faster than lavapipe for this model.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "gpu"])]
    device: String,
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let started = std::time::Instant::now();
    let settings = Settings {
        seed: args.seed,
        sft_steps: args.sft_steps,
        sft_batch: args.sft_batch,
        sft_lr: args.sft_lr,
        grpo_steps: args.grpo_steps,
        grpo_prompts: args.grpo_prompts,
        grpo_group: args.grpo_group,
        grpo_lr: args.grpo_lr,
        kl_beta: args.kl_beta,
        temperature: 1.0,
        bias_gamma: 1e-3,
    };

    let plain = match args.device.as_str() {
        "gpu" => moela::default_device()?,
        _ => moela::cpu_device(),
    };
    let device = plain.clone().autodiff();
    let held_out = arith::held_out_keys(args.eval_problems.max(200));
    let mut spread_probe = ProblemStream::new(args.seed ^ 0x5B8E, held_out.clone());
    let probe: Vec<_> = (0..64).map(|_| spread_probe.next_problem()).collect();

    // Stage 1 (or its saved result).
    let (base, tok, mut model, sft_record) = match &args.from_sft {
        Some(dir) => {
            let base = CheckpointFiles::read_dir(dir)?;
            let tok = tokenizer_of(&base)?;
            let record: serde_json::Value = serde_json::from_slice(
                &std::fs::read(dir.join("sft.json")).with_context(|| format!("reading {}/sft.json", dir.display()))?,
            )
            .with_context(|| format!("parsing {}/sft.json", dir.display()))?;
            let model = train::trainable(&base, &device)?;
            log::info!("starting from the SFT model in {}", dir.display());
            (base, tok, model, record)
        }
        None => {
            let mut corpus_stream = ProblemStream::new(args.seed ^ 0xC0FF, held_out.clone());
            let texts: Vec<String> = (0..20_000)
                .map(|_| {
                    let p = corpus_stream.next_problem();
                    format!("{}\n{}", p.question, p.completion())
                })
                .collect();
            let tokenizer_json = corpus::train_tokenizer(&texts, args.vocab)?;
            let tokenizer_config = corpus::tokenizer_config();
            let tok = Tokenizer::from_bytes(tokenizer_json.as_bytes(), Some(tokenizer_config.as_bytes()))?;
            let (bos, eos) = (tok.bos_id().context("no bos")?, tok.eos_id().context("no eos")?);
            let vocab = tok.vocab_size().div_ceil(64) * 64;
            log::info!("tokenizer: {} tokens (vocab_size {vocab})", tok.vocab_size());
            let config = serde_json::to_string_pretty(&train::model_config(vocab, bos, eos))?;
            let mut base = moela_tools::preset::random_files(config, args.seed, 0.02)?;
            base.tokenizer = Some(tokenizer_json.into_bytes());
            base.tokenizer_config = Some(tokenizer_config.into_bytes());

            let mut model = train::trainable(&base, &device)?;
            train::set_biases(&mut model, None);
            let spread_init = train::measure_spread(&model, &tok, &probe)?;
            let mut stream = ProblemStream::new(args.seed, held_out.clone());
            let mut log = Vec::new();
            let t_sft = std::time::Instant::now();
            train::sft(&mut model, &tok, &mut stream, &settings, &mut log)?;
            let record = serde_json::json!({
                "seconds": t_sft.elapsed().as_secs_f64(),
                "spread_at_init": spread_init,
                "log": log,
            });
            if let Some(dir) = &args.save_sft {
                write_folder(dir, &train::checkpoint(&model, &base, false)?)?;
                std::fs::write(dir.join("sft.json"), serde_json::to_string_pretty(&record)?)?;
                log::info!("wrote the SFT model to {}", dir.display());
            }
            (base, tok, model, record)
        }
    };
    let info = ModelInfo::new(
        &moela::ModelConfig::from_json_bytes(&base.config, "config.json")?,
        moela::WeightDtype::F32,
    );
    let sft_files = train::checkpoint(&model, &base, false)?;
    let eval_sft = evaluate(
        train::checkpoint(&model, &base, true)?,
        args.eval_problems,
        &plain,
        "after SFT",
    )?;

    // Stage 2.
    let mut log = Vec::new();
    let t_grpo = std::time::Instant::now();
    if args.grpo_steps > 0 {
        let set = moela::load::WeightSet::open_blocking(sft_files.weights.clone())?;
        let cfg = moela::ModelConfig::from_json_bytes(&sft_files.config, "config.json")?;
        let reference = pollster::block_on(moela::model::transformer::Transformer::load(
            cfg,
            &set,
            moela::WeightDtype::F32,
            moela::Kernels::default(),
            &plain,
            &mut |_| {},
        ))?;
        let mut prompts = ProblemStream::new(args.seed ^ 0x6770, held_out);
        train::grpo(&mut model, &reference, &base, &plain, &mut prompts, &settings, &mut log)?;
    }
    let grpo_seconds = t_grpo.elapsed().as_secs_f64();
    let sft_seconds = sft_record["seconds"].as_f64().unwrap_or(0.0);
    let spread_init = sft_record["spread_at_init"].clone();
    // A run resumed from a saved SFT model counts the SFT stage it did not repeat.
    let earlier = if args.from_sft.is_some() { sft_seconds } else { 0.0 };
    let mut full_log = sft_record["log"].as_array().cloned().unwrap_or_default();
    full_log.extend(log.iter().map(serde_json::to_value).collect::<Result<Vec<_>, _>>()?);

    // Balance: with the learned biases versus the router alone.
    let learned = train::biases(&model);
    let spread_balanced = train::measure_spread(&model, &tok, &probe)?;
    train::set_biases(&mut model, None);
    let spread_unbalanced = train::measure_spread(&model, &tok, &probe)?;
    train::set_biases(&mut model, Some(&learned));

    let shipped = train::checkpoint(&model, &base, true)?;
    let eval_final = evaluate(shipped.clone(), args.eval_problems, &plain, "final")?;
    write_folder(&args.out, &shipped)?;
    let summary = serde_json::json!({
        "settings": settings,
        "device": args.device,
        "tokenizer_vocab": tok.vocab_size(),
        "parameters": {"total": info.total_parameters, "active_per_token": info.active_parameters_per_token},
        "seconds": {"sft": sft_seconds, "grpo": grpo_seconds, "total": started.elapsed().as_secs_f64() + earlier},
        "resumed_from_saved_sft": args.from_sft.is_some(),
        "expert_load_spread": {
            "at_init": spread_init,
            "after_training_router_alone": spread_unbalanced,
            "after_training_with_bias": spread_balanced,
        },
        "eval_after_sft": eval_sft,
        "eval_final": eval_final,
        "log": full_log,
    });
    std::fs::write(args.out.join("training.json"), serde_json::to_string_pretty(&summary)?)?;
    std::fs::write(
        args.out.join("README.md"),
        card::model_card(
            &summary,
            &info,
            &eval_sft,
            &eval_final,
            std::fs::metadata(args.out.join("model.safetensors"))?.len(),
        ),
    )?;
    log::info!(
        "wrote {} in {:.0}s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({"eval_after_sft": eval_sft, "eval_final": eval_final}))?
    );
    Ok(())
}

/// Greedy evaluation of a checkpoint on `device`.
fn evaluate(files: CheckpointFiles, per_split: usize, device: &Device, what: &str) -> Result<Report> {
    let engine = Arc::new(pollster::block_on(Engine::load(
        files,
        LoadOptions::default(),
        device,
        &mut |_| {},
    ))?);
    let report = arith::evaluate(&engine, per_split, 400, &mut |_, _, _| {})?;
    for s in &report.splits {
        log::info!(
            "eval {what}: {} accuracy {:.3}, format {:.3}",
            s.split,
            s.accuracy,
            s.format_compliance
        );
    }
    Ok(report)
}

/// The tokenizer of checkpoint files that carry one.
fn tokenizer_of(files: &CheckpointFiles) -> Result<Tokenizer> {
    let json = files
        .tokenizer
        .as_deref()
        .context("the SFT folder has no tokenizer.json")?;
    Ok(Tokenizer::from_bytes(json, files.tokenizer_config.as_deref())?)
}

fn write_folder(out: &Path, files: &CheckpointFiles) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("config.json"), &files.config)?;
    let weights = files.weights[0].bytes().context("the trained weights are in memory")?;
    std::fs::write(out.join("model.safetensors"), weights)?;
    std::fs::write(
        out.join("tokenizer.json"),
        files.tokenizer.as_deref().unwrap_or_default(),
    )?;
    std::fs::write(
        out.join("tokenizer_config.json"),
        files.tokenizer_config.as_deref().unwrap_or_default(),
    )?;
    let config: serde_json::Value = serde_json::from_slice(&files.config)?;
    let generation = serde_json::json!({
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["eos_token_id"],
        "do_sample": false,
        "max_new_tokens": 400,
    });
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)?,
    )?;
    Ok(())
}
