//! The residual stream `h` between the transformer's blocks, and the adds into it.
//!
//! A block computes `h = h + f(norm(h))`. With moela's kernels the add is not a launch of its own: the norm
//! that reads the stream next adds the pending output in its launch (`shaders/rmsnorm.wgsl`), and a MoE
//! block's output is even mixed there (the weighted sum of its experts' rows). [`Residual`] keeps that
//! fusion here, so a block's `forward` can say what the math says (`h.add(out)`, then `h.norm(&n)`) and
//! nothing travels between blocks but the stream.

use burn::tensor::Tensor;

use super::experts::mix;
use super::rms_norm::{RmsNorm, Sum};

/// A block's output on its way into the residual stream.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // three tensor handles, one per block and step, moved not copied
pub enum BlockOutput {
    /// One tensor `[T, H]`.
    Dense(Tensor<2>),
    /// A MoE block's output before its experts are mixed: the gathered down projections `routed`
    /// `[T * K, H]` (one row per token and slot; the shared experts among them when they ran stacked with
    /// the routed ones), their weights `[T, K]` and, when the shared experts ran apart, their output
    /// `base` `[T, H]`.
    Experts {
        /// `[T * K, H]`.
        routed: Tensor<2>,
        /// `[T, K]`.
        weights: Tensor<2>,
        /// `[T, H]`, or nothing.
        base: Option<Tensor<2>>,
    },
}

impl BlockOutput {
    /// The output as one tensor `[T, H]`.
    pub fn into_tensor(self) -> Tensor<2> {
        match self {
            BlockOutput::Dense(t) => t,
            BlockOutput::Experts { routed, weights, base } => mix(routed, &weights, base.as_ref()),
        }
    }

    /// Only the last of its `t` token rows.
    fn last(self, t: usize) -> Self {
        match self {
            BlockOutput::Dense(d) => BlockOutput::Dense(d.narrow(0, t - 1, 1)),
            BlockOutput::Experts { routed, weights, base } => {
                let k = weights.dims()[1];
                BlockOutput::Experts {
                    routed: routed.narrow(0, (t - 1) * k, k),
                    weights: weights.narrow(0, t - 1, 1),
                    base: base.map(|b| b.narrow(0, t - 1, 1)),
                }
            }
        }
    }
}

/// The hidden state `h` (`[T, H]`) with the last block's output not yet added.
#[derive(Debug, Clone)]
pub struct Residual {
    h: Tensor<2>,
    pending: Option<BlockOutput>,
}

impl Residual {
    /// The stream starting at the token embeddings.
    pub fn new(h: Tensor<2>) -> Self {
        Self { h, pending: None }
    }

    /// `h = h + out`: added by the next [`norm`](Self::norm), in its launch.
    pub fn add(&mut self, out: BlockOutput) {
        if let Some(earlier) = self.pending.take() {
            self.h = self.h.clone() + earlier.into_tensor();
        }
        self.pending = Some(out);
    }

    /// `norm(h)`, adding what is pending first (one launch with moela's kernel).
    pub fn norm(&mut self, norm: &RmsNorm) -> Tensor<2> {
        let sum = match &self.pending {
            None => Sum::None,
            Some(BlockOutput::Dense(d)) => Sum::Add(d),
            Some(BlockOutput::Experts { routed, weights, base }) => Sum::Experts {
                routed,
                weights,
                base: base.as_ref(),
            },
        };
        let (h, y) = norm.forward_sum(&self.h, sum);
        self.h = h;
        self.pending = None;
        y
    }

    /// The stream at the last of its `t` tokens only (what the head reads in generation).
    pub fn last(self, t: usize) -> Self {
        Self {
            h: self.h.narrow(0, t - 1, 1),
            pending: self.pending.map(|p| p.last(t)),
        }
    }
}
