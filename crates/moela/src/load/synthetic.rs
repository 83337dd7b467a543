//! Checkpoint tensors made from a seed as the loader reads them: a real model's shapes at full size (a 31 GB
//! DeepSeek-V2-Lite) can be benchmarked without a file on disk or a whole copy in memory. Each row's values
//! come from its own generator, seeded by (seed, tensor, row), so any range of rows reads the same values
//! whichever order it is read in.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// What a synthetic tensor holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    /// Uniform in `[-amp, amp]`, stored as bf16 (projections, embeddings).
    Uniform(f32),
    /// All ones, stored as bf16 (norm gains).
    Ones,
    /// Uniform in `[-amp, amp]`, stored as f32 (V3's router correction bias).
    UniformF32(f32),
}

/// One tensor of a [`Synthetic`] file.
#[derive(Debug, Clone)]
pub struct SyntheticTensor {
    /// HF name.
    pub name: String,
    /// HF shape.
    pub shape: Vec<usize>,
    /// Its values.
    pub fill: Fill,
}

impl SyntheticTensor {
    /// Bytes the tensor would take in a safetensors file.
    pub fn bytes(&self) -> u64 {
        let n: usize = self.shape.iter().product();
        n as u64 * if matches!(self.fill, Fill::UniformF32(_)) { 4 } else { 2 }
    }
}

/// A weight file whose tensors exist only as they are read.
#[derive(Debug, Clone)]
pub struct Synthetic {
    /// The tensors, in the order their (virtual) bytes are laid out.
    pub tensors: Vec<SyntheticTensor>,
    seed: u64,
}

impl Synthetic {
    /// A file of `tensors` whose values come from `seed`.
    pub fn new(tensors: Vec<SyntheticTensor>, seed: u64) -> Self {
        Self { tensors, seed }
    }

    /// What the tensors would take in a safetensors file.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(SyntheticTensor::bytes).sum()
    }

    /// Values of rows `first..` of tensor `index` (row width `cols`) into `out` (whole rows).
    pub(super) fn fill_rows(&self, index: usize, first: usize, cols: usize, out: &mut [f32]) {
        let fill = self.tensors[index].fill;
        let row = |r: usize, out: &mut [f32]| {
            let amp = match fill {
                Fill::Ones => {
                    out.fill(1.0);
                    return;
                }
                Fill::Uniform(a) | Fill::UniformF32(a) => a,
            };
            let key = self.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (r as u64).rotate_left(32);
            let mut rng = SmallRng::seed_from_u64(key);
            for v in out {
                *v = rng.random_range(-amp..=amp);
            }
        };
        let cols = cols.max(1);
        #[cfg(not(target_arch = "wasm32"))]
        {
            use rayon::prelude::*;
            out.par_chunks_mut(cols)
                .enumerate()
                .for_each(|(i, o)| row(first + i, o));
        }
        #[cfg(target_arch = "wasm32")]
        for (i, o) in out.chunks_mut(cols).enumerate() {
            row(first + i, o);
        }
    }
}
