//! The DeepSeek-V2/V3 transformer in burn: one file per block.
//!
//! Reference: DeepSeek-V2 (arXiv:2405.04434) and DeepSeek-V3 (arXiv:2412.19437) technical reports, and
//! HF transformers' `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM`, which the tests compare against.

pub mod mla;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod params;
pub mod rope;
pub mod transformer;

use burn::tensor::{DType, Device, Tensor, TensorData};
use half::f16;

use crate::error::{Error, Result};
use crate::kernels::{self, Kernels};

/// The dtype weights are kept in on the GPU. Activations, norms, softmax and router stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum WeightDtype {
    /// 4 bytes per weight; runs everywhere.
    #[default]
    F32,
    /// 2 bytes per weight; needs the adapter's shader-f16.
    F16,
}

impl WeightDtype {
    /// Bytes per stored weight.
    pub fn bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::F16 => 2,
        }
    }

    /// Parses `f32` / `f16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => Err(Error::InvalidArgument(format!(
                "weight dtype {other:?}: expected f32 or f16"
            ))),
        }
    }
}

/// The most bytes one tensor may take: WebGPU's guaranteed storage-binding size (128 MiB).
pub const MAX_BINDING_BYTES: usize = 128 << 20;

/// A projection `x W^T` with the weight stored transposed, `[in, out]`, so the product is `x @ w`.
/// Weights larger than one storage binding are split by output columns.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Column blocks of the `[in, out]` weight, each within [`MAX_BINDING_BYTES`].
    pub parts: Vec<Tensor<2>>,
    /// Whether few-row products run moela's matrix-vector kernel (where it applies) or burn's matmul.
    pub kernels: Kernels,
}

impl Linear {
    /// Uploads an `[out, in]` row-major weight (HF layout), transposed and split to fit bindings.
    pub fn from_rows(w: &[f32], out: usize, inp: usize, dtype: WeightDtype, device: &Device) -> Self {
        let per_part = (MAX_BINDING_BYTES / (inp * dtype.bytes()).max(1)).clamp(1, out.max(1));
        let parts = (0..out)
            .step_by(per_part)
            .map(|r0| {
                let rows = per_part.min(out - r0);
                let block = &w[r0 * inp..(r0 + rows) * inp];
                upload(transpose(block, rows, inp), [inp, rows], dtype, device)
            })
            .collect();
        Self {
            parts,
            kernels: Kernels::default(),
        }
    }

    /// `x`: `[T, in]` -> `[T, out]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        if self.parts.len() == 1 {
            return self.part(&x, &self.parts[0]);
        }
        let outs = self.parts.iter().map(|p| self.part(&x, p)).collect();
        Tensor::cat(outs, 1)
    }

    fn part(&self, x: &Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
        if self.kernels == Kernels::Wgsl
            && let Some(y) = kernels::matvec::matvec(x, w)
        {
            return y;
        }
        x.clone().matmul(as_f32(w))
    }
}

/// The tensor in f32: stored f16 weights are widened for the product (accumulation stays f32).
pub fn as_f32<const D: usize>(t: &Tensor<D>) -> Tensor<D> {
    if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.clone().cast(DType::F32)
    }
}

/// Uploads host values as a tensor of the chosen weight dtype.
pub fn upload<const D: usize>(data: Vec<f32>, shape: [usize; D], dtype: WeightDtype, device: &Device) -> Tensor<D> {
    match dtype {
        WeightDtype::F32 => Tensor::from_data(TensorData::new(data, shape), device),
        WeightDtype::F16 => {
            let half: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
            Tensor::from_data(TensorData::new(half, shape), device)
        }
    }
}

/// Transposes a row-major `[rows, cols]` matrix.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    // Blocked so both sides stay in cache for big matrices.
    const B: usize = 32;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    out
}
