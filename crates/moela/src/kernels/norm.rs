//! `shaders/rmsnorm.wgsl`: RMSNorm over rows, alone or fused with the residual add before it.

use std::sync::OnceLock;

use burn::tensor::{DType, Tensor};

use super::{WgslKernel, cube_tensor, empty, float, launch, tagged};

const SOURCE: &str = include_str!("../../../../shaders/rmsnorm.wgsl");

/// The shader without (0) and with (1) the residual add.
fn source(add: bool) -> &'static str {
    static VARIANTS: OnceLock<[String; 2]> = OnceLock::new();
    &VARIANTS.get_or_init(|| [tagged(SOURCE, "ADD", false, 3), tagged(SOURCE, "ADD", true, 5)])[usize::from(add)]
}

/// `gain * x / sqrt(mean(x^2) + eps)` over each row of `x` (`[rows, n]`); with `delta`, the rows of
/// `x + delta` instead, and that sum is returned too (the new residual stream). `None` when the kernel does
/// not cover the call.
pub fn rms_norm(
    x: &Tensor<2>,
    delta: Option<&Tensor<2>>,
    gain: &Tensor<1>,
    eps: f64,
) -> Option<(Tensor<2>, Option<Tensor<2>>)> {
    let [rows, n] = x.dims();
    if rows == 0 || rows > 65_535 || gain.dims() != [n] || x.dtype() != DType::F32 || gain.dtype() != DType::F32 {
        return None;
    }
    if delta.is_some_and(|d| d.dims() != [rows, n] || d.dtype() != DType::F32) {
        return None;
    }
    let (xc, g) = (cube_tensor(x)?, cube_tensor(gain)?);
    let d = match delta {
        Some(d) => Some(cube_tensor(d)?),
        None => None,
    };
    let out = empty(&xc, rows * n);
    let kernel = WgslKernel {
        name: "rmsnorm",
        entry: "main",
        source: source(d.is_some()),
        variant: u32::from(d.is_some()),
        workgroup: 64,
    };
    let info = [n as u32, (eps as f32).to_bits()];
    let groups = [rows as u32, 1, 1];
    match d {
        None => {
            launch(&xc, kernel, groups, &[&xc.handle, &g.handle, &out], &info);
            Some((float(&xc, out, [rows, n]), None))
        }
        Some(d) => {
            let sum = empty(&xc, rows * n);
            launch(
                &xc,
                kernel,
                groups,
                &[&xc.handle, &g.handle, &out, &d.handle, &sum],
                &info,
            );
            Some((float(&xc, out, [rows, n]), Some(float(&xc, sum, [rows, n]))))
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;

    use super::*;
    use crate::model::norm::RmsNorm;

    fn worst(a: Tensor<2>, b: Tensor<2>) -> f32 {
        let (a, b) = (
            a.into_data().try_to_vec::<f32>().unwrap(),
            b.into_data().try_to_vec::<f32>().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs() / q.abs().max(1.0))
            .fold(0f32, f32::max)
    }

    #[test]
    fn matches_burn_norm_with_and_without_residual() {
        let Ok(device) = crate::engine::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        for (rows, n) in [(1, 1024), (3, 77), (5, 130), (2, 1)] {
            let x = Tensor::<2>::random([rows, n], Distribution::Normal(0.0, 2.0), &device);
            let delta = Tensor::<2>::random([rows, n], Distribution::Normal(0.0, 1.0), &device);
            let gain = Tensor::<1>::random([n], Distribution::Normal(1.0, 0.3), &device);
            let norm = RmsNorm {
                weight: gain.clone(),
                eps: 1e-6,
                kernels: crate::kernels::Kernels::Generic,
            };
            let (out, none) = rms_norm(&x, None, &gain, 1e-6).expect("the kernel covers this shape");
            assert!(none.is_none());
            assert!(worst(out, norm.forward(x.clone())) < 1e-5, "{rows}x{n}");
            let (out, sum) = rms_norm(&x, Some(&delta), &gain, 1e-6).unwrap();
            let want_sum = x + delta;
            assert!(worst(sum.unwrap(), want_sum.clone()) < 1e-6, "{rows}x{n} sum");
            assert!(worst(out, norm.forward(want_sum)) < 1e-5, "{rows}x{n} add");
        }
    }
}
