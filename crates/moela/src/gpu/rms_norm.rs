//! RMSNorm, `gain * x / sqrt(mean(x^2) + eps)` over each row (`docs/architecture.md` §2): moela's
//! `shaders/rmsnorm.wgsl`, alone or fused with the residual add before it, else burn's ops.

use burn::tensor::{DType, Device, Tensor, TensorData};

use super::experts::mix;
use super::shader::{NormForm, Shader};
use super::{Kernels, WgslKernel, cube_tensor, empty, float, launch};

/// What is added to the residual stream before the norm.
#[derive(Debug, Clone, Copy)]
pub enum Sum<'a> {
    /// Nothing.
    None,
    /// A block's output `[rows, n]`.
    Add(&'a Tensor<2>),
    /// A MoE block's output, mixed here: `base + sum_k weights[row, k] * routed[row * K + k]` with the
    /// gathered down projections `routed` `[rows * K, n]`, their weights `[rows, K]` and, where the shared
    /// experts ran apart from the routed ones, their output `base` `[rows, n]`.
    Experts {
        /// `[rows * K, n]`.
        routed: &'a Tensor<2>,
        /// `[rows, K]`.
        weights: &'a Tensor<2>,
        /// `[rows, n]`, or nothing.
        base: Option<&'a Tensor<2>>,
    },
}

/// `gain * x / sqrt(mean(x^2) + eps)` over each row of `x` (`[rows, n]`); with a residual, the rows of
/// `x + residual` instead, and that sum is returned too (the new residual stream). `None` when the kernel
/// does not cover the call.
pub fn rms_norm(x: &Tensor<2>, residual: Sum, gain: &Tensor<1>, eps: f64) -> Option<(Tensor<2>, Option<Tensor<2>>)> {
    let [rows, n] = x.dims();
    let f32_of = |t: &Tensor<2>, dims: [usize; 2]| t.dims() == dims && t.dtype() == DType::F32;
    if rows == 0 || rows > 65_535 || gain.dims() != [n] || x.dtype() != DType::F32 || gain.dtype() != DType::F32 {
        return None;
    }
    let (delta, experts) = match residual {
        Sum::None => (None, None),
        Sum::Add(d) => (Some(d), None),
        Sum::Experts { routed, weights, base } => {
            let k = weights.dims()[1];
            if k == 0 || !f32_of(weights, [rows, k]) || !f32_of(routed, [rows * k, n]) {
                return None;
            }
            (base, Some((routed, weights, k)))
        }
    };
    if delta.is_some_and(|d| !f32_of(d, [rows, n])) {
        return None;
    }
    // The plain form reads rows `stride` apart in place: the first columns of a wider tensor need no copy.
    let strided = matches!(residual, Sum::None).then(|| first_columns(x)).flatten();
    let stride = strided.as_ref().map_or(n, |(_, s)| *s);
    let (xc, g) = match strided {
        Some((xc, _)) => (xc, cube_tensor(gain)?),
        None => (cube_tensor(x)?, cube_tensor(gain)?),
    };
    let d = match delta {
        Some(d) => Some(cube_tensor(d)?),
        None => None,
    };
    let e = match experts {
        Some((r, w, k)) => Some((cube_tensor(r)?, cube_tensor(w)?, k)),
        None => None,
    };
    let form = match (&d, &e) {
        (None, None) => NormForm::Plain,
        (Some(_), None) => NormForm::Add,
        (Some(_), Some(_)) => NormForm::ExpertsAndBase,
        (None, Some(_)) => NormForm::Experts,
    };
    let wide = n.is_multiple_of(4);
    let wide = wide && stride.is_multiple_of(4);
    let width = if wide { n / 4 } else { n };
    let kernel = WgslKernel::new("rmsnorm", "main", Shader::RmsNorm { form, wide }, 64)?;
    let info = [
        width as u32,
        (eps as f32).to_bits(),
        e.as_ref().map_or(0, |e| e.2 as u32),
        n as u32,
        (if wide { stride / 4 } else { stride }) as u32,
    ];
    let groups = [rows as u32, 1, 1];
    let out = empty(&xc, rows * n);
    if form == NormForm::Plain {
        launch(&xc, kernel, groups, &[&xc.handle, &g.handle, &out], &info);
        return Some((float(&xc, out, [rows, n]), None));
    }
    let sum = empty(&xc, rows * n);
    let mut buffers = vec![&xc.handle, &g.handle, &out, &sum];
    if let Some((r, w, _)) = &e {
        buffers.extend([&r.handle, &w.handle]);
    }
    if let Some(d) = &d {
        buffers.push(&d.handle);
    }
    launch(&xc, kernel, groups, &buffers, &info);
    Some((float(&xc, out, [rows, n]), Some(float(&xc, sum, [rows, n]))))
}

/// Root-mean-square normalisation over the last dimension with a learned gain.
/// `x` (`[rows, n]`) as the first `n` columns of a wider row-major buffer: its buffer, from its start, and
/// the values between its rows. `None` for any other layout (contiguous ones included: they take the
/// usual path).
fn first_columns(x: &Tensor<2>) -> Option<(burn_cubecl::tensor::CubeTensor, usize)> {
    let c = x.clone().try_into_primitive::<burn_cubecl::Cube>().ok()?;
    let [rows, n] = x.dims();
    let strides = c.meta.strides();
    let stride = strides[0];
    let plain = c.handle.offset_start.unwrap_or(0) == 0 && strides[1] == 1 && rows > 1 && stride > n;
    (c.client.name().contains("wgsl") && plain && c.handle.size() as usize >= ((rows - 1) * stride + n) * 4)
        .then_some((c, stride))
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Gain, `[width]`.
    pub weight: Tensor<1>,
    /// Added to the mean square before the root.
    pub eps: f64,
    /// moela's kernel (where it applies) or burn's ops.
    pub kernels: Kernels,
}

impl RmsNorm {
    /// A norm from host values, run by `kernels`.
    pub fn new(weight: Vec<f32>, eps: f64, kernels: Kernels, device: &Device) -> Self {
        let n = weight.len();
        Self {
            weight: Tensor::from_data(TensorData::new(weight, [n]), device),
            eps,
            kernels,
        }
    }

    /// Bytes the gain takes on the device.
    pub fn bytes(&self) -> usize {
        self.weight.shape().num_elements() * 4
    }

    /// Normalises `x` (`[.., width]`) over its last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let n = dims[D - 1];
        if self.kernels == Kernels::Wgsl && n > 0 {
            let rows = dims.iter().product::<usize>() / n;
            let flat: Tensor<2> = x.clone().reshape([rows, n]);
            if let Some((y, _)) = rms_norm(&flat, Sum::None, &self.weight, self.eps) {
                return y.reshape(dims);
            }
        }
        let ms = x.clone().square().mean_dim(D - 1);
        let inv = ms.add_scalar(self.eps).sqrt().recip();
        let mut shape = [1usize; D];
        shape[D - 1] = self.weight.dims()[0];
        x * inv * self.weight.clone().reshape(shape)
    }

    /// `(x + sum, norm(x + sum))`: the residual add fused with the norm after it, in one launch with moela's
    /// kernel (a MoE block's mixing included).
    pub fn forward_sum(&self, x: &Tensor<2>, sum: Sum) -> (Tensor<2>, Tensor<2>) {
        if self.kernels == Kernels::Wgsl
            && let Some((y, added)) = rms_norm(x, sum, &self.weight, self.eps)
        {
            return (added.unwrap_or_else(|| x.clone()), y);
        }
        let x = match sum {
            Sum::None => x.clone(),
            Sum::Add(d) => x.clone() + d.clone(),
            Sum::Experts { routed, weights, base } => x.clone() + mix(routed.clone(), weights, base),
        };
        let y = self.forward(x.clone());
        (x, y)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;

    use super::*;
    use crate::gpu::worst_difference;

    #[test]
    fn matches_burn_norm_with_and_without_residual() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        // Rows of a multiple of 4 are read as vec4, others as f32.
        for (rows, n) in [(1, 1024), (3, 77), (5, 130), (2, 1), (2, 36)] {
            let x = Tensor::<2>::random([rows, n], Distribution::Normal(0.0, 2.0), &device);
            let delta = Tensor::<2>::random([rows, n], Distribution::Normal(0.0, 1.0), &device);
            let gain = Tensor::<1>::random([n], Distribution::Normal(1.0, 0.3), &device);
            let norm = RmsNorm {
                weight: gain.clone(),
                eps: 1e-6,
                kernels: crate::gpu::Kernels::Generic,
            };
            let (out, none) = rms_norm(&x, Sum::None, &gain, 1e-6).expect("the kernel covers this shape");
            assert!(none.is_none());
            assert!(worst_difference(out, norm.forward(x.clone())) < 1e-5, "{rows}x{n}");
            let (out, sum) = rms_norm(&x, Sum::Add(&delta), &gain, 1e-6).unwrap();
            let want_sum = x.clone() + delta.clone();
            assert!(
                worst_difference(sum.unwrap(), want_sum.clone()) < 1e-6,
                "{rows}x{n} sum"
            );
            assert!(worst_difference(out, norm.forward(want_sum)) < 1e-5, "{rows}x{n} add");

            // A MoE block's output mixed in the same launch: delta + the weighted (token, slot) rows.
            let k = 3;
            let routed = Tensor::<2>::random([rows * k, n], Distribution::Normal(0.0, 1.0), &device);
            let weights = Tensor::<2>::random([rows, k], Distribution::Uniform(0.0, 1.0), &device);
            let experts = Sum::Experts {
                routed: &routed,
                weights: &weights,
                base: Some(&delta),
            };
            let (out, sum) = rms_norm(&x, experts, &gain, 1e-6).unwrap();
            let mixed = (routed.clone() * weights.clone().reshape([rows * k, 1]))
                .reshape([rows, k, n])
                .sum_dim(1)
                .reshape([rows, n]);
            let want_alone = x.clone() + mixed.clone();
            let want_sum = x.clone() + delta + mixed;
            assert!(
                worst_difference(sum.unwrap(), want_sum.clone()) < 1e-5,
                "{rows}x{n} experts sum"
            );
            assert!(
                worst_difference(out, norm.forward(want_sum)) < 1e-5,
                "{rows}x{n} experts"
            );
            // Shared experts among the slots: no separate output to add.
            let experts = Sum::Experts {
                routed: &routed,
                weights: &weights,
                base: None,
            };
            let (out, sum) = rms_norm(&x, experts, &gain, 1e-6).unwrap();
            assert!(
                worst_difference(sum.unwrap(), want_alone.clone()) < 1e-5,
                "{rows}x{n} experts alone sum"
            );
            assert!(
                worst_difference(out, norm.forward(want_alone)) < 1e-5,
                "{rows}x{n} experts alone"
            );
        }
    }
}
