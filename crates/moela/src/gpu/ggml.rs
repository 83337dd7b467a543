//! ggml's tensor types, as GGUF files store them: their ids and block layouts, and the decoding of the
//! quantised blocks to f32 on the CPU, a run of 32 values at a time (what the packers take). The layouts
//! are llama.cpp's (`ggml-common.h`): a block of 32 values (`Q4_0`, `Q5_0`, `Q8_0`, and `Q4_1` / `Q5_1` with
//! a minimum) or a super-block of 256 in eight sub-blocks of 32 with 6-bit scales and minimums (`Q4_K`,
//! `Q5_K`) or sixteen of 16 with 8-bit scales (`Q6_K`), always with f16 super-scales.

use half::f16;

use super::WeightDtype;

/// A ggml tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// F32.
    pub const F32: Self = Self(0);
    /// F16.
    pub const F16: Self = Self(1);
    /// Q4_0: blocks of 32, an f16 scale and 4-bit codes.
    pub const Q4_0: Self = Self(2);
    /// Q4_1: blocks of 32, an f16 scale and minimum and 4-bit codes.
    pub const Q4_1: Self = Self(3);
    /// Q5_0: blocks of 32, an f16 scale and 5-bit codes.
    pub const Q5_0: Self = Self(6);
    /// Q5_1: blocks of 32, an f16 scale and minimum and 5-bit codes.
    pub const Q5_1: Self = Self(7);
    /// Q8_0: blocks of 32, an f16 scale and 8-bit codes.
    pub const Q8_0: Self = Self(8);
    /// Q4_K: super-blocks of 256.
    pub const Q4_K: Self = Self(12);
    /// Q5_K: super-blocks of 256.
    pub const Q5_K: Self = Self(13);
    /// Q6_K: super-blocks of 256.
    pub const Q6_K: Self = Self(14);
    /// BF16.
    pub const BF16: Self = Self(30);

    /// `(name, values per block, bytes per block)` of the types a file may store (`Q8_1` is only ever made
    /// in memory), or `None` for any other id.
    fn layout(self) -> Option<(&'static str, u64, u64)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            16 => ("IQ2_XXS", 256, 66),
            17 => ("IQ2_XS", 256, 74),
            18 => ("IQ3_XXS", 256, 98),
            19 => ("IQ1_S", 256, 50),
            20 => ("IQ4_NL", 32, 18),
            21 => ("IQ3_S", 256, 110),
            22 => ("IQ2_S", 256, 82),
            23 => ("IQ4_XS", 256, 136),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", 256, 56),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", 256, 54),
            35 => ("TQ2_0", 256, 66),
            39 => ("MXFP4", 32, 17),
            40 => ("NVFP4", 64, 36),
            41 => ("Q1_0", 128, 18),
            _ => return None,
        })
    }

    /// The type's name as llama.cpp prints it (`Q4_K`), or `type N` for an unknown id.
    pub fn name(self) -> String {
        self.layout()
            .map_or_else(|| format!("type {}", self.0), |(n, ..)| n.to_string())
    }

    /// Values per block and bytes per block.
    pub fn block(self) -> Option<(u64, u64)> {
        self.layout().map(|(_, b, s)| (b, s))
    }

    /// Whether moela reads values of this type: the float types and the block types [`decode`] covers.
    pub fn readable(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16) || self.is_block_type()
    }

    /// The quantised block types [`decode`] covers.
    fn is_block_type(self) -> bool {
        matches!(
            self,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q4_K | Self::Q5_K | Self::Q6_K
        )
    }

    /// The format moela stores a file of this type in by default: its own where the blocks are the same
    /// (q4 for Q4_0, q5 for Q5_0, q4k, q5k and q6k for Q4_K, Q5_K and Q6_K, whose blocks go to the GPU
    /// unchanged), f16 for F16 / BF16,
    /// f32 for F32, and q8 for the other block types, which it holds exactly (Q8_0) or without a visible
    /// loss (q4 would round their values a second time).
    pub fn nearest_format(self) -> WeightDtype {
        match self {
            Self::F32 => WeightDtype::F32,
            Self::F16 | Self::BF16 => WeightDtype::F16,
            Self::Q4_0 => WeightDtype::Q4,
            Self::Q4_K => WeightDtype::Q4K,
            Self::Q5_0 => WeightDtype::Q5,
            Self::Q5_K => WeightDtype::Q5K,
            Self::Q6_K => WeightDtype::Q6K,
            _ => WeightDtype::Q8,
        }
    }

    /// Bytes of `values` consecutive values, or `None` when they are not whole blocks or the type is unknown.
    pub fn bytes_of(self, values: u64) -> Option<u64> {
        let (per, bytes) = self.block()?;
        values.is_multiple_of(per).then(|| values / per * bytes)
    }
}

/// Values `at..at + out.len()` of the consecutive blocks of type `ty` in `bytes`, as f32, into `out`. Returns
/// false when one of them is not finite (a block's f16 scale can be infinite or NaN).
///
/// # Panics
/// When `ty` is not a block type [`GgmlType::readable`] names, or the values are past the end of `bytes`.
pub fn decode(ty: GgmlType, bytes: &[u8], at: usize, out: &mut [f32]) -> bool {
    let (per, size) = ty.block().map(|(p, s)| (p as usize, s as usize)).expect("a known type");
    assert!(ty.is_block_type(), "{} is not a block type", ty.name());
    let mut run = [0f32; 32];
    let mut i = 0;
    while i < out.len() {
        let p = at + i;
        let (block, within) = (p / per, p % per);
        let (part, skip) = (within / 32, within % 32);
        let take = (32 - skip).min(out.len() - i);
        let block = &bytes[block * size..(block + 1) * size];
        if take == 32 {
            decode_run(ty, block, part, (&mut out[i..i + 32]).try_into().expect("32 values"));
        } else {
            decode_run(ty, block, part, &mut run);
            out[i..i + take].copy_from_slice(&run[skip..skip + take]);
        }
        i += take;
    }
    out.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)) < 0x7f80_0000
}

/// A block's f16 at `at`, as f32.
#[inline(always)]
fn half_at(block: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([block[at], block[at + 1]])).to_f32()
}

/// The scale and minimum multipliers (6 bits each) of sub-block `s` of a `Q4_K` / `Q5_K` super-block, from
/// its 12 packed bytes: sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scales) and 4-7
/// (minimums); 4-7 in the nibbles of bytes 8-11, with their top two bits in the top bits of bytes 0-7.
#[inline(always)]
fn scale_min_k4(scales: &[u8], s: usize) -> (f32, f32) {
    let (sc, m) = if s < 4 {
        (scales[s] & 63, scales[s + 4] & 63)
    } else {
        (
            (scales[s + 4] & 0x0f) | ((scales[s - 4] >> 6) << 4),
            (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4),
        )
    };
    (f32::from(sc), f32::from(m))
}

/// Run `part` (values `32 part..32 part + 32`) of one block of `ty`.
#[inline(always)]
fn decode_run(ty: GgmlType, b: &[u8], part: usize, out: &mut [f32; 32]) {
    match ty {
        GgmlType::Q8_0 => {
            let d = half_at(b, 0);
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = f32::from(q as i8) * d;
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            // Low nibbles hold values 0-15, high nibbles 16-31: Q4_0's value is `(q - 8) d`, Q4_1's `q d + m`.
            let d = half_at(b, 0);
            let (offset, min, qs) = match ty {
                GgmlType::Q4_0 => (8, 0.0, &b[2..18]),
                _ => (0, half_at(b, 2), &b[4..20]),
            };
            for (j, &q) in qs.iter().enumerate() {
                out[j] = (i32::from(q & 15) - offset) as f32 * d + min;
                out[j + 16] = (i32::from(q >> 4) - offset) as f32 * d + min;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            // As Q4_0 / Q4_1, with value j's fifth bit in bit j of a 32-bit word.
            let d = half_at(b, 0);
            let (offset, min, at) = match ty {
                GgmlType::Q5_0 => (16, 0.0, 2),
                _ => (0, half_at(b, 2), 4),
            };
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            for (j, &q) in b[at + 4..at + 20].iter().enumerate() {
                let lo = (u32::from(q & 15) | ((qh >> j) & 1) << 4) as i32;
                let hi = (u32::from(q >> 4) | ((qh >> (j + 16)) & 1) << 4) as i32;
                out[j] = (lo - offset) as f32 * d + min;
                out[j + 16] = (hi - offset) as f32 * d + min;
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            // Sub-blocks 2c and 2c+1 share 32 bytes of codes: the low nibbles and the high ones. Q5_K's fifth
            // bit of value j of sub-block s is bit s of byte j of its 32 high-bit bytes.
            let (d, dmin) = (half_at(b, 0), half_at(b, 2));
            let (sc, m) = scale_min_k4(&b[4..16], part);
            let (scale, min) = (d * sc, dmin * m);
            let (codes, high) = match ty {
                GgmlType::Q4_K => (&b[16 + 32 * (part / 2)..][..32], None),
                _ => (&b[48 + 32 * (part / 2)..][..32], Some(&b[16..48])),
            };
            let shift = 4 * (part % 2);
            for (j, &q) in codes.iter().enumerate() {
                let mut q = u32::from(q >> shift) & 15;
                if let Some(h) = high {
                    q |= u32::from((h[j] >> part) & 1) << 4;
                }
                out[j] = scale * q as f32 - min;
            }
        }
        GgmlType::Q6_K => {
            // Each half of 128 values: low nibbles in 64 bytes (values 0-31 and 32-63 in the low nibbles of
            // bytes 0-31 and 32-63, 64-95 and 96-127 in their high nibbles), the top two bits in 32 bytes (bit
            // pairs 0, 1, 2, 3 for the four runs), and an 8-bit scale per 16 values.
            let d = half_at(b, 208);
            let (half, r) = (part / 4, part % 4);
            let ql = &b[64 * half + 32 * (r % 2)..][..32];
            let qh = &b[128 + 32 * half..][..32];
            let scales = &b[192..208];
            for j in 0..32 {
                let low = (ql[j] >> (4 * (r / 2))) & 15;
                let high = (qh[j] >> (2 * r)) & 3;
                let q = i32::from(low | (high << 4)) - 32;
                let scale = d * f32::from(scales[2 * part + j / 16] as i8);
                out[j] = scale * q as f32;
            }
        }
        other => unreachable!("{} is not a block type", other.name()),
    }
}

/// Appends `values` stored as `ty` (F32, F16, BF16, Q8_0, Q4_0, Q5_0 or Q4_K; the block types whole blocks
/// of values) to `out`. Q8_0, Q4_0 and Q5_0 are rounded as llama.cpp's reference quantisers round
/// (`ggml-quants.c`): Q8_0 with the scale `max |x| / 127` and codes `round(x / scale)`, ties away from zero;
/// Q4_0 with the scale `-m / 8` for `m` the value of largest magnitude, codes `x / scale + 8.5` truncated
/// and clamped to 15 (Q5_0: `-m / 16`, `+ 16.5`, 31); the scale is stored as f16 after the codes are made
/// with it in f32. Q4_K and Q5_K as [`encode_k`] makes them, Q6_K as [`encode_q6_k`].
///
/// # Panics
/// For another type, or values that are not whole blocks.
pub fn encode(ty: GgmlType, values: &[f32], out: &mut Vec<u8>) {
    match ty {
        GgmlType::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::F16 => out.extend(values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => out.extend(values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 | GgmlType::Q4_0 => {
            assert!(values.len().is_multiple_of(32), "whole blocks of 32");
            for block in values.chunks_exact(32) {
                if ty == GgmlType::Q8_0 {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                    out.extend(f16::from_f32(d).to_le_bytes());
                    out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
                } else {
                    let m = block.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let d = m / -8.0;
                    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                    let code = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                    out.extend(f16::from_f32(d).to_le_bytes());
                    out.extend((0..16).map(|j| code(block[j]) | (code(block[j + 16]) << 4)));
                }
            }
        }
        GgmlType::Q5_0 => {
            assert!(values.len().is_multiple_of(32), "whole blocks of 32");
            for block in values.chunks_exact(32) {
                // As Q4_0 with 32 steps: the scale `-m / 16`, codes `x / scale + 16.5` truncated, at most 31,
                // the fifth bit of value j in bit j of a word after the scale.
                let m = block.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = m / -16.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                let code = |v: f32| ((v * id + 16.5) as i32).clamp(0, 31) as u32;
                let high = (0..32).fold(0u32, |h, j| h | (code(block[j]) >> 4) << j);
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(high.to_le_bytes());
                out.extend((0..16).map(|j| (code(block[j]) & 15 | (code(block[j + 16]) & 15) << 4) as u8));
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            assert!(values.len().is_multiple_of(256), "whole super-blocks of 256");
            for block in values.chunks_exact(256) {
                out.extend(encode_k(ty, block.try_into().expect("a super-block")));
            }
        }
        GgmlType::Q6_K => {
            assert!(values.len().is_multiple_of(256), "whole super-blocks of 256");
            for block in values.chunks_exact(256) {
                out.extend(encode_q6_k(block.try_into().expect("a super-block")));
            }
        }
        other => panic!("{} cannot be written", other.name()),
    }
}

/// One `Q4_K` (144 bytes) or `Q5_K` (176 bytes) super-block of 256 values. Each block of 32 takes the range
/// from its smallest value (or 0, whichever is lower) to its largest in 16 (`Q5_K`: 32) steps; the eight
/// steps (rounded up) and offsets are stored as 6-bit multiples of the super-block's f16 scale and minimum,
/// and the codes are rounded with the values those give. llama.cpp's quantiser searches each block's range
/// for a smaller error; this is the plain min-max choice, in the same layout (any reader of the type reads
/// it).
pub(crate) fn encode_k(ty: GgmlType, values: &[f32; 256]) -> Vec<u8> {
    let five = ty == GgmlType::Q5_K;
    let top = if five { 31.0 } else { 15.0 };
    let (mut steps, mut offsets) = ([0f32; 8], [0f32; 8]);
    for (j, block) in values.chunks_exact(32).enumerate() {
        let lo = block.iter().fold(0f32, |m, &v| m.min(v));
        let hi = block.iter().fold(lo, |m, &v| m.max(v));
        steps[j] = (hi - lo) / top;
        offsets[j] = -lo;
    }
    let d = f16::from_f32(steps.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
    let dmin = f16::from_f32(offsets.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
    // Steps round up, so that a block's codes span its range (a step rounded down would clip its top).
    let six = |v: f32, unit: f32| if unit > 0.0 { v / unit } else { 0.0 };
    let sc: [u8; 8] = std::array::from_fn(|j| six(steps[j], d.to_f32()).ceil().clamp(0.0, 63.0) as u8);
    let m: [u8; 8] = std::array::from_fn(|j| six(offsets[j], dmin.to_f32()).round().clamp(0.0, 63.0) as u8);
    // Q5_K has the fifth bits (32 bytes) between the multipliers and the nibbles.
    let codes_at = if five { 48 } else { 16 };
    let mut b = vec![0u8; codes_at + 128];
    b[..2].copy_from_slice(&d.to_le_bytes());
    b[2..4].copy_from_slice(&dmin.to_le_bytes());
    for j in 0..4 {
        b[4 + j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        b[8 + j] = m[j] | ((m[j + 4] >> 4) << 6);
        b[12 + j] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    for (j, block) in values.chunks_exact(32).enumerate() {
        let (scale, min) = (d.to_f32() * f32::from(sc[j]), dmin.to_f32() * f32::from(m[j]));
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (i, &v) in block.iter().enumerate() {
            let code = ((v + min) * inv).round().clamp(0.0, top) as u8;
            b[codes_at + 32 * (j / 2) + i] |= (code & 15) << (4 * (j % 2));
            if five {
                b[16 + i] |= (code >> 4) << j;
            }
        }
    }
    b
}

/// Where value `v` (0..256) of a `Q6_K` super-block keeps its code: the byte of its low four bits and their
/// shift, the byte of its top two and theirs. Each half of 128 values has 64 bytes of nibbles (runs 0 and 1
/// of 32 values in the low nibbles of bytes 0-31 and 32-63, runs 2 and 3 in the high ones) and 32 bytes of
/// top bits (bit pair r for run r).
fn q6_k_place(v: usize) -> (usize, u32, usize, u32) {
    let (half, r, l) = (v / 128, v % 128 / 32, v % 32);
    (
        64 * half + 32 * (r % 2) + l,
        4 * (r / 2) as u32,
        128 + 32 * half + l,
        2 * r as u32,
    )
}

/// One `Q6_K` super-block (210 bytes) of 256 values: each run of 16 takes the scale that maps its value of
/// largest magnitude to code -32 (as `Q4_0` does at 4 bits), stored as an 8-bit multiple of the super-block's
/// f16 scale (its largest scale over 127), and the codes are rounded with the scales those give. llama.cpp's
/// quantiser searches each run's scale for a smaller error; this is the plain choice, in the same layout.
pub(crate) fn encode_q6_k(values: &[f32; 256]) -> [u8; 210] {
    let mut scales = [0f32; 16];
    for (j, run) in values.chunks_exact(16).enumerate() {
        let m = run.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        scales[j] = m / -32.0;
    }
    let big = scales.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = f16::from_f32(big / -128.0);
    let inv_d = if d.to_f32() != 0.0 { 1.0 / d.to_f32() } else { 0.0 };
    let mut b = [0u8; 210];
    for (j, run) in values.chunks_exact(16).enumerate() {
        let sc = (scales[j] * inv_d).round().clamp(-128.0, 127.0) as i8;
        b[192 + j] = sc as u8;
        let step = d.to_f32() * f32::from(sc);
        let inv = if step != 0.0 { 1.0 / step } else { 0.0 };
        for (i, &v) in run.iter().enumerate() {
            let code = ((v * inv).round() + 32.0).clamp(0.0, 63.0) as u8;
            let (low, low_shift, high, high_shift) = q6_k_place(16 * j + i);
            b[low] |= (code & 15) << low_shift;
            b[high] |= (code >> 4) << high_shift;
        }
    }
    b[208..].copy_from_slice(&d.to_le_bytes());
    b
}

/// One `Q6_K` super-block (210 bytes) in moela's q6k layout (`packed.rs`): its f16 scale as a word, each
/// block of 32's two 8-bit scales as `first | second << 8`, its codes' low four bits as four words of eight
/// nibbles (as q4's), and their top two bits as two words (rows 0-15, then 16-31; row i in bits 2i..2i+2).
#[inline(always)]
pub(crate) fn q6k_block(b: &[u8]) -> (KBlock, [[u32; 2]; 8]) {
    let head = u32::from(u16::from_le_bytes([b[208], b[209]]));
    let mut scales = [0u16; 8];
    let mut words = [[0u32; 4]; 8];
    let mut high = [[0u32; 2]; 8];
    for j in 0..8 {
        scales[j] = u16::from(b[192 + 2 * j]) | (u16::from(b[193 + 2 * j]) << 8);
        for i in 0..32 {
            let (low, low_shift, top, top_shift) = q6_k_place(32 * j + i);
            words[j][i / 8] |= u32::from((b[low] >> low_shift) & 15) << (4 * (i % 8));
            high[j][i / 16] |= u32::from((b[top] >> top_shift) & 3) << (2 * (i % 16));
        }
    }
    ((head, scales, words), high)
}

/// One `Q5_0` block (22 bytes) in moela's q5 layout (`packed.rs`): its f16 scale, its codes' low four bits as
/// four words of eight nibbles (value `8g + i` in bits `4i..4i+4` of word `g`, as q4's words), and their fifth
/// bits as one word (value `i` in bit `i`, as the block stores them).
#[inline(always)]
pub(crate) fn q5_block(b: &[u8]) -> (u16, [u32; 4], u32) {
    let mut words = [0u32; 4];
    for (j, &q) in b[6..22].iter().enumerate() {
        words[j / 8] |= u32::from(q & 15) << (4 * (j % 8));
        words[2 + j / 8] |= u32::from(q >> 4) << (4 * (j % 8));
    }
    (
        u16::from_le_bytes([b[0], b[1]]),
        words,
        u32::from_le_bytes([b[2], b[3], b[4], b[5]]),
    )
}

/// A super-block in moela's layouts: its head word (f16 scale, and minimum where the type has one), each
/// block of 32's scale entry, and each block's codes' low four bits as four words of eight nibbles.
pub(crate) type KBlock = (u32, [u16; 8], [[u32; 4]; 8]);

/// One `Q4_K` super-block (144 bytes) in moela's q4k layout (`packed.rs`): the super-block's f16 scale and
/// minimum as one word (scale low), each block's 6-bit scale and minimum as `scale | min << 8`, and each
/// block's codes as four words of eight nibbles (value `8g + i` of the block in bits `4i..4i+4` of word `g`).
#[inline(always)]
pub(crate) fn q4k_block(b: &[u8]) -> KBlock {
    k_block(b, 16)
}

/// One `Q5_K` super-block (176 bytes) in moela's q5k layout (`packed.rs`): [`q4k_block`]'s words for its
/// low four bits, and each block's fifth bits as one word (value `i` of the block in bit `i`, as q5's).
#[inline(always)]
pub(crate) fn q5k_block(b: &[u8]) -> (KBlock, [u32; 8]) {
    let high = std::array::from_fn(|j| (0..32).fold(0u32, |h, i| h | u32::from((b[16 + i] >> j) & 1) << i));
    (k_block(b, 48), high)
}

/// [`q4k_block`] for a K-quant super-block whose nibbles start at byte `codes_at`.
#[inline(always)]
fn k_block(b: &[u8], codes_at: usize) -> KBlock {
    let head = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut frames = [0u16; 8];
    let mut words = [[0u32; 4]; 8];
    for j in 0..8 {
        let (sc, m) = scale_min_k4(&b[4..16], j);
        frames[j] = sc as u16 | ((m as u16) << 8);
        let (codes, shift) = (&b[codes_at + 32 * (j / 2)..][..32], 4 * (j % 2));
        for (i, &q) in codes.iter().enumerate() {
            words[j][i / 8] |= u32::from((q >> shift) & 15) << (4 * (i % 8));
        }
    }
    (head, frames, words)
}

/// The block of 32 at value `at` as moela's q8 or q4 code bytes (`packed::code_bytes` of its codes) and its
/// f16 scale, where the file's block is those bytes: `Q8_0` in q8 (its signed codes as
/// they are), `Q4_0` in q4 (its nibbles, value `j` low and `j + 16` high in byte `j`, paired in order).
/// A copy, where [`exact_block`] goes through each value's code.
#[inline(always)]
pub(crate) fn block_bytes(ty: GgmlType, bytes: &[u8], at: usize, q8: bool) -> Option<(u16, [u8; 32])> {
    if !at.is_multiple_of(32) {
        return None;
    }
    let mut out = [0u8; 32];
    let b = match (ty, q8) {
        (GgmlType::Q8_0, true) => {
            let b = &bytes[at / 32 * 34..][..34];
            out.copy_from_slice(&b[2..]);
            b
        }
        (GgmlType::Q4_0, false) => {
            let b = &bytes[at / 32 * 18..][..18];
            let qs = &b[2..18];
            // q4's byte i holds values 2i (low) and 2i + 1 (high).
            for (i, o) in out[..16].iter_mut().enumerate() {
                *o = if i < 8 {
                    (qs[2 * i] & 15) | (qs[2 * i + 1] << 4)
                } else {
                    (qs[2 * i - 16] >> 4) | (qs[2 * i - 15] & 0xf0)
                };
            }
            b
        }
        _ => return None,
    };
    Some((u16::from_le_bytes([b[0], b[1]]), out))
}

/// The block of 32 at value `at` as moela's own block codes and f16 scale, where `ty` stores exactly that: in
/// q8 `Q8_0` (codes -128..=127), `Q5_0` (-16..=15) and `Q4_0` (-8..=7); in q4 `Q4_0`, whose codes moela's q4
/// unpacking (`nibble - 8`) reads as they are. A checkpoint in these moves to the GPU without a value being
/// re-quantised.
#[inline(always)]
pub(crate) fn exact_block(ty: GgmlType, bytes: &[u8], at: usize, q8: bool, codes: &mut [i32; 32]) -> Option<u16> {
    let exact = matches!(ty, GgmlType::Q4_0) || (q8 && matches!(ty, GgmlType::Q8_0 | GgmlType::Q5_0));
    if !at.is_multiple_of(32) || !exact {
        return None;
    }
    let (_, size) = ty.block()?;
    let b = &bytes[at / 32 * size as usize..][..size as usize];
    match ty {
        GgmlType::Q8_0 => {
            for (c, &q) in codes.iter_mut().zip(&b[2..34]) {
                *c = i32::from(q as i8);
            }
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            // decode_run's arithmetic without the scale: Q5_0's fifth bits are bit j of a word.
            let (qs, high, offset) = match ty {
                GgmlType::Q4_0 => (&b[2..18], 0, 8),
                _ => (&b[6..22], u32::from_le_bytes([b[2], b[3], b[4], b[5]]), 16),
            };
            for (j, &q) in qs.iter().enumerate() {
                codes[j] = (u32::from(q & 15) | ((high >> j) & 1) << 4) as i32 - offset;
                codes[j + 16] = (u32::from(q >> 4) | ((high >> (j + 16)) & 1) << 4) as i32 - offset;
            }
        }
        _ => return None,
    }
    Some(u16::from_le_bytes([b[0], b[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `encode_k`'s and `encode_q6_k`'s blocks read back (with llama.cpp's layout, `decode`) within one step
    /// of each block's range (16 steps for `Q4_K`, 32 for `Q5_K`), and a block of zeros (a padded tail)
    /// reads back as zeros.
    #[test]
    fn k_quant_blocks_read_back_within_a_step() {
        let values: Vec<f32> = (0..1024)
            .map(|i| {
                ((i * 7919 % 2003) as f32 - 1001.0) * 1e-3 * (1 + i / 256) as f32 + if i % 64 < 32 { 0.3 } else { 0.0 }
            })
            .collect();
        for (ty, size, steps) in [(GgmlType::Q4_K, 144, 15.0), (GgmlType::Q5_K, 176, 31.0)] {
            k_quant_reads_back(&values, ty, size, steps);
        }
        // Q6_K: within a step of each run of 16 (its largest magnitude over 32; a whole one where the value
        // of largest magnitude meets its opposite, whose code 32 clamps to 31), plus what rounding the run's
        // scale to a multiple of the super-block's (a 128th of the largest) moves its 32 steps.
        let mut bytes = Vec::new();
        encode(GgmlType::Q6_K, &values, &mut bytes);
        assert_eq!(bytes.len(), 4 * 210);
        let mut back = vec![0f32; 1024];
        assert!(decode(GgmlType::Q6_K, &bytes, 0, &mut back));
        for (r, (want, got)) in values.chunks(16).zip(back.chunks(16)).enumerate() {
            let block = &values[r / 16 * 256..][..256];
            let d = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 32.0 / 128.0;
            let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (w, g) in want.iter().zip(got) {
                let bound = amax / 32.0 * 1.01 + 16.0 * d + 1e-6;
                assert!((w - g).abs() <= bound, "Q6_K run {r}: {g} for {w}");
            }
        }
    }

    /// `ty`'s blocks of `values` (and of a padded tail of zeros) read back within a step of each block.
    fn k_quant_reads_back(values: &[f32], ty: GgmlType, size: usize, steps: f32) {
        let mut bytes = Vec::new();
        encode(ty, values, &mut bytes);
        encode(ty, &[0.0; 256], &mut bytes);
        assert_eq!(bytes.len(), 5 * size);
        let mut back = vec![0f32; 1280];
        assert!(decode(ty, &bytes, 0, &mut back));
        for (b, (want, got)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
            let lo = want.iter().fold(0f32, |m, &v| m.min(v));
            let hi = want.iter().fold(lo, |m, &v| m.max(v));
            for (w, g) in want.iter().zip(got) {
                assert!((w - g).abs() <= (hi - lo) / steps, "{ty:?} block {b}: {g} for {w}");
            }
        }
        assert!(back[1024..].iter().all(|&v| v == 0.0));
    }
}
