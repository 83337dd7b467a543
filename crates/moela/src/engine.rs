//! The engine: a loaded model, its tokenizer and device. Front ends create one [`Engine`] and open
//! [`Session`](crate::generate::Session)s on it.

#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;
use std::sync::{Arc, OnceLock};

use burn::tensor::Device;

use crate::cache::LatentCache;
use crate::chat::Tokenizer;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::{Session, SessionOptions};
use crate::info::ModelInfo;
use crate::kernels::Kernels;
use crate::load::{CheckpointFiles, Progress, WeightSet};
use crate::model::WeightDtype;
use crate::model::transformer::{LogitsFor, Transformer};

/// How to load a model.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// How projection and expert weights are stored on the GPU.
    pub dtype: WeightDtype,
    /// moela's WGSL kernels (the default) or burn's generic ops for the hot paths.
    pub kernels: Kernels,
}

static DEVICE: OnceLock<std::result::Result<Device, String>> = OnceLock::new();

fn wgpu_options() -> burn::tensor::wgpu::WgpuOptions {
    let options = Device::wgpu_options();
    // On Linux only Vulkan is usable; asking for it alone also skips probing GL/EGL displays.
    #[cfg(target_os = "linux")]
    let options = options.graphics_api(burn::tensor::wgpu::WgpuBackend::Vulkan);
    options
}

fn no_adapter(e: impl std::fmt::Display) -> String {
    if cfg!(target_arch = "wasm32") {
        format!(
            "no WebGPU adapter ({e}). moela needs a browser with WebGPU enabled: Chrome or Edge 113+, \
             Safari 26+, or Firefox 141+ (on Linux, Chrome needs --enable-unsafe-webgpu)"
        )
    } else {
        format!(
            "no usable GPU adapter ({e}). moela needs Vulkan, Metal or DX12; on Linux without a GPU \
             install Mesa's lavapipe (Debian/Ubuntu: apt-get install mesa-vulkan-drivers)"
        )
    }
}

/// The process's one wgpu device, created on first use with the adapter's own limits and features.
///
/// Blocks while the adapter is requested: in a browser use [`default_device_async`].
#[cfg(not(target_arch = "wasm32"))]
pub fn default_device() -> Result<Device> {
    DEVICE
        .get_or_init(|| {
            let (device, setup) = wgpu_options().init_with_setup().map_err(no_adapter)?;
            let cpu = setup.adapter.get_info().device_type == burn::tensor::wgpu::wgpu::DeviceType::Cpu;
            crate::kernels::texture::register(setup.device, setup.queue, cpu);
            Ok(device)
        })
        .clone()
        .map_err(Error::Device)
}

/// Whether `device` is the one [`default_device`] (or [`default_device_async`]) created.
pub fn is_default_device(device: &Device) -> bool {
    matches!(DEVICE.get(), Some(Ok(d)) if d == device)
}

/// [`default_device`] without blocking, as browsers require.
pub async fn default_device_async() -> Result<Device> {
    if let Some(d) = DEVICE.get() {
        return d.clone().map_err(Error::Device);
    }
    let created = wgpu_options().init_async().await.map_err(no_adapter);
    let _ = DEVICE.set(created);
    DEVICE
        .get()
        .cloned()
        .unwrap_or_else(|| Err("device initialisation raced".into()))
        .map_err(Error::Device)
}

/// burn's CPU backend as a device (feature `cpu`): no GPU needed, and for tiny models faster than a software
/// Vulkan driver, since every operation runs directly instead of as a shader dispatch.
#[cfg(feature = "cpu")]
pub fn cpu_device() -> Device {
    Device::flex()
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
    if is_default_device(device) && crate::kernels::texture::cpu_adapter() {
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
        check_fits(&config, options.dtype, device)?;
        let mut bytes = 0;
        let mut model = Transformer::load(config, &set, options.dtype, device, &mut |p: Progress| {
            bytes = p.total;
            progress(p);
        })
        .await?;
        model.set_kernels(options.kernels);
        Ok(Self {
            model,
            tokenizer,
            load: LoadReport {
                bytes,
                seconds: started.elapsed().as_secs_f64(),
            },
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
    pub fn info(&self) -> ModelInfo {
        ModelInfo::new(&self.model.config, self.model.dtype)
    }

    /// Weight dtype on the GPU.
    pub fn dtype(&self) -> WeightDtype {
        self.model.dtype
    }

    /// Opens a session with its own latent cache (call on an `Arc<Engine>`).
    pub fn session(self: &Arc<Self>, options: SessionOptions) -> Result<Session> {
        Session::new(self.clone(), options)
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

    /// Logits at every position of `tokens`, fed one token at a time through the latent cache (`[T][V]`).
    pub async fn logits_decode(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut cache = self.new_cache(tokens.len().max(1));
        let mut replay = Replay::default();
        let mut rows = Vec::with_capacity(tokens.len());
        for &t in tokens {
            rows.push(self.decode_step(&mut cache, &mut replay, t).await?);
        }
        Ok(rows)
    }

    /// Runs `token` through `cache` (one decode step) and returns its logits: replayed from `replay`'s
    /// recorded step where that covers the step, else run as usual and, natively with moela's kernels,
    /// recorded for the steps after it (`kernels/replay.rs`).
    pub(crate) async fn decode_step(
        &self,
        cache: &mut LatentCache,
        replay: &mut Replay,
        token: u32,
    ) -> Result<Vec<f32>> {
        #[cfg(not(target_arch = "wasm32"))]
        if self.model.replayable() && cache.len() < cache.capacity() {
            use crate::kernels::replay::Recording;
            let pos = cache.len();
            if let Some(plan) = &replay.plan
                && plan.covers(pos, cache.layers())
                && let Some(inputs) = self.model.step_inputs(token, pos)?
            {
                let logits = plan.run(&inputs, pos)?;
                cache.advance(1);
                replay.replayed += 1;
                return Ok(logits);
            }
            let recording = Recording::start(pos);
            let out = self.model.forward(&[token], cache, LogitsFor::Last, None)?;
            replay.plan = recording.finish(&out, cache.layers());
            return Ok(read_rows(out).await?.pop().unwrap_or_default());
        }
        #[cfg(target_arch = "wasm32")]
        let _ = replay;
        let out = self.model.forward(&[token], cache, LogitsFor::Last, None)?;
        Ok(read_rows(out).await?.pop().unwrap_or_default())
    }
}

/// The recorded decode step of one latent cache, replayed for the steps after it (native adapters with
/// moela's kernels; `kernels/replay.rs`). Empty until the first decode step.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    #[cfg(not(target_arch = "wasm32"))]
    plan: Option<crate::kernels::replay::Plan>,
    /// Steps served by replaying.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) replayed: usize,
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
