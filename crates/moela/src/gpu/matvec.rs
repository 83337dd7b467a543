//! `shaders/matvec.wgsl`: `x @ w` for up to [`MAX_ROWS`] rows of `x` (decode, and the few tokens of a
//! speculative or short step), f32 weights stored `[in, out]`.

use burn::tensor::{DType, Tensor};

use super::shader::Shader;
use super::{WgslKernel, cube_tensor, empty, float, launch};
const WORKGROUP: u32 = 64;

/// The most rows of `x` one launch takes.
pub const MAX_ROWS: usize = 8;

/// `x` (`[M, K]`, M <= [`MAX_ROWS`]) times `w` (`[K, N]`, f32, N a multiple of 4) on the wgpu device;
/// `None` when the kernel does not cover the call (the caller then uses burn's matmul).
pub fn matvec(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    let [m, k] = x.dims();
    let [k2, n] = w.dims();
    if m == 0 || m > MAX_ROWS || k != k2 || n % 4 != 0 || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return None;
    }
    let groups = u32::try_from((n / 4).div_ceil(WORKGROUP as usize)).ok()?;
    if groups > 65_535 {
        return None;
    }
    let (x, w) = (cube_tensor(x)?, cube_tensor(w)?);
    let out = empty(&x, m * n);
    let kernel = WgslKernel::new("matvec", "main", Shader::Matvec { rows: m }, WORKGROUP)?;
    launch(
        &x,
        kernel,
        [groups, 1, 1],
        &[&x.handle, &w.handle, &out],
        &[k as u32, (n / 4) as u32],
    );
    Some(float(&x, out, [m, n]))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::*;

    fn device() -> Option<burn::tensor::Device> {
        crate::gpu::device::default_device().ok()
    }

    #[test]
    fn matches_burn_matmul_on_awkward_sizes() {
        let Some(device) = device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        for (m, k, n) in [(1, 77, 148), (3, 200, 4), (8, 33, 1028), (5, 1, 12), (1, 1000, 516)] {
            let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
            let fast = matvec(&x, &w).expect("the kernel covers this shape");
            let reference = x.matmul(w);
            let (a, b) = (
                fast.into_data().try_to_vec::<f32>().unwrap(),
                reference.into_data().try_to_vec::<f32>().unwrap(),
            );
            let worst = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs() / q.abs().max(1.0))
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{m}x{k}x{n}: worst difference {worst}");
        }
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let Some(device) = device() else {
            return;
        };
        let w = Tensor::<2>::zeros([16, 10], &device); // N not a multiple of 4
        assert!(matvec(&Tensor::zeros([1, 16], &device), &w).is_none());
        let w = Tensor::<2>::zeros([16, 12], &device);
        assert!(matvec(&Tensor::zeros([9, 16], &device), &w).is_none()); // too many rows
        assert!(matvec(&Tensor::zeros([1, 15], &device), &w).is_none()); // K mismatch
    }
}
