//! The engine: a loaded model, its tokenizer and device. Front ends create one [`Engine`] and open
//! sessions on it ([`Engine::session`]).

#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;

use burn::tensor::Device;

use crate::cache::LatentCache;
use crate::chat::Tokenizer;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gpu::Kernels;
use crate::gpu::WeightDtype;
#[cfg(not(target_arch = "wasm32"))]
use crate::gpu::device::default_device;
use crate::info::ModelInfo;
use crate::load::{CheckpointFiles, Progress, WeightSet};
use crate::model::transformer::{Embedding, LogitsFor, Transformer};

/// How to load a model.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// How projection and expert weights are stored on the GPU.
    pub dtype: WeightDtype,
    /// moela's WGSL kernels (the default) or burn's generic ops for the hot paths.
    pub kernels: Kernels,
}

/// How a load went.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LoadReport {
    /// Bytes of weights read from the checkpoint.
    pub bytes: u64,
    /// Seconds from the first header read to the model's last weight on the device.
    pub seconds: f64,
}

impl LoadReport {
    /// `bytes / seconds`, GB/s.
    pub fn gb_per_second(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9) / 1e9
    }
}

/// Fails before any weight is read when the model cannot fit the device. Natively on a CPU adapter (Mesa's
/// lavapipe), whose memory is the machine's, the weights it would hold plus the host's embedding table are
/// compared with the memory the system has available now. (Hardware adapters do not report their memory
/// through wgpu; there an allocation that fails is reported by the device.)
fn check_fits(config: &ModelConfig, dtype: WeightDtype, device: &Device) -> Result<()> {
    #[cfg(target_os = "linux")]
    if crate::gpu::device::is_default_device(device) && crate::gpu::texture::cpu_adapter() {
        let info = ModelInfo::new(config, dtype);
        let need = info.gpu_weight_bytes + info.host_weight_bytes;
        if let Some(available) = crate::memory::available_bytes()
            && need > available
        {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            let q4 = ModelInfo::new(config, WeightDtype::Q4);
            return Err(Error::Limit(format!(
                "the model needs {:.1} GiB for its weights as {} ({:.1} GiB on the GPU, {:.1} GiB of embedding on \
                 the host) but the system has {:.1} GiB of memory available; the GPU adapter is a CPU (lavapipe), \
                 whose memory is the system's. {}",
                gib(need),
                dtype.name(),
                gib(info.gpu_weight_bytes),
                gib(info.host_weight_bytes),
                gib(available),
                if dtype == WeightDtype::Q4 {
                    "Use a machine with more memory or a smaller model.".to_string()
                } else {
                    format!(
                        "--weights q4 would need {:.1} GiB.",
                        gib(q4.gpu_weight_bytes + q4.host_weight_bytes)
                    )
                }
            )));
        }
    }
    let _ = (config, dtype, device);
    Ok(())
}

/// A loaded model ready to run.
#[derive(Debug)]
pub struct Engine {
    pub(crate) model: Transformer,
    tokenizer: Option<Tokenizer>,
    load: LoadReport,
    /// How the checkpoint's files stored the weights.
    stored_types: Vec<crate::info::StoredType>,
    /// The recorded steps of the batches last decoded together (`Session::step_many`), replayed while the
    /// same sessions step together (`gpu/replay.rs`); a few, for batches split at the rows one launch takes.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) batch_plans: std::sync::Mutex<Vec<crate::gpu::replay::Plan>>,
}

impl Engine {
    /// Loads a checkpoint folder onto the default device (its weight files mapped, read tensor by tensor).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load_dir(dir: &Path, options: LoadOptions, progress: &mut dyn FnMut(Progress)) -> Result<Self> {
        let files = CheckpointFiles::read_dir(dir)?;
        pollster::block_on(Self::load(files, options, &default_device()?, progress))
    }

    /// Loads a checkpoint from its files onto `device`.
    ///
    /// Before any weight is read: config.json is validated, the tokenizer loaded, every weight file's header
    /// read and every tensor's shape checked, and the model's size compared with what the device can hold.
    /// Then each tensor is read, converted and stored on the device in turn (`load/`).
    pub async fn load(
        files: CheckpointFiles,
        options: LoadOptions,
        device: &Device,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Self> {
        let started = web_time::Instant::now();
        let config = ModelConfig::from_json_bytes(&files.config, "config.json")?;
        let tokenizer = match &files.tokenizer {
            Some(t) => Some(Tokenizer::from_bytes(t, files.tokenizer_config.as_deref())?),
            None => None,
        };
        if let Some(t) = &tokenizer
            && t.vocab_size() > config.vocab_size
        {
            return Err(Error::Tokenizer {
                file: "tokenizer.json".into(),
                message: format!(
                    "has {} tokens but config.json's vocab_size is {}",
                    t.vocab_size(),
                    config.vocab_size
                ),
            });
        }
        let set = WeightSet::open(files.weights).await?;
        let stored_types = set
            .stored_types()
            .into_iter()
            .map(|(name, tensors, bytes)| crate::info::StoredType { name, tensors, bytes })
            .collect();
        check_fits(&config, options.dtype, device)?;
        let mut bytes = 0;
        let model = Transformer::load(
            config,
            &set,
            options.dtype,
            options.kernels,
            device,
            &mut |p: Progress| {
                bytes = p.total;
                progress(p);
            },
        )
        .await?;
        Ok(Self {
            model,
            tokenizer,
            load: LoadReport {
                bytes,
                seconds: started.elapsed().as_secs_f64(),
            },
            stored_types,
            #[cfg(not(target_arch = "wasm32"))]
            batch_plans: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// How the load went: bytes read and seconds taken.
    pub fn load_report(&self) -> LoadReport {
        self.load
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    /// The tokenizer, when the checkpoint has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// The tokenizer or an error saying the checkpoint has none.
    pub fn require_tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::Tokenizer {
            file: "tokenizer.json".into(),
            message: "the checkpoint has no tokenizer.json: only token ids can be used".into(),
        })
    }

    /// Facts about the model: parameters, cache sizes.
    ///
    /// The weights' bytes are those of the weights as loaded (a GGUF file's mix of types at its formats'
    /// sizes), where [`ModelInfo::new`] estimates them from the config and one format.
    pub fn info(&self) -> ModelInfo {
        let (on_device, read) = self.model.device_bytes();
        let estimate = ModelInfo::new(&self.model.config, self.model.dtype);
        ModelInfo {
            stored_types: self.stored_types.clone(),
            gpu_weight_bytes: on_device,
            active_weight_bytes_per_token: read,
            host_weight_bytes: match &self.model.embed {
                Embedding::Host(table) => table.bytes() as u64,
                Embedding::Device(_) => estimate.host_weight_bytes,
            },
            ..estimate
        }
    }

    /// Weight dtype on the GPU.
    pub fn dtype(&self) -> WeightDtype {
        self.model.dtype
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.model.device
    }

    /// Which implementation runs the hot paths.
    pub fn kernels(&self) -> Kernels {
        self.model.kernels
    }

    pub(crate) fn new_cache(&self, max_context: usize) -> LatentCache {
        LatentCache::new(&self.model.config, max_context, &self.model.device)
    }

    /// Logits at every position of `tokens`, from one prefill (`[T][V]`).
    pub async fn logits(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut cache = self.new_cache(tokens.len().max(1));
        let out = self.model.forward(tokens, &mut cache, LogitsFor::All, None)?;
        read_rows(out).await
    }
}

/// Reads a `[R, V]` tensor back as rows (the one host read-back of a step).
pub(crate) async fn read_rows(t: burn::tensor::Tensor<2>) -> Result<Vec<Vec<f32>>> {
    let [r, v] = t.dims();
    let data = t
        .into_data_async()
        .await
        .map_err(|e| Error::Device(format!("reading logits back: {e:?}")))?;
    let flat = data
        .as_slice::<f32>()
        .map_err(|e| Error::Device(format!("logits have an unexpected dtype: {e:?}")))?;
    Ok((0..r).map(|i| flat[i * v..(i + 1) * v].to_vec()).collect())
}
