//! `shaders/matvec_packed.wgsl` (q8, q4, q4k, q5) and `matvec_f16*.wgsl`: products with packed weights ([`Packed`]),
//! unpacked inside the kernel.
//!
//! Each shader has four entry points over one binding list: `matvec` (rows of x times one matrix, up to
//! [`MAX_ROWS`] of them per workgroup row, so a prompt's product is one launch), `gathered` (MoE decode:
//! each (token, slot) pair times its chosen expert), `grouped` (MoE prefill: the pairs sorted by expert,
//! each tile of pairs reading its expert once) and `dequant` (the whole stack as f32, for burn's ops:
//! training and the dense expert form). Natively the words live in a texture (`gpu/texture.rs`; f16
//! then uses `shaders/matvec_f16_texture.wgsl`, eight columns to a texel), in the browser in a buffer.

use burn::tensor::{DType, Int, Shape, Tensor};
use burn_cubecl::tensor::CubeTensor;

use super::WeightDtype;
use super::experts::Pairs;
use super::matvec::MAX_ROWS;
use super::shader::{PackedReads, Shader};
#[cfg(not(target_arch = "wasm32"))]
use super::texture;
use super::{WgslKernel, cube_int_tensor, cube_tensor};
use crate::gpu::packed::{self, BLOCK, Packed};

const WORKGROUP: u32 = 64;

/// Texel columns (four outputs each) one invocation of `entry` owns. f16 words in a texture come eight
/// columns to a texel: 2, or two texels (4) in a prompt's launches where `N/4` is a multiple of 4. The
/// 8-bit and 4-bit `matvec` / `gathered` pair them where `N/4` is even, so each x value read serves eight
/// outputs (2), and a prompt's launches (`prompt`: `matvec` over several groups of rows, `grouped`) take
/// four where `N/4` allows, so each x value serves sixteen (on lavapipe a q8 product over 256 rows runs
/// about 1.5x faster than with two; decode stays at two: its one group of rows has fewer invocations to
/// spread over the cores). Else 1.
fn columns(p: &Packed, b: &Buffers, entry: &str, prompt: bool) -> usize {
    let n4 = p.shape[2] / 4;
    match p.format {
        WeightDtype::F16 if b.in_texture() && prompt && n4.is_multiple_of(4) => 4,
        WeightDtype::F16 if b.in_texture() => 2,
        WeightDtype::F16 => 1,
        _ if entry == "dequant" => 1,
        _ if prompt && n4.is_multiple_of(4) => 4,
        _ if n4.is_multiple_of(2) => 2,
        _ => 1,
    }
}

/// Whether the SwiGLU variants cover `p`: 8-bit or 4-bit words (q8, q4 and the GGUF formats), a gate and an up half of whole pairs of
/// texel columns (N a multiple of 8).
fn glu_covers(p: &Packed) -> bool {
    matches!(
        p.format,
        WeightDtype::Q8 | WeightDtype::Q4 | WeightDtype::Q4K | WeightDtype::Q5 | WeightDtype::Q5K | WeightDtype::Q6K
    ) && p.shape[2].is_multiple_of(8)
}

/// Where a packed weight's words and scales are, or `None` when they are not on a WGSL device.
struct Buffers {
    words: Words,
    scales: Option<CubeTensor>,
}

/// The words of a packed weight as a launch binds them: [`packed::Words`] with the buffer reached.
#[allow(clippy::large_enum_variant)] // lives on the stack for one launch
enum Words {
    Buffer(CubeTensor),
    #[cfg(not(target_arch = "wasm32"))]
    Texture(std::sync::Arc<texture::WeightTexture>),
}

impl Buffers {
    fn in_texture(&self) -> bool {
        !matches!(self.words, Words::Buffer(_))
    }
}

fn buffers(p: &Packed) -> Option<Buffers> {
    let words = match &p.words {
        packed::Words::Buffer(t) => Words::Buffer(cube_int_tensor(t).filter(|w| w.dtype == DType::I32)?),
        #[cfg(not(target_arch = "wasm32"))]
        packed::Words::Texture(t) => Words::Texture(t.clone()),
    };
    let scales = match &p.scales {
        Some(s) => Some(cube_int_tensor(s)?),
        None => None,
    };
    Some(Buffers { words, scales })
}

/// The launch values every entry point reads: `[K or blocks, N/4, first, count, x_div, row mask, layer
/// shift, x row length in vec4, keep]` (the row mask and layer shift place texels in a texture; `keep`:
/// the gathered rows of pairs outside the chunk are left as they are).
fn shape_values(p: &Packed, b: &Buffers, first: usize, x_div: usize, x_k4: usize, keep: bool) -> Vec<u32> {
    let [count, k, n] = p.shape;
    let k_field = match p.format {
        WeightDtype::F16 => k,
        _ => p.padded_k() / BLOCK,
    };
    let placement = match &b.words {
        Words::Buffer(_) => [0, 0],
        #[cfg(not(target_arch = "wasm32"))]
        Words::Texture(t) => t.placement(),
    };
    let mut v = [k_field, n / 4, first, count, x_div].map(|v| v as u32).to_vec();
    v.extend(placement);
    v.extend([x_k4 as u32, u32::from(keep)]);
    v
}

/// Launches one entry point: bindings x, words, (scales), idx, y, then the shape. y is a new buffer of
/// `out_len` values, or `into`'s. `None` when a texture launch cannot bind its buffers.
#[allow(clippy::too_many_arguments)]
fn launch(
    p: &Packed,
    b: &Buffers,
    entry: &'static str,
    (rows, cols, glu): (usize, usize, bool),
    x: &CubeTensor,
    idx: &CubeTensor,
    (out_len, into): (usize, Option<&CubeTensor>),
    count: [u32; 3],
    info: Vec<u32>,
) -> Option<burn_cubecl::cubecl::server::Handle> {
    let out = into.map_or_else(|| super::empty(x, out_len), |t| t.handle.clone());
    let many = entry == "matvec" && count[1] > 1;
    match &b.words {
        Words::Buffer(words) => {
            let reads = PackedReads {
                texture: false,
                uniform_x: false,
                columns: false,
                glu,
                many,
            };
            let shader = Shader::Packed {
                format: p.format,
                rows,
                cols,
                reads,
            };
            let kernel = WgslKernel::new(p.format.name(), entry, shader, WORKGROUP)?;
            let mut buffers = vec![&x.handle, &words.handle];
            if let Some(s) = &b.scales {
                buffers.push(&s.handle);
            }
            buffers.extend([&idx.handle, &out]);
            super::launch(x, kernel, count, &buffers, &info);
        }
        #[cfg(not(target_arch = "wasm32"))]
        Words::Texture(t) => {
            use texture::Bind;
            let x_bytes = x.meta.num_elements() * 4;
            let reads = PackedReads {
                texture: true,
                uniform_x: x_bytes <= texture::UNIFORM_BYTES,
                columns: t.layout() == texture::Layout::Columns,
                glu,
                many,
            };
            let kernel = texture::TextureKernel {
                name: p.format.name(),
                entry,
                shader: Shader::Packed {
                    format: p.format,
                    rows,
                    cols,
                    reads,
                },
            };
            let first = if reads.uniform_x {
                Bind::Uniform(&x.handle, x_bytes)
            } else {
                Bind::Buffer(&x.handle)
            };
            let mut binds = vec![first, Bind::Texture(t)];
            if let Some(s) = &b.scales {
                binds.push(Bind::Buffer(&s.handle));
            }
            binds.extend([Bind::Buffer(&idx.handle), Bind::Buffer(&out)]);
            texture::dispatch(x, &kernel, count, &binds, &info)?;
        }
    }
    Some(out)
}

/// `x` as the 8-bit and 4-bit kernels read it, with its row length in vec4: as it is where K is a multiple
/// of 4 (the kernels read zeros past K, up to the packed K), else with zero columns appended up to the
/// packed K (burn's ops: such a step is not replayed).
fn kernel_x(x: &Tensor<2>, p: &Packed) -> (Tensor<2>, usize) {
    let [rows, k] = x.dims();
    let kp = p.padded_k();
    if kp == k || k.is_multiple_of(4) {
        (x.clone(), k / 4)
    } else {
        let zeros = Tensor::zeros([rows, kp - k], &x.device());
        (Tensor::cat(vec![x.clone(), zeros], 1), kp / 4)
    }
}

fn column_groups(n: usize, cols: usize) -> Option<u32> {
    u32::try_from((n / 4).div_ceil(cols).div_ceil(WORKGROUP as usize))
        .ok()
        .filter(|&g| g <= 65_535)
}

/// [`matvec`] with matrix `index[0]` of the stack, for any M: one launch, each workgroup row serving up to
/// [`MAX_ROWS`] rows of x; with `glu`, `silu(gate) * up` of the product's two halves (`[M, N/2]`).
fn matvec_at(x: &Tensor<2>, p: &Packed, index: &Tensor<1, Int>, glu: bool) -> Option<Tensor<2>> {
    let [m, k] = x.dims();
    let [_, pk, n] = p.shape;
    let rows = m.min(MAX_ROWS);
    let row_groups = u32::try_from(m.div_ceil(MAX_ROWS)).ok().filter(|&g| g <= 65_535)?;
    if m == 0 || k != pk || x.dtype() != DType::F32 || (glu && !glu_covers(p)) {
        return None;
    }
    let b = buffers(p)?;
    let cols = columns(p, &b, "matvec", m > MAX_ROWS);
    let groups = column_groups(n, cols)?;
    let index = cube_int_tensor(index).filter(|t| t.dtype == DType::I32)?;
    let (x, x_k4) = kernel_x(x, p);
    let xt = cube_tensor(&x)?;
    let mut info = shape_values(p, &b, 0, 1, x_k4, false);
    info.extend([0, m as u32]);
    let n = if glu { n / 2 } else { n };
    let out = launch(
        p,
        &b,
        "matvec",
        (rows, cols, glu),
        &xt,
        &index,
        (m * n, None),
        [groups, row_groups, 1],
        info,
    )?;
    let y = CubeTensor::new_contiguous(xt.client, xt.device, Shape::new([m, n]), out, DType::F32);
    Some(Tensor::from_primitive::<burn_cubecl::Cube>(y))
}

/// `x` (`[M, K]`, any M) times the first matrix of `p`: the matrix-vector kernel with up to [`MAX_ROWS`]
/// rows per workgroup row, all of them in one launch. Prefill's products with packed weights take this
/// rather than unpacking the matrix to f32 for burn's matmul: no f32 copy of a weight is ever allocated, so
/// the memory a prompt takes is its activations, and on lavapipe a 256-token chunk runs faster this way
/// (the weights, read once per group of rows, stay in cache; an unpacked copy is four bytes per weight
/// written and read again). `None` when the kernel does not cover the call, before any launch.
pub fn product(x: &Tensor<2>, p: &Packed) -> Option<Tensor<2>> {
    product_at(x, p, &p.zero, false)
}

/// [`product`] with matrix `index[0]` of the stack (`index`: one i32 on the device), e.g. one expert of
/// a stacked chunk; with `glu`, `silu(gate) * up` of a fused `[gate | up]` weight's product (`[M, N/2]`,
/// 8-bit and 4-bit weights with N a multiple of 8: `None` otherwise), SwiGLU in the same launch.
pub fn product_at(x: &Tensor<2>, p: &Packed, index: &Tensor<1, Int>, glu: bool) -> Option<Tensor<2>> {
    matvec_at(x, p, index, glu)
}

/// For each pair `q` of `pairs` choosing expert `e`, `x[q / x_div] @ p[e - first]`: `[P, N]`, or `None`
/// when the kernel does not cover the call. Pairs whose expert is outside `first..first + count` get zeros
/// in a new output, or, written `into` the output of another chunk's launch (`[P, N]`), keep what it holds:
/// the chunks of a stack fill one output, each its own pairs. With `glu`, each row is `silu(gate) * up` of
/// the pair's fused `[gate | up]` product (`[P, N/2]`, as [`product_at`] covers it). [`Pairs::Each`] runs
/// the shaders' `gathered` entry (each pair reads its expert), [`Pairs::Sorted`] their `grouped` one (each
/// tile of up to [`MAX_ROWS`] pairs of one expert reads it once: prefill), [`Pairs::Collected`] their
/// `collected` one (each expert of the chunk finds its pairs and reads its weights once: a batch's decode).
pub fn gathered(
    x: &Tensor<2>,
    p: &Packed,
    pairs: Pairs,
    (first, x_div, glu): (usize, usize, bool),
    into: Option<&Tensor<2>>,
) -> Option<Tensor<2>> {
    let [rows, k] = x.dims();
    let [_, pk, n] = p.shape;
    let count = pairs.len();
    if count == 0 || x_div == 0 || count.div_ceil(x_div) > rows || k != pk || x.dtype() != DType::F32 {
        return None;
    }
    if glu && !glu_covers(p) {
        return None;
    }
    let out_n = if glu { n / 2 } else { n };
    if into.is_some_and(|t| t.dims() != [count, out_n] || t.dtype() != DType::F32) {
        return None;
    }
    // The block formats' shader has the `collected` entry; f16's take collected pairs one at a time.
    let l = pairs.launch(p.format != WeightDtype::F16)?;
    let b = buffers(p)?;
    let cols = columns(p, &b, l.entry, l.entry == "grouped");
    let groups = column_groups(n, cols)?;
    let (x, x_k4) = kernel_x(x, p);
    let xt = cube_tensor(&x)?;
    let into = match into {
        Some(t) => Some(cube_tensor(t)?),
        None => None,
    };
    let mut info = shape_values(p, &b, first, x_div, x_k4, into.is_some());
    info.extend([l.order, count as u32]);
    let grid = [groups, l.groups, 1];
    let out_len = (count * out_n, into.as_ref());
    let out = launch(p, &b, l.entry, (l.rows, cols, glu), &xt, &l.table, out_len, grid, info)?;
    let y = CubeTensor::new_contiguous(xt.client, xt.device, Shape::new([count, out_n]), out, DType::F32);
    Some(Tensor::from_primitive::<burn_cubecl::Cube>(y))
}

/// The whole stack unpacked to f32 `[count, K, N]` in one launch, or `None` when the kernel does not cover it.
pub fn dequantise(p: &Packed) -> Option<Tensor<3>> {
    let [count, k, n] = p.shape;
    let kp = p.padded_k();
    let rows = match p.format {
        WeightDtype::F16 => kp,
        WeightDtype::Q8 => kp / 4,
        _ => kp / 8,
    };
    let b = buffers(p)?;
    let cols = columns(p, &b, "dequant", false);
    let groups = column_groups(n, cols)?;
    if rows > 65_535 || count > 65_535 {
        return None;
    }
    let zero = cube_int_tensor(&p.zero)?;
    // The three entry points share one binding list, so dequant binds a small x that it never reads.
    let x = cube_tensor(&Tensor::<1>::zeros([4], &p.zero.device()))?;
    let info = shape_values(p, &b, 0, 1, 1, false);
    let grid = [groups, rows as u32, count as u32];
    let out = launch(
        p,
        &b,
        "dequant",
        (1, cols, false),
        &x,
        &zero,
        (count * kp * n, None),
        grid,
        info,
    )?;
    let w = CubeTensor::new_contiguous(x.client, x.device, Shape::new([count, kp, n]), out, DType::F32);
    let w = Tensor::<3>::from_primitive::<burn_cubecl::Cube>(w);
    Some(if kp == k { w } else { w.narrow(1, 0, k) })
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, TensorData};

    use super::*;
    use crate::gpu::worst_of;

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// `p` with its words where the engine would put them, and where textures are available also in a
    /// texture of each layout and in a buffer.
    fn storages(p: Packed) -> Vec<Packed> {
        match p.words {
            packed::Words::Buffer(_) => vec![p],
            #[cfg(not(target_arch = "wasm32"))]
            packed::Words::Texture(_) => vec![
                p.clone().in_texture(texture::Layout::Rows, usize::MAX),
                p.clone().in_texture(texture::Layout::Columns, usize::MAX),
                p.in_buffer(),
            ],
        }
    }

    fn host(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919 % 2003) as f32 - 1001.0) * 1e-3)
            .collect()
    }

    #[test]
    fn kernels_match_unpacking_with_burn_on_awkward_sizes() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        for format in WeightDtype::PACKED {
            // K not a multiple of 32 (q8 / q4 pad x), N a multiple of 4 only.
            // N/4 odd (one texel column per invocation) and even (two); x past the 64 KiB a texture launch
            // copies into a uniform buffer (2 x 8200 values), read from its storage buffer instead; more rows
            // than one launch takes (a prefill's product: groups of MAX_ROWS, the last one short), with N/4
            // a multiple of 4 (four texel columns per invocation there, two of each SwiGLU half).
            for (m, k, n) in [
                (1, 77, 148),
                (3, 96, 4),
                (8, 45, 52),
                (5, 200, 12),
                (2, 77, 152),
                (8, 45, 56),
                (2, 8200, 8),
                (19, 77, 148),
                (17, 45, 56),
                (19, 77, 144),
                (9, 45, 48),
            ] {
                let packed = Packed::new(&host(k * n, m), [1, k, n], format, &device);
                let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
                let reference = x.clone().matmul(packed.dequantise().reshape([k, n]));
                // Words in a texture (native) and in a buffer (the browser's path).
                // Sums of thousands of f32 terms in another order differ by ~1e-4 of their value.
                let tolerance = if k > 1000 { 1e-3 } else { 1e-4 };
                // SwiGLU in the product's launch (8-bit and 4-bit, N a multiple of 8): silu(a) * b of the
                // two halves, whose error follows that of a and b (each within the tolerance of its own
                // size), so it is measured against |silu(a)| * max(1, |b|) + |b| * max(1, |a|).
                let half = n / 2;
                let sums = values(reference.clone());
                let (glu_reference, glu_scale): (Vec<f32>, Vec<f32>) = (0..m * half)
                    .map(|i| {
                        let (a, b) = (sums[i / half * n + i % half], sums[i / half * n + half + i % half]);
                        let silu = a / (1.0 + (-a).exp());
                        (silu * b, silu.abs() * b.abs().max(1.0) + b.abs() * a.abs().max(1.0))
                    })
                    .unzip();
                for p in storages(packed) {
                    let fast = product(&x, &p).expect("the kernel covers this shape");
                    let w = worst_of(&values(fast), &values(reference.clone()));
                    assert!(w < tolerance, "{format:?} product {m}x{k}x{n}: worst difference {w}");
                    let glu = product_at(&x, &p, &p.zero, true);
                    assert_eq!(glu.is_some(), glu_covers(&p), "{format:?} {k}x{n}: SwiGLU variant");
                    if let Some(glu) = glu {
                        let w = values(glu)
                            .iter()
                            .zip(&glu_reference)
                            .zip(&glu_scale)
                            .map(|((p, q), s)| (p - q).abs() / s.max(1.0))
                            .fold(0f32, f32::max);
                        assert!(
                            w < tolerance,
                            "{format:?} SwiGLU product {m}x{k}x{n}: worst difference {w}"
                        );
                    }
                    let unpacked = dequantise(&p).expect("the kernel covers this stack");
                    let w = worst_of(
                        &values(unpacked.reshape([k, n])),
                        &values(p.dequantise().reshape([k, n])),
                    );
                    assert_eq!(w, 0.0, "{format:?} dequant {k}x{n}");
                }
            }
        }
    }

    #[test]
    fn gathered_products_match_the_chosen_experts() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        // 3 tokens, top-2 of experts 5..12 held in this chunk (ids outside it give zeros).
        let (t, top, k, first, count) = (3, 2, 70, 5, 7);
        let ids = vec![5i32, 11, 7, 2, 11, 9];
        let idx = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [t * top]), &device);
        let each = Pairs::Each(&idx);
        // N/4 odd and even.
        // N/4 odd (one texel column per invocation), 6 (two) and 12 (four, SwiGLU's two of each half).
        for (format, n) in WeightDtype::PACKED
            .into_iter()
            .flat_map(|f| [(f, 20), (f, 24), (f, 48)])
        {
            let packed = Packed::new(&host(count * k * n, 3), [count, k, n], format, &device);
            let dense = packed.dequantise();
            let x = Tensor::<2>::random([t, k], Distribution::Normal(0.0, 1.0), &device);
            // Experts 0..5 in a second stack, whose launch fills the rows the first one leaves.
            let low = Packed::new(&host(first * k * n, 9), [first, k, n], format, &device);
            let low_dense = low.dequantise();
            let want = |q: usize, e: usize, both: bool| {
                let row = x.clone().narrow(0, q / top, 1);
                if (first..first + count).contains(&e) {
                    values(row.matmul(dense.clone().narrow(0, e - first, 1).reshape([k, n])))
                } else if both {
                    values(row.matmul(low_dense.clone().narrow(0, e, 1).reshape([k, n])))
                } else {
                    vec![0.0; n]
                }
            };
            for (p, low) in storages(packed).into_iter().zip(storages(low)) {
                let one = gathered(&x, &p, each, (first, top, false), None).expect("the kernel covers this call");
                let fast = values(one);
                for (q, &e) in ids.iter().enumerate() {
                    let w = worst_of(&fast[q * n..(q + 1) * n], &want(q, e as usize, false));
                    assert!(w < 1e-4, "{format:?} pair {q} (expert {e}): worst difference {w}");
                }
                let out = gathered(&x, &low, each, (0, top, false), None).expect("covered");
                let both = values(gathered(&x, &p, each, (first, top, false), Some(&out)).expect("covered"));
                for (q, &e) in ids.iter().enumerate() {
                    let w = worst_of(&both[q * n..(q + 1) * n], &want(q, e as usize, true));
                    assert!(
                        w < 1e-4,
                        "{format:?} two stacks, pair {q} (expert {e}): worst difference {w}"
                    );
                }
                // Each expert's pairs collected in the kernel (expert 11 has two): the same sums, bit for bit,
                // alone (pair 3's expert 2 outside the chunk: zeros) and with the second stack.
                let collected = Pairs::Collected(&idx, t);
                for glu in [false, true].into_iter().filter(|&g| !g || glu_covers(&p)) {
                    let want = values(gathered(&x, &p, each, (first, top, glu), None).expect("covered"));
                    let got = values(gathered(&x, &p, collected, (first, top, glu), None).expect("covered"));
                    assert_eq!(got, want, "{format:?} collected in one chunk, SwiGLU {glu}");
                    let out = gathered(&x, &low, each, (0, top, glu), None).expect("covered");
                    let want = values(gathered(&x, &p, each, (first, top, glu), Some(&out)).expect("covered"));
                    let out = gathered(&x, &low, collected, (0, top, glu), None).expect("covered");
                    let got = values(gathered(&x, &p, collected, (first, top, glu), Some(&out)).expect("covered"));
                    assert_eq!(got, want, "{format:?} collected, SwiGLU {glu}");
                }
                // One expert chosen by more pairs than a workgroup row takes (11 of 12, 4 slots per
                // token): its pairs go in groups of MAX_ROWS, and each is computed.
                let crowded: Vec<i32> = (0..12).map(|q| if q == 5 { 9 } else { 6 }).collect();
                let crowded = Tensor::<1, Int>::from_data(TensorData::new(crowded, [12]), &device);
                let one_by_one =
                    values(gathered(&x, &p, Pairs::Each(&crowded), (first, 4, false), None).expect("covered"));
                let got =
                    values(gathered(&x, &p, Pairs::Collected(&crowded, t), (first, 4, false), None).expect("covered"));
                assert_eq!(got, one_by_one, "{format:?} one expert in 11 of 12 pairs");
                // SwiGLU in the launch, the two stacks again filling one output.
                if glu_covers(&p) {
                    let out = gathered(&x, &low, each, (0, top, true), None).expect("covered");
                    let glu = values(gathered(&x, &p, each, (first, top, true), Some(&out)).expect("covered"));
                    let half = n / 2;
                    for (q, &e) in ids.iter().enumerate() {
                        let full = want(q, e as usize, true);
                        let act: Vec<f32> = (0..half)
                            .map(|c| full[c] / (1.0 + (-full[c]).exp()) * full[half + c])
                            .collect();
                        let w = worst_of(&glu[q * half..(q + 1) * half], &act);
                        assert!(
                            w < 1e-4,
                            "{format:?} SwiGLU pair {q} (expert {e}): worst difference {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sorted_pairs_match_each_pair() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        // 29 tokens, top-3 over experts 0..5 (one stack) and 5..12 (another): experts with more pairs than
        // one tile holds and with none, and ids 12 and 13, inside no stack (zeros).
        let (t, top, k, first, count): (usize, usize, usize, usize, usize) = (29, 3, 70, 5, 7);
        let pairs = t * top;
        let ids: Vec<i32> = (0..pairs).map(|q| ((q * q * 7 + q / 5 + 3) % 14) as i32).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [pairs]), &device);
        let plan = crate::gpu::experts::sort(&idx, 12).expect("the sort covers this call");
        // N/4 odd (one texel column per invocation), 6 (two) and 12 (four, SwiGLU's two of each half).
        for (format, n) in WeightDtype::PACKED
            .into_iter()
            .flat_map(|f| [(f, 20), (f, 24), (f, 48)])
        {
            let high = Packed::new(&host(count * k * n, 3), [count, k, n], format, &device);
            let low = Packed::new(&host(first * k * n, 9), [first, k, n], format, &device);
            // Gate/up (a row of x per token) and down (a row per pair).
            for x_div in [top, 1] {
                let x = Tensor::<2>::random([pairs.div_ceil(x_div), k], Distribution::Normal(0.0, 1.0), &device);
                for (high, low) in storages(high.clone()).into_iter().zip(storages(low.clone())) {
                    for glu in [false, true] {
                        if glu && !glu_covers(&high) {
                            assert!(gathered(&x, &high, Pairs::Sorted(&plan), (first, x_div, true), None).is_none());
                            continue;
                        }
                        let run = |pairs: Pairs| {
                            let out = gathered(&x, &low, pairs, (0, x_div, glu), None).expect("covered");
                            values(gathered(&x, &high, pairs, (first, x_div, glu), Some(&out)).expect("covered"))
                        };
                        let (fast, want) = (run(Pairs::Sorted(&plan)), run(Pairs::Each(&idx)));
                        let w = worst_of(&fast, &want);
                        assert!(
                            w < 1e-5,
                            "{format:?} n {n} x_div {x_div} glu {glu}: worst difference {w}"
                        );
                        let width = fast.len() / pairs;
                        for (q, &e) in ids.iter().enumerate() {
                            if e >= 12 {
                                assert!(fast[q * width..(q + 1) * width].iter().all(|&v| v == 0.0));
                            }
                        }
                    }
                }
            }
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn texture_layers_place_every_word() {
        // 128 x 2600 q8 words fill 5.1 texture rows (f16 10.2, q4 2.5); at most 2 rows per layer gives
        // several array layers, so the shaders' (column, row, layer) split of a texel index is exercised
        // without a gigabyte of weights.
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        let (k, n) = (128, 2600);
        let layouts = [texture::Layout::Rows, texture::Layout::Columns];
        for (format, layout) in WeightDtype::PACKED.into_iter().flat_map(|f| layouts.map(|l| (f, l))) {
            let p = Packed::new(&host(k * n, 5), [1, k, n], format, &device).in_texture(layout, 2);
            assert!(
                matches!(&p.words, packed::Words::Texture(t) if t.layout() == layout),
                "{format:?}: no texture"
            );
            let x = Tensor::<2>::random([2, k], Distribution::Normal(0.0, 1.0), &device);
            let reference = x.clone().matmul(p.dequantise().reshape([k, n]));
            let w = worst_of(&values(product(&x, &p).expect("covered")), &values(reference));
            assert!(w < 1e-4, "{format:?} {layout:?} layered matvec: worst difference {w}");
            let unpacked = dequantise(&p).expect("covered").reshape([k, n]);
            let w = worst_of(
                &values(unpacked),
                &values(p.clone().in_buffer().dequantise().reshape([k, n])),
            );
            assert_eq!(w, 0.0, "{format:?} {layout:?} layered dequant");
        }
    }
}
