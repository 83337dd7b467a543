//! `shaders/moe_matvec.wgsl`: products with only the experts the router chose (MoE decode), reading their
//! weights where they are stored instead of gathering copies of them; `shaders/moe_route.wgsl`: the
//! router's choice; `shaders/moe_sort.wgsl`: the chosen (token, slot) pairs sorted by expert into tiles
//! ([`Plan`]), so that prefill's grouped products read each expert's weights once per tile of pairs.

use burn::tensor::{DType, Int, Tensor};
use burn_cubecl::tensor::CubeTensor;

use super::matvec::MAX_ROWS;
use super::shader::{RouterProduct, Shader};
use super::{WgslKernel, cube_int_tensor, cube_tensor, empty, float, grid, launch, wrap};

const WORKGROUP: u32 = 64;

/// Groups of four outputs per invocation of the f32 expert products: 4 in the grouped entry (prefill)
/// where N/4 allows, so each x value read serves 16 outputs, else 1.
fn f32_columns(entry: &str, n4: usize) -> usize {
    if entry == "grouped" && n4.is_multiple_of(4) {
        4
    } else {
        1
    }
}

/// Pairs per tile of a [`Plan`]: the rows a grouped product serves with one read of an expert's weights.
pub const TILE_PAIRS: usize = MAX_ROWS;
/// The sort's buckets (`shaders/moe_sort.wgsl`'s workgroup counters): the experts, routed and shared, and
/// one for ids outside them.
pub const MAX_SORTED_EXPERTS: usize = 1024;

/// The most routed experts the selection kernel takes (each of its 64 invocations scans E / 64 of them per pick).
pub const MAX_EXPERTS: usize = 512;
/// The most expert groups it ranks (one invocation each).
pub const MAX_GROUPS: usize = 64;

/// How the router picks experts, as `shaders/moe_route.wgsl` reads it.
#[derive(Debug, Clone, Copy)]
pub struct RouteShape {
    /// K, experts per token.
    pub top_k: usize,
    /// 0 greedy, 1 group-limited greedy (groups by their best score), 2 noaux_tc (by their best two).
    pub method: u32,
    /// Sigmoid scores (else softmax).
    pub sigmoid: bool,
    /// Expert groups.
    pub groups: usize,
    /// Groups kept.
    pub keep_groups: usize,
    /// Divide the K weights by their sum.
    pub normalise: bool,
    /// Multiplies the weights last.
    pub factor: f64,
    /// Slots appended to each token's choice: experts `E..E + extra` at weight 1 (shared experts stacked
    /// after the routed ones).
    pub extra: usize,
}

/// Where the router's logits come from.
#[derive(Debug, Clone, Copy)]
pub enum Logits<'a> {
    /// Computed already, `[T, E]`.
    Given(&'a Tensor<2>),
    /// Computed by the routing kernel itself: `x` `[T, H]` times the router weight `[H, E]` (f32), one
    /// launch fewer.
    Product {
        /// The normed hidden states.
        x: &'a Tensor<2>,
        /// The router weight, stored `[in, out]`.
        router: &'a Tensor<2>,
    },
}

/// The router's choice from its logits (and the correction bias `[E]` of noaux_tc): expert ids `[T, K +
/// extra]` and mixing weights `[T, K + extra]` (see [`RouteShape::extra`]), on the GPU. `None` when the
/// kernel does not cover the call.
pub fn route(logits: Logits, bias: Option<&Tensor<1>>, shape: &RouteShape) -> Option<(Tensor<2, Int>, Tensor<2>)> {
    let (t, e, product) = match logits {
        Logits::Given(l) => {
            let [t, e] = l.dims();
            (t, e, None)
        }
        Logits::Product { x, router } => {
            let ([t, h], [h2, e]) = (x.dims(), router.dims());
            if h != h2 || h == 0 || x.dtype() != DType::F32 || router.dtype() != DType::F32 {
                return None;
            }
            (t, e, Some((x, router, h)))
        }
    };
    let k = shape.top_k;
    if t == 0
        || t > 65_535
        || e == 0
        || e > MAX_EXPERTS
        || k == 0
        || k > e
        || shape.groups == 0
        || shape.groups > MAX_GROUPS
        || !e.is_multiple_of(shape.groups)
        || shape.keep_groups == 0
        || matches!(logits, Logits::Given(l) if l.dtype() != DType::F32)
        || bias.is_some_and(|b| b.dims() != [e] || b.dtype() != DType::F32)
    {
        return None;
    }
    let (l, product) = match (logits, product) {
        (Logits::Given(l), _) => (cube_tensor(l)?, None),
        (_, Some((x, router, h))) => {
            let (x, router) = (cube_tensor(x)?, cube_tensor(router)?);
            let l = empty(&x, t * e);
            (wrap(&x, l, &[t, e], DType::F32), Some((x, router, h)))
        }
        _ => return None,
    };
    let b = match bias {
        Some(b) => Some(cube_tensor(b)?),
        None => None,
    };
    let router = match &product {
        None => RouterProduct::None,
        Some((_, _, h)) if h.is_multiple_of(4) && e.is_multiple_of(4) => RouterProduct::Vec4,
        Some(_) => RouterProduct::Scalar,
    };
    let shader = Shader::Route {
        product: router,
        bias: b.is_some(),
    };
    let kernel = WgslKernel::new("moe_route", "main", shader, 64)?;
    let slots = k + shape.extra;
    let (idx, w) = (empty(&l, t * slots), empty(&l, t * slots));
    let info = [
        e as u32,
        k as u32,
        shape.method,
        u32::from(shape.sigmoid),
        shape.groups as u32,
        shape.keep_groups as u32,
        u32::from(shape.normalise),
        (shape.factor as f32).to_bits(),
        product.as_ref().map_or(0, |p| p.2 as u32),
        shape.extra as u32,
    ];
    let mut buffers = vec![&l.handle, &idx, &w];
    if let Some((x, router, _)) = &product {
        buffers.extend([&x.handle, &router.handle]);
    }
    if let Some(b) = &b {
        buffers.push(&b.handle);
    }
    launch(&l, kernel, [t as u32, 1, 1], &buffers, &info);
    let idx = Tensor::<2, Int>::from_primitive::<burn_cubecl::Cube>(wrap(&l, idx, &[t, slots], DType::I32));
    Some((idx, float(&l, w, [t, slots])))
}

/// The (token, slot) pairs of a MoE block sorted by expert, in tiles of up to [`TILE_PAIRS`] pairs of one
/// expert, on the GPU (`shaders/moe_sort.wgsl`): what the products' `grouped` entry points read
/// ([`Pairs::Sorted`]) instead of one expert id per pair.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `tiles` entries of (expert, first position in the order, pairs, 0), then the pairs in expert order.
    pub(crate) table: Tensor<1, Int>,
    /// Tile entries: room for every tile the pairs can make (the unused ones hold zero pairs).
    pub(crate) tiles: usize,
    /// Pairs sorted.
    pub(crate) pairs: usize,
}

impl Plan {
    /// Where the pair order starts in the table (after the tiles' four values each).
    pub(crate) fn order_at(&self) -> u32 {
        4 * self.tiles as u32
    }
}

/// Sorts the pairs of `idx` (`[P]`, each pair's expert among `0..experts`; any other id is sorted after
/// them, into no chunk's range) by expert into a [`Plan`], in one launch; `None` when the kernel does not
/// cover the call (`experts` not below [`MAX_SORTED_EXPERTS`], or more tiles than one launch's workgroup
/// rows).
pub fn sort(idx: &Tensor<1, Int>, experts: usize) -> Option<Plan> {
    let [pairs] = idx.dims();
    // Each expert (and the bucket of ids outside 0..experts) adds at most one partly filled tile to the
    // full ones.
    let tiles = pairs / TILE_PAIRS + (experts + 1).min(pairs);
    if pairs == 0 || experts == 0 || experts >= MAX_SORTED_EXPERTS || tiles > 65_535 {
        return None;
    }
    let idx = cube_int_tensor(idx).filter(|t| t.dtype == DType::I32)?;
    let kernel = WgslKernel::new("moe_sort", "main", Shader::Sort, 256)?;
    let table = empty(&idx, 4 * tiles + pairs);
    let info = [pairs, experts, tiles, TILE_PAIRS].map(|v| v as u32);
    launch(&idx, kernel, [1, 1, 1], &[&idx.handle, &table], &info);
    let table = wrap(&idx, table, &[4 * tiles + pairs], DType::I32);
    Some(Plan {
        table: Tensor::<1, Int>::from_primitive::<burn_cubecl::Cube>(table),
        tiles,
        pairs,
    })
}

/// The MoE block's output from the gathered down projections `routed` (`[T * K, H]`, one row per
/// (token, slot) pair) and their weights `[T, K]`: `base + sum_k weight[t, k] * routed[t * K + k]`, with
/// `base` the shared experts' output `[T, H]` when the model has them. `None` when the kernel does not
/// cover the call.
pub fn combine(routed: &Tensor<2>, weight: &Tensor<2>, base: Option<&Tensor<2>>) -> Option<Tensor<2>> {
    let [t, k] = weight.dims();
    let [pairs, h] = routed.dims();
    let total = t * h;
    if pairs != t * k
        || total == 0
        || total > u32::MAX as usize
        || routed.dtype() != DType::F32
        || weight.dtype() != DType::F32
        || base.is_some_and(|b| b.dims() != [t, h] || b.dtype() != DType::F32)
    {
        return None;
    }
    let groups = grid(total)?;
    let (r, w) = (cube_tensor(routed)?, cube_tensor(weight)?);
    let b = match base {
        Some(b) => Some(cube_tensor(b)?),
        None => None,
    };
    let kernel = WgslKernel::new("moe_combine", "main", Shader::Combine { base: b.is_some() }, 64)?;
    let out = empty(&r, total);
    let info = [h as u32, k as u32, total as u32];
    match &b {
        Some(b) => launch(&r, kernel, groups, &[&r.handle, &w.handle, &out, &b.handle], &info),
        None => launch(&r, kernel, groups, &[&r.handle, &w.handle, &out], &info),
    }
    Some(float(&r, out, [t, h]))
}

/// The (token, slot) pairs an expert product runs over.
#[derive(Debug, Clone, Copy)]
pub enum Pairs<'a> {
    /// Each pair's expert id (`[P]`, i32): each pair reads its expert's weights (decode; at most 65535
    /// pairs).
    Each(&'a Tensor<1, Int>),
    /// The pairs sorted by expert into tiles ([`sort`]): each tile reads its expert's weights once for all
    /// its pairs (prefill).
    Sorted(&'a Plan),
    /// Each pair's expert id (`[P]`, i32) for the pairs of `tokens` tokens (up to [`MAX_ROWS`]: a batch's
    /// decode step): the block-quantised products (q8, q4 and the GGUF formats) find each expert's pairs
    /// in the kernel and read its weights once for every [`MAX_ROWS`] of them, where
    /// [`Each`](Self::Each) reads them once per pair; other products, and more tokens, take them as
    /// `Each`. The kernel scans the pairs from each pair's row, hence the few tokens.
    Collected(&'a Tensor<1, Int>, usize),
}

/// How a launch over [`Pairs`] runs: the shaders' `gathered`, `grouped` or `collected` entry point.
pub(crate) struct PairLaunch {
    /// The entry point.
    pub entry: &'static str,
    /// The pairs' experts, or the plan.
    pub table: CubeTensor,
    /// Workgroup rows: one per pair, or one per tile.
    pub groups: u32,
    /// Rows of x one workgroup row multiplies at most: 1, or [`TILE_PAIRS`] (= [`MAX_ROWS`]).
    pub rows: usize,
    /// Where the plan's pair order starts (the shape's `order`; 0 for [`Pairs::Each`]).
    pub order: u32,
}

impl Pairs<'_> {
    /// Pairs in all (P): the rows of the product's output.
    pub fn len(&self) -> usize {
        match self {
            Pairs::Each(idx) | Pairs::Collected(idx, _) => idx.dims()[0],
            Pairs::Sorted(plan) => plan.pairs,
        }
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The launch over these pairs, or `None` when a launch cannot take them (too many pairs for one
    /// launch's workgroup rows, ids not i32, not on a WGSL device). `collect`: the kernel has the
    /// `collected` entry (the packed products); without it, [`Pairs::Collected`] runs as [`Pairs::Each`].
    pub(crate) fn launch(&self, collect: bool) -> Option<PairLaunch> {
        let (entry, table, groups, rows, order) = match (self, collect) {
            // One variant of MAX_ROWS rows for every batch: its branch by pair count runs only the rows an
            // expert has (on lavapipe, variants of 2 or 4 rows with SwiGLU ran q4 at half speed).
            (Pairs::Collected(idx, tokens), true) if (1..=MAX_ROWS).contains(tokens) => {
                ("collected", *idx, idx.dims()[0], MAX_ROWS, 0)
            }
            (Pairs::Each(idx) | Pairs::Collected(idx, _), _) => ("gathered", *idx, idx.dims()[0], 1, 0),
            (Pairs::Sorted(plan), _) => ("grouped", &plan.table, plan.tiles, TILE_PAIRS, plan.order_at()),
        };
        let groups = u32::try_from(groups).ok().filter(|&g| g <= 65_535)?;
        let table = cube_int_tensor(table).filter(|t| t.dtype == DType::I32)?;
        Some(PairLaunch {
            entry,
            table,
            groups,
            rows,
            order,
        })
    }
}

/// For each pair `p` of `pairs` choosing expert `e`, `x[p / x_div] @ w[e - first]`: `x` is `[rows, K]`,
/// `w` one chunk of stacked experts `[count, K, N]` (f32, N a multiple of 4) holding experts
/// `first..first + count`. Pairs choosing an expert outside the chunk get zeros in a new output, or,
/// written `into` the output of another chunk's launch (`[P, N]`), keep what it holds. Returns `[P, N]`,
/// or `None` when the kernel does not cover the call.
pub fn gathered_matvec(
    x: &Tensor<2>,
    w: &Tensor<3>,
    pairs: Pairs,
    (first, x_div): (usize, usize),
    into: Option<&Tensor<2>>,
) -> Option<Tensor<2>> {
    let [rows, k] = x.dims();
    let [count, k2, n] = w.dims();
    let p = pairs.len();
    if p == 0
        || x_div == 0
        || p.div_ceil(x_div) > rows
        || k != k2
        || n % 4 != 0
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || into.is_some_and(|t| t.dims() != [p, n] || t.dtype() != DType::F32)
    {
        return None;
    }
    let l = pairs.launch(false)?;
    let cols = f32_columns(l.entry, n / 4);
    let groups = u32::try_from((n / 4).div_ceil(cols).div_ceil(WORKGROUP as usize)).ok()?;
    if groups > 65_535 {
        return None;
    }
    let (x, w) = (cube_tensor(x)?, cube_tensor(w)?);
    let out = match into {
        Some(t) => cube_tensor(t)?.handle,
        None => empty(&x, p * n),
    };
    let kernel = WgslKernel::new("moe_matvec", l.entry, Shader::ExpertMatvec { cols }, WORKGROUP)?;
    let keep = usize::from(into.is_some());
    let shape = [k, n / 4, first, count, x_div, keep, l.order as usize].map(|v| v as u32);
    launch(
        &x,
        kernel,
        [groups, l.groups, 1],
        &[&x.handle, &w.handle, &l.table.handle, &out],
        &shape,
    );
    Some(float(&x, out, [p, n]))
}

/// A MoE block's output from its gathered down projections `routed` (`[T * K, H]`), their router weights
/// `[T, K]` and the shared experts' output `base`: one launch of moela's kernel, else burn's ops.
pub fn mix(routed: Tensor<2>, weights: &Tensor<2>, base: Option<&Tensor<2>>) -> Tensor<2> {
    if let Some(out) = combine(&routed, weights, base) {
        return out;
    }
    let [t, k] = weights.dims();
    let h = routed.dims()[1];
    let mixed = (routed * weights.clone().reshape([t * k, 1]))
        .reshape([t, k, h])
        .sum_dim(1)
        .reshape([t, h]);
    match base {
        Some(b) => mixed + b.clone(),
        None => mixed,
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, TensorData};

    use super::*;
    use crate::gpu::worst_difference;

    #[test]
    fn matches_selected_burn_products_on_awkward_sizes() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        // 3 tokens, top-2 of experts 5..12 held in this chunk (ids outside it must give zeros).
        let (t, top, k, n, first, count) = (3, 2, 37, 52, 5, 7);
        let x = Tensor::<2>::random([t, k], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<3>::random([count, k, n], Distribution::Normal(0.0, 1.0), &device);
        let ids = vec![5i32, 11, 7, 2, 11, 9];
        let idx = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [t * top]), &device);
        let fast = gathered_matvec(&x, &w, Pairs::Each(&idx), (first, top), None).expect("the kernel covers this call");
        let rows: Vec<Tensor<2>> = ids
            .iter()
            .enumerate()
            .map(|(p, &e)| {
                let local = e as usize;
                if (first..first + count).contains(&local) {
                    let we = w.clone().narrow(0, local - first, 1).reshape([k, n]);
                    x.clone().narrow(0, p / top, 1).matmul(we)
                } else {
                    Tensor::zeros([1, n], &device)
                }
            })
            .collect();
        let worst = worst_difference(fast, Tensor::cat(rows, 0));
        assert!(worst < 1e-4, "worst difference {worst}");

        // One row per pair (the down projection).
        let xp = Tensor::<2>::random([t * top, k], Distribution::Normal(0.0, 1.0), &device);
        let fast = gathered_matvec(&xp, &w, Pairs::Each(&idx), (first, 1), None).unwrap();
        let p = 4; // expert 11
        let want = xp
            .clone()
            .narrow(0, p, 1)
            .matmul(w.clone().narrow(0, 11 - first, 1).reshape([k, n]));
        let worst = worst_difference(fast.clone().narrow(0, p, 1), want.clone());
        assert!(worst < 1e-4, "down: worst difference {worst}");

        // Experts 0..5 in a second stack, written into the same output: it fills the row the first launch
        // left at zero (pair 3, expert 2) and keeps the first launch's rows.
        let low = Tensor::<3>::random([first, k, n], Distribution::Normal(0.0, 1.0), &device);
        let both = gathered_matvec(&xp, &low, Pairs::Each(&idx), (0, 1), Some(&fast)).unwrap();
        let filled = xp.narrow(0, 3, 1).matmul(low.narrow(0, 2, 1).reshape([k, n]));
        assert!(
            worst_difference(both.clone().narrow(0, 3, 1), filled) < 1e-4,
            "second stack"
        );
        assert!(
            worst_difference(both.narrow(0, p, 1), want) < 1e-4,
            "a row of the first stack kept"
        );
    }

    /// The plan's tiles and order, read back: `(tiles as (expert, start, pairs), order)`.
    fn read_plan(plan: &Plan) -> (Vec<[i32; 3]>, Vec<i32>) {
        let table: Vec<i32> = plan.table.clone().into_data().iter::<i64>().map(|v| v as i32).collect();
        let (tiles, order) = table.split_at(4 * plan.tiles);
        let tiles = tiles.chunks(4).map(|t| [t[0], t[1], t[2]]).collect();
        (tiles, order.to_vec())
    }

    #[test]
    fn sort_tiles_every_pair_once_by_expert() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        // More pairs than the sort's 256 invocations, more experts than invocations (several per
        // invocation), experts with many pairs, with a few and with none, and ids outside 0..experts.
        for (pairs, experts) in [(1000, 300), (7, 3), (1, 1), (600, 1000)] {
            let ids: Vec<i32> = (0..pairs)
                .map(|q| match q % 11 {
                    0 => -1,
                    1 => experts as i32 + 4,
                    _ => ((q * q * 31 + 7) % (experts + experts / 2 + 1)).min(experts - 1) as i32,
                })
                .collect();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [pairs]), &device);
            let plan = sort(&idx, experts).expect("the sort covers this call");
            let (tiles, order) = read_plan(&plan);
            let mut seen = vec![false; pairs];
            let mut last = -1;
            let mut used = 0;
            for [e, start, n] in tiles {
                if n == 0 {
                    continue;
                }
                used += 1;
                assert!(e >= last, "tiles in expert order ({e} after {last})");
                last = e;
                assert!(n as usize <= TILE_PAIRS, "tile of {n} pairs");
                for &q in &order[start as usize..(start + n) as usize] {
                    let q = q as usize;
                    assert!(!seen[q], "pair {q} in two tiles");
                    seen[q] = true;
                    let want = ids[q];
                    let bucket = if (0..experts as i32).contains(&want) {
                        want
                    } else {
                        experts as i32
                    };
                    assert_eq!(e, bucket, "pair {q} (expert {want}) in a tile of expert {e}");
                }
            }
            assert!(seen.iter().all(|&s| s), "{pairs} pairs: every pair in a tile");
            let mut counts = vec![0usize; experts + 1];
            for &e in &ids {
                counts[if (0..experts as i32).contains(&e) {
                    e as usize
                } else {
                    experts
                }] += 1;
            }
            let fewest: usize = counts.iter().map(|c| c.div_ceil(TILE_PAIRS)).sum();
            assert_eq!(used, fewest, "{pairs} pairs: tiles full but each expert's last");
        }
        let idx = Tensor::<1, Int>::from_data(TensorData::new(vec![0i32; 4], [4]), &device);
        assert!(
            sort(&idx, MAX_SORTED_EXPERTS).is_none(),
            "more experts than the sort's buckets"
        );
    }

    #[test]
    fn sorted_pairs_match_each_pair_in_f32() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        // 23 tokens, top-3 over two stacks (experts 0..4 and 4..9), id 9 inside neither (zeros).
        let (t, top, k, split, total) = (23, 3, 37, 4, 9);
        let pairs = t * top;
        let ids: Vec<i32> = (0..pairs).map(|q| ((q * 7 + q / 4) % 10) as i32).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [pairs]), &device);
        let plan = sort(&idx, total).expect("covered");
        // N/4 odd (one group of outputs per invocation) and a multiple of 4 (four in the grouped entry).
        for n in [52, 48] {
            let low = Tensor::<3>::random([split, k, n], Distribution::Normal(0.0, 1.0), &device);
            let high = Tensor::<3>::random([total - split, k, n], Distribution::Normal(0.0, 1.0), &device);
            for x_div in [top, 1] {
                let x = Tensor::<2>::random([pairs / x_div, k], Distribution::Normal(0.0, 1.0), &device);
                let both = |pairs: Pairs| {
                    let out = gathered_matvec(&x, &low, pairs, (0, x_div), None).expect("covered");
                    gathered_matvec(&x, &high, pairs, (split, x_div), Some(&out)).expect("covered")
                };
                let (fast, want) = (both(Pairs::Sorted(&plan)), both(Pairs::Each(&idx)));
                let rows: Vec<f32> = fast.clone().narrow(0, 4, 1).into_data().try_to_vec().unwrap();
                assert_eq!(ids[4], 9);
                assert!(rows.iter().all(|&v| v == 0.0), "a pair outside both stacks");
                let worst = worst_difference(fast, want);
                assert!(worst < 1e-5, "n {n} x_div {x_div}: worst difference {worst}");
            }
        }
    }

    #[test]
    fn combine_matches_weighted_sum_plus_shared() {
        let Ok(device) = crate::gpu::device::default_device() else {
            eprintln!("no GPU adapter: skipped");
            return;
        };
        let (t, k, h) = (3, 5, 37);
        let routed = Tensor::<2>::random([t * k, h], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<2>::random([t, k], Distribution::Normal(0.0, 1.0), &device);
        let shared = Tensor::<2>::random([t, h], Distribution::Normal(0.0, 1.0), &device);
        let mixed = (routed.clone() * w.clone().reshape([t * k, 1]))
            .reshape([t, k, h])
            .sum_dim(1)
            .reshape([t, h]);
        let fast = combine(&routed, &w, None).expect("the kernel covers this call");
        assert!(worst_difference(fast, mixed.clone()) < 1e-5);
        let fast = combine(&routed, &w, Some(&shared)).unwrap();
        assert!(worst_difference(fast, mixed + shared) < 1e-5);
    }
}
