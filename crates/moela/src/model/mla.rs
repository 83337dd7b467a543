//! Multi-head latent attention (`deepseek-architecture.md` §3), attending in latent space.
//!
//! Every token's key and value are one compressed latent `c'` (r_kv values, after `kv_a_layernorm`) plus one
//! shared rope key `k_pe` (d_r values): that pair is all the cache holds. Queries are moved into latent space
//! with the absorbed `W_UK` (§3.4), so scores are `q~ . c' + q_pe . k_pe`; the attention-weighted latent is
//! mapped out with `W_UV`. Prefill and decode run this same path (prefill with a causal mask).

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use super::norm::RmsNorm;
use super::rope;
use super::{Linear, as_f32};

/// How the query is produced.
#[derive(Debug, Clone)]
pub enum QProj {
    /// `q_proj`: `[H] -> [n_h * d_qk]` (V2-Lite, Moonlight).
    Plain(Linear),
    /// `q_a_proj` -> `q_a_layernorm` -> `q_b_proj` through rank r_q (V2, V3).
    Lora {
        /// `[H] -> [r_q]`.
        a: Linear,
        /// Norm over r_q (eps 1e-6).
        norm: Box<RmsNorm>,
        /// `[r_q] -> [n_h * d_qk]`.
        b: Linear,
    },
}

/// One attention block's weights.
#[derive(Debug, Clone)]
pub struct Mla {
    /// Query projection.
    pub q: QProj,
    /// `kv_a_proj_with_mqa`: `[H] -> [r_kv + d_r]` (latent, then rope key; rope rows half-split).
    pub kv_a: Linear,
    /// `kv_a_layernorm` over r_kv.
    pub kv_a_norm: RmsNorm,
    /// Absorbed key up-projection `W_UK`, `[n_h, d_n, r_kv]`.
    pub w_uk: Tensor<3>,
    /// Value up-projection transposed, `W_UV^T`, `[n_h, r_kv, d_v]`.
    pub w_uv_t: Tensor<3>,
    /// `o_proj`: `[n_h * d_v] -> [H]`.
    pub o: Linear,
    /// n_h.
    pub heads: usize,
    /// d_n.
    pub nope: usize,
    /// d_r.
    pub rope: usize,
    /// r_kv.
    pub rank: usize,
    /// d_v.
    pub v: usize,
    /// Softmax scale (with YaRN's mscale^2).
    pub scale: f64,
}

impl Mla {
    /// Attention over the cache for `x` (`[T, H]`, normed) at positions `pos..pos+T`.
    ///
    /// Writes the new tokens' latents into `cache` (`[max_context, r_kv + d_r]`) and returns `[T, H]`.
    pub fn forward(
        &self,
        x: Tensor<2>,
        pos: usize,
        cache: &mut Tensor<2>,
        tables: &(Tensor<2>, Tensor<2>),
        device: &Device,
    ) -> Tensor<2> {
        let [t, _] = x.dims();
        let (n_h, d_n, d_r, r_kv) = (self.heads, self.nope, self.rope, self.rank);
        let width = r_kv + d_r;
        let s = pos + t;

        // Queries: [T, n_h * d_qk] -> [n_h, T, d_qk].
        let q = self.queries(x.clone()).reshape([t, n_h, d_n + d_r]).swap_dims(0, 1);
        let q_nope = q.clone().narrow(2, 0, d_n); // [n_h, T, d_n]
        let q_pe = rope::apply(q.narrow(2, d_n, d_r), &tables.0, &tables.1); // [n_h, T, d_r]

        // This step's latents and rope keys: [T, r_kv + d_r], written into the cache.
        let a = self.kv_a.forward(x);
        let latent = self.kv_a_norm.forward(a.clone().narrow(1, 0, r_kv));
        let k_pe = rope::apply(a.narrow(1, r_kv, d_r), &tables.0, &tables.1);
        let entry = Tensor::cat(vec![latent, k_pe], 1);
        cache.inplace(|c| c.slice_assign([pos..s, 0..width], entry));
        let keys = cache.clone().slice([0..s, 0..width]); // [S, r_kv + d_r]

        // Absorb W_UK into the query: q~ = q_nope W_UK, [n_h, T, r_kv]; scores over [c'; k_pe].
        let q_latent = q_nope.matmul(as_f32(&self.w_uk));
        let query = Tensor::cat(vec![q_latent, q_pe], 2).reshape([n_h * t, width]);
        let scores = query.matmul(keys.clone().transpose()).mul_scalar(self.scale); // [n_h*T, S]
        let mut scores = scores.reshape([n_h, t, s]);
        if t > 1 {
            scores = scores + causal_mask(pos, t, device).unsqueeze_dim::<3>(0);
        }
        let probs = softmax(scores, 2).reshape([n_h * t, s]);

        // Weighted latent, then W_UV per head: [n_h, T, r_kv] x [n_h, r_kv, d_v] -> [T, n_h * d_v].
        let mixed = probs.matmul(keys.narrow(1, 0, r_kv)).reshape([n_h, t, r_kv]);
        let out = mixed
            .matmul(as_f32(&self.w_uv_t))
            .swap_dims(0, 1)
            .reshape([t, n_h * self.v]);
        self.o.forward(out)
    }
}

impl Mla {
    /// `x` `[T, H]` -> queries `[T, n_h * d_qk]` (rope dims still unrotated).
    fn queries(&self, x: Tensor<2>) -> Tensor<2> {
        match &self.q {
            QProj::Plain(p) => p.forward(x),
            QProj::Lora { a, norm, b } => b.forward(norm.forward(a.forward(x))),
        }
    }

    /// Causal attention for `b` independent sequences of `t` tokens at positions `0..t`, with no cache
    /// (training): `x` is `[B*T, H]` (normed, sequence-major), the result `[B*T, H]`.
    ///
    /// The same latent-space computation as [`Mla::forward`], batched: scores over `[c'; k_pe]` with the
    /// absorbed `W_UK`, then the weighted latent through `W_UV`.
    pub fn forward_batch(
        &self,
        x: Tensor<2>,
        b: usize,
        t: usize,
        tables: &(Tensor<2>, Tensor<2>),
        device: &Device,
    ) -> Tensor<2> {
        let (n_h, d_n, d_r, r_kv) = (self.heads, self.nope, self.rope, self.rank);
        let q = self.queries(x.clone()).reshape([b, t, n_h, d_n + d_r]).swap_dims(1, 2); // [B, n_h, T, d_qk]
        let q_nope = q.clone().narrow(3, 0, d_n);
        let q_pe = rope::apply(q.narrow(3, d_n, d_r), &tables.0, &tables.1);

        let a = self.kv_a.forward(x);
        let latent = self
            .kv_a_norm
            .forward(a.clone().narrow(1, 0, r_kv))
            .reshape([b, t, r_kv]);
        let k_pe = rope::apply(a.narrow(1, r_kv, d_r).reshape([b, t, d_r]), &tables.0, &tables.1);
        let keys = Tensor::cat(vec![latent, k_pe], 2).unsqueeze_dim::<4>(1); // [B, 1, T, r_kv + d_r]

        let q_latent = q_nope.matmul(as_f32(&self.w_uk).unsqueeze_dim::<4>(0)); // [B, n_h, T, r_kv]
        let query = Tensor::cat(vec![q_latent, q_pe], 3);
        let scores = query.matmul(keys.clone().swap_dims(2, 3)).mul_scalar(self.scale); // [B, n_h, T, T]
        let scores = scores + causal_mask(0, t, device).reshape([1, 1, t, t]);
        let probs = softmax(scores, 3);
        let mixed = probs.matmul(keys.narrow(3, 0, r_kv)); // [B, n_h, T, r_kv]
        let out = mixed
            .matmul(as_f32(&self.w_uv_t).unsqueeze_dim::<4>(0)) // [B, n_h, T, d_v]
            .swap_dims(1, 2)
            .reshape([b * t, n_h * self.v]);
        self.o.forward(out)
    }
}

/// `[T, pos+T]`: 0 where query `i` (at `pos+i`) may see key `j`, -inf after it.
fn causal_mask(pos: usize, t: usize, device: &Device) -> Tensor<2> {
    let s = pos + t;
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        for v in &mut m[i * s + pos + i + 1..(i + 1) * s] {
            *v = f32::NEG_INFINITY;
        }
    }
    Tensor::from_data(TensorData::new(m, [t, s]), device)
}
