// The (token, slot) pairs of a MoE block sorted by the expert they chose, in tiles of up to `rows` pairs
// of one expert (prefill: the grouped expert products then read each expert's weights once per tile
// instead of once per pair). A counting sort in one workgroup: per-expert counts (workgroup atomics), a
// scan of the counts and of the tiles they make, each expert's tiles, then the pairs scattered to their
// expert's range. The order of the pairs inside one expert's range follows the atomics and may differ
// between runs; nothing computed from a tile depends on it (each pair's row is its own sum).
//
// The plan written: `tiles` entries of four values (expert, first position in the order, pairs in the
// tile, 0; the entries past the last tile hold zero pairs), then the order: `pairs` pair indices, grouped
// by expert in increasing expert order. Pairs whose expert is outside 0..experts go to one more bucket
// after the last expert (expert id `experts`, inside no chunk): their tiles write zeros in a new output.
//
// Bindings: idx [P] i32 (each pair's expert), plan [4 * tiles + P] i32, then the shape.

@group(0) @binding(0) var<storage, read_write> idx: array<i32>;
@group(0) @binding(1) var<storage, read_write> plan: array<i32>;

struct Shape {
    pairs: u32,
    experts: u32,  // at most MAX_EXPERTS - 1 (one more bucket takes the ids outside 0..experts)
    tiles: u32,    // tile entries in the plan: at least pairs / rows + experts + 1
    rows: u32,     // pairs per tile at most
}
@group(0) @binding(2) var<uniform> shape: Shape;

const WG: u32 = 256u;
const MAX_EXPERTS: u32 = 1024u;

// The bucket of expert id e: e itself, or `experts` for an id outside 0..experts.
fn bucket(e: i32) -> u32 {
    return select(shape.experts, u32(e), e >= 0 && u32(e) < shape.experts);
}

// Per bucket: its pair count, then (from the scan on) the next free position of its range.
var<workgroup> counts: array<atomic<u32>, MAX_EXPERTS>;
// Per invocation: (pairs, tiles) of the experts it owns, scanned.
var<workgroup> scan: array<vec2<u32>, WG>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
    let e_n = shape.experts + 1u;
    let r = shape.rows;
    for (var e = lid; e < e_n; e += WG) {
        atomicStore(&counts[e], 0u);
    }
    workgroupBarrier();
    for (var p = lid; p < shape.pairs; p += WG) {
        atomicAdd(&counts[bucket(idx[p])], 1u);
    }
    workgroupBarrier();

    // Invocation lid owns buckets lo..hi: their pairs and tiles, then an inclusive scan over invocations.
    let per = (e_n + WG - 1u) / WG;
    let lo = min(lid * per, e_n);
    let hi = min(lo + per, e_n);
    var own = vec2<u32>(0u);
    for (var e = lo; e < hi; e++) {
        let c = atomicLoad(&counts[e]);
        own += vec2<u32>(c, (c + r - 1u) / r);
    }
    scan[lid] = own;
    workgroupBarrier();
    for (var d = 1u; d < WG; d *= 2u) {
        var v = scan[lid];
        if (lid >= d) {
            v += scan[lid - d];
        }
        workgroupBarrier();
        scan[lid] = v;
        workgroupBarrier();
    }
    let used = scan[WG - 1u].y;

    // This invocation's buckets start where the invocations before it end.
    var at = scan[lid] - own;
    for (var e = lo; e < hi; e++) {
        let c = atomicLoad(&counts[e]);
        for (var s = 0u; s < c; s += r) {
            let t = 4u * at.y;
            plan[t] = i32(e);
            plan[t + 1u] = i32(at.x + s);
            plan[t + 2u] = i32(min(r, c - s));
            plan[t + 3u] = 0;
            at.y += 1u;
        }
        atomicStore(&counts[e], at.x);
        at.x += c;
    }
    for (var t = used + lid; t < shape.tiles; t += WG) {
        plan[4u * t] = 0;
        plan[4u * t + 1u] = 0;
        plan[4u * t + 2u] = 0;
        plan[4u * t + 3u] = 0;
    }
    workgroupBarrier();

    let order = 4u * shape.tiles;
    for (var p = lid; p < shape.pairs; p += WG) {
        plan[order + atomicAdd(&counts[bucket(idx[p])], 1u)] = i32(p);
    }
}
