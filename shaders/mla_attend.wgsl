// MLA decode, step 2 of 3: attention in latent space over the cache, split over chunks of positions
// (flash-decoding). Workgroup (c, h, t) reads cache rows c * chunk .. (c + 1) * chunk that token t may see
// (positions up to pos + t) once, scores them against query[t, h] (score = scale * query . [c' | k_pe]), and
// keeps an online softmax: the running maximum m, the running sum l of exp(score - m), and the
// exp-weighted sum of the latents c'. It writes [acc (rank values) | m | l]; mla_output merges the chunks.
//
// Bindings: query [T, heads, width], cache [capacity, width] (both read as vec4), partial
// [T, heads, chunks, rank + 2], then the shape.

@group(0) @binding(0) var<storage, read_write> query: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> cache: array<vec4<f32>>;
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

var<workgroup> qs: array<vec4<f32>, MAX_WIDTH / 4u>;
var<workgroup> p: array<f32, WG>;
var<workgroup> acc: array<vec4<f32>, MAX_RANK / 4u>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wid.x;
    let h = wid.y;
    let t = wid.z;
    let width = shape.width;
    let rank = shape.rank;
    let start = c * shape.chunk;
    let end = min(start + shape.chunk, shape.pos + t + 1u);

    // Rows are read as vec4 (width and rank are multiples of 4): a quarter of the loads.
    let w4 = width / 4u;
    let r4n = rank / 4u;
    let qb = (t * shape.heads + h) * w4;
    for (var i = lid; i < w4; i += WG) {
        qs[i] = query[qb + i] * shape.scale;
    }
    for (var r = lid; r < r4n; r += WG) {
        acc[r] = vec4<f32>(0.0);
    }
    workgroupBarrier();

    var m = LOW;
    var l = 0.0;
    for (var j0 = start; j0 < end; j0 += WG) {
        let j = j0 + lid;
        var s = LOW;
        if (j < end) {
            s = 0.0;
            let kb = j * w4;
            for (var i = 0u; i < w4; i++) {
                s += dot(qs[i], cache[kb + i]);
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
        for (var r = lid; r < r4n; r += WG) {
            var a = acc[r] * corr;
            for (var u = 0u; u < n; u++) {
                a = fma(vec4<f32>(p[u]), cache[(j0 + u) * w4 + r], a);
            }
            acc[r] = a;
        }
        workgroupBarrier();
    }

    let pb = ((t * shape.heads + h) * shape.chunks + c) * (rank + 2u);
    for (var r = lid; r < r4n; r += WG) {
        let a = acc[r];
        partial[pb + 4u * r] = a.x;
        partial[pb + 4u * r + 1u] = a.y;
        partial[pb + 4u * r + 2u] = a.z;
        partial[pb + 4u * r + 3u] = a.w;
    }
    if (lid == 0u) {
        partial[pb + rank] = m;
        partial[pb + rank + 1u] = l;
    }
}
