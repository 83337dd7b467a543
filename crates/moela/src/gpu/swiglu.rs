//! SwiGLU, `silu(gate) * up` of a fused `[gate | up]` product: `shaders/swiglu.wgsl`, else burn's ops.

use burn::tensor::activation::silu;
use burn::tensor::{DType, Tensor};

use super::shader::Shader;
use super::{Kernels, WgslKernel, cube_tensor, empty, float, grid, launch};

/// `silu(gate) * up` from a fused `[..., gate | up]` product whose last dimension is `2 * width`: one
/// launch of moela's kernel (`kernels` wgsl, where it applies), else burn's ops.
pub fn swiglu<const D: usize>(gate_up: Tensor<D>, width: usize, kernels: Kernels) -> Tensor<D> {
    let dims = gate_up.dims();
    if kernels == Kernels::Wgsl && width > 0 {
        let rows = dims.iter().product::<usize>() / (2 * width);
        let flat: Tensor<2> = gate_up.clone().reshape([rows, 2 * width]);
        if let Some(y) = launch_swiglu(&flat, width) {
            let mut out = dims;
            out[D - 1] = width;
            return y.reshape(out);
        }
    }
    let up = gate_up.clone().narrow(D - 1, width, width);
    silu(gate_up.narrow(D - 1, 0, width)) * up
}

/// `gu` (`[rows, 2 * width]`) -> `[rows, width]`; `None` when the kernel does not cover the call.
fn launch_swiglu(gu: &Tensor<2>, width: usize) -> Option<Tensor<2>> {
    let [rows, w2] = gu.dims();
    let total = rows * width;
    if w2 != 2 * width || total == 0 || total > u32::MAX as usize || gu.dtype() != DType::F32 {
        return None;
    }
    // vec4 values where the width allows it.
    let lanes = if width.is_multiple_of(4) { 4 } else { 1 };
    let groups = grid(total / lanes)?;
    let x = cube_tensor(gu)?;
    let kernel = WgslKernel::new("swiglu", "main", Shader::Swiglu { wide: lanes == 4 }, 64)?;
    let info = [width / lanes, total / lanes, 0, 0].map(|v| v as u32);
    let out = empty(&x, total);
    launch(&x, kernel, groups, &[&x.handle, &out], &info);
    Some(float(&x, out, [rows, width]))
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;

    use super::*;
    use crate::gpu::worst_difference;

    #[test]
    fn matches_burn_silu_times_up() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        let reference =
            |gu: &Tensor<2>, width: usize| silu(gu.clone().narrow(1, 0, width)) * gu.clone().narrow(1, width, width);
        for (rows, width) in [(1, 512), (3, 37), (7, 1)] {
            let gu = Tensor::<2>::random([rows, 2 * width], Distribution::Normal(0.0, 3.0), &device);
            let fast = launch_swiglu(&gu, width).expect("the kernel covers this shape");
            assert!(worst_difference(fast, reference(&gu, width)) < 1e-5, "{rows}x{width}");
        }
    }
}
