//! RMSNorm in f32: `w * x / sqrt(mean(x^2) + eps)` (`docs/architecture.md` §2).

use burn::tensor::{Device, Tensor, TensorData};

use crate::gpu::rms_norm::Residual;
use crate::gpu::{self, Kernels};

/// Root-mean-square normalisation over the last dimension with a learned gain.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Gain, `[width]`.
    pub weight: Tensor<1>,
    /// Added to the mean square before the root.
    pub eps: f64,
    /// moela's fused kernel (`shaders/rmsnorm.wgsl`, where it applies) or burn's ops.
    pub kernels: Kernels,
}

impl RmsNorm {
    /// A norm from host values.
    pub fn new(weight: Vec<f32>, eps: f64, device: &Device) -> Self {
        let n = weight.len();
        Self {
            weight: Tensor::from_data(TensorData::new(weight, [n]), device),
            eps,
            kernels: Kernels::default(),
        }
    }

    /// Normalises `x` (`[.., width]`) over its last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let n = dims[D - 1];
        if self.kernels == Kernels::Wgsl && n > 0 {
            let rows = dims.iter().product::<usize>() / n;
            let flat: Tensor<2> = x.clone().reshape([rows, n]);
            if let Some((y, _)) = gpu::rms_norm::rms_norm(&flat, Residual::None, &self.weight, self.eps) {
                return y.reshape(dims);
            }
        }
        let ms = x.clone().square().mean_dim(D - 1);
        let inv = ms.add_scalar(self.eps).sqrt().recip();
        let mut shape = [1usize; D];
        shape[D - 1] = self.weight.dims()[0];
        x * inv * self.weight.clone().reshape(shape)
    }

    /// The residual add fused with the norm after it: returns `(x + delta, norm(x + delta))`, or
    /// `(x, norm(x))` without `delta`. One launch with moela's kernel, a MoE block's mixing included.
    pub fn forward_add(&self, x: Tensor<2>, delta: Option<Delta>) -> (Tensor<2>, Tensor<2>) {
        if self.kernels == Kernels::Wgsl {
            let residual = match &delta {
                None => Residual::None,
                Some(Delta::Plain(d)) => Residual::Add(d),
                Some(Delta::Experts { routed, weights, base }) => Residual::Experts {
                    routed,
                    weights,
                    base: base.as_ref(),
                },
            };
            if let Some((y, sum)) = gpu::rms_norm::rms_norm(&x, residual, &self.weight, self.eps) {
                return (sum.unwrap_or(x), y);
            }
        }
        let x = match delta {
            Some(d) => x + d.into_tensor(),
            None => x,
        };
        let y = self.forward(x.clone());
        (x, y)
    }
}

/// A block's output on its way into the residual stream.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // three tensor handles, one per block and step, moved not copied
pub enum Delta {
    /// One tensor `[T, H]`.
    Plain(Tensor<2>),
    /// A MoE block's output before its experts are mixed: the gathered down projections `routed`
    /// `[T * K, H]` (one row per token and slot; the shared experts among them when they ran stacked with
    /// the routed ones), their weights `[T, K]` and, when the shared experts ran apart, their output
    /// `base` `[T, H]`; the norm that adds it mixes it in the same launch.
    Experts {
        /// `[T * K, H]`.
        routed: Tensor<2>,
        /// `[T, K]`.
        weights: Tensor<2>,
        /// `[T, H]`, or nothing.
        base: Option<Tensor<2>>,
    },
}

impl Delta {
    /// The output as one tensor `[T, H]`.
    pub fn into_tensor(self) -> Tensor<2> {
        match self {
            Delta::Plain(t) => t,
            Delta::Experts { routed, weights, base } => mix(routed, &weights, base.as_ref()),
        }
    }

    /// Only the last of its `t` token rows.
    pub fn last(self, t: usize) -> Self {
        match self {
            Delta::Plain(d) => Delta::Plain(d.narrow(0, t - 1, 1)),
            Delta::Experts { routed, weights, base } => {
                let k = weights.dims()[1];
                Delta::Experts {
                    routed: routed.narrow(0, (t - 1) * k, k),
                    weights: weights.narrow(0, t - 1, 1),
                    base: base.map(|b| b.narrow(0, t - 1, 1)),
                }
            }
        }
    }
}

/// A MoE block's output from its gathered down projections `routed` (`[T * K, H]`), their router weights
/// `[T, K]` and the shared experts' output `base`: one launch of moela's kernel, else burn's ops.
pub(crate) fn mix(routed: Tensor<2>, weights: &Tensor<2>, base: Option<&Tensor<2>>) -> Tensor<2> {
    if let Some(out) = gpu::experts::combine(&routed, weights, base) {
        return out;
    }
    let [t, k] = weights.dims();
    let h = routed.dims()[1];
    let mixed = (routed * weights.clone().reshape([t * k, 1]))
        .reshape([t, k, h])
        .sum_dim(1)
        .reshape([t, h]);
    match base {
        Some(b) => mixed + b.clone(),
        None => mixed,
    }
}
