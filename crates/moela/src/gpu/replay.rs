//! Decode steps replayed from a recorded one (native adapters): one command buffer, one submit and one
//! read-back per token.
//!
//! A decode step with moela's kernels is a fixed sequence of about a hundred launches over buffers of fixed
//! sizes. Launched one at a time, each also costs host work: CubeCL hands a buffer over only through a round
//! trip to its device thread, allocates every output, and each texture launch is a submit of its own. On
//! a machine with few cores and a software driver that host work competes with the kernels for the same
//! cores and takes about as long as they do; on a discrete GPU it is the whole cost of a small model's step.
//!
//! So a session's first decode step runs as usual while its launches are recorded ([`Recording`]), and the
//! recording becomes a [`Plan`]: the same WGSL pipelines with bind groups built once over the same buffers
//! (which the plan keeps allocated and in place), and the few values that change from token to token
//! written before each replay: the token's embedding row and rope row ([`Input`]) and the position in the
//! attention kernels' shapes (`launch_at`'s `pos_word`). The cache is written in place by the replayed
//! kernels exactly as by the recorded ones.
//!
//! A recording becomes a plan only when every launch of the step was one of moela's kernels: moela's
//! observer of CubeCL's launches sees every launch on the recording thread, so a step where any burn op
//! ran (a kernel that declined its shape, a non-contiguous input) is never replayed. A plan
//! serves the positions its attention kernels were recorded for (one flash-decoding chunk count) while the
//! cache keeps its buffers; past them the next step is recorded again.

use std::any::Any;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::wgpu::wgpu;
use burn_cubecl::cubecl::client::Client;
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::cubecl::wgpu::{AutoCompiler, WgpuServer};
use burn_cubecl::tensor::CubeTensor;

use super::shader::Shader;
use super::texture::{self, Bind, Slot, TextureKernel, WeightTexture};
use super::{WgslKernel, cube_tensor};
use crate::error::{Error, Result};

/// A value a decode step reads that changes from token to token: uploaded by the recorded step, written
/// into the same buffer before each replay. A step of a batch of sequences has a row of each per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The tokens' embedding rows, `[B, H]`.
    Embedding,
    /// The rope cosines at the tokens' positions, `[B, d_r / 2]`.
    Cos,
    /// The rope sines at the tokens' positions, `[B, d_r / 2]`.
    Sin,
}

/// One step's [`Input`] values, as the forward pass would upload them.
#[derive(Debug, Clone)]
pub struct StepInputs {
    /// [`Input::Embedding`].
    pub embedding: Vec<f32>,
    /// [`Input::Cos`].
    pub cos: Vec<f32>,
    /// [`Input::Sin`].
    pub sin: Vec<f32>,
}

impl StepInputs {
    fn get(&self, input: Input) -> &[f32] {
        match input {
            Input::Embedding => &self.embedding,
            Input::Cos => &self.cos,
            Input::Sin => &self.sin,
        }
    }
}

/// A binding as recorded: the buffer's handle (resolved to its wgpu buffer when the plan is built).
enum Bound {
    Buffer(Handle),
    Uniform(Handle, usize),
    Texture(Arc<WeightTexture>),
}

struct Recorded {
    name: &'static str,
    entry: &'static str,
    shader: Shader,
    groups: [u32; 3],
    binds: Vec<Bound>,
    info: Vec<u32>,
    pos_word: Option<usize>,
    /// The row (sequence) of the batch whose position `pos_word` holds.
    pos_row: usize,
}

#[derive(Default)]
struct Trace {
    launches: Vec<Recorded>,
    inputs: Vec<(Input, Handle)>,
    /// Per row of the batch, the positions every recorded launch also serves (`None`: any).
    positions: Vec<Option<Range<usize>>>,
    /// The row whose attention is being launched ([`at_row`]).
    row: usize,
    /// Launches recorded on their way to CubeCL that its observer has not reported yet.
    pending: usize,
    /// A launch that was not moela's ran, or an input could not be recorded: no plan.
    spoiled: bool,
    client: Option<Client>,
}

thread_local! {
    /// The recording running on this thread (a forward pass launches on its caller's thread).
    static TRACE: RefCell<Option<Trace>> = const { RefCell::new(None) };
}

fn with_trace(f: impl FnOnce(&mut Trace)) {
    TRACE.with_borrow_mut(|t| {
        if let Some(t) = t.as_mut() {
            f(t);
        }
    });
}

/// Records a launch made through CubeCL (`gpu::launch_at`).
pub(super) fn record_cube(
    anchor: &CubeTensor,
    kernel: &WgslKernel,
    groups: [u32; 3],
    buffers: &[&Handle],
    info: &[u32],
    pos_word: Option<usize>,
) {
    record(anchor, true, || Recorded {
        name: kernel.name,
        entry: kernel.entry,
        shader: kernel.shader,
        groups,
        binds: buffers.iter().map(|h| Bound::Buffer((*h).clone())).collect(),
        info: info.to_vec(),
        pos_word,
        pos_row: 0,
    });
}

/// CubeCL launched a kernel on this thread: the one just recorded, or one that is not moela's.
pub(super) fn observed_launch() {
    with_trace(|t| match t.pending {
        0 => t.spoiled = true,
        _ => t.pending -= 1,
    });
}

/// Records a texture launch (`texture::dispatch_at`).
pub(super) fn record_texture(
    anchor: &CubeTensor,
    kernel: &TextureKernel,
    groups: [u32; 3],
    bindings: &[Bind],
    info: &[u32],
    pos_word: Option<usize>,
) {
    record(anchor, false, || Recorded {
        name: kernel.name,
        entry: kernel.entry,
        shader: kernel.shader,
        groups,
        binds: bindings
            .iter()
            .map(|b| match b {
                Bind::Buffer(h) => Bound::Buffer((*h).clone()),
                Bind::Uniform(h, bytes) => Bound::Uniform((*h).clone(), *bytes),
                Bind::Texture(t) => Bound::Texture((*t).clone()),
            })
            .collect(),
        info: info.to_vec(),
        pos_word,
        pos_row: 0,
    });
}

/// Adds the launch `launch` describes to this thread's recording, if one is running (`via_cube`: CubeCL's
/// observer will report it).
fn record(anchor: &CubeTensor, via_cube: bool, launch: impl FnOnce() -> Recorded) {
    with_trace(|t| {
        t.pending += usize::from(via_cube);
        t.client.get_or_insert_with(|| anchor.client.clone());
        let mut l = launch();
        l.pos_row = t.row;
        t.launches.push(l);
    });
}

/// Says that the launches after this one are for row `row` of a batch of sequences (their position
/// words hold that row's position); a no-op when nothing is recording.
pub fn at_row(row: usize) {
    with_trace(|t| t.row = row);
}

/// Says that the launch just recorded serves only the step positions in `range` (its shape or grid
/// depends on more than the position word), for the row it is for.
pub(super) fn serves_positions(range: Range<usize>) {
    with_trace(|t| {
        let row = t.row;
        if t.positions.len() <= row {
            t.positions.resize(row + 1, None);
        }
        let r = match t.positions[row].take() {
            Some(p) => p.start.max(range.start)..p.end.min(range.end),
            None => range,
        };
        t.positions[row] = Some(r);
    });
}

/// Marks `t`, uploaded by the recorded step, as its `input`; a no-op when nothing is recording.
pub fn input(t: &Tensor<2>, input: Input) {
    let recording = TRACE.with_borrow(|t| t.is_some());
    if !recording {
        return;
    }
    match cube_tensor(t) {
        Some(c) => with_trace(|tr| tr.inputs.push((input, c.handle.clone()))),
        // Not on the wgpu device: the step cannot be replayed.
        None => with_trace(|tr| tr.spoiled = true),
    }
}

/// A decode step being recorded on this thread: started before the step's forward pass, finished after.
pub struct Recording {
    positions: Vec<usize>,
}

impl Recording {
    /// Starts recording this thread's launches for a step of one token per sequence, at `positions` (one
    /// sequence, or a batch of them).
    pub fn start(positions: &[usize]) -> Self {
        super::observe();
        TRACE.with_borrow_mut(|t| *t = Some(Trace::default()));
        Self {
            positions: positions.to_vec(),
        }
    }

    /// Stops recording: the plan that replays the step whose logits are `logits` over `caches` (each
    /// sequence's latent cache, `[capacity, width]` per layer), or `None` when the step cannot be replayed
    /// (a launch that was not moela's, an input not recorded, no registered device).
    pub fn finish(self, logits: &Tensor<2>, caches: &[&[Tensor<2>]]) -> Option<Plan> {
        let trace = TRACE.with_borrow_mut(|t| t.take())?;
        if trace.spoiled || trace.pending != 0 {
            log::debug!(
                "decode step at {:?} not replayed: a launch that is not moela's ran",
                self.positions
            );
            return None;
        }
        let positions: Vec<Range<usize>> = (0..self.positions.len())
            .map(|r| trace.positions.get(r).cloned().flatten().unwrap_or(0..usize::MAX))
            .collect();
        if trace.positions.len() > self.positions.len()
            || caches.len() != self.positions.len()
            || positions.iter().zip(&self.positions).any(|(r, p)| !r.contains(p))
            || trace.launches.is_empty()
            || trace
                .launches
                .iter()
                .any(|l| l.pos_word.is_some() && l.pos_row >= self.positions.len())
        {
            return None;
        }
        // Each input recorded once.
        let inputs = [Input::Embedding, Input::Cos, Input::Sin];
        if inputs
            .iter()
            .any(|i| trace.inputs.iter().filter(|(j, _)| j == i).count() != 1)
        {
            return None;
        }
        let logits = cube_tensor(logits)?;
        let cache_ids = caches
            .iter()
            .map(|c| c.iter().map(memory_id).collect::<Option<Vec<_>>>())
            .collect::<Option<Vec<_>>>()?;
        Plan::build(trace, logits, cache_ids, positions)
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        TRACE.with_borrow_mut(|t| *t = None);
    }
}

/// The id of the memory behind `t` (stable while the allocation lives, never reused by a later one).
fn memory_id(t: &Tensor<2>) -> Option<usize> {
    let c = t.clone().try_into_primitive::<burn_cubecl::Cube>().ok()?;
    Some(c.handle.binding().memory.id().value)
}

/// A buffer range a plan writes or reads.
#[derive(Clone)]
struct Target {
    buffer: wgpu::Buffer,
    offset: u64,
    size: u64,
    /// A buffer of the plan's own that took this range's place ([`own_uniform_inputs`]).
    owned: bool,
}

impl Target {
    fn same(&self, other: &Target) -> bool {
        self.buffer == other.buffer && self.offset == other.offset && self.size == other.size
    }

    fn overlaps(&self, other: &Target) -> bool {
        self.buffer == other.buffer && self.offset < other.offset + other.size && other.offset < self.offset + self.size
    }
}

/// Bytes in the buffers live plans own (ranges moved by [`own_uniform_inputs`]).
static OWNED_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes in the buffers live replay plans hold of their own, outside burn's memory pools.
pub fn owned_bytes() -> u64 {
    OWNED_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Moves each buffer range a launch reads as a uniform into a buffer of the plan's own, made for both
/// storage and uniform use, so the launch binds it in place instead of copying it into the plan's uniform
/// buffer first (no copy, and one compute pass for the step: on lavapipe ~3% of a q8 step). CubeCL's
/// buffers are storage only. A range moves only where every other binding in the plan is that exact range or
/// lies clear of it (a view into part of it would be left reading the old place), no launch binds it both
/// ways, and never the logits; an input written at every step follows it. A moved range starts with the
/// bytes it held, so a value made before the recorded step (not only one the step writes) reads the same.
/// Returns the buffers made.
fn own_uniform_inputs(
    launches: &[Recorded],
    bound: &mut [Vec<Option<Target>>],
    inputs: &mut [(Input, Target)],
    logits: &Target,
    gpu: &texture::Gpu,
) -> Vec<wgpu::Buffer> {
    let mut candidates: Vec<Target> = Vec::new();
    for (l, targets) in launches.iter().zip(bound.iter()) {
        for (b, t) in l.binds.iter().zip(targets) {
            if let (Bound::Uniform(..), Some(t)) = (b, t)
                && !candidates.iter().any(|c| c.same(t))
            {
                candidates.push(t.clone());
            }
        }
    }
    let mut owned = Vec::new();
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    for c in candidates {
        let every = bound.iter().flatten().flatten().chain(inputs.iter().map(|(_, t)| t));
        let clear = every.into_iter().all(|t| t.same(&c) || !t.overlaps(&c)) && !logits.overlaps(&c);
        // A launch may not bind one buffer both as a uniform and as storage (attention's queries and latent
        // can come from one product's output).
        let both = launches.iter().zip(bound.iter()).any(|(l, targets)| {
            let mut uses = l
                .binds
                .iter()
                .zip(targets)
                .filter(|(_, t)| t.as_ref().is_some_and(|t| t.same(&c)));
            uses.clone().any(|(b, _)| matches!(b, Bound::Uniform(..)))
                && uses.any(|(b, _)| matches!(b, Bound::Buffer(_)))
        });
        if !clear || both {
            continue;
        }
        let size = c.size.max(texture::UNIFORM_BYTES as u64).next_multiple_of(16);
        let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moela replay activation"),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        encoder.copy_buffer_to_buffer(&c.buffer, c.offset, &buffer, 0, c.size & !3);
        let moved = Target {
            buffer: buffer.clone(),
            offset: 0,
            size: c.size,
            owned: true,
        };
        for t in bound
            .iter_mut()
            .flatten()
            .flatten()
            .chain(inputs.iter_mut().map(|(_, t)| t))
        {
            if t.same(&c) {
                *t = moved.clone();
            }
        }
        OWNED_BYTES.fetch_add(size, std::sync::atomic::Ordering::Relaxed);
        owned.push(buffer);
    }
    gpu.queue.submit([encoder.finish()]);
    owned
}

/// One replayed launch.
struct Step {
    name: &'static str,
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    groups: [u32; 3],
    /// A buffer copied into the plan's uniform buffer before the launch (its x, read as a uniform).
    copy: Option<(Target, u64)>,
    shape: wgpu::Buffer,
    pos_word: Option<usize>,
    pos_row: usize,
}

/// A recorded decode step, replayed for the tokens after it.
pub struct Plan {
    steps: Vec<Step>,
    inputs: Vec<(Input, Target)>,
    logits: Target,
    /// Values of the logits row.
    vocab: usize,
    staging: wgpu::Buffer,
    uniform: wgpu::Buffer,
    /// Per sequence, its cache's buffers.
    cache_ids: Vec<Vec<usize>>,
    /// Per sequence, the positions the plan serves.
    positions: Vec<Range<usize>>,
    client: Client,
    /// CubeCL's launch count when its queue was last flushed for this plan (`gpu::cube_launches`).
    flushed_at: std::sync::atomic::AtomicU64,
    /// Every buffer the steps bind, held so that CubeCL's pools neither reuse nor move them (a held
    /// binding does not count as an owner of a tensor, so the cache is still written in place).
    _held: Vec<Box<dyn Any + Send>>,
    _textures: Vec<Arc<WeightTexture>>,
    /// Buffers of the plan's own, in place of ranges its launches read as uniforms.
    owned: Vec<wgpu::Buffer>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        let bytes: u64 = self.owned.iter().map(|b| b.size()).sum();
        OWNED_BYTES.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("launches", &self.steps.len())
            .field("positions", &self.positions)
            .finish()
    }
}

impl Plan {
    fn build(
        trace: Trace,
        logits: CubeTensor,
        cache_ids: Vec<Vec<usize>>,
        positions: Vec<Range<usize>>,
    ) -> Option<Self> {
        let gpu = texture::gpu()?;
        let client = trace.client?;
        let mut held: Vec<Box<dyn Any + Send>> = Vec::new();
        // The wgpu buffer range behind a handle, its allocation held by the plan.
        let mut resolve = |h: &Handle| -> Option<Target> {
            let r = client
                .get_resource::<WgpuServer<AutoCompiler>>(h.clone())
                .map_err(|e| log::debug!("decode step not replayed: {e:?}"))
                .ok()?;
            let res = r.resource();
            let t = Target {
                buffer: res.buffer.clone(),
                offset: res.offset,
                size: res.size,
                owned: false,
            };
            held.push(Box::new(r));
            Some(t)
        };
        let uniform = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moela replay uniform input"),
            size: texture::UNIFORM_BYTES as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        // Every buffer range first, so that the ranges kernels read as uniforms can be moved (below).
        let mut bound: Vec<Vec<Option<Target>>> = Vec::with_capacity(trace.launches.len());
        for l in &trace.launches {
            let mut targets = Vec::with_capacity(l.binds.len());
            for b in &l.binds {
                targets.push(match b {
                    Bound::Buffer(h) | Bound::Uniform(h, _) => Some(resolve(h)?),
                    Bound::Texture(_) => None,
                });
            }
            bound.push(targets);
        }
        let mut inputs = Vec::with_capacity(trace.inputs.len());
        for (i, h) in &trace.inputs {
            inputs.push((*i, resolve(h)?));
        }
        let vocab = logits.meta.num_elements();
        let logits = resolve(&logits.handle)?;
        if (vocab * 4) as u64 > logits.size {
            return None;
        }
        let owned = own_uniform_inputs(&trace.launches, &mut bound, &mut inputs, &logits, gpu);
        let mut textures = Vec::new();
        let mut steps = Vec::with_capacity(trace.launches.len());
        for (l, targets) in trace.launches.iter().zip(&bound) {
            let slots: Vec<Slot> = l
                .binds
                .iter()
                .map(|b| match b {
                    Bound::Buffer(_) => Slot::Storage,
                    Bound::Uniform(..) => Slot::Uniform,
                    Bound::Texture(_) => Slot::Texture,
                })
                .collect();
            let pipeline = gpu.pipeline(l.name, l.shader, l.entry, &slots)?;
            let shape = gpu.shape_uniform(&l.info);
            let mut copy = None;
            let mut resources = Vec::with_capacity(l.binds.len());
            for (b, t) in l.binds.iter().zip(targets) {
                resources.push(match (b, t) {
                    (Bound::Texture(w), _) => {
                        textures.push(w.clone());
                        wgpu::BindingResource::TextureView(w.view())
                    }
                    // A range the plan owns is read as a uniform in place: it holds UNIFORM_BYTES.
                    (Bound::Uniform(..), Some(t)) if t.owned => {
                        texture::buffer_range(&t.buffer, 0, texture::UNIFORM_BYTES as u64)
                    }
                    (Bound::Uniform(_, bytes), Some(t)) => {
                        let bytes = (*bytes).min(texture::UNIFORM_BYTES).min(t.size as usize) as u64 & !3;
                        copy = Some((t.clone(), bytes));
                        uniform.as_entire_binding()
                    }
                    (_, Some(t)) => texture::buffer_range(&t.buffer, t.offset, t.size),
                    (_, None) => unreachable!("every buffer was resolved"),
                });
            }
            let group = gpu.bind_group(l.name, &pipeline, resources, &shape);
            steps.push(Step {
                name: l.name,
                pipeline,
                group,
                groups: l.groups,
                copy,
                shape,
                pos_word: l.pos_word,
                pos_row: l.pos_row,
            });
        }
        log::debug!(
            "replay plan: {} launches, {} of them read a copy of their input, {} ranges moved",
            steps.len(),
            steps.iter().filter(|s| s.copy.is_some()).count(),
            owned.len()
        );
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moela replay logits"),
            size: (vocab * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Some(Self {
            steps,
            inputs,
            logits,
            vocab,
            staging,
            uniform,
            cache_ids,
            positions,
            client,
            // Resolving the buffers above flushed CubeCL's queue.
            flushed_at: std::sync::atomic::AtomicU64::new(super::cube_launches()),
            _held: held,
            _textures: textures,
            owned,
        })
    }

    /// Whether the plan can replay a step at `positions` over `caches` (one per sequence, in the order
    /// recorded, each in the buffers it was recorded with).
    pub fn covers(&self, positions: &[usize], caches: &[&[Tensor<2>]]) -> bool {
        positions.len() == self.positions.len()
            && caches.len() == self.cache_ids.len()
            && positions.iter().zip(&self.positions).all(|(p, r)| r.contains(p))
            && caches.iter().zip(&self.cache_ids).all(|(cache, ids)| {
                cache.len() == ids.len() && cache.iter().zip(ids).all(|(t, id)| memory_id(t) == Some(*id))
            })
    }

    /// Whether the plan binds `cache` (a sequence's latent cache, per layer): it keeps those buffers
    /// allocated while it lives.
    pub fn binds_cache(&self, cache: &[Tensor<2>]) -> bool {
        cache
            .iter()
            .filter_map(memory_id)
            .any(|id| self.cache_ids.iter().flatten().any(|&c| c == id))
    }

    /// Launches the recorded step for the tokens whose values are `inputs`, at `positions` (one per
    /// sequence), and reads its logits back (`[B, V]`, row-major).
    pub fn run(&self, inputs: &StepInputs, positions: &[usize]) -> Result<Vec<f32>> {
        if positions.len() != self.positions.len() {
            return Err(Error::Device(format!(
                "a replayed step of {} sequences run for {}",
                self.positions.len(),
                positions.len()
            )));
        }
        let gpu = texture::gpu().ok_or_else(|| Error::Device("the wgpu device is gone".into()))?;
        // Work burn has queued since the last replay (a prefill, say: anything that writes the cache is a
        // launch) reaches the queue before this one; without any, no round trip to CubeCL's device thread.
        let launches = super::cube_launches();
        if self.flushed_at.swap(launches, std::sync::atomic::Ordering::SeqCst) != launches {
            self.client
                .flush()
                .map_err(|e| Error::Device(format!("flushing the queue before a replayed step: {e:?}")))?;
        }
        for (input, t) in &self.inputs {
            let values = inputs.get(*input);
            if (values.len() * 4) as u64 > t.size {
                return Err(Error::Device(format!(
                    "replayed step: {input:?} has {} values, its buffer {} bytes",
                    values.len(),
                    t.size
                )));
            }
            gpu.queue
                .write_buffer(&t.buffer, t.offset, bytemuck::cast_slice(values));
        }
        for s in &self.steps {
            if let Some(w) = s.pos_word {
                let pos = positions[s.pos_row] as u32;
                gpu.queue
                    .write_buffer(&s.shape, (w * 4) as u64, bytemuck::bytes_of(&pos));
            }
        }
        if super::timing_launches() {
            // A profile times each launch alone.
            for s in &self.steps {
                let mut encoder = gpu.device.create_command_encoder(&Default::default());
                self.encode(&mut encoder, std::slice::from_ref(s));
                gpu.submit_counted(s.name, encoder);
            }
        } else {
            for s in &self.steps {
                super::record_launch(s.name, None);
            }
        }
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        if !super::timing_launches() {
            self.encode(&mut encoder, &self.steps);
        }
        encoder.copy_buffer_to_buffer(
            &self.logits.buffer,
            self.logits.offset,
            &self.staging,
            0,
            (self.vocab * 4) as u64,
        );
        gpu.queue.submit([encoder.finish()]);
        let slice = self.staging.slice(..);
        let (send, recv) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = send.send(r);
        });
        gpu.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("waiting for a replayed step: {e:?}")))?;
        recv.recv()
            .map_err(|_| Error::Device("a replayed step's logits were never mapped".into()))?
            .map_err(|e| Error::Device(format!("reading a replayed step's logits: {e:?}")))?;
        let logits = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| Error::Device(format!("reading a replayed step's logits: {e:?}")))?;
            bytemuck::cast_slice::<u8, f32>(&view).to_vec()
        };
        self.staging.unmap();
        Ok(logits)
    }

    /// Records `steps` into `encoder`: passes of launches, split where a launch's x is copied into the
    /// uniform buffer first.
    fn encode(&self, encoder: &mut wgpu::CommandEncoder, steps: &[Step]) {
        let mut rest = steps;
        while !rest.is_empty() {
            if let Some((t, bytes)) = &rest[0].copy
                && *bytes > 0
            {
                encoder.copy_buffer_to_buffer(&t.buffer, t.offset, &self.uniform, 0, *bytes);
            }
            // This pass runs up to the next launch that needs a copy of its own.
            let end = rest[1..]
                .iter()
                .position(|s| s.copy.is_some())
                .map_or(rest.len(), |i| i + 1);
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for s in &rest[..end] {
                pass.set_pipeline(&s.pipeline);
                pass.set_bind_group(0, &s.group, &[]);
                pass.dispatch_workgroups(s.groups[0], s.groups[1], s.groups[2]);
            }
            drop(pass);
            rest = &rest[end..];
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::engine::{Engine, LoadOptions, read_rows};
    use crate::generate::Replay;
    use crate::gpu::WeightDtype;
    use crate::gpu::latent_attention::CHUNK;
    use crate::model::transformer::LogitsFor;

    /// A batch's recorded step goes when a session whose cache it binds is dropped, so that the cache's
    /// memory is not held by it.
    #[test]
    fn a_batch_plan_goes_with_its_sessions() {
        if crate::gpu::device::default_device().is_err() {
            eprintln!("no GPU adapter: skipped");
            return;
        }
        let (_, _, engine) = engines().next().unwrap();
        let engine = std::sync::Arc::new(engine);
        let open = || {
            let mut s = engine.session(crate::SessionOptions { max_context: 64 }).unwrap();
            pollster::block_on(s.prefill(&[1, 2, 3])).unwrap();
            s
        };
        let (mut a, mut b, mut c) = (open(), open(), open());
        pollster::block_on(crate::Session::step_many(&mut [&mut a, &mut b], &[5, 6])).unwrap();
        pollster::block_on(crate::Session::step_many(&mut [&mut b, &mut c], &[7, 8])).unwrap();
        assert_eq!(engine.batch_plans.lock().unwrap().len(), 2);
        drop(a);
        assert_eq!(
            engine.batch_plans.lock().unwrap().len(),
            1,
            "the plan of a and b went with a"
        );
        drop(c);
        assert!(engine.batch_plans.lock().unwrap().is_empty());
        drop(b);
    }

    /// The fixtures the replay tests run: plain queries in f32, LoRA queries in q8.
    fn engines() -> impl Iterator<Item = (&'static str, WeightDtype, Engine)> {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        [("v2-lite-tiny", WeightDtype::F32), ("v3-tiny", WeightDtype::Q8)]
            .into_iter()
            .map(move |(name, dtype)| {
                let options = LoadOptions {
                    dtype,
                    ..Default::default()
                };
                (
                    name,
                    dtype,
                    Engine::load_dir(&fixtures.join(name), options, &mut |_| {}).unwrap(),
                )
            })
    }

    /// Replayed decode steps give the logits of the same steps run launch by launch, across the end of an
    /// attention chunk (where the plan is recorded again) and after the cache changed buffers.
    #[test]
    fn replayed_steps_match_steps_run_launch_by_launch() {
        if crate::gpu::device::default_device().is_err() {
            eprintln!("no GPU adapter: skipped");
            return;
        }
        for (name, dtype, engine) in engines() {
            assert!(engine.model.replayable());
            let vocab = engine.config().vocab_size as u32;
            let capacity = CHUNK + 8;
            let prompt: Vec<u32> = (0..CHUNK as u32 - 3).map(|i| (i * 37 + 11) % vocab).collect();
            let (mut cache, mut reference) = (engine.new_cache(capacity), engine.new_cache(capacity));
            for c in [&mut cache, &mut reference] {
                engine.model.forward(&prompt, c, LogitsFor::Last, None).unwrap();
            }
            let mut replay = Replay::default();
            for step in 0..7u32 {
                if step == 5 {
                    // A cache layer in a new buffer: the plan no longer covers the cache.
                    let moved = cache.layers()[0].clone() + 0.0;
                    *cache.layer_mut(0) = moved;
                }
                let token = (step * 101 + 7) % vocab;
                let got = pollster::block_on(engine.decode_step(&mut cache, &mut replay, token)).unwrap();
                let out = engine
                    .model
                    .forward(&[token], &mut reference, LogitsFor::Last, None)
                    .unwrap();
                let want = pollster::block_on(read_rows(out)).unwrap().pop().unwrap();
                let diff = crate::gpu::worst_of(&got, &want);
                assert!(diff <= 1e-6, "{name} {dtype:?}, step {step}: logits differ by {diff}");
            }
            // Recorded at the first step, at the first step of the next chunk and after the move: the other
            // four steps were replays.
            assert_eq!(replay.replayed, 4, "{name} {dtype:?}");
        }
    }

    /// Batched steps (a token for each of several caches, each at its own position) replayed from a
    /// recorded one give the logits of each cache's own step run launch by launch, with LoRA queries (read
    /// in place by the norm) and plain ones.
    #[test]
    fn replayed_batches_match_each_cache_run_alone() {
        if crate::gpu::device::default_device().is_err() {
            eprintln!("no GPU adapter: skipped");
            return;
        }
        for (name, dtype, engine) in engines() {
            let vocab = engine.config().vocab_size as u32;
            let lengths = [5usize, 17, 40];
            let mut caches = Vec::new();
            let mut references = Vec::new();
            for &n in &lengths {
                let prompt: Vec<u32> = (0..n as u32).map(|i| (i * 37 + n as u32) % vocab).collect();
                let (mut c, mut r) = (engine.new_cache(64), engine.new_cache(64));
                for c in [&mut c, &mut r] {
                    engine.model.forward(&prompt, c, LogitsFor::Last, None).unwrap();
                }
                caches.push(c);
                references.push(r);
            }
            for step in 0..4u32 {
                let tokens: Vec<u32> = (0..lengths.len() as u32)
                    .map(|i| (step * 31 + i * 7 + 3) % vocab)
                    .collect();
                let mut batch: Vec<&mut crate::cache::LatentCache> = caches.iter_mut().collect();
                let got = pollster::block_on(engine.decode_rows(&mut batch, &tokens)).unwrap();
                for (i, r) in references.iter_mut().enumerate() {
                    let out = engine.model.forward(&[tokens[i]], r, LogitsFor::Last, None).unwrap();
                    let want = pollster::block_on(read_rows(out)).unwrap().pop().unwrap();
                    let diff = crate::gpu::worst_of(&got[i], &want);
                    assert!(
                        diff <= 1e-5,
                        "{name} {dtype:?}, step {step}, row {i}: logits differ by {diff}"
                    );
                }
                // The first step recorded the batch's plan; the others replayed it.
                assert_eq!(
                    engine.batch_plans.lock().unwrap().len(),
                    1,
                    "{name} {dtype:?}, step {step}"
                );
            }
        }
    }
}
