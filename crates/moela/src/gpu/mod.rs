//! The GPU layer: the device, how weights are stored (`format`, `packed`, `weights`, `texture`), moela's
//! WGSL kernels (`shader`: every variant's template and key) with their launchers, and the recording and
//! replay of a decode step (`replay`). It imports nothing from the model above it.
//!
//! The launchers run on burn's own wgpu device and buffers.
//!
//! A launcher takes burn tensors, reaches the buffers behind them (burn's `extension` API), launches the
//! kernel through CubeCL's client (the same queue burn's own kernels use, so ordering is kept and nothing
//! is read back) and wraps the output as a burn tensor again. When a kernel cannot run the call (a tensor
//! on another backend such as the CPU or autodiff one, a dtype or shape the kernel does not cover), the
//! launcher returns `None` and the caller takes burn's generic path, which stays the reference.

pub mod device;
pub mod experts;
pub mod format;
pub mod ggml;
pub mod latent_attention;
pub mod matvec;
pub mod packed;
pub mod products;
#[cfg(not(target_arch = "wasm32"))]
pub mod replay;
pub mod residual;
pub mod rms_norm;
pub(crate) mod shader;
pub mod swiglu;
#[cfg(not(target_arch = "wasm32"))]
pub mod texture;
pub mod weights;

pub use format::{Rows, WeightDtype};
pub use weights::{Linear, Weights, WeightsHost};

use burn::tensor::{Int, Tensor};
use burn_cubecl::cubecl::ir::UIntKind;
use burn_cubecl::cubecl::ir::metadata::Info;
use burn_cubecl::cubecl::prelude::{
    AddressType, CubeDim, ElemType, ExecutionMode, KernelDefinition, KernelId, KernelMetadata, KernelSettings,
    PrecompiledSource, Scope,
};
use burn_cubecl::cubecl::prelude::{CubeCount, CubeKernel};
use burn_cubecl::cubecl::server::{Handle, KernelArguments, MetadataBindingInfo};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{Cube, kernel::into_contiguous};
use shader::Shader;

/// Which implementation runs the hot paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum Kernels {
    /// moela's WGSL kernels where they apply (on the wgpu device), burn's generic ops elsewhere.
    #[default]
    Wgsl,
    /// burn's generic ops only: the reference path.
    Generic,
}

impl Kernels {
    /// Parses `wgsl` / `generic`.
    pub fn parse(s: &str) -> crate::error::Result<Self> {
        match s {
            "wgsl" => Ok(Self::Wgsl),
            "generic" => Ok(Self::Generic),
            other => Err(crate::error::Error::InvalidArgument(format!(
                "kernels {other:?}: expected wgsl or generic"
            ))),
        }
    }
}

/// A WGSL kernel from `shaders/` as CubeCL launches it: its variant, whose rendered text it carries, and its
/// launch shape. CubeCL caches compiled kernels by id, which is the variant's [`Shader`] key.
struct WgslKernel {
    name: &'static str,
    entry: &'static str,
    shader: Shader,
    source: std::sync::Arc<str>,
    workgroup: u32,
}

impl WgslKernel {
    /// `entry` of `shader`, `workgroup` invocations per workgroup; `None` when the variant does not render.
    fn new(name: &'static str, entry: &'static str, shader: Shader, workgroup: u32) -> Option<Self> {
        Some(Self {
            name,
            entry,
            source: shader.source()?,
            shader,
            workgroup,
        })
    }
}

impl KernelMetadata for WgslKernel {
    fn name(&self) -> &'static str {
        self.name
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.entry, self.shader))
    }

    fn address_type(&self) -> ElemType {
        UIntKind::U32.into()
    }
}

impl CubeKernel for WgslKernel {
    fn define(&self) -> KernelDefinition {
        // The WGSL text is the kernel; the definition only describes its launch to CubeCL.
        let settings = KernelSettings::new(
            CubeDim::new_1d(self.workgroup).0,
            ExecutionMode::Unchecked,
            AddressType::U32,
        );
        KernelDefinition {
            body: Scope::root(settings.clone()),
            settings,
            info: Info::default(),
        }
    }

    fn source(&self) -> Option<PrecompiledSource> {
        Some(PrecompiledSource {
            source: self.source.to_string(),
            entrypoint_name: self.entry.to_string(),
            lang: "wgsl",
        })
    }
}

/// The contiguous wgpu buffer behind a float tensor, or `None` when it lives elsewhere (CPU, autodiff).
fn cube_tensor<const D: usize>(t: &Tensor<D>) -> Option<CubeTensor> {
    wgsl_buffer(t.clone().try_into_primitive::<Cube>().ok()?)
}

/// The contiguous wgpu buffer behind an integer tensor, or `None` when it lives elsewhere.
fn cube_int_tensor<const D: usize>(t: &Tensor<D, Int>) -> Option<CubeTensor> {
    wgsl_buffer(t.clone().try_into_primitive::<Cube>().ok()?)
}

/// `t`, contiguous, when its device runs WGSL: a build whose wgpu compiles SPIR-V would refuse the text.
fn wgsl_buffer(t: CubeTensor) -> Option<CubeTensor> {
    t.client.name().contains("wgsl").then(|| into_contiguous(t))
}

/// Packs u32 launch values two per word, as CubeCL uploads its uniform `info` buffer, padded to 16 bytes.
fn uniform(values: &[u32]) -> Vec<u64> {
    let mut words: Vec<u64> = values
        .chunks(2)
        .map(|c| u64::from(c[0]) | (u64::from(c.get(1).copied().unwrap_or(0)) << 32))
        .collect();
    words.resize(words.len().div_ceil(2) * 2, 0);
    words
}

/// Launches `kernel` on `anchor`'s device over `groups` workgroups: `buffers` bound in order, then `info`
/// as the uniform shape. Ordered with burn's own work on the same queue; nothing is read back.
fn launch(anchor: &CubeTensor, kernel: WgslKernel, groups: [u32; 3], buffers: &[&Handle], info: &[u32]) {
    launch_at(anchor, kernel, groups, buffers, info, None);
}

/// [`launch`], where `info[pos_word]` is the position of the step's first token: a replayed step
/// (`replay.rs`) writes its own position there.
fn launch_at(
    anchor: &CubeTensor,
    kernel: WgslKernel,
    groups: [u32; 3],
    buffers: &[&Handle],
    info: &[u32],
    pos_word: Option<usize>,
) {
    #[cfg(not(target_arch = "wasm32"))]
    replay::record_cube(anchor, &kernel, groups, buffers, info, pos_word);
    #[cfg(target_arch = "wasm32")]
    let _ = pos_word;
    let args = buffers
        .iter()
        .fold(KernelArguments::new(), |args, b| {
            args.with_buffer((*b).clone().binding())
        })
        .with_info(MetadataBindingInfo::custom(uniform(info)));
    anchor.client.launch(
        Box::new(kernel),
        CubeCount::Static(groups[0], groups[1], groups[2]),
        args,
    );
}

/// Workgroups of 64 invocations for `total` independent values: `[x, y, 1]` with x within the 65535 limit
/// (the shaders index `y * x * 64 + x`); `None` past what one launch can cover.
fn grid(total: usize) -> Option<[u32; 3]> {
    let groups = total.div_ceil(64).max(1);
    let x = groups.min(65_535);
    let y = groups.div_ceil(x);
    (y <= 65_535).then_some([x as u32, y as u32, 1])
}

/// A new f32 output buffer of `len` values on `anchor`'s device.
fn empty(anchor: &CubeTensor, len: usize) -> Handle {
    anchor.client.empty(len.max(1) * 4)
}

/// Wraps a kernel's output buffer as a burn tensor of `shape` and `dtype`.
fn wrap(anchor: &CubeTensor, handle: Handle, shape: &[usize], dtype: burn::tensor::DType) -> CubeTensor {
    CubeTensor::new_contiguous(
        anchor.client.clone(),
        anchor.device.clone(),
        burn::tensor::Shape::from(shape.to_vec()),
        handle,
        dtype,
    )
}

/// Wraps an f32 output buffer as a float tensor.
fn float<const D: usize>(anchor: &CubeTensor, handle: Handle, shape: [usize; D]) -> Tensor<D> {
    Tensor::from_primitive::<Cube>(wrap(anchor, handle, &shape, burn::tensor::DType::F32))
}

/// Counts every kernel launch the process issues (moela's and burn's) while it lives, by kernel name, and
/// optionally times each one (which runs them one at a time: for a profile, not for a speed figure).
pub struct LaunchCounter {
    stats: std::sync::Arc<Launches>,
}

/// Launches of one kernel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelStat {
    /// The kernel's short name (`q8`, `matvec`, or burn's kernel type).
    pub name: String,
    /// Launches.
    pub launches: u64,
    /// Seconds they took, when timed.
    pub seconds: Option<f64>,
}

#[derive(Default)]
struct Launches {
    timed: bool,
    stats: std::sync::Mutex<std::collections::BTreeMap<&'static str, (u64, f64)>>,
}

/// The running counter, which moela's own launches outside CubeCL (texture launches, replays) and the
/// observer report to.
static COUNTING: std::sync::Mutex<Option<std::sync::Arc<Launches>>> = std::sync::Mutex::new(None);

/// The running counter, if any.
fn counting() -> Option<std::sync::Arc<Launches>> {
    COUNTING.lock().ok().and_then(|c| c.clone())
}

/// moela's one observer of CubeCL's launches, installed for the rest of the process on first use (CubeCL
/// has one observer slot): it reports launches to a running [`LaunchCounter`], and tells a decode step being
/// recorded on the launching thread (`replay.rs`) which launches were not moela's.
struct Observer;

/// CubeCL launches (moela's and burn's, on every thread) since the [`Observer`] was installed.
static CUBE_LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// [`CUBE_LAUNCHES`] now: a replayed step compares it with the count at its previous flush, so it only waits
/// on a round trip to CubeCL's device thread when CubeCL has been given work since.
#[cfg(not(target_arch = "wasm32"))]
fn cube_launches() -> u64 {
    CUBE_LAUNCHES.load(std::sync::atomic::Ordering::SeqCst)
}

impl burn_cubecl::cubecl::logging::LaunchObserver for Observer {
    fn launched(&self, kernel: &'static str) {
        CUBE_LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        #[cfg(not(target_arch = "wasm32"))]
        replay::observed_launch();
        if let Some(l) = counting()
            && let Ok(mut stats) = l.stats.lock()
        {
            stats.entry(kernel).or_default().0 += 1;
        }
    }

    fn timing(&self) -> burn_cubecl::cubecl::logging::TimingRequest {
        if timing_launches() {
            burn_cubecl::cubecl::logging::TimingRequest::Resolved
        } else {
            burn_cubecl::cubecl::logging::TimingRequest::None
        }
    }

    fn timed(
        &self,
        kernel: &'static str,
        duration: burn_cubecl::cubecl::logging::Duration,
        _method: burn_cubecl::cubecl::logging::TimingMethod,
    ) {
        if let Some(l) = counting()
            && let Ok(mut stats) = l.stats.lock()
        {
            stats.entry(kernel).or_default().1 += duration.as_secs_f64();
        }
    }
}

/// Installs the [`Observer`] (once per process).
fn observe() {
    static INSTALLED: std::sync::OnceLock<burn_cubecl::cubecl::logging::LaunchObservation> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| burn_cubecl::cubecl::logging::LaunchObservation::new(std::sync::Arc::new(Observer)));
}

/// Whether launches should be timed (a profile is running).
fn timing_launches() -> bool {
    counting().is_some_and(|l| l.timed)
}

/// Records a launch made outside CubeCL, with its duration when timed.
#[cfg(not(target_arch = "wasm32"))]
fn record_launch(kernel: &'static str, seconds: Option<f64>) {
    if let Some(l) = counting()
        && let Ok(mut stats) = l.stats.lock()
    {
        let e = stats.entry(kernel).or_default();
        e.0 += 1;
        e.1 += seconds.unwrap_or(0.0);
    }
}

// The counter stops when it goes (at `finish`, or dropped unfinished).
impl Drop for LaunchCounter {
    fn drop(&mut self) {
        if let Ok(mut c) = COUNTING.lock() {
            *c = None;
        }
    }
}

impl LaunchCounter {
    /// Starts counting; `timed` also times every launch.
    pub fn start(timed: bool) -> Self {
        observe();
        let stats = std::sync::Arc::new(Launches {
            timed,
            ..Launches::default()
        });
        if let Ok(mut c) = COUNTING.lock() {
            *c = Some(stats.clone());
        }
        Self { stats }
    }

    /// Stops: launches per kernel, merged by short name, the most time (or launches) first.
    pub fn finish(self) -> Vec<KernelStat> {
        let raw = self.stats.stats.lock().map(|c| c.clone()).unwrap_or_default();
        let mut merged: std::collections::BTreeMap<String, (u64, f64)> = std::collections::BTreeMap::new();
        for (name, (n, secs)) in raw {
            let short = burn_cubecl::cubecl::config::type_name_format(
                name,
                burn_cubecl::cubecl::config::TypeNameFormatLevel::Short,
            );
            let e = merged.entry(short).or_default();
            e.0 += n;
            e.1 += secs;
        }
        let timed = self.stats.timed;
        let mut list: Vec<KernelStat> = merged
            .into_iter()
            .map(|(name, (launches, secs))| KernelStat {
                name,
                launches,
                seconds: timed.then_some(secs),
            })
            .collect();
        list.sort_by(|a, b| {
            b.seconds
                .unwrap_or(0.0)
                .total_cmp(&a.seconds.unwrap_or(0.0))
                .then(b.launches.cmp(&a.launches))
                .then_with(|| a.name.cmp(&b.name))
        });
        list
    }
}

/// What the device's memory pools, moela's weight textures and replay plans hold: `(reserved, in use)` bytes, or `None` off the wgpu device and in a
/// browser (the allocator's report waits on the device, and a page may not block).
pub fn device_memory(device: &burn::tensor::Device) -> Option<(u64, u64)> {
    if cfg!(target_arch = "wasm32") {
        return None;
    }
    let probe = Tensor::<1>::zeros([1], device).try_into_primitive::<Cube>().ok()?;
    let usage = probe
        .client
        .memory_report(burn_cubecl::cubecl::MemoryScope::Device)
        .usage();
    // Weights held in textures, and the activations replayed steps keep in buffers of their own, live
    // outside burn's pools.
    #[cfg(not(target_arch = "wasm32"))]
    let textures = texture::texture_bytes() + replay::owned_bytes();
    #[cfg(target_arch = "wasm32")]
    let textures = 0;
    Some((usage.bytes_reserved + textures, usage.bytes_in_use + textures))
}

/// The largest difference between two tensors' values, relative to the reference's magnitude (absolute
/// below 1): what the kernel tests compare.
#[cfg(test)]
pub(crate) fn worst_difference<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    let got: Vec<f32> = got.into_data().try_to_vec().expect("f32 values");
    let want: Vec<f32> = want.into_data().try_to_vec().expect("f32 values");
    worst_of(&got, &want)
}

/// [`worst_difference`] of values on the host.
#[cfg(test)]
pub(crate) fn worst_of(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(p, q)| (p - q).abs() / q.abs().max(1.0))
        .fold(0f32, f32::max)
}
