//! The SwiGLU MLP: `down(silu(gate(x)) * up(x))` of the dense layers (the shared experts are stored as experts).

use burn::tensor::Tensor;

use crate::gpu::Linear;

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
    /// `x`: `[T, H]` -> `[T, H]`: `down(silu(gate(x)) * up(x))`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.down.forward(self.gate_up.forward_swiglu(x, self.width))
    }
}
