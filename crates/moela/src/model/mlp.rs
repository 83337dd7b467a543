//! The SwiGLU MLP: `down(silu(gate(x)) * up(x))` of the dense layers (the shared experts are stored as experts).

use burn::tensor::Tensor;

use super::reader::Reader;
use crate::error::Result;
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
    /// Loads the MLP under `p` (`{p}gate_proj`, `up_proj`, `down_proj`), `[H] -> [I] -> [H]`.
    pub(crate) async fn load(r: &mut Reader<'_>, p: &str, h: usize, i: usize) -> Result<Mlp> {
        Ok(Mlp {
            gate_up: r.linear(&gate_up(p), i, h).await?,
            down: r.linear(&[format!("{p}down_proj.weight")], h, i).await?,
            width: i,
        })
    }

    /// Bytes the weights take on the device.
    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }

    /// `x`: `[T, H]` -> `[T, H]`: `down(silu(gate(x)) * up(x))`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.down.forward(self.gate_up.forward_swiglu(x, self.width))
    }
}

/// `gate_proj` and `up_proj` under `p`: stacked, their rows are `[2I, H]`, the order [`Mlp`] splits them in.
pub(crate) fn gate_up(p: &str) -> [String; 2] {
    [format!("{p}gate_proj.weight"), format!("{p}up_proj.weight")]
}
