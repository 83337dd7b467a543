//! Rotary position embedding for the d_r rope dims, with YaRN frequencies (`docs/architecture.md` §3.2-3.3).
//!
//! Checkpoints store rope dims as interleaved pairs `(x[2i], x[2i+1])`. At load the rows producing them are
//! permuted to half-split order `[x0, x2, .., x1, x3, ..]` (see [`deinterleaved_order`]), so here the rotation
//! is the plain half-split form. Query and key get the same permutation, so every dot product is unchanged.

use burn::tensor::{Device, Tensor, TensorData};

use crate::config::ModelConfig;

/// Precomputed rope frequencies.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Inverse frequency of each pair (YaRN applied), length d_r/2.
    inv_freq: Vec<f64>,
    /// cos/sin amplitude (YaRN's mscale ratio, 1 without YaRN).
    amplitude: f64,
}

impl Rope {
    /// Frequencies for a config.
    pub fn new(config: &ModelConfig) -> Self {
        let (inv_freq, amplitude) = config.rope_frequencies();
        Self { inv_freq, amplitude }
    }

    /// cos and sin tables `[len, d_r/2]` for positions `start..start+len`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        self.upload(self.host_tables(start, len), len, device)
    }

    /// cos and sin tables `[B, d_r/2]`, row `i` for position `positions[i]` (a batch of sequences).
    pub fn tables_at(&self, positions: &[usize], device: &Device) -> (Tensor<2>, Tensor<2>) {
        self.upload(self.host_tables_at(positions), positions.len(), device)
    }

    fn upload(&self, (cos, sin): (Vec<f32>, Vec<f32>), len: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let half = self.inv_freq.len();
        (
            Tensor::from_data(TensorData::new(cos, [len, half]), device),
            Tensor::from_data(TensorData::new(sin, [len, half]), device),
        )
    }

    /// [`Rope::tables`] on the host, row-major `[len, d_r / 2]` each.
    pub fn host_tables(&self, start: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        self.host_rows(start..start + len)
    }

    /// [`Rope::tables_at`] on the host.
    pub fn host_tables_at(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        self.host_rows(positions.iter().copied())
    }

    fn host_rows(&self, positions: impl ExactSizeIterator<Item = usize>) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for p in positions {
            for &f in &self.inv_freq {
                // Angles in f64: positions past 2^24 would lose precision in f32.
                let a = p as f64 * f;
                cos.push((a.cos() * self.amplitude) as f32);
                sin.push((a.sin() * self.amplitude) as f32);
            }
        }
        (cos, sin)
    }
}

/// Rotates `x` (`[.., len, d_r]`, half-split order) with tables from [`Rope::tables`].
pub fn apply<const D: usize>(x: Tensor<D>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<D> {
    let dims = x.dims();
    let d = dims[D - 1];
    let half = d / 2;
    let mut tshape = [1usize; D];
    tshape[D - 2] = dims[D - 2];
    tshape[D - 1] = half;
    let cos: Tensor<D> = cos.clone().reshape(tshape);
    let sin: Tensor<D> = sin.clone().reshape(tshape);
    let x1 = x.clone().narrow(D - 1, 0, half);
    let x2 = x.narrow(D - 1, half, half);
    let out1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
    let out2 = x2 * cos + x1 * sin;
    Tensor::cat(vec![out1, out2], D - 1)
}

/// The source row of each of `rows` rows of an `[out, in]` weight whose `d_r` rope rows at
/// `offset + k * stride` (k = 0..groups) go from interleaved pairs to half-split order: the weight is
/// reordered a whole row at a time, so a quantised file's rows keep their blocks.
pub fn deinterleaved_order(rows: usize, offset: usize, stride: usize, groups: usize, d_r: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    let half = d_r / 2;
    for g in 0..groups {
        let base = offset + g * stride;
        for (i, row) in order[base..base + d_r].iter_mut().enumerate() {
            *row = base + if i < half { 2 * i } else { 2 * (i - half) + 1 };
        }
    }
    order
}

/// The inverse of [`deinterleaved_order`]: half-split rope rows back to interleaved pairs (for saving).
pub fn interleave_rows(weight: &mut [f32], cols: usize, offset: usize, stride: usize, groups: usize, d_r: usize) {
    permute_rows(weight, cols, offset, stride, groups, d_r, |i, half| {
        if i % 2 == 0 { i / 2 } else { half + i / 2 }
    });
}

/// Row `i` of each rope group becomes the old row `source(i, d_r / 2)`.
fn permute_rows(
    weight: &mut [f32],
    cols: usize,
    offset: usize,
    stride: usize,
    groups: usize,
    d_r: usize,
    source: impl Fn(usize, usize) -> usize,
) {
    let mut tmp = vec![0f32; d_r * cols];
    for g in 0..groups {
        let base = offset + g * stride;
        let rows = &mut weight[base * cols..(base + d_r) * cols];
        for i in 0..d_r {
            let from = source(i, d_r / 2);
            tmp[i * cols..(i + 1) * cols].copy_from_slice(&rows[from * cols..(from + 1) * cols]);
        }
        rows.copy_from_slice(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_undoes_deinterleave() {
        let orig: Vec<f32> = (0..30).map(|v| v as f32).collect();
        let order = deinterleaved_order(10, 1, 5, 2, 4);
        let mut w: Vec<f32> = order.iter().flat_map(|&r| orig[r * 3..r * 3 + 3].to_vec()).collect();
        assert_ne!(w, orig);
        interleave_rows(&mut w, 3, 1, 5, 2, 4);
        assert_eq!(w, orig);
    }

    #[test]
    fn deinterleave_moves_even_rows_first() {
        // 2 groups of 4 rope rows after 1 plain row each, 1 column.
        assert_eq!(deinterleaved_order(10, 1, 5, 2, 4), vec![0, 1, 3, 2, 4, 5, 6, 8, 7, 9]);
    }
}
