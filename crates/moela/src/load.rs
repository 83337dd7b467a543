//! Reading HF checkpoint weights: safetensors (single file or sharded with an index), bf16 / f16 / f32,
//! every tensor checked against the shape config.json implies before it is converted.
//!
//! The engine only sees bytes: a [`WeightFile`] is a name plus its bytes (read from disk, mapped, or
//! downloaded), so the same code serves the native binary and the browser.

use std::collections::HashMap;
use std::sync::Arc;

use half::{bf16, f16};
use safetensors::Dtype;

use crate::error::{Error, Result};

/// One safetensors file: its name (for messages) and its bytes.
#[derive(Clone)]
pub struct WeightFile {
    /// File name as in the checkpoint folder, e.g. `model-00001-of-00002.safetensors`.
    pub name: String,
    /// The whole file.
    pub bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
}

impl std::fmt::Debug for WeightFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightFile({}, {} bytes)", self.name, (*self.bytes).as_ref().len())
    }
}

/// Where a tensor lives: file index, dtype, shape, byte range inside the file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
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

/// A tensor converted to host f32 (row-major, in the file's [out, in] orientation).
#[derive(Debug, Clone)]
pub struct HostTensor {
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

impl WeightSet {
    /// Indexes the headers of every file. A bad header, a truncated file or a tensor named twice is an error
    /// naming the file.
    pub fn new(files: Vec<WeightFile>) -> Result<Self> {
        if files.is_empty() {
            return Err(Error::Weights {
                file: "*.safetensors".into(),
                message: "no safetensors files in the checkpoint".into(),
            });
        }
        let mut entries = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            let bytes = (*file.bytes).as_ref();
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Weights {
                file: file.name.clone(),
                message: describe_safetensors_error(&e, bytes.len()),
            })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if data_start + e > bytes.len() {
                    return Err(Error::Weights {
                        file: file.name.clone(),
                        message: format!(
                            "truncated: tensor {name} ends at byte {} but the file has {} bytes",
                            data_start + e,
                            bytes.len()
                        ),
                    });
                }
                let entry = Entry {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + s,
                    end: data_start + e,
                };
                if let Some(prev) = entries.insert(name.clone(), entry) {
                    return Err(Error::Weights {
                        file: file.name.clone(),
                        message: format!("tensor {name} also appears in {}", files[prev.file].name),
                    });
                }
            }
        }
        Ok(Self { files, entries })
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

    /// Bytes of tensor data of `name` (0 when absent).
    pub fn byte_len(&self, name: &str) -> u64 {
        self.entries.get(name).map_or(0, |e| (e.end - e.start) as u64)
    }

    /// Reads tensor `name`, checks its shape and converts it to f32.
    pub fn read(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let e = self.entry(name)?;
        let file = &self.files[e.file].name;
        if e.shape != expected {
            return Err(Error::ShapeMismatch {
                file: file.clone(),
                tensor: name.to_string(),
                found: e.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        let raw = &(*self.files[e.file].bytes).as_ref()[e.start..e.end];
        let n: usize = e.shape.iter().product();
        let width = match e.dtype {
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
            other => {
                return Err(Error::DType {
                    file: file.clone(),
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        if raw.len() != n * width {
            return Err(Error::Weights {
                file: file.clone(),
                message: format!(
                    "tensor {name}: {} bytes for {n} {:?} values (header is corrupt)",
                    raw.len(),
                    e.dtype
                ),
            });
        }
        let data: Vec<f32> = match e.dtype {
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        };
        if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::Weights {
                file: file.clone(),
                message: format!("tensor {name} holds a non-finite value at flat index {bad}"),
            });
        }
        Ok(HostTensor {
            shape: e.shape.clone(),
            data,
        })
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError, len: usize) -> String {
    use safetensors::SafeTensorError as S;
    match e {
        S::HeaderTooSmall => format!("not a safetensors file ({len} bytes, too short for a header)"),
        S::HeaderTooLarge | S::InvalidHeaderLength => {
            "not a safetensors file or truncated (header length exceeds the file)".into()
        }
        S::MetadataIncompleteBuffer => "truncated: the file is shorter than its header says".into(),
        other => format!("bad safetensors header: {other}"),
    }
}

/// Which files `model.safetensors.index.json` names (in first-seen order).
pub fn index_files(index_json: &[u8]) -> Result<Vec<String>> {
    let bad = |m: String| Error::Weights {
        file: "model.safetensors.index.json".into(),
        message: m,
    };
    let v: serde_json::Value = serde_json::from_slice(index_json).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("has no weight_map object".into()))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let f = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry {tensor} is not a file name")))?;
        if f.contains('/') || f.contains('\\') || f.starts_with('.') {
            return Err(bad(format!(
                "weight_map entry {tensor} names {f:?}, not a file in the folder"
            )));
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, bytes: Vec<u8>) -> WeightFile {
        WeightFile {
            name: name.into(),
            bytes: Arc::new(bytes),
        }
    }

    fn tiny() -> Vec<u8> {
        let data: Vec<u8> = [1.0f32, -2.0, 3.5, 0.25]
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(Dtype::BF16, vec![2, 2], &data).unwrap();
        safetensors::serialize([("w", view)], None).unwrap()
    }

    #[test]
    fn reads_bf16_and_checks_shape() {
        let set = WeightSet::new(vec![file("model.safetensors", tiny())]).unwrap();
        assert_eq!(set.read("w", &[2, 2]).unwrap().data, vec![1.0, -2.0, 3.5, 0.25]);
        let e = set.read("w", &[4, 1]).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("w") && e.contains("[2, 2]"),
            "{e}"
        );
        let e = set.read("missing.weight", &[1]).unwrap_err().to_string();
        assert!(e.contains("missing.weight") && e.contains("model.safetensors"), "{e}");
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let mut t = tiny();
        t.truncate(t.len() - 3);
        let e = WeightSet::new(vec![file("model.safetensors", t)])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
        let e = WeightSet::new(vec![file("x.safetensors", b"hello world, not a tensor file".to_vec())])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("x.safetensors"), "{e}");
        let e = WeightSet::new(vec![file("y.safetensors", vec![1, 2])])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("y.safetensors") && e.contains("too short"), "{e}");
    }
}
