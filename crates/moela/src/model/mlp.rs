//! The SwiGLU MLP: `down(silu(gate(x)) * up(x))`, used for dense layers and the shared experts.

use burn::tensor::Tensor;
use burn::tensor::activation::silu;

use super::Linear;

/// Gate and up fused into one product (`[H] -> [2I]`), then down (`[I] -> [H]`).
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `[gate | up]` columns, `[H] -> [2I]`.
    pub gate_up: Linear,
    /// `down_proj`, `[I] -> [H]`.
    pub down: Linear,
    /// I.
    pub width: usize,
}

impl Mlp {
    /// `x`: `[T, H]` -> `[T, H]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let gu = self.gate_up.forward(x);
        let gate = gu.clone().narrow(1, 0, self.width);
        let up = gu.narrow(1, self.width, self.width);
        self.down.forward(silu(gate) * up)
    }
}
