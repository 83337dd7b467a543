//! `shaders/swiglu.wgsl`: `silu(gate) * up` of a fused `[gate | up]` product in one launch.

use burn::tensor::{DType, Tensor};

use super::{WgslKernel, cube_tensor, empty, float, grid, launch};

const SOURCE: &str = include_str!("../../../../shaders/swiglu.wgsl");

/// `gu` (`[rows, 2 * width]`) -> `[rows, width]`; `None` when the kernel does not cover the call.
pub fn swiglu(gu: &Tensor<2>, width: usize) -> Option<Tensor<2>> {
    let [rows, w2] = gu.dims();
    let total = rows * width;
    if w2 != 2 * width || total == 0 || total > u32::MAX as usize || gu.dtype() != DType::F32 {
        return None;
    }
    let groups = grid(total)?;
    let x = cube_tensor(gu)?;
    let out = empty(&x, total);
    let kernel = WgslKernel {
        name: "swiglu",
        entry: "main",
        source: SOURCE,
        variant: 0,
        workgroup: 64,
    };
    launch(&x, kernel, groups, &[&x.handle, &out], &[width as u32, total as u32]);
    Some(float(&x, out, [rows, width]))
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;
    use burn::tensor::activation::silu;

    use super::*;

    #[test]
    fn matches_burn_silu_times_up() {
        let Ok(device) = crate::engine::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        for (rows, width) in [(1, 512), (3, 37), (7, 1)] {
            let gu = Tensor::<2>::random([rows, 2 * width], Distribution::Normal(0.0, 3.0), &device);
            let fast = swiglu(&gu, width).expect("the kernel covers this shape");
            let want = silu(gu.clone().narrow(1, 0, width)) * gu.narrow(1, width, width);
            let (a, b) = (
                fast.into_data().try_to_vec::<f32>().unwrap(),
                want.into_data().try_to_vec::<f32>().unwrap(),
            );
            let worst = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs() / q.abs().max(1.0))
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{rows}x{width}: {worst}");
        }
    }
}
