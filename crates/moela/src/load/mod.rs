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
pub mod synthetic;

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

use half::f16;
use safetensors::Dtype;
use safetensors::tensor::Metadata;

#[cfg(not(target_arch = "wasm32"))]
pub use files::Mapped;
pub use files::{CheckpointFiles, FileData, MaybeSendSync, RangeSource, ReadFuture, WeightFile, index_files};

use crate::error::{Error, Result};

/// The largest safetensors header read (the safetensors library's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Where a tensor lives: file index, dtype, shape, byte range inside the file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
    /// Its index in a synthetic file.
    synthetic: Option<usize>,
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
async fn read_range(file: &WeightFile, start: usize, end: usize) -> Result<Cow<'_, [u8]>> {
    let len = file.len() as usize;
    if end > len || start > end {
        return Err(weights_error(
            file,
            format!("truncated: bytes {start}..{end} are past its end ({len} bytes)"),
        ));
    }
    match &file.data {
        FileData::Bytes(b) => Ok(Cow::Borrowed(&(**b).as_ref()[start..end])),
        #[cfg(not(target_arch = "wasm32"))]
        FileData::Mapped(m) => {
            m.check_len(&file.name, end)?;
            Ok(Cow::Borrowed(&m.map[start..end]))
        }
        FileData::Ranges(r) => {
            let bytes = r.read(start as u64, end as u64).await?;
            if bytes.len() != end - start {
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

/// Reads and checks one file's safetensors header: `(where the data starts, the header)`.
async fn read_header(file: &WeightFile) -> Result<(usize, Metadata)> {
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
    let text = read_range(file, 8, 8 + n as usize).await?;
    let meta: Metadata =
        serde_json::from_slice(&text).map_err(|e| weights_error(file, format!("bad safetensors header: {e}")))?;
    let data_start = 8 + n as usize;
    let end = data_start as u64 + meta.data_len() as u64;
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
    Ok((data_start, meta))
}

impl WeightSet {
    /// Reads the header of every file (nothing else). A bad header, a truncated file or a tensor named twice
    /// is an error naming the file.
    pub async fn open(files: Vec<WeightFile>) -> Result<Self> {
        if files.is_empty() {
            return Err(Error::Weights {
                file: "*.safetensors".into(),
                message: "no safetensors files in the checkpoint".into(),
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
                let mut at = 0usize;
                for (k, t) in s.tensors.iter().enumerate() {
                    let len = t.bytes() as usize;
                    let dtype = match t.fill {
                        synthetic::Fill::UniformF32(_) => Dtype::F32,
                        _ => Dtype::BF16,
                    };
                    let entry = Entry {
                        file: i,
                        dtype,
                        shape: t.shape.clone(),
                        start: at,
                        end: at + len,
                        synthetic: Some(k),
                    };
                    add(&t.name, entry)?;
                    at += len;
                }
                continue;
            }
            let (data_start, meta) = read_header(file).await?;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                let entry = Entry {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + s,
                    end: data_start + e,
                    synthetic: None,
                };
                add(&name, entry)?;
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

    /// Bytes of tensor data in all files.
    pub fn total_bytes(&self) -> u64 {
        self.entries.values().map(|e| (e.end - e.start) as u64).sum()
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
        self.entries.get(name).map_or(0, |e| (e.end - e.start) as u64)
    }

    /// Starts reading these tensors from disk in the background (mapped files; elsewhere nothing), so that
    /// converting one layer overlaps reading the next.
    pub fn prefetch<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        #[cfg(not(target_arch = "wasm32"))]
        for name in names {
            if let Some(e) = self.entries.get(name)
                && let FileData::Mapped(m) = &self.files[e.file].data
            {
                m.prefetch(e.start..e.end);
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
        self.check(name, expected)?;
        let e = self.entry(name)?;
        let file = &self.files[e.file];
        let width = match e.dtype {
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
            other => {
                return Err(Error::DType {
                    file: file.name.clone(),
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let all_rows = e.shape.first().copied().unwrap_or(1);
        let cols: usize = e.shape.iter().skip(1).product();
        if rows.start > rows.end || rows.end > all_rows {
            return Err(Error::InvalidArgument(format!(
                "rows {rows:?} of tensor {name}, which has {all_rows}"
            )));
        }
        let n = rows.len() * cols;
        let at = out.len();
        if let (FileData::Synthetic(s), Some(k)) = (&file.data, e.synthetic) {
            out.resize(at + n, 0.0);
            s.fill_rows(k, rows.start, cols, &mut out[at..]);
            return Ok(());
        }
        let start = e.start + rows.start * cols * width;
        let end = start + n * width;
        if e.end - e.start != all_rows * cols * width || end > e.end {
            return Err(weights_error(
                file,
                format!(
                    "tensor {name}: {} bytes for {} {:?} values (header is corrupt)",
                    e.end - e.start,
                    all_rows * cols,
                    e.dtype
                ),
            ));
        }
        let raw = read_range(file, start, end).await?;
        let bad = convert(e.dtype, &raw, out);
        drop(raw);
        #[cfg(not(target_arch = "wasm32"))]
        if let FileData::Mapped(m) = &file.data {
            m.release(start..end);
        }
        if let Some(i) = bad {
            out.truncate(at);
            return Err(weights_error(
                file,
                format!(
                    "tensor {name} holds a non-finite value at flat index {}",
                    rows.start * cols + i
                ),
            ));
        }
        Ok(())
    }
}

/// Values converted per task: large enough that splitting costs nothing, small enough to share two cores.
const CONVERT_CHUNK: usize = 1 << 16;

/// Appends little-endian `dtype` values (BF16, F16 or F32) to `out` as f32, on every core natively. Returns
/// the index among the appended values of the first that is not finite, if any.
fn convert(dtype: Dtype, raw: &[u8], out: &mut Vec<f32>) -> Option<usize> {
    let width = if dtype == Dtype::F32 { 4 } else { 2 };
    let at = out.len();
    out.resize(at + raw.len() / width, 0.0);
    let one = |raw: &[u8], out: &mut [f32]| -> Option<usize> {
        match dtype {
            Dtype::BF16 => {
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                }
            }
            Dtype::F16 => {
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            _ => {
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
        out.iter().position(|v| !v.is_finite())
    };
    let out = &mut out[at..];
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(CONVERT_CHUNK)
            .zip(raw.par_chunks(CONVERT_CHUNK * width))
            .enumerate()
            .filter_map(|(i, (o, r))| one(r, o).map(|j| i * CONVERT_CHUNK + j))
            .min()
    }
    #[cfg(target_arch = "wasm32")]
    {
        out.chunks_mut(CONVERT_CHUNK)
            .zip(raw.chunks(CONVERT_CHUNK * width))
            .enumerate()
            .find_map(|(i, (o, r))| one(r, o).map(|j| i * CONVERT_CHUNK + j))
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(convert(Dtype::BF16, &raw, &mut out), None);
        assert_eq!(out.len(), n + 1);
        for (o, v) in out[1..].iter().zip(&values) {
            assert_eq!(*o, half::bf16::from_f32(*v).to_f32());
        }
        let mut raw16: Vec<u8> = values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        let at = CONVERT_CHUNK + 3;
        raw16[2 * at..2 * at + 2].copy_from_slice(&f16::INFINITY.to_le_bytes());
        assert_eq!(convert(Dtype::F16, &raw16, &mut Vec::new()), Some(at));
    }
}
