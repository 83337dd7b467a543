//! RMSNorm in f32: `w * x / sqrt(mean(x^2) + eps)` (`deepseek-architecture.md` §2).

use burn::tensor::{Device, Tensor, TensorData};

use crate::kernels::{self, Kernels};

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
            if let Some((y, _)) = kernels::norm::rms_norm(&flat, None, &self.weight, self.eps) {
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
    /// `(x, norm(x))` without `delta`. One launch with moela's kernel.
    pub fn forward_add(&self, x: Tensor<2>, delta: Option<Tensor<2>>) -> (Tensor<2>, Tensor<2>) {
        if self.kernels == Kernels::Wgsl
            && let Some((y, sum)) = kernels::norm::rms_norm(&x, delta.as_ref(), &self.weight, self.eps)
        {
            return (sum.unwrap_or(x), y);
        }
        let x = match delta {
            Some(d) => x + d,
            None => x,
        };
        let y = self.forward(x.clone());
        (x, y)
    }
}
