// MLA decode, step 2 of 3: attention in latent space over the cache, split over chunks of positions
// (flash-decoding). Workgroup (c, h, t) reads cache rows c * chunk .. (c + 1) * chunk that token t may see
// (positions up to pos + t) once, scores them against query[t, h] (score = scale * query . [c' | k_pe]), and
// keeps an online softmax: the running maximum m, the running sum l of exp(score - m), and the
// exp-weighted sum of the latents c'. It writes [acc (rank values) | m | l]; mla_output merges the chunks.
//
// Bindings: query [T, heads, width], cache [capacity, width], partial [T, heads, chunks, rank + 2], then
// the shape.

@group(0) @binding(0) var<storage, read_write> query: array<f32>;
@group(0) @binding(1) var<storage, read_write> cache: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;

struct Shape {
    heads: u32,
    rank: u32,
    width: u32,
    pos: u32,
    chunk: u32,
    chunks: u32,
    scale: f32,
    _pad0: u32,
}
@group(0) @binding(3) var<uniform> shape: Shape;

const WG: u32 = 64u;
const MAX_WIDTH: u32 = 1152u;
const MAX_RANK: u32 = 1024u;
const LOW: f32 = -3.0e38;

var<workgroup> qs: array<f32, MAX_WIDTH>;
var<workgroup> p: array<f32, WG>;
var<workgroup> acc: array<f32, MAX_RANK>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wid.x;
    let h = wid.y;
    let t = wid.z;
    let width = shape.width;
    let rank = shape.rank;
    let start = c * shape.chunk;
    let end = min(start + shape.chunk, shape.pos + t + 1u);

    let qb = (t * shape.heads + h) * width;
    for (var i = lid; i < width; i += WG) {
        qs[i] = query[qb + i] * shape.scale;
    }
    for (var r = lid; r < rank; r += WG) {
        acc[r] = 0.0;
    }
    workgroupBarrier();

    var m = LOW;
    var l = 0.0;
    for (var j0 = start; j0 < end; j0 += WG) {
        let j = j0 + lid;
        var s = LOW;
        if (j < end) {
            s = 0.0;
            let kb = j * width;
            for (var i = 0u; i < width; i++) {
                s = fma(qs[i], cache[kb + i], s);
            }
        }
        p[lid] = s;
        workgroupBarrier();
        var tile = LOW;
        for (var u = 0u; u < WG; u++) {
            tile = max(tile, p[u]);
        }
        workgroupBarrier();
        let next = max(m, tile);
        let corr = exp(m - next);
        var e = 0.0;
        if (j < end) {
            e = exp(s - next);
        }
        p[lid] = e;
        workgroupBarrier();
        let n = min(WG, end - j0);
        var sum = 0.0;
        for (var u = 0u; u < n; u++) {
            sum += p[u];
        }
        l = l * corr + sum;
        m = next;
        for (var r = lid; r < rank; r += WG) {
            var a = acc[r] * corr;
            for (var u = 0u; u < n; u++) {
                a = fma(p[u], cache[(j0 + u) * width + r], a);
            }
            acc[r] = a;
        }
        workgroupBarrier();
    }

    let pb = ((t * shape.heads + h) * shape.chunks + c) * (rank + 2u);
    for (var r = lid; r < rank; r += WG) {
        partial[pb + r] = acc[r];
    }
    if (lid == 0u) {
        partial[pb + rank] = m;
        partial[pb + rank + 1u] = l;
    }
}
