//! DeepSeekMoE (`deepseek-architecture.md` §4): a router picks K of E routed experts per token, their outputs
//! are mixed by the router weights, and the shared experts (one wide MLP) are added.
//!
//! Routing, top-k and expert dispatch stay on the GPU for inference. Four dispatch forms, same result:
//! - moela's gathered kernel (`shaders/moe_matvec.wgsl`, `matvec_{f16,q8,q4}.wgsl`; decode and prefill on
//!   the wgpu device): each (token, slot) pair multiplies its chosen expert's weights where they are stored;
//! - gathered with burn's ops (few token-expert pairs, e.g. decode with `--kernels generic`): the selected
//!   experts' matrices are gathered with `select` and multiplied batched, so only the active experts'
//!   weights are read;
//! - dense (many tokens, e.g. prefill): every expert runs on every token of the chunk and the router weights
//!   (zero for unselected experts) mix the outputs;
//! - grouped (training): tokens are grouped by expert on the host and each expert multiplies only its rows.
//!
//! Stacked expert weights are split into chunks of experts that each fit one storage binding.

use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

use super::mlp::{Mlp, swiglu};
use super::norm::{Delta, mix};
use super::{Linear, Weights};
use crate::config::{ScoringFunc, TopkMethod};
use crate::kernels::{self, Kernels};

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
    /// Routed experts, chunked.
    pub chunks: Vec<ExpertChunk>,
    /// Shared experts fused into one MLP, when the model has any.
    pub shared: Option<Mlp>,
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

impl Moe {
    /// Picks experts: indices `[T, K]` and their mixing weights `[T, K]`.
    pub fn route(&self, x: Tensor<2>) -> (Tensor<2, Int>, Tensor<2>) {
        let [t, h] = x.dims();
        if self.kernels == Kernels::Wgsl {
            // Small routers run inside the routing kernel (one launch for product and selection); a large
            // one (E x H past a million weights, where one workgroup per token would be slow on a GPU)
            // gets its own matrix-vector launch first.
            let bias = self.correction_bias.as_ref();
            let chosen = match self.router.parts.as_slice() {
                [Weights::Dense(w)] if self.experts * h <= 1 << 20 => kernels::moe::route(
                    kernels::moe::Logits::Product { x: &x, router: w },
                    bias,
                    &self.route_shape(),
                ),
                _ => {
                    let logits = self.router.forward(x.clone());
                    kernels::moe::route(kernels::moe::Logits::Given(&logits), bias, &self.route_shape())
                }
            };
            if let Some(chosen) = chosen {
                return chosen;
            }
        }
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

    /// How the selection is made and its weights finished, as moela's routing kernel and burn's path both
    /// read it.
    fn route_shape(&self) -> kernels::moe::RouteShape {
        // Renormalised when the config says so (and K > 1); the factor applies always for V3 (sigmoid) and
        // for V2 (softmax) only when not renormalising.
        let normalise = self.norm_topk_prob && self.top_k > 1;
        let scaled = match self.scoring {
            ScoringFunc::Sigmoid => true,
            ScoringFunc::Softmax => !normalise,
        };
        kernels::moe::RouteShape {
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
        let (out, idx) = self.forward_delta(x);
        (out.into_tensor(), idx)
    }

    /// [`Moe::forward`], leaving the routed experts' mixing to the norm that adds the output to the
    /// residual stream (one launch fewer with moela's kernels).
    pub fn forward_delta(&self, x: Tensor<2>) -> (Delta, Tensor<2, Int>) {
        let [t, h] = x.dims();
        let (idx, w) = self.route(x.clone());
        // moela's gathered kernel reads each (token, slot) pair's expert in place, for decode and prefill
        // alike: no copies of expert matrices and no unpacked f32 experts. Without it, few pairs take the
        // batched gather and many the dense form.
        if self.kernels == Kernels::Wgsl
            && let Some(out) = self.forward_wgsl(&x, &idx, &w)
        {
            return (out, idx);
        }
        let routed = if t * self.top_k <= self.experts {
            self.gathered(x.clone(), idx.clone(), w)
        } else {
            self.dense(x.clone(), idx.clone(), w)
        };
        let routed = routed.reshape([t, h]);
        let out = match &self.shared {
            Some(s) => routed + s.forward(x),
            None => routed,
        };
        (Delta::Plain(out), idx)
    }

    /// The same block with tokens grouped by expert, for many tokens (training): each expert multiplies only
    /// the rows routed to it, so the work is that of the K chosen experts rather than all E. The routing is
    /// read to the host to build the groups.
    pub fn forward_grouped(&self, x: Tensor<2>) -> (Tensor<2>, Tensor<2, Int>) {
        let [t, h] = x.dims();
        let device = x.device();
        let k = self.top_k;
        let (idx, w) = self.route(x.clone());
        // Per expert, the (token, slot) pairs that chose it.
        let mut pairs: Vec<Vec<i64>> = vec![Vec::new(); self.experts];
        for (p, e) in idx.clone().into_data().iter::<i64>().enumerate() {
            if let Some(list) = usize::try_from(e).ok().and_then(|e| pairs.get_mut(e)) {
                list.push(p as i64);
            }
        }
        let w = w.reshape([t * k, 1]);
        let mut routed = Tensor::<2>::zeros([t, h], &device);
        for c in &self.chunks {
            let (gate_up, down) = (c.gate_up_t.to_f32(self.kernels), c.down_t.to_f32(self.kernels));
            for j in 0..c.count {
                let list = &pairs[c.first + j];
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
                let y = act.matmul(down.clone().narrow(0, j, 1).reshape([self.width, h])) * w.clone().select(0, list);
                routed = routed.select_assign(0, tokens, y, IndexingUpdateOp::Add);
            }
        }
        let out = match &self.shared {
            Some(s) => routed + s.forward(x),
            None => routed,
        };
        (out, idx)
    }

    /// The block with moela's kernels: the selected experts' products read their weights in place (one
    /// launch per product and expert chunk) and the routed and shared SwiGLU share a launch; the (token,
    /// slot) rows are left for the next norm to mix with the shared experts' output. `None`, before any
    /// launch, when the gathered kernels do not cover the call.
    fn forward_wgsl(&self, x: &Tensor<2>, idx: &Tensor<2, Int>, w: &Tensor<2>) -> Option<Delta> {
        let [t, h] = x.dims();
        let k = self.top_k;
        if !h.is_multiple_of(4) {
            return None; // the down products' kernels need whole vec4 columns
        }
        let flat = idx.clone().reshape([t * k]);
        let idx = &flat;
        let sum = |parts: Vec<Tensor<2>>| parts.into_iter().reduce(|a, b| a + b);
        let gate_up = self
            .chunks
            .iter()
            .map(|c| gathered_product(x, &c.gate_up_t, idx, c.first, k))
            .collect::<Option<Vec<_>>>()?;
        let gate_up = sum(gate_up)?; // [P, 2I]
        // Routed and shared SwiGLU in one launch where the kernel covers both.
        let (act, shared) = match &self.shared {
            None => (swiglu(gate_up, self.width, self.kernels), None),
            Some(s) => {
                let gu = s.gate_up.forward(x.clone());
                let (act, shared_act) = match kernels::mlp::swiglu_pair(&gate_up, self.width, Some((&gu, s.width))) {
                    Some((act, Some(shared_act))) => (act, shared_act),
                    _ => (
                        swiglu(gate_up, self.width, self.kernels),
                        swiglu(gu, s.width, self.kernels),
                    ),
                };
                (act, Some(s.down.forward(shared_act)))
            }
        };
        // Down projections: one row per pair, written where `gathered_product` covers the chunk.
        let down = self
            .chunks
            .iter()
            .map(|c| gathered_product(&act, &c.down_t, idx, c.first, 1))
            .collect::<Option<Vec<_>>>();
        let Some(routed) = down.and_then(sum) else {
            // Not expected once the gate/up products ran (same pairs, dtypes and stacks); burn's form then.
            let routed = self.gathered(x.clone(), idx.clone().reshape([t, k]), w.clone());
            return Some(Delta::Plain(shared.map_or(routed.clone(), |s| routed + s)));
        };
        // With shared experts the mixing is left to the next norm; without, it is done here.
        Some(match shared {
            Some(base) => Delta::Experts {
                routed,
                weights: w.clone(),
                base,
            },
            None => Delta::Plain(mix(routed, w, None)),
        })
    }

    /// Only the selected experts' matrices are read: one batched product per (token, slot) pair, with the
    /// pairs' experts copied out by `select`.
    fn gathered(&self, x: Tensor<2>, idx: Tensor<2, Int>, w: Tensor<2>) -> Tensor<2> {
        let [t, h] = x.dims();
        let k = self.top_k;
        let pairs = t * k;
        let idx = idx.reshape([pairs]);
        let w = w.reshape([pairs, 1, 1]);
        let xs = x.reshape([t, 1, 1, h]).expand([t, k, 1, h]).reshape([pairs, 1, h]);
        let mut out: Option<Tensor<3>> = None;
        for c in &self.chunks {
            let (local, weight) = if self.chunks.len() == 1 {
                (idx.clone(), w.clone())
            } else {
                let local = idx.clone().sub_scalar(c.first as i64);
                let inside = local
                    .clone()
                    .greater_equal_elem(0)
                    .bool_and(local.clone().lower_elem(c.count as i64));
                let local = local.clamp(0, c.count as i64 - 1);
                (local, w.clone() * inside.float().reshape([pairs, 1, 1]))
            };
            let gu = xs
                .clone()
                .matmul(c.gate_up_t.to_f32(self.kernels).select(0, local.clone())); // [P, 1, 2I]
            let act = swiglu(gu, self.width, self.kernels);
            let y = act.matmul(c.down_t.to_f32(self.kernels).select(0, local)) * weight; // [P, 1, H]
            out = Some(match out {
                Some(o) => o + y,
                None => y,
            });
        }
        let out = out.expect("a MoE layer has at least one expert chunk");
        out.reshape([t, k, h]).sum_dim(1).reshape([t, h])
    }

    /// Every expert on every token, mixed by a `[E, T]` weight matrix that is zero off the selection.
    fn dense(&self, x: Tensor<2>, idx: Tensor<2, Int>, w: Tensor<2>) -> Tensor<2> {
        let [t, h] = x.dims();
        let mix = Tensor::<2>::zeros([t, self.experts], &x.device())
            .scatter(1, idx, w, IndexingUpdateOp::Add)
            .transpose(); // [E, T]
        let mut out: Option<Tensor<3>> = None;
        for c in &self.chunks {
            let xs = x.clone().reshape([1, t, h]).expand([c.count, t, h]);
            let gu = xs.matmul(c.gate_up_t.to_f32(self.kernels)); // [Ec, T, 2I]
            let act = swiglu(gu, self.width, self.kernels);
            let y = act.matmul(c.down_t.to_f32(self.kernels)); // [Ec, T, H]
            let m = mix.clone().narrow(0, c.first, c.count).reshape([c.count, t, 1]);
            let y = (y * m).sum_dim(0);
            out = Some(match out {
                Some(o) => o + y,
                None => y,
            });
        }
        out.expect("a MoE layer has at least one expert chunk").reshape([t, h])
    }
}

/// One expert chunk's gathered products with the kernel of its storage format.
fn gathered_product(
    x: &Tensor<2>,
    w: &Weights<3>,
    idx: &Tensor<1, Int>,
    first: usize,
    x_div: usize,
) -> Option<Tensor<2>> {
    match w {
        Weights::Dense(t) => kernels::moe::gathered_matvec(x, t, idx, first, x_div),
        Weights::Packed(p) => kernels::packed::gathered(x, p, idx, first, x_div),
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::*;
    use crate::model::WeightDtype;

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
            router: Linear::from_rows(&w, e, h, WeightDtype::F32, device),
            correction_bias: (method == TopkMethod::NoauxTc)
                .then(|| Tensor::<1>::random([e], Distribution::Normal(0.0, 0.1), device)),
            chunks: Vec::new(),
            shared: None,
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

    #[test]
    fn routing_kernel_matches_burn_for_every_method() {
        let Ok(device) = crate::engine::default_device() else {
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
            let product = kernels::moe::Logits::Product { x: &x, router: gate };
            let bias = moe.correction_bias.as_ref();
            let fused = kernels::moe::route(product, bias, &moe.route_shape()).expect("the kernel covers this router");
            let logits = moe.router.forward(x.clone());
            let (fast_idx, fast_w) =
                kernels::moe::route(kernels::moe::Logits::Given(&logits), bias, &moe.route_shape())
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
            let fast = sorted(fast_idx, fast_w);
            for (t, (a, b)) in fast.iter().zip(&want).enumerate() {
                for ((ea, wa), (eb, wb)) in a.iter().zip(b) {
                    assert_eq!(ea, eb, "{method:?} token {t}: experts {a:?} vs {b:?}");
                    assert!((wa - wb).abs() < 1e-5, "{method:?} token {t}: weights {a:?} vs {b:?}");
                }
            }
        }
    }
}
