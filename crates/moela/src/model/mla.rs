//! Multi-head latent attention (`docs/architecture.md` §3), attending in latent space.
//!
//! Every token's key and value are one compressed latent `c'` (r_kv values, after `kv_a_layernorm`) plus one
//! shared rope key `k_pe` (d_r values): that pair is all the cache holds. Queries are moved into latent space
//! with the absorbed `W_UK` (§3.4), so scores are `q~ . c' + q_pe . k_pe`; the attention-weighted latent is
//! mapped out with `W_UV`. A prompt's chunk of many tokens instead decompresses the cached latents into
//! per-head keys and values (the expanded form, §3.1) where that costs fewer multiply-adds; the cache is
//! the same either way.
//!
//! Shapes are written with the paper's short names for the config's sizes, each bound once per function
//! from the fields that carry the config's own name: H = `hidden_size`, n_h = `num_attention_heads`,
//! d_n = `qk_nope_head_dim`, d_r = `qk_rope_head_dim`, d_v = `v_head_dim`, r_kv = `kv_lora_rank`,
//! r_q = `q_lora_rank`, d_qk = d_n + d_r.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use super::reader::Reader;
use super::rope;
use crate::config::ModelConfig;
use crate::error::Result;
pub use crate::gpu::latent_attention::RowAt;
use crate::gpu::packed::transpose;
use crate::gpu::rms_norm::RmsNorm;
use crate::gpu::weights::Factor;
use crate::gpu::{self, Kernels, Linear};

/// How the query is produced from the first columns of [`Mla::input`]'s product.
#[derive(Debug, Clone)]
pub enum QProj {
    /// `q_proj`, `[H] -> [n_h * d_qk]`: the product's first columns are the queries (V2-Lite, Moonlight).
    Plain,
    /// `q_a_proj` (the first r_q columns) -> `q_a_layernorm` -> `q_b_proj` (V2, V3).
    Lora {
        /// r_q.
        q_lora_rank: usize,
        /// Norm over r_q (eps 1e-6).
        norm: Box<RmsNorm>,
        /// `[r_q] -> [n_h * d_qk]`.
        b: Linear,
    },
}

/// One attention block's weights.
#[derive(Debug, Clone)]
pub struct Mla {
    /// The two products of the normed input in one: `[q_proj | kv_a_proj_with_mqa]` (or `q_a_proj` first),
    /// `[H] -> [q width + r_kv + d_r]`; the `kv_a` columns hold the latent, then the rope key (half-split).
    pub input: Linear,
    /// How the first columns of `input` become the queries.
    pub q: QProj,
    /// `kv_a_layernorm` over r_kv.
    pub kv_a_norm: RmsNorm,
    /// Absorbed key up-projection `W_UK`, `[n_h, d_n, r_kv]`.
    pub w_uk: Factor,
    /// Value up-projection transposed, `W_UV^T`, `[n_h, r_kv, d_v]`.
    pub w_uv_t: Factor,
    /// `o_proj`: `[n_h * d_v] -> [H]`.
    pub o: Linear,
    /// n_h.
    pub num_attention_heads: usize,
    /// d_n.
    pub qk_nope_head_dim: usize,
    /// d_r.
    pub qk_rope_head_dim: usize,
    /// r_kv.
    pub kv_lora_rank: usize,
    /// d_v.
    pub v_head_dim: usize,
    /// Softmax scale (with YaRN's mscale^2).
    pub scale: f64,
    /// Decode attention with moela's kernels (`shaders/mla_*.wgsl`, where they apply) or burn's ops.
    pub kernels: Kernels,
}

impl Mla {
    /// Loads layer `p`'s attention (`{p}self_attn.*`, `docs/architecture.md` §2), the query's and the
    /// key's rope rows put in half-split order and `kv_b_proj` split into the absorbed factors.
    pub(crate) async fn load(c: &ModelConfig, r: &mut Reader<'_>, p: &str) -> Result<Mla> {
        let (kernels, device) = (r.kernels, r.device);
        let (h, n_h, d_n, d_r, d_v, r_kv) = (
            c.hidden_size,
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        );
        let d_qk = d_n + d_r;
        let a = format!("{p}self_attn.");
        // The query's rope rows (per head, after d_n nope rows) and kv_a's (after r_kv latent rows) go to
        // half-split order (rope.rs), whole rows moved.
        let order = |rows: usize, offset: usize, groups: usize| {
            if c.rope_interleave {
                rope::deinterleaved_order(rows, offset, d_qk, groups, d_r)
            } else {
                (0..rows).collect()
            }
        };
        let kv_a = (format!("{a}kv_a_proj_with_mqa.weight"), r_kv + d_r);
        // q_proj (or q_a_proj) and kv_a_proj_with_mqa read the same input: one weight, one product.
        let (first, q) = match c.q_lora_rank {
            None => ((format!("{a}q_proj.weight"), n_h * d_qk), QProj::Plain),
            Some(r_q) => {
                let q_b = (format!("{a}q_b_proj.weight"), n_h * d_qk);
                let rows: Vec<(usize, usize)> = order(n_h * d_qk, d_n, n_h).into_iter().map(|j| (0, j)).collect();
                let q = QProj::Lora {
                    q_lora_rank: r_q,
                    // q_a_layernorm / kv_a_layernorm use eps 1e-6 whatever rms_norm_eps says (§2).
                    norm: Box::new(RmsNorm::new(
                        r.get(&format!("{a}q_a_layernorm.weight"), &[r_q]).await?,
                        1e-6,
                        kernels,
                        device,
                    )),
                    b: r.linear_rows(&[q_b], r_q, &rows).await?,
                };
                ((format!("{a}q_a_proj.weight"), r_q), q)
            }
        };
        let q_rows = match c.q_lora_rank {
            None => order(n_h * d_qk, d_n, n_h),
            Some(_) => (0..first.1).collect(),
        };
        let rows: Vec<(usize, usize)> = (q_rows.into_iter().map(|j| (0, j)))
            .chain(order(r_kv + d_r, r_kv, 1).into_iter().map(|j| (1, j)))
            .collect();
        let input = r.linear_rows(&[first, kv_a], h, &rows).await?;
        let kv_a_norm = RmsNorm::new(
            r.get(&format!("{a}kv_a_layernorm.weight"), &[r_kv]).await?,
            1e-6,
            kernels,
            device,
        );

        // kv_b rows per head: [k_nope (d_n) | v (d_v)], each over r_kv columns (§3.4).
        let kv_b = r
            .get(&format!("{a}kv_b_proj.weight"), &[n_h * (d_n + d_v), r_kv])
            .await?;
        let mut w_uk = Vec::with_capacity(n_h * d_n * r_kv);
        let mut w_uv_t = Vec::with_capacity(n_h * r_kv * d_v);
        for head in 0..n_h {
            let base = head * (d_n + d_v) * r_kv;
            w_uk.extend_from_slice(&kv_b[base..base + d_n * r_kv]);
            let v_rows = &kv_b[base + d_n * r_kv..base + (d_n + d_v) * r_kv];
            w_uv_t.extend(transpose(v_rows, d_v, r_kv));
        }
        drop(kv_b);
        let o = r.linear(&[format!("{a}o_proj.weight")], h, n_h * d_v).await?;
        Ok(Mla {
            input,
            q,
            kv_a_norm,
            w_uk: Factor::new(w_uk, [n_h, d_n, r_kv], kernels, device),
            w_uv_t: Factor::new(w_uv_t, [n_h, r_kv, d_v], kernels, device),
            o,
            num_attention_heads: n_h,
            qk_nope_head_dim: d_n,
            qk_rope_head_dim: d_r,
            kv_lora_rank: r_kv,
            v_head_dim: d_v,
            scale: c.softmax_scale(),
            kernels,
        })
    }

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
        let both = self.input.forward(x);
        let q = self.lora_queries(&both);
        let out = self.attend(&both, q.as_ref(), t, &mut [RowAt { pos, cache }], tables, device);
        self.o.forward(out)
    }

    /// Attention for a batch of sequences, one token each: row `i` of `x` (`[B, H]`, normed) is the next
    /// token of the sequence `rows[i]` describes, and attends to that sequence's cache only; row `i` of
    /// `tables` (`[B, d_r / 2]` each) is for its position. The products (`input`, `q_b`, `o`) run once for
    /// all rows, and so do the kernels' absorbed factors; each row's scores read its own cache. Returns
    /// `[B, H]`.
    pub fn forward_rows(
        &self,
        x: Tensor<2>,
        rows: &mut [RowAt<'_>],
        tables: &(Tensor<2>, Tensor<2>),
        device: &Device,
    ) -> Tensor<2> {
        let [b, _] = x.dims();
        let both = self.input.forward(x);
        let q = self.lora_queries(&both);
        let out = self.attend(&both, q.as_ref(), b, rows, tables, device);
        self.o.forward(out)
    }

    /// The `t` rows of the input product `both` (and of the LoRA queries `q`, where the model has them)
    /// attended over the caches of `at`: one sequence's `t` tokens (`at` holds one), or one token of each of
    /// `t` sequences. Row `i` of the rope `tables` is for token `i`. Returns `[t, n_h * d_v]`, the input of
    /// `o_proj`.
    fn attend(
        &self,
        both: &Tensor<2>,
        q: Option<&Tensor<2>>,
        t: usize,
        at: &mut [RowAt<'_>],
        tables: &(Tensor<2>, Tensor<2>),
        device: &Device,
    ) -> Tensor<2> {
        let qw = self.q_width();

        // Decode (a few tokens): moela's kernels write the cache rows and attend, one launch for the
        // queries, one per token, one for the output.
        if self.kernels == Kernels::Wgsl && t <= gpu::latent_attention::MAX_TOKENS {
            let inputs = gpu::latent_attention::MlaInputs {
                q: q.unwrap_or(both),
                row: 0,
                rows: t,
                q_col: 0,
                kv: both,
                kv_row: 0,
                kv_col: qw,
                w_uk: &self.w_uk,
                w_uv_t: &self.w_uv_t,
                gain: &self.kv_a_norm.weight,
                tables,
            };
            let shape = gpu::latent_attention::MlaShape {
                num_attention_heads: self.num_attention_heads,
                qk_nope_head_dim: self.qk_nope_head_dim,
                qk_rope_head_dim: self.qk_rope_head_dim,
                kv_lora_rank: self.kv_lora_rank,
                v_head_dim: self.v_head_dim,
                scale: self.scale,
                eps: self.kv_a_norm.eps,
            };
            if let Some(out) = gpu::latent_attention::decode(&inputs, at, &shape) {
                return out;
            }
        }
        if let [one] = at {
            return self.attend_ops(both, q, (0, t), one, tables, device);
        }
        let rows = at
            .iter_mut()
            .enumerate()
            .map(|(i, one)| self.attend_ops(both, q, (i, 1), one, tables, device))
            .collect();
        Tensor::cat(rows, 0)
    }

    /// [`Mla::attend`] with burn's ops for rows `row..row + t`, the tokens of one sequence.
    fn attend_ops(
        &self,
        both: &Tensor<2>,
        q: Option<&Tensor<2>>,
        (row, t): (usize, usize),
        at: &mut RowAt<'_>,
        tables: &(Tensor<2>, Tensor<2>),
        device: &Device,
    ) -> Tensor<2> {
        let (n_h, d_n, d_r, r_kv) = self.head_dims();
        let width = r_kv + d_r;
        let pos = at.pos;
        let s = pos + t;
        let qw = self.q_width();
        let rows = |x: &Tensor<2>| {
            let [all, _] = x.dims();
            if row == 0 && t == all {
                x.clone()
            } else {
                x.clone().narrow(0, row, t)
            }
        };
        let both = rows(both);
        let q = q.map_or_else(|| both.clone().narrow(1, 0, qw), rows);
        let tables = &(rows(&tables.0), rows(&tables.1));
        let a = both.narrow(1, qw, width);

        // Queries: [T, n_h * d_qk] -> [n_h, T, d_qk].
        let q = q.reshape([t, n_h, d_n + d_r]).swap_dims(0, 1);
        let q_nope = q.clone().narrow(2, 0, d_n); // [n_h, T, d_n]
        let q_pe = rope::apply(q.narrow(2, d_n, d_r), &tables.0, &tables.1); // [n_h, T, d_r]

        // This step's latents and rope keys: [T, r_kv + d_r], written into the cache.
        let latent = self.kv_a_norm.forward(a.clone().narrow(1, 0, r_kv));
        let k_pe = rope::apply(a.narrow(1, r_kv, d_r), &tables.0, &tables.1);
        let entry = Tensor::cat(vec![latent, k_pe], 1);
        at.cache.inplace(|c| c.slice_assign([pos..s, 0..width], entry));
        let keys = at.cache.clone().slice([0..s, 0..width]); // [S, r_kv + d_r]

        if prefers_expanded(self, t, s) {
            self.attend_expanded(q_nope, q_pe, keys, pos, device)
        } else {
            self.attend_latent(q_nope, q_pe, keys, pos, device)
        }
    }
}

impl Mla {
    /// `(n_h, d_n, d_r, r_kv)`: heads, query/key dims without rope, rope dims, latent rank.
    fn head_dims(&self) -> (usize, usize, usize, usize) {
        (
            self.num_attention_heads,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.kv_lora_rank,
        )
    }

    /// Bytes the weights take on the device: all of them are read for every token.
    pub fn bytes(&self) -> usize {
        let q = match &self.q {
            QProj::Plain => 0,
            QProj::Lora { norm, b, .. } => norm.bytes() + b.bytes(),
        };
        self.input.bytes() + q + self.kv_a_norm.bytes() + self.w_uk.bytes() + self.w_uv_t.bytes() + self.o.bytes()
    }

    /// Columns of [`Mla::input`]'s product that feed the query: n_h * d_qk, or r_q.
    pub fn q_width(&self) -> usize {
        match &self.q {
            QProj::Plain => self.num_attention_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim),
            QProj::Lora { q_lora_rank, .. } => *q_lora_rank,
        }
    }

    /// The queries from [`Mla::input`]'s product `both`: their own tensor on the LoRA path, `None` where they
    /// are the product's first columns.
    fn lora_queries(&self, both: &Tensor<2>) -> Option<Tensor<2>> {
        match &self.q {
            QProj::Plain => None,
            QProj::Lora { norm, b, .. } => Some(b.forward(norm.forward(both.clone().narrow(1, 0, self.q_width())))),
        }
    }

    /// `x` `[T, H]` -> queries `[T, n_h * d_qk]` (rope dims unrotated) and `kv_a` `[T, r_kv + d_r]`.
    fn project(&self, x: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
        let both = self.input.forward(x);
        let qw = self.q_width();
        let q = self
            .lora_queries(&both)
            .unwrap_or_else(|| both.clone().narrow(1, 0, qw));
        (q, both.narrow(1, qw, self.kv_lora_rank + self.qk_rope_head_dim))
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
        let (n_h, d_n, d_r, r_kv) = self.head_dims();
        let (q, a) = self.project(x);
        let q = q.reshape([b, t, n_h, d_n + d_r]).swap_dims(1, 2); // [B, n_h, T, d_qk]
        let q_nope = q.clone().narrow(3, 0, d_n);
        let q_pe = rope::apply(q.narrow(3, d_n, d_r), &tables.0, &tables.1);

        let latent = self
            .kv_a_norm
            .forward(a.clone().narrow(1, 0, r_kv))
            .reshape([b, t, r_kv]);
        let k_pe = rope::apply(a.narrow(1, r_kv, d_r).reshape([b, t, d_r]), &tables.0, &tables.1);
        let keys = Tensor::cat(vec![latent, k_pe], 2).unsqueeze_dim::<4>(1); // [B, 1, T, r_kv + d_r]

        let q_latent = q_nope.matmul(self.w_uk.tensor().unsqueeze_dim::<4>(0)); // [B, n_h, T, r_kv]
        let query = Tensor::cat(vec![q_latent, q_pe], 3);
        let scores = query.matmul(keys.clone().swap_dims(2, 3)).mul_scalar(self.scale); // [B, n_h, T, T]
        let scores = scores + causal_mask(0, t, device).reshape([1, 1, t, t]);
        let probs = softmax(scores, 3);
        let mixed = probs.matmul(keys.narrow(3, 0, r_kv)); // [B, n_h, T, r_kv]
        let out = mixed
            .matmul(self.w_uv_t.tensor().unsqueeze_dim::<4>(0)) // [B, n_h, T, d_v]
            .swap_dims(1, 2)
            .reshape([b * t, n_h * self.v_head_dim]);
        self.o.forward(out)
    }
}

/// Whether `t` new queries attend to `s` cached keys in the expanded form (keys and values decompressed
/// per head, §3.1) rather than in latent space (§3.4): where it costs fewer multiply-adds.
///
/// Per head, latent space costs `t r_kv (d_n + d_v)` to absorb `W_UK` into the queries and `W_UV` into
/// the output, plus `t s (2 r_kv + d_r)` for scores and the weighted latent; the expanded form costs
/// `s r_kv (d_n + d_v)` to decompress the keys, plus `t s (d_n + d_r + d_v)`. So decode (t = 1) stays in
/// latent space and a prompt's chunk of a few hundred tokens is cheaper expanded (vLLM splits the same way).
/// The expanded form is also kept to calls where its largest buffer, the decompressed keys and values
/// (`n_h s (d_n + d_v)` values), is no larger than latent space's scores (`n_h t s`), so that it never
/// needs a binding that the latent form would not (WebGPU's default limit is 128 MiB).
fn prefers_expanded(mla: &Mla, t: usize, s: usize) -> bool {
    let (d_n, d_r, r_kv, d_v) = (
        mla.qk_nope_head_dim,
        mla.qk_rope_head_dim,
        mla.kv_lora_rank,
        mla.v_head_dim,
    );
    let latent = t * r_kv * (d_n + d_v) + t * s * (2 * r_kv + d_r);
    let expanded = s * r_kv * (d_n + d_v) + t * s * (d_n + d_r + d_v);
    expanded < latent && d_n + d_v <= t
}

/// Query rows per block of the expanded form: each block scores only the keys its last query may see,
/// which skips about half of a causal prompt's scores (a whole-chunk product computes them all and masks).
const QUERY_BLOCK: usize = 64;

impl Mla {
    /// Attention in latent space (§3.4) for `t` queries at positions `pos..pos+t` over the first `s` cache
    /// rows `keys` (`[S, r_kv + d_r]`, this step's included): `q_nope` `[n_h, T, d_n]`, `q_pe`
    /// `[n_h, T, d_r]` (rotated). Returns `[T, n_h * d_v]`, the input of `o_proj`.
    fn attend_latent(
        &self,
        q_nope: Tensor<3>,
        q_pe: Tensor<3>,
        keys: Tensor<2>,
        pos: usize,
        device: &Device,
    ) -> Tensor<2> {
        let (n_h, r_kv, width) = (
            self.num_attention_heads,
            self.kv_lora_rank,
            self.kv_lora_rank + self.qk_rope_head_dim,
        );
        let [s, _] = keys.dims();
        let [_, t, _] = q_nope.dims();
        // Absorb W_UK into the query: q~ = q_nope W_UK, [n_h, T, r_kv]; scores over [c'; k_pe].
        let q_latent = q_nope.matmul(self.w_uk.tensor());
        let query = Tensor::cat(vec![q_latent, q_pe], 2).reshape([n_h * t, width]);
        let scores = query.matmul(keys.clone().transpose()).mul_scalar(self.scale); // [n_h*T, S]
        let mut scores = scores.reshape([n_h, t, s]);
        if t > 1 {
            scores = scores + causal_mask(pos, t, device).unsqueeze_dim::<3>(0);
        }
        let probs = softmax(scores, 2).reshape([n_h * t, s]);

        // Weighted latent, then W_UV per head: [n_h, T, r_kv] x [n_h, r_kv, d_v] -> [T, n_h * d_v].
        let mixed = probs.matmul(keys.narrow(1, 0, r_kv)).reshape([n_h, t, r_kv]);
        mixed
            .matmul(self.w_uv_t.tensor())
            .swap_dims(0, 1)
            .reshape([t, n_h * self.v_head_dim])
    }

    /// The expanded form (§3.1) of [`Mla::attend_latent`]: same arguments, same result.
    ///
    /// The cached latents are decompressed into per-head keys `c' W_UK^T` and values `c' W_UV^T` with one
    /// product, then each block of [`QUERY_BLOCK`] queries attends to the keys up to its last position.
    fn attend_expanded(
        &self,
        q_nope: Tensor<3>,
        q_pe: Tensor<3>,
        keys: Tensor<2>,
        pos: usize,
        device: &Device,
    ) -> Tensor<2> {
        let (n_h, d_n, d_r, r_kv, d_v) = (
            self.num_attention_heads,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.kv_lora_rank,
            self.v_head_dim,
        );
        let [s, _] = keys.dims();
        let [_, t, _] = q_nope.dims();
        // [r_kv, n_h * (d_n + d_v)]: every head's W_UK^T and W_UV^T side by side, as kv_b_proj transposed.
        let w_uk_t = self.w_uk.tensor().swap_dims(1, 2); // [n_h, r_kv, d_n]
        let kv_b = Tensor::cat(vec![w_uk_t, self.w_uv_t.tensor()], 2)
            .swap_dims(0, 1)
            .reshape([r_kv, n_h * (d_n + d_v)]);
        let kv = keys
            .clone()
            .narrow(1, 0, r_kv)
            .matmul(kv_b)
            .reshape([s, n_h, d_n + d_v])
            .swap_dims(0, 1); // [n_h, S, d_n + d_v]
        let k_pe = keys.narrow(1, r_kv, d_r).unsqueeze_dim::<3>(0).expand([n_h, s, d_r]);
        // [n_h, d_qk, S], laid out once for every block's scores.
        let k = Tensor::cat(vec![kv.clone().narrow(2, 0, d_n), k_pe], 2).swap_dims(1, 2);
        let v = kv.narrow(2, d_n, d_v); // [n_h, S, d_v]
        let q = Tensor::cat(vec![q_nope, q_pe], 2).mul_scalar(self.scale); // [n_h, T, d_qk]

        let mut blocks = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
        for first in (0..t).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(t - first);
            let seen = pos + first + rows;
            let scores = q.clone().narrow(1, first, rows).matmul(k.clone().narrow(2, 0, seen)); // [n_h, B, seen]
            let scores = scores + causal_mask(pos + first, rows, device).unsqueeze_dim::<3>(0);
            let probs = softmax(scores, 2);
            blocks.push(probs.matmul(v.clone().narrow(1, 0, seen))); // [n_h, B, d_v]
        }
        Tensor::cat(blocks, 1).swap_dims(0, 1).reshape([t, n_h * d_v])
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

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::*;
    use crate::gpu::WeightDtype;
    use crate::gpu::worst_difference;

    fn random(n: usize, device: &Device) -> Vec<f32> {
        Tensor::<1>::random([n], Distribution::Normal(0.0, 0.3), device)
            .into_data()
            .try_to_vec()
            .unwrap()
    }

    /// A random attention block of hidden size `h` and `[n_h, d_n, d_r, r_kv, d_v]`, on burn's ops (plain
    /// queries, a norm gain near 1, scale 0.31).
    fn random_mla(h: usize, [n_h, d_n, d_r, r_kv, d_v]: [usize; 5], device: &Device) -> Mla {
        let generic = Kernels::Generic;
        let linear = |out: usize, inp: usize| {
            Linear::from_rows(&random(out * inp, device), out, inp, WeightDtype::F32, generic, device)
        };
        let norm = RmsNorm::new(
            random(r_kv, device).iter().map(|v| 1.0 + v).collect(),
            1e-6,
            generic,
            device,
        );
        Mla {
            input: linear(n_h * (d_n + d_r) + r_kv + d_r, h),
            q: QProj::Plain,
            kv_a_norm: norm,
            w_uk: Factor::new(
                random(n_h * d_n * r_kv, device),
                [n_h, d_n, r_kv],
                Kernels::Wgsl,
                device,
            ),
            w_uv_t: Factor::new(
                random(n_h * r_kv * d_v, device),
                [n_h, r_kv, d_v],
                Kernels::Wgsl,
                device,
            ),
            o: linear(h, n_h * d_v),
            num_attention_heads: n_h,
            qk_nope_head_dim: d_n,
            qk_rope_head_dim: d_r,
            kv_lora_rank: r_kv,
            v_head_dim: d_v,
            scale: 0.31,
            kernels: Kernels::Generic,
        }
    }

    /// Latent-space and expanded attention give the same output on awkward sizes: a first chunk of several
    /// query blocks (the last one partial) and a later chunk over the earlier keys.
    #[test]
    fn attention_forms_agree() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        let (n_h, d_n, d_r, r_kv, d_v) = (5, 13, 6, 22, 11);
        let mla = random_mla(8, [n_h, d_n, d_r, r_kv, d_v], &device);
        let keys = Tensor::<2>::random([300, r_kv + d_r], Distribution::Normal(0.0, 1.0), &device);
        for (pos, t) in [(0, 2 * QUERY_BLOCK + 19), (2 * QUERY_BLOCK + 19, 70), (290, 10)] {
            let s = pos + t;
            let q_nope = Tensor::<3>::random([n_h, t, d_n], Distribution::Normal(0.0, 1.0), &device);
            let q_pe = Tensor::<3>::random([n_h, t, d_r], Distribution::Normal(0.0, 1.0), &device);
            let seen = keys.clone().narrow(0, 0, s);
            let latent = mla.attend_latent(q_nope.clone(), q_pe.clone(), seen.clone(), pos, &device);
            let expanded = mla.attend_expanded(q_nope, q_pe, seen, pos, &device);
            assert_eq!(expanded.dims(), [t, n_h * d_v]);
            let diff = worst_difference(expanded, latent);
            assert!(diff < 1e-4, "{t} queries at {pos}: the forms differ by {diff}");
        }
        // Decode stays in latent space; a prompt's chunk of the real shapes goes expanded.
        assert!(!prefers_expanded(&mla, 1, 300));
        let v2_lite = Mla {
            num_attention_heads: 16,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            kv_lora_rank: 512,
            v_head_dim: 128,
            ..mla
        };
        assert!(prefers_expanded(&v2_lite, 256, 512));
        assert!(!prefers_expanded(&v2_lite, 8, 512));
        // Fewer multiply-adds, but keys and values larger than the scores.
        assert!(!prefers_expanded(&v2_lite, 200, 200));
    }

    /// The decode kernels against burn's ops on awkward sizes, past one attention chunk of context (so the
    /// flash-decoding merge runs), for one and for three new tokens, and for a batch of sequences.
    #[test]
    fn decode_kernels_match_burn_ops() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        // 3 heads: one attention workgroup serves them all; 10: two groups of 5.
        for n_h in [3, 10] {
            decode_kernels_match_burn_ops_with(n_h, &device);
        }
    }

    fn decode_kernels_match_burn_ops_with(n_h: usize, device: &Device) {
        let device = device.clone();
        // The kernels read rope, latent and value rows as vec4: multiples of 4, but of nothing larger.
        let (h, d_n, d_r, r_kv, d_v) = (44, 13, 12, 28, 20);
        let mut mla = random_mla(h, [n_h, d_n, d_r, r_kv, d_v], &device);
        let prompt = gpu::latent_attention::CHUNK + 37;
        let cap = prompt + 8;
        let tables = |pos: usize, t: usize| rope_tables(d_r, pos, t, &device);
        let mut cache = Tensor::<2>::zeros([cap, r_kv + d_r], &device);
        let x = Tensor::<2>::random([prompt, h], Distribution::Normal(0.0, 1.0), &device);
        mla.forward(x, 0, &mut cache, &tables(0, prompt), &device);
        // Also three tokens across a chunk boundary (positions CHUNK - 2 ..= CHUNK): the call has two chunks,
        // the first two tokens' second one empty.
        for (pos, t) in [(prompt, 1), (prompt, 3), (gpu::latent_attention::CHUNK - 2, 3)] {
            let x = Tensor::<2>::random([t, h], Distribution::Normal(0.0, 1.0), &device);
            let mut reference_cache = cache.clone() + 0.0;
            let mut kernel_cache = cache.clone() + 0.0;
            mla.kernels = Kernels::Generic;
            let want = mla.forward(x.clone(), pos, &mut reference_cache, &tables(pos, t), &device);
            // The kernels directly, so that a declined call cannot pass as burn's result.
            let tab = tables(pos, t);
            // Queries and kv_a as one product, one buffer, as the forward passes them.
            let both = mla.input.forward(x);
            let inputs = gpu::latent_attention::MlaInputs {
                q: &both,
                row: 0,
                rows: t,
                q_col: 0,
                kv: &both,
                kv_row: 0,
                kv_col: mla.q_width(),
                w_uk: &mla.w_uk,
                w_uv_t: &mla.w_uv_t,
                gain: &mla.kv_a_norm.weight,
                tables: &tab,
            };
            let shape = gpu::latent_attention::MlaShape {
                num_attention_heads: n_h,
                qk_nope_head_dim: d_n,
                qk_rope_head_dim: d_r,
                kv_lora_rank: r_kv,
                v_head_dim: d_v,
                scale: mla.scale,
                eps: mla.kv_a_norm.eps,
            };
            // A rope width that is not a multiple of 4 is declined, leaving the cache to burn's path.
            let odd = gpu::latent_attention::MlaShape {
                qk_rope_head_dim: d_r - 2,
                ..shape
            };
            let untouched = kernel_cache.clone() + 0.0;
            assert!(
                gpu::latent_attention::decode(
                    &inputs,
                    &mut [RowAt {
                        pos,
                        cache: &mut kernel_cache
                    }],
                    &odd
                )
                .is_none()
            );
            assert_eq!(
                worst_difference(kernel_cache.clone(), untouched.clone()),
                0.0,
                "a declined call wrote the cache"
            );
            // Queries from a uniform copy (native texture launches) and from a storage buffer (browsers).
            for storage in [false, true] {
                let mut kernel_cache = untouched.clone() + 0.0;
                gpu::latent_attention::STORAGE_QUERIES.set(storage);
                let at = &mut [RowAt {
                    pos,
                    cache: &mut kernel_cache,
                }];
                let out = gpu::latent_attention::decode(&inputs, at, &shape);
                gpu::latent_attention::STORAGE_QUERIES.set(false);
                let got = mla.o.forward(out.expect("the kernels cover this call"));
                let diff = worst_difference(got, want.clone());
                assert!(
                    diff < 1e-4,
                    "{n_h} heads, {t} tokens at {pos} (storage {storage}): output differs by {diff}"
                );
                let diff = worst_difference(kernel_cache, reference_cache.clone());
                assert!(
                    diff < 1e-5,
                    "{n_h} heads, {t} tokens at {pos} (storage {storage}): cache differs by {diff}"
                );
            }
        }
        // A batch of sequences, one token each, each over a cache of its own: at positions needing two
        // chunks, one chunk, and the last position of the first chunk (one launch each, one chunk count).
        batch_matches_alone(
            &mut mla,
            h,
            &[prompt, 5, gpu::latent_attention::CHUNK - 1],
            cap,
            &device,
        );
    }

    /// Eight sequences in one call, with a latent rank too wide for eight tokens' merged latents in one
    /// output workgroup (so the output takes them two at a time).
    #[test]
    fn a_batch_of_eight_at_a_wide_rank() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        let mut mla = random_mla(36, [4, 8, 8, 516, 20], &device);
        let chunk = gpu::latent_attention::CHUNK;
        let positions = [3, chunk + 9, 40, chunk - 1, 0, 77, chunk, 12];
        batch_matches_alone(&mut mla, 36, &positions, chunk + 16, &device);
    }

    /// Rope cos and sin tables `[t, d_r / 2]` for positions `pos..pos + t`.
    fn rope_tables(d_r: usize, pos: usize, t: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let inv: Vec<f64> = (0..d_r / 2)
            .map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / d_r as f64))
            .collect();
        let (mut c, mut s) = (Vec::new(), Vec::new());
        for p in pos..pos + t {
            for f in &inv {
                c.push((p as f64 * f).cos() as f32);
                s.push((p as f64 * f).sin() as f32);
            }
        }
        (
            Tensor::<2>::from_data(TensorData::new(c, [t, d_r / 2]), device),
            Tensor::<2>::from_data(TensorData::new(s, [t, d_r / 2]), device),
        )
    }

    /// One token for each of `positions.len()` sequences (random caches of `cap` rows) through the kernels in
    /// one call: each row and cache as burn's ops give them for that sequence alone, and each row bit for bit
    /// what the kernels give for that sequence alone.
    fn batch_matches_alone(mla: &mut Mla, h: usize, positions: &[usize], cap: usize, device: &Device) {
        let (n_h, r_kv, d_r) = (mla.num_attention_heads, mla.kv_lora_rank, mla.qk_rope_head_dim);
        let b = positions.len();
        let x = Tensor::<2>::random([b, h], Distribution::Normal(0.0, 1.0), device);
        let caches: Vec<Tensor<2>> = (0..b)
            .map(|_| Tensor::random([cap, r_kv + d_r], Distribution::Normal(0.0, 1.0), device))
            .collect();
        let rows: Vec<_> = positions.iter().map(|&p| rope_tables(d_r, p, 1, device)).collect();
        let tab = (
            Tensor::cat(rows.iter().map(|r| r.0.clone()).collect(), 0),
            Tensor::cat(rows.iter().map(|r| r.1.clone()).collect(), 0),
        );
        mla.kernels = Kernels::Generic;
        let mut want_caches: Vec<Tensor<2>> = caches.iter().map(|c| c.clone() + 0.0).collect();
        let want: Vec<Tensor<2>> = (0..b)
            .map(|i| {
                let xi = x.clone().narrow(0, i, 1);
                mla.forward(xi, positions[i], &mut want_caches[i], &rows[i], device)
            })
            .collect();
        let want = Tensor::cat(want, 0);
        let size: f32 = want.clone().abs().max().into_scalar();
        mla.kernels = Kernels::Wgsl;
        let both = mla.input.forward(x);
        let shape = gpu::latent_attention::MlaShape {
            num_attention_heads: n_h,
            qk_nope_head_dim: mla.qk_nope_head_dim,
            qk_rope_head_dim: d_r,
            kv_lora_rank: r_kv,
            v_head_dim: mla.v_head_dim,
            scale: mla.scale,
            eps: mla.kv_a_norm.eps,
        };
        // Rows `row..row + rows` of the batch's inputs.
        let inputs = |row: usize, rows: usize| gpu::latent_attention::MlaInputs {
            q: &both,
            row,
            rows,
            q_col: 0,
            kv: &both,
            kv_row: row,
            kv_col: mla.q_width(),
            w_uk: &mla.w_uk,
            w_uv_t: &mla.w_uv_t,
            gain: &mla.kv_a_norm.weight,
            tables: &tab,
        };
        let alone: Vec<Tensor<2>> = (0..b)
            .map(|i| {
                let mut cache = caches[i].clone() + 0.0;
                let at = &mut [RowAt {
                    pos: positions[i],
                    cache: &mut cache,
                }];
                gpu::latent_attention::decode(&inputs(i, 1), at, &shape).expect("the kernels cover one row")
            })
            .collect();
        for storage in [false, true] {
            let mut got_caches: Vec<Tensor<2>> = caches.iter().map(|c| c.clone() + 0.0).collect();
            let mut at: Vec<RowAt<'_>> = got_caches
                .iter_mut()
                .zip(positions)
                .map(|(cache, &pos)| RowAt { pos, cache })
                .collect();
            gpu::latent_attention::STORAGE_QUERIES.set(storage);
            let out = gpu::latent_attention::decode(&inputs(0, b), &mut at, &shape);
            gpu::latent_attention::STORAGE_QUERIES.set(false);
            let out = out.expect("the kernels cover a batch");
            for (i, alone) in alone.iter().enumerate() {
                let diff = worst_difference(out.clone().narrow(0, i, 1), alone.clone());
                assert_eq!(
                    diff, 0.0,
                    "{b} sequences, {n_h} heads: row {i} differs from its call alone"
                );
            }
            // Against burn's ops, whose sums run in another order: within f32 rounding of sums of hundreds of
            // terms, relative to the output's size (tens, with these random weights at this rank).
            let diff = worst_difference(mla.o.forward(out), want.clone());
            assert!(
                diff < 1e-5 * size.max(1.0),
                "{b} sequences, {n_h} heads (storage {storage}): output differs by {diff} (largest value {size})"
            );
            for (i, (got, want)) in got_caches.into_iter().zip(&want_caches).enumerate() {
                let diff = worst_difference(got, want.clone());
                assert!(
                    diff < 1e-5,
                    "{b} sequences, {n_h} heads: sequence {i}'s cache differs by {diff}"
                );
            }
        }
    }
}
