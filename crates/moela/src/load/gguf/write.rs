//! Writing a model as a GGUF file the way llama.cpp's converter (`convert_hf_to_gguf.py`,
//! `DeepseekV2Model`) writes it, so that llama.cpp and every tool built on it read it (`moela quantize`): the
//! same metadata keys, tensor names and layouts (stacked routed experts, `kv_b_proj` split into `attn_k_b` /
//! `attn_v_b`), the same choice of type per tensor (norms, 1-D tensors, the router and non-`.weight` tensors
//! in F32; a matrix whose rows are not whole blocks of the chosen type in F16) and the same rounding.
//!
//! Memory stays bounded: the header is written from the shapes alone, then each tensor, and a large one a
//! slice of rows at a time, is read, converted and written.

use std::io::Write;
use std::path::Path;

use serde_json::Value as Json;

use super::names::{BLOCK_NAMES, EXPERT_NAMES};
use super::vocab::{CONTROL, NORMAL, PRE_TOKENIZERS, UNUSED, USER_DEFINED};
use super::{GgmlType, Value};
use crate::config::{ModelConfig, ScoringFunc};
use crate::error::{Error, Result};
use crate::gpu::ggml::encode;
use crate::load::{CheckpointFiles, Progress, WeightSet};

/// Data alignment (llama.cpp's default).
const ALIGNMENT: u64 = 32;

/// Rows read per slice of a large tensor: about this many f32 bytes.
const SLICE_BYTES: usize = 64 << 20;

/// llama.cpp's file type id (`general.file_type`) for a file mostly of `ty`.
fn file_type(ty: GgmlType) -> Option<u32> {
    Some(match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q8_0 => 7,
        // MOSTLY_Q4_K_S / MOSTLY_Q5_K_S: Q4_K / Q5_K, with Q5_0 where rows are not whole super-blocks.
        GgmlType::Q4_K => 14,
        GgmlType::Q5_K => 16,
        // MOSTLY_Q6_K: Q6_K, with Q8_0 where rows are not whole super-blocks.
        GgmlType::Q6_K => 18,
        GgmlType::BF16 => 32,
        _ => return None,
    })
}

/// Where a tensor's values come from.
enum Source {
    /// An HF tensor as it is.
    Whole(String),
    /// Layer `l`'s routed experts' `proj` matrices, stacked.
    Experts(usize, &'static str),
    /// Layer `l`'s `kv_b_proj`, each head's key rows transposed (`attn_k_b`).
    KeyB(usize),
    /// Layer `l`'s `kv_b_proj`, each head's value rows (`attn_v_b`).
    ValueB(usize),
}

/// One tensor of the file.
struct Planned {
    name: String,
    /// ggml order, innermost first.
    dims: Vec<u64>,
    ty: GgmlType,
    source: Source,
}

impl Planned {
    fn bytes(&self) -> u64 {
        self.ty
            .bytes_of(self.dims.iter().product())
            .expect("planned in whole blocks")
    }
}

/// The type llama.cpp's converter gives a tensor named `name` with ggml dims `dims` in a file of `ty`. For
/// the K-quants Q4_K and Q5_K, which the converter does not write, llama.cpp's quantiser's choices: Q5_0 for
/// rows that are not whole super-blocks (V2-Lite's 1408-wide expert rows; for Q5_K llama.cpp takes Q5_1,
/// which moela does not write); the output head, which it stores in Q6_K, is Q8_0 here. Q6_K falls back to
/// Q8_0, as there.
fn type_for(name: &str, dims: &[u64], ty: GgmlType) -> GgmlType {
    if dims.len() <= 1 || name.ends_with("_norm.weight") || name.contains("ffn_gate_inp") || !name.ends_with(".weight")
    {
        return GgmlType::F32;
    }
    if ty == GgmlType::Q6_K && ty.bytes_of(dims[0]).is_none() {
        return type_for(name, dims, GgmlType::Q8_0);
    }
    if matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K) {
        let fallback = if name == "output.weight" {
            GgmlType::Q8_0
        } else {
            GgmlType::Q5_0
        };
        if name == "output.weight" || ty.bytes_of(dims[0]).is_none() {
            return type_for(name, dims, fallback);
        }
    }
    if ty.bytes_of(dims[0]).is_some() {
        ty
    } else {
        GgmlType::F16
    }
}

/// Statistics of a written file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of the file.
    pub bytes: u64,
}

/// Writes the model in `files` to `out` as a GGUF file mostly of `ty` (F32, F16, BF16, Q8_0, Q4_0, Q4_K,
/// Q5_K or Q6_K), with its tokenizer and chat template. `name` is the model's name (`general.name`).
pub fn write_gguf(
    files: CheckpointFiles,
    out: &Path,
    ty: GgmlType,
    name: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<Written> {
    let Some(file_type) = file_type(ty) else {
        return Err(Error::InvalidArgument(format!(
            "GGUF type {}: moela writes f32, f16, bf16, q8_0, q4_0, q4_k, q5_k and q6_k",
            ty.name()
        )));
    };
    let config = ModelConfig::from_json_bytes(&files.config, "config.json")?;
    let mut metadata = model_metadata(&config, name, file_type);
    if let Some(t) = &files.tokenizer {
        metadata.extend(tokenizer_metadata(
            t,
            files.tokenizer_config.as_deref(),
            config.vocab_size,
        )?);
    }
    let set = WeightSet::open_blocking(files.weights)?;
    let plan = plan(&config, &set, ty)?;

    // Written under another name and renamed when complete, so that a failure leaves no file that looks whole.
    let part = out.with_file_name(format!(
        "{}.part",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("model.gguf")
    ));
    let io = |e: std::io::Error| Error::Io {
        path: part.clone(),
        source: e,
    };
    let mut write = || -> Result<u64> {
        let mut w = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&part).map_err(io)?);
        let header = header_bytes(&metadata, &plan);
        w.write_all(&header).map_err(io)?;
        let mut written = header.len() as u64;
        let total: u64 = plan.iter().map(Planned::bytes).sum();
        let mut done = 0;
        let mut bytes = Vec::new();
        for t in &plan {
            write_tensor(&set, &config, t, &mut |values: &[f32]| -> Result<()> {
                bytes.clear();
                encode(t.ty, values, &mut bytes);
                w.write_all(&bytes).map_err(io)?;
                written += bytes.len() as u64;
                done += bytes.len() as u64;
                progress(Progress { loaded: done, total });
                Ok(())
            })?;
            let pad = written.next_multiple_of(ALIGNMENT) - written;
            w.write_all(&vec![0u8; pad as usize]).map_err(io)?;
            written += pad;
        }
        w.flush().map_err(io)?;
        Ok(written)
    };
    let written = write().inspect_err(|_| {
        let _ = std::fs::remove_file(&part);
    })?;
    std::fs::rename(&part, out).map_err(|e| Error::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    Ok(Written {
        tensors: plan.len(),
        bytes: written,
    })
}

/// The `deepseek2.*` and `general.*` metadata of `c`, as the converter's `set_gguf_parameters` writes them.
fn model_metadata(c: &ModelConfig, name: &str, file_type: u32) -> Vec<(String, Value)> {
    let u = |v: usize| Value::U32(v as u32);
    let f = |v: f64| Value::F32(v as f32);
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("deepseek2".into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
    ];
    let mut k = |key: &str, v: Value| m.push((format!("deepseek2.{key}"), v));
    k("block_count", u(c.num_hidden_layers));
    k("context_length", u(c.max_position_embeddings));
    k("embedding_length", u(c.hidden_size));
    k("feed_forward_length", u(c.intermediate_size));
    k("attention.head_count", u(c.num_attention_heads));
    // MLA runs as one shared latent "head" in llama.cpp.
    k("attention.head_count_kv", u(1));
    if let Some(y) = &c.yarn {
        k("rope.scaling.type", Value::String("yarn".into()));
        k("rope.scaling.factor", f(y.factor));
        k(
            "rope.scaling.original_context_length",
            u(y.original_max_position_embeddings as usize),
        );
        k("rope.scaling.yarn_beta_fast", f(y.beta_fast));
        k("rope.scaling.yarn_beta_slow", f(y.beta_slow));
    }
    k("rope.freq_base", f(c.rope_theta));
    k("attention.layer_norm_rms_epsilon", f(c.rms_norm_eps));
    k("expert_count", u(c.n_routed_experts));
    k("expert_used_count", u(c.num_experts_per_tok));
    k("expert_group_count", u(c.n_group));
    k("expert_group_used_count", u(c.topk_group));
    let gating = if c.scoring_func == ScoringFunc::Sigmoid { 2 } else { 1 };
    k("expert_gating_func", Value::U32(gating));
    k("attention.key_length", u(c.kv_lora_rank + c.qk_rope_head_dim));
    k("attention.value_length", u(c.kv_lora_rank));
    m.push(("general.file_type".into(), Value::U32(file_type)));
    let mut k = |key: &str, v: Value| m.push((format!("deepseek2.{key}"), v));
    k("leading_dense_block_count", u(c.first_k_dense_replace));
    k("vocab_size", u(c.vocab_size));
    if let Some(r) = c.q_lora_rank {
        k("attention.q_lora_rank", u(r));
    }
    k("attention.kv_lora_rank", u(c.kv_lora_rank));
    k("attention.key_length_mla", u(c.qk_nope_head_dim + c.qk_rope_head_dim));
    k("attention.value_length_mla", u(c.v_head_dim));
    k("expert_feed_forward_length", u(c.moe_intermediate_size));
    k("expert_shared_count", u(c.n_shared_experts));
    k("expert_weights_scale", f(c.routed_scaling_factor));
    if c.norm_topk_prob {
        k("expert_weights_norm", Value::Bool(true));
    }
    k("rope.dimension_count", u(c.qk_rope_head_dim));
    if let Some(all_dim) = c.yarn.as_ref().and_then(|y| y.mscale_all_dim) {
        k("rope.scaling.yarn_log_multiplier", f(0.1 * all_dim));
    }
    m.push(("general.quantization_version".into(), Value::U32(2)));
    m
}

/// The `tokenizer.ggml.*` metadata of an HF `tokenizer.json` (a byte-level BPE with a pre-tokenizer moela
/// knows by name) and `tokenizer_config.json`, padded to `vocab_size` tokens as the converter pads.
fn tokenizer_metadata(tokenizer: &[u8], config: Option<&[u8]>, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let bad = |message: String| Error::Tokenizer {
        file: "tokenizer.json".into(),
        message,
    };
    let t: Json = serde_json::from_slice(tokenizer).map_err(|e| bad(format!("not JSON: {e}")))?;
    let model = &t["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(
            "GGUF's gpt2 tokenizer is a byte-level BPE; this tokenizer is not a BPE".into(),
        ));
    }
    let mut tokens: Vec<Option<(String, u64)>> = vec![None; vocab_size];
    let mut put = |id: u64, text: &str, ty: u64| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            bad(format!(
                "token {text:?} has id {id}, past the vocabulary of {vocab_size}"
            ))
        })?;
        *slot = Some((text.to_string(), ty));
        Ok(())
    };
    for (text, id) in model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is missing".into()))?
    {
        put(
            id.as_u64()
                .ok_or_else(|| bad(format!("token {text:?}: id is not a number")))?,
            text,
            NORMAL,
        )?;
    }
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        // As the converter: special tokens, and added ones that look like control tokens (`<｜User｜>`,
        // `<|...|>`, `<pad>`), are control tokens; other added tokens are user-defined, their `▁` written as
        // spaces.
        let looks_special = text == "<pad>"
            || (text.starts_with("<|") && text.ends_with("|>"))
            || (text.starts_with("<｜") && text.ends_with("｜>"));
        if a["special"].as_bool() == Some(true) || looks_special {
            put(id, text, CONTROL)?;
        } else {
            put(id, &text.replace('▁', " "), USER_DEFINED)?;
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) => Some(format!("{} {}", pair.first()?.as_str()?, pair.get(1)?.as_str()?)),
            _ => None,
        })
        .map(Value::String)
        .collect();
    let splits: Vec<&str> = match t["pre_tokenizer"]["type"].as_str() {
        Some("Sequence") => t["pre_tokenizer"]["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["type"] == "Split")
            .filter_map(|p| p["pattern"]["Regex"].as_str())
            .collect(),
        _ => Vec::new(),
    };
    let pre = PRE_TOKENIZERS
        .iter()
        .find(|(_, rules)| rules.unwrap_or(&[]) == splits.as_slice())
        .map(|(name, _)| *name)
        .ok_or_else(|| {
            bad(format!(
                "its pre-tokenizer's split rules are none of those GGUF names that moela knows ({})",
                PRE_TOKENIZERS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))
        })?;
    let mut m: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
    ];
    let (texts, types): (Vec<Value>, Vec<Value>) = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| match t {
            Some((text, ty)) => (Value::String(text.clone()), Value::I32(*ty as i32)),
            None => (Value::String(format!("[PAD{id}]")), Value::I32(UNUSED as i32)),
        })
        .unzip();
    let id_of = |text: &str| tokens.iter().position(|t| t.as_ref().is_some_and(|(s, _)| s == text));
    m.push(("tokenizer.ggml.tokens".into(), Value::Array(texts)));
    m.push(("tokenizer.ggml.token_type".into(), Value::Array(types)));
    m.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    if let Some(config) = config {
        let c: Json = serde_json::from_slice(config).map_err(|e| Error::Tokenizer {
            file: "tokenizer_config.json".into(),
            message: format!("not JSON: {e}"),
        })?;
        let token = |v: &Json| v.as_str().or_else(|| v["content"].as_str()).and_then(id_of);
        if let Some(id) = token(&c["bos_token"]) {
            m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(id as u32)));
        }
        if let Some(id) = token(&c["eos_token"]) {
            m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(id as u32)));
        }
        if let Some(id) = token(&c["pad_token"]) {
            m.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(id as u32)));
        }
        for (key, hf) in [
            ("tokenizer.ggml.add_bos_token", "add_bos_token"),
            ("tokenizer.ggml.add_eos_token", "add_eos_token"),
        ] {
            if let Some(on) = c[hf].as_bool() {
                m.push((key.into(), Value::Bool(on)));
            }
        }
        let template = match &c["chat_template"] {
            Json::String(s) => Some(s.clone()),
            Json::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        };
        if let Some(template) = template {
            m.push(("tokenizer.chat_template".into(), Value::String(template)));
        }
    }
    Ok(m)
}

/// The tensors of the file, in the converter's naming, with their types.
fn plan(c: &ModelConfig, set: &WeightSet, ty: GgmlType) -> Result<Vec<Planned>> {
    let mut plan = Vec::new();
    let mut add = |name: String, shape: &[usize], source: Source| {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let ty = type_for(&name, &dims, ty);
        plan.push(Planned { name, dims, ty, source });
    };
    let shape_of = |hf: &str| {
        set.shape(hf)
            .map(<[usize]>::to_vec)
            .ok_or_else(|| Error::MissingTensor {
                tensor: hf.to_string(),
                files: "the checkpoint".into(),
            })
    };
    let embed = "model.embed_tokens.weight";
    add(
        "token_embd.weight".into(),
        &shape_of(embed)?,
        Source::Whole(embed.into()),
    );
    let (heads, nope, v, rank) = (c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank);
    for l in 0..c.num_hidden_layers {
        for (gguf, hf) in BLOCK_NAMES {
            let hf = format!("model.layers.{l}.{hf}");
            if *gguf == "attn_kv_b.weight" {
                // Written split, as llama.cpp decodes in latent space.
                shape_of(&hf)?;
                add(
                    format!("blk.{l}.attn_k_b.weight"),
                    &[heads, rank, nope],
                    Source::KeyB(l),
                );
                add(format!("blk.{l}.attn_v_b.weight"), &[heads, v, rank], Source::ValueB(l));
            } else if set.contains(&hf) {
                add(format!("blk.{l}.{gguf}"), &shape_of(&hf)?, Source::Whole(hf));
            }
        }
        let first = format!("model.layers.{l}.mlp.experts.0.gate_proj.weight");
        if set.contains(&first) {
            for (gguf, proj) in EXPERT_NAMES {
                let one = shape_of(&format!("model.layers.{l}.mlp.experts.0.{proj}.weight"))?;
                add(
                    format!("blk.{l}.{gguf}"),
                    &[c.n_routed_experts, one[0], one[1]],
                    Source::Experts(l, proj),
                );
            }
        }
    }
    add(
        "output_norm.weight".into(),
        &shape_of("model.norm.weight")?,
        Source::Whole("model.norm.weight".into()),
    );
    if !c.tie_word_embeddings {
        add(
            "output.weight".into(),
            &shape_of("lm_head.weight")?,
            Source::Whole("lm_head.weight".into()),
        );
    }
    Ok(plan)
}

/// The header: magic, version 3, counts, metadata, tensor table, padding to the data.
fn header_bytes(metadata: &[(String, Value)], plan: &[Planned]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(b"GGUF");
    h.extend(3u32.to_le_bytes());
    h.extend((plan.len() as u64).to_le_bytes());
    h.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut h, key);
        h.extend(type_id(value).to_le_bytes());
        put_value(&mut h, value);
    }
    let mut offset = 0u64;
    for t in plan {
        put_string(&mut h, &t.name);
        h.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            h.extend(d.to_le_bytes());
        }
        h.extend(t.ty.0.to_le_bytes());
        h.extend(offset.to_le_bytes());
        offset = (offset + t.bytes()).next_multiple_of(ALIGNMENT);
    }
    h.resize((h.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);
    h
}

fn put_string(h: &mut Vec<u8>, s: &str) {
    h.extend((s.len() as u64).to_le_bytes());
    h.extend(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.push(*x as u8),
        Value::U16(x) => h.extend(x.to_le_bytes()),
        Value::I16(x) => h.extend(x.to_le_bytes()),
        Value::U32(x) => h.extend(x.to_le_bytes()),
        Value::I32(x) => h.extend(x.to_le_bytes()),
        Value::F32(x) => h.extend(x.to_le_bytes()),
        Value::Bool(x) => h.push(u8::from(*x)),
        Value::String(s) => put_string(h, s),
        Value::Array(items) => {
            h.extend(items.first().map_or(4, type_id).to_le_bytes());
            h.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(h, item);
            }
        }
        Value::U64(x) => h.extend(x.to_le_bytes()),
        Value::I64(x) => h.extend(x.to_le_bytes()),
        Value::F64(x) => h.extend(x.to_le_bytes()),
    }
}

/// Hands the values of tensor `t`, in its stored order, to `sink` a whole number of rows at a time.
fn write_tensor(
    set: &WeightSet,
    c: &ModelConfig,
    t: &Planned,
    sink: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    let rows_of = |hf: &str, sink: &mut dyn FnMut(&[f32]) -> Result<()>| -> Result<()> {
        let shape = set.shape(hf).map(<[usize]>::to_vec).unwrap_or_default();
        let rows = shape.first().copied().unwrap_or(1);
        let cols: usize = shape.iter().skip(1).product();
        let step = (SLICE_BYTES / 4 / cols.max(1)).max(1);
        for r in (0..rows).step_by(step) {
            let values = pollster::block_on(set.read_rows(hf, &shape, r..(r + step).min(rows)))?;
            sink(&values)?;
        }
        Ok(())
    };
    match &t.source {
        Source::Whole(hf) => rows_of(hf, sink),
        Source::Experts(l, proj) => {
            for e in 0..c.n_routed_experts {
                rows_of(&format!("model.layers.{l}.mlp.experts.{e}.{proj}.weight"), sink)?;
            }
            Ok(())
        }
        Source::KeyB(l) | Source::ValueB(l) => {
            let hf = format!("model.layers.{l}.self_attn.kv_b_proj.weight");
            let (heads, nope, v, rank) = (c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank);
            let kv = pollster::block_on(set.read(&hf, &[heads * (nope + v), rank]))?.data;
            let row = |h: usize, j: usize| &kv[(h * (nope + v) + j) * rank..][..rank];
            for h in 0..heads {
                let values: Vec<f32> = match t.source {
                    Source::KeyB(_) => (0..rank).flat_map(|r| (0..nope).map(move |j| row(h, j)[r])).collect(),
                    _ => (0..v).flat_map(|j| row(h, nope + j).iter().copied()).collect(),
                };
                sink(&values)?;
            }
            Ok(())
        }
    }
}

/// Writes the HF checkpoint folder (or GGUF file) at `model` to `out` as a GGUF file mostly of `ty`.
pub fn quantize(model: &Path, out: &Path, ty: GgmlType, progress: &mut dyn FnMut(Progress)) -> Result<Written> {
    let files = CheckpointFiles::read_dir(model)?;
    let name = model
        .file_stem()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .to_string();
    write_gguf(files, out, ty, &name, progress)
}
