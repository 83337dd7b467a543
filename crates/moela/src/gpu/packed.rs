//! Weights stored packed in 32-bit words: f16 pairs, or 8-bit / 4-bit block quantisation with an f16 scale
//! per block of 32 weights. They are unpacked inside moela's matrix-vector kernels (`shaders/matvec_*.wgsl`),
//! so a decode step reads 2, 1.06 or 0.56 bytes per weight instead of 4, on any adapter: the words are plain
//! `u32`s, so no shader-f16 or integer-dot extension is needed (this runs on lavapipe and SwiftShader).
//!
//! Layout of one `[K, N]` matrix (inputs by outputs, the engine's layout); a stack of `count` matrices
//! (experts) puts them one after the other:
//! - f16: word `(k, j)` holds columns `2j` (low half) and `2j + 1` (high half) of row `k`: `[K, N/2]` words;
//! - q8: blocks of 32 consecutive `k` per column. Word `(g, n)` holds rows `4g..4g+4` of column `n`, one
//!   signed byte each (row `4g + i` in byte `i`): `[Kp/4, N]` words;
//! - q4: word `(g, n)` holds rows `8g..8g+8` of column `n`, one nibble each (row `8g + i` in bits
//!   `4i..4i+4`), stored as `q + 8` for `q` in -7..=7: `[Kp/8, N]` words;
//! - q8 / q4 scales: one f16 per (block, column), pairs of columns per word: `[Kp/32, N/2]` words.
//! - q4k (GGUF's `Q4_K`): words as q4's, the nibbles being codes 0..=15; per (block, column) a 16-bit
//!   `scale | min << 8` of 6-bit multipliers where q8 / q4 have their f16 scales, and after all of those,
//!   per (super-block of 256, column) one word of two f16s, the super-block's scale (low) and minimum:
//!   `[count, Kp/256, N]` words. A weight is `d * scale * q - dmin * min`.
//! - q5 (GGUF's `Q5_0`): q4's words hold the codes' low four bits, f16 scales as q8's, and after all of
//!   those one word per (block, column) of the codes' fifth bits (row `i` of the block in bit `i`):
//!   `[count, Kp/32, N]` words. A weight is `(q - 16) * scale`.
//!
//! `Kp` is K rounded up to a whole block (q4k: super-block); the padding rows are zero. A weight is `q * scale` with
//! `scale = max |w| / 127` (q8) or `/ 7` (q4) over its block, rounded to nearest (no zero point: DeepSeek's
//! weights are centred). N must be a multiple of 4 (four adjacent columns make one vec4 in the kernels);
//! [`Packed::supports`] says whether a shape can be packed, and the loader keeps other weights in f32.
//!
//! [`Packed::dequantise`] unpacks with burn's integer ops: the reference the kernels are tested against, and
//! the path of the CPU device and of `--kernels generic`.

use burn::tensor::{Device, Int, Tensor, TensorData};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::{Rows, WeightDtype};

pub use super::format::{BLOCK, SUPER_BLOCK};

/// A matrix, or a stack of matrices, stored packed.
#[derive(Debug, Clone)]
pub struct Packed {
    /// F16, Q8 or Q4.
    pub format: WeightDtype,
    /// `[count, K, N]`: matrices, inputs, outputs.
    pub shape: [usize; 3],
    /// The packed words.
    pub words: Words,
    /// Block scales (q8, q4, q5; q4k: the blocks' multipliers), then the format's extra words (q4k's
    /// super-blocks, q5's fifth bits), flat.
    pub scales: Option<Tensor<1, Int>>,
    /// A one-element zero index, bound by the matrix-vector kernel to choose the first matrix of the stack.
    pub zero: Tensor<1, Int>,
}

/// Where the packed words live.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a burn tensor handle, built once at load
pub enum Words {
    /// u32 bit patterns held in a flat int tensor: any device, and the browser.
    Buffer(Tensor<1, Int>),
    /// A texture the kernels read (native wgpu; see `gpu/texture.rs`).
    #[cfg(not(target_arch = "wasm32"))]
    Texture(std::sync::Arc<crate::gpu::texture::WeightTexture>),
}

impl Packed {
    /// Whether `format` can pack a matrix with `n` outputs (columns).
    pub fn supports(format: WeightDtype, n: usize) -> bool {
        format.is_packed() && n.is_multiple_of(4) && n > 0
    }

    /// Packs `count` row-major `[K, N]` f32 matrices, laid out one after the other in `data` (tests and
    /// small weights; the loader packs a checkpoint's rows as it reads them with [`PackedHost`]).
    ///
    /// # Panics
    /// When the format is not a packed one or the shape is not [supported](Self::supports): the loader checks.
    pub fn new(data: &[f32], shape: [usize; 3], format: WeightDtype, device: &Device) -> Self {
        let [count, k, n] = shape;
        assert_eq!(data.len(), count * k * n, "packed data length");
        let mut host = PackedHost::new(format, shape);
        for m in data.chunks(k * n) {
            host.push_rows(&transpose(m, k, n));
        }
        host.upload(device)
    }

    /// K rounded up to what the format stores (whole blocks for q8 / q4).
    pub fn padded_k(&self) -> usize {
        padded_k(self.format, self.shape[1])
    }

    /// Bytes the packed words and scales take.
    pub fn bytes(&self) -> usize {
        let [count, k, n] = self.shape;
        count * Self::matrix_bytes(self.format, k, n)
    }

    /// Bytes one packed `[K, N]` matrix of `format` takes, words and scales.
    pub fn matrix_bytes(format: WeightDtype, k: usize, n: usize) -> usize {
        let kp = padded_k(format, k);
        let scales = match format {
            WeightDtype::Q8 | WeightDtype::Q4 => kp / BLOCK * n * 2,
            WeightDtype::Q4K => kp / BLOCK * n * 2 + kp / SUPER_BLOCK * n * 4,
            WeightDtype::Q5 => kp / BLOCK * n * (2 + 4),
            WeightDtype::Q5K => kp / BLOCK * n * (2 + 4) + kp / SUPER_BLOCK * n * 4,
            WeightDtype::Q6K => kp / BLOCK * n * (2 + 8) + kp / SUPER_BLOCK * n * 4,
            _ => 0,
        };
        words_per_matrix(format, k, n) * 4 + scales
    }

    /// The same weights with their words in a buffer (as browsers hold them).
    pub fn in_buffer(mut self) -> Self {
        self.words = Words::Buffer(self.words_tensor());
        self
    }

    /// The same weights with their words in a texture in `layout`, of at most `rows` rows per array layer
    /// and written two layers at a time (tests of both layouts, of the layered placement and of the slabs
    /// without a gigabyte of weights); unchanged where textures are not available.
    #[cfg(all(test, not(target_arch = "wasm32")))]
    pub(crate) fn in_texture(mut self, layout: crate::gpu::texture::Layout, rows: usize) -> Self {
        let host: Vec<u32> = self
            .words_tensor()
            .into_data()
            .convert::<i32>()
            .try_to_vec::<i32>()
            .expect("int words")
            .into_iter()
            .map(|w| w as u32)
            .collect();
        let grid = texel_grid(self.format, self.shape);
        if let Ok(t) = crate::gpu::texture::WeightTexture::with(host, grid, layout, rows, rows.saturating_mul(2)) {
            self.words = Words::Texture(t);
        }
        self
    }

    /// The words as a flat int tensor (copied out of a texture when they live in one).
    pub fn words_tensor(&self) -> Tensor<1, Int> {
        match &self.words {
            Words::Buffer(t) => t.clone(),
            #[cfg(not(target_arch = "wasm32"))]
            Words::Texture(t) => {
                let [count, k, n] = self.shape;
                let len = count * words_per_matrix(self.format, k, n);
                let out = Tensor::<1, Int>::from_data(TensorData::new(vec![0i32; len], [len]), &self.zero.device());
                if let Ok(cube) = out.clone().try_into_primitive::<burn_cubecl::Cube>() {
                    t.copy_to(&cube);
                }
                match t.layout() {
                    crate::gpu::texture::Layout::Rows => out,
                    crate::gpu::texture::Layout::Columns => {
                        // [count, cols, rows] texels back to the packed [count, rows, cols].
                        let [count, rows, cols] = t.grid();
                        out.reshape([count, cols, rows, 4]).swap_dims(1, 2).reshape([len])
                    }
                }
            }
        }
    }

    /// The weights as f32 `[count, K, N]`, unpacked with burn's integer and float ops.
    pub fn dequantise(&self) -> Tensor<3> {
        self.dequantise_range(0, self.shape[0])
    }

    /// Matrices `first..first + count` of the stack as f32 `[count, K, N]`, unpacked with burn's integer
    /// and float ops (a part of a stack too large to unpack whole into one binding).
    pub fn dequantise_range(&self, first: usize, count: usize) -> Tensor<3> {
        let [all, k, n] = self.shape;
        let kp = self.padded_k();
        let per = words_per_matrix(self.format, k, n);
        let mut words = self.words_tensor();
        if count < all {
            words = words.narrow(0, first * per, count * per);
        }
        let full = match self.format {
            WeightDtype::F16 => {
                let halves = split_bits(words.reshape([count, k, n / 2]), 16, 2); // [count, K, N/2, 2]
                return f16_bits_to_f32(halves.reshape([count * k * n])).reshape([count, k, n]);
            }
            WeightDtype::Q8 => {
                let bytes = split_bits(words.reshape([count, kp / 4, n]), 8, 4); // [count, Kp/4, N, 4]
                // Sign-extend the bytes.
                let signed = bytes.clone() - bytes.greater_equal_elem(128).int().mul_scalar(256);
                signed.swap_dims(2, 3).reshape([count, kp, n]).float()
            }
            WeightDtype::Q4 | WeightDtype::Q4K | WeightDtype::Q5 | WeightDtype::Q5K | WeightDtype::Q6K => {
                let nibbles = split_bits(words.reshape([count, kp / 8, n]), 4, 8); // [count, Kp/8, N, 8]
                let nibbles = nibbles.swap_dims(2, 3).reshape([count, kp, n]);
                match self.format {
                    WeightDtype::Q4 => nibbles.sub_scalar(8).float(),
                    WeightDtype::Q5 | WeightDtype::Q5K => {
                        // Each block's fifth bits: one word per column, bit i for row i of the block, after
                        // q5k's super-block words.
                        let blocks = kp / BLOCK;
                        let (supers, centre) = match self.format {
                            WeightDtype::Q5K => (kp / SUPER_BLOCK, 0),
                            _ => (0, 16),
                        };
                        let extra = self.extra(first, count).narrow(1, supers, blocks);
                        let bits = split_bits(extra, 1, 32); // [count, blocks, N, 32]
                        let bits = bits.swap_dims(2, 3).reshape([count, kp, n]);
                        (nibbles + bits.mul_scalar(16)).sub_scalar(centre).float()
                    }
                    WeightDtype::Q6K => {
                        // Each block's top two bits: two words per column (rows 0-15, 16-31), after the
                        // super-block words.
                        let blocks = kp / BLOCK;
                        let extra = self.extra(first, count).narrow(1, kp / SUPER_BLOCK, 2 * blocks);
                        let bits = split_bits(extra, 2, 16); // [count, 2 blocks, N, 16]
                        let bits = bits.swap_dims(2, 3).reshape([count, kp, n]);
                        (nibbles + bits.mul_scalar(16)).sub_scalar(32).float()
                    }
                    _ => nibbles.float(),
                }
            }
            WeightDtype::F32 => unreachable!("packed weights are never f32"),
        };
        let blocks = kp / BLOCK;
        let all_scales = self.scales.clone().expect("q8 / q4 / q4k weights have scales");
        let per_block = |t: Tensor<3>| -> Tensor<3> {
            t.reshape([count, blocks, 1, n])
                .expand([count, blocks, BLOCK, n])
                .reshape([count, kp, n])
        };
        let fields = split_bits(
            all_scales
                .clone()
                .narrow(0, first * blocks * n / 2, count * blocks * n / 2)
                .reshape([count, blocks, n / 2]),
            16,
            2,
        )
        .reshape([count, blocks, n]);
        let w = if self.format == WeightDtype::Q6K {
            // Each half block's signed 8-bit scale times its super-block's f16 scale.
            let supers = kp / SUPER_BLOCK;
            let bytes = split_bits(fields, 8, 2); // [count, blocks, N, 2]
            let signed = bytes.clone() - bytes.greater_equal_elem(128).int().mul_scalar(256);
            let halves = signed.swap_dims(2, 3).reshape([count, 2 * blocks, 1, n]);
            let halves = halves
                .expand([count, 2 * blocks, BLOCK / 2, n])
                .reshape([count, kp, n])
                .float();
            let heads = self.extra(first, count).narrow(1, 0, supers).bitwise_and_scalar(0xffff);
            let d = f16_bits_to_f32(heads.reshape([count * supers * n]))
                .reshape([count, supers, 1, n])
                .expand([count, supers, SUPER_BLOCK, n])
                .reshape([count, kp, n]);
            full * halves * d
        } else if self.format.has_mins() {
            // Each block's 6-bit multipliers times its super-block's f16 scale and minimum.
            let supers = kp / SUPER_BLOCK;
            let heads = self.extra(first, count).narrow(1, 0, supers);
            let heads = split_bits(heads, 16, 2); // [count, supers, N, 2]
            let head = |i: usize| {
                let h = f16_bits_to_f32(heads.clone().narrow(3, i, 1).reshape([count * supers * n]));
                h.reshape([count, supers, 1, n])
                    .expand([count, supers, SUPER_BLOCK / BLOCK, n])
                    .reshape([count, blocks, n])
            };
            let scale = head(0) * fields.clone().bitwise_and_scalar(63).float();
            let min = head(1) * fields.bitwise_right_shift_scalar(8).float();
            full * per_block(scale) - per_block(min)
        } else {
            full * per_block(f16_bits_to_f32(fields.reshape([count * blocks * n])).reshape([count, blocks, n]))
        };
        if kp == k { w } else { w.narrow(1, 0, k) }
    }

    /// The extra words (after the scales) of matrices `first..first + count`: `[count, rows, N]`, with the
    /// format's rows per matrix (q4k: its super-blocks; q5: its blocks' fifth bits; q5k: both, in that
    /// order).
    fn extra(&self, first: usize, count: usize) -> Tensor<3, Int> {
        let [all, _, n] = self.shape;
        let kp = self.padded_k();
        let blocks = kp / BLOCK;
        let rows = match self.format {
            WeightDtype::Q4K => kp / SUPER_BLOCK,
            WeightDtype::Q5 => blocks,
            WeightDtype::Q5K => kp / SUPER_BLOCK + blocks,
            WeightDtype::Q6K => kp / SUPER_BLOCK + 2 * blocks,
            _ => 0,
        };
        self.scales
            .clone()
            .expect("block formats have scales")
            .narrow(0, all * blocks * n / 2 + first * rows * n, count * rows * n)
            .reshape([count, rows, n])
    }
}

/// A packed stack being assembled on the host from a checkpoint's rows, one matrix at a time, then uploaded
/// whole: the loader's only copy of a stack's weights is this packed one (at most one binding's worth).
#[derive(Debug)]
pub struct PackedHost {
    format: WeightDtype,
    shape: [usize; 3],
    words: Vec<u32>,
    /// f16 bit patterns (q8, q4) or q4k's 6-bit multipliers, `[count, Kp/32, N]`.
    scales: Vec<u16>,
    /// The format's extra words: q4k's super-block f16 scale and minimum (`[count, Kp/256, N]`), q5's fifth
    /// bits (`[count, Kp/32, N]`), q5k's super-blocks then fifth bits (`[count, Kp/256 + Kp/32, N]`), q6k's
    /// super-blocks then two rows of top bits per block (`[count, Kp/256 + 2 Kp/32, N]`).
    extra: Vec<u32>,
    /// Matrices pushed so far.
    filled: usize,
    /// Outputs of the matrix being pushed that are packed already.
    next_output: usize,
}

impl PackedHost {
    /// Room for a `[count, K, N]` stack in `format`.
    ///
    /// # Panics
    /// When the format is not a packed one or the shape is not [supported](Packed::supports).
    pub fn new(format: WeightDtype, shape: [usize; 3]) -> Self {
        let [count, k, n] = shape;
        assert!(Packed::supports(format, n), "{format:?} cannot pack {k}x{n}");
        let blocks = match format {
            WeightDtype::Q8
            | WeightDtype::Q4
            | WeightDtype::Q4K
            | WeightDtype::Q5
            | WeightDtype::Q5K
            | WeightDtype::Q6K => padded_k(format, k) / BLOCK,
            _ => 0,
        };
        let extra = match format {
            WeightDtype::Q4K => blocks * BLOCK / SUPER_BLOCK,
            WeightDtype::Q5 => blocks,
            WeightDtype::Q5K => blocks * BLOCK / SUPER_BLOCK + blocks,
            WeightDtype::Q6K => blocks * BLOCK / SUPER_BLOCK + 2 * blocks,
            _ => 0,
        };
        Self {
            format,
            shape,
            words: spare::take(count * words_per_matrix(format, k, n)),
            scales: vec![0; count * blocks * n],
            extra: vec![0; count * extra * n],
            filled: 0,
            next_output: 0,
        }
    }

    /// Packs the next matrix of the stack from its HF rows: `[N, K]` row-major, row `j` holding output `j`'s
    /// K weights (the layout checkpoints store), on every core natively.
    ///
    /// # Panics
    /// When the stack is full or `rows` is not `N * K` values.
    pub fn push_rows(&mut self, rows: &[f32]) {
        self.push(&[Rows::F32(rows)]);
    }

    /// [`push_rows`](Self::push_rows) from `parts`, consecutive runs of the HF rows (e.g. gate_proj's then
    /// up_proj's) as the checkpoint stores them: each block of 32 values is converted on the stack as it is
    /// quantised. Returns false when a value is not finite (the stack is then not usable).
    ///
    /// # Panics
    /// When the stack is full or the parts are not `N * K` values in all.
    pub fn push(&mut self, parts: &[Rows<'_>]) -> bool {
        self.push_outputs(0..self.shape[2], parts)
    }

    /// Packs outputs `outputs` of the next matrix from their HF rows `parts` (`outputs.len() * K` values):
    /// a large weight a slice at a time, so that only one slice of the checkpoint is held. Slices come in
    /// order, each starting where the last ended, in whole groups of four outputs but for the last; the
    /// matrix is complete with its last output. Returns false when a value is not finite.
    ///
    /// # Panics
    /// When the stack is full, the slice does not follow the last one, or the parts are not its values.
    pub fn push_outputs(&mut self, outputs: std::ops::Range<usize>, parts: &[Rows<'_>]) -> bool {
        let [count, k, n] = self.shape;
        assert!(self.filled < count, "the stack holds {count} matrices");
        assert!(
            outputs.start == self.next_output
                && outputs.end <= n
                && (outputs.end == n || outputs.end.is_multiple_of(4)),
            "outputs {outputs:?} do not follow {} of {n}",
            self.next_output
        );
        assert_eq!(
            parts.iter().map(Rows::len).sum::<usize>(),
            outputs.len() * k,
            "the slice's HF rows"
        );
        let per = words_per_matrix(self.format, k, n);
        let words = &mut self.words[self.filled * per..(self.filled + 1) * per];
        let blocks = self.scales.len() / count;
        let scales = &mut self.scales[self.filled * blocks..(self.filled + 1) * blocks];
        let extra = self.extra.len() / count;
        let extra = &mut self.extra[self.filled * extra..(self.filled + 1) * extra];
        let done = outputs.end == n;
        let ok = match self.format {
            WeightDtype::F16 => pack_f16_rows(parts, k, n, outputs.clone(), words),
            WeightDtype::Q8
            | WeightDtype::Q4
            | WeightDtype::Q4K
            | WeightDtype::Q5
            | WeightDtype::Q5K
            | WeightDtype::Q6K => pack_block_rows(parts, k, n, outputs.clone(), self.format, words, (scales, extra)),
            WeightDtype::F32 => unreachable!("checked by supports"),
        };
        self.next_output = if done { 0 } else { outputs.end };
        self.filled += usize::from(done);
        ok
    }

    /// Bytes held on the host.
    pub fn bytes(&self) -> usize {
        self.words.len() * 4 + self.scales.len() * 2 + self.extra.len() * 4
    }

    /// Stores the stack on `device`: its words in a texture where the device has them (natively), else in a
    /// buffer; the scales in a buffer.
    pub fn upload(self, device: &Device) -> Packed {
        let Self {
            format,
            shape,
            words,
            scales,
            extra,
            ..
        } = self;
        // The words become i32s in place (same size: the collect reuses the allocation).
        let int = |v: Vec<u32>| {
            let v: Vec<i32> = v.into_iter().map(|w| w as i32).collect();
            let len = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [len]), device)
        };
        // f16 texels hold eight columns of a row: N a multiple of 8.
        #[cfg(not(target_arch = "wasm32"))]
        let words =
            if (format != WeightDtype::F16 || shape[2].is_multiple_of(8)) && crate::gpu::texture::available(device) {
                match crate::gpu::texture::WeightTexture::from_words(words, texel_grid(format, shape)) {
                    Ok(t) => Words::Texture(t),
                    Err(words) => Words::Buffer(int(words)),
                }
            } else {
                Words::Buffer(int(words))
            };
        #[cfg(target_arch = "wasm32")]
        let words = Words::Buffer(int(words));
        Packed {
            format,
            shape,
            words,
            // f16 pairs per word: N is a multiple of 4, so a row of scales fills whole words (and the extra
            // words start on a whole vec2, as the kernels read them).
            scales: (format != WeightDtype::F16).then(|| {
                let mut words: Vec<u32> = bytemuck::cast_slice(&scales).to_vec();
                words.extend(extra);
                int(words)
            }),
            zero: Tensor::zeros([1], device),
        }
    }
}

/// Word buffers of weights already in textures, kept while a model loads ([`Loading`]) for the next
/// [`PackedHost`]: a load packs gigabytes of words, and fresh memory for each weight cost a page fault and a
/// page cleared by the kernel per 4 KiB. At most [`spare::KEPT`] of them.
mod spare {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    /// Buffers kept at most: a MoE layer packs its gate/up and down stacks side by side, and one more
    /// weight's words are being written to its texture meanwhile.
    #[cfg(not(target_arch = "wasm32"))]
    pub(super) const KEPT: usize = 3;

    /// Live [`super::Loading`] guards.
    pub(super) static LOADS: AtomicUsize = AtomicUsize::new(0);
    static SPARE: Mutex<Vec<Vec<u32>>> = Mutex::new(Vec::new());

    /// `len` zeros: in the smallest kept buffer that holds them, else a new one.
    pub(super) fn take(len: usize) -> Vec<u32> {
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        let fit = (0..spare.len())
            .filter(|&i| spare[i].capacity() >= len)
            .min_by_key(|&i| spare[i].capacity());
        match fit {
            Some(i) => {
                let mut words = spare.swap_remove(i);
                words.clear();
                words.resize(len, 0);
                words
            }
            None => vec![0; len],
        }
    }

    /// Keeps `words` for a later [`take`] while a model loads (the largest [`KEPT`]), else drops them.
    #[cfg(not(target_arch = "wasm32"))]
    pub(super) fn give(words: Vec<u32>) {
        if LOADS.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return;
        }
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        spare.push(words);
        if spare.len() > KEPT {
            let smallest = (0..spare.len()).min_by_key(|&i| spare[i].capacity()).expect("buffers");
            spare.swap_remove(smallest);
        }
    }

    /// Drops every kept buffer.
    pub(super) fn clear() {
        SPARE.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// A model load in progress. While one lives, the word buffers of weights already on the device are reused
/// for the next weights instead of freed, and weight textures are written on a thread of their own
/// (`gpu/texture.rs`); when the last one is dropped, the writes are waited for and the buffers freed.
pub(crate) struct Loading(());

impl Loading {
    /// Starts a load.
    pub(crate) fn new() -> Self {
        spare::LOADS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(())
    }
}

impl Drop for Loading {
    fn drop(&mut self) {
        if spare::LOADS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            // Not while unwinding: a panic of the writes would then abort the process.
            #[cfg(not(target_arch = "wasm32"))]
            if !std::thread::panicking() {
                crate::gpu::texture::finish_uploads_on_device();
            }
            spare::clear();
        }
    }
}

/// Whether a model is loading ([`Loading`]).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn loading() -> bool {
    spare::LOADS.load(std::sync::atomic::Ordering::Acquire) > 0
}

/// Gives the words of a weight now on the device back for the next weight to pack into (while a model
/// loads; else they are freed).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn spare_words(words: Vec<u32>) {
    spare::give(words);
}

/// Transposes a row-major `[rows, cols]` matrix.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    transpose_into(data, rows, cols, &mut out);
    out
}

/// Transposes a row-major `[rows, cols]` matrix into `out` (`[cols, rows]`), in tasks of 32 output rows on
/// every core natively, each reading 32 adjacent values of every input row.
pub fn transpose_into(data: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const B: usize = 32;
    for_chunks(out, B * rows.max(1), |t, chunk| {
        let c0 = t * B;
        let cc = chunk.len() / rows.max(1);
        for r in 0..rows {
            let src = &data[r * cols + c0..r * cols + c0 + cc];
            for (c, v) in src.iter().enumerate() {
                chunk[c * rows + r] = *v;
            }
        }
    });
}

/// Runs `f(index, chunk)` over `data`'s chunks of `size` on every core natively (one thread on wasm32).
pub(crate) fn for_chunks<T: Send>(data: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        data.par_chunks_mut(size.max(1)).enumerate().for_each(|(i, c)| f(i, c));
    }
    #[cfg(target_arch = "wasm32")]
    data.chunks_mut(size.max(1)).enumerate().for_each(|(i, c)| f(i, c));
}

/// Where each of the N HF rows of `parts` starts: `(part, offset of the row's first value)`.
fn hf_rows<'a>(parts: &'a [Rows<'a>], k: usize) -> impl Iterator<Item = (Rows<'a>, usize)> + 'a {
    parts
        .iter()
        .flat_map(move |p| (0..p.len() / k.max(1)).map(move |r| (*p, r * k)))
}

/// f16 words `[K, N/2]` of one matrix, the columns of `outputs` from their HF rows `[outputs, K]`, a task
/// per 32 rows of K. Returns false when a value is not finite.
fn pack_f16_rows(parts: &[Rows<'_>], k: usize, n: usize, outputs: std::ops::Range<usize>, words: &mut [u32]) -> bool {
    let half = n / 2;
    let (first_word, pairs) = (outputs.start / 2, outputs.len() / 2);
    let finite = std::sync::atomic::AtomicBool::new(true);
    for_chunks(words, BLOCK * half, |t, out| {
        let k0 = t * BLOCK;
        let kk = out.len() / half;
        let (mut a, mut b) = ([0f32; BLOCK], [0f32; BLOCK]);
        let mut ok = true;
        let mut rows = hf_rows(parts, k);
        for jj in first_word..first_word + pairs {
            let ((pa, ra), (pb, rb)) = (rows.next().expect("N rows"), rows.next().expect("N rows"));
            ok &= pa.read(ra + k0, &mut a[..kk]) & pb.read(rb + k0, &mut b[..kk]);
            for (i, (x, y)) in a[..kk].iter().zip(&b[..kk]).enumerate() {
                out[i * half + jj] =
                    u32::from(f16::from_f32(*x).to_bits()) | (u32::from(f16::from_f32(*y).to_bits()) << 16);
            }
        }
        if !ok {
            finite.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    });
    finite.into_inner()
}

/// One packing task's columns of every word row, scale row and extra row (q4k, q5).
type TaskColumns<'a> = (Vec<&'a mut [u32]>, Vec<&'a mut [u16]>, Vec<&'a mut [u32]>);

/// HF rows (outputs) one packing task takes: it reads them whole, front to back, so the checkpoint's pages
/// are read in order (reading a block from each of many rows stalls on every row).
const TASK_ROWS: usize = 64;

/// q8 / q4 / q4k / q5 words `[Kp/4 or Kp/8, N]`, scales `[Kp/32, N]` and extra words (q4k's super-blocks,
/// q5's fifth bits) of one matrix, the columns of `outputs` from their HF rows `[outputs, K]`, a task per [`TASK_ROWS`]
/// outputs. Returns false when a value is not finite.
fn pack_block_rows(
    parts: &[Rows<'_>],
    k: usize,
    n: usize,
    outputs: std::ops::Range<usize>,
    format: WeightDtype,
    words: &mut [u32],
    (scales, extra): (&mut [u16], &mut [u32]),
) -> bool {
    let q8 = format == WeightDtype::Q8;
    let word_rows = if q8 { BLOCK / 4 } else { BLOCK / 8 };
    let blocks = padded_k(format, k) / BLOCK;
    // Each task's columns of every word row and scale row: disjoint slices, so the tasks write in parallel.
    let tasks = outputs.len().div_ceil(TASK_ROWS);
    let mut columns: Vec<TaskColumns<'_>> = (0..tasks)
        .map(|_| {
            (
                Vec::with_capacity(blocks * word_rows),
                Vec::with_capacity(blocks),
                Vec::new(),
            )
        })
        .collect();
    for row in words.chunks_mut(n) {
        for (t, part) in row[outputs.clone()].chunks_mut(TASK_ROWS).enumerate() {
            columns[t].0.push(part);
        }
    }
    for row in scales.chunks_mut(n) {
        for (t, part) in row[outputs.clone()].chunks_mut(TASK_ROWS).enumerate() {
            columns[t].1.push(part);
        }
    }
    for row in extra.chunks_mut(n) {
        for (t, part) in row[outputs.clone()].chunks_mut(TASK_ROWS).enumerate() {
            columns[t].2.push(part);
        }
    }
    let rows: Vec<(Rows<'_>, usize)> = hf_rows(parts, k).collect();
    let finite = std::sync::atomic::AtomicBool::new(true);
    for_chunks(&mut columns, 1, |t, task| {
        let (out, scale_rows, extra_rows) = &mut task[0];
        let rows = &rows[t * TASK_ROWS..(t * TASK_ROWS + TASK_ROWS).min(rows.len())];
        if matches!(format, WeightDtype::Q5) || format.is_k_quant() {
            if !pack_ggml_task(format, out, scale_rows, extra_rows, rows, k) {
                finite.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            if !unsafe { pack_task_avx2(out, scale_rows, rows, k, q8) } {
                finite.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            return;
        }
        if !pack_task(out, scale_rows, rows, k, q8) {
            finite.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    });
    finite.into_inner()
}

/// [`pack_task`] compiled for AVX2: eight lanes where the portable build has four, in the loader's hottest
/// loop (chosen at run time, so the binary still runs on any x86-64).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn pack_task_avx2(
    out: &mut [&mut [u32]],
    scale_rows: &mut [&mut [u16]],
    rows: &[(Rows<'_>, usize)],
    k: usize,
    q8: bool,
) -> bool {
    pack_task(out, scale_rows, rows, k, q8)
}

/// Outputs a task packs at a time into a tile of its own before writing them to the matrix: 16 words are one
/// cache line of each word row. Writing a word at a time straight into the matrix touched as many lines as
/// there are word rows, a row's width apart, which map to few cache sets (a stride of `N * 4` bytes: 8 KiB
/// for N = 2048) and were evicted between the tile's outputs.
const TILE: usize = 16;

/// One task of [`pack_block_rows`]: outputs `rows` (their HF rows), into column `jj` of every word row and
/// scale row for the `jj`-th of them. Returns false when a value is not finite.
#[inline(always)]
fn pack_task(
    out: &mut [&mut [u32]],
    scale_rows: &mut [&mut [u16]],
    rows: &[(Rows<'_>, usize)],
    k: usize,
    q8: bool,
) -> bool {
    let qmax = if q8 { 127.0f32 } else { 7.0 };
    let word_rows = if q8 { BLOCK / 4 } else { BLOCK / 8 };
    let blocks = scale_rows.len();
    let mut values = vec![0f32; blocks * BLOCK]; // the padding stays zero
    let (mut scaled, mut s16, mut s) = (vec![0f32; blocks], vec![f16::ZERO; blocks], vec![0f32; blocks]);
    // `words[w * TILE + jj]`: word row `w` of the tile's output `jj`; `scales` likewise.
    let (mut words, mut scales) = (vec![0u32; out.len() * TILE], vec![0u16; blocks * TILE]);
    let mut codes = [0i32; BLOCK];
    let mut ok = true;
    for (t, tile) in rows.chunks(TILE).enumerate() {
        for (jj, &(part, row)) in tile.iter().enumerate() {
            // A ggml file's Q8_0 / Q4_0 rows are moela's q8 / q4 blocks already: their codes and scales are
            // copied, not re-quantised.
            if let Rows::Ggml(ty, bytes) = part
                && k.is_multiple_of(BLOCK)
                && ggml_block(ty, bytes, row, q8).is_some()
            {
                for b in 0..blocks {
                    let (s, code) = ggml_block(ty, bytes, row + b * BLOCK, q8).expect("the same rows");
                    ok &= f16::from_bits(s).is_finite();
                    scales[b * TILE + jj] = s;
                    put_words(&code, &mut words[b * word_rows * TILE + jj..], word_rows);
                }
                continue;
            }
            ok &= part.read(row, &mut values[..k]);
            for (m, block) in scaled.iter_mut().zip(values.chunks_exact(BLOCK)) {
                *m = block_max(block.try_into().expect("a block")) / qmax;
            }
            // Every scale of the row rounded through f16 in one call (vectorised where the CPU has F16C).
            s16.convert_from_f32_slice(&scaled);
            s16.convert_to_f32_slice(&mut s);
            for (b, block) in values.chunks_exact(BLOCK).enumerate() {
                scales[b * TILE + jj] = s16[b].to_bits();
                quantise_scaled(block.try_into().expect("a block"), s[b], qmax, &mut codes);
                put_words(
                    &code_bytes(&codes, q8),
                    &mut words[b * word_rows * TILE + jj..],
                    word_rows,
                );
            }
        }
        let (first, len) = (t * TILE, tile.len());
        for (w, row) in out.iter_mut().enumerate() {
            row[first..first + len].copy_from_slice(&words[w * TILE..][..len]);
        }
        for (b, row) in scale_rows.iter_mut().enumerate() {
            row[first..first + len].copy_from_slice(&scales[b * TILE..][..len]);
        }
    }
    ok
}

/// The block of 32 at value `at` of a ggml file's rows as q8's or q4's code bytes and f16 scale, where its
/// type holds exactly that block (`Q8_0`, `Q5_0` or `Q4_0` in q8, `Q4_0` in q4): the bytes copied where they
/// are the same bytes rearranged ([`ggml::block_bytes`](super::ggml::block_bytes)), else made from the
/// block's codes.
#[inline(always)]
pub(crate) fn ggml_block(ty: super::ggml::GgmlType, bytes: &[u8], at: usize, q8: bool) -> Option<(u16, [u8; BLOCK])> {
    if let Some(block) = super::ggml::block_bytes(ty, bytes, at, q8) {
        return Some(block);
    }
    let mut codes = [0i32; BLOCK];
    let s = super::ggml::exact_block(ty, bytes, at, q8, &mut codes)?;
    Some((s, code_bytes(&codes, q8)))
}

/// The first `count` little-endian words of a block's bytes into `tile[0]`, `tile[TILE]`, ...
#[inline(always)]
fn put_words(bytes: &[u8; BLOCK], tile: &mut [u32], count: usize) {
    for (g, b) in bytes.chunks_exact(4).take(count).enumerate() {
        tile[g * TILE] = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// One task of [`pack_block_rows`] for the formats that are a ggml type's own blocks (q4k: `Q4_K`, q5:
/// `Q5_0`, q5k: `Q5_K`, q6k: `Q6_K`): each output's blocks of that type, a file's own where its rows are of
/// the type (copied, not re-quantised), else made from its values (`ggml::encode`), then placed in column
/// `jj` of every word, scale and extra row (q4k: super-block words; q5: fifth bits; q5k: super-block words,
/// then fifth bits; q6k: super-block words, then two rows of top bits per block). Returns false when a
/// value is not finite.
fn pack_ggml_task(
    format: WeightDtype,
    out: &mut [&mut [u32]],
    scale_rows: &mut [&mut [u16]],
    extra_rows: &mut [&mut [u32]],
    rows: &[(Rows<'_>, usize)],
    k: usize,
) -> bool {
    use super::ggml::{GgmlType, encode, q4k_block, q5_block, q5k_block, q6k_block};
    let ty = match format {
        WeightDtype::Q4K => GgmlType::Q4_K,
        WeightDtype::Q5K => GgmlType::Q5_K,
        WeightDtype::Q6K => GgmlType::Q6_K,
        _ => GgmlType::Q5_0,
    };
    // Words of high bits per block of 32 after the super-block words (q5k: fifth bits; q6k: top two).
    let high_words = match format {
        WeightDtype::Q5K => 1,
        WeightDtype::Q6K => 2,
        _ => 0,
    };
    let (per, size) = ty.block().map(|(p, s)| (p as usize, s as usize)).expect("a block type");
    // Blocks of 32 in one of the type's blocks, each with a scale row; the type's blocks in a column.
    let blocks = per / BLOCK;
    let units = padded_k(format, k) / per;
    let mut values = vec![0f32; per];
    let mut made = Vec::with_capacity(size);
    let mut ok = true;
    for (jj, &(part, row)) in rows.iter().enumerate() {
        for i in 0..units {
            let at = i * per;
            let block = match part {
                Rows::Ggml(t, bytes) if t == ty && row.is_multiple_of(per) => &bytes[(row + at) / per * size..][..size],
                _ => {
                    let take = k.saturating_sub(at).min(per);
                    values[take..].fill(0.0);
                    ok &= part.read(row + at, &mut values[..take]);
                    made.clear();
                    encode(ty, &values, &mut made);
                    &made[..]
                }
            };
            // The head word: the super-block's f16 scale and minimum (q4k, q5k) or scale (q6k), or q5's fifth
            // bits; then each block's high-bit words.
            let mut high = [[0u32; 2]; 8];
            let (head, scales, codes) = match format {
                WeightDtype::Q4K => q4k_block(block),
                WeightDtype::Q5K => {
                    let (k, bits) = q5k_block(block);
                    for (h, b) in high.iter_mut().zip(bits) {
                        h[0] = b;
                    }
                    k
                }
                WeightDtype::Q6K => {
                    let (k, bits) = q6k_block(block);
                    high = bits;
                    k
                }
                _ => {
                    let (scale, words, bits) = q5_block(block);
                    let mut scales = [0u16; 8];
                    let mut codes = [[0u32; 4]; 8];
                    (scales[0], codes[0]) = (scale, words);
                    (bits, scales, codes)
                }
            };
            // The f16 halves of the head (q4k, q5k, q6k) or the scale (q5) must be numbers.
            ok &= match format {
                WeightDtype::Q5 => half_finite(scales[0]),
                _ => half_finite(head as u16) && half_finite((head >> 16) as u16),
            };
            extra_rows[i][jj] = head;
            for (b, words) in high.iter().enumerate().take(blocks) {
                for (w, word) in words.iter().enumerate().take(high_words) {
                    extra_rows[units + (i * blocks + b) * high_words + w][jj] = *word;
                }
            }
            for b in 0..blocks {
                scale_rows[i * blocks + b][jj] = scales[b];
                for (g, w) in codes[b].iter().enumerate() {
                    out[(i * blocks + b) * 4 + g][jj] = *w;
                }
            }
        }
    }
    ok
}

/// Whether f16 bits hold a number.
fn half_finite(bits: u16) -> bool {
    f16::from_bits(bits).is_finite()
}

/// A block's codes as the q8 / q4 formats store them: a signed byte each (q8), or two `q + 8` nibbles per
/// byte, the first code in the low nibble (q4: the first 16 bytes). The packed words are these bytes read as
/// little-endian words: eight codes per q4 word, lowest first. Computed a whole byte array at a time (no word
/// built up in memory), so that it vectorises.
#[inline(always)]
pub(crate) fn code_bytes(codes: &[i32; BLOCK], q8: bool) -> [u8; BLOCK] {
    let mut bytes = [0u8; BLOCK];
    if q8 {
        for (b, &c) in bytes.iter_mut().zip(codes) {
            *b = c as u8;
        }
    } else {
        for (b, pair) in bytes.iter_mut().zip(codes.chunks_exact(2)) {
            *b = (pair[0] + 8) as u8 | (((pair[1] + 8) as u8) << 4);
        }
    }
    bytes
}

/// The largest magnitude in a block, from the bits (an integer maximum vectorises; the values are finite,
/// checked where they are read).
#[inline(always)]
fn block_max(block: &[f32; BLOCK]) -> f32 {
    f32::from_bits(block.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)))
}

/// Codes of a block for scale `s` (already rounded through f16): `v / s` rounded to nearest, clamped to
/// `qmax`; all zeros when `s` is 0.
#[inline(always)]
fn quantise_scaled(block: &[f32; BLOCK], s: f32, qmax: f32, codes: &mut [i32; BLOCK]) {
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    for (c, v) in codes.iter_mut().zip(block) {
        *c = round_clamped(v * inv, qmax);
    }
}

/// Quantises up to 32 values (a block; missing values are zeros) to q8 (-127..=127) or q4 (-7..=7) codes.
/// Returns the f16 bits of the block's scale, `max |w| / 127` (q8) or `/ 7` (q4), rounded through f16 so
/// the codes are computed with the scale the kernels will use; codes round to nearest, ties away from zero.
/// The same arithmetic as the packer's, which batches the scales of a row's blocks (the embedding table's rows
/// come here one block at a time).
#[inline]
pub(crate) fn quantise_block(src: &[f32], q8: bool, codes: &mut [i32; BLOCK]) -> u16 {
    let qmax = if q8 { 127.0f32 } else { 7.0 };
    let block: [f32; BLOCK] = match src.try_into() {
        Ok(whole) => whole,
        Err(_) => std::array::from_fn(|i| src.get(i).copied().unwrap_or(0.0)),
    };
    let s16 = f16::from_f32(block_max(&block) / qmax);
    quantise_scaled(&block, s16.to_f32(), qmax, codes);
    s16.to_bits()
}

/// `x` clamped to `[-qmax, qmax]` (a whole number) and rounded to the nearest integer, ties away from zero
/// (as `f32::round`): the integer conversion truncates, exactly at these magnitudes.
/// A NaN gives `-qmax` (the loader reports the value as an error, the codes are not used).
/// Written without branches, libm calls or saturating casts so that it vectorises: it is most of a load's
/// work, and `as i32` alone (saturating, NaN to 0) made it scalar, four instructions per value.
#[inline(always)]
pub(crate) fn round_clamped(x: f32, qmax: f32) -> i32 {
    // `max` / `min` return the number where the other operand is NaN.
    let x = x.max(-qmax).min(qmax);
    let t = x.abs();
    // SAFETY: `t` is a number in `[0, qmax]`, and `qmax` (7 or 127) is far inside i32's range.
    let whole: i32 = unsafe { t.to_int_unchecked() };
    let r = whole + i32::from(t - whole as f32 >= 0.5);
    if x < 0.0 { -r } else { r }
}

/// K rounded up to a whole block for the block formats (q4k: a whole super-block).
pub fn padded_k(format: WeightDtype, k: usize) -> usize {
    match format {
        WeightDtype::Q8 | WeightDtype::Q4 | WeightDtype::Q5 => k.div_ceil(BLOCK) * BLOCK,
        WeightDtype::Q4K | WeightDtype::Q5K | WeightDtype::Q6K => k.div_ceil(SUPER_BLOCK) * SUPER_BLOCK,
        _ => k,
    }
}

/// The words of a `[count, K, N]` stack as texels of four words: `[count, rows, cols]`, a row of texels per
/// group of K (four rows for q8, eight for q4, one for f16) and a texel per four columns (q8, q4) or eight
/// (f16: a word holds two).
pub fn texel_grid(format: WeightDtype, [count, k, n]: [usize; 3]) -> [usize; 3] {
    match format {
        WeightDtype::Q8 => [count, padded_k(format, k) / 4, n / 4],
        WeightDtype::Q4 | WeightDtype::Q4K | WeightDtype::Q5 | WeightDtype::Q5K | WeightDtype::Q6K => {
            [count, padded_k(format, k) / 8, n / 4]
        }
        _ => [count, k, n / 8],
    }
}

/// Words of one packed `[K, N]` matrix (without scales).
fn words_per_matrix(format: WeightDtype, k: usize, n: usize) -> usize {
    match format {
        WeightDtype::F16 => k * n / 2,
        WeightDtype::Q8 => padded_k(format, k) / 4 * n,
        WeightDtype::Q4 | WeightDtype::Q4K | WeightDtype::Q5 | WeightDtype::Q5K | WeightDtype::Q6K => {
            padded_k(format, k) / 8 * n
        }
        WeightDtype::F32 => k * n,
    }
}

/// Splits each word of `t` (`[a, b, c]`) into `parts` fields of `bits` bits, lowest first: `[a, b, c, parts]`.
fn split_bits(t: Tensor<3, Int>, bits: u32, parts: usize) -> Tensor<4, Int> {
    let mask = (1i64 << bits) - 1;
    let fields = (0..parts)
        .map(|i| {
            t.clone()
                .bitwise_right_shift_scalar(i as i64 * i64::from(bits))
                .bitwise_and_scalar(mask)
        })
        .collect();
    Tensor::stack(fields, 3)
}

/// f16 bit patterns (0..=65535) to their f32 values, exactly (normals, subnormals, zeros).
fn f16_bits_to_f32(h: Tensor<1, Int>) -> Tensor<1> {
    let device = h.device();
    let [len] = h.dims();
    let sign = h.clone().bitwise_right_shift_scalar(15);
    let exp = h.clone().bitwise_right_shift_scalar(10).bitwise_and_scalar(31);
    let mant = h.bitwise_and_scalar(1023);
    // value = (mant + 1024 * (exp > 0)) * 2^(max(exp, 1) - 25), from a table of exact powers of two.
    let powers: Vec<f32> = (0..32).map(|e: i32| 2f32.powi(e.max(1) - 25)).collect();
    let powers = Tensor::<1>::from_data(TensorData::new(powers, [32]), &device).select(0, exp.clone());
    let significand = mant + exp.greater_elem(0).int().mul_scalar(1024);
    let magnitude = significand.float() * powers;
    let signs = sign.float().mul_scalar(-2.0).add_scalar(1.0);
    (magnitude * signs).reshape([len])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Q8_0 or Q4_0 block copied as bytes is what its codes make (`exact_block`, then `code_bytes`).
    #[test]
    fn copied_blocks_are_their_codes_bytes() {
        use super::super::ggml::{GgmlType, block_bytes, encode, exact_block};
        let values: Vec<f32> = (0..256).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) * 1e-3).collect();
        for (ty, q8) in [(GgmlType::Q8_0, true), (GgmlType::Q4_0, false)] {
            let mut bytes = Vec::new();
            encode(ty, &values, &mut bytes);
            for at in (0..256).step_by(32) {
                let mut codes = [0i32; 32];
                let scale = exact_block(ty, &bytes, at, q8, &mut codes).unwrap();
                let want = Some((scale, code_bytes(&codes, q8)));
                assert_eq!(block_bytes(ty, &bytes, at, q8), want, "{ty:?} at {at}");
                assert_eq!(ggml_block(ty, &bytes, at, q8), want);
            }
            assert_eq!(block_bytes(ty, &bytes, 0, !q8), None);
        }
    }

    #[test]
    fn the_packer_quantises_as_the_block_quantiser_does() {
        // The packer runs in a build for the CPU's vector width (AVX2 where there is one); the embedding's
        // block quantiser in the portable build: the same scales and codes either way, padding included.
        let (n, k) = (12, 100);
        let rows: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-3).collect();
        for format in [WeightDtype::Q8, WeightDtype::Q4] {
            let q8 = format == WeightDtype::Q8;
            let word_rows = if q8 { BLOCK / 4 } else { BLOCK / 8 };
            let mut host = PackedHost::new(format, [1, k, n]);
            host.push_rows(&rows);
            for j in 0..n {
                for b in 0..k.div_ceil(BLOCK) {
                    let block = &rows[j * k + b * BLOCK..(j * k + (b + 1) * BLOCK).min((j + 1) * k)];
                    let mut codes = [0; BLOCK];
                    assert_eq!(
                        host.scales[b * n + j],
                        quantise_block(block, q8, &mut codes),
                        "{format:?} scale"
                    );
                    let bytes = code_bytes(&codes, q8);
                    for (g, word) in bytes.chunks_exact(4).take(word_rows).enumerate() {
                        assert_eq!(
                            host.words[(b * word_rows + g) * n + j],
                            u32::from_le_bytes(word.try_into().expect("four bytes")),
                            "{format:?} ({j}, {b}, {g})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packing_in_slices_equals_packing_whole() {
        // A weight pushed a slice of outputs at a time (the loader's way for a large one) packs to the same
        // words and scales as pushed whole; the last slice is short.
        let (n, k) = (200, 70);
        let rows: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-3).collect();
        for format in WeightDtype::PACKED {
            let mut whole = PackedHost::new(format, [1, k, n]);
            whole.push_rows(&rows);
            let mut sliced = PackedHost::new(format, [1, k, n]);
            for start in (0..n).step_by(64) {
                let end = (start + 64).min(n);
                assert!(sliced.push_outputs(start..end, &[Rows::F32(&rows[start * k..end * k])]));
            }
            assert!(sliced.words == whole.words, "{format:?} words");
            assert!(sliced.scales == whole.scales, "{format:?} scales");
            assert!(sliced.extra == whole.extra, "{format:?} extra words");
            assert_eq!(sliced.filled, 1, "{format:?}: the matrix is complete");
        }
    }

    /// The CPU device where the crate has it (the workspace build), else the GPU.
    fn cpu() -> Device {
        #[cfg(feature = "cpu")]
        return crate::gpu::device::cpu_device();
        #[cfg(not(feature = "cpu"))]
        return crate::gpu::device::default_device().expect("a device for the unpacking tests");
    }

    fn sample(len: usize) -> Vec<f32> {
        // Mixed magnitudes, signs and exact zeros (a zero block must not divide by zero).
        (0..len)
            .map(|i| {
                if i % 97 < 32 && i > 400 {
                    0.0
                } else {
                    ((i * 7919 % 2003) as f32 - 1001.0) * 1e-3 * (1.0 + (i % 5) as f32)
                }
            })
            .collect()
    }

    #[test]
    fn unpacking_recovers_the_weights_within_the_format_precision() {
        let device = cpu();
        // K not a multiple of 32 (padded blocks), two matrices in the stack.
        let (count, k, n) = (2, 45, 12);
        let data = sample(count * k * n);
        for (format, tolerance) in [
            (WeightDtype::F16, 1e-3),
            (WeightDtype::Q8, 1.0 / 127.0),
            (WeightDtype::Q4, 1.0 / 7.0),
            // Within one step of the block's range (at most twice its largest magnitude) in 15 (q5k: 31).
            (WeightDtype::Q4K, 2.0 / 15.0 / 0.51),
            (WeightDtype::Q5K, 2.0 / 31.0 / 0.51),
            // A step of each half block's (its largest magnitude over 32), and the rounding of its scale to
            // a multiple of the super-block's (which a padded block's zeros share).
            (WeightDtype::Q6K, 1.5 / 32.0 / 0.51),
            // llama.cpp's Q5_0 rounding: half a step of max |w| / 16, a whole one where the largest positive
            // value meets a largest negative one (code 32 clamps to 31).
            (WeightDtype::Q5, 1.0 / 16.0 / 0.51),
        ] {
            let p = Packed::new(&data, [count, k, n], format, &device);
            let got = p.dequantise().into_data().try_to_vec::<f32>().unwrap();
            assert_eq!(got.len(), data.len());
            for (m, (a, b)) in got.chunks(k * n).zip(data.chunks(k * n)).enumerate() {
                for col in 0..n {
                    for blk in (0..k).step_by(BLOCK) {
                        let rows = blk..(blk + BLOCK).min(k);
                        let amax = rows.clone().map(|r| b[r * n + col].abs()).fold(0f32, f32::max);
                        for r in rows {
                            let err = (a[r * n + col] - b[r * n + col]).abs();
                            assert!(
                                err <= tolerance * amax.max(1e-3) * 0.51 + 1e-6,
                                "{format:?} matrix {m} row {r} col {col}: {} vs {}",
                                a[r * n + col],
                                b[r * n + col]
                            );
                        }
                    }
                }
            }
        }
    }

    /// A GGUF file's Q8_0 / Q5_0 / Q4_0 rows packed as q8, Q4_0's as q4 and Q4_K's, Q5_K's and Q6_K's as q4k, q5k
    /// and q6k unpack to exactly
    /// the values llama.cpp's block layout gives (`ggml::decode`): their codes and scales are copied (Q4_0's
    /// code -8 included). Other block types come within the format's precision.
    #[test]
    fn ggml_blocks_pack_exactly_where_the_formats_agree() {
        use crate::gpu::ggml::{GgmlType, decode};
        let device = cpu();
        let (k, n) = (512, 8);
        // Blocks with every code and sane f16 scales (Q4_K: and minimums; random bytes elsewhere).
        let block = |ty: GgmlType, i: usize| -> Vec<u8> {
            let size = ty.block().unwrap().1 as usize;
            let mut b: Vec<u8> = (0..size).map(|j| ((i * 131 + j * 29 + 7) % 256) as u8).collect();
            let d = half::f16::from_f32(0.01 + 0.001 * (i % 7) as f32).to_le_bytes();
            b[..2].copy_from_slice(&d);
            if matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K) {
                b[2..4].copy_from_slice(&half::f16::from_f32(0.002 * (i % 5) as f32).to_le_bytes());
            }
            if ty == GgmlType::Q6_K {
                // Q6_K's scale is its last two bytes.
                b[208..].copy_from_slice(&d);
            }
            b
        };
        for (ty, format, exact) in [
            (GgmlType::Q8_0, WeightDtype::Q8, true),
            (GgmlType::Q4_0, WeightDtype::Q4, true),
            (GgmlType::Q4_0, WeightDtype::Q8, true),
            (GgmlType::Q5_0, WeightDtype::Q8, true),
            (GgmlType::Q5_0, WeightDtype::Q5, true),
            (GgmlType::Q4_K, WeightDtype::Q4K, true),
            (GgmlType::Q4_K, WeightDtype::Q8, false),
            (GgmlType::Q5_K, WeightDtype::Q5K, true),
            (GgmlType::Q5_K, WeightDtype::Q8, false),
            (GgmlType::Q6_K, WeightDtype::Q6K, true),
            (GgmlType::Q6_K, WeightDtype::Q8, false),
        ] {
            let (per, _) = ty.block().unwrap();
            let bytes: Vec<u8> = (0..n * k / per as usize).flat_map(|i| block(ty, i)).collect();
            let mut want = vec![0f32; n * k];
            assert!(decode(ty, &bytes, 0, &mut want));
            let mut host = PackedHost::new(format, [1, k, n]);
            assert!(host.push(&[Rows::Ggml(ty, &bytes)]));
            let got = host
                .upload(&device)
                .dequantise()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for j in 0..n {
                for r in 0..k {
                    let (g, w) = (got[r * n + j], want[j * k + r]);
                    let tolerance = if exact { 0.0 } else { 0.51 * amax / 127.0 };
                    assert!(
                        (g - w).abs() <= tolerance,
                        "{ty:?} as {format:?} output {j} row {r}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn rounding_matches_the_standard_library() {
        let q = 127.0;
        for x in [
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.5,
            2.5,
            -2.5,
            0.49999997,
            126.5,
            -127.49,
            3.0e9,
            f32::MIN_POSITIVE,
        ] {
            assert_eq!(round_clamped(x, q), x.clamp(-q, q).round() as i32, "{x}");
        }
        for i in 0..20_000 {
            let x = (i as f32 - 10_000.0) * 0.0137;
            assert_eq!(round_clamped(x, q), x.clamp(-q, q).round() as i32, "{x}");
            assert_eq!(round_clamped(x, 7.0), x.clamp(-7.0, 7.0).round() as i32, "{x}");
        }
        // Infinities clamp; NaN (reported by the loader, its codes unused) stays in range.
        assert_eq!(
            (round_clamped(f32::INFINITY, q), round_clamped(f32::NEG_INFINITY, q)),
            (127, -127)
        );
        assert_eq!(round_clamped(f32::NAN, 7.0), -7);
    }

    #[test]
    fn f16_bits_decode_exactly() {
        let device = cpu();
        let values = [0.0f32, -0.0, 1.0, -2.5, 65504.0, 6.1e-5, 5.96e-8, -3.0e-6, 0.333];
        let bits: Vec<i32> = values.iter().map(|&v| i32::from(f16::from_f32(v).to_bits())).collect();
        let got = f16_bits_to_f32(Tensor::from_data(TensorData::new(bits, [values.len()]), &device));
        let got = got.into_data().try_to_vec::<f32>().unwrap();
        for (g, v) in got.iter().zip(values) {
            assert_eq!(*g, f16::from_f32(v).to_f32(), "{v}");
        }
    }

    #[test]
    fn sizes_follow_the_format() {
        let device = cpu();
        let data = vec![0.5f32; 64 * 8];
        let bytes = |f| Packed::new(&data, [1, 64, 8], f, &device).bytes();
        assert_eq!(bytes(WeightDtype::F16), 64 * 8 * 2);
        assert_eq!(bytes(WeightDtype::Q8), 64 * 8 + 2 * 8 * 2);
        assert_eq!(bytes(WeightDtype::Q4), 64 * 8 / 2 + 2 * 8 * 2);
        // q4k: K padded to 256, eight blocks' multipliers and one super-block word per column.
        assert_eq!(bytes(WeightDtype::Q4K), 256 * 8 / 2 + 8 * 8 * 2 + 8 * 4);
        // q5: q4's words and scales, and a word of fifth bits per block and column.
        assert_eq!(bytes(WeightDtype::Q5), 64 * 8 / 2 + 2 * 8 * 2 + 2 * 8 * 4);
        // q5k: q4k's, and a word of fifth bits per block and column.
        assert_eq!(bytes(WeightDtype::Q5K), 256 * 8 / 2 + 8 * 8 * 2 + 8 * 4 + 8 * 8 * 4);
        // q6k: q4k's words, scales and super-block words, and two words of top bits per block and column.
        assert_eq!(bytes(WeightDtype::Q6K), 256 * 8 / 2 + 8 * 8 * 2 + 8 * 4 + 2 * 8 * 8 * 4);
        assert!(!Packed::supports(WeightDtype::Q8, 10));
        assert!(!Packed::supports(WeightDtype::F32, 8));
    }

    /// Words put in a texture of either layout (one layer or several) come back out exactly: what the
    /// reference path unpacks is what was packed.
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn words_come_back_out_of_textures_in_either_layout() {
        use crate::gpu::texture::Layout;
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        // 2 x 64 x 2600: several texture rows, so 2 rows per layer also gives several layers, written two
        // at a time, the last one partly padding.
        let shape = [2, 64, 2600];
        let data = sample(shape.iter().product());
        for format in WeightDtype::PACKED {
            let mut host = PackedHost::new(format, shape);
            for m in data.chunks(shape[1] * shape[2]) {
                host.push_rows(&transpose(m, shape[1], shape[2]));
            }
            let words = host.words;
            for (layout, rows) in [
                (Layout::Rows, usize::MAX),
                (Layout::Columns, usize::MAX),
                (Layout::Rows, 2),
                (Layout::Columns, 2),
            ] {
                let p = Packed::new(&data, shape, format, &device).in_texture(layout, rows);
                assert!(matches!(&p.words, Words::Texture(t) if t.layout() == layout));
                let got: Vec<u32> = p
                    .words_tensor()
                    .into_data()
                    .convert::<i32>()
                    .try_to_vec::<i32>()
                    .unwrap()
                    .into_iter()
                    .map(|w| w as u32)
                    .collect();
                assert!(
                    got == words,
                    "{format:?} {layout:?} ({rows} rows a layer): words differ"
                );
            }
        }
    }
}
