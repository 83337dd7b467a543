//! A GGUF file's tensors under the HF names the model loads (`model.layers.3.self_attn.kv_a_proj_with_mqa.weight`),
//! so that one loader serves both formats. llama.cpp's converter (`DeepseekV2Model`) renames every tensor, keeps
//! HF's row order (no rope permutation), stacks each layer's routed experts into one 3-D tensor per projection,
//! and, since it split MLA's up-projection, stores `kv_b_proj` as two tensors: `attn_k_b`, each head's key
//! part transposed (`[n_head, kv_lora_rank, qk_nope_head_dim]`), and `attn_v_b` (`[n_head, v_head_dim,
//! kv_lora_rank]`). Here the stacked experts become one HF tensor per expert (a byte range of the stack), and
//! the split up-projection is put back together when it is read.

use super::{GgmlType, GgufHeader, GgufTensor};
use crate::error::{Error, Result};

/// Where the values of a tensor the model reads by its HF name are.
#[derive(Debug, Clone, PartialEq)]
pub enum HfTensor {
    /// A run of the file's bytes: a whole GGUF tensor, or one expert's matrix of a stacked one.
    Range {
        /// The GGUF tensor it comes from (for errors).
        gguf_name: String,
        /// Its type.
        ggml_type: GgmlType,
        /// Its shape as HF stores it, outermost first.
        shape: Vec<usize>,
        /// Bytes `start..end` of the file.
        start: u64,
        /// End of its bytes.
        end: u64,
    },
    /// `kv_b_proj.weight` (`[n_head * (qk_nope_head_dim + v_head_dim), kv_lora_rank]`), rebuilt from
    /// `attn_k_b` and `attn_v_b` (each a [`Range`](Self::Range)).
    SplitKvB {
        /// `attn_k_b`: `[n_head, kv_lora_rank, qk_nope_head_dim]`.
        k_b: Box<HfTensor>,
        /// `attn_v_b`: `[n_head, v_head_dim, kv_lora_rank]`.
        v_b: Box<HfTensor>,
    },
}

impl HfTensor {
    /// The HF shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            HfTensor::Range { shape, .. } => shape.clone(),
            HfTensor::SplitKvB { k_b, v_b } => kv_b_shape(&k_b.shape(), &v_b.shape()),
        }
    }
}

/// `kv_b_proj`'s shape, `[n_head * (qk_nope_head_dim + v_head_dim), kv_lora_rank]`, from `attn_k_b`'s
/// (`[n_head, kv_lora_rank, qk_nope_head_dim]`) and `attn_v_b`'s (`[n_head, v_head_dim, kv_lora_rank]`).
pub fn kv_b_shape(k_b: &[usize], v_b: &[usize]) -> Vec<usize> {
    vec![k_b[0] * (k_b[2] + v_b[1]), k_b[1]]
}

/// The HF name of each part of a block's GGUF name (`attn_q_a` in `blk.N.attn_q_a.weight`).
pub(super) const BLOCK_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_q_a.weight", "self_attn.q_a_proj.weight"),
    ("attn_q_a_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn_q_b.weight", "self_attn.q_b_proj.weight"),
    ("attn_kv_a_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attn_kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attn_kv_b.weight", "self_attn.kv_b_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("ffn_gate_inp.weight", "mlp.gate.weight"),
    ("exp_probs_b.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn_gate_shexp.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn_up_shexp.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn_down_shexp.weight", "mlp.shared_experts.down_proj.weight"),
];

/// The stacked routed experts: GGUF part, HF projection.
pub(super) const EXPERT_NAMES: &[(&str, &str)] = &[
    ("ffn_gate_exps.weight", "gate_proj"),
    ("ffn_up_exps.weight", "up_proj"),
    ("ffn_down_exps.weight", "down_proj"),
];

fn range(t: &GgufTensor, shape: Vec<usize>, start: u64, end: u64) -> HfTensor {
    HfTensor::Range {
        gguf_name: t.name.clone(),
        ggml_type: t.ggml_type,
        shape,
        start,
        end,
    }
}

/// The tensors of `header` by HF name. Tensors the converter
/// writes that the model does not read keep their GGUF names. `file` names the file in errors.
pub fn hf_tensors(header: &GgufHeader, file: &str) -> Result<Vec<(String, HfTensor)>> {
    let bad = |message: String| Error::Weights {
        file: file.to_string(),
        message,
    };
    let mut out = Vec::with_capacity(header.tensors.len());
    let mut split_kv_b: std::collections::BTreeMap<u64, [Option<HfTensor>; 2]> = Default::default();
    for t in &header.tensors {
        let shape: Vec<usize> = t
            .shape()
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(format!("tensor {} has dimensions {:?}, too large here", t.name, t.dims)))?;
        let start = t.offset;
        let whole = || range(t, shape.clone(), start, start + t.bytes);
        let hf = match t.name.as_str() {
            "token_embd.weight" => Some("model.embed_tokens.weight".to_string()),
            "output_norm.weight" => Some("model.norm.weight".to_string()),
            "output.weight" => Some("lm_head.weight".to_string()),
            _ => None,
        };
        if let Some(hf) = hf {
            out.push((hf, whole()));
            continue;
        }
        let Some((layer, part)) = t
            .name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(n, part)| Some((n.parse::<u64>().ok()?, part)))
        else {
            out.push((t.name.clone(), whole()));
            continue;
        };
        let prefix = format!("model.layers.{layer}.");
        if let Some((_, hf)) = BLOCK_NAMES.iter().find(|(g, _)| *g == part) {
            out.push((format!("{prefix}{hf}"), whole()));
        } else if let Some((_, proj)) = EXPERT_NAMES.iter().find(|(g, _)| *g == part) {
            // `[n_expert, rows, cols]`: each expert's matrix is its own run of the stack's bytes.
            let [experts, rows, cols] = shape[..] else {
                return Err(bad(format!(
                    "tensor {} has dimensions {:?}, not three (cols, rows, experts)",
                    t.name, t.dims
                )));
            };
            let per = t
                .ggml_type
                .bytes_of((rows * cols) as u64)
                .filter(|&per| per * experts as u64 == t.bytes)
                .ok_or_else(|| {
                    bad(format!(
                        "tensor {}: its experts are not whole {} blocks",
                        t.name,
                        t.ggml_type.name()
                    ))
                })?;
            for e in 0..experts {
                let at = start + e as u64 * per;
                out.push((
                    format!("{prefix}mlp.experts.{e}.{proj}.weight"),
                    range(t, vec![rows, cols], at, at + per),
                ));
            }
        } else if let Some(i) = ["attn_k_b.weight", "attn_v_b.weight"].iter().position(|g| *g == part) {
            if shape.len() != 3 {
                return Err(bad(format!(
                    "tensor {} has dimensions {:?}, not three (per head)",
                    t.name, t.dims
                )));
            }
            split_kv_b.entry(layer).or_default()[i] = Some(whole());
        } else {
            out.push((t.name.clone(), whole()));
        }
    }
    for (layer, [k_b, v_b]) in split_kv_b {
        let name = format!("model.layers.{layer}.self_attn.kv_b_proj.weight");
        let (Some(k_b), Some(v_b)) = (k_b, v_b) else {
            return Err(bad(format!(
                "block {layer} has only one of attn_k_b and attn_v_b (the two halves of {name})"
            )));
        };
        let (k, v) = (k_b.shape(), v_b.shape());
        // k_b: [heads, rank, nope]; v_b: [heads, v, rank].
        if k[0] != v[0] || k[1] != v[2] {
            return Err(bad(format!(
                "block {layer}: attn_k_b {k:?} and attn_v_b {v:?} do not agree on heads and kv_lora_rank"
            )));
        }
        out.push((
            name,
            HfTensor::SplitKvB {
                k_b: Box::new(k_b),
                v_b: Box::new(v_b),
            },
        ));
    }
    Ok(out)
}

/// `kv_b_proj`'s rows from `attn_k_b` (`[heads, rank, nope]`) and `attn_v_b` (`[heads, v, rank]`) as f32:
/// for each head, its key rows (`attn_k_b`'s matrix transposed) then its value rows.
pub fn join_kv_b(k_b: &[f32], v_b: &[f32], heads: usize, rank: usize, nope: usize, v: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(heads * (nope + v) * rank);
    for h in 0..heads {
        let k = &k_b[h * rank * nope..(h + 1) * rank * nope];
        for j in 0..nope {
            out.extend((0..rank).map(|r| k[r * nope + j]));
        }
        out.extend_from_slice(&v_b[h * v * rank..(h + 1) * v * rank]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_up_projection_joins_back() {
        // kv_b [heads * (nope + v), rank] with value = row * 100 + col, split as the converter does.
        let (heads, rank, nope, v) = (2, 3, 2, 1);
        let kv_b: Vec<f32> = (0..heads * (nope + v))
            .flat_map(|r| (0..rank).map(move |c| (r * 100 + c) as f32))
            .collect();
        let row = |h: usize, j: usize| &kv_b[(h * (nope + v) + j) * rank..][..rank];
        let mut k_b = Vec::new();
        let mut v_b = Vec::new();
        for h in 0..heads {
            for r in 0..rank {
                k_b.extend((0..nope).map(|j| row(h, j)[r]));
            }
            for j in 0..v {
                v_b.extend_from_slice(row(h, nope + j));
            }
        }
        assert_eq!(join_kv_b(&k_b, &v_b, heads, rank, nope, v), kv_b);
    }
}
