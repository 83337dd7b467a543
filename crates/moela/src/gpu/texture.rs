//! Packed weights held in textures, and the launches that read them.
//!
//! A software Vulkan driver (Mesa's lavapipe, llvmpipe underneath) reads a storage buffer one lane and one
//! 32-bit word at a time, with a branch per word, even where every lane reads the same address inside a
//! loop; a texel fetch loads all 16 bytes of an `rgba32uint` texel per lane in one go, and a uniform-buffer
//! load at an address shared by the lanes is one scalar load. The packed products (f16, q8, q4) read their
//! weights as texels (`textureLoad`) and their input vector from a uniform copy (`Bind::Uniform`), which
//! makes a q8 4096 x 4096 product on lavapipe about 5x faster than from storage buffers. On hardware GPUs
//! texel fetches and uniform loads are as fast as buffer loads, so the same path serves every native
//! adapter.
//!
//! CubeCL (burn's GPU runtime) binds buffers only, so these launches go around it on the same wgpu device
//! and queue: burn's pending work is flushed first, then one command buffer runs the kernel, so the order
//! of work on the queue is kept. The weights' words are laid out as a flat array of 16-byte texels in rows
//! of [`ROW`] texels (`i` at `(i % ROW, i / ROW)`), the rows in array layers of a power-of-two height
//! (`LAYER_ROWS`), which are written whole. The texels of a matrix are in one of two orders ([`Layout`]):
//! as `gpu/packed.rs` packs them (a row of texels per group of K), which a GPU reads coalesced, or on a CPU
//! adapter each texel column contiguous along K, so that each invocation of a product reads one sequential
//! stream: a CPU's prefetchers follow that and not the row-strided walk (on lavapipe a q8 product over
//! weights that are not in cache runs about 2x faster in column order).
//!
//! Browsers keep the buffer path (the wgpu handles are not shared with burn's device there).

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::wgpu::wgpu;
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::cubecl::wgpu::{AutoCompiler, WgpuServer};
use burn_cubecl::tensor::CubeTensor;
use wgpu::util::DeviceExt;

use super::shader::Shader;

/// Texels per texture row (a power of two, so the shaders split an index with a mask and a shift).
pub const ROW: usize = 4096;
/// Bytes of texels written to a texture at a time (whole layers, at least one).
const SLAB_BYTES: usize = 8 << 20;
/// Rows per array layer: at least the first (a texture of fewer rows is one layer), at most the second
/// (one slab), unless the adapter's layer count asks for taller ones. The padding past a weight's last texel
/// is less than one layer.
const LAYER_ROWS: [usize; 2] = [16, SLAB_BYTES / (ROW * 16)];
/// The size of the uniform copy of a kernel's input (`Bind::Uniform`): WebGPU's guaranteed uniform
/// binding size, and the array size the shaders declare.
pub const UNIFORM_BYTES: usize = 64 << 10;

/// The order of a matrix's texels in a [`WeightTexture`], for a `[count, rows, cols]` grid of texels
/// (`rows` groups of K, `cols` groups of outputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Texel `(e, g, c)` at `(e * rows + g) * cols + c`: the packed words' own order.
    Rows,
    /// Texel `(e, g, c)` at `(e * cols + c) * rows + g`: each column contiguous along K.
    Columns,
}

/// The wgpu device and queue behind burn's default device, with moela's own pipelines.
pub(super) struct Gpu {
    pub(super) device: wgpu::Device,
    pub(super) queue: wgpu::Queue,
    /// The layout weight textures take on this adapter.
    layout: Layout,
    max_rows: usize,
    max_layers: usize,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    /// Where [`Bind::Uniform`] inputs are copied: one buffer serves every launch, since each launch's copy
    /// runs after the previous launch on the queue.
    uniform_input: wgpu::Buffer,
}

/// A pipeline is one entry point of one shader variant.
type PipelineKey = (Shader, &'static str);

/// What one binding of a moela kernel is; the shape uniform comes after them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    /// `var<storage, read_write>` (every storage binding of moela's kernels is read_write).
    Storage,
    /// `var<uniform>`.
    Uniform,
    /// `texture_2d_array<u32>`.
    Texture,
}

/// The registered device, or `None` before burn's default device exists.
pub(super) fn gpu() -> Option<&'static Gpu> {
    GPU.get()
}

impl Gpu {
    /// The pipeline of `entry` in `shader` with `slots` then the shape uniform, built once per process;
    /// `None` when the variant does not render.
    ///
    /// The layout is explicit (not derived from what the entry point uses), so a binding a variant leaves
    /// unread still matches its bind group.
    pub(super) fn pipeline(
        &self,
        name: &'static str,
        shader: Shader,
        entry: &'static str,
        slots: &[Slot],
    ) -> Option<wgpu::ComputePipeline> {
        let source = shader.source()?;
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        let pipeline = cache
            .entry((shader, entry))
            .or_insert_with(|| {
                let entries: Vec<wgpu::BindGroupLayoutEntry> = slots
                    .iter()
                    .chain(std::iter::once(&Slot::Uniform))
                    .enumerate()
                    .map(|(i, slot)| wgpu::BindGroupLayoutEntry {
                        binding: i as u32,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: match slot {
                            Slot::Storage => wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Storage { read_only: false },
                                has_dynamic_offset: false,
                                min_binding_size: None,
                            },
                            Slot::Uniform => wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Uniform,
                                has_dynamic_offset: false,
                                min_binding_size: None,
                            },
                            Slot::Texture => wgpu::BindingType::Texture {
                                sample_type: wgpu::TextureSampleType::Uint,
                                view_dimension: wgpu::TextureViewDimension::D2Array,
                                multisampled: false,
                            },
                        },
                        count: None,
                    })
                    .collect();
                let group = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(name),
                    entries: &entries,
                });
                let layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(name),
                    bind_group_layouts: &[Some(&group)],
                    immediate_size: 0,
                });
                let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(name),
                    source: wgpu::ShaderSource::Wgsl((*source).into()),
                });
                self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(name),
                    layout: Some(&layout),
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                })
            })
            .clone();
        Some(pipeline)
    }

    /// A uniform buffer holding `info` (u32 values, padded to 16 bytes): a kernel's shape.
    pub(super) fn shape_uniform(&self, info: &[u32]) -> wgpu::Buffer {
        let mut words: Vec<u32> = info.to_vec();
        words.resize(info.len().div_ceil(4).max(1) * 4, 0);
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("moela shape"),
            contents: bytemuck::cast_slice(&words),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
    }
}

static GPU: OnceLock<Gpu> = OnceLock::new();

/// Bytes held in weight textures (outside burn's memory pools), for the memory report.
static TEXTURE_BYTES: AtomicU64 = AtomicU64::new(0);

/// Registers the wgpu device and queue burn's default device was created on (once per process); `cpu`
/// says the adapter is a CPU (a software driver), whose weight textures take [`Layout::Columns`].
pub fn register(device: wgpu::Device, queue: wgpu::Queue, cpu: bool) {
    let limits = device.limits();
    let uniform_input = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("moela uniform input"),
        size: UNIFORM_BYTES as u64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let _ = GPU.set(Gpu {
        layout: if cpu { Layout::Columns } else { Layout::Rows },
        uniform_input,
        max_rows: limits.max_texture_dimension_2d as usize,
        max_layers: limits.max_texture_array_layers as usize,
        device,
        queue,
        pipelines: Mutex::new(HashMap::new()),
    });
}

/// Whether the registered adapter is a CPU (a software driver such as lavapipe), whose memory is the system's.
pub fn cpu_adapter() -> bool {
    GPU.get().is_some_and(|g| g.layout == Layout::Columns)
}

/// Whether weights on `device` can be stored in textures: it is the registered wgpu device.
pub fn available(device: &burn::tensor::Device) -> bool {
    GPU.get().is_some() && crate::gpu::device::is_default_device(device)
}

/// Bytes the live weight textures take.
pub fn texture_bytes() -> u64 {
    TEXTURE_BYTES.load(Ordering::Relaxed)
}

/// The thread that writes weight textures while a model loads, and the writes handed to it. A software
/// driver's queue submission waits for the copies before it, so written inline, each weight's upload left
/// the packer's cores idle while the driver copied; on a thread of its own it overlaps the packing of the
/// next weights.
struct Uploader {
    /// At most [`QUEUED_UPLOADS`] weights wait (their words held) beside the one being written.
    send: std::sync::mpsc::SyncSender<Writes>,
    /// Weights handed over and not yet written, and a panic of the thread (a wgpu error) to pass on.
    state: Mutex<(usize, Option<Box<dyn std::any::Any + Send>>)>,
    written: std::sync::Condvar,
}

/// Weights queued for the [`Uploader`] beyond the one it writes.
const QUEUED_UPLOADS: usize = 1;

static UPLOADER: OnceLock<Uploader> = OnceLock::new();

/// Hands `writes` to the [`Uploader`] (started on first use), waiting while it has [`QUEUED_UPLOADS`].
fn upload_later(gpu: &'static Gpu, writes: Writes) {
    let uploader = UPLOADER.get_or_init(|| {
        let (send, receive) = std::sync::mpsc::sync_channel::<Writes>(QUEUED_UPLOADS);
        std::thread::spawn(move || {
            for writes in receive {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writes.run(gpu)));
                let uploader = UPLOADER.get().expect("started");
                let mut state = uploader.state.lock().unwrap_or_else(|e| e.into_inner());
                match run {
                    Ok(words) => crate::gpu::packed::spare_words(words),
                    Err(panic) => state.1 = Some(panic),
                }
                state.0 -= 1;
                uploader.written.notify_all();
            }
        });
        Uploader {
            send,
            state: Mutex::new((0, None)),
            written: std::sync::Condvar::new(),
        }
    });
    uploader.state.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
    uploader
        .send
        .send(writes)
        .expect("the uploader runs as long as the process");
}

/// Waits until every weight texture handed to the uploader thread is written: before a launch or a copy
/// reads a texture, and at the end of a load. A panic there (a wgpu error) resumes here.
pub fn finish_uploads() {
    let Some(uploader) = UPLOADER.get() else { return };
    let mut state = uploader.state.lock().unwrap_or_else(|e| e.into_inner());
    while state.0 > 0 {
        state = uploader.written.wait(state).unwrap_or_else(|e| e.into_inner());
    }
    if let Some(panic) = state.1.take() {
        drop(state);
        std::panic::resume_unwind(panic);
    }
}

/// Waits until the weight textures written so far are on the device: the uploader thread's writes issued
/// ([`finish_uploads`]) and the queue done with them. The end of a load: a software driver copies (and
/// compiles its own kernels) on a thread of its own, and a process that exits while that thread is busy
/// can crash in the driver's teardown.
pub fn finish_uploads_on_device() {
    finish_uploads();
    if let Some(gpu) = GPU.get() {
        staging::release(gpu);
    }
}

/// The writes that fill a new weight texture from its packed words.
struct Writes {
    texture: wgpu::Texture,
    words: Vec<u32>,
    /// `[count, rows, cols]` texels.
    grid: [usize; 3],
    layout: Layout,
    /// Rows per layer, and layers.
    height: usize,
    layers: usize,
    /// Layers written (and submitted) at a time.
    slab_layers: usize,
}

impl Writes {
    /// Writes the texture a slab of whole layers at a time, each slab's texels put in `layout` order
    /// straight into a mapped staging buffer (zeros past the words) and copied to the texture by its own
    /// submit, so the host holds the packed words plus the few staging buffers in flight, never a second
    /// copy of the whole weight. Gives the words back.
    ///
    /// A copy that covers only part of a layer makes wgpu clear the whole layer first (it tracks whether a
    /// texture is initialised by whole layers): on a software driver that doubled the bytes its copy
    /// thread wrote during a load.
    fn run(self, gpu: &Gpu) -> Vec<u32> {
        let Self {
            texture,
            words,
            grid: [_, groups, cols],
            layout,
            height,
            layers,
            slab_layers,
        } = self;
        let texel_words: &[[u32; 4]] = bytemuck::cast_slice(&words);
        let texels = texel_words.len();
        for layer0 in (0..layers).step_by(slab_layers) {
            let n_layers = slab_layers.min(layers - layer0);
            let n_texels = n_layers * height * ROW;
            let first = layer0 * height * ROW; // the slab's first texel
            let live = (first + n_texels).min(texels.max(first)) - first;
            let staging = staging::take(gpu, (n_texels * 16) as u64);
            {
                let mut view = staging
                    .slice(..(n_texels * 16) as u64)
                    .get_mapped_range_mut()
                    .expect("a staging buffer stays mapped until its copy is submitted");
                let (mut data, mut padding) = view.slice(..).split_at(live * 16);
                padding.fill(0);
                match layout {
                    // The packed order is the texture's.
                    Layout::Rows => data.copy_from_slice(bytemuck::cast_slice(&texel_words[first..first + live])),
                    // Texel i is texel g of column i / groups (g = i % groups), column c of matrix e, at
                    // (e * groups + g) * cols + c in the packed words: a column's texels are `cols` apart
                    // there (a division per column, not per texel).
                    Layout::Columns => {
                        let (mut column, mut g) = (first / groups, first % groups);
                        let mut at = (column / cols * groups + g) * cols + column % cols;
                        for texel in data.into_chunks::<16>().0 {
                            texel.write(bytemuck::cast(texel_words[at]));
                            g += 1;
                            at += cols;
                            if g == groups {
                                (column, g) = (column + 1, 0);
                                at = column / cols * groups * cols + column % cols;
                            }
                        }
                    }
                }
            }
            staging.unmap();
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            encoder.copy_buffer_to_texture(
                wgpu::TexelCopyBufferInfo {
                    buffer: &staging,
                    layout: wgpu::TexelCopyBufferLayout {
                        offset: 0,
                        bytes_per_row: Some((ROW * 16) as u32),
                        rows_per_image: Some(height as u32),
                    },
                },
                wgpu::TexelCopyTextureInfo {
                    texture: &texture,
                    mip_level: 0,
                    origin: wgpu::Origin3d {
                        x: 0,
                        y: 0,
                        z: layer0 as u32,
                    },
                    aspect: wgpu::TextureAspect::All,
                },
                wgpu::Extent3d {
                    width: ROW as u32,
                    height: height as u32,
                    depth_or_array_layers: n_layers as u32,
                },
            );
            gpu.queue.submit([encoder.finish()]);
            staging::give_back(staging);
            let _ = gpu.device.poll(wgpu::PollType::Poll);
        }
        if !crate::gpu::packed::loading() {
            staging::release(gpu);
        }
        words
    }
}

/// The staging buffers texture writes fill in place: mapped for writing, at most [`staging::KEPT`] of
/// them, each mapped again once the queue has copied it. Filling wgpu's own staging memory
/// (`Queue::write_texture`) would copy every slab once more, and a fresh staging allocation per slab
/// costs fresh pages on a CPU adapter.
mod staging {
    use std::sync::Mutex;

    use super::{Gpu, SLAB_BYTES, wgpu};

    /// Buffers in use or mapped at most: one being filled, one being copied by the queue, one being
    /// mapped again.
    const KEPT: usize = 3;

    /// Mapped buffers ready to fill, and how many exist.
    static POOL: Mutex<(Vec<wgpu::Buffer>, usize)> = Mutex::new((Vec::new(), 0));

    /// A mapped buffer of at least `size` bytes: a kept one, a new one while fewer than [`KEPT`] exist,
    /// else the next one the queue gives back.
    pub(super) fn take(gpu: &Gpu, size: u64) -> wgpu::Buffer {
        loop {
            {
                let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(i) = pool.0.iter().position(|b| b.size() >= size) {
                    return pool.0.swap_remove(i);
                }
                if pool.1 < KEPT || !pool.0.is_empty() {
                    // A kept buffer too small for this slab is dropped for a larger one.
                    if pool.0.pop().is_none() {
                        pool.1 += 1;
                    }
                    return gpu.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("moela weight staging"),
                        size: size.max(SLAB_BYTES as u64),
                        usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: true,
                    });
                }
            }
            let _ = gpu.device.poll(wgpu::PollType::wait_indefinitely());
        }
    }

    /// Maps `buffer`, submitted for its copy, again for the next slab: it returns to the pool once the
    /// queue is done with it (on a later poll).
    pub(super) fn give_back(buffer: wgpu::Buffer) {
        let kept = buffer.clone();
        buffer.slice(..).map_async(wgpu::MapMode::Write, move |mapped| {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            match mapped {
                Ok(()) => pool.0.push(kept),
                Err(_) => pool.1 -= 1,
            }
        });
    }

    /// Waits for the buffers in flight and frees every buffer: the end of a load, or of a write outside one.
    pub(super) fn release(gpu: &Gpu) {
        let _ = gpu.device.poll(wgpu::PollType::wait_indefinitely());
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.1 -= pool.0.len();
        pool.0.clear();
    }
}

/// Packed words in a 2D-array `rgba32uint` texture, four words per texel.
#[derive(Debug)]
pub struct WeightTexture {
    texture: wgpu::Texture,
    view: wgpu::TextureView,
    /// Texels holding words (the rest of the last row is padding).
    texels: usize,
    /// `[count, rows, cols]` texels, in `layout` order.
    grid: [usize; 3],
    layout: Layout,
    /// Row mask and layer shift the shaders use to place a texel: `[rows - 1 or !0, shift]`.
    placement: [u32; 2],
    bytes: u64,
}

impl WeightTexture {
    /// Uploads `words`, `[count, rows, cols]` texels of four words in the packed order, into a new texture
    /// in the adapter's [`Layout`], a slab of rows at a time, so the host holds the words and one slab. Gives
    /// the words back when no device is registered or the adapter's textures cannot hold them.
    ///
    /// While a model loads ([`crate::gpu::packed::Loading`]), the writes run on a thread of their own and the
    /// words go back to the packer's spare buffers after them ([`finish_uploads`] waits for them).
    pub fn from_words(words: Vec<u32>, grid: [usize; 3]) -> std::result::Result<Arc<Self>, Vec<u32>> {
        match GPU.get() {
            Some(gpu) => Self::with(words, grid, gpu.layout, gpu.max_rows, SLAB_BYTES / (ROW * 16)),
            None => Err(words),
        }
    }

    /// [`from_words`](Self::from_words) in `layout` with at most `max_rows` rows per layer (the adapter's
    /// limit, or less in tests), written `slab_rows` rows (rounded to whole layers) at a time.
    pub(crate) fn with(
        words: Vec<u32>,
        grid: [usize; 3],
        layout: Layout,
        max_rows: usize,
        slab_rows: usize,
    ) -> std::result::Result<Arc<Self>, Vec<u32>> {
        let Some(gpu) = GPU.get() else {
            return Err(words);
        };
        let [count, groups, cols] = grid;
        if words.len() != count * groups * cols * 4 || max_rows == 0 {
            return Err(words);
        }
        let texels = words.len() / 4;
        let rows = texels.div_ceil(ROW).max(1);
        let (height, layers) = layer_shape(rows, max_rows, gpu.max_layers);
        let placement = match layers {
            1 => [u32::MAX, 31],
            _ => [height as u32 - 1, height.trailing_zeros()],
        };
        if ROW > gpu.max_rows || height > gpu.max_rows || layers > gpu.max_layers {
            return Err(words);
        }
        let size = wgpu::Extent3d {
            width: ROW as u32,
            height: height as u32,
            depth_or_array_layers: layers as u32,
        };
        let texture = gpu.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("moela weights"),
            size,
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Uint,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST | wgpu::TextureUsages::COPY_SRC,
            view_formats: &[],
        });
        let bytes = (ROW * height * layers * 16) as u64;
        let writes = Writes {
            texture: texture.clone(),
            words,
            grid,
            layout,
            height,
            layers,
            slab_layers: (slab_rows / height).clamp(1, layers),
        };
        if crate::gpu::packed::loading() {
            upload_later(gpu, writes);
        } else {
            writes.run(gpu);
        }
        let view = texture.create_view(&wgpu::TextureViewDescriptor {
            dimension: Some(wgpu::TextureViewDimension::D2Array),
            ..Default::default()
        });
        TEXTURE_BYTES.fetch_add(bytes, Ordering::Relaxed);
        Ok(Arc::new(Self {
            texture,
            view,
            texels,
            grid,
            layout,
            placement,
            bytes,
        }))
    }

    /// The order of the texels.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// `[count, rows, cols]` texels.
    pub fn grid(&self) -> [usize; 3] {
        self.grid
    }

    /// The view the kernels bind.
    pub(super) fn view(&self) -> &wgpu::TextureView {
        &self.view
    }

    /// `[row mask, layer shift]` for the shaders' uniform.
    pub fn placement(&self) -> [u32; 2] {
        self.placement
    }

    /// Copies the words into `out` (a buffer of at least `4 * texels` words) in the texture's [`Layout`]:
    /// what burn's unpacking (the reference path) reads, after reordering [`Layout::Columns`].
    pub fn copy_to(&self, out: &CubeTensor) {
        let Some(gpu) = GPU.get() else { return };
        finish_uploads();
        let res = match out.client.get_resource::<WgpuServer<AutoCompiler>>(out.handle.clone()) {
            Ok(r) => r,
            Err(e) => panic!("weight texture copy: {e:?}"),
        };
        let _ = out.client.flush();
        let r = res.resource();
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        let row_bytes = (ROW * 16) as u64;
        let full_rows = self.texels / ROW;
        let tail = self.texels % ROW;
        let height = self.texture.height() as usize;
        // `width` texels of each of `rows` rows from texture row `row` (all inside one layer).
        let mut copy = |row: usize, width: usize, rows: usize| {
            encoder.copy_texture_to_buffer(
                self.texel_origin(row / height, row % height),
                wgpu::TexelCopyBufferInfo {
                    buffer: &r.buffer,
                    layout: wgpu::TexelCopyBufferLayout {
                        offset: r.offset + row as u64 * row_bytes,
                        bytes_per_row: Some(row_bytes as u32),
                        rows_per_image: None,
                    },
                },
                wgpu::Extent3d {
                    width: width as u32,
                    height: rows as u32,
                    depth_or_array_layers: 1,
                },
            );
        };
        // One copy per run of whole rows inside a layer, then the last partial row.
        let mut row = 0;
        while row < full_rows {
            let n = (height - row % height).min(full_rows - row);
            copy(row, ROW, n);
            row += n;
        }
        if tail > 0 {
            copy(full_rows, tail, 1);
        }
        gpu.queue.submit([encoder.finish()]);
    }

    fn texel_origin(&self, layer: usize, y: usize) -> wgpu::TexelCopyTextureInfo<'_> {
        wgpu::TexelCopyTextureInfo {
            texture: &self.texture,
            mip_level: 0,
            origin: wgpu::Origin3d {
                x: 0,
                y: y as u32,
                z: layer as u32,
            },
            aspect: wgpu::TextureAspect::All,
        }
    }
}

/// `(rows per layer, layers)` for a texture of `rows` rows: one layer up to `LAYER_ROWS[0]` rows, else
/// layers of a power-of-two height (the shaders split a row index with a mask and a shift), the tallest up
/// to `LAYER_ROWS[1]` that leaves at most 1/32 of the rows as padding (fewer, larger writes; lavapipe's
/// decode measured up to 2.5% slower over 16-row layers than over one, near its noise), taller where the
/// adapter's `max_layers` asks for it. The caller checks the result against the adapter's limits.
fn layer_shape(rows: usize, max_rows: usize, max_layers: usize) -> (usize, usize) {
    if rows <= LAYER_ROWS[0].min(max_rows) {
        return (rows, 1);
    }
    let fit = (rows / 32).clamp(LAYER_ROWS[0], LAYER_ROWS[1]).min(max_rows);
    let mut height = 1usize << fit.ilog2();
    while rows.div_ceil(height) > max_layers && height * 2 <= max_rows {
        height *= 2;
    }
    (height, rows.div_ceil(height))
}

impl Drop for WeightTexture {
    fn drop(&mut self) {
        TEXTURE_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// One binding of a texture launch.
pub(crate) enum Bind<'a> {
    /// A buffer burn's runtime owns.
    Buffer(&'a Handle),
    /// The first `bytes` (at most [`UNIFORM_BYTES`]) of a buffer burn's runtime owns, copied into a uniform
    /// buffer of [`UNIFORM_BYTES`] for the launch (at most one per launch).
    Uniform(&'a Handle, usize),
    /// A weight texture.
    Texture(&'a Arc<WeightTexture>),
}

impl Bind<'_> {
    pub(super) fn slot(&self) -> Slot {
        match self {
            Bind::Buffer(_) => Slot::Storage,
            Bind::Uniform(..) => Slot::Uniform,
            Bind::Texture(_) => Slot::Texture,
        }
    }
}

/// A kernel for [`dispatch`]: its name, variant and entry point.
pub(crate) struct TextureKernel {
    pub(crate) name: &'static str,
    pub(crate) entry: &'static str,
    pub(crate) shader: Shader,
}

/// Runs `kernel` over `groups` workgroups with `bindings` at 0.. and `info` as the uniform after them.
/// burn's queued work on `anchor`'s device is submitted first, so this launch sees its results and later
/// burn work sees this one's. `None`, with nothing launched, when no device is registered or a buffer
/// cannot be bound (burn's runtime reports it failed or unallocated): the caller takes burn's path.
pub(crate) fn dispatch(
    anchor: &CubeTensor,
    kernel: &TextureKernel,
    groups: [u32; 3],
    bindings: &[Bind],
    info: &[u32],
) -> Option<()> {
    dispatch_at(anchor, kernel, groups, bindings, info, None)
}

/// [`dispatch`], where `info[pos_word]` is the position of the step's first token: a replayed step
/// (`replay.rs`) writes its own position there.
pub(crate) fn dispatch_at(
    anchor: &CubeTensor,
    kernel: &TextureKernel,
    groups: [u32; 3],
    bindings: &[Bind],
    info: &[u32],
    pos_word: Option<usize>,
) -> Option<()> {
    let gpu = GPU.get()?;
    finish_uploads();
    let resources = bindings
        .iter()
        .filter_map(|b| match b {
            Bind::Buffer(h) | Bind::Uniform(h, _) => Some(
                anchor
                    .client
                    .get_resource::<WgpuServer<AutoCompiler>>((*h).clone())
                    .map_err(|e| log::warn!("{}: a buffer cannot be bound ({e:?}); burn's path runs", kernel.name)),
            ),
            Bind::Texture(_) => None,
        })
        .collect::<Result<Vec<_>, ()>>()
        .ok()?;
    let _ = anchor.client.flush();
    let slots: Vec<Slot> = bindings.iter().map(Bind::slot).collect();
    let pipeline = gpu.pipeline(kernel.name, kernel.shader, kernel.entry, &slots)?;
    let uniform = gpu.shape_uniform(info);
    let mut buffers = resources.iter();
    let mut copy = None;
    let entries: Vec<wgpu::BindingResource> = bindings
        .iter()
        .map(|b| match b {
            Bind::Buffer(_) => {
                let r = buffers.next().expect("one resource per buffer").resource();
                buffer_range(&r.buffer, r.offset, r.size)
            }
            Bind::Uniform(_, bytes) => {
                let r = buffers.next().expect("one resource per buffer").resource();
                copy = Some((r, (*bytes).min(UNIFORM_BYTES) as u64 & !3));
                gpu.uniform_input.as_entire_binding()
            }
            Bind::Texture(t) => wgpu::BindingResource::TextureView(&t.view),
        })
        .collect();
    let group = gpu.bind_group(kernel.name, &pipeline, entries, &uniform);
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    if let Some((r, bytes)) = copy
        && bytes > 0
    {
        encoder.copy_buffer_to_buffer(&r.buffer, r.offset, &gpu.uniform_input, 0, bytes);
    }
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
    }
    gpu.submit_counted(kernel.name, encoder);
    super::replay::record_texture(anchor, kernel, groups, bindings, info, pos_word);
    Some(())
}

/// `size` bytes of `buffer` from `offset`, as a binding.
pub(super) fn buffer_range(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset,
        size: NonZeroU64::new(size),
    })
}

impl Gpu {
    /// The bind group of `pipeline` (a [`Gpu::pipeline`]): `resources` at bindings 0.., the kernel's `shape`
    /// uniform after them.
    pub(super) fn bind_group(
        &self,
        name: &'static str,
        pipeline: &wgpu::ComputePipeline,
        resources: Vec<wgpu::BindingResource>,
        shape: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = resources
            .into_iter()
            .chain(std::iter::once(shape.as_entire_binding()))
            .enumerate()
            .map(|(i, resource)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource,
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(name),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// Submits `encoder` and reports it as one launch of `name` to a running [`LaunchCounter`]
    /// (super::LaunchCounter); a profile times it alone, the queue drained before and after it.
    pub(super) fn submit_counted(&self, name: &'static str, encoder: wgpu::CommandEncoder) {
        let timed = super::timing_launches();
        let wait = || {
            let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
        };
        if timed {
            wait();
        }
        let start = web_time::Instant::now();
        self.queue.submit([encoder.finish()]);
        if timed {
            wait();
        }
        super::record_launch(name, timed.then(|| start.elapsed().as_secs_f64()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row has a place; layers are powers of two within the adapter's limits wherever the rows fit
    /// them; the padding is less than 1/32 of the rows or one 16-row layer, unless the layer count forced
    /// taller layers.
    #[test]
    fn layers_hold_every_row_with_little_padding() {
        for rows in [1, 15, 16, 17, 31, 33, 100, 129, 513, 1584, 3168, 6000, 100_000] {
            for (max_rows, max_layers) in [(16384, 2048), (8192, 256), (2, 2048), (16384, 16)] {
                let (height, layers) = layer_shape(rows, max_rows, max_layers);
                let case = format!("{rows} rows, at most {max_rows} a layer and {max_layers} layers");
                assert!(
                    height * layers >= rows && height <= max_rows,
                    "{case}: {height} x {layers}"
                );
                assert!(layers == 1 || height.is_power_of_two(), "{case}: {height} rows a layer");
                if rows <= max_rows * max_layers {
                    assert!(layers <= max_layers, "{case}: {layers} layers");
                }
                let unforced = layer_shape(rows, max_rows, usize::MAX).0;
                assert!(
                    height >= unforced,
                    "{case}: {height} rows a layer, {unforced} without the limit"
                );
                if height == unforced {
                    let padding = height * layers - rows;
                    assert!(
                        padding < LAYER_ROWS[0].max(rows / 32),
                        "{case}: {padding} rows of padding"
                    );
                }
            }
        }
    }
}
