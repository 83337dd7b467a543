//! DeepSeekMoE (`docs/architecture.md` §4): a router picks K of E routed experts per token, their outputs
//! are mixed by the router weights, and the shared experts are added.
//!
//! The shared experts are stored as S more experts after the routed ones (experts `E..E + S`, each one
//! expert wide: the checkpoint's fused shared MLP of width S x I split along its intermediate dimension,
//! which SwiGLU leaves exact), chosen by every token with weight 1. So in decode they ride in the routed
//! experts' gathered launches (the routing kernel appends their slots) instead of taking products of their
//! own.
//!
//! Routing, top-k and expert dispatch stay on the GPU for inference. Four dispatch forms, same result:
//! - moela's gathered kernels (`shaders/moe_matvec.wgsl`, `matvec_{f16,q8,q4}.wgsl`; decode and prefill
//!   on the wgpu device): in decode each (token, slot) pair multiplies its chosen expert's weights where
//!   they are stored; in prefill the pairs are first sorted by expert on the GPU (`shaders/moe_sort.wgsl`)
//!   and each tile of up to 8 pairs of one expert reads that expert's weights once, and the shared experts
//!   run as products over all the chunk's tokens (their weights read once per group of rows);
//! - gathered with burn's ops (few token-expert pairs, e.g. decode with `--kernels generic`): the selected
//!   experts' matrices are gathered with `select` and multiplied batched, so only the active experts'
//!   weights are read;
//! - dense (many tokens, e.g. prefill): every expert runs on every token of the chunk and the router weights
//!   (zero for unselected experts, one for the shared ones) mix the outputs;
//! - grouped (training): tokens are grouped by expert on the host and each expert multiplies only its rows.
//!
//! Stacked expert weights are split into chunks of experts whose stored weights each fit one storage
//! binding; the gathered launches of a stack's chunks fill one output. Where burn's ops need a chunk as f32
//! it is unpacked in parts that fit a binding.

use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

use super::mlp::gate_up;
use super::reader::{Reader, push, push_columns};
use crate::config::ModelConfig;
use crate::config::{ScoringFunc, TopkMethod};
use crate::error::Result;
use crate::gpu::experts::Pairs;
use crate::gpu::residual::BlockOutput;
use crate::gpu::swiglu::swiglu;
use crate::gpu::weights::{MAX_BINDING_BYTES, as_f32};
use crate::gpu::{self, Kernels};
use crate::gpu::{Linear, WeightDtype, Weights, WeightsHost};

/// A run of consecutive experts stacked in one tensor pair.
#[derive(Debug, Clone)]
pub struct ExpertChunk {
    /// Index of the first expert in the chunk.
    pub first: usize,
    /// Experts in the chunk (Ec).
    pub count: usize,
    /// `[Ec, H, 2I]`: per expert, `[gate | up]` transposed.
    pub gate_up_t: Weights<3>,
    /// `[Ec, I, H]`: per expert, `down_proj` transposed.
    pub down_t: Weights<3>,
}

/// One MoE feed-forward block.
#[derive(Debug, Clone)]
pub struct Moe {
    /// Router `mlp.gate`: `[H] -> [E]`, always f32.
    pub router: Linear,
    /// `e_score_correction_bias` `[E]` (noaux_tc only; selection only, never in the weights).
    pub correction_bias: Option<Tensor<1>>,
    /// The routed experts `0..E`, then the shared ones `E..E + S`, chunked.
    pub chunks: Vec<ExpertChunk>,
    /// S, shared experts (each one expert wide), stacked after the routed ones.
    pub shared: usize,
    /// E.
    pub experts: usize,
    /// K.
    pub top_k: usize,
    /// I (one expert's width).
    pub width: usize,
    /// Router settings.
    pub scoring: ScoringFunc,
    /// Selection method.
    pub method: TopkMethod,
    /// Groups for group-limited methods.
    pub n_group: usize,
    /// Groups kept.
    pub topk_group: usize,
    /// Renormalise top-k weights.
    pub norm_topk_prob: bool,
    /// Routed output multiplier.
    pub routed_scaling_factor: f64,
    /// Whether decode's expert products run moela's gathered kernel (where it applies).
    pub kernels: Kernels,
}

/// The experts a block chose, `[T, K]`, possibly still with the shared experts' slots after them (decode):
/// cutting those off is a launch, taken only by a caller that reads the choice.
#[derive(Debug, Clone)]
pub struct Chosen {
    idx: Tensor<2, Int>,
    k: usize,
}

impl Chosen {
    /// The routed experts each token chose, `[T, K]`.
    pub fn routed(self) -> Tensor<2, Int> {
        if self.idx.dims()[1] == self.k {
            self.idx
        } else {
            self.idx.narrow(1, 0, self.k)
        }
    }
}

/// Which of an expert's two matrices.
#[derive(Debug, Clone, Copy)]
enum Side {
    GateUp,
    Down,
}

impl ExpertChunk {
    fn weights(&self, side: Side) -> &Weights<3> {
        match side {
            Side::GateUp => &self.gate_up_t,
            Side::Down => &self.down_t,
        }
    }

    /// The chunk as f32 for burn's ops, in parts that each fit one binding: `(first expert, [n, H, 2I],
    /// [n, I, H])`.
    fn unpacked(&self, kernels: Kernels) -> Vec<(usize, Tensor<3>, Tensor<3>)> {
        let (gu, down) = (&self.gate_up_t, &self.down_t);
        let per_expert = |w: &Weights<3>| match w {
            Weights::Dense(t) => {
                let [_, k, n] = t.dims();
                k * n * 4
            }
            Weights::Packed(p) => p.shape[1] * p.shape[2] * 4,
        };
        let largest = per_expert(gu).max(per_expert(down)).max(1);
        let step = (MAX_BINDING_BYTES / largest).clamp(1, self.count.max(1));
        (0..self.count)
            .step_by(step)
            .map(|j| {
                let n = step.min(self.count - j);
                (
                    self.first + j,
                    gu.to_f32_range(j, n, kernels),
                    down.to_f32_range(j, n, kernels),
                )
            })
            .collect()
    }
}

impl Moe {
    /// Loads layer `p`'s MoE block (`{p}mlp.gate`, `experts.*`, `shared_experts`): the experts packed in
    /// chunks of one binding each, the shared experts after the routed ones.
    pub(crate) async fn load(c: &ModelConfig, r: &mut Reader<'_>, p: &str) -> Result<Moe> {
        let (kernels, device) = (r.kernels, r.device);
        let (h, e, i) = (c.hidden_size, c.n_routed_experts, c.moe_intermediate_size);
        let router = Linear::from_rows(
            &r.get(&format!("{p}mlp.gate.weight"), &[e, h]).await?,
            e,
            h,
            WeightDtype::F32,
            kernels,
            device,
        );
        let correction_bias = if c.topk_method == TopkMethod::NoauxTc {
            let b = r.get(&format!("{p}mlp.gate.e_score_correction_bias"), &[e]).await?;
            Some(Tensor::from_data(TensorData::new(b, [e]), device))
        } else {
            None
        };
        // The shared experts (one MLP of width S x I in the checkpoint) become S experts of width I after the
        // routed ones: rows j*I..(j+1)*I of its gate and up, columns j*I..(j+1)*I of its down. The down
        // matrix is cut block for block where I is whole blocks of its stored type (any float type, Q8_0 and
        // Q5_0 at multiples of 32, the K-quants at multiples of 256), else rebuilt from its values.
        let s = c.n_shared_experts;
        let sp = format!("{p}mlp.shared_experts.");
        let sd = format!("{sp}down_proj.weight");
        let cut_by_blocks = r
            .set
            .ggml_type(&sd)
            .and_then(|t| t.block())
            .is_none_or(|(per, _)| i.is_multiple_of(per as usize));
        let (shared_down, shared_values) = match (s > 0, cut_by_blocks) {
            (false, _) => (None, Vec::new()),
            (true, true) => (Some(r.stored(&sd, [h, s * i], 0..h).await?), Vec::new()),
            (true, false) => (None, r.get(&sd, &[h, s * i]).await?), // [H, SI]
        };
        // As many experts per chunk as their stored matrices fit one binding (the kernels bind a chunk whole;
        // burn's ops unpack it in parts). Each chunk is packed on the host an expert at a time, then uploaded.
        // A chunk has one format for gate/up and one for down: a GGUF file's types can differ between them,
        // and between the routed and the shared experts, which then get chunks of their own.
        let total = e + s;
        let [gu0, gu1] = gate_up(&format!("{p}mlp.experts.0."));
        let [sg, su] = gate_up(&sp);
        let routed = (
            r.format_for(&[&gu0, &gu1], false),
            r.format_for(&[&format!("{p}mlp.experts.0.down_proj.weight")], false),
        );
        let shared = (r.format_for(&[&sg, &su], false), r.format_for(&[&sd], !cut_by_blocks));
        let per_chunk = |(gu, d): (WeightDtype, WeightDtype)| {
            let per_expert = Weights::<3>::matrix_bytes(gu, h, 2 * i).max(Weights::<3>::matrix_bytes(d, i, h));
            (MAX_BINDING_BYTES / per_expert.max(1)).max(1)
        };
        let mut ranges = Vec::new();
        let apart = s > 0 && shared != routed;
        for (range, formats) in [
            (0..if apart { e } else { total }, routed),
            (if apart { e } else { total }..total, shared),
        ] {
            for first in range.clone().step_by(per_chunk(formats)) {
                ranges.push((first, per_chunk(formats).min(range.end - first), formats));
            }
        }
        let mut chunks = Vec::new();
        let mut down = Vec::new();
        for (first, count, (gu_format, down_format)) in ranges {
            let mut gate_up_t = WeightsHost::new(gu_format, [count, h, 2 * i]);
            let mut down_t = WeightsHost::new(down_format, [count, i, h]);
            for x in first..first + count {
                // HF rows of the expert: gate/up [2I, H] (stacked), down [H, I].
                if x < e {
                    let ep = format!("{p}mlp.experts.{x}.");
                    let gu = r.stacked(&gate_up(&ep), i, h, 0..2 * i).await?;
                    push(&mut gate_up_t, &gu)?;
                    drop(gu);
                    let d = r.stored(&format!("{ep}down_proj.weight"), [h, i], 0..h).await?;
                    push(&mut down_t, std::slice::from_ref(&d))?;
                } else {
                    let j = x - e;
                    let mut gu = Vec::new();
                    for name in gate_up(&sp) {
                        gu.push(r.stored(&name, [s * i, h], j * i..(j + 1) * i).await?);
                    }
                    push(&mut gate_up_t, &gu)?;
                    drop(gu);
                    if let Some(stored) = &shared_down {
                        push_columns(&mut down_t, stored, s * i, j * i..(j + 1) * i)?;
                    } else {
                        down.clear();
                        down.extend(
                            (0..h).flat_map(|row| &shared_values[row * s * i + j * i..row * s * i + (j + 1) * i]),
                        );
                        down_t.push_rows(&down);
                    }
                }
            }
            chunks.push(ExpertChunk {
                first,
                count,
                gate_up_t: gate_up_t.upload([count, h, 2 * i], device),
                down_t: down_t.upload([count, i, h], device),
            });
        }
        Ok(Moe {
            router,
            correction_bias,
            chunks,
            shared: s,
            experts: e,
            top_k: c.num_experts_per_tok,
            width: i,
            scoring: c.scoring_func,
            method: c.topk_method,
            n_group: c.n_group.max(1),
            topk_group: c.topk_group.max(1),
            norm_topk_prob: c.norm_topk_prob,
            routed_scaling_factor: c.routed_scaling_factor,
            kernels,
        })
    }

    /// Bytes the block's weights take on the device, and those one token reads: the router, the shared
    /// experts and K of the E routed experts (at their average size: a GGUF file's layers can differ).
    pub fn bytes(&self) -> (usize, usize) {
        let fixed = self.router.bytes() + self.correction_bias.as_ref().map_or(0, |b| b.dims()[0] * 4);
        let (mut routed, mut shared) = (0, 0);
        for c in &self.chunks {
            let per_expert = (c.gate_up_t.bytes() + c.down_t.bytes()) / c.count.max(1);
            let routed_here = self.experts.saturating_sub(c.first).min(c.count);
            routed += per_expert * routed_here;
            shared += per_expert * (c.count - routed_here);
        }
        let read = routed * self.top_k / self.experts.max(1);
        (fixed + routed + shared, fixed + shared + read)
    }

    /// Picks experts: indices `[T, K]` and their mixing weights `[T, K]`.
    pub fn route(&self, x: Tensor<2>) -> (Tensor<2, Int>, Tensor<2>) {
        self.route_slots(x, 0)
    }

    /// [`Moe::route`] with `extra` slots appended to each token's row (`[T, K + extra]`): the first `extra`
    /// shared experts at weight 1.
    fn route_slots(&self, x: Tensor<2>, extra: usize) -> (Tensor<2, Int>, Tensor<2>) {
        let [t, h] = x.dims();
        if self.kernels == Kernels::Wgsl {
            // Small routers run inside the routing kernel (one launch for product and selection); a large
            // one (E x H past a million weights, where one workgroup per token would be slow on a GPU)
            // gets its own matrix-vector launch first.
            let bias = self.correction_bias.as_ref();
            let mut shape = self.route_shape();
            shape.extra = extra;
            let chosen = match self.router.parts.as_slice() {
                [Weights::Dense(w)] if self.experts * h <= 1 << 20 => {
                    gpu::experts::route(gpu::experts::Logits::Product { x: &x, router: w }, bias, &shape)
                }
                _ => {
                    let logits = self.router.forward(x.clone());
                    gpu::experts::route(gpu::experts::Logits::Given(&logits), bias, &shape)
                }
            };
            if let Some(chosen) = chosen {
                return chosen;
            }
        }
        let (idx, w) = self.route_burn(x, t);
        self.with_shared(idx, w, extra)
    }

    /// The selection with burn's ops.
    fn route_burn(&self, x: Tensor<2>, t: usize) -> (Tensor<2, Int>, Tensor<2>) {
        let logits = self.router.forward(x); // [T, E], f32
        let scores = match self.scoring {
            ScoringFunc::Softmax => softmax(logits, 1),
            ScoringFunc::Sigmoid => sigmoid(logits),
        };
        let (e, g) = (self.experts, self.n_group);
        match self.method {
            TopkMethod::Greedy => {
                let (w, idx) = scores.topk_with_indices(self.top_k, 1);
                (idx, self.finish_weights(w))
            }
            TopkMethod::GroupLimitedGreedy => {
                // Group score = max score in the group; unkept groups' experts are masked out.
                let group = scores.clone().reshape([t, g, e / g]).max_dim(2).reshape([t, g]);
                let masked = self.mask_groups(scores, group, t);
                let (w, idx) = masked.topk_with_indices(self.top_k, 1);
                (idx, self.finish_weights(w))
            }
            TopkMethod::NoauxTc => {
                // Bias-corrected scores choose; groups ranked by the sum of their top-2; weights unbiased.
                let biased = match &self.correction_bias {
                    Some(b) => scores.clone() + b.clone().unsqueeze_dim::<2>(0),
                    None => scores.clone(),
                };
                let group = biased
                    .clone()
                    .reshape([t, g, e / g])
                    .topk(2, 2)
                    .sum_dim(2)
                    .reshape([t, g]);
                let masked = self.mask_groups(biased, group, t);
                let idx = masked.topk_with_indices(self.top_k, 1).1;
                let w = scores.gather(1, idx.clone());
                (idx, self.finish_weights(w))
            }
        }
    }

    /// `idx` / `w` (`[T, K]`) with `extra` slots appended: shared experts `E..E + extra` at weight 1.
    fn with_shared(&self, idx: Tensor<2, Int>, w: Tensor<2>, extra: usize) -> (Tensor<2, Int>, Tensor<2>) {
        if extra == 0 {
            return (idx, w);
        }
        let t = idx.dims()[0];
        let device = idx.device();
        let ids: Vec<i64> = (0..t)
            .flat_map(|_| (self.experts..self.experts + extra).map(|e| e as i64))
            .collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [t, extra]), &device);
        let ones = Tensor::<2>::ones([t, extra], &device);
        (Tensor::cat(vec![idx, ids], 1), Tensor::cat(vec![w, ones], 1))
    }

    /// How the selection is made and its weights finished, as moela's routing kernel and burn's path both
    /// read it.
    fn route_shape(&self) -> gpu::experts::RouteShape {
        // Renormalised when the config says so (and K > 1); the factor applies always for V3 (sigmoid) and
        // for V2 (softmax) only when not renormalising.
        let normalise = self.norm_topk_prob && self.top_k > 1;
        let scaled = match self.scoring {
            ScoringFunc::Sigmoid => true,
            ScoringFunc::Softmax => !normalise,
        };
        gpu::experts::RouteShape {
            top_k: self.top_k,
            method: match self.method {
                TopkMethod::Greedy => 0,
                TopkMethod::GroupLimitedGreedy => 1,
                TopkMethod::NoauxTc => 2,
            },
            sigmoid: self.scoring == ScoringFunc::Sigmoid,
            groups: self.n_group.max(1),
            keep_groups: self.topk_group.max(1),
            normalise,
            factor: if scaled { self.routed_scaling_factor } else { 1.0 },
            extra: 0,
        }
    }

    /// Sets the scores of experts outside the `topk_group` best groups to -inf.
    fn mask_groups(&self, scores: Tensor<2>, group: Tensor<2>, t: usize) -> Tensor<2> {
        let (e, g) = (self.experts, self.n_group);
        if self.topk_group >= g {
            return scores;
        }
        // The kept groups are those scoring at least the topk_group-th best group score.
        let kth = group.clone().topk(self.topk_group, 1).narrow(1, self.topk_group - 1, 1);
        let dropped = group.lower(kth.expand([t, g])); // [T, G]
        let dropped = dropped.reshape([t, g, 1]).expand([t, g, e / g]).reshape([t, e]);
        scores.mask_fill(dropped, f32::NEG_INFINITY)
    }

    /// Renormalises and scales top-k weights (`[RC]` semantics: V2 scales only when not normalising).
    fn finish_weights(&self, w: Tensor<2>) -> Tensor<2> {
        // The same rules the routing kernel reads (`route_shape`).
        let shape = self.route_shape();
        let w = if shape.normalise {
            let sum = w.clone().sum_dim(1).add_scalar(1e-20);
            w / sum
        } else {
            w
        };
        if shape.factor == 1.0 {
            w
        } else {
            w.mul_scalar(shape.factor)
        }
    }

    /// `x`: `[T, H]` (normed) -> `[T, H]`, and the chosen experts `[T, K]`.
    pub fn forward(&self, x: Tensor<2>) -> (Tensor<2>, Tensor<2, Int>) {
        let (out, chosen) = self.forward_delta(x);
        (out.into_tensor(), chosen.routed())
    }

    /// [`Moe::forward`], leaving the experts' mixing to the norm that adds the output to the residual
    /// stream (one launch fewer with moela's kernels).
    pub fn forward_delta(&self, x: Tensor<2>) -> (BlockOutput, Chosen) {
        let [t, _] = x.dims();
        let k = self.top_k;
        // One token (decode) with moela's kernels: the shared experts' slots come from the routing kernel
        // and share the routed experts' launches. Several tokens: the shared experts run as products over
        // all of them (read once per group of rows rather than once per token).
        let extra = if self.kernels == Kernels::Wgsl && t <= gpu::matvec::MAX_ROWS {
            self.shared
        } else {
            0
        };
        let (idx, w) = self.route_slots(x.clone(), extra);
        let chosen = Chosen { idx: idx.clone(), k };
        // moela's gathered kernels read each (token, slot) pair's expert in place (prefill's pairs sorted
        // by expert first), for decode and prefill alike: no copies of expert matrices and no unpacked f32
        // experts. Without them, few pairs take the batched gather and many the dense form.
        if self.kernels == Kernels::Wgsl
            && let Some(out) = self.forward_wgsl(&x, &idx, &w, extra)
        {
            return (out, chosen);
        }
        let (idx, w) = self.with_shared(idx, w, self.shared - extra);
        let slots = k + self.shared;
        let out = if t * slots <= self.experts + self.shared {
            self.gathered(x, idx, w)
        } else {
            self.dense(x, idx, w)
        };
        (BlockOutput::Dense(out), chosen)
    }

    /// The same block with tokens grouped by expert, for many tokens (training): each expert multiplies only
    /// the rows routed to it, so the work is that of the K chosen experts (and the shared ones) rather than
    /// all E. The routing is read to the host to build the groups.
    pub fn forward_grouped(&self, x: Tensor<2>) -> (Tensor<2>, Tensor<2, Int>) {
        let [t, h] = x.dims();
        let device = x.device();
        let (chosen, w) = self.route(x.clone());
        let (idx, w) = self.with_shared(chosen.clone(), w, self.shared);
        let k = self.top_k + self.shared;
        // Per expert, the (token, slot) pairs that chose it.
        let mut pairs: Vec<Vec<i64>> = vec![Vec::new(); self.experts + self.shared];
        for (p, e) in idx.into_data().iter::<i64>().enumerate() {
            if let Some(list) = usize::try_from(e).ok().and_then(|e| pairs.get_mut(e)) {
                list.push(p as i64);
            }
        }
        let w = w.reshape([t * k, 1]);
        let mut out = Tensor::<2>::zeros([t, h], &device);
        for c in &self.chunks {
            for (first, gate_up, down) in c.unpacked(self.kernels) {
                for j in 0..gate_up.dims()[0] {
                    let list = &pairs[first + j];
                    if list.is_empty() {
                        continue;
                    }
                    let n = list.len();
                    let tokens: Vec<i64> = list.iter().map(|p| p / k as i64).collect();
                    let tokens = Tensor::<1, Int>::from_data(TensorData::new(tokens, [n]), &device);
                    let list = Tensor::<1, Int>::from_data(TensorData::new(list.clone(), [n]), &device);
                    let gu = x
                        .clone()
                        .select(0, tokens.clone())
                        .matmul(gate_up.clone().narrow(0, j, 1).reshape([h, 2 * self.width])); // [n, 2I]
                    let act = swiglu(gu, self.width, self.kernels);
                    let y =
                        act.matmul(down.clone().narrow(0, j, 1).reshape([self.width, h])) * w.clone().select(0, list);
                    out = out.select_assign(0, tokens, y, IndexingUpdateOp::Add);
                }
            }
        }
        (out, chosen)
    }

    /// The block with moela's kernels: the chosen experts' products read their weights in place (one
    /// launch per product and expert chunk, the chunks filling one output); the (token, slot) rows are left
    /// for the next norm to mix. `idx` / `w` hold `extra` shared slots per token (decode), or none: the
    /// shared experts then run here as products over all the tokens. `None`, before any product's launch
    /// (prefill's sort of the pairs may have run), when the gathered kernels do not cover the call.
    fn forward_wgsl(&self, x: &Tensor<2>, idx: &Tensor<2, Int>, w: &Tensor<2>, extra: usize) -> Option<BlockOutput> {
        let [t, h] = x.dims();
        let slots = idx.dims()[1];
        if !h.is_multiple_of(4) {
            return None; // the down products' kernels need whole vec4 columns
        }
        let flat = idx.clone().reshape([t * slots]);
        // Many tokens (prefill): the pairs sorted by expert on the GPU, so that each expert's weights are
        // read once per tile of its pairs rather than once per pair. Only where the pairs average two or
        // more per expert: a tile computes all its rows, so tiles of one pair would cost more than they save.
        let plan = if t > 1 && t * slots >= 2 * (self.experts + self.shared) {
            gpu::experts::sort(&flat, self.experts + self.shared)
        } else {
            None
        };
        // A few tokens (a batch's decode step): each expert's pairs are found in the kernel, and its
        // weights read once for all of them.
        let pairs = match &plan {
            Some(plan) => Pairs::Sorted(plan),
            None if (2..=gpu::matvec::MAX_ROWS).contains(&t) => Pairs::Collected(&flat, t),
            None => Pairs::Each(&flat),
        };
        // SwiGLU inside the gate/up launch where the weights' kernel has that variant, else its own launch.
        let act = match self.gathered_product(x, Side::GateUp, pairs, (slots, true)) {
            Some(act) => act,
            None => swiglu(
                self.gathered_product(x, Side::GateUp, pairs, (slots, false))?,
                self.width,
                self.kernels,
            ),
        }; // [P, I]
        // Down projections: one row per pair, written where `gathered_product` covers the chunk.
        let Some(routed) = self.gathered_product(&act, Side::Down, pairs, (1, false)) else {
            // Not expected once the gate/up products ran (same pairs, dtypes and stacks); burn's form then.
            let (idx, w) = self.with_shared(idx.clone(), w.clone(), self.shared - extra);
            return Some(BlockOutput::Dense(self.gathered(x.clone(), idx, w)));
        };
        // The shared experts, when not among the slots: a product per expert over all the tokens.
        let mut base: Option<Tensor<2>> = None;
        for j in extra..self.shared {
            let e = self.experts + j;
            let act = match self.expert_product(x, e, Side::GateUp, true) {
                Some(act) => act,
                None => swiglu(
                    self.expert_product(x, e, Side::GateUp, false)?,
                    self.width,
                    self.kernels,
                ),
            };
            let y = self.expert_product(&act, e, Side::Down, false)?;
            base = Some(match base {
                Some(b) => b + y,
                None => y,
            });
        }
        Some(BlockOutput::Experts {
            routed,
            weights: w.clone(),
            base,
        })
    }

    /// Each pair of `pairs` (`[P]`) times its expert's `side` matrix, row `p / x_div` of `x`: one
    /// launch per chunk (gathered, or grouped where the pairs are sorted), all writing one output `[P, N]`;
    /// with `glu`, SwiGLU of each gate/up row in the same launch (`[P, N/2]`). `None` when the kernels do
    /// not cover it (the first chunk declines exactly when any would: same pairs, dtypes and formats).
    fn gathered_product(
        &self,
        x: &Tensor<2>,
        side: Side,
        pairs: Pairs,
        (x_div, glu): (usize, bool),
    ) -> Option<Tensor<2>> {
        let mut out: Option<Tensor<2>> = None;
        for c in &self.chunks {
            let into = out.as_ref();
            out = Some(match c.weights(side) {
                Weights::Dense(_) if glu => return None,
                Weights::Dense(t) => gpu::experts::gathered_matvec(x, t, pairs, (c.first, x_div), into)?,
                Weights::Packed(p) => gpu::products::gathered(x, p, pairs, (c.first, x_div, glu), into)?,
            });
        }
        out
    }

    /// `x` (`[T, in]`) times expert `e`'s `side` matrix (with `glu`, SwiGLU in the same launch, where the
    /// kernel has it): moela's product for packed weights, burn's matmul for f32 ones.
    fn expert_product(&self, x: &Tensor<2>, e: usize, side: Side, glu: bool) -> Option<Tensor<2>> {
        let c = self.chunks.iter().find(|c| (c.first..c.first + c.count).contains(&e))?;
        let local = e - c.first;
        match c.weights(side) {
            Weights::Packed(p) => {
                let index = Tensor::<1, Int>::from_data(TensorData::new(vec![local as i32], [1]), &x.device());
                gpu::products::product_at(x, p, &index, glu)
            }
            Weights::Dense(_) if glu => None,
            Weights::Dense(t) => {
                let [_, k, n] = t.dims();
                Some(x.clone().matmul(as_f32(&t.clone().narrow(0, local, 1)).reshape([k, n])))
            }
        }
    }

    /// Only the selected experts' matrices are read: one batched product per (token, slot) pair, with the
    /// pairs' experts copied out by `select`. `idx` / `w`: `[T, slots]`, the shared experts among them.
    fn gathered(&self, x: Tensor<2>, idx: Tensor<2, Int>, w: Tensor<2>) -> Tensor<2> {
        let [t, h] = x.dims();
        let k = idx.dims()[1];
        let pairs = t * k;
        let idx = idx.reshape([pairs]);
        let w = w.reshape([pairs, 1, 1]);
        let xs = x.reshape([t, 1, 1, h]).expand([t, k, 1, h]).reshape([pairs, 1, h]);
        let parts: Vec<_> = self.chunks.iter().flat_map(|c| c.unpacked(self.kernels)).collect();
        let mut out: Option<Tensor<3>> = None;
        for (first, gate_up, down) in &parts {
            let count = gate_up.dims()[0];
            let (local, weight) = if parts.len() == 1 {
                (idx.clone(), w.clone())
            } else {
                let local = idx.clone().sub_scalar(*first as i64);
                let inside = local
                    .clone()
                    .greater_equal_elem(0)
                    .bool_and(local.clone().lower_elem(count as i64));
                let local = local.clamp(0, count as i64 - 1);
                (local, w.clone() * inside.float().reshape([pairs, 1, 1]))
            };
            let gu = xs.clone().matmul(gate_up.clone().select(0, local.clone())); // [P, 1, 2I]
            let act = swiglu(gu, self.width, self.kernels);
            let y = act.matmul(down.clone().select(0, local)) * weight; // [P, 1, H]
            out = Some(match out {
                Some(o) => o + y,
                None => y,
            });
        }
        let out = out.expect("a MoE layer has at least one expert chunk");
        out.reshape([t, k, h]).sum_dim(1).reshape([t, h])
    }

    /// Every expert on every token, mixed by a `[E + S, T]` weight matrix that is zero off the selection.
    fn dense(&self, x: Tensor<2>, idx: Tensor<2, Int>, w: Tensor<2>) -> Tensor<2> {
        let [t, h] = x.dims();
        let mix = Tensor::<2>::zeros([t, self.experts + self.shared], &x.device())
            .scatter(1, idx, w, IndexingUpdateOp::Add)
            .transpose(); // [E + S, T]
        let mut out: Option<Tensor<3>> = None;
        for (first, gate_up, down) in self.chunks.iter().flat_map(|c| c.unpacked(self.kernels)) {
            let count = gate_up.dims()[0];
            let xs = x.clone().reshape([1, t, h]).expand([count, t, h]);
            let gu = xs.matmul(gate_up); // [n, T, 2I]
            let act = swiglu(gu, self.width, self.kernels);
            let y = act.matmul(down); // [n, T, H]
            let m = mix.clone().narrow(0, first, count).reshape([count, t, 1]);
            let y = (y * m).sum_dim(0);
            out = Some(match out {
                Some(o) => o + y,
                None => y,
            });
        }
        out.expect("a MoE layer has at least one expert chunk").reshape([t, h])
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::*;
    use crate::gpu::WeightDtype;

    fn router(e: usize, h: usize, method: TopkMethod, scoring: ScoringFunc, device: &burn::tensor::Device) -> Moe {
        let w: Vec<f32> = Tensor::<1>::random([e * h], Distribution::Normal(0.0, 1.0), device)
            .into_data()
            .try_to_vec()
            .unwrap();
        let (n_group, topk_group) = match method {
            TopkMethod::Greedy => (1, 1),
            _ => (4, 2),
        };
        Moe {
            router: Linear::from_rows(&w, e, h, WeightDtype::F32, Kernels::Wgsl, device),
            correction_bias: (method == TopkMethod::NoauxTc)
                .then(|| Tensor::<1>::random([e], Distribution::Normal(0.0, 0.1), device)),
            chunks: Vec::new(),
            shared: 0,
            experts: e,
            top_k: 3,
            width: 1,
            scoring,
            method,
            n_group,
            topk_group,
            norm_topk_prob: method != TopkMethod::GroupLimitedGreedy,
            routed_scaling_factor: 2.5,
            kernels: Kernels::Wgsl,
        }
    }

    /// A block of `e` routed and `s` shared experts (`[H, 2I]` gate/up and `[I, H]` down per expert in
    /// `gu` / `down`) stored in `format`, in chunks starting at `starts`.
    #[allow(clippy::too_many_arguments)]
    fn block(
        template: &Moe,
        (gu, down): (&[f32], &[f32]),
        (h, i, s): (usize, usize, usize),
        starts: &[usize],
        format: WeightDtype,
        kernels: Kernels,
        device: &burn::tensor::Device,
    ) -> Moe {
        let total = template.experts + s;
        let mut ends = starts[1..].to_vec();
        ends.push(total);
        let chunks = starts
            .iter()
            .zip(ends)
            .map(|(&first, end)| ExpertChunk {
                first,
                count: end - first,
                gate_up_t: Weights::new(
                    gu[first * h * 2 * i..end * h * 2 * i].to_vec(),
                    [end - first, h, 2 * i],
                    format,
                    device,
                ),
                down_t: Weights::new(
                    down[first * i * h..end * i * h].to_vec(),
                    [end - first, i, h],
                    format,
                    device,
                ),
            })
            .collect();
        let mut m = template.clone();
        m.chunks = chunks;
        m.shared = s;
        m.width = i;
        m.kernels = kernels;
        m.router.kernels = kernels;
        m
    }

    #[test]
    fn chunked_stacks_and_shared_experts_match_one_stack_with_burn() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        // 10 routed experts and 2 shared ones in three chunks, the shared ones in the last with a routed one.
        let (e, s, h, i) = (10, 2, 24, 12);
        let template = router(e, h, TopkMethod::Greedy, ScoringFunc::Softmax, &device);
        let host = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|j| (((j + seed) * 7919 % 2003) as f32 - 1001.0) * 3e-4)
                .collect()
        };
        let (gu, down) = (host((e + s) * h * 2 * i, 1), host((e + s) * i * h, 2));
        for format in [WeightDtype::F32, WeightDtype::Q8] {
            let one = block(
                &template,
                (&gu, &down),
                (h, i, s),
                &[0],
                format,
                Kernels::Generic,
                &device,
            );
            for kernels in [Kernels::Wgsl, Kernels::Generic] {
                let split = block(&template, (&gu, &down), (h, i, s), &[0, 4, 9], format, kernels, &device);
                // One token (decode: the shared experts among the slots), a few (each pair reading its
                // expert) and more (prefill's pairs sorted by expert into tiles).
                for t in [1, 5, 29] {
                    let x = Tensor::<2>::random([t, h], Distribution::Normal(0.0, 1.0), &device);
                    let (want, want_idx) = one.forward(x.clone());
                    let (got, idx) = split.forward(x);
                    assert_eq!(idx.dims(), [t, 3], "{format:?} {kernels:?}: the routed choice only");
                    // Each token's set of experts (the two selections may order a token's slots apart).
                    let sets = |idx: Tensor<2, Int>| {
                        let ids: Vec<i64> = idx.into_data().iter::<i64>().collect();
                        let mut rows: Vec<Vec<i64>> = ids.chunks(3).map(<[i64]>::to_vec).collect();
                        rows.iter_mut().for_each(|r| r.sort_unstable());
                        rows
                    };
                    assert_eq!(
                        sets(idx),
                        sets(want_idx),
                        "{format:?} {kernels:?} {t} tokens: another choice"
                    );
                    let worst = crate::gpu::worst_difference(got, want);
                    assert!(
                        worst < 1e-4,
                        "{format:?} {kernels:?} {t} tokens: worst difference {worst}"
                    );
                }
            }
        }
    }

    #[test]
    fn routing_kernel_matches_burn_for_every_method() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        let cases = [
            (TopkMethod::Greedy, ScoringFunc::Softmax, 13),
            (TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, 20),
            (TopkMethod::NoauxTc, ScoringFunc::Sigmoid, 36),
        ];
        for (method, scoring, e) in cases {
            let mut moe = router(e, 24, method, scoring, &device);
            let x = Tensor::<2>::random([5, 24], Distribution::Normal(0.0, 1.0), &device);
            // The kernel directly (with the router product inside it, and from given logits), so that a
            // declined call cannot pass as burn's result.
            let Weights::Dense(gate) = &moe.router.parts[0] else {
                panic!("f32 routers are stored dense")
            };
            let product = gpu::experts::Logits::Product { x: &x, router: gate };
            let bias = moe.correction_bias.as_ref();
            let fused = gpu::experts::route(product, bias, &moe.route_shape()).expect("the kernel covers this router");
            let logits = moe.router.forward(x.clone());
            let (fast_idx, fast_w) =
                gpu::experts::route(gpu::experts::Logits::Given(&logits), bias, &moe.route_shape())
                    .expect("the kernel covers this router");
            moe.kernels = Kernels::Generic;
            moe.router.kernels = Kernels::Generic;
            let (idx, w) = moe.route(x);
            // Slot order may differ between the two selections: compare each token's (expert, weight) set.
            let sorted = |idx: Tensor<2, Int>, w: Tensor<2>| {
                let idx: Vec<i64> = idx.into_data().iter::<i64>().collect();
                let w: Vec<f32> = w.into_data().try_to_vec().unwrap();
                let mut rows: Vec<Vec<(i64, f32)>> = idx
                    .chunks(3)
                    .zip(w.chunks(3))
                    .map(|(i, w)| i.iter().copied().zip(w.iter().copied()).collect())
                    .collect();
                rows.iter_mut().for_each(|r| r.sort_by_key(|p| p.0));
                rows
            };
            let want = sorted(idx, w);
            for (t, (a, b)) in sorted(fused.0, fused.1).iter().zip(&want).enumerate() {
                for ((ea, wa), (eb, wb)) in a.iter().zip(b) {
                    assert_eq!(
                        ea, eb,
                        "{method:?} token {t} (router in the kernel): experts {a:?} vs {b:?}"
                    );
                    assert!(
                        (wa - wb).abs() < 1e-5,
                        "{method:?} token {t} (router in the kernel): {a:?} vs {b:?}"
                    );
                }
            }
            let fast = sorted(fast_idx.clone(), fast_w.clone());
            for (t, (a, b)) in fast.iter().zip(&want).enumerate() {
                for ((ea, wa), (eb, wb)) in a.iter().zip(b) {
                    assert_eq!(ea, eb, "{method:?} token {t}: experts {a:?} vs {b:?}");
                    assert!((wa - wb).abs() < 1e-5, "{method:?} token {t}: weights {a:?} vs {b:?}");
                }
            }
            // Two shared experts' slots appended: the same choice, then experts E and E + 1 at weight 1.
            let mut shape = moe.route_shape();
            shape.extra = 2;
            let (idx, w) = gpu::experts::route(gpu::experts::Logits::Given(&logits), bias, &shape)
                .expect("the kernel covers this router");
            assert_eq!(idx.dims(), [5, 5]);
            let ids: Vec<i64> = idx.clone().narrow(1, 3, 2).into_data().iter::<i64>().collect();
            assert_eq!(ids, (0..5).flat_map(|_| [e as i64, e as i64 + 1]).collect::<Vec<_>>());
            let ones: Vec<f32> = w.clone().narrow(1, 3, 2).into_data().try_to_vec().unwrap();
            assert!(ones.iter().all(|&v| v == 1.0), "{method:?}: shared weights {ones:?}");
            let same: Vec<i64> = idx.narrow(1, 0, 3).into_data().iter::<i64>().collect();
            assert_eq!(same, fast_idx.into_data().iter::<i64>().collect::<Vec<_>>());
            let worst = crate::gpu::worst_difference(w.narrow(1, 0, 3), fast_w);
            assert_eq!(worst, 0.0, "{method:?}: routed weights with shared slots");
        }
    }
}
