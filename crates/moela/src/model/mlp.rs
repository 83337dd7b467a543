//! The SwiGLU MLP: `down(silu(gate(x)) * up(x))` of the dense layers (the shared experts are stored as experts).

use burn::tensor::Tensor;
use burn::tensor::activation::silu;

use crate::gpu::{self, Kernels};
use crate::gpu::{Linear, Weights};

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
        // SwiGLU inside the gate/up product's launch where its kernel has that variant (8-bit and 4-bit).
        if self.gate_up.kernels == Kernels::Wgsl
            && let [Weights::Packed(p)] = self.gate_up.parts.as_slice()
            && let Some(act) = gpu::products::product_at(&x, p, &p.zero, true)
        {
            return self.down.forward(act);
        }
        self.down
            .forward(swiglu(self.gate_up.forward(x), self.width, self.gate_up.kernels))
    }
}

/// `silu(gate) * up` from a fused `[..., gate | up]` product whose last dimension is `2 * width`: one
/// launch of moela's kernel (`kernels` wgsl, where it applies), else burn's ops.
pub(super) fn swiglu<const D: usize>(gate_up: Tensor<D>, width: usize, kernels: Kernels) -> Tensor<D> {
    let dims = gate_up.dims();
    if kernels == Kernels::Wgsl && width > 0 {
        let rows = dims.iter().product::<usize>() / (2 * width);
        let flat: Tensor<2> = gate_up.clone().reshape([rows, 2 * width]);
        if let Some(y) = gpu::swiglu::swiglu(&flat, width) {
            let mut out = dims;
            out[D - 1] = width;
            return y.reshape(out);
        }
    }
    let up = gate_up.clone().narrow(D - 1, width, width);
    silu(gate_up.narrow(D - 1, 0, width)) * up
}
