//! How weights are stored on the GPU ([`WeightDtype`]) and how a checkpoint's values arrive to be stored
//! ([`Rows`]): the two ends a weight format connects. Adding a format means a variant here, its packer in
//! `packed.rs`, its unpacking in a shader include (`shaders/unpack_*.wgsl`) and its key in `shader.rs`.

use half::f16;

use super::ggml::GgmlType;
use crate::error::{Error, Result};

/// Weights per quantisation block (q8, q4, q4k): one scale each.
pub const BLOCK: usize = 32;

/// Weights per q4k / q5k super-block: one f16 scale and minimum for its eight blocks' 6-bit ones.
pub const SUPER_BLOCK: usize = 256;

/// How projection and expert weights are stored on the GPU. Activations, norms, softmax, the router, the
/// absorbed attention factors and the embedding table stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// 4 bytes per weight.
    #[default]
    F32,
    /// 2 bytes per weight: f16 pairs packed in u32 words (no shader-f16 needed).
    F16,
    /// 8.5 bits per weight: signed bytes with an f16 scale per block of 32.
    Q8,
    /// 4.5 bits per weight: 4-bit codes with an f16 scale per block of 32.
    Q4,
    /// 5.5 bits per weight: GGUF's `Q5_0` blocks kept as they are: 5-bit codes (-16..=15) with an f16 scale
    /// per block of 32.
    Q5,
    /// 4.625 bits per weight: GGUF's `Q4_K` super-blocks kept as they are: 4-bit codes from 0 to 15, a
    /// 6-bit scale and minimum per block of 32, an f16 scale and minimum for each of them per 256; a weight
    /// is `d * scale * q - dmin * min`. K is padded to whole super-blocks of 256.
    Q4K,
    /// 5.625 bits per weight: GGUF's `Q5_K` super-blocks kept as they are: q4k's layout with codes from 0
    /// to 31, their fifth bits in a word per block of 32 (as q5's).
    Q5K,
    /// 6.625 bits per weight: GGUF's `Q6_K` super-blocks kept as they are: 6-bit codes (the low four bits
    /// as q4's words, the top two in two words per block of 32), an 8-bit signed scale per 16 values and an
    /// f16 scale per 256; a weight is `d * scale * (q - 32)`.
    Q6K,
}

impl WeightDtype {
    /// Every packed format (all but f32).
    pub const PACKED: [WeightDtype; 7] = [Self::F16, Self::Q8, Self::Q4, Self::Q4K, Self::Q5, Self::Q5K, Self::Q6K];

    /// Bits per stored weight, block scales included.
    pub fn bits(self) -> f64 {
        match self {
            WeightDtype::F32 => 32.0,
            WeightDtype::F16 => 16.0,
            WeightDtype::Q8 => 8.0 + 16.0 / BLOCK as f64,
            WeightDtype::Q4 => 4.0 + 16.0 / BLOCK as f64,
            WeightDtype::Q4K => 4.0 + 16.0 / BLOCK as f64 + 32.0 / SUPER_BLOCK as f64,
            WeightDtype::Q5 => 5.0 + 16.0 / BLOCK as f64,
            WeightDtype::Q5K => 5.0 + 16.0 / BLOCK as f64 + 32.0 / SUPER_BLOCK as f64,
            WeightDtype::Q6K => 6.0 + 16.0 / BLOCK as f64 + 32.0 / SUPER_BLOCK as f64,
        }
    }

    /// Rows of a column one 32-bit word holds in the packed layouts (`packed.rs`): 4 for q8, 8 for q4, 1 for
    /// f16 (a word's two values are of adjacent columns) and f32.
    pub fn rows_per_word(self) -> usize {
        match self {
            WeightDtype::Q8 => 4,
            WeightDtype::Q4 | WeightDtype::Q4K | WeightDtype::Q5 | WeightDtype::Q5K | WeightDtype::Q6K => 8,
            WeightDtype::F16 | WeightDtype::F32 => 1,
        }
    }

    /// Whether weights of this format are stored packed ([`Packed`](super::packed::Packed)).
    pub fn is_packed(self) -> bool {
        self != WeightDtype::F32
    }

    /// The name used by the CLI, the JS options and reports.
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Q8 => "q8",
            WeightDtype::Q4 => "q4",
            WeightDtype::Q4K => "q4k",
            WeightDtype::Q5 => "q5",
            WeightDtype::Q5K => "q5k",
            WeightDtype::Q6K => "q6k",
        }
    }

    /// Parses `f32` / `f16` / `q8` / `q5` / `q4` / `q4k` / `q5k` / `q6k`.
    pub fn parse(s: &str) -> Result<Self> {
        std::iter::once(Self::F32)
            .chain(Self::PACKED)
            .find(|d| d.name() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("weights {s:?}: expected f32, f16, q8, q5, q4, q4k, q5k or q6k"))
            })
    }

    /// Whether the format's codes have bits beyond their nibbles, kept apart (q5, q5k: a fifth bit, one word
    /// per block and column; q6k: two bits, two words), after the scales (and the super-block words).
    pub fn has_high_bits(self) -> bool {
        matches!(self, WeightDtype::Q5 | WeightDtype::Q5K | WeightDtype::Q6K)
    }

    /// Whether the format is a K-quant, GGUF's super-blocks of 256 kept as they are (q4k, q5k, q6k): a model
    /// in one keeps each GGUF tensor in its nearest format (`Reader::format_for`).
    pub fn is_k_quant(self) -> bool {
        matches!(self, WeightDtype::Q4K | WeightDtype::Q5K | WeightDtype::Q6K)
    }

    /// Whether the format's blocks have a minimum as well as a scale (q4k, q5k): its products subtract
    /// `min * sum(x)` per block. These are the K-quants: their blocks' 6-bit multipliers scale an f16 scale
    /// and minimum per [`SUPER_BLOCK`].
    pub fn has_mins(self) -> bool {
        matches!(self, WeightDtype::Q4K | WeightDtype::Q5K)
    }
}

/// Consecutive values of a tensor as stored (little-endian bytes, ggml blocks, or f32 already), read a block at a time by
/// whoever consumes them: the quantisers convert 32 values on the stack instead of a whole tensor to f32.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// f32 values as little-endian bytes.
    F32Bytes(&'a [u8]),
    /// bf16 values as little-endian bytes.
    Bf16(&'a [u8]),
    /// f16 values as little-endian bytes.
    F16(&'a [u8]),
    /// Whole blocks of a quantised ggml type (a GGUF file's `Q8_0`, `Q4_K`, ...), decoded as they are read.
    Ggml(GgmlType, &'a [u8]),
}

impl<'a> Rows<'a> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Rows::F32(v) => v.len(),
            Rows::F32Bytes(b) => b.len() / 4,
            Rows::Bf16(b) | Rows::F16(b) => b.len() / 2,
            Rows::Ggml(t, b) => t
                .block()
                .map_or(0, |(per, size)| b.len() / size as usize * per as usize),
        }
    }

    /// True when there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `range` as a run of their own, stored as they are: rows of a weight taken in another order.
    ///
    /// # Panics
    /// When the range is past the end, or does not start and end on a block of a quantised type.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Rows<'a> {
        let bytes = |b: &'a [u8], size: usize| &b[range.start * size..range.end * size];
        match *self {
            Rows::F32(v) => Rows::F32(&v[range]),
            Rows::F32Bytes(b) => Rows::F32Bytes(bytes(b, 4)),
            Rows::Bf16(b) => Rows::Bf16(bytes(b, 2)),
            Rows::F16(b) => Rows::F16(bytes(b, 2)),
            Rows::Ggml(t, b) => {
                let (per, size) = t.block().map_or((1, 0), |(p, s)| (p as usize, s as usize));
                assert!(
                    range.start.is_multiple_of(per) && range.end.is_multiple_of(per),
                    "values {range:?} are not whole {t:?} blocks"
                );
                Rows::Ggml(t, &b[range.start / per * size..range.end / per * size])
            }
        }
    }

    /// Values `at..at + out.len()` as f32 into `out`. Returns false when one of them is not finite.
    ///
    /// Finiteness is read off the bits: the largest magnitude's bit pattern (sign cleared) is below the
    /// format's infinity exactly when every value is finite, and integer maxima vectorise where float ones
    /// (with their NaN rules) do not.
    #[inline(always)]
    pub fn read(&self, at: usize, out: &mut [f32]) -> bool {
        let n = out.len();
        match self {
            Rows::F32(v) => {
                let mut top = 0u32;
                for (o, x) in out.iter_mut().zip(&v[at..at + n]) {
                    top = top.max(x.to_bits() & 0x7fff_ffff);
                    *o = *x;
                }
                top < 0x7f80_0000
            }
            Rows::F32Bytes(b) => {
                let mut top = 0u32;
                for (o, x) in out.iter_mut().zip(b[4 * at..4 * (at + n)].chunks_exact(4)) {
                    let bits = u32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                    top = top.max(bits & 0x7fff_ffff);
                    *o = f32::from_bits(bits);
                }
                top < 0x7f80_0000
            }
            Rows::Bf16(b) => {
                let mut top = 0u16;
                for (o, x) in out.iter_mut().zip(b[2 * at..2 * (at + n)].chunks_exact(2)) {
                    let bits = u16::from_le_bytes([x[0], x[1]]);
                    top = top.max(bits & 0x7fff);
                    *o = f32::from_bits(u32::from(bits) << 16);
                }
                top < 0x7f80
            }
            Rows::F16(b) => {
                let mut top = 0u16;
                for (o, x) in out.iter_mut().zip(b[2 * at..2 * (at + n)].chunks_exact(2)) {
                    let bits = u16::from_le_bytes([x[0], x[1]]);
                    top = top.max(bits & 0x7fff);
                    *o = f16::from_bits(bits).to_f32();
                }
                top < 0x7c00
            }
            Rows::Ggml(t, b) => super::ggml::decode(*t, b, at, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ggml::{GgmlType, encode};
    use super::*;

    /// A slice of stored values reads what the whole run reads at its offset, for floats and for blocks.
    #[test]
    fn a_slice_reads_its_part_of_the_run() {
        let values: Vec<f32> = (0..512).map(|v| ((v * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let bf16: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let mut q4k = Vec::new();
        encode(GgmlType::Q4_K, &values, &mut q4k);
        for whole in [Rows::F32(&values), Rows::Bf16(&bf16), Rows::Ggml(GgmlType::Q4_K, &q4k)] {
            let mut all = vec![0f32; 512];
            assert!(whole.read(0, &mut all));
            let part = whole.slice(256..512);
            let mut got = vec![0f32; 256];
            assert_eq!(part.len(), 256);
            assert!(part.read(0, &mut got));
            assert_eq!(got, all[256..]);
        }
    }

    #[test]
    #[should_panic(expected = "not whole")]
    fn a_slice_inside_a_block_is_refused() {
        let mut q8 = Vec::new();
        encode(GgmlType::Q8_0, &[0.5; 64], &mut q8);
        let _ = Rows::Ggml(GgmlType::Q8_0, &q8).slice(16..64);
    }
}
