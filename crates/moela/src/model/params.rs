//! The model's tensors as parameters (for training) and back to an HF checkpoint's tensors (for saving).
//!
//! [`Transformer::params_mut`] lists every learned tensor in the engine's own layout, so an optimiser can
//! update them in place; [`Transformer::export`] undoes the load-time rearrangements (transposes, fused
//! gate/up, absorbed `kv_b_proj`, stacked experts, half-split rope rows) and returns tensors under their HF
//! names and shapes, ready for safetensors.

use burn::tensor::{DType, Tensor};

use super::mla::{Mla, QProj};
use super::mlp::Mlp;
use super::moe::Moe;
use super::rope::interleave_rows;
use super::transformer::{Embedding, FeedForward, Transformer};
use crate::error::{Error, Result};
use crate::gpu::packed::transpose;
use crate::gpu::rms_norm::RmsNorm;
use crate::gpu::{Linear, Weights};

/// A mutable reference to one learned tensor, whatever its rank.
#[derive(Debug)]
pub enum ParamMut<'a> {
    /// Norm gains.
    Vector(&'a mut Tensor<1>),
    /// Projections (`[in, out]`) and the embedding table.
    Matrix(&'a mut Tensor<2>),
    /// Absorbed attention factors and stacked experts.
    Stack(&'a mut Tensor<3>),
}

/// Packed weights (f16, q8, q4) are not trainable and are left out.
fn linear<'a>(out: &mut Vec<(String, ParamMut<'a>)>, name: String, l: &'a mut Linear) {
    let n = l.parts.len();
    for (i, p) in l.parts.iter_mut().enumerate() {
        let name = if n == 1 {
            name.clone()
        } else {
            format!("{name}.part{i}")
        };
        if let Weights::Dense(p) = p {
            out.push((name, ParamMut::Matrix(p)));
        }
    }
}

fn norm<'a>(out: &mut Vec<(String, ParamMut<'a>)>, name: String, n: &'a mut RmsNorm) {
    out.push((name, ParamMut::Vector(&mut n.weight)));
}

fn mlp<'a>(out: &mut Vec<(String, ParamMut<'a>)>, p: &str, m: &'a mut Mlp) {
    linear(out, format!("{p}gate_up"), &mut m.gate_up);
    linear(out, format!("{p}down"), &mut m.down);
}

impl Transformer {
    /// Every learned tensor with a descriptive name (norm gains end in `norm`). The router's
    /// `e_score_correction_bias` is not among them: it is adjusted by load, not by gradients.
    pub fn params_mut(&mut self) -> Vec<(String, ParamMut<'_>)> {
        let mut out = Vec::new();
        if let Embedding::Device(t) = &mut self.embed {
            out.push(("embed".to_string(), ParamMut::Matrix(t)));
        }
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("layers.{i}.");
            norm(&mut out, format!("{p}attn_norm"), &mut b.attn_norm);
            norm(&mut out, format!("{p}ffn_norm"), &mut b.ffn_norm);
            let a = &mut b.attn;
            linear(&mut out, format!("{p}q_kv_a"), &mut a.input);
            if let QProj::Lora { norm: n, b: qb, .. } = &mut a.q {
                norm(&mut out, format!("{p}q_a_norm"), n);
                linear(&mut out, format!("{p}q_b"), qb);
            }
            norm(&mut out, format!("{p}kv_a_norm"), &mut a.kv_a_norm);
            // Factors in textures (native inference) are not trainable.
            if let Some(t) = a.w_uk.trainable() {
                out.push((format!("{p}w_uk"), ParamMut::Stack(t)));
            }
            if let Some(t) = a.w_uv_t.trainable() {
                out.push((format!("{p}w_uv_t"), ParamMut::Stack(t)));
            }
            linear(&mut out, format!("{p}o"), &mut a.o);
            match &mut b.ffn {
                FeedForward::Dense(m) => mlp(&mut out, &format!("{p}mlp."), m),
                FeedForward::Moe(m) => {
                    linear(&mut out, format!("{p}router"), &mut m.router);
                    for (c, chunk) in m.chunks.iter_mut().enumerate() {
                        if let Weights::Dense(t) = &mut chunk.gate_up_t {
                            out.push((format!("{p}experts{c}.gate_up"), ParamMut::Stack(t)));
                        }
                        if let Weights::Dense(t) = &mut chunk.down_t {
                            out.push((format!("{p}experts{c}.down"), ParamMut::Stack(t)));
                        }
                    }
                }
            }
        }
        norm(&mut out, "final_norm".into(), &mut self.norm);
        linear(&mut out, "head".into(), &mut self.head);
        out
    }

    /// The model as HF-named tensors: `(name, shape, row-major f32 values)`, the names and shapes a
    /// checkpoint of this config has (see [`tensor_shapes`](super::transformer::tensor_shapes)).
    pub async fn export(&self) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
        let c = &self.config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let mut out = Vec::new();
        let embed = match &self.embed {
            Embedding::Host(rows) => rows.to_f32(),
            Embedding::Device(t) => read((**t).clone()).await?,
        };
        out.push(("model.embed_tokens.weight".to_string(), vec![v, h], embed));
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}.");
            out.push((
                format!("{p}input_layernorm.weight"),
                vec![h],
                read(b.attn_norm.weight.clone()).await?,
            ));
            out.push((
                format!("{p}post_attention_layernorm.weight"),
                vec![h],
                read(b.ffn_norm.weight.clone()).await?,
            ));
            export_mla(c, &b.attn, &p, &mut out).await?;
            match &b.ffn {
                FeedForward::Dense(m) => export_mlp(m, &format!("{p}mlp."), &mut out).await?,
                FeedForward::Moe(m) => export_moe(m, &p, &mut out).await?,
            }
        }
        out.push((
            "model.norm.weight".into(),
            vec![h],
            read(self.norm.weight.clone()).await?,
        ));
        if !c.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![v, h], rows_of(&self.head).await?));
        }
        Ok(out)
    }
}

/// A tensor's values as f32 on the host.
async fn read<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    let t = if t.dtype() == DType::F32 { t } else { t.cast(DType::F32) };
    let data = t
        .into_data_async()
        .await
        .map_err(|e| Error::Device(format!("reading weights back: {e:?}")))?;
    data.try_to_vec::<f32>()
        .map_err(|e| Error::Device(format!("weights have an unexpected dtype: {e:?}")))
}

/// A projection back in HF's `[out, in]` row-major layout.
async fn rows_of(l: &Linear) -> Result<Vec<f32>> {
    let parts: Vec<Tensor<2>> = l.parts.iter().map(|p| p.to_f32(l.kernels)).collect();
    let w = Tensor::cat(parts, 1);
    let [inp, outp] = w.dims();
    Ok(transpose(&read(w).await?, inp, outp))
}

async fn export_mla(
    c: &crate::config::ModelConfig,
    m: &Mla,
    p: &str,
    out: &mut Vec<(String, Vec<usize>, Vec<f32>)>,
) -> Result<()> {
    let (h, n_h, d_n, d_r, d_v, r_kv) = (
        c.hidden_size,
        m.num_attention_heads,
        m.qk_nope_head_dim,
        m.qk_rope_head_dim,
        m.v_head_dim,
        m.kv_lora_rank,
    );
    let d_qk = d_n + d_r;
    let q_rows = |mut w: Vec<f32>, cols: usize| {
        if c.rope_interleave {
            interleave_rows(&mut w, cols, d_n, d_qk, n_h, d_r);
        }
        w
    };
    let a = format!("{p}self_attn.");
    // `input` holds q_proj (or q_a_proj) rows, then kv_a_proj_with_mqa rows.
    let mut input = rows_of(&m.input).await?;
    let qw = m.q_width();
    let mut kv_a = input.split_off(qw * h);
    match &m.q {
        QProj::Plain => out.push((format!("{a}q_proj.weight"), vec![n_h * d_qk, h], q_rows(input, h))),
        QProj::Lora {
            q_lora_rank: r_q,
            norm,
            b,
        } => {
            out.push((format!("{a}q_a_proj.weight"), vec![*r_q, h], input));
            out.push((
                format!("{a}q_a_layernorm.weight"),
                vec![*r_q],
                read(norm.weight.clone()).await?,
            ));
            out.push((
                format!("{a}q_b_proj.weight"),
                vec![n_h * d_qk, *r_q],
                q_rows(rows_of(b).await?, *r_q),
            ));
        }
    }
    if c.rope_interleave {
        interleave_rows(&mut kv_a, h, r_kv, 0, 1, d_r);
    }
    out.push((format!("{a}kv_a_proj_with_mqa.weight"), vec![r_kv + d_r, h], kv_a));
    out.push((
        format!("{a}kv_a_layernorm.weight"),
        vec![r_kv],
        read(m.kv_a_norm.weight.clone()).await?,
    ));
    let w_uk = read(m.w_uk.tensor()).await?;
    let w_uv_t = read(m.w_uv_t.tensor()).await?;
    let mut kv_b = Vec::with_capacity(n_h * (d_n + d_v) * r_kv);
    for head in 0..n_h {
        kv_b.extend_from_slice(&w_uk[head * d_n * r_kv..(head + 1) * d_n * r_kv]);
        kv_b.extend(transpose(
            &w_uv_t[head * r_kv * d_v..(head + 1) * r_kv * d_v],
            r_kv,
            d_v,
        ));
    }
    out.push((format!("{a}kv_b_proj.weight"), vec![n_h * (d_n + d_v), r_kv], kv_b));
    out.push((format!("{a}o_proj.weight"), vec![h, n_h * d_v], rows_of(&m.o).await?));
    Ok(())
}

async fn export_mlp(m: &Mlp, p: &str, out: &mut Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<()> {
    let gu = rows_of(&m.gate_up).await?;
    let i = m.width;
    let h = gu.len() / (2 * i);
    out.push((format!("{p}gate_proj.weight"), vec![i, h], gu[..i * h].to_vec()));
    out.push((format!("{p}up_proj.weight"), vec![i, h], gu[i * h..].to_vec()));
    out.push((format!("{p}down_proj.weight"), vec![h, i], rows_of(&m.down).await?));
    Ok(())
}

async fn export_moe(m: &Moe, p: &str, out: &mut Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<()> {
    let (e, i) = (m.experts, m.width);
    let router = rows_of(&m.router).await?;
    let h = router.len() / e;
    out.push((format!("{p}mlp.gate.weight"), vec![e, h], router));
    if let Some(b) = &m.correction_bias {
        out.push((
            format!("{p}mlp.gate.e_score_correction_bias"),
            vec![e],
            read(b.clone()).await?,
        ));
    }
    // The shared experts, stacked after the routed ones, go back into one MLP of width S x I.
    let s = m.shared;
    let (mut gate, mut up, mut down_cols) = (Vec::new(), Vec::new(), Vec::with_capacity(s));
    for chunk in &m.chunks {
        for k in 0..chunk.count {
            let x = chunk.first + k;
            let gu = read(chunk.gate_up_t.to_f32_range(k, 1, m.kernels)).await?; // [H, 2I]
            let down = read(chunk.down_t.to_f32_range(k, 1, m.kernels)).await?; // [I, H]
            let rows = transpose(&gu, h, 2 * i); // [2I, H]
            let down = transpose(&down, i, h); // [H, I]
            if x >= e {
                gate.extend_from_slice(&rows[..i * h]);
                up.extend_from_slice(&rows[i * h..]);
                down_cols.push(down);
                continue;
            }
            let ep = format!("{p}mlp.experts.{x}.");
            out.push((format!("{ep}gate_proj.weight"), vec![i, h], rows[..i * h].to_vec()));
            out.push((format!("{ep}up_proj.weight"), vec![i, h], rows[i * h..].to_vec()));
            out.push((format!("{ep}down_proj.weight"), vec![h, i], down));
        }
    }
    if s > 0 {
        let sp = format!("{p}mlp.shared_experts.");
        let down: Vec<f32> = (0..h)
            .flat_map(|row| {
                down_cols
                    .iter()
                    .flat_map(move |d| d[row * i..(row + 1) * i].iter().copied())
            })
            .collect();
        out.push((format!("{sp}gate_proj.weight"), vec![s * i, h], gate));
        out.push((format!("{sp}up_proj.weight"), vec![s * i, h], up));
        out.push((format!("{sp}down_proj.weight"), vec![h, s * i], down));
    }
    Ok(())
}
