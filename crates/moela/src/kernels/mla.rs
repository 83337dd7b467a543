//! `shaders/mla_{query,attend,output}.wgsl`: MLA decode attention in latent space (absorbed queries,
//! flash-decoding over the latent cache, the value up-projection), three launches per layer.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use burn::tensor::{DType, Tensor};

use super::{WgslKernel, cube_tensor, empty, float, launch, launch_at, repeated, tagged};

const QUERY: &str = include_str!("../../../../shaders/mla_query.wgsl");
const ATTEND: &str = include_str!("../../../../shaders/mla_attend.wgsl");

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

/// `mla_attend.wgsl` for `group` heads per workgroup, with the queries from a uniform copy or a storage
/// buffer; written once per variant and process.
fn attend_source(group: usize, uniform: bool) -> &'static str {
    static VARIANTS: OnceLock<Mutex<HashMap<(usize, bool), &'static str>>> = OnceLock::new();
    let mut variants = VARIANTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    variants.entry((group, uniform)).or_insert_with(|| {
        let text = tagged(ATTEND, &[("QU", uniform), ("QS", !uniform)], &[("G", group)]);
        // At most 2 x MAX_GROUP variants: kept for the process's lifetime.
        Box::leak(repeated(&text, "{{H}}", group).into_boxed_str())
    })
}
const OUTPUT: &str = include_str!("../../../../shaders/mla_output.wgsl");

/// The most latent values per cached token the kernels hold in workgroup memory (`MAX_RANK`).
pub const MAX_RANK: usize = 1024;
/// The most values per cached token (`MAX_WIDTH`: latent + rope key).
pub const MAX_WIDTH: usize = 1152;
/// Cache positions one attention workgroup reads; longer contexts split over more workgroups.
pub const CHUNK: usize = 256;

/// One attention block's sizes.
#[derive(Debug, Clone, Copy)]
pub struct MlaShape {
    /// n_h.
    pub heads: usize,
    /// d_n (query/key dims without rope).
    pub nope: usize,
    /// d_r (rope dims).
    pub rope: usize,
    /// r_kv (latent rank).
    pub rank: usize,
    /// d_v.
    pub v: usize,
    /// Softmax scale.
    pub scale: f64,
    /// `kv_a_layernorm`'s eps.
    pub eps: f64,
}

/// The weights and inputs of one decode attention call.
pub struct MlaInputs<'a> {
    /// Queries: columns `q_col..q_col + n_h * (d_n + d_r)` of each row, rope dims unrotated.
    pub q: &'a Tensor<2>,
    /// The first query column in `q`.
    pub q_col: usize,
    /// `kv_a_proj_with_mqa` output: columns `kv_col..kv_col + r_kv + d_r` (latent before its norm, rope key
    /// unrotated). May be the same tensor as `q` (one product for both).
    pub kv: &'a Tensor<2>,
    /// The first latent column in `kv`.
    pub kv_col: usize,
    /// Absorbed `W_UK` `[n_h, d_n, r_kv]`.
    pub w_uk: &'a Tensor<3>,
    /// `W_UV^T` `[n_h, r_kv, d_v]`.
    pub w_uv_t: &'a Tensor<3>,
    /// `kv_a_layernorm`'s gain `[r_kv]`.
    pub gain: &'a Tensor<1>,
    /// Rope cos and sin tables `[T, d_r / 2]` for positions `pos..pos + T`.
    pub tables: &'a (Tensor<2>, Tensor<2>),
}

/// Attention for `T` tokens at positions `pos..pos + T` (`pos` = tokens already in `layer`, the cache of
/// this layer `[capacity, r_kv + d_r]`): writes their cache rows in place and returns the attention output
/// `[T, n_h * d_v]` (before `o_proj`). `None`, with the cache untouched, when the kernels do not cover the
/// call; the caller then runs burn's ops.
pub fn decode(inp: &MlaInputs, layer: &mut Tensor<2>, pos: usize, s: &MlaShape) -> Option<Tensor<2>> {
    let [t, qw] = inp.q.dims();
    let [t2, kw] = inp.kv.dims();
    let width = s.rank + s.rope;
    let [capacity, cw] = layer.dims();
    let f32s = [
        inp.q.dtype(),
        inp.kv.dtype(),
        inp.w_uk.dtype(),
        inp.w_uv_t.dtype(),
        inp.gain.dtype(),
    ];
    if t == 0
        || t > 65_535
        || s.heads == 0
        || s.heads >= 65_535
        || s.rank == 0
        || !s.rope.is_multiple_of(4)
        || !s.rank.is_multiple_of(4)
        || !s.v.is_multiple_of(4)
        || s.rank > MAX_RANK
        || width > MAX_WIDTH
        || inp.q_col + s.heads * (s.nope + s.rope) > qw
        || t2 != t
        || inp.kv_col + width > kw
        || inp.w_uk.dims() != [s.heads, s.nope, s.rank]
        || inp.w_uv_t.dims() != [s.heads, s.rank, s.v]
        || inp.gain.dims() != [s.rank]
        || inp.tables.0.dims() != [t, s.rope / 2]
        || inp.tables.1.dims() != [t, s.rope / 2]
        || cw != width
        || pos + t > capacity
        || layer.dtype() != DType::F32
        || f32s.iter().any(|d| *d != DType::F32)
    {
        return None;
    }
    let chunks = (pos + t).div_ceil(CHUNK);
    if chunks > 65_535 {
        return None;
    }
    let q = cube_tensor(inp.q)?;
    let kv = cube_tensor(inp.kv)?;
    let w_uk = cube_tensor(inp.w_uk)?;
    let w_uv = cube_tensor(inp.w_uv_t)?;
    let gain = cube_tensor(inp.gain)?;
    let cos = cube_tensor(&inp.tables.0)?;
    let sin = cube_tensor(&inp.tables.1)?;

    // The cache is written in place: only when this tensor is its buffer's sole owner.
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
    let cache = cache?;

    let query = empty(&q, t * s.heads * width);
    let kernel = |name, source| WgslKernel {
        name,
        entry: "main",
        source,
        variant: 0,
        workgroup: 64,
    };
    let info = [
        s.heads as u32,
        s.nope as u32,
        s.rope as u32,
        s.rank as u32,
        pos as u32,
        (s.eps as f32).to_bits(),
        qw as u32,
        inp.q_col as u32,
        kw as u32,
        inp.kv_col as u32,
    ];
    // info[4] is the position: a replayed step writes its own.
    launch_at(
        &q,
        kernel("mla_query", QUERY),
        [s.heads as u32 + 1, t as u32, 1],
        &[
            &q.handle,
            &kv.handle,
            &w_uk.handle,
            &gain.handle,
            &cos.handle,
            &sin.handle,
            &cache.handle,
            &query,
        ],
        &info,
        Some(4),
    );

    let partial = empty(&q, t * s.heads * chunks * (s.rank + 2));
    let info = [
        s.heads as u32,
        s.rank as u32,
        width as u32,
        pos as u32,
        chunks as u32,
        (s.scale as f32).to_bits(),
    ];
    // info[3] is the position.
    let group = head_group(s.heads);
    let grid = [chunks as u32, (s.heads / group) as u32, t as u32];
    let query_bytes = t * s.heads * width * 4;
    #[cfg(not(target_arch = "wasm32"))]
    let attended = query_bytes <= super::texture::UNIFORM_BYTES && !storage_queries() && {
        // Natively the queries are read from a uniform copy (one load for all invocations, not one each).
        use super::texture::{Bind, TextureKernel, dispatch_at};
        let kernel = TextureKernel {
            name: "mla_attend",
            entry: "main",
            source: attend_source(group, true),
        };
        let binds = [
            Bind::Uniform(&query, query_bytes),
            Bind::Buffer(&cache.handle),
            Bind::Buffer(&partial),
        ];
        dispatch_at(&q, &kernel, grid, &binds, &info, Some(3)).is_some()
    };
    #[cfg(target_arch = "wasm32")]
    let attended = false;
    if !attended {
        // CubeCL names a compiled kernel by its variant number: one per head group.
        let kernel = WgslKernel {
            variant: group as u32,
            ..kernel("mla_attend", attend_source(group, false))
        };
        launch_at(&q, kernel, grid, &[&query, &cache.handle, &partial], &info, Some(3));
    }
    // The chunk count (grid, partial buffer, merge) holds for the positions that give the same count.
    #[cfg(not(target_arch = "wasm32"))]
    super::replay::serves_positions(
        ((chunks - 1) * CHUNK + 1).saturating_sub(t)..(chunks * CHUNK).min(capacity) + 1 - t,
    );

    let out = empty(&q, t * s.heads * s.v);
    let info = [s.heads as u32, s.rank as u32, s.v as u32, chunks as u32];
    launch(
        &q,
        kernel("mla_output", OUTPUT),
        [s.heads as u32, t as u32, 1],
        &[&partial, &w_uv.handle, &out],
        &info,
    );
    Some(float(&q, out, [t, s.heads * s.v]))
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
