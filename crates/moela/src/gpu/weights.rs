//! A weight as the GPU holds it ([`Weights`]: f32, or packed words), its host-side assembly from a
//! checkpoint's rows ([`WeightsHost`]), and the projection built on it ([`Linear`]).

use burn::tensor::{DType, Device, Tensor, TensorData};

use super::packed::{self, Packed, transpose_into};
use super::{Kernels, Rows, WeightDtype};

/// A projection's or an expert stack's weights as the GPU holds them.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a burn tensor is a handle with inline shape metadata, built once at load
pub enum Weights<const D: usize> {
    /// f32, `[.., in, out]`: any shape, and what training updates.
    Dense(Tensor<D>),
    /// f16 / q8 / q4 words, unpacked by the kernels.
    Packed(Box<Packed>),
}

impl<const D: usize> Weights<D> {
    /// Stores row-major `[.., in, out]` values in `format`, or in f32 when the format cannot pack the shape
    /// (outputs not a multiple of 4).
    pub fn new(data: Vec<f32>, shape: [usize; D], format: WeightDtype, device: &Device) -> Self {
        let n = shape[D - 1];
        if Packed::supports(format, n) {
            let count = shape[..D - 2].iter().product();
            Weights::Packed(Box::new(Packed::new(&data, [count, shape[D - 2], n], format, device)))
        } else {
            Weights::Dense(Tensor::from_data(TensorData::new(data, shape), device))
        }
    }

    /// The weights as f32, unpacked by moela's kernel (`kernels` wgsl, on the GPU) or burn's ops.
    pub fn to_f32(&self, kernels: Kernels) -> Tensor<D> {
        match self {
            Weights::Dense(t) => as_f32(t),
            Weights::Packed(p) => {
                let fast = match kernels {
                    Kernels::Wgsl => super::products::dequantise(p),
                    Kernels::Generic => None,
                };
                let dims: [usize; D] = std::array::from_fn(|i| p.shape[3 - D + i]);
                fast.unwrap_or_else(|| p.dequantise()).reshape(dims)
            }
        }
    }

    /// Bytes the weights take on the device.
    pub fn bytes(&self) -> usize {
        match self {
            Weights::Dense(t) => t.shape().num_elements() * t.dtype().size(),
            Weights::Packed(p) => p.bytes(),
        }
    }

    /// Bytes one `[K, N]` matrix of `format` takes as [`Weights::new`] stores it.
    pub fn matrix_bytes(format: WeightDtype, k: usize, n: usize) -> usize {
        if Packed::supports(format, n) {
            Packed::matrix_bytes(format, k, n)
        } else {
            k * n * 4
        }
    }
}

/// A stack of `[K, N]` matrices assembled on the host from a checkpoint's HF rows (`[N, K]` each), then
/// stored on the device: packed as they arrive where the format packs the shape (no f32 copy of the stack is
/// ever made), else transposed into f32.
#[derive(Debug)]
pub enum WeightsHost {
    /// f32 `[count, K, N]`, and how many matrices are filled.
    Dense(Vec<f32>, [usize; 3], usize),
    /// Packed words and scales.
    Packed(packed::PackedHost),
}

impl WeightsHost {
    /// Room for `count` matrices of `[K, N]` stored in `format` (f32 where it cannot pack N).
    pub fn new(format: WeightDtype, [count, k, n]: [usize; 3]) -> Self {
        if Packed::supports(format, n) {
            WeightsHost::Packed(packed::PackedHost::new(format, [count, k, n]))
        } else {
            WeightsHost::Dense(vec![0.0; count * k * n], [count, k, n], 0)
        }
    }

    /// Adds the next matrix from its HF rows, `[N, K]` row-major.
    ///
    /// # Panics
    /// When the stack is full or `rows` is not `N * K` values.
    pub fn push_rows(&mut self, rows: &[f32]) {
        self.push(&[Rows::F32(rows)]);
    }

    /// Adds the next matrix from `parts`, consecutive runs of its HF rows as the checkpoint stores them
    /// ([`PackedHost::push`](packed::PackedHost::push)). Returns false when a value is not finite.
    ///
    /// # Panics
    /// When the stack is full or the parts are not `N * K` values in all.
    pub fn push(&mut self, parts: &[Rows<'_>]) -> bool {
        match self {
            WeightsHost::Packed(p) => p.push(parts),
            WeightsHost::Dense(data, [count, k, n], filled) => {
                let (k, n) = (*k, *n);
                assert!(*filled < *count, "the stack holds {count} matrices");
                assert_eq!(
                    parts.iter().map(Rows::len).sum::<usize>(),
                    k * n,
                    "one matrix of HF rows"
                );
                let mut rows = Vec::with_capacity(k * n);
                let mut ok = true;
                for p in parts {
                    let at = rows.len();
                    rows.resize(at + p.len(), 0.0);
                    ok &= p.read(0, &mut rows[at..]);
                }
                transpose_into(&rows, n, k, &mut data[*filled * k * n..(*filled + 1) * k * n]);
                *filled += 1;
                ok
            }
        }
    }

    /// Adds outputs `outputs` of a one-matrix stack from their HF rows (`[outputs, K]`), a slice of a large
    /// weight at a time ([`PackedHost::push_outputs`](packed::PackedHost::push_outputs)). Returns false when
    /// a value is not finite.
    ///
    /// # Panics
    /// When the stack holds more than one matrix, is full, or the parts are not the slice's values.
    pub fn push_outputs(&mut self, outputs: std::ops::Range<usize>, parts: &[Rows<'_>]) -> bool {
        match self {
            WeightsHost::Packed(p) => p.push_outputs(outputs, parts),
            WeightsHost::Dense(data, [count, k, n], filled) => {
                let (k, n) = (*k, *n);
                assert!(*count == 1 && *filled == 0, "slices of one matrix");
                assert_eq!(parts.iter().map(Rows::len).sum::<usize>(), outputs.len() * k);
                let mut row = vec![0f32; k];
                let mut ok = true;
                let rows = parts
                    .iter()
                    .flat_map(|p| (0..p.len() / k.max(1)).map(move |r| (p, r * k)));
                for (j, (part, at)) in outputs.clone().zip(rows) {
                    ok &= part.read(at, &mut row);
                    for (kk, v) in row.iter().enumerate() {
                        data[kk * n + j] = *v;
                    }
                }
                *filled += usize::from(outputs.end == n);
                ok
            }
        }
    }

    /// Bytes held on the host.
    pub fn bytes(&self) -> usize {
        match self {
            WeightsHost::Packed(p) => p.bytes(),
            WeightsHost::Dense(data, ..) => data.len() * 4,
        }
    }

    /// Stores the stack on `device` as `dims` (`[.., K, N]`, as many values as the stack).
    pub fn upload<const D: usize>(self, dims: [usize; D], device: &Device) -> Weights<D> {
        match self {
            WeightsHost::Packed(p) => Weights::Packed(Box::new(p.upload(device))),
            WeightsHost::Dense(data, ..) => Weights::Dense(Tensor::from_data(TensorData::new(data, dims), device)),
        }
    }
}

impl Weights<2> {
    /// Stores an HF `[N, K]` row-major weight (outputs by inputs) as the `[K, N]` matrix the products take.
    pub fn from_rows(rows: &[f32], n: usize, k: usize, format: WeightDtype, device: &Device) -> Self {
        let mut host = WeightsHost::new(format, [1, k, n]);
        host.push_rows(rows);
        host.upload([k, n], device)
    }
}

impl Weights<3> {
    /// Matrices `first..first + count` of the stack as f32 `[count, K, N]`: the whole stack as
    /// [`to_f32`](Self::to_f32) unpacks it, a part of it with burn's ops.
    pub fn to_f32_range(&self, first: usize, count: usize, kernels: Kernels) -> Tensor<3> {
        match self {
            Weights::Packed(p) if first > 0 || count < p.shape[0] => p.dequantise_range(first, count),
            Weights::Dense(t) if first > 0 || count < t.dims()[0] => as_f32(&t.clone().narrow(0, first, count)),
            _ => self.to_f32(kernels),
        }
    }

    /// Matrices in the stack.
    pub fn count(&self) -> usize {
        match self {
            Weights::Dense(t) => t.dims()[0],
            Weights::Packed(p) => p.shape[0],
        }
    }
}

/// The most bytes one tensor may take: WebGPU's guaranteed storage-binding size (128 MiB).
pub const MAX_BINDING_BYTES: usize = 128 << 20;

/// A projection `x W^T` with the weight stored transposed, `[in, out]`, so the product is `x @ w`.
/// Weights larger than one storage binding, as what runs the product binds them, are split by output
/// columns.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Column blocks of the `[in, out]` weight ([`part_rows`](Self::part_rows)).
    pub parts: Vec<Weights<2>>,
    /// Whether few-row products run moela's matrix-vector kernel (where it applies) or burn's matmul.
    pub kernels: Kernels,
}

impl Linear {
    /// The output rows of each part an `[out, in]` weight in `dtype` is split into: each part fits one binding
    /// as `kernels` bind it, moela's kernels the stored words, burn's ops the weight unpacked to f32; packed
    /// parts take whole groups of four outputs.
    ///
    /// One part is one launch and no join: a step whose products all have one part can be replayed
    /// (`replay.rs`), so DeepSeek-V2-Lite's 102400-row q4 head (105 MB of words, 840 MB as f32) stays whole.
    pub fn part_rows(out: usize, inp: usize, dtype: WeightDtype, kernels: Kernels) -> Vec<std::ops::Range<usize>> {
        let row_bytes = match kernels {
            Kernels::Wgsl => (packed::padded_k(dtype, inp) as f64 * dtype.bits() / 8.0).ceil() as usize,
            Kernels::Generic => inp * 4,
        };
        let mut per_part = (MAX_BINDING_BYTES / row_bytes.max(1)).clamp(1, out.max(1));
        if per_part < out && per_part >= 4 {
            per_part -= per_part % 4;
        }
        (0..out)
            .step_by(per_part)
            .map(|r0| r0..(r0 + per_part).min(out))
            .collect()
    }

    /// Stores an `[out, in]` row-major weight (HF layout) in `dtype`, split into [parts](Self::part_rows),
    /// run by `kernels`.
    pub fn from_rows(w: &[f32], out: usize, inp: usize, dtype: WeightDtype, kernels: Kernels, device: &Device) -> Self {
        let parts = Self::part_rows(out, inp, dtype, kernels)
            .into_iter()
            .map(|r| Weights::from_rows(&w[r.start * inp..r.end * inp], r.len(), inp, dtype, device))
            .collect();
        Self::from_parts(parts, kernels)
    }

    /// A projection from its column parts, in order, run by `kernels`.
    pub fn from_parts(parts: Vec<Weights<2>>, kernels: Kernels) -> Self {
        Self { parts, kernels }
    }

    /// `x`: `[T, in]` -> `[T, out]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        if self.parts.len() == 1 {
            return self.part(&x, &self.parts[0]);
        }
        let outs = self.parts.iter().map(|p| self.part(&x, p)).collect();
        Tensor::cat(outs, 1)
    }

    fn part(&self, x: &Tensor<2>, w: &Weights<2>) -> Tensor<2> {
        if self.kernels == Kernels::Wgsl {
            let fast = match w {
                Weights::Dense(t) => super::matvec::matvec(x, t),
                // Any number of rows in one launch: packed weights are never unpacked here.
                Weights::Packed(p) => super::products::product(x, p),
            };
            if let Some(y) = fast {
                return y;
            }
        }
        x.clone().matmul(w.to_f32(self.kernels))
    }

    /// `silu(gate) * up` of the product with a fused `[gate | up]` weight (`[T, in]` -> `[T, width]`): inside
    /// the product's launch where its kernel has that variant (8-bit and 4-bit, one part), else a launch
    /// of its own.
    pub fn forward_swiglu(&self, x: Tensor<2>, width: usize) -> Tensor<2> {
        if self.kernels == Kernels::Wgsl
            && let [Weights::Packed(p)] = self.parts.as_slice()
            && let Some(act) = super::products::product_at(&x, p, &p.zero, true)
        {
            return act;
        }
        super::swiglu::swiglu(self.forward(x), width, self.kernels)
    }

    /// Bytes the weight takes on the device.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(Weights::bytes).sum()
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

/// Uploads host values as an f32 tensor.
pub fn upload<const D: usize>(data: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// An absorbed attention factor, f32 `[n_h, K, N]` (`W_UK` or `W_UV^T`): a burn tensor, or natively (N a
/// multiple of 4) a texture that the decode kernels read four columns to a texel, as they read packed
/// weights (`gpu/texture.rs`; on lavapipe 5x faster than a storage buffer). burn's ops get a copy.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a burn tensor handle, built once at load
pub enum Factor {
    /// A burn tensor: any device, and what training updates.
    Tensor(Tensor<3>),
    /// f32 bit patterns in a weight texture of `[n_h, K, N / 4]` texels.
    #[cfg(not(target_arch = "wasm32"))]
    Texture {
        /// The texels.
        texture: std::sync::Arc<super::texture::WeightTexture>,
        /// `[n_h, K, N]`.
        dims: [usize; 3],
        /// Where burn's copy goes.
        device: Device,
    },
}

impl Factor {
    /// Uploads row-major `[n_h, K, N]` values: into a texture where the device has them and moela's kernels
    /// read it, else a tensor.
    pub fn new(data: Vec<f32>, dims: [usize; 3], kernels: Kernels, device: &Device) -> Self {
        // burn's ops read tensors: with them, a texture would only be copied out at every step.
        #[cfg(not(target_arch = "wasm32"))]
        let data = if kernels == Kernels::Wgsl && dims[2].is_multiple_of(4) && super::texture::available(device) {
            let grid = [dims[0], dims[1], dims[2] / 4];
            // The values' bits become the texture's words in their own allocation, given back when no texture
            // can hold them.
            let words: Vec<u32> = data.into_iter().map(f32::to_bits).collect();
            match super::texture::WeightTexture::from_words(words, grid) {
                Ok(texture) => {
                    return Factor::Texture {
                        texture,
                        dims,
                        device: device.clone(),
                    };
                }
                Err(words) => words.into_iter().map(f32::from_bits).collect(),
            }
        } else {
            data
        };
        #[cfg(target_arch = "wasm32")]
        let _ = kernels; // browsers keep every factor in a buffer
        Factor::Tensor(upload(data, dims, device))
    }

    /// `[n_h, K, N]`.
    pub fn dims(&self) -> [usize; 3] {
        match self {
            Factor::Tensor(t) => t.dims(),
            #[cfg(not(target_arch = "wasm32"))]
            Factor::Texture { dims, .. } => *dims,
        }
    }

    /// Bytes the factor takes on the device (f32 values).
    pub fn bytes(&self) -> usize {
        self.dims().iter().product::<usize>() * 4
    }

    /// The burn tensor that training updates; `None` for a factor in a texture (native inference only).
    pub fn trainable(&mut self) -> Option<&mut Tensor<3>> {
        match self {
            Factor::Tensor(t) => Some(t),
            #[cfg(not(target_arch = "wasm32"))]
            Factor::Texture { .. } => None,
        }
    }

    /// The factor as an f32 tensor for burn's ops (copied out of the texture where it lives in one).
    pub fn tensor(&self) -> Tensor<3> {
        match self {
            Factor::Tensor(t) => as_f32(t),
            #[cfg(not(target_arch = "wasm32"))]
            Factor::Texture { texture, dims, device } => {
                let [h, k, n] = *dims;
                let out = Tensor::<1>::zeros([h * k * n], device);
                if let Ok(cube) = out.clone().try_into_primitive::<burn_cubecl::Cube>() {
                    texture.copy_to(&cube);
                }
                match texture.layout() {
                    super::texture::Layout::Rows => out.reshape(*dims),
                    // [h, N/4, K] texels back to [h, K, N/4].
                    super::texture::Layout::Columns => out.reshape([h, n / 4, k, 4]).swap_dims(1, 2).reshape(*dims),
                }
            }
        }
    }
}
