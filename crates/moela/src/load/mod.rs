//! Reading HF checkpoint weights: safetensors (single file or sharded with an index), bf16 / f16 / f32, every
//! tensor checked against the shape config.json implies before it is converted.
//!
//! Nothing reads a file whole. [`WeightSet::open`] reads each file's header; the model's loader then asks for
//! one tensor, or a range of a large tensor's rows, at a time, converts it to f32, stores it on the GPU in the
//! chosen format and lets it go. Mapped files drop the pages they have been read from, so a 31 GB checkpoint
//! loads with host memory bounded by one slice plus what the GPU holds. The same code serves every source
//! ([`FileData`]): mapped files natively, ranges read on demand in a browser, bytes in memory, and tensors
//! made from a seed for benchmarks.

mod files;
pub mod gguf;
pub mod synthetic;

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

use safetensors::Dtype;

#[cfg(not(target_arch = "wasm32"))]
pub use files::Mapped;
pub use files::{CheckpointFiles, FileData, MaybeSendSync, RangeSource, ReadFuture, WeightFile, index_files};

use crate::error::{Error, Result};
use crate::gpu::Rows;
use crate::gpu::ggml::GgmlType;

/// The largest safetensors header read (the safetensors library's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Where a tensor lives: file index, type, shape, byte range inside the file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    /// How its values are stored (safetensors' float dtypes are ggml's F32, F16 and BF16); `None` for a
    /// safetensors dtype moela does not read.
    ty: Option<GgmlType>,
    /// The stored type's name, for errors.
    type_name: String,
    shape: Vec<usize>,
    /// Byte offsets in the file: 64-bit, as a shard can be larger than wasm32's address space.
    start: u64,
    end: u64,
    /// Its index in a synthetic file.
    synthetic: Option<usize>,
    /// A GGUF file's `attn_k_b` and `attn_v_b`, which make this `kv_b_proj` ([`gguf::names`]).
    split_kv_b: Option<Box<[Entry; 2]>>,
}

impl Entry {
    /// An entry in file `file` from a safetensors dtype.
    fn safetensors(file: usize, dtype: Dtype, shape: Vec<usize>, start: u64, end: u64) -> Self {
        let ty = match dtype {
            Dtype::F32 => Some(GgmlType::F32),
            Dtype::F16 => Some(GgmlType::F16),
            Dtype::BF16 => Some(GgmlType::BF16),
            _ => None,
        };
        Self {
            file,
            ty,
            type_name: format!("{dtype:?}"),
            shape,
            start,
            end,
            synthetic: None,
            split_kv_b: None,
        }
    }

    /// An entry in GGUF file `file`.
    fn gguf(file: usize, t: gguf::names::HfTensor) -> Self {
        match t {
            gguf::names::HfTensor::Range {
                ggml_type,
                shape,
                start,
                end,
                ..
            } => Self {
                file,
                ty: Some(ggml_type),
                type_name: ggml_type.name(),
                shape,
                start,
                end,
                synthetic: None,
                split_kv_b: None,
            },
            gguf::names::HfTensor::SplitKvB { k_b, v_b } => {
                let (k_b, v_b) = (Self::gguf(file, *k_b), Self::gguf(file, *v_b));
                Self {
                    file,
                    ty: Some(GgmlType::F32),
                    type_name: format!("{} and {}", k_b.type_name, v_b.type_name),
                    shape: gguf::names::kv_b_shape(&k_b.shape, &v_b.shape),
                    start: k_b.start.min(v_b.start),
                    end: k_b.end.max(v_b.end),
                    synthetic: None,
                    split_kv_b: Some(Box::new([k_b, v_b])),
                }
            }
        }
    }

    /// Bytes of the file it is read from.
    fn bytes(&self) -> u64 {
        match &self.split_kv_b {
            Some(parts) => parts.iter().map(Entry::bytes).sum(),
            None => self.end - self.start,
        }
    }
}

/// Progress of a load, in bytes of weights converted so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of tensor data read so far.
    pub loaded: u64,
    /// Bytes of tensor data the model needs in all.
    pub total: u64,
}

/// All tensors of a checkpoint, indexed by HF name.
pub struct WeightSet {
    files: Vec<WeightFile>,
    entries: HashMap<String, Entry>,
}

/// A tensor converted to host f32 (row-major, in the file's orientation).
#[derive(Debug, Clone)]
pub struct HostTensor {
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

fn weights_error(file: &WeightFile, message: String) -> Error {
    Error::Weights {
        file: file.name.clone(),
        message,
    }
}

/// Bytes `start..end` of `file` (not a synthetic one): borrowed where the file is in memory or mapped.
async fn read_range(file: &WeightFile, start: u64, end: u64) -> Result<Cow<'_, [u8]>> {
    let len = file.len();
    if end > len || start > end {
        return Err(weights_error(
            file,
            format!("truncated: bytes {start}..{end} are past its end ({len} bytes)"),
        ));
    }
    // In memory or mapped, the whole file is addressable, so its offsets fit a usize.
    let span = || start as usize..end as usize;
    match &file.data {
        FileData::Bytes(b) => Ok(Cow::Borrowed(&(**b).as_ref()[span()])),
        #[cfg(not(target_arch = "wasm32"))]
        FileData::Mapped(m) => {
            m.check_len(&file.name, end as usize)?;
            Ok(Cow::Borrowed(&m.map[span()]))
        }
        FileData::Ranges(r) => {
            let bytes = r.read(start, end).await?;
            if bytes.len() as u64 != end - start {
                return Err(weights_error(
                    file,
                    format!(
                        "reading bytes {start}..{end} gave {} bytes instead of {}",
                        bytes.len(),
                        end - start
                    ),
                ));
            }
            Ok(Cow::Owned(bytes))
        }
        FileData::Synthetic(_) => unreachable!("synthetic files are generated, not read"),
    }
}

/// One tensor in a safetensors header. The header is read here rather than with the safetensors crate's own
/// type, whose offsets are `usize`: on wasm32 those cannot describe a shard over 4 GiB, and every
/// DeepSeek-V2-Lite shard is one.
#[derive(serde::Deserialize)]
struct HeaderTensor {
    dtype: Dtype,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Reads and checks one file's safetensors header: where the data starts, and the tensors (name, dtype,
/// shape, offsets from the data's start) in file order. The tensors must tile the data exactly, each as
/// many bytes as its shape and dtype make, and end where the file ends.
async fn read_header(file: &WeightFile) -> Result<(u64, Vec<(String, Dtype, Vec<usize>, [u64; 2])>)> {
    let len = file.len();
    if len < 8 {
        return Err(weights_error(
            file,
            format!("not a safetensors file ({len} bytes, too short for a header)"),
        ));
    }
    let n = u64::from_le_bytes(
        read_range(file, 0, 8)
            .await?
            .as_ref()
            .try_into()
            .map_err(|_| weights_error(file, "unreadable header length".into()))?,
    );
    if n > MAX_HEADER || n > len - 8 {
        return Err(weights_error(
            file,
            format!("not a safetensors file or truncated (its header length {n} exceeds the file's {len} bytes)"),
        ));
    }
    let text = read_range(file, 8, 8 + n).await?;
    let bad = |message: String| weights_error(file, format!("bad safetensors header: {message}"));
    let raw: HashMap<String, serde_json::Value> = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let t: HeaderTensor = serde_json::from_value(value).map_err(|e| bad(format!("tensor {name}: {e}")))?;
        let shape = t
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| bad(format!("tensor {name}: shape {:?} is too large", t.shape)))?;
        tensors.push((name, t.dtype, shape, t.data_offsets));
    }
    tensors.sort_by_key(|t| t.3);
    let mut at = 0u64;
    for (name, dtype, shape, [s, e]) in &tensors {
        if *s != at || e < s {
            return Err(bad(format!(
                "tensor {name}: data_offsets [{s}, {e}] do not start where the previous tensor ends ({at})"
            )));
        }
        let bytes = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .and_then(|count| count.checked_mul(dtype.bitsize() as u64))
            .filter(|bits| bits % 8 == 0)
            .map(|bits| bits / 8);
        if bytes != Some(e - s) {
            return Err(bad(format!(
                "tensor {name}: data_offsets [{s}, {e}] hold {} bytes, not what shape {shape:?} of {dtype:?} takes",
                e - s
            )));
        }
        at = *e;
    }
    let data_start = 8 + n;
    let end = data_start + at;
    if end > len {
        return Err(weights_error(
            file,
            format!("truncated: its header describes {end} bytes but the file has {len}"),
        ));
    }
    if end < len {
        return Err(weights_error(
            file,
            format!(
                "{} bytes after its last tensor (the header describes {end} of its {len} bytes)",
                len - end
            ),
        ));
    }
    Ok((data_start, tensors))
}

impl WeightSet {
    /// Reads the header of every file (nothing else). A bad header, a truncated file or a tensor named twice
    /// is an error naming the file.
    pub async fn open(files: Vec<WeightFile>) -> Result<Self> {
        if files.is_empty() {
            return Err(Error::Weights {
                file: "*.safetensors".into(),
                message: "no weight files (safetensors or GGUF) in the checkpoint".into(),
            });
        }
        let mut entries = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            let mut add = |name: &str, entry: Entry| match entries.insert(name.to_string(), entry) {
                Some(prev) => Err(weights_error(
                    file,
                    format!("tensor {name} also appears in {}", files[prev.file].name),
                )),
                None => Ok(()),
            };
            if let FileData::Synthetic(s) = &file.data {
                let mut at = 0u64;
                for (k, t) in s.tensors.iter().enumerate() {
                    let len = t.bytes();
                    let dtype = match t.fill {
                        synthetic::Fill::UniformF32(_) => Dtype::F32,
                        _ => Dtype::BF16,
                    };
                    let entry = Entry {
                        synthetic: Some(k),
                        ..Entry::safetensors(i, dtype, t.shape.clone(), at, at + len)
                    };
                    add(&t.name, entry)?;
                    at += len;
                }
                continue;
            }
            if gguf::starts_gguf(file).await? {
                let header = gguf::read_file_header(file).await?;
                for (name, t) in gguf::names::hf_tensors(&header, &file.name)? {
                    add(&name, Entry::gguf(i, t))?;
                }
                continue;
            }
            let (data_start, tensors) = read_header(file).await?;
            for (name, dtype, shape, [s, e]) in tensors {
                add(
                    &name,
                    Entry::safetensors(i, dtype, shape, data_start + s, data_start + e),
                )?;
            }
        }
        Ok(Self { files, entries })
    }

    /// [`open`](Self::open) without a runtime, for sources that need no waiting (in memory, mapped,
    /// synthetic).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open_blocking(files: Vec<WeightFile>) -> Result<Self> {
        pollster::block_on(Self::open(files))
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The stored shape of `name`, when present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// How the files store the tensors: tensors and bytes per type (its name, `BF16` or `Q4_K`), the most
    /// bytes first.
    pub fn stored_types(&self) -> Vec<(String, usize, u64)> {
        let mut types: HashMap<&str, (usize, u64)> = HashMap::new();
        let plain = self.entries.values().flat_map(|e| match &e.split_kv_b {
            Some(parts) => parts.iter().collect::<Vec<_>>(),
            None => vec![e],
        });
        for e in plain {
            let t = types.entry(e.type_name.as_str()).or_default();
            t.0 += 1;
            t.1 += e.end - e.start;
        }
        let mut types: Vec<_> = types.into_iter().map(|(n, (c, b))| (n.to_string(), c, b)).collect();
        types.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        types
    }

    /// The ggml type a GGUF file stores `name` in (`None` for a safetensors tensor or an unknown name).
    pub fn ggml_type(&self, name: &str) -> Option<crate::gpu::ggml::GgmlType> {
        self.entries.get(name).and_then(|e| e.ty)
    }

    /// Bytes of tensor data in all files.
    pub fn total_bytes(&self) -> u64 {
        self.entries.values().map(Entry::bytes).sum()
    }

    fn file_names(&self) -> String {
        self.files
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            tensor: name.to_string(),
            files: self.file_names(),
        })
    }

    /// Fails unless `name` is present with shape `expected`.
    pub fn check(&self, name: &str, expected: &[usize]) -> Result<()> {
        let e = self.entry(name)?;
        if e.shape != expected {
            return Err(Error::ShapeMismatch {
                file: self.files[e.file].name.clone(),
                tensor: name.to_string(),
                found: e.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(())
    }

    /// Bytes of tensor data of `name` (0 when absent).
    pub fn byte_len(&self, name: &str) -> u64 {
        self.entries.get(name).map_or(0, Entry::bytes)
    }

    /// Starts reading these tensors from disk in the background (mapped files; elsewhere nothing), so that
    /// converting one layer overlaps reading the next.
    pub fn prefetch<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let ranges: Vec<_> = names
                .into_iter()
                .filter_map(|name| {
                    let e = self.entries.get(name)?;
                    match &self.files[e.file].data {
                        FileData::Mapped(m) => Some((m.clone(), e.start as usize..e.end as usize)),
                        _ => None,
                    }
                })
                .collect();
            // Asking for readahead can itself take a while (the kernel queues every page's read): a thread of
            // its own does it, so converting the current layer goes on meanwhile.
            if !ranges.is_empty() {
                std::thread::spawn(move || {
                    for (m, range) in ranges {
                        m.prefetch(range);
                    }
                });
            }
        }
        #[cfg(target_arch = "wasm32")]
        let _ = names;
    }

    /// Reads tensor `name`, checks its shape and converts it to f32.
    pub async fn read(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let rows = expected.first().copied().unwrap_or(1);
        let data = self.read_rows(name, expected, 0..rows).await?;
        Ok(HostTensor {
            shape: expected.to_vec(),
            data,
        })
    }

    /// Reads rows `rows` (of the first dimension) of tensor `name`, checks its shape and converts them to f32:
    /// a part of a tensor too large to hold whole (the embedding, the head, V3's largest projections).
    pub async fn read_rows(&self, name: &str, expected: &[usize], rows: Range<usize>) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.append_rows(name, expected, rows, &mut out).await?;
        Ok(out)
    }

    /// [`read_rows`](Self::read_rows), appending the values to `out`: a loader that reuses one buffer for
    /// every tensor touches no fresh memory per tensor.
    pub async fn append_rows(
        &self,
        name: &str,
        expected: &[usize],
        rows: Range<usize>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let stored = self.stored_rows(name, expected, rows).await?;
        let at = out.len();
        if let Some(i) = convert(stored.rows(), out) {
            out.truncate(at);
            return Err(stored.non_finite(i));
        }
        Ok(())
    }

    /// Rows `rows` (of the first dimension) of tensor `name` as the file stores them, shape checked: what the
    /// packers quantise from directly, so that no f32 copy of a weight is made. Borrowed from a mapped file or
    /// memory (the pages are let go when the [`StoredRows`] is dropped), read from a ranged source, or made
    /// from a seed.
    pub async fn stored_rows(&self, name: &str, expected: &[usize], rows: Range<usize>) -> Result<StoredRows<'_>> {
        self.check(name, expected)?;
        let e = self.entry(name)?;
        let file = &self.files[e.file];
        let all_rows = e.shape.first().copied().unwrap_or(1);
        let cols: usize = e.shape.iter().skip(1).product();
        if rows.start > rows.end || rows.end > all_rows {
            return Err(Error::InvalidArgument(format!(
                "rows {rows:?} of tensor {name}, which has {all_rows}"
            )));
        }
        if let Some(parts) = &e.split_kv_b {
            // A few MB even for V3: both halves are read whole and joined as f32.
            let [k_b, v_b] = &**parts;
            let (k, v) = (&k_b.shape, &v_b.shape);
            let (k_values, v_values) = (self.values(name, k_b).await?, self.values(name, v_b).await?);
            let mut values = gguf::names::join_kv_b(&k_values, &v_values, k[0], k[1], k[2], v[1]);
            values.truncate(rows.end * cols);
            values.drain(..rows.start * cols);
            return Ok(StoredRows {
                data: Stored::Values(values),
                file,
                tensor: name.to_string(),
                first: rows.start * cols,
                release: None,
            });
        }
        self.entry_rows(name, e, rows).await
    }

    /// Every value of a plain (not joined) entry as f32, for tensor `name` (named in errors).
    async fn values(&self, name: &str, e: &Entry) -> Result<Vec<f32>> {
        let rows = e.shape.first().copied().unwrap_or(1);
        let stored = self.entry_rows(name, e, 0..rows).await?;
        let mut out = Vec::new();
        if let Some(i) = convert(stored.rows(), &mut out) {
            return Err(stored.non_finite(i));
        }
        Ok(out)
    }

    /// Rows `rows` of a plain entry (checked against its shape by the caller) for tensor `name`.
    async fn entry_rows(&self, name: &str, e: &Entry, rows: Range<usize>) -> Result<StoredRows<'_>> {
        let file = &self.files[e.file];
        let unreadable = || Error::DType {
            file: file.name.clone(),
            tensor: name.to_string(),
            dtype: e.type_name.clone(),
        };
        let ty = e.ty.filter(|t| t.readable()).ok_or_else(unreadable)?;
        let all_rows = e.shape.first().copied().unwrap_or(1);
        let cols: usize = e.shape.iter().skip(1).product();
        let n = rows.len() * cols;
        let stored = |data, release: Option<Range<usize>>| StoredRows {
            data,
            file,
            tensor: name.to_string(),
            first: rows.start * cols,
            release,
        };
        if let (FileData::Synthetic(s), Some(k)) = (&file.data, e.synthetic) {
            let mut values = vec![0.0; n];
            s.fill_rows(k, rows.start, cols, &mut values);
            return Ok(stored(Stored::Values(values), None));
        }
        // A row is whole blocks of a quantised type (llama.cpp quantises rows, never across them).
        let row_bytes = ty.bytes_of(cols as u64).ok_or_else(|| {
            weights_error(
                file,
                format!(
                    "tensor {name}: rows of {cols} values are not whole {} blocks",
                    e.type_name
                ),
            )
        })?;
        let start = e.start + rows.start as u64 * row_bytes;
        let end = start + rows.len() as u64 * row_bytes;
        if e.end - e.start != all_rows as u64 * row_bytes || end > e.end {
            return Err(weights_error(
                file,
                format!(
                    "tensor {name}: {} bytes for {} {} values (header is corrupt)",
                    e.end - e.start,
                    all_rows * cols,
                    e.type_name
                ),
            ));
        }
        let raw = read_range(file, start, end).await?;
        #[cfg(not(target_arch = "wasm32"))]
        let release = matches!(file.data, FileData::Mapped(_)).then_some(start as usize..end as usize);
        #[cfg(target_arch = "wasm32")]
        let release = None;
        Ok(stored(Stored::Bytes(ty, raw), release))
    }
}

/// A run of a tensor's rows as its file stores them ([`WeightSet::stored_rows`]).
pub struct StoredRows<'a> {
    data: Stored<'a>,
    file: &'a WeightFile,
    tensor: String,
    /// The flat index of the first value in the tensor.
    first: usize,
    /// The mapped byte range to let go of when done.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    release: Option<Range<usize>>,
}

enum Stored<'a> {
    Bytes(GgmlType, Cow<'a, [u8]>),
    Values(Vec<f32>),
}

impl StoredRows<'_> {
    /// The values, to be converted where they are consumed.
    pub fn rows(&self) -> Rows<'_> {
        match &self.data {
            Stored::Values(v) => Rows::F32(v),
            Stored::Bytes(GgmlType::BF16, b) => Rows::Bf16(b),
            Stored::Bytes(GgmlType::F16, b) => Rows::F16(b),
            Stored::Bytes(GgmlType::F32, b) => Rows::F32Bytes(b),
            Stored::Bytes(t, b) => Rows::Ggml(*t, b),
        }
    }

    /// Fails, naming the file, the tensor and the flat index, at the first value that is not finite.
    pub fn check_finite(&self) -> Result<()> {
        let rows = self.rows();
        let mut buf = [0f32; 4096];
        for at in (0..rows.len()).step_by(buf.len()) {
            let part = &mut buf[..(rows.len() - at).min(4096)];
            if !rows.read(at, part) {
                let j = part.iter().position(|v| !v.is_finite()).unwrap_or(0);
                return Err(self.non_finite(at + j));
            }
        }
        Ok(())
    }

    /// The error for a non-finite value at index `i` of these rows, naming the file, tensor and flat index.
    pub fn non_finite(&self, i: usize) -> Error {
        weights_error(
            self.file,
            format!(
                "tensor {} holds a non-finite value at flat index {}",
                self.tensor,
                self.first + i
            ),
        )
    }
}

impl Drop for StoredRows<'_> {
    fn drop(&mut self) {
        #[cfg(not(target_arch = "wasm32"))]
        if let (Some(range), FileData::Mapped(m)) = (self.release.take(), &self.file.data) {
            m.release(range);
        }
    }
}

/// Values converted per task: large enough that splitting costs nothing, small enough to share two cores.
const CONVERT_CHUNK: usize = 1 << 16;

/// Appends `rows` to `out` as f32, on every core natively. Returns the index among the appended values of the
/// first that is not finite, if any.
fn convert(rows: Rows<'_>, out: &mut Vec<f32>) -> Option<usize> {
    let at = out.len();
    out.resize(at + rows.len(), 0.0);
    let first_bad = |i: usize, chunk: &mut [f32]| {
        (!rows.read(i * CONVERT_CHUNK, chunk))
            .then(|| chunk.iter().position(|v| !v.is_finite()).map(|j| i * CONVERT_CHUNK + j))
            .flatten()
    };
    let out = &mut out[at..];
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(CONVERT_CHUNK)
            .enumerate()
            .filter_map(|(i, c)| first_bad(i, c))
            .min()
    }
    #[cfg(target_arch = "wasm32")]
    {
        out.chunks_mut(CONVERT_CHUNK)
            .enumerate()
            .find_map(|(i, c)| first_bad(i, c))
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    fn file(name: &str, bytes: Vec<u8>) -> WeightFile {
        WeightFile::from_bytes(name, bytes)
    }

    fn tiny() -> Vec<u8> {
        let data: Vec<u8> = [1.0f32, -2.0, 3.5, 0.25, 8.0, -0.5]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(Dtype::BF16, vec![3, 2], &data).unwrap();
        safetensors::serialize([("w", view)], None).unwrap()
    }

    fn open(files: Vec<WeightFile>) -> Result<WeightSet> {
        WeightSet::open_blocking(files)
    }

    #[test]
    fn reads_bf16_and_checks_shape() {
        let set = open(vec![file("model.safetensors", tiny())]).unwrap();
        let read = |name: &str, shape: &[usize]| pollster::block_on(set.read(name, shape));
        assert_eq!(read("w", &[3, 2]).unwrap().data, vec![1.0, -2.0, 3.5, 0.25, 8.0, -0.5]);
        assert_eq!(
            pollster::block_on(set.read_rows("w", &[3, 2], 1..3)).unwrap(),
            vec![3.5, 0.25, 8.0, -0.5]
        );
        let e = read("w", &[6, 1]).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("w") && e.contains("[3, 2]"),
            "{e}"
        );
        let e = read("missing.weight", &[1]).unwrap_err().to_string();
        assert!(e.contains("missing.weight") && e.contains("model.safetensors"), "{e}");
        let e = pollster::block_on(set.read_rows("w", &[3, 2], 2..4))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rows 2..4") && e.contains("w"), "{e}");
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let mut t = tiny();
        t.truncate(t.len() - 3);
        let e = open(vec![file("model.safetensors", t)]).err().unwrap().to_string();
        assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
        let e = open(vec![file("x.safetensors", b"hello world, not a tensor file".to_vec())])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("x.safetensors"), "{e}");
        let e = open(vec![file("y.safetensors", vec![1, 2])]).err().unwrap().to_string();
        assert!(e.contains("y.safetensors") && e.contains("too short"), "{e}");
        let mut long = tiny();
        long.extend([0u8; 5]);
        let e = open(vec![file("z.safetensors", long)]).err().unwrap().to_string();
        assert!(e.contains("z.safetensors") && e.contains("5 bytes after"), "{e}");
    }

    #[test]
    fn header_offsets_must_tile_the_data() {
        let file_with = |header: &str, data: usize| {
            let mut text = header.to_string();
            while !text.len().is_multiple_of(8) {
                text.push(' ');
            }
            let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
            bytes.extend(text.as_bytes());
            bytes.extend(vec![0u8; data]);
            file("m.safetensors", bytes)
        };
        let gap = r#"{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[6,10]}}"#;
        let e = open(vec![file_with(gap, 10)]).err().unwrap().to_string();
        assert!(
            e.contains("m.safetensors") && e.contains("tensor b") && e.contains("previous"),
            "{e}"
        );
        let size = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        let e = open(vec![file_with(size, 4)]).err().unwrap().to_string();
        assert!(e.contains("tensor a") && e.contains("[2]"), "{e}");
        // Offsets past 4 GiB are read as such (a shard larger than wasm32's address space).
        let far = r#"{"a":{"dtype":"BF16","shape":[3000000000],"data_offsets":[0,6000000000]}}"#;
        let e = open(vec![file_with(far, 8)]).err().unwrap().to_string();
        assert!(e.contains("truncated") && e.contains("6000000"), "{e}");
    }

    #[test]
    fn non_finite_values_are_named_by_index() {
        let data: Vec<u8> = [1.0f32, f32::NAN, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![3], &data).unwrap();
        let bytes = safetensors::serialize([("b", view)], None).unwrap();
        let set = open(vec![file("m.safetensors", bytes)]).unwrap();
        let e = pollster::block_on(set.read("b", &[3])).unwrap_err().to_string();
        assert!(e.contains("non-finite") && e.contains("index 1"), "{e}");
    }

    #[test]
    fn conversion_is_exact_across_chunks() {
        // More values than one conversion task takes, with a non-finite one far in.
        let n = CONVERT_CHUNK * 2 + 17;
        let values: Vec<f32> = (0..n).map(|i| (i as f32 - 5000.0) * 0.25).collect();
        let raw: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let mut out = vec![7.0];
        assert_eq!(convert(Rows::Bf16(&raw), &mut out), None);
        assert_eq!(out.len(), n + 1);
        for (o, v) in out[1..].iter().zip(&values) {
            assert_eq!(*o, half::bf16::from_f32(*v).to_f32());
        }
        let mut raw16: Vec<u8> = values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        let at = CONVERT_CHUNK + 3;
        raw16[2 * at..2 * at + 2].copy_from_slice(&f16::INFINITY.to_le_bytes());
        assert_eq!(convert(Rows::F16(&raw16), &mut Vec::new()), Some(at));
    }
}
