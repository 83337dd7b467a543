//! GGUF files as llama.cpp writes them: the header (metadata and tensor table) read and checked before any
//! tensor is.
//!
//! Layout (little-endian; versions 2 and 3): `GGUF`, the version (u32), the tensor count and the metadata
//! count (u64 each); the metadata, each a key (a string: u64 length, UTF-8 bytes), a value type (u32) and
//! the value (arrays: element type u32, count u64, elements); the tensor table, each a name, the number of
//! dimensions (u32), the dimensions (u64 each, the innermost first, as ggml's `ne`), the ggml type (u32)
//! and the offset of its data (u64) from the start of the data section; then padding to
//! `general.alignment` (32 by default) and the data, each tensor at an aligned offset.
//!
//! Every count and length is checked against the bytes that remain before it is used, so a damaged file
//! gives an error naming what is wrong, never an allocation of its claimed size.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
pub use crate::gpu::ggml::GgmlType;

pub mod names;
pub mod vocab;
#[cfg(not(target_arch = "wasm32"))]
pub mod write;

/// `GGUF` as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// Data-section alignment when the file does not say.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor has.
const MAX_DIMS: u32 = 4;
/// Nesting of arrays inside arrays that is accepted.
const MAX_DEPTH: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8.
    String(String),
    /// Type 9.
    Array(Vec<Value>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, when it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            // The shortest decimal that is this f32, as f64: the value the file was written from (an
            // `rms_norm_eps` of 1e-6 reads as 1e-6, not 9.99999997e-7).
            Value::F32(v) => v.to_string().parse().ok(),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string, when it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, when it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A short description for listings: scalars as they are, strings up to 60 characters, arrays by
    /// their length.
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() > 60 => {
                format!("{:?}... ({} bytes)", s.chars().take(60).collect::<String>(), s.len())
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => format!("[{} values]", a.len()),
            Value::Bool(b) => b.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            Value::I8(v) => v.to_string(),
            Value::I16(v) => v.to_string(),
            Value::I32(v) => v.to_string(),
            Value::I64(v) => v.to_string(),
            Value::U8(v) => v.to_string(),
            Value::U16(v) => v.to_string(),
            Value::U32(v) => v.to_string(),
            Value::U64(v) => v.to_string(),
        }
    }
}

/// One tensor of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    /// Its name (`blk.0.attn_q_a.weight`).
    pub name: String,
    /// Dimensions as ggml stores them, the innermost (contiguous) first: a PyTorch `[out, in]` weight is
    /// `[in, out]` here.
    pub dims: Vec<u64>,
    /// Its type.
    pub ggml_type: GgmlType,
    /// Where its data starts in the file.
    pub offset: u64,
    /// Bytes of data.
    pub bytes: u64,
}

impl GgufTensor {
    /// Values in the tensor.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape outermost first, as PyTorch and safetensors write it.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A GGUF file's header.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    /// 2 or 3.
    pub version: u32,
    /// The metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// The tensors, in file order.
    pub tensors: Vec<GgufTensor>,
    /// Where the data section starts.
    pub data_start: u64,
}

/// What [`GgufHeader::parse`] found in the bytes it was given.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // made once per file
pub enum Parsed {
    /// The whole header.
    Header(GgufHeader),
    /// The header goes on past the bytes given: at least this many bytes of the file are needed.
    NeedBytes(u64),
}

/// The header ran past the bytes given (not an error yet: the caller may have more).
struct Short(u64);

/// A failure while reading: the bytes ended, or the file is wrong.
enum Stop {
    Short(Short),
    Bad(String),
}

impl From<Short> for Stop {
    fn from(s: Short) -> Self {
        Stop::Short(s)
    }
}

/// Reads little-endian fields from a prefix of the file.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    /// The whole file's length: what a count or length is checked against.
    file_len: u64,
}

impl Cursor<'_> {
    fn take(&mut self, n: u64) -> std::result::Result<&[u8], Stop> {
        let end = (self.at as u64)
            .checked_add(n)
            .ok_or_else(|| Stop::Bad("a length overflows".into()))?;
        if end > self.file_len {
            return Err(Stop::Bad(format!(
                "a field of {n} bytes at offset {} runs past the end of the file ({} bytes)",
                self.at, self.file_len
            )));
        }
        if end > self.bytes.len() as u64 {
            return Err(Short(end).into());
        }
        let s = &self.bytes[self.at..end as usize];
        self.at = end as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], Stop> {
        Ok(self.take(N as u64)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> std::result::Result<u32, Stop> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> std::result::Result<u64, Stop> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Bytes left in the file after the cursor.
    fn left(&self) -> u64 {
        self.file_len.saturating_sub(self.at as u64)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> std::result::Result<String, Stop> {
        let len = self.u64()?;
        if len > self.left() {
            return Err(Stop::Bad(format!(
                "{} claims a string of {len} bytes, more than the {} left in the file",
                what(),
                self.left()
            )));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Stop::Bad(format!("{} is not valid UTF-8", what())))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> std::result::Result<Value, Stop> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(Stop::Bad(format!("metadata {key:?}: a bool holds {b}"))),
            },
            8 => Value::String(self.string(&|| format!("metadata {key:?}"))?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(Stop::Bad(format!(
                        "metadata {key:?}: arrays nested past {MAX_DEPTH} levels"
                    )));
                }
                let inner = self.u32()?;
                let count = self.u64()?;
                // Every element takes at least a byte (a string at least its 8-byte length): a count the
                // rest of the file cannot hold is refused before anything is allocated for it.
                let least = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(Stop::Bad(format!(
                            "metadata {key:?}: unknown array element type {other}"
                        )));
                    }
                };
                if count.saturating_mul(least) > self.left() {
                    return Err(Stop::Bad(format!(
                        "metadata {key:?} claims {count} values, more than the {} bytes left in the file hold",
                        self.left()
                    )));
                }
                let mut values = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    values.push(self.value(inner, key, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(Stop::Bad(format!("metadata {key:?}: unknown value type {other}"))),
        })
    }
}

impl GgufHeader {
    /// Parses the header from `bytes`, the first bytes of a file of `file_len` bytes named `file` (for
    /// errors). Returns how many bytes are needed when `bytes` ends inside the header.
    pub fn parse(bytes: &[u8], file_len: u64, file: &str) -> Result<Parsed> {
        let bad = |message: String| Error::Weights {
            file: file.to_string(),
            message,
        };
        let mut c = Cursor { bytes, at: 0, file_len };
        match Self::read(&mut c) {
            Ok(h) => Ok(Parsed::Header(h)),
            Err(Stop::Short(Short(needed))) => Ok(Parsed::NeedBytes(needed)),
            Err(Stop::Bad(message)) => Err(bad(message)),
        }
    }

    fn read(c: &mut Cursor) -> std::result::Result<GgufHeader, Stop> {
        if c.file_len < 24 {
            return Err(Stop::Bad(format!("{} bytes: too short for a GGUF header", c.file_len)));
        }
        let magic = c.u32()?;
        if magic != MAGIC {
            return Err(Stop::Bad("not a GGUF file (it does not start with \"GGUF\")".into()));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Stop::Bad(format!(
                "GGUF version {version}: moela reads versions 2 and 3 (convert the file again with a current llama.cpp)"
            )));
        }
        let tensor_count = c.u64()?;
        let kv_count = c.u64()?;
        // A tensor's entry takes at least 8 + 4 + 8 + 4 + 8 bytes, a metadata entry 8 + 4 + 1.
        if tensor_count.saturating_mul(32) > c.left() || kv_count.saturating_mul(13) > c.left() {
            return Err(Stop::Bad(format!(
                "the header claims {tensor_count} tensors and {kv_count} metadata values, more than the file's {} \
                 bytes hold",
                c.file_len
            )));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = c.string(&|| format!("metadata key {i}"))?;
            let ty = c.u32()?;
            let value = c.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(Stop::Bad(format!("metadata {key:?} appears twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(Stop::Bad(format!(
                        "general.alignment is {}, not a power of two",
                        v.summary()
                    )));
                }
            },
        };
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut names = std::collections::HashSet::new();
        for i in 0..tensor_count {
            let name = c.string(&|| format!("tensor {i}'s name"))?;
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Stop::Bad(format!(
                    "tensor {name:?} has {n_dims} dimensions (1 to {MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64()?);
            }
            let ggml_type = GgmlType(c.u32()?);
            let offset = c.u64()?;
            let Some((block, block_bytes)) = ggml_type.block() else {
                return Err(Stop::Bad(format!(
                    "tensor {name:?} has ggml type {}, which moela does not know",
                    ggml_type.0
                )));
            };
            let elements = dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| Stop::Bad(format!("tensor {name:?} has dimensions {dims:?}")))?;
            if !dims[0].is_multiple_of(block) {
                return Err(Stop::Bad(format!(
                    "tensor {name:?}: its rows of {} values are not whole {} blocks of {block}",
                    dims[0],
                    ggml_type.name()
                )));
            }
            if !offset.is_multiple_of(alignment) {
                return Err(Stop::Bad(format!(
                    "tensor {name:?}'s data offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            if !names.insert(name.clone()) {
                return Err(Stop::Bad(format!("tensor {name:?} appears twice")));
            }
            tensors.push(GgufTensor {
                name,
                dims,
                ggml_type,
                offset,
                bytes: elements / block * block_bytes,
            });
        }
        let data_start = (c.at as u64).div_ceil(alignment) * alignment;
        for t in &mut tensors {
            t.offset += data_start;
            if t.offset.checked_add(t.bytes).is_none_or(|end| end > c.file_len) {
                return Err(Stop::Bad(format!(
                    "tensor {:?} ({} bytes at offset {}) runs past the end of the file ({} bytes): truncated?",
                    t.name, t.bytes, t.offset, c.file_len
                )));
            }
        }
        // Tensors must not share bytes: sorted by offset, each ends before the next begins.
        let mut by_offset: Vec<&GgufTensor> = tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        for pair in by_offset.windows(2) {
            if pair[0].offset + pair[0].bytes > pair[1].offset {
                return Err(Stop::Bad(format!(
                    "tensors {:?} and {:?} overlap",
                    pair[0].name, pair[1].name
                )));
            }
        }
        Ok(GgufHeader {
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// `general.architecture` (`deepseek2`), when present.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// The model's config as HF's `config.json` states it, from the `deepseek2.*` metadata llama.cpp's
    /// converter writes and the tensor table (a separate `output.weight` means an untied head; V3's router
    /// bias `exp_probs_b` means V3's routing), checked as any config.json is. `file` names the file in errors.
    pub fn model_config(&self, file: &str) -> Result<crate::config::ModelConfig> {
        let json = self.config_json(file)?;
        crate::config::ModelConfig::from_json_bytes(json.to_string().as_bytes(), &format!("{file} (its metadata)"))
    }

    /// [`model_config`](Self::model_config) before it is checked: the `config.json` the metadata describes.
    pub fn config_json(&self, file: &str) -> Result<serde_json::Value> {
        let bad = |message: String| Error::Weights {
            file: file.to_string(),
            message,
        };
        let arch = self.architecture().unwrap_or("(none)");
        if arch != "deepseek2" {
            return Err(bad(format!(
                "general.architecture is {arch:?}: moela runs DeepSeek-V2/V3 models (architecture \"deepseek2\")"
            )));
        }
        let key = |k: &str| format!("deepseek2.{k}");
        let int = |k: &str| self.get(&key(k)).and_then(Value::as_u64);
        let float = |k: &str| self.get(&key(k)).and_then(Value::as_f64);
        let need = |k: &str| int(k).ok_or_else(|| bad(format!("metadata {} is missing or not an integer", key(k))));
        let rope = need("rope.dimension_count")?;
        // Files written since llama.cpp split kv_b state the per-head sizes in the `_mla` keys (key_length is
        // then the latent's width); older ones in key_length / value_length.
        let (qk, v) = match (int("attention.key_length_mla"), int("attention.value_length_mla")) {
            (Some(k), Some(v)) if k > 0 && v > 0 => (k, v),
            _ => (need("attention.key_length")?, need("attention.value_length")?),
        };
        let nope = qk.checked_sub(rope).ok_or_else(|| {
            bad(format!(
                "the key length {qk} is shorter than the rope dimensions {rope}"
            ))
        })?;
        let has = |suffix: &str| self.tensors.iter().any(|t| t.name.ends_with(suffix));
        let v3 = has("exp_probs_b.bias");
        let groups = int("expert_group_count").unwrap_or(1).max(1);
        let sigmoid = int("expert_gating_func") == Some(2);
        let vocab = match int("vocab_size") {
            Some(v) => v,
            None => self
                .tensors
                .iter()
                .find(|t| t.name == "token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .ok_or_else(|| bad("neither deepseek2.vocab_size nor token_embd.weight is present".into()))?,
        };
        let mut c = serde_json::json!({
            "model_type": if v3 { "deepseek_v3" } else { "deepseek_v2" },
            "hidden_size": need("embedding_length")?,
            "num_hidden_layers": need("block_count")?,
            "max_position_embeddings": need("context_length")?,
            "intermediate_size": need("feed_forward_length")?,
            "num_attention_heads": need("attention.head_count")?,
            "num_key_value_heads": need("attention.head_count")?,
            // Absent or 0 (llama.cpp's default for it): the query is one projection, no LoRA.
            "q_lora_rank": int("attention.q_lora_rank").filter(|&r| r > 0),
            "kv_lora_rank": need("attention.kv_lora_rank")?,
            "qk_rope_head_dim": rope,
            "qk_nope_head_dim": nope,
            "v_head_dim": v,
            "rms_norm_eps": float("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            "first_k_dense_replace": int("leading_dense_block_count").unwrap_or(0),
            "moe_layer_freq": 1,
            "vocab_size": vocab,
            "moe_intermediate_size": int("expert_feed_forward_length"),
            "n_routed_experts": int("expert_count"),
            "n_shared_experts": int("expert_shared_count").unwrap_or(0),
            "num_experts_per_tok": int("expert_used_count"),
            "routed_scaling_factor": float("expert_weights_scale").unwrap_or(1.0),
            "norm_topk_prob": self.get(&key("expert_weights_norm")).and_then(Value::as_bool).unwrap_or(false),
            "scoring_func": if sigmoid { "sigmoid" } else { "softmax" },
            "topk_method": if v3 { "noaux_tc" } else if groups > 1 { "group_limited_greedy" } else { "greedy" },
            "n_group": groups,
            "topk_group": int("expert_group_used_count").unwrap_or(1).max(1),
            "rope_theta": float("rope.freq_base").unwrap_or(10000.0),
            "tie_word_embeddings": !has("output.weight"),
            "hidden_act": "silu",
            "attention_bias": false,
        });
        for (k, hf) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ] {
            if let Some(id) = self.get(k).and_then(Value::as_u64) {
                c[hf] = id.into();
            }
        }
        if self.get(&key("rope.scaling.type")).and_then(Value::as_str) == Some("yarn") {
            // The converter stores 0.1 x mscale_all_dim; llama.cpp takes mscale equal to it for deepseek2, as
            // the published configs have it.
            let all_dim = float("rope.scaling.yarn_log_multiplier").map_or(1.0, |m| m / 0.1);
            c["rope_scaling"] = serde_json::json!({
                "type": "yarn",
                "factor": float("rope.scaling.factor").unwrap_or(1.0),
                "original_max_position_embeddings": int("rope.scaling.original_context_length")
                    .ok_or_else(|| bad(format!("metadata {} is missing", key("rope.scaling.original_context_length"))))?,
                "beta_fast": float("rope.scaling.yarn_beta_fast").unwrap_or(32.0),
                "beta_slow": float("rope.scaling.yarn_beta_slow").unwrap_or(1.0),
                "mscale": all_dim,
                "mscale_all_dim": all_dim,
            });
        }
        Ok(c)
    }

    /// Tensors and bytes per ggml type, the most bytes first: the file's quantisation mix.
    pub fn type_mix(&self) -> Vec<(GgmlType, usize, u64)> {
        let mut mix: BTreeMap<GgmlType, (usize, u64)> = BTreeMap::new();
        for t in &self.tensors {
            let e = mix.entry(t.ggml_type).or_default();
            e.0 += 1;
            e.1 += t.bytes;
        }
        let mut mix: Vec<_> = mix.into_iter().map(|(t, (n, b))| (t, n, b)).collect();
        mix.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        mix
    }

    /// The format moela stores this file's weights in by default: the one nearest its main type (the type
    /// holding the most bytes; [`GgmlType::nearest_format`]).
    pub fn nearest_format(&self) -> crate::gpu::WeightDtype {
        self.type_mix()
            .first()
            .map_or(crate::gpu::WeightDtype::F32, |&(t, ..)| t.nearest_format())
    }

    /// Bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }
}

/// Whether `file` starts with GGUF's magic.
pub(super) async fn starts_gguf(file: &super::WeightFile) -> Result<bool> {
    if file.len() < 4 {
        return Ok(false);
    }
    let magic = super::read_range(file, 0, 4).await?;
    Ok(magic.as_ref() == MAGIC.to_le_bytes())
}

/// The first bytes of a GGUF file read for its header; more are read when the header is longer (a real
/// tokenizer's vocabulary and merges take a few MB).
const FIRST_READ: u64 = 4 << 20;

/// Reads `file`'s GGUF header, from as many of its first bytes as the header takes.
pub async fn read_file_header(file: &super::WeightFile) -> Result<GgufHeader> {
    let len = file.len();
    let mut want = FIRST_READ.min(len);
    loop {
        let bytes = super::read_range(file, 0, want).await?;
        match GgufHeader::parse(&bytes, len, &file.name)? {
            Parsed::Header(h) => return Ok(h),
            Parsed::NeedBytes(n) if n > want && n <= len => want = n.max(want.saturating_mul(2)).min(len),
            Parsed::NeedBytes(_) => {
                return Err(Error::Weights {
                    file: file.name.clone(),
                    message: "the header ends past the end of the file (truncated)".into(),
                });
            }
        }
    }
}

/// A GGUF model's files as a checkpoint: its config and tokenizer from the first file's metadata (what
/// `config.json`, `tokenizer.json` and `tokenizer_config.json` hold in an HF folder), its weights from every
/// file (one, or the parts of a split file in order); and the first file's header.
pub async fn checkpoint(weights: Vec<super::WeightFile>) -> Result<(super::CheckpointFiles, GgufHeader)> {
    let first = weights.first().ok_or_else(|| Error::Weights {
        file: "*.gguf".into(),
        message: "no GGUF file given".into(),
    })?;
    let header = read_file_header(first).await?;
    if let Some(count) = header.get("split.count").and_then(Value::as_u64)
        && count != weights.len() as u64
    {
        return Err(Error::Weights {
            file: first.name.clone(),
            message: format!(
                "it is part of a model split in {count} files (split.count), but {} were given",
                weights.len()
            ),
        });
    }
    let config = header.config_json(&first.name)?;
    let (tokenizer, tokenizer_config) = match vocab::tokenizer_files(&header, &first.name)? {
        Some((t, c)) => (Some(t), Some(c)),
        None => (None, None),
    };
    let files = super::CheckpointFiles {
        config: config.to_string().into_bytes(),
        tokenizer,
        tokenizer_config,
        weights,
    };
    Ok((files, header))
}

/// The files of the GGUF model at `path`: the file itself, or, for one part of a split model
/// (`NAME-00002-of-00003.gguf`), every part in order, each mapped.
#[cfg(not(target_arch = "wasm32"))]
pub fn open_path(path: &std::path::Path) -> Result<super::CheckpointFiles> {
    let parts = split_parts(path)?;
    let weights = parts
        .iter()
        .map(|p| super::WeightFile::map(p))
        .collect::<Result<Vec<_>>>()?;
    pollster::block_on(checkpoint(weights)).map(|(files, _)| files)
}

/// `path`, or every part of the split model it belongs to (llama.cpp's `-NNNNN-of-NNNNN.gguf` names), each
/// checked to exist.
#[cfg(not(target_arch = "wasm32"))]
fn split_parts(path: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let split = name.strip_suffix(".gguf").and_then(|stem| {
        let (rest, count) = stem.rsplit_once("-of-")?;
        let (prefix, _) = rest.rsplit_once('-')?;
        let n: usize = count.parse().ok().filter(|&n| n > 0 && n < 100_000)?;
        Some((prefix.to_string(), n, count.len()))
    });
    let Some((prefix, count, width)) = split else {
        return Ok(vec![path.to_path_buf()]);
    };
    let parts: Vec<_> = (1..=count)
        .map(|i| path.with_file_name(format!("{prefix}-{i:0width$}-of-{count:0width$}.gguf")))
        .collect();
    if let Some(missing) = parts.iter().find(|p| !p.exists()) {
        return Err(Error::Io {
            path: missing.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("part of the {count}-file split model {name} is missing"),
            ),
        });
    }
    Ok(parts)
}

/// Whether the file at `path` starts with GGUF's magic.
#[cfg(not(target_arch = "wasm32"))]
pub fn is_gguf(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| u32::from_le_bytes(magic) == MAGIC)
}

/// Reads the header of the GGUF file at `path` (mapped: only the pages the header spans are read).
#[cfg(not(target_arch = "wasm32"))]
pub fn read_header(path: &std::path::Path) -> Result<GgufHeader> {
    let name = path.display().to_string();
    let io = |e: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is only read; a file changed underneath gives wrong bytes (checked like any
    // others), and one cut short is checked against its length first.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    match GgufHeader::parse(&map, map.len() as u64, &name)? {
        Parsed::Header(h) => Ok(h),
        Parsed::NeedBytes(_) => Err(Error::Weights {
            file: name,
            message: "the header ends past the end of the file".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block type decoded as the `gguf` package's own dequantisation decodes it (exactly: the same
    /// f32 operations in the same order), read whole and from odd offsets.
    #[test]
    fn blocks_decode_as_llama_cpp_s_layout_says() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/gguf/");
        let bytes = std::fs::read(format!("{dir}quants.gguf")).expect("tests/fixtures/gguf/quants.gguf");
        let Parsed::Header(h) = GgufHeader::parse(&bytes, bytes.len() as u64, "quants.gguf").unwrap() else {
            panic!("a whole file")
        };
        let data = |t: &GgufTensor| &bytes[t.offset as usize..][..t.bytes as usize];
        let mut types = 0;
        for q in h.tensors.iter().filter(|t| t.name.starts_with("q.")) {
            let r = h
                .tensors
                .iter()
                .find(|t| t.name == format!("ref.{}", &q.name[2..]))
                .unwrap();
            let expected: Vec<f32> = data(r)
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let rows = crate::gpu::Rows::Ggml(q.ggml_type, data(q));
            assert_eq!(rows.len(), expected.len(), "{}", q.name);
            let mut all = vec![0f32; expected.len()];
            assert!(rows.read(0, &mut all), "{}", q.name);
            assert_eq!(all, expected, "{}", q.name);
            for (at, n) in [(5, 40), (31, 2), (240, 13), (64, 64)] {
                let mut part = vec![0f32; n];
                assert!(rows.read(at, &mut part));
                assert_eq!(part, expected[at..at + n], "{} at {at}", q.name);
            }
            types += 1;
        }
        assert_eq!(types, 8);
    }

    fn fixture() -> (Vec<u8>, serde_json::Value) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/gguf/");
        let bytes = std::fs::read(format!("{dir}tiny.gguf")).expect("tests/fixtures/gguf/tiny.gguf");
        let json = std::fs::read(format!("{dir}tiny.json")).expect("tests/fixtures/gguf/tiny.json");
        (bytes, serde_json::from_slice(&json).expect("JSON"))
    }

    fn parse(bytes: &[u8]) -> Result<Parsed> {
        GgufHeader::parse(bytes, bytes.len() as u64, "tiny.gguf")
    }

    fn header(bytes: &[u8]) -> GgufHeader {
        match parse(bytes).expect("a valid header") {
            Parsed::Header(h) => h,
            Parsed::NeedBytes(n) => panic!("asked for {n} bytes of a whole file"),
        }
    }

    /// The metadata and tensor table read as llama.cpp's own Python reader (GGUFReader) reads them.
    #[test]
    fn reads_what_llama_cpps_reader_reads() {
        let (bytes, want) = fixture();
        let h = header(&bytes);
        assert_eq!(h.version, 3);
        assert_eq!(h.architecture(), Some("deepseek2"));
        let meta = want["metadata"].as_object().unwrap();
        assert_eq!(h.metadata.len(), meta.len(), "metadata count");
        for (key, w) in meta {
            let got = h.get(key).unwrap_or_else(|| panic!("{key} missing"));
            let value = &w["value"];
            let same = match got {
                Value::String(s) => value.as_str() == Some(s),
                Value::Bool(b) => value.as_bool() == Some(*b),
                Value::F32(_) | Value::F64(_) => (got.as_f64().unwrap() - value.as_f64().unwrap()).abs() < 1e-6,
                Value::Array(items) => {
                    let list = value.as_array().unwrap();
                    items.len() == list.len()
                        && items.iter().zip(list).all(|(a, b)| match a {
                            Value::String(s) => b.as_str() == Some(s),
                            other => other.as_u64() == b.as_u64(),
                        })
                }
                Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => {
                    got.as_f64().map(|v| v as i64) == value.as_i64()
                }
                other => other.as_u64() == value.as_u64(),
            };
            assert!(same, "{key}: {got:?} against {value}");
        }
        let tensors = want["tensors"].as_array().unwrap();
        assert_eq!(h.tensors.len(), tensors.len());
        for (t, w) in h.tensors.iter().zip(tensors) {
            assert_eq!(t.name, w["name"].as_str().unwrap());
            let dims: Vec<u64> = w["dims"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            assert_eq!(t.dims, dims, "{}", t.name);
            assert_eq!(u64::from(t.ggml_type.0), w["type"].as_u64().unwrap(), "{}", t.name);
            assert_eq!(t.offset, w["offset"].as_u64().unwrap(), "{} offset", t.name);
            assert_eq!(t.bytes, w["bytes"].as_u64().unwrap(), "{} bytes", t.name);
        }
        // Every storage type's block as the package knows it.
        for (id, size) in want["type_sizes"].as_object().unwrap() {
            let id: u32 = id.parse().unwrap();
            let size: Vec<u64> = size.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(GgmlType(id).block(), Some((size[0], size[1])), "ggml type {id}");
        }
        let mix = h.type_mix();
        assert_eq!(mix[0].0, GgmlType::F32, "F32 holds the most bytes");
        assert_eq!(mix.iter().map(|m| m.2).sum::<u64>(), h.data_bytes());
    }

    /// The config the converter's metadata describes is the HF fixture's own (floats within f32 rounding).
    #[test]
    fn metadata_gives_the_checkpoints_config() {
        fn same(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
            match (a, b) {
                (serde_json::Value::Number(x), serde_json::Value::Number(y)) => {
                    let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                    assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{at}: {x} against {y}");
                }
                (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{at}");
                    for (k, v) in x {
                        same(v, &y[k], &format!("{at}.{k}"));
                    }
                }
                _ => assert_eq!(a, b, "{at}"),
            }
        }
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/");
        for name in ["v2-lite-tiny", "v3-tiny", "v2-group-odd"] {
            let bytes = std::fs::read(format!("{root}gguf/{name}.gguf")).unwrap();
            let from_gguf = header(&bytes).model_config(name).unwrap();
            let mut json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(format!("{root}{name}/config.json")).unwrap()).unwrap();
            // GGUF keeps YaRN's mscale_all_dim only, and llama.cpp takes mscale equal to it (as every published
            // DeepSeek config has them): v2-group-odd's 1.0 against 0.8 cannot travel.
            let all_dim = json["rope_scaling"]["mscale_all_dim"].clone();
            json["rope_scaling"]["mscale"] = all_dim;
            let json = json.to_string();
            let from_hf = crate::config::ModelConfig::from_json_bytes(json.as_bytes(), "config.json").unwrap();
            same(
                &serde_json::to_value(&from_gguf).unwrap(),
                &serde_json::to_value(&from_hf).unwrap(),
                name,
            );
        }
        // A q_lora_rank of 0 (llama.cpp's value when there is none) is a query without LoRA.
        let plain = std::fs::read(format!("{root}gguf/v2-lite-tiny.gguf")).unwrap();
        let mut h = header(&plain);
        h.metadata
            .insert("deepseek2.attention.q_lora_rank".into(), Value::U32(0));
        assert_eq!(h.model_config("v2-lite-tiny.gguf").unwrap().q_lora_rank, None);
        let (tiny, _) = fixture();
        let mut h = header(&tiny);
        h.metadata
            .insert("general.architecture".into(), Value::String("llama".into()));
        let e = h.model_config("tiny.gguf").unwrap_err().to_string();
        assert!(e.contains("\"llama\"") && e.contains("deepseek2"), "{e}");
    }

    /// A prefix that ends inside the header asks for more; with that many bytes it parses.
    #[test]
    fn a_short_prefix_asks_for_more() {
        let (bytes, _) = fixture();
        let whole = header(&bytes);
        let mut have = 24;
        loop {
            match GgufHeader::parse(&bytes[..have], bytes.len() as u64, "tiny.gguf").unwrap() {
                Parsed::NeedBytes(n) => {
                    assert!(n as usize > have && n as usize <= bytes.len());
                    have = n as usize;
                }
                Parsed::Header(h) => {
                    assert_eq!(h.tensors, whole.tensors);
                    assert!(have as u64 <= whole.data_start);
                    break;
                }
            }
        }
    }

    /// Damaged copies give errors that say what is wrong, never a panic or a huge allocation.
    #[test]
    fn damaged_headers_are_errors() {
        let (bytes, _) = fixture();
        let err = |b: &[u8]| match parse(b) {
            Err(e) => e.to_string(),
            Ok(p) => panic!("accepted: {p:?}"),
        };
        assert!(err(&bytes[..10]).contains("too short"));
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(err(&b).contains("not a GGUF file"));
        let mut b = bytes.clone();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(err(&b).contains("version 1"));
        let mut b = bytes.clone();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&b).contains("more than the file"));
        // The data cut short: the last tensor runs past the end.
        assert!(err(&bytes[..bytes.len() - 100]).contains("truncated"));
        // The first key's length claims more than the file.
        let mut b = bytes.clone();
        b[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(err(&b).contains("more than the"));
    }

    /// Bytes changed at random anywhere in the header: an error or a header, never a panic.
    #[test]
    fn random_damage_never_panics() {
        let (bytes, _) = fixture();
        let data_start = header(&bytes).data_start as usize;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % data_start;
                b[at] = next() as u8;
            }
            let cut = if next() % 8 == 0 {
                (next() as usize) % b.len()
            } else {
                b.len()
            };
            let _ = parse(&b[..cut]);
        }
    }
}
