//! RMSNorm in f32: `w * x / sqrt(mean(x^2) + eps)` (`deepseek-architecture.md` §2).

use burn::tensor::{Device, Tensor, TensorData};

/// Root-mean-square normalisation over the last dimension with a learned gain.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Gain, `[width]`.
    pub weight: Tensor<1>,
    /// Added to the mean square before the root.
    pub eps: f64,
}

impl RmsNorm {
    /// A norm from host values.
    pub fn new(weight: Vec<f32>, eps: f64, device: &Device) -> Self {
        let n = weight.len();
        Self {
            weight: Tensor::from_data(TensorData::new(weight, [n]), device),
            eps,
        }
    }

    /// Normalises `x` (`[.., width]`) over its last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let ms = x.clone().square().mean_dim(D - 1);
        let inv = ms.add_scalar(self.eps).sqrt().recip();
        let mut shape = [1usize; D];
        shape[D - 1] = self.weight.dims()[0];
        x * inv * self.weight.clone().reshape(shape)
    }
}
