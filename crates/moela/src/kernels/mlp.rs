//! `shaders/swiglu.wgsl`: `silu(gate) * up` of fused `[gate | up]` products, one or two per launch.

use std::sync::OnceLock;

use burn::tensor::{DType, Tensor};

use super::{WgslKernel, cube_tensor, empty, float, grid, launch, tagged};

const SOURCE: &str = include_str!("../../../../shaders/swiglu.wgsl");

/// `gu` (`[rows, 2 * width]`) -> `[rows, width]`; `None` when the kernel does not cover the call.
pub fn swiglu(gu: &Tensor<2>, width: usize) -> Option<Tensor<2>> {
    swiglu_pair(gu, width, None).map(|(y, _)| y)
}

/// [`swiglu`] of `gu` and, in the same launch, of `second` (`(gu2, width2)`) when given.
pub fn swiglu_pair(
    gu: &Tensor<2>,
    width: usize,
    second: Option<(&Tensor<2>, usize)>,
) -> Option<(Tensor<2>, Option<Tensor<2>>)> {
    let shape = |t: &Tensor<2>, width: usize| {
        let [rows, w2] = t.dims();
        (w2 == 2 * width && rows * width > 0 && t.dtype() == DType::F32).then_some((rows, rows * width))
    };
    let (rows, total) = shape(gu, width)?;
    let (rows2, total2) = match second {
        Some((t, w)) => shape(t, w)?,
        None => (0, 0),
    };
    if total + total2 > u32::MAX as usize {
        return None;
    }
    let width2 = second.map_or(0, |s| s.1);
    // vec4 values where both widths allow it.
    let lanes = if width.is_multiple_of(4) && width2.is_multiple_of(4) {
        4
    } else {
        1
    };
    let groups = grid((total + total2) / lanes)?;
    let x = cube_tensor(gu)?;
    let x2 = match second {
        Some((t, _)) => Some(cube_tensor(t)?),
        None => None,
    };
    static VARIANTS: OnceLock<[String; 4]> = OnceLock::new();
    let sources = VARIANTS.get_or_init(|| {
        std::array::from_fn(|i| {
            let (two, wide) = (i % 2 == 1, i >= 2);
            tagged(SOURCE, &[("TWO", two)], &[("U", if two { 4 } else { 2 })])
                .replace("{{T}}", if wide { "vec4<f32>" } else { "f32" })
        })
    });
    let variant = usize::from(x2.is_some()) + 2 * usize::from(lanes == 4);
    let kernel = WgslKernel {
        name: "swiglu",
        entry: "main",
        source: &sources[variant],
        variant: variant as u32,
        workgroup: 64,
    };
    let info = [width, total, width2, total2].map(|v| (v / lanes) as u32);
    let out = empty(&x, total);
    match &x2 {
        None => {
            launch(&x, kernel, groups, &[&x.handle, &out], &info);
            Some((float(&x, out, [rows, width]), None))
        }
        Some(x2) => {
            let out2 = empty(&x, total2);
            launch(&x, kernel, groups, &[&x.handle, &out, &x2.handle, &out2], &info);
            Some((float(&x, out, [rows, width]), Some(float(&x, out2, [rows2, width2]))))
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;
    use burn::tensor::activation::silu;

    use super::*;
    use crate::kernels::worst_difference;

    #[test]
    fn matches_burn_silu_times_up() {
        let Ok(device) = crate::engine::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        let reference =
            |gu: &Tensor<2>, width: usize| silu(gu.clone().narrow(1, 0, width)) * gu.clone().narrow(1, width, width);
        for (rows, width) in [(1, 512), (3, 37), (7, 1)] {
            let gu = Tensor::<2>::random([rows, 2 * width], Distribution::Normal(0.0, 3.0), &device);
            let fast = swiglu(&gu, width).expect("the kernel covers this shape");
            assert!(worst_difference(fast, reference(&gu, width)) < 1e-5, "{rows}x{width}");
        }
        // Widths read as f32, and as vec4.
        for (wa, wb) in [(29, 83), (28, 84)] {
            let a = Tensor::<2>::random([6, 2 * wa], Distribution::Normal(0.0, 3.0), &device);
            let b = Tensor::<2>::random([2, 2 * wb], Distribution::Normal(0.0, 3.0), &device);
            let (ya, yb) = swiglu_pair(&a, wa, Some((&b, wb))).expect("the kernel covers this pair");
            assert!(worst_difference(ya, reference(&a, wa)) < 1e-5, "first of the pair {wa}");
            assert!(
                worst_difference(yb.unwrap(), reference(&b, wb)) < 1e-5,
                "second of the pair {wb}"
            );
        }
    }
}
