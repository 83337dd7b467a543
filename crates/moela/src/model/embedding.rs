//! The token embedding table (`model.embed_tokens.weight`, `[V, H]`), kept on the host in the weight format
//! the model was loaded with: a lookup reads T rows and uploads `[T, H]` f32, so the largest matrix of the
//! checkpoint never has to fit a storage binding, and it takes the memory of its format (DeepSeek-V2-Lite's
//! 102400 x 2048 table is 839 MB as f32, 223 MB as q8, 118 MB as q4).
//!
//! q8 / q4 rows are quantised in blocks of 32 values along H with an f16 scale each, as packed weights are
//! (`gpu/packed.rs`), so a row reads back with the same precision as the projections.

use half::f16;

use crate::gpu::packed::{BLOCK, code_bytes, for_chunks, ggml_block, quantise_block};
use crate::gpu::{Rows, WeightDtype};

/// The table's values.
#[derive(Debug, Clone)]
enum Values {
    F32(Vec<f32>),
    /// f16 bit patterns.
    F16(Vec<u16>),
    /// q8: a signed byte per value; q4: two 4-bit codes per byte (`q + 8`, low nibble first). Each row is
    /// padded to whole blocks; one f16 scale per block.
    Blocks {
        codes: Vec<u8>,
        scales: Vec<u16>,
    },
}

/// A `[rows, cols]` table on the host in a weight format.
#[derive(Debug, Clone)]
pub struct HostTable {
    format: WeightDtype,
    rows: usize,
    cols: usize,
    values: Values,
}

impl HostTable {
    /// A zero table of `rows` x `cols` in `format`; a q4k, q5, q5k or q6k model's table is held as q8 (a row is
    /// read by the host, not by a product; q8 holds a `Q5_0` row exactly and a K-quant one without a visible
    /// loss).
    pub fn new(format: WeightDtype, rows: usize, cols: usize) -> Self {
        let format = if matches!(format, WeightDtype::Q5) || format.is_k_quant() {
            WeightDtype::Q8
        } else {
            format
        };
        let values = match format {
            WeightDtype::F32 => Values::F32(vec![0.0; rows * cols]),
            WeightDtype::F16 => Values::F16(vec![0; rows * cols]),
            WeightDtype::Q8
            | WeightDtype::Q4
            | WeightDtype::Q4K
            | WeightDtype::Q5
            | WeightDtype::Q5K
            | WeightDtype::Q6K => Values::Blocks {
                codes: vec![0; rows * code_bytes_per_row(format, cols)],
                scales: vec![0; rows * cols.div_ceil(BLOCK)],
            },
        };
        Self {
            format,
            rows,
            cols,
            values,
        }
    }

    /// A table of row-major `values` (`[rows, cols]`) in `format`.
    pub fn from_f32(format: WeightDtype, rows: usize, cols: usize, values: &[f32]) -> Self {
        let mut t = Self::new(format, rows, cols);
        t.set_rows(0, values);
        t
    }

    fn code_bytes_per_row(&self) -> usize {
        code_bytes_per_row(self.format, self.cols)
    }

    /// Rows in the table.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes the table takes.
    pub fn bytes(&self) -> usize {
        match &self.values {
            Values::F32(v) => v.len() * 4,
            Values::F16(v) => v.len() * 2,
            Values::Blocks { codes, scales } => codes.len() + scales.len() * 2,
        }
    }

    /// Stores rows `first..` from row-major `values` (whole rows), on every core natively.
    ///
    /// # Panics
    /// When the rows run past the table or `values` is not whole rows.
    pub fn set_rows(&mut self, first: usize, values: &[f32]) {
        let cols = self.cols;
        assert!(values.len().is_multiple_of(cols.max(1)), "whole rows");
        let count = values.len() / cols.max(1);
        assert!(first + count <= self.rows, "rows past the table");
        let (q8, per_row) = (self.format == WeightDtype::Q8, self.code_bytes_per_row());
        let blocks = cols.div_ceil(BLOCK);
        match &mut self.values {
            Values::F32(v) => v[first * cols..(first + count) * cols].copy_from_slice(values),
            Values::F16(v) => {
                for_chunks(&mut v[first * cols..(first + count) * cols], 1 << 16, |i, out| {
                    let src = &values[i << 16..];
                    for (o, x) in out.iter_mut().zip(src) {
                        *o = f16::from_f32(*x).to_bits();
                    }
                });
            }
            Values::Blocks { codes, scales } => {
                let codes = &mut codes[first * per_row..(first + count) * per_row];
                let scales = &mut scales[first * blocks..(first + count) * blocks];
                let mut rows: Vec<(&mut [u8], &mut [u16])> =
                    codes.chunks_mut(per_row).zip(scales.chunks_mut(blocks)).collect();
                for_chunks(&mut rows, 64, |t, chunk| {
                    for (i, (row_codes, row_scales)) in chunk.iter_mut().enumerate() {
                        let r = t * 64 + i;
                        quantise_row(&values[r * cols..(r + 1) * cols], q8, row_codes, row_scales);
                    }
                });
            }
        }
    }

    /// Stores rows `first..` from `rows` as a checkpoint stores them (whole rows): a GGUF file's Q8_0 / Q4_0
    /// rows into a q8 / q4 table as they are (codes and scales copied), anything else converted. Returns
    /// false when a value is not finite.
    ///
    /// # Panics
    /// When the rows run past the table or are not whole rows.
    pub fn set_stored(&mut self, first: usize, rows: Rows<'_>) -> bool {
        let cols = self.cols;
        let (q8, per_row) = (self.format == WeightDtype::Q8, self.code_bytes_per_row());
        let blocks = cols.div_ceil(BLOCK);
        if let (Rows::Ggml(ty, bytes), Values::Blocks { codes, scales }) = (rows, &mut self.values)
            && cols.is_multiple_of(BLOCK)
            && ggml_block(ty, bytes, 0, q8).is_some()
        {
            let count = rows.len() / cols;
            assert!(first + count <= self.rows, "rows past the table");
            let mut finite = true;
            for r in 0..count {
                let row_codes = &mut codes[(first + r) * per_row..][..per_row];
                for b in 0..blocks {
                    let (s, code) = ggml_block(ty, bytes, r * cols + b * BLOCK, q8).expect("the same type");
                    finite &= half::f16::from_bits(s).is_finite();
                    scales[(first + r) * blocks + b] = s;
                    row_codes[b * per_block(q8)..][..per_block(q8)].copy_from_slice(&code[..per_block(q8)]);
                }
            }
            return finite;
        }
        // Converted on every core, as the loader converts any other slice.
        let mut values = vec![0f32; rows.len()];
        let finite = std::sync::atomic::AtomicBool::new(true);
        for_chunks(&mut values, 1 << 16, |i, chunk| {
            if !rows.read(i << 16, chunk) {
                finite.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        });
        self.set_rows(first, &values);
        finite.into_inner()
    }

    /// Appends row `row` as f32 to `out`.
    ///
    /// # Panics
    /// When `row` is outside the table (the model checks token ids first).
    pub fn push_row(&self, row: usize, out: &mut Vec<f32>) {
        let cols = self.cols;
        match &self.values {
            Values::F32(v) => out.extend_from_slice(&v[row * cols..(row + 1) * cols]),
            Values::F16(v) => out.extend(
                v[row * cols..(row + 1) * cols]
                    .iter()
                    .map(|b| f16::from_bits(*b).to_f32()),
            ),
            Values::Blocks { codes, scales } => {
                let per_row = self.code_bytes_per_row();
                let blocks = cols.div_ceil(BLOCK);
                let codes = &codes[row * per_row..(row + 1) * per_row];
                let scales = &scales[row * blocks..(row + 1) * blocks];
                out.extend((0..cols).map(|c| {
                    let s = f16::from_bits(scales[c / BLOCK]).to_f32();
                    let q = if self.format == WeightDtype::Q8 {
                        f32::from(codes[c] as i8)
                    } else {
                        f32::from((codes[c / 2] >> (4 * (c % 2))) & 0xf) - 8.0
                    };
                    q * s
                }));
            }
        }
    }

    /// The whole table as row-major f32 (training, export).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            self.push_row(r, &mut out);
        }
        out
    }
}

/// Bytes of codes per row: a byte per value (q8) or per two (q4), over whole blocks.
fn code_bytes_per_row(format: WeightDtype, cols: usize) -> usize {
    let padded = cols.div_ceil(BLOCK) * BLOCK;
    if format == WeightDtype::Q8 { padded } else { padded / 2 }
}

/// Quantises one row in blocks of 32, as `gpu/packed.rs` quantises weights ([`quantise_block`]).
fn quantise_row(row: &[f32], q8: bool, codes: &mut [u8], scales: &mut [u16]) {
    let mut q = [0i32; BLOCK];
    for (b, block) in row.chunks(BLOCK).enumerate() {
        scales[b] = quantise_block(block, q8, &mut q);
        codes[b * per_block(q8)..(b + 1) * per_block(q8)].copy_from_slice(&code_bytes(&q, q8)[..per_block(q8)]);
    }
}

/// Bytes of one block's codes.
fn per_block(q8: bool) -> usize {
    if q8 { BLOCK } else { BLOCK / 2 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q8_0 / Q4_0 rows are stored as they are: a row reads back as the blocks' own values.
    #[test]
    fn ggml_rows_are_kept_exactly() {
        use crate::gpu::ggml::{GgmlType, decode};
        let (rows, cols) = (3, 64);
        for (ty, format, size) in [
            (GgmlType::Q8_0, WeightDtype::Q8, 34),
            (GgmlType::Q4_0, WeightDtype::Q4, 18),
        ] {
            let mut bytes: Vec<u8> = (0..rows * cols / 32 * size).map(|i| (i * 37 % 251) as u8).collect();
            for b in bytes.chunks_exact_mut(size) {
                b[..2].copy_from_slice(&half::f16::from_f32(0.02).to_le_bytes());
            }
            let mut want = vec![0f32; rows * cols];
            assert!(decode(ty, &bytes, 0, &mut want));
            let mut t = HostTable::new(format, rows, cols);
            assert!(t.set_stored(0, Rows::Ggml(ty, &bytes)));
            for r in 0..rows {
                let mut got = Vec::new();
                t.push_row(r, &mut got);
                assert_eq!(got, want[r * cols..(r + 1) * cols], "{ty:?} row {r}");
            }
        }
    }

    #[test]
    fn rows_come_back_within_the_format_precision() {
        // 45 columns: a partial last block; two calls of set_rows.
        let (rows, cols) = (7, 45);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) * 1e-3)
            .collect();
        for (format, tolerance) in [
            (WeightDtype::F32, 0.0),
            (WeightDtype::F16, 1e-3),
            (WeightDtype::Q8, 0.51 / 127.0),
            (WeightDtype::Q4, 0.51 / 7.0),
        ] {
            let mut t = HostTable::new(format, rows, cols);
            t.set_rows(0, &values[..3 * cols]);
            t.set_rows(3, &values[3 * cols..]);
            let got = t.to_f32();
            for r in 0..rows {
                for (b, block) in values[r * cols..(r + 1) * cols].chunks(BLOCK).enumerate() {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (i, v) in block.iter().enumerate() {
                        let g = got[r * cols + b * BLOCK + i];
                        assert!(
                            (g - v).abs() <= tolerance * amax + 1e-6,
                            "{format:?} row {r} col {}: {g} vs {v}",
                            b * BLOCK + i
                        );
                    }
                }
            }
            let mut one = Vec::new();
            t.push_row(5, &mut one);
            assert_eq!(one, got[5 * cols..6 * cols].to_vec());
        }
        let bytes = |f| HostTable::new(f, 100, 64).bytes();
        assert_eq!(bytes(WeightDtype::F32), 100 * 64 * 4);
        assert_eq!(bytes(WeightDtype::Q8), 100 * 64 + 100 * 2 * 2);
        assert_eq!(bytes(WeightDtype::Q4), 100 * 32 + 100 * 2 * 2);
    }
}
