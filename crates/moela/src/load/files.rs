//! Where a checkpoint's bytes come from: a folder's files mapped read-only (native), bytes already in memory,
//! ranges read on demand (a browser's cached download), or tensors made from a seed (benchmark presets).
//!
//! A [`WeightFile`] is never read whole: the loader asks for the header, then one tensor (or a range of its
//! rows) at a time, so host memory stays bounded whatever the checkpoint's size.

use std::future::Future;
#[cfg(not(target_arch = "wasm32"))]
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use super::synthetic::Synthetic;
use crate::error::{Error, Result};

/// `Send + Sync` natively; nothing on wasm32, where JS handles are neither and there is one thread.
#[cfg(not(target_arch = "wasm32"))]
pub trait MaybeSendSync: Send + Sync {}
#[cfg(not(target_arch = "wasm32"))]
impl<T: Send + Sync + ?Sized> MaybeSendSync for T {}
/// `Send + Sync` natively; nothing on wasm32, where JS handles are neither and there is one thread.
#[cfg(target_arch = "wasm32")]
pub trait MaybeSendSync {}
#[cfg(target_arch = "wasm32")]
impl<T: ?Sized> MaybeSendSync for T {}

/// The future a [`RangeSource`] read returns.
pub type ReadFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>>> + 'a>>;

/// A file read by byte ranges on demand, e.g. a download kept in a browser's Cache API or OPFS and read with
/// `Blob.slice`: the loader asks for the header, then for each tensor (or rows of one) in the order it needs
/// them, so only one range is in memory at a time.
pub trait RangeSource: MaybeSendSync {
    /// Bytes in the file.
    fn len(&self) -> u64;
    /// True for an empty file.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes `start..end` of the file (`end <= len()`), exactly `end - start` of them.
    fn read(&self, start: u64, end: u64) -> ReadFuture<'_>;
}

/// A file mapped read-only.
#[cfg(not(target_arch = "wasm32"))]
pub struct Mapped {
    pub(super) map: memmap2::Mmap,
    file: std::fs::File,
    path: PathBuf,
}

#[cfg(not(target_arch = "wasm32"))]
impl Mapped {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process. Another process truncating the file while it
        // is mapped would make reads past the new end fault; `check_len` looks at the file's length before each
        // tensor is read, which turns that into an error naming the file in all but a narrow race.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok(Self {
            map,
            file,
            path: path.to_path_buf(),
        })
    }

    /// Fails when the file on disk no longer reaches `end` (truncated since it was mapped).
    pub(super) fn check_len(&self, name: &str, end: usize) -> Result<()> {
        let len = self.file.metadata().map(|m| m.len()).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })?;
        if (len as usize) < end {
            return Err(Error::Weights {
                file: name.to_string(),
                message: format!("truncated while loading: it now has {len} bytes, a tensor ends at byte {end}"),
            });
        }
        Ok(())
    }

    /// Starts reading `range` from disk in the background (the kernel's readahead), a [`PREFETCH_CHUNK`] at a
    /// time: Linux reads at most the device's readahead window per `MADV_WILLNEED` (`force_page_cache_ra`
    /// clamps it), so one call for a whole tensor fetched its first few MiB and left the rest to page faults,
    /// each waiting behind the next layer's queued reads.
    pub(super) fn prefetch(&self, range: std::ops::Range<usize>) {
        let (start, len) = page_span(range, self.map.len());
        for at in (start..start + len).step_by(PREFETCH_CHUNK) {
            let _ = self
                .map
                .advise_range(memmap2::Advice::WillNeed, at, PREFETCH_CHUNK.min(start + len - at));
        }
    }

    /// Drops `range`'s pages from this process (they stay in the page cache), so a mapped file's resident
    /// size does not grow with what has been read.
    pub(super) fn release(&self, range: std::ops::Range<usize>) {
        let (start, len) = page_span(range, self.map.len());
        if len > 0 {
            // SAFETY: the map is read-only and file-backed: dropped pages read back from the file if touched.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
            };
        }
    }
}

/// Bytes asked for per `MADV_WILLNEED`: at most the smallest readahead window a device is likely to have
/// (Linux's default `read_ahead_kb` is 128), so each call is read whole.
#[cfg(not(target_arch = "wasm32"))]
const PREFETCH_CHUNK: usize = 128 << 10;

/// The whole pages covering `range`, clipped to the map: `(start, len)`.
#[cfg(not(target_arch = "wasm32"))]
fn page_span(range: std::ops::Range<usize>, map_len: usize) -> (usize, usize) {
    const PAGE: usize = 4096;
    let start = range.start / PAGE * PAGE;
    let end = range.end.div_ceil(PAGE).saturating_mul(PAGE).min(map_len);
    (start, end.saturating_sub(start))
}

/// How a [`WeightFile`]'s bytes are reached.
#[derive(Clone)]
pub enum FileData {
    /// The whole file in memory.
    Bytes(Arc<dyn AsRef<[u8]> + Send + Sync>),
    /// A file mapped read-only (native).
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(Arc<Mapped>),
    /// A file read by ranges on demand.
    Ranges(Arc<dyn RangeSource>),
    /// Tensors made from a seed as they are read (benchmark presets at any size).
    Synthetic(Arc<Synthetic>),
}

/// One safetensors file: its name (for messages) and how to read it.
#[derive(Clone)]
pub struct WeightFile {
    /// File name as in the checkpoint folder, e.g. `model-00001-of-00002.safetensors`.
    pub name: String,
    /// Its bytes.
    pub data: FileData,
}

impl WeightFile {
    /// A file whose bytes are in memory.
    pub fn from_bytes(name: impl Into<String>, bytes: impl AsRef<[u8]> + Send + Sync + 'static) -> Self {
        Self {
            name: name.into(),
            data: FileData::Bytes(Arc::new(bytes)),
        }
    }

    /// Maps the file at `path` read-only; its name is the path's file name.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn map(path: &Path) -> Result<Self> {
        Ok(Self {
            name: path
                .file_name()
                .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned()),
            data: FileData::Mapped(Arc::new(Mapped::open(path)?)),
        })
    }

    /// The file's bytes, where they are in memory or mapped.
    pub fn bytes(&self) -> Option<&[u8]> {
        match &self.data {
            FileData::Bytes(b) => Some((**b).as_ref()),
            #[cfg(not(target_arch = "wasm32"))]
            FileData::Mapped(m) => Some(&m.map),
            FileData::Ranges(_) | FileData::Synthetic(_) => None,
        }
    }

    /// Bytes in the file (for a synthetic file, what its tensors would take as stored).
    pub fn len(&self) -> u64 {
        match &self.data {
            FileData::Bytes(b) => (**b).as_ref().len() as u64,
            #[cfg(not(target_arch = "wasm32"))]
            FileData::Mapped(m) => m.map.len() as u64,
            FileData::Ranges(r) => r.len(),
            FileData::Synthetic(s) => s.bytes(),
        }
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for WeightFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match &self.data {
            FileData::Bytes(_) => "in memory",
            #[cfg(not(target_arch = "wasm32"))]
            FileData::Mapped(_) => "mapped",
            FileData::Ranges(_) => "read by ranges",
            FileData::Synthetic(_) => "synthetic",
        };
        write!(f, "WeightFile({}, {} bytes, {how})", self.name, self.len())
    }
}

/// The files of an HF checkpoint folder: the small ones as bytes, the weights as [`WeightFile`]s.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    /// `config.json`.
    pub config: Vec<u8>,
    /// `tokenizer.json`, when the checkpoint has one.
    pub tokenizer: Option<Vec<u8>>,
    /// `tokenizer_config.json`, when the checkpoint has one.
    pub tokenizer_config: Option<Vec<u8>>,
    /// The safetensors files (one, or the shards an index names).
    pub weights: Vec<WeightFile>,
}

/// The largest config, tokenizer or index file read whole (a real tokenizer.json is a few MB).
#[cfg(not(target_arch = "wasm32"))]
const MAX_SMALL_FILE: u64 = 256 << 20;

impl CheckpointFiles {
    /// Opens a checkpoint folder: reads config.json, the tokenizer files if present and the shard index, and
    /// maps `model.safetensors` or the shards named by `model.safetensors.index.json` (else every
    /// `*.safetensors` in the folder). Nothing of the weights is read yet. A GGUF file (or one part of a
    /// split one) is opened as its folder would be, its config and tokenizer read from its metadata.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_dir(dir: &Path) -> Result<Self> {
        let io = |path: PathBuf, source| Error::Io { path, source };
        let read = |name: &str| -> Result<Vec<u8>> {
            let path = dir.join(name);
            let len = std::fs::metadata(&path).map_err(|e| io(path.clone(), e))?.len();
            if len > MAX_SMALL_FILE {
                return Err(Error::Limit(format!(
                    "{}: {len} bytes, more than the {MAX_SMALL_FILE} a {name} may have",
                    path.display()
                )));
            }
            std::fs::read(&path).map_err(|e| io(path, e))
        };
        let optional = |name: &str| -> Result<Option<Vec<u8>>> {
            if dir.join(name).exists() {
                read(name).map(Some)
            } else {
                Ok(None)
            }
        };
        if dir.is_file() && super::gguf::is_gguf(dir) {
            return super::gguf::open_path(dir);
        }
        if !dir.is_dir() {
            return Err(io(
                dir.to_path_buf(),
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a checkpoint folder"),
            ));
        }
        let config = read("config.json")?;
        let names: Vec<String> = if let Some(index) = optional("model.safetensors.index.json")? {
            index_files(&index)?
        } else if dir.join("model.safetensors").exists() {
            vec!["model.safetensors".into()]
        } else {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .map_err(|e| io(dir.to_path_buf(), e))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            v.sort();
            v
        };
        let weights = names
            .iter()
            .map(|name| WeightFile::map(&dir.join(name)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            tokenizer: optional("tokenizer.json")?,
            tokenizer_config: optional("tokenizer_config.json")?,
            weights,
        })
    }
}

/// Which files `model.safetensors.index.json` names (sorted).
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
        if f.contains('/') || f.contains('\\') || f.starts_with('.') || f.is_empty() {
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
