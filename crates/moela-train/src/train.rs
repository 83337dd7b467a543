//! The model, its losses and the two training stages, all on the engine's own model definition
//! (`moela::model`) with burn's autodiff.

use std::sync::Arc;

use anyhow::{Context, Result};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use half::bf16;
use moela::WeightDtype;
use moela::load::{WeightFile, WeightSet};
use moela::model::transformer::{FeedForward, Transformer};
use moela::{CheckpointFiles, Engine, GenerateOptions, LoadOptions, ModelConfig, SamplingOptions, SessionOptions};
use moela_tools::arith::{self, Problem};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde::Serialize;

use crate::corpus::{self, Batch, Example, ProblemStream};
use crate::optim::{AdamW, require_grads};

/// The model's shape: DeepSeek-V3 in miniature (q_lora, MLA latent cache, sigmoid noaux_tc routing over 8
/// experts in 4 groups, one shared expert, a dense first layer).
pub fn model_config(vocab_size: usize, bos: u32, eos: u32) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "routed_scaling_factor": 1.0,
        "kv_lora_rank": 64,
        "q_lora_rank": 96,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "topk_method": "noaux_tc",
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": true,
        "scoring_func": "sigmoid",
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_interleave": true,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "tie_word_embeddings": false,
        "use_cache": true,
        "torch_dtype": "bfloat16"
    })
}

/// Loads checkpoint files as a trainable model on `device` (an autodiff device): embedding on the device,
/// every tensor tracked.
pub fn trainable(files: &CheckpointFiles, device: &Device) -> Result<Transformer> {
    let config = ModelConfig::from_json_bytes(&files.config, "config.json")?;
    let set = WeightSet::open_blocking(files.weights.clone())?;
    let mut model = pollster::block_on(Transformer::load(
        config,
        &set,
        WeightDtype::F32,
        moela::Kernels::default(),
        device,
        &mut |_| {},
    ))?;
    model.embedding_on_device();
    require_grads(&mut model);
    Ok(model)
}

/// The model's tensors as a safetensors file: bf16 (what ships) or f32 (exact, for the next stage).
pub fn safetensors_bytes(model: &Transformer, bf16_weights: bool) -> Result<Vec<u8>> {
    let tensors = pollster::block_on(model.export())?;
    let encoded: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = tensors
        .into_iter()
        .map(|(name, shape, values)| {
            // The router's correction bias stays f32, as DeepSeek-V3 stores it.
            if bf16_weights && !name.ends_with("e_score_correction_bias") {
                let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
                (name, shape, bytemuck::cast_slice(&v).to_vec(), Dtype::BF16)
            } else {
                (name, shape, bytemuck::cast_slice(&values).to_vec(), Dtype::F32)
            }
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(n, s, b, d)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// An in-memory checkpoint of `model` (f32) with the given config and tokenizer files.
pub fn checkpoint(model: &Transformer, base: &CheckpointFiles, bf16_weights: bool) -> Result<CheckpointFiles> {
    Ok(CheckpointFiles {
        weights: vec![WeightFile::from_bytes(
            "model.safetensors",
            safetensors_bytes(model, bf16_weights)?,
        )],
        ..base.clone()
    })
}

/// Mean negative log-likelihood of `batch`'s learned positions, and the number of them.
fn sft_loss(model: &Transformer, batch: &Batch) -> Result<(Tensor<1>, Vec<Tensor<2, Int>>)> {
    let device = &model.device;
    let (logits, routing) = model.forward_batch(&batch.ids, batch.b, batch.t)?;
    let n = batch.b * batch.t;
    let lp = log_softmax(logits, 1);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(batch.targets.clone(), [n, 1]), device);
    let picked = lp.gather(1, targets).reshape([n]);
    let mask = Tensor::<1>::from_data(TensorData::new(batch.mask.clone(), [n]), device);
    let count = batch.mask.iter().sum::<f32>().max(1.0);
    Ok((-(picked * mask).sum().div_scalar(count), routing))
}

/// Expert loads per MoE layer (tokens routed to each expert, counting only learned positions).
fn loads(routing: &[Tensor<2, Int>], mask: &[f32], experts: usize) -> Result<Vec<Vec<f64>>> {
    routing
        .iter()
        .map(|idx| {
            let [n, k] = idx.dims();
            let data = idx.clone().into_data();
            let ids: Vec<i64> = data.iter::<i64>().collect();
            let mut load = vec![0f64; experts];
            for row in 0..n {
                if mask.get(row).copied().unwrap_or(1.0) > 0.0 {
                    for &e in &ids[row * k..(row + 1) * k] {
                        load[e as usize] += 1.0;
                    }
                }
            }
            Ok(load)
        })
        .collect()
}

/// How uneven expert loads are: the busiest expert's load over the mean, averaged over layers (1 is even).
pub fn spread(loads: &[Vec<f64>]) -> f64 {
    let per_layer: Vec<f64> = loads
        .iter()
        .map(|l| {
            let mean = l.iter().sum::<f64>() / l.len() as f64;
            let max = l.iter().copied().fold(0.0, f64::max);
            if mean > 0.0 { max / mean } else { 1.0 }
        })
        .collect();
    per_layer.iter().sum::<f64>() / per_layer.len().max(1) as f64
}

/// DeepSeek-V3's auxiliary-loss-free balancing: each expert's `e_score_correction_bias` moves by `gamma`
/// towards the mean load (up when under-loaded, down when over-loaded).
fn balance(model: &mut Transformer, loads: &[Vec<f64>], gamma: f32) -> Result<()> {
    let device = model.device.clone();
    let mut layer = 0;
    for b in &mut model.blocks {
        if let FeedForward::Moe(m) = &mut b.ffn {
            let load = &loads[layer];
            layer += 1;
            let mean = load.iter().sum::<f64>() / load.len() as f64;
            let bias = m
                .correction_bias
                .clone()
                .context("noaux_tc model without a correction bias")?;
            let mut values: Vec<f32> = bias
                .into_data()
                .try_to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            for (v, &l) in values.iter_mut().zip(load) {
                *v += gamma * (mean - l).signum() as f32 * f32::from(mean != l);
            }
            let n = values.len();
            m.correction_bias = Some(Tensor::from_data(TensorData::new(values, [n]), &device));
        }
    }
    Ok(())
}

/// Sets every correction bias to `values` (per MoE layer), or zero.
pub fn set_biases(model: &mut Transformer, values: Option<&[Vec<f32>]>) {
    let device = model.device.clone();
    let mut layer = 0;
    for b in &mut model.blocks {
        if let FeedForward::Moe(m) = &mut b.ffn {
            let e = m.experts;
            let v = values.map(|v| v[layer].clone()).unwrap_or_else(|| vec![0.0; e]);
            layer += 1;
            m.correction_bias = Some(Tensor::from_data(TensorData::new(v, [e]), &device));
        }
    }
}

/// The correction biases per MoE layer.
pub fn biases(model: &Transformer) -> Vec<Vec<f32>> {
    model
        .blocks
        .iter()
        .filter_map(|b| match &b.ffn {
            FeedForward::Moe(m) => m.correction_bias.clone(),
            FeedForward::Dense(_) => None,
        })
        .map(|t| t.into_data().try_to_vec::<f32>().unwrap_or_default())
        .collect()
}

/// Learning rate: linear warm-up, then cosine decay to 10%.
fn lr_at(step: usize, total: usize, peak: f64, warmup: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let p = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

/// Settings of both stages.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Seed of data, initialisation and sampling.
    pub seed: u64,
    /// SFT optimiser steps.
    pub sft_steps: usize,
    /// Sequences per SFT step.
    pub sft_batch: usize,
    /// SFT peak learning rate.
    pub sft_lr: f64,
    /// GRPO steps.
    pub grpo_steps: usize,
    /// Prompts per GRPO step.
    pub grpo_prompts: usize,
    /// Completions sampled per prompt (the group).
    pub grpo_group: usize,
    /// GRPO learning rate.
    pub grpo_lr: f64,
    /// KL penalty weight to the SFT model.
    pub kl_beta: f64,
    /// Sampling temperature of GRPO rollouts.
    pub temperature: f32,
    /// Step of the balancing bias update.
    pub bias_gamma: f32,
}

/// A line of the training log.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// Stage: "sft" or "grpo".
    pub stage: &'static str,
    /// Step.
    pub step: usize,
    /// Loss (SFT: mean NLL; GRPO: policy loss with KL).
    pub loss: f64,
    /// GRPO: mean reward of the rollouts.
    pub reward: Option<f64>,
    /// Expert load spread (max / mean) in this step's batch.
    pub load_spread: f64,
    /// Seconds since the stage began.
    pub seconds: f64,
}

/// Stage 1: supervised fine-tuning on generated worked solutions.
pub fn sft(
    model: &mut Transformer,
    tok: &moela::Tokenizer,
    stream: &mut ProblemStream,
    s: &Settings,
    log: &mut Vec<LogLine>,
) -> Result<()> {
    let eos = tok.eos_id().context("tokenizer without eos")?;
    let experts = model.config.n_routed_experts;
    let mut opt = AdamW::new();
    let start = std::time::Instant::now();
    let (mut acc_loss, mut acc_spread, mut acc_n) = (0.0, 0.0, 0usize);
    // Batches of similar lengths (drawn 8 at a time, sorted), so little of a step is padding.
    let mut queue: Vec<Vec<Example>> = Vec::new();
    let mut order_rng = ChaCha8Rng::seed_from_u64(s.seed ^ 0x5F7);
    for step in 0..s.sft_steps {
        if queue.is_empty() {
            let mut pool = (0..8 * s.sft_batch)
                .map(|_| corpus::example(tok, &stream.next_problem(), eos))
                .collect::<Result<Vec<Example>>>()?;
            pool.sort_by_key(|e| e.ids.len());
            queue = pool.chunks(s.sft_batch).map(|c| c.to_vec()).collect();
            queue.shuffle(&mut order_rng);
        }
        let examples = queue.pop().expect("refilled above");
        let batch = Batch::new(&examples, eos);
        let (loss, routing) = sft_loss(model, &batch)?;
        let grads = loss.backward();
        let loss_value = f64::from(loss.into_scalar::<f32>());
        let lr = lr_at(step, s.sft_steps, s.sft_lr, s.sft_steps / 20 + 1);
        opt.step(model, &grads, lr, 1.0);
        let l = loads(&routing, &batch.mask, experts)?;
        balance(model, &l, s.bias_gamma)?;
        acc_loss += loss_value;
        acc_spread += spread(&l);
        acc_n += 1;
        if (step + 1) % 25 == 0 || step + 1 == s.sft_steps {
            let line = LogLine {
                stage: "sft",
                step: step + 1,
                loss: acc_loss / acc_n as f64,
                reward: None,
                load_spread: acc_spread / acc_n as f64,
                seconds: start.elapsed().as_secs_f64(),
            };
            log::info!(
                "sft step {}/{}: loss {:.4}, lr {:.2e}, load spread {:.2}, {:.0}s",
                line.step,
                s.sft_steps,
                line.loss,
                lr,
                line.load_spread,
                line.seconds
            );
            log.push(line);
            (acc_loss, acc_spread, acc_n) = (0.0, 0.0, 0);
        }
    }
    Ok(())
}

/// Rule-based reward: 1 for the exact answer, plus 0.2 for a well-formed think/answer layout.
pub fn reward(g: &arith::Graded) -> f64 {
    f64::from(u8::from(g.correct)) + 0.2 * f64::from(u8::from(g.well_formed))
}

/// Stage 2: GRPO (rollouts and the reference model on `device`, without autodiff). Per step, `grpo_prompts` problems, `grpo_group` sampled completions each, advantages
/// normalised within each group, policy-gradient loss per token plus `kl_beta` times the k3 estimate of
/// KL(policy || SFT model).
pub fn grpo(
    model: &mut Transformer,
    reference: &Transformer,
    base: &CheckpointFiles,
    device: &Device,
    stream: &mut ProblemStream,
    s: &Settings,
    log: &mut Vec<LogLine>,
) -> Result<()> {
    let cpu = device.clone();
    let mut opt = AdamW::new();
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed ^ 0x6770);
    let experts = model.config.n_routed_experts;
    let start = std::time::Instant::now();
    for step in 0..s.grpo_steps {
        // Rollouts with the current policy, on an inference copy of it.
        let engine = Arc::new(pollster::block_on(Engine::load(
            checkpoint(model, base, false)?,
            LoadOptions::default(),
            &cpu,
            &mut |_| {},
        ))?);
        let tok = engine.require_tokenizer()?;
        let eos_text = tok.eos_token().unwrap_or("").to_string();
        let mut session = engine.session(SessionOptions { max_context: 1024 })?;
        let mut seqs: Vec<(Example, f64)> = Vec::new();
        let mut rewards_all = Vec::new();
        for _ in 0..s.grpo_prompts {
            let p: Problem = stream.next_hard_problem();
            let mut group = Vec::with_capacity(s.grpo_group);
            for _ in 0..s.grpo_group {
                let options = GenerateOptions {
                    sampling: SamplingOptions {
                        temperature: s.temperature,
                        seed: rng.random(),
                        ..SamplingOptions::default()
                    },
                    max_tokens: 400,
                    ..GenerateOptions::default()
                };
                let (generated, stopped) = arith::ask(&mut session, &p.question, options)?;
                let g = arith::grade_raw(&p, &tok.decode(&generated, false)?, &eos_text, stopped);
                let mut ids = corpus::prompt_ids(tok, &p.question)?;
                let prompt_len = ids.len();
                ids.extend(generated);
                group.push((Example { ids, prompt_len }, reward(&g)));
            }
            let rs: Vec<f64> = group.iter().map(|g| g.1).collect();
            let mean = rs.iter().sum::<f64>() / rs.len() as f64;
            let sd = (rs.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rs.len() as f64).sqrt();
            rewards_all.extend(rs.iter().copied());
            if sd < 1e-6 {
                continue; // no signal in a group where every completion scored the same
            }
            seqs.extend(group.into_iter().map(|(e, r)| (e, (r - mean) / (sd + 1e-4))));
        }
        let mean_reward = rewards_all.iter().sum::<f64>() / rewards_all.len().max(1) as f64;
        if seqs.is_empty() {
            log::info!(
                "grpo step {}: every group uniform (mean reward {mean_reward:.3}), no update",
                step + 1
            );
            continue;
        }
        seqs.shuffle(&mut rng);
        let examples: Vec<Example> = seqs.iter().map(|s| s.0.clone()).collect();
        let pad = model.config.eos_token_id.unwrap_or(0);
        let batch = Batch::new(&examples, pad);
        let n = batch.b * batch.t;
        // Per-position advantage on the learned positions.
        let adv: Vec<f32> = (0..n).map(|i| batch.mask[i] * seqs[i / batch.t].1 as f32).collect();
        let count = batch.mask.iter().sum::<f32>().max(1.0);

        let targets = Tensor::<2, Int>::from_data(TensorData::new(batch.targets.clone(), [n, 1]), &cpu);
        let (ref_logits, _) = reference.forward_batch(&batch.ids, batch.b, batch.t)?;
        let ref_lp = log_softmax(ref_logits, 1).gather(1, targets).reshape([n]);
        let ref_lp: Vec<f32> = ref_lp
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;

        let device = model.device.clone();
        let (logits, routing) = model.forward_batch(&batch.ids, batch.b, batch.t)?;
        let targets = Tensor::<2, Int>::from_data(TensorData::new(batch.targets.clone(), [n, 1]), &device);
        let lp = log_softmax(logits, 1).gather(1, targets).reshape([n]);
        let mask = Tensor::<1>::from_data(TensorData::new(batch.mask.clone(), [n]), &device);
        let adv = Tensor::<1>::from_data(TensorData::new(adv, [n]), &device);
        let ref_lp = Tensor::<1>::from_data(TensorData::new(ref_lp, [n]), &device);
        let diff = ref_lp - lp.clone();
        let kl = diff.clone().exp() - diff - 1.0;
        let loss = (-(lp * adv) + kl.mul_scalar(s.kl_beta) * mask).sum().div_scalar(count);
        let grads = loss.backward();
        let loss_value = f64::from(loss.into_scalar::<f32>());
        opt.step(model, &grads, s.grpo_lr, 1.0);
        let l = loads(&routing, &batch.mask, experts)?;
        balance(model, &l, s.bias_gamma)?;
        let line = LogLine {
            stage: "grpo",
            step: step + 1,
            loss: loss_value,
            reward: Some(mean_reward),
            load_spread: spread(&l),
            seconds: start.elapsed().as_secs_f64(),
        };
        log::info!(
            "grpo step {}/{}: mean reward {:.3}, loss {:.4}, {} sequences, {:.0}s",
            line.step,
            s.grpo_steps,
            mean_reward,
            loss_value,
            batch.b,
            line.seconds
        );
        log.push(line);
    }
    Ok(())
}

/// Expert load spread of `model` on `problems`' worked solutions, with its correction biases as they are.
pub fn measure_spread(model: &Transformer, tok: &moela::Tokenizer, problems: &[Problem]) -> Result<f64> {
    let eos = tok.eos_id().context("tokenizer without eos")?;
    let examples = problems
        .iter()
        .map(|p| corpus::example(tok, p, eos))
        .collect::<Result<Vec<_>>>()?;
    let batch = Batch::new(&examples, eos);
    let (_, routing) = model.forward_batch(&batch.ids, batch.b, batch.t)?;
    Ok(spread(&loads(&routing, &batch.mask, model.config.n_routed_experts)?))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn sft_steps_lower_the_loss_and_balancing_moves_the_bias() {
        let mut stream = ProblemStream::new(1, HashSet::new());
        let texts: Vec<String> = (0..300).map(|_| stream.next_problem().completion()).collect();
        let tokenizer = corpus::train_tokenizer(&texts, 300).unwrap();
        let tok =
            moela::Tokenizer::from_bytes(tokenizer.as_bytes(), Some(corpus::tokenizer_config().as_bytes())).unwrap();
        let (bos, eos) = (tok.bos_id().unwrap(), tok.eos_id().unwrap());
        let config = model_config(tok.vocab_size().div_ceil(64) * 64, bos, eos).to_string();
        let mut base = moela_tools::preset::random_files(config, 7, 0.02).unwrap();
        base.tokenizer = Some(tokenizer.into_bytes());
        base.tokenizer_config = Some(corpus::tokenizer_config().into_bytes());
        let mut model = trainable(&base, &moela::cpu_device().autodiff()).unwrap();
        set_biases(&mut model, None);

        let fixed: Vec<Example> = (0..4)
            .map(|_| corpus::example(&tok, &stream.next_problem(), eos).unwrap())
            .collect();
        let probe = Batch::new(&fixed, eos);
        let before = sft_loss(&model, &probe).unwrap().0.into_scalar::<f32>();
        let settings = Settings {
            seed: 0,
            sft_steps: 30,
            sft_batch: 8,
            sft_lr: 3e-3,
            grpo_steps: 0,
            grpo_prompts: 0,
            grpo_group: 0,
            grpo_lr: 0.0,
            kl_beta: 0.0,
            temperature: 1.0,
            bias_gamma: 1e-3,
        };
        let mut log = Vec::new();
        sft(&mut model, &tok, &mut stream, &settings, &mut log).unwrap();
        let after = sft_loss(&model, &probe).unwrap().0.into_scalar::<f32>();
        assert!(after < 0.7 * before, "loss {before} -> {after}");
        assert!(!log.is_empty());
        let moved = biases(&model).iter().flatten().filter(|b| b.abs() > 0.0).count();
        assert!(moved > 0, "the balancing bias never moved");

        // What ships is what was trained: the saved checkpoint reloads to the same logits.
        let files = checkpoint(&model, &base, false).unwrap();
        let reloaded = trainable(&files, &moela::cpu_device().autodiff()).unwrap();
        let a = model.forward_batch(&probe.ids, probe.b, probe.t).unwrap().0.into_data();
        let b = reloaded
            .forward_batch(&probe.ids, probe.b, probe.t)
            .unwrap()
            .0
            .into_data();
        a.assert_approx_eq::<f32>(&b, burn::tensor::Tolerance::absolute(1e-4));
    }
}
