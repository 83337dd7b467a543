//! The whole decoder: embedding, N x (RMSNorm -> MLA -> RMSNorm -> dense MLP | MoE), final norm, head.
//!
//! Each block loads its own weights by their HF names (`Mla::load`, `Mlp::load`, `Moe::load`;
//! `docs/architecture.md` §2); this file reads them in model order and runs the blocks over the residual
//! stream.

use burn::tensor::{Device, Int, Tensor, TensorData};

pub use super::block::{Block, FeedForward};
use super::embedding::HostTable;
use super::mla::{Mla, RowAt};
use super::mlp::{Mlp, gate_up};
use super::moe::Moe;
use super::reader::{Reader, SLICE_BYTES};
use super::rope::Rope;
use crate::cache::LatentCache;
use crate::config::{ModelConfig, TopkMethod};
use crate::error::{Error, Result};
use crate::gpu::residual::Residual;
use crate::gpu::rms_norm::RmsNorm;
use crate::gpu::{Kernels, Linear, WeightDtype};
use crate::load::{Progress, WeightSet};

/// Where the embedding table (`[V, H]`) lives.
#[derive(Debug, Clone)]
pub enum Embedding {
    /// On the host in the model's weight format (inference; `model/embedding.rs`).
    Host(HostTable),
    /// A device tensor (training): the lookup is a `select`, so gradients reach the table.
    Device(Box<Tensor<2>>),
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every position (`[T, V]`): evaluation, tests.
    All,
    /// Only the last position (`[1, V]`): generation.
    Last,
}

/// A loaded DeepSeek-V2/V3 model on one device.
#[derive(Debug)]
pub struct Transformer {
    /// The validated config.
    pub config: ModelConfig,
    /// `model.embed_tokens.weight`.
    pub embed: Embedding,
    /// Decoder layers.
    pub blocks: Vec<Block>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head` (`[H] -> [V]`), split by vocabulary rows to fit bindings.
    pub head: Linear,
    /// Rope tables' source.
    pub rope: Rope,
    /// The device everything lives on.
    pub device: Device,
    /// Weight dtype on the GPU.
    pub dtype: WeightDtype,
    /// What runs the hot paths, chosen at load.
    pub kernels: Kernels,
}

/// Layers (about 1.1 GB each in DeepSeek-V2-Lite) the disk is asked to read ahead of the one being loaded
/// (two measured no faster on a 2-core machine: the readahead competes with the conversion for the CPU).
const READ_AHEAD: usize = 1;

impl Transformer {
    /// Bytes of the weights as loaded: on the device, and those one decoded token reads there. Counted from
    /// the stored weights, so a GGUF file's mix of types counts at its formats' sizes. The embedding table
    /// ([`HostTable::bytes`]) is not among them.
    pub fn device_bytes(&self) -> (u64, u64) {
        let fixed = self.norm.bytes() + self.head.bytes();
        let (all, read) = self
            .blocks
            .iter()
            .map(Block::bytes)
            .fold((fixed, fixed), |(a, r), (ba, br)| (a + ba, r + br));
        (all as u64, read as u64)
    }

    /// Whether decode steps can be recorded and replayed (`gpu/replay.rs`): moela's kernels on the
    /// native wgpu device they share with burn.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn replayable(&self) -> bool {
        self.kernels == Kernels::Wgsl && crate::gpu::texture::available(&self.device)
    }

    /// Builds the model from a checkpoint's tensors, converting to `dtype` on `device`, every block run by
    /// `kernels` (the one place that choice is made).
    ///
    /// Every tensor's presence and shape is checked before anything is read. Then tensors are read in model
    /// order, one at a time (the largest a slice of rows at a time), converted and stored on the device, while
    /// the next layer's tensors are read from disk in the background: host memory holds one slice, one expert
    /// stack being packed, and the embedding table in its format.
    pub async fn load(
        config: ModelConfig,
        set: &WeightSet,
        dtype: WeightDtype,
        kernels: Kernels,
        device: &Device,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Self> {
        // Word buffers are reused from one weight to the next, and textures written in the background,
        // until the load ends (the last writes are waited for then).
        let _loading = crate::gpu::packed::Loading::new();
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        // A tied head is the embedding table, read a second time (for the device); a checkpoint that ties them
        // but still stores lm_head uses its own.
        let tied = c.tie_word_embeddings && !set.contains("lm_head.weight");
        let mut shapes = tensor_shapes(c);
        if c.tie_word_embeddings && !tied {
            shapes.push(("lm_head.weight".into(), vec![v, h]));
        }
        let mut total = 0;
        for (name, shape) in &shapes {
            set.check(name, shape)?;
            total += set.byte_len(name);
        }
        if tied {
            total += set.byte_len("model.embed_tokens.weight");
        }
        let mut r = Reader {
            set,
            dtype,
            kernels,
            device,
            done: 0,
            total,
            progress,
        };
        let norm = async |r: &mut Reader<'_>, name: &str, n: usize, eps: f64| -> Result<RmsNorm> {
            Ok(RmsNorm::new(r.get(name, &[n]).await?, eps, kernels, device))
        };
        let layer_names = |i: usize| layer_tensors(c, i).into_iter().map(|(n, _)| n);

        // What is read after the embedding, in order: the layers, then the final norm and the head. The disk
        // is asked for READ_AHEAD of them beyond the one being converted, so it keeps reading while both cores
        // convert.
        let stage = |j: usize| -> Vec<String> {
            match j.cmp(&c.num_hidden_layers) {
                std::cmp::Ordering::Less => layer_names(j).collect(),
                std::cmp::Ordering::Equal => vec!["model.norm.weight".into(), "lm_head.weight".into()],
                std::cmp::Ordering::Greater => Vec::new(),
            }
        };
        let prefetch = |j: usize| set.prefetch(stage(j).iter().map(String::as_str));
        set.prefetch(["model.embed_tokens.weight"]);
        (0..READ_AHEAD).for_each(prefetch);
        let embed_name = "model.embed_tokens.weight".to_string();
        let mut embed = HostTable::new(dtype, v, h);
        let slice_rows = (SLICE_BYTES / (h * 4).max(1)).max(1);
        for first in (0..v).step_by(slice_rows) {
            let rows = r
                .stored(&embed_name, [v, h], first..(first + slice_rows).min(v))
                .await?;
            if !embed.set_stored(first, rows.rows()) {
                rows.check_finite()?;
            }
        }
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            prefetch(i + READ_AHEAD);
            let p = format!("model.layers.{i}.");
            let attn_norm = norm(&mut r, &format!("{p}input_layernorm.weight"), h, c.rms_norm_eps).await?;
            let ffn_norm = norm(
                &mut r,
                &format!("{p}post_attention_layernorm.weight"),
                h,
                c.rms_norm_eps,
            )
            .await?;
            let attn = Mla::load(c, &mut r, &p).await?;
            let ffn = if c.is_moe_layer(i) {
                FeedForward::Moe(Box::new(Moe::load(c, &mut r, &p).await?))
            } else {
                FeedForward::Dense(Mlp::load(&mut r, &format!("{p}mlp."), h, c.intermediate_size).await?)
            };
            blocks.push(Block {
                attn_norm,
                attn,
                ffn_norm,
                ffn,
            });
        }
        let final_norm = norm(&mut r, "model.norm.weight", h, c.rms_norm_eps).await?;
        let head_name = if tied { embed_name } else { "lm_head.weight".into() };
        let head = r.linear(&[head_name], v, h).await?;
        Ok(Self {
            rope: Rope::new(c),
            config,
            embed: Embedding::Host(embed),
            blocks,
            norm: final_norm,
            head,
            device: device.clone(),
            dtype,
            kernels,
        })
    }

    /// Moves the embedding table to the device (for training: gradients can then reach it).
    pub fn embedding_on_device(&mut self) {
        if let Embedding::Host(rows) = &self.embed {
            let (v, h) = (self.config.vocab_size, self.config.hidden_size);
            let table = Tensor::from_data(TensorData::new(rows.to_f32(), [v, h]), &self.device);
            self.embed = Embedding::Device(Box::new(table));
        }
    }

    /// Fails on the first of `tokens` outside the vocabulary.
    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let v = self.config.vocab_size;
        match tokens.iter().find(|&&id| id as usize >= v) {
            Some(id) => Err(Error::InvalidArgument(format!(
                "token id {id} is outside the vocabulary (vocab_size {v})"
            ))),
            None => Ok(()),
        }
    }

    /// The rows of `tokens` in the host embedding table, row-major `[T, H]` (`None` when the table is on the
    /// device). The ids are checked by the caller.
    fn host_rows(&self, tokens: &[u32]) -> Option<Vec<f32>> {
        let h = self.config.hidden_size;
        let Embedding::Host(table) = &self.embed else {
            return None;
        };
        let mut rows = Vec::with_capacity(tokens.len() * h);
        for &id in tokens {
            table.push_row(id as usize, &mut rows);
        }
        Some(rows)
    }

    /// What a replayed decode step of `tokens` at `positions` uploads (`gpu/replay.rs`): the values
    /// [`Transformer::forward`] (one token) or [`Transformer::forward_rows`] (a token per sequence) would
    /// upload for them. `None` when the embedding table is on the device.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn step_inputs(&self, tokens: &[u32], positions: &[usize]) -> Result<Option<crate::gpu::replay::StepInputs>> {
        self.check_tokens(tokens)?;
        let Some(embedding) = self.host_rows(tokens) else {
            return Ok(None);
        };
        let (cos, sin) = self.rope.host_tables_at(positions);
        Ok(Some(crate::gpu::replay::StepInputs { embedding, cos, sin }))
    }

    /// The embeddings of `tokens` with the rope `tables` for their positions: what a step uploads, marked as
    /// what a replay of it writes anew (when it is being recorded, `gpu/replay.rs`).
    fn step_values(
        &self,
        tokens: &[u32],
        tables: (Tensor<2>, Tensor<2>),
    ) -> Result<(Tensor<2>, (Tensor<2>, Tensor<2>))> {
        let x = self.embed_tokens(tokens)?;
        #[cfg(not(target_arch = "wasm32"))]
        {
            use crate::gpu::replay::{Input, input};
            input(&x, Input::Embedding);
            input(&tables.0, Input::Cos);
            input(&tables.1, Input::Sin);
        }
        Ok((x, tables))
    }

    /// `[T, H]` embeddings of `tokens`, checking every id against the vocabulary.
    fn embed_tokens(&self, tokens: &[u32]) -> Result<Tensor<2>> {
        let h = self.config.hidden_size;
        self.check_tokens(tokens)?;
        Ok(match &self.embed {
            Embedding::Host(_) => {
                let rows = self.host_rows(tokens).unwrap_or_default();
                Tensor::from_data(TensorData::new(rows, [tokens.len(), h]), &self.device)
            }
            Embedding::Device(table) => {
                let ids: Vec<i64> = tokens.iter().map(|&id| i64::from(id)).collect();
                let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [tokens.len()]), &self.device);
                (**table).clone().select(0, ids)
            }
        })
    }

    /// The training forward: `b` sequences of `t` tokens each (`tokens` row-major, every sequence at positions
    /// `0..t`, padding at the end), with no cache. Returns logits `[B*T, V]` and, per MoE layer in order, the
    /// experts each token chose (`[B*T, K]`). MoE layers group the tokens by expert, reading the routing to the
    /// host.
    pub fn forward_batch(&self, tokens: &[u32], b: usize, t: usize) -> Result<(Tensor<2>, Vec<Tensor<2, Int>>)> {
        if b == 0 || t == 0 || tokens.len() != b * t {
            return Err(Error::InvalidArgument(format!(
                "a batch of {b} x {t} tokens needs {} ids, got {}",
                b * t,
                tokens.len()
            )));
        }
        if t > self.config.max_position_embeddings {
            return Err(Error::Limit(format!(
                "sequences of {t} tokens exceed max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let mut x = self.embed_tokens(tokens)?;
        let tables = self.rope.tables(0, t, &self.device);
        let mut routing = Vec::new();
        for blk in &self.blocks {
            let a = blk
                .attn
                .forward_batch(blk.attn_norm.forward(x.clone()), b, t, &tables, &self.device);
            x = x + a;
            let n = blk.ffn_norm.forward(x.clone());
            let f = match &blk.ffn {
                FeedForward::Dense(m) => m.forward(n),
                FeedForward::Moe(m) => {
                    let (out, experts) = m.forward_grouped(n);
                    routing.push(experts);
                    out
                }
            };
            x = x + f;
        }
        Ok((self.head.forward(self.norm.forward(x)), routing))
    }

    /// Runs `tokens` at positions `cache.len()..`, appending their latents to the cache.
    ///
    /// Returns logits `[T, V]` or `[1, V]`. Nothing is read back to the host. With `routing`, the experts each
    /// MoE layer chose (`[T, K]` per MoE layer, in layer order) are appended to it, still on the GPU.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut LatentCache,
        which: LogitsFor,
        mut routing: Option<&mut Vec<Tensor<2, Int>>>,
    ) -> Result<Tensor<2>> {
        let t = tokens.len();
        let pos = cache.len();
        if t == 0 {
            return Err(Error::InvalidArgument("no tokens to run".into()));
        }
        if pos + t > cache.capacity() {
            return Err(Error::Limit(format!(
                "context full: {pos} cached + {t} new tokens exceed the session's max_context of {}",
                cache.capacity()
            )));
        }
        let (x, tables) = self.step_values(tokens, self.rope.tables(pos, t, &self.device))?;
        // h = h + block(h), layer by layer; each add is done by the norm that reads h next (gpu/residual.rs).
        let mut h = Residual::new(x);
        for (i, b) in self.blocks.iter().enumerate() {
            b.forward(
                &mut h,
                pos,
                cache.layer_mut(i),
                &tables,
                &self.device,
                routing.as_deref_mut(),
            );
        }
        cache.advance(t);
        if which == LogitsFor::Last {
            h = h.last(t);
        }
        // model.norm, then lm_head: [T or 1, H] -> [T or 1, V].
        Ok(self.head.forward(h.norm(&self.norm)))
    }

    /// Runs one token for each of a batch of sequences: `tokens[i]` at position `caches[i].len()`, appending
    /// its latent to `caches[i]`. Returns logits `[B, V]`, row `i` for sequence `i`. The products read their
    /// weights once for all rows; each row's attention reads only its own cache.
    pub fn forward_rows(&self, tokens: &[u32], caches: &mut [&mut LatentCache]) -> Result<Tensor<2>> {
        if tokens.is_empty() || tokens.len() != caches.len() {
            return Err(Error::InvalidArgument(format!(
                "a batch of {} tokens for {} sequences: expected one token per sequence, at least one",
                tokens.len(),
                caches.len()
            )));
        }
        for (i, c) in caches.iter().enumerate() {
            if c.len() >= c.capacity() {
                return Err(Error::Limit(format!(
                    "context full: sequence {i} of the batch holds {} tokens, its max_context",
                    c.capacity()
                )));
            }
        }
        let positions: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let (x, tables) = self.step_values(tokens, self.rope.tables_at(&positions, &self.device))?;
        let mut h = Residual::new(x);
        for (i, b) in self.blocks.iter().enumerate() {
            let mut rows: Vec<RowAt<'_>> = caches
                .iter_mut()
                .map(|c| RowAt {
                    pos: c.len(),
                    cache: c.layer_mut(i),
                })
                .collect();
            b.forward_rows(&mut h, &mut rows, &tables, &self.device);
        }
        for c in caches.iter_mut() {
            c.advance(1);
        }
        Ok(self.head.forward(h.norm(&self.norm)))
    }
}

/// The tensors of layer `l` with their HF shapes.
pub fn layer_tensors(c: &ModelConfig, l: usize) -> Vec<(String, Vec<usize>)> {
    let (h, n_h, r_kv, d_r) = (c.hidden_size, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim);
    let d_qk = c.qk_head_dim();
    let p = format!("model.layers.{l}.");
    let a = format!("{p}self_attn.");
    let mut out = vec![
        (format!("{p}input_layernorm.weight"), vec![h]),
        (format!("{p}post_attention_layernorm.weight"), vec![h]),
    ];
    match c.q_lora_rank {
        None => out.push((format!("{a}q_proj.weight"), vec![n_h * d_qk, h])),
        Some(r_q) => out.extend([
            (format!("{a}q_a_proj.weight"), vec![r_q, h]),
            (format!("{a}q_a_layernorm.weight"), vec![r_q]),
            (format!("{a}q_b_proj.weight"), vec![n_h * d_qk, r_q]),
        ]),
    }
    out.extend([
        (format!("{a}kv_a_proj_with_mqa.weight"), vec![r_kv + d_r, h]),
        (format!("{a}kv_a_layernorm.weight"), vec![r_kv]),
        (
            format!("{a}kv_b_proj.weight"),
            vec![n_h * (c.qk_nope_head_dim + c.v_head_dim), r_kv],
        ),
        (format!("{a}o_proj.weight"), vec![h, n_h * c.v_head_dim]),
    ]);
    let mlp = |out: &mut Vec<(String, Vec<usize>)>, p: &str, i: usize| {
        let [g, u] = gate_up(p);
        out.extend([
            (g, vec![i, h]),
            (u, vec![i, h]),
            (format!("{p}down_proj.weight"), vec![h, i]),
        ]);
    };
    if c.is_moe_layer(l) {
        let e = c.n_routed_experts;
        out.push((format!("{p}mlp.gate.weight"), vec![e, h]));
        if c.topk_method == TopkMethod::NoauxTc {
            out.push((format!("{p}mlp.gate.e_score_correction_bias"), vec![e]));
        }
        for x in 0..e {
            mlp(&mut out, &format!("{p}mlp.experts.{x}."), c.moe_intermediate_size);
        }
        if c.n_shared_experts > 0 {
            mlp(
                &mut out,
                &format!("{p}mlp.shared_experts."),
                c.n_shared_experts * c.moe_intermediate_size,
            );
        }
    } else {
        mlp(&mut out, &format!("{p}mlp."), c.intermediate_size);
    }
    out
}

/// Every tensor the model reads with its HF shape: the embedding, the final norm, the head (untied), then the
/// layers. The names and shapes a checkpoint of this config has.
pub fn tensor_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, v) = (c.hidden_size, c.vocab_size);
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..c.num_hidden_layers {
        out.extend(layer_tensors(c, l));
    }
    out
}
