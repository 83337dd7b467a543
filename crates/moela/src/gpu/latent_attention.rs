//! `shaders/mla_{query,attend,output}.wgsl`: MLA decode attention in latent space (absorbed queries,
//! flash-decoding over the latent cache, the value up-projection): per layer one launch for the queries,
//! one per token over its sequence's cache, one for the output.
//!
//! Natively the three run on moela's own launch path (`texture.rs`): the absorbed factors `W_UK` / `W_UV^T`
//! are read from textures ([`Factor`]) and the queries from uniform copies where they fit. In a browser they
//! run through CubeCL with every operand in a storage buffer.

use burn::tensor::{DType, Tensor};
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::tensor::CubeTensor;

use super::shader::{MlaReads, MlaStep, Shader};
use super::weights::Factor;
use super::{cube_tensor, empty, float};

/// The most heads one attention workgroup serves (its scores sit in workgroup memory, its sums in
/// registers).
const MAX_GROUP: usize = 8;

/// Heads per attention workgroup: the largest divisor of `heads` up to [`MAX_GROUP`], so that every
/// workgroup reads the cache once for that many heads.
fn head_group(heads: usize) -> usize {
    (1..=MAX_GROUP.min(heads))
        .rev()
        .find(|g| heads.is_multiple_of(*g))
        .unwrap_or(1)
}

/// One binding of an MLA kernel.
enum Arg<'a> {
    /// A buffer burn's runtime owns.
    Buffer(&'a Handle),
    /// A buffer whose first `bytes` the kernel reads from a uniform copy (native launches only).
    #[cfg(not(target_arch = "wasm32"))]
    Uniform(&'a Handle, usize),
    /// An absorbed factor.
    Factor(&'a FactorArg),
}

/// Where a kernel reads an absorbed factor.
#[allow(clippy::large_enum_variant)] // lives on the stack for one call
enum FactorArg {
    Buffer(CubeTensor),
    #[cfg(not(target_arch = "wasm32"))]
    Texture(std::sync::Arc<super::texture::WeightTexture>),
}

impl FactorArg {
    fn new(f: &Factor) -> Option<Self> {
        match f {
            Factor::Tensor(t) => Some(FactorArg::Buffer(cube_tensor(t).filter(|c| c.dtype == DType::F32)?)),
            #[cfg(not(target_arch = "wasm32"))]
            Factor::Texture { texture, .. } => Some(FactorArg::Texture(texture.clone())),
        }
    }

    /// Whether the kernel reads it from a texture, and in column order.
    fn reads(&self) -> (bool, bool) {
        match self {
            FactorArg::Buffer(_) => (false, false),
            #[cfg(not(target_arch = "wasm32"))]
            FactorArg::Texture(t) => (true, t.layout() == super::texture::Layout::Columns),
        }
    }

    /// `[row mask, layer shift]` of a texture, for the kernel's shape.
    fn placement(&self) -> [u32; 2] {
        match self {
            FactorArg::Buffer(_) => [0, 0],
            #[cfg(not(target_arch = "wasm32"))]
            FactorArg::Texture(t) => t.placement(),
        }
    }
}

/// Launches `shader` (entry `main`, 64 invocations) over `grid` with `args`: natively on moela's own path
/// (`texture::dispatch_at`), in a browser through CubeCL. `info[pos_word]` is the step's position. `None`
/// when it cannot run.
fn run(
    anchor: &CubeTensor,
    name: &'static str,
    shader: Shader,
    grid: [u32; 3],
    args: &[Arg],
    info: &[u32],
    pos_word: Option<usize>,
) -> Option<()> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use super::texture::{Bind, TextureKernel, dispatch_at};
        let binds: Vec<Bind> = args
            .iter()
            .map(|a| match a {
                Arg::Buffer(h) => Bind::Buffer(h),
                Arg::Uniform(h, bytes) => Bind::Uniform(h, *bytes),
                Arg::Factor(FactorArg::Buffer(c)) => Bind::Buffer(&c.handle),
                Arg::Factor(FactorArg::Texture(t)) => Bind::Texture(t),
            })
            .collect();
        let kernel = TextureKernel {
            name,
            entry: "main",
            shader,
        };
        dispatch_at(anchor, &kernel, grid, &binds, info, pos_word)
    }
    #[cfg(target_arch = "wasm32")]
    {
        let handles: Vec<&Handle> = args
            .iter()
            .map(|a| match a {
                Arg::Buffer(h) => *h,
                Arg::Factor(FactorArg::Buffer(c)) => &c.handle,
            })
            .collect();
        let kernel = super::WgslKernel::new(name, "main", shader, 64)?;
        super::launch_at(anchor, kernel, grid, &handles, info, pos_word);
        Some(())
    }
}

/// The most latent values per cached token the kernels hold in workgroup memory (`MAX_RANK`).
pub const MAX_RANK: usize = 1024;
/// The most values per cached token (`MAX_WIDTH`: latent + rope key).
pub const MAX_WIDTH: usize = 1152;
/// Cache positions one attention workgroup reads; longer contexts split over more workgroups.
pub const CHUNK: usize = 256;
/// The most tokens of one call: a sequence's few new tokens, or a batch of sequences' one each (the rows of a
/// decode step's products).
pub const MAX_TOKENS: usize = super::matvec::MAX_ROWS;
/// Merged latent values one `mla_output` workgroup holds (`CTX`): its tokens times the rank.
const OUTPUT_CTX: usize = 3584;

/// One attention block's sizes.
#[derive(Debug, Clone, Copy)]
pub struct MlaShape {
    /// n_h.
    pub num_attention_heads: usize,
    /// d_n (query/key dims without rope).
    pub qk_nope_head_dim: usize,
    /// d_r (rope dims).
    pub qk_rope_head_dim: usize,
    /// r_kv (latent rank).
    pub kv_lora_rank: usize,
    /// d_v.
    pub v_head_dim: usize,
    /// Softmax scale.
    pub scale: f64,
    /// `kv_a_layernorm`'s eps.
    pub eps: f64,
}

/// The weights and inputs of one decode attention call.
pub struct MlaInputs<'a> {
    /// Queries: columns `q_col..q_col + n_h * (d_n + d_r)` of rows `row..row + T`, rope dims unrotated.
    pub q: &'a Tensor<2>,
    /// The first query row in `q`, and of the rope tables.
    pub row: usize,
    /// T, the tokens of this call.
    pub rows: usize,
    /// The first query column in `q`.
    pub q_col: usize,
    /// `kv_a_proj_with_mqa` output: columns `kv_col..kv_col + r_kv + d_r` of rows `kv_row..kv_row + T`
    /// (latent before its norm, rope key unrotated). May be the same tensor as `q` (one product for both):
    /// no launch binds both, as WebGPU forbids binding a writable buffer twice.
    pub kv: &'a Tensor<2>,
    /// The first row in `kv`.
    pub kv_row: usize,
    /// The first latent column in `kv`.
    pub kv_col: usize,
    /// Absorbed `W_UK` `[n_h, d_n, r_kv]`.
    pub w_uk: &'a Factor,
    /// `W_UV^T` `[n_h, r_kv, d_v]`.
    pub w_uv_t: &'a Factor,
    /// `kv_a_layernorm`'s gain `[r_kv]`.
    pub gain: &'a Tensor<1>,
    /// Rope cos and sin tables `[rows, d_r / 2]`, rows `row..row + T` for the tokens' positions.
    pub tables: &'a (Tensor<2>, Tensor<2>),
}

/// Where one sequence's tokens go in attention: their first position and the cache of this layer
/// (`[max_context, r_kv + d_r]`).
pub struct RowAt<'a> {
    /// Position of the first token (tokens already cached).
    pub pos: usize,
    /// This layer's cache of the sequence.
    pub cache: &'a mut Tensor<2>,
}

/// Attention for the T tokens of `inp`: those of one sequence (`at` holds one [`RowAt`]: positions
/// `pos..pos + T`) or one token each of T sequences (`at[i]` for row `i`, each attending to its own cache
/// only). Writes the tokens' cache rows in place and returns the attention output `[T, n_h * d_v]` (before
/// `o_proj`). One launch makes the queries, reading `W_UK` once for all T tokens; one launch per token
/// makes its cache row and reads its sequence's cache; one launch merges and applies `W_UV`, read once
/// for all T tokens or once per two (as its workgroup memory allows). `None` when the kernels do not cover
/// the call, with the caches untouched (or, if a launch after the first failed, some tokens' rows written
/// as burn's path writes them again); the caller then runs burn's ops.
pub fn decode(inp: &MlaInputs, at: &mut [RowAt<'_>], s: &MlaShape) -> Option<Tensor<2>> {
    let [q_rows, qw] = inp.q.dims();
    let [kv_rows, kw] = inp.kv.dims();
    let t = inp.rows;
    let [table_rows, half] = inp.tables.0.dims();
    let width = s.kv_lora_rank + s.qk_rope_head_dim;
    let f32s = [inp.q.dtype(), inp.kv.dtype(), inp.gain.dtype()];
    // Tokens per sequence: all of them in one, or one in each.
    let each = if at.len() == 1 { t } else { 1 };
    if t == 0
        || t > MAX_TOKENS
        || (at.len() != 1 && at.len() != t)
        || s.num_attention_heads == 0
        || s.num_attention_heads >= 65_535
        || s.kv_lora_rank == 0
        || !s.qk_rope_head_dim.is_multiple_of(4)
        || !s.kv_lora_rank.is_multiple_of(4)
        || !s.v_head_dim.is_multiple_of(4)
        || s.kv_lora_rank > MAX_RANK
        || width > MAX_WIDTH
        || inp.q_col + s.num_attention_heads * (s.qk_nope_head_dim + s.qk_rope_head_dim) > qw
        || inp.row + t > q_rows
        || inp.kv_row + t > kv_rows
        || inp.kv_col + width > kw
        || inp.w_uk.dims() != [s.num_attention_heads, s.qk_nope_head_dim, s.kv_lora_rank]
        || inp.w_uv_t.dims() != [s.num_attention_heads, s.kv_lora_rank, s.v_head_dim]
        || inp.gain.dims() != [s.kv_lora_rank]
        || half != s.qk_rope_head_dim / 2
        || inp.tables.1.dims() != [table_rows, half]
        || inp.row + t > table_rows
        || at.iter().any(|a| {
            let [capacity, cw] = a.cache.dims();
            cw != width || a.pos + each > capacity || a.cache.dtype() != DType::F32
        })
        || f32s.iter().any(|d| *d != DType::F32)
    {
        return None;
    }
    // One chunk count for every sequence (the partial sums' layout, the merge); a sequence's chunks past
    // its positions are empty.
    let chunks = at.iter().map(|a| (a.pos + each).div_ceil(CHUNK)).max()?;
    if chunks > 65_535 {
        return None;
    }
    let q = cube_tensor(inp.q)?;
    let kv = cube_tensor(inp.kv)?;
    let w_uk = FactorArg::new(inp.w_uk)?;
    let w_uv = FactorArg::new(inp.w_uv_t)?;
    let gain = cube_tensor(inp.gain)?;
    let cos = cube_tensor(&inp.tables.0)?;
    let sin = cube_tensor(&inp.tables.1)?;
    let caches = at
        .iter_mut()
        .map(|a| own_buffer(a.cache))
        .collect::<Option<Vec<CubeTensor>>>()?;

    let group = head_group(s.num_attention_heads);
    // Token slots per workgroup of the queries: a power of two, all T tokens. Of the output: all T where
    // eight fit its workgroup memory, else two (four-slot workgroups ran several times slower than two- or
    // eight-slot ones on lavapipe, for the same work).
    let slots = t.next_power_of_two();
    let out_slots = match slots {
        1 => 1,
        8 if 8 * s.kv_lora_rank <= OUTPUT_CTX => 8,
        _ => 2,
    };
    let reads = |step: MlaStep, factor: &FactorArg, uniform: bool, rows: usize| {
        let (texture, columns) = factor.reads();
        let reads = MlaReads {
            texture,
            columns,
            uniform,
            group,
            rows,
        };
        Shader::Mla { step, reads }
    };
    let kv_off = (inp.kv_row * kw + inp.kv_col) as u32;

    // 1. Absorbed queries.
    let query = empty(&q, t * s.num_attention_heads * width);
    let q_bytes = q.meta.num_elements() * 4;
    let mut info = vec![
        s.num_attention_heads as u32,
        s.qk_nope_head_dim as u32,
        s.qk_rope_head_dim as u32,
        s.kv_lora_rank as u32,
        qw as u32,
        (inp.row * qw + inp.q_col) as u32,
    ];
    info.extend(w_uk.placement());
    info.extend([inp.row as u32, t as u32, 0, 0]);
    let args = [
        input(&q.handle, q_bytes),
        Arg::Factor(&w_uk),
        Arg::Buffer(&cos.handle),
        Arg::Buffer(&sin.handle),
        Arg::Buffer(&query),
    ];
    let shader = reads(MlaStep::Query, &w_uk, uniform(q_bytes), slots);
    run(
        &q,
        "mla_query",
        shader,
        [s.num_attention_heads as u32, 1, 1],
        &args,
        &info,
        None,
    )?;

    // 2. Per token, in order: its cache row, then the scores over its sequence's cache and the weighted
    // latents, per chunk of positions; info[3] is the position.
    let partial = empty(&q, t * s.num_attention_heads * chunks * (s.kv_lora_rank + 2));
    let query_bytes = t * s.num_attention_heads * width * 4;
    let shader = reads(MlaStep::Attend, &w_uk, uniform(query_bytes), 1);
    for i in 0..t {
        // Token i: the i-th of the one sequence, or the only one of sequence i.
        let (seq, pos) = match at.len() {
            1 => (0, at[0].pos + i),
            _ => (i, at[i].pos),
        };
        #[cfg(not(target_arch = "wasm32"))]
        super::replay::at_row(seq);
        let info = [
            s.num_attention_heads as u32,
            s.kv_lora_rank as u32,
            width as u32,
            pos as u32,
            chunks as u32,
            (s.scale as f32).to_bits(),
            i as u32,
            0,
            (s.eps as f32).to_bits(),
            kw as u32,
            kv_off,
            inp.row as u32,
        ];
        let args = [
            input(&query, query_bytes),
            Arg::Buffer(&caches[seq].handle),
            Arg::Buffer(&partial),
            Arg::Buffer(&kv.handle),
            Arg::Buffer(&gain.handle),
            Arg::Buffer(&cos.handle),
            Arg::Buffer(&sin.handle),
        ];
        let grid = [chunks as u32, (s.num_attention_heads / group) as u32, 1];
        let done = run(&q, "mla_attend", shader, grid, &args, &info, Some(3));
        // The chunk count (grid, partial sums, merge) holds for this token's positions that need no more
        // chunks, and (where it sets the count) need as many.
        #[cfg(not(target_arch = "wasm32"))]
        {
            let capacity = at[seq].cache.dims()[0];
            let low = if (pos + 1).div_ceil(CHUNK) == chunks {
                (chunks - 1) * CHUNK
            } else {
                0
            };
            super::replay::serves_positions(low..(chunks * CHUNK).min(capacity));
            super::replay::at_row(0);
        }
        done?;
    }

    // 3. The chunks merged, then W_UV.
    let out = empty(&q, t * s.num_attention_heads * s.v_head_dim);
    let mut info = vec![
        s.num_attention_heads as u32,
        s.kv_lora_rank as u32,
        s.v_head_dim as u32,
        chunks as u32,
    ];
    info.extend(w_uv.placement());
    info.extend([t as u32, 0]);
    let args = [Arg::Buffer(&partial), Arg::Factor(&w_uv), Arg::Buffer(&out)];
    run(
        &q,
        "mla_output",
        reads(MlaStep::Output, &w_uv, false, out_slots),
        [s.num_attention_heads as u32, t.div_ceil(out_slots) as u32, 1],
        &args,
        &info,
        None,
    )?;
    Some(float(&q, out, [t, s.num_attention_heads * s.v_head_dim]))
}

/// The buffer of a cache layer, which the kernels write in place: only when this tensor is its buffer's
/// sole owner (else `None`, the tensor unchanged).
fn own_buffer(layer: &mut Tensor<2>) -> Option<CubeTensor> {
    layer.clone().try_into_primitive::<burn_cubecl::Cube>().ok()?;
    let mut cache = None;
    layer.inplace(|c| {
        let p = c
            .try_into_primitive::<burn_cubecl::Cube>()
            .expect("the same tensor converted just above");
        if p.client.name().contains("wgsl") && p.is_contiguous() && p.can_mut() {
            cache = Some(p.clone());
        }
        Tensor::from_primitive::<burn_cubecl::Cube>(p)
    });
    cache
}

/// Whether a kernel input of `bytes` is read from a uniform copy: natively where it fits.
fn uniform(bytes: usize) -> bool {
    #[cfg(not(target_arch = "wasm32"))]
    return bytes <= super::texture::UNIFORM_BYTES && !storage_queries();
    #[cfg(target_arch = "wasm32")]
    return {
        let _ = bytes;
        false
    };
}

/// A kernel input of `bytes`, from a uniform copy where [`uniform`] says so.
fn input(h: &Handle, bytes: usize) -> Arg<'_> {
    #[cfg(not(target_arch = "wasm32"))]
    if uniform(bytes) {
        return Arg::Uniform(h, bytes);
    }
    let _ = bytes;
    Arg::Buffer(h)
}

#[cfg(test)]
std::thread_local! {
    /// Set by tests: this thread's attention reads its queries from a storage buffer (the browser's path)
    /// even where a uniform copy would do.
    pub(crate) static STORAGE_QUERIES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether attention on this thread must read its queries from a storage buffer (only tests ask).
#[cfg(not(target_arch = "wasm32"))]
fn storage_queries() -> bool {
    #[cfg(test)]
    return STORAGE_QUERIES.get();
    #[cfg(not(test))]
    false
}
