//! The latent KV cache (`docs/architecture.md` §3.4): per layer, per token, the normalised latent `c'`
//! (r_kv values) and the roped shared key `k_pe` (d_r values), preallocated for the session's context and
//! written in place.

use burn::tensor::{Device, Tensor};

use crate::config::ModelConfig;

/// Per layer `[max_context, r_kv + d_r]` f32, filled from row 0 up to [`LatentCache::len`].
#[derive(Debug)]
pub struct LatentCache {
    layers: Vec<Tensor<2>>,
    capacity: usize,
    len: usize,
    width: usize,
}

impl LatentCache {
    /// Allocates an empty cache for `max_context` tokens.
    pub fn new(config: &ModelConfig, max_context: usize, device: &Device) -> Self {
        let width = config.latent_width();
        let layers = (0..config.num_hidden_layers)
            .map(|_| Tensor::zeros([max_context, width], device))
            .collect();
        Self {
            layers,
            capacity: max_context,
            len: 0,
            width,
        }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Values stored per token per layer (r_kv + d_r).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes of the cached tokens (all layers, f32).
    pub fn bytes_used(&self) -> u64 {
        (self.len * self.width * self.layers.len() * 4) as u64
    }

    /// Bytes allocated (all layers, f32).
    pub fn bytes_allocated(&self) -> u64 {
        (self.capacity * self.width * self.layers.len() * 4) as u64
    }

    /// Forgets tokens after the first `len` (their rows are overwritten by the next forward).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn layers(&self) -> &[Tensor<2>] {
        &self.layers
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut Tensor<2> {
        &mut self.layers[i]
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
