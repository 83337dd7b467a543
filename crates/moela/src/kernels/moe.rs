//! `shaders/moe_matvec.wgsl`: products with only the experts the router chose (MoE decode), reading their
//! weights where they are stored instead of gathering copies of them.

use burn::tensor::{DType, Int, Shape, Tensor};
use burn_cubecl::cubecl::prelude::CubeCount;
use burn_cubecl::cubecl::server::{KernelArguments, MetadataBindingInfo};
use burn_cubecl::tensor::CubeTensor;

use super::{WgslKernel, cube_int_tensor, cube_tensor, uniform};

const SOURCE: &str = include_str!("../../../../shaders/moe_matvec.wgsl");
const WORKGROUP: u32 = 64;

/// For each pair `p` of `idx` (`[P]`, expert ids), `x[p / x_div] @ w[idx[p] - first]`: `x` is `[rows, K]`,
/// `w` one chunk of stacked experts `[count, K, N]` (f32, N a multiple of 4) holding experts
/// `first..first + count`; pairs choosing an expert outside the chunk get zeros. Returns `[P, N]`, or
/// `None` when the kernel does not cover the call.
pub fn gathered_matvec(
    x: &Tensor<2>,
    w: &Tensor<3>,
    idx: &Tensor<1, Int>,
    first: usize,
    x_div: usize,
) -> Option<Tensor<2>> {
    let [rows, k] = x.dims();
    let [count, k2, n] = w.dims();
    let [pairs] = idx.dims();
    if pairs == 0
        || x_div == 0
        || pairs.div_ceil(x_div) > rows
        || k != k2
        || n % 4 != 0
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || pairs > 65_535
    {
        return None;
    }
    let groups = u32::try_from((n / 4).div_ceil(WORKGROUP as usize)).ok()?;
    if groups > 65_535 {
        return None;
    }
    let idx = cube_int_tensor(idx)?;
    if idx.dtype != DType::I32 {
        return None;
    }
    let (x, w) = (cube_tensor(x)?, cube_tensor(w)?);
    let client = x.client.clone();
    let out = client.empty(pairs * n * 4);
    let kernel = WgslKernel {
        name: "moe_matvec",
        entry: "main",
        source: SOURCE,
        variant: 0,
        workgroup: WORKGROUP,
    };
    let shape = [k, n / 4, first, count, x_div].map(|v| v as u32);
    let args = KernelArguments::new()
        .with_buffer(x.handle.clone().binding())
        .with_buffer(w.handle.clone().binding())
        .with_buffer(idx.handle.clone().binding())
        .with_buffer(out.clone().binding())
        .with_info(MetadataBindingInfo::custom(uniform(&shape)));
    client.launch(Box::new(kernel), CubeCount::Static(groups, pairs as u32, 1), args);
    let y = CubeTensor::new_contiguous(client, x.device.clone(), Shape::new([pairs, n]), out, DType::F32);
    Some(Tensor::from_primitive::<burn_cubecl::Cube>(y))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, TensorData};

    use super::*;

    fn close(a: Tensor<2>, b: Tensor<2>) -> f32 {
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
    fn matches_selected_burn_products_on_awkward_sizes() {
        let Ok(device) = crate::engine::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        // 3 tokens, top-2 of experts 5..12 held in this chunk (ids outside it must give zeros).
        let (t, top, k, n, first, count) = (3, 2, 37, 52, 5, 7);
        let x = Tensor::<2>::random([t, k], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<3>::random([count, k, n], Distribution::Normal(0.0, 1.0), &device);
        let ids = vec![5i32, 11, 7, 2, 11, 9];
        let idx = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [t * top]), &device);
        let fast = gathered_matvec(&x, &w, &idx, first, top).expect("the kernel covers this call");
        let rows: Vec<Tensor<2>> = ids
            .iter()
            .enumerate()
            .map(|(p, &e)| {
                let local = e as usize;
                if (first..first + count).contains(&local) {
                    let we = w.clone().narrow(0, local - first, 1).reshape([k, n]);
                    x.clone().narrow(0, p / top, 1).matmul(we)
                } else {
                    Tensor::zeros([1, n], &device)
                }
            })
            .collect();
        let worst = close(fast, Tensor::cat(rows, 0));
        assert!(worst < 1e-4, "worst difference {worst}");

        // One row per pair (the down projection).
        let xp = Tensor::<2>::random([t * top, k], Distribution::Normal(0.0, 1.0), &device);
        let fast = gathered_matvec(&xp, &w, &idx, first, 1).unwrap();
        let p = 4; // expert 11
        let want = xp.narrow(0, p, 1).matmul(w.narrow(0, 11 - first, 1).reshape([k, n]));
        let worst = close(fast.narrow(0, p, 1), want);
        assert!(worst < 1e-4, "down: worst difference {worst}");
    }
}
