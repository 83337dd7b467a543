//! One decoder layer (`docs/architecture.md` §2): `h = h + attn(input_layernorm(h))`, then
//! `h = h + ffn(post_attention_layernorm(h))`, the feed-forward half a dense MLP (the first
//! `first_k_dense_replace` layers) or DeepSeekMoE.

use burn::tensor::{Device, Int, Tensor};

use super::mla::{Mla, RowAt};
use super::mlp::Mlp;
use super::moe::Moe;
use crate::gpu::residual::{BlockOutput, Residual};
use crate::gpu::rms_norm::RmsNorm;

/// The feed-forward half of a block.
#[derive(Debug, Clone)]
pub enum FeedForward {
    /// The first `first_k_dense_replace` layers.
    Dense(Mlp),
    /// DeepSeekMoE.
    Moe(Box<Moe>),
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Block {
    /// `input_layernorm`.
    pub attn_norm: RmsNorm,
    /// Multi-head latent attention.
    pub attn: Mla,
    /// `post_attention_layernorm`.
    pub ffn_norm: RmsNorm,
    /// MLP or MoE.
    pub ffn: FeedForward,
}

impl Block {
    /// Bytes the layer's weights take on the device, and those one token reads.
    pub fn bytes(&self) -> (usize, usize) {
        let fixed = self.attn_norm.bytes() + self.attn.bytes() + self.ffn_norm.bytes();
        let (all, read) = match &self.ffn {
            FeedForward::Dense(m) => (m.bytes(), m.bytes()),
            FeedForward::Moe(m) => m.bytes(),
        };
        (fixed + all, fixed + read)
    }

    /// The layer over the residual stream `h` (`[T, H]`) at positions `pos..pos + T`, writing the tokens'
    /// latents into this layer's `cache` rows. With `routing`, the experts a MoE layer chose (`[T, K]`) are
    /// appended to it.
    pub fn forward(
        &self,
        h: &mut Residual,
        pos: usize,
        cache: &mut Tensor<2>,
        tables: &(Tensor<2>, Tensor<2>),
        device: &Device,
        routing: Option<&mut Vec<Tensor<2, Int>>>,
    ) {
        // Attention: h = h + MLA(input_layernorm(h)).
        let a = self.attn.forward(h.norm(&self.attn_norm), pos, cache, tables, device);
        h.add(BlockOutput::Dense(a));
        self.feed_forward(h, routing);
    }

    /// The layer over a batch of sequences, one token each: row `i` of `h` (`[B, H]`) is the next token of
    /// the sequence `rows[i]` describes, whose cache and position (row `i` of `tables`) its attention uses;
    /// the feed-forward half runs over all rows at once.
    pub fn forward_rows(
        &self,
        h: &mut Residual,
        rows: &mut [RowAt<'_>],
        tables: &(Tensor<2>, Tensor<2>),
        device: &Device,
    ) {
        let a = self.attn.forward_rows(h.norm(&self.attn_norm), rows, tables, device);
        h.add(BlockOutput::Dense(a));
        self.feed_forward(h, None);
    }

    /// h = h + FFN(post_attention_layernorm(h)); a MoE output is mixed where it is added.
    fn feed_forward(&self, h: &mut Residual, routing: Option<&mut Vec<Tensor<2, Int>>>) {
        let n = h.norm(&self.ffn_norm);
        let f = match &self.ffn {
            FeedForward::Dense(m) => BlockOutput::Dense(m.forward(n)),
            FeedForward::Moe(m) => {
                let (out, chosen) = m.forward_delta(n);
                if let Some(r) = routing {
                    r.push(chosen.routed());
                }
                out
            }
        };
        h.add(f);
    }
}
