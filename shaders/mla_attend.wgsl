// MLA decode, step 2 of 3: attention in latent space over the cache, split over chunks of positions
// (flash-decoding) and over groups of G heads. Workgroup (c, g, t) reads the cache rows c * CHUNK ..
// (c + 1) * CHUNK that token t may see (positions up to pos + t) once for all the heads of group g (the
// heads share the cache: MLA's one latent per token): it scores them against each head's query
// (score = scale * query[t, h] . [c' | k_pe]) into workgroup memory, takes each head's softmax over the
// chunk (its maximum m and sum l of exp(score - m)), then the exp-weighted sums of the latents c'. It writes
// [acc (rank values) | m | l] per head; mla_output merges the chunks. Lines in a `for H` loop are written once per
// head of the group, so each head's sums stay in registers.
//
// Bindings: query [T, heads, width] (a storage buffer, or in texture launches where it fits a uniform copy:
// QS / QU lines), cache [capacity, width] (read as vec4), partial [T, heads, chunks, rank + 2],
// then the shape.

{% if QS %}@group(0) @binding(0) var<storage, read_write> query: array<vec4<f32>>;{% endif %}
{% if QU %}@group(0) @binding(0) var<uniform> query: array<vec4<f32>, 4096>;{% endif %}
@group(0) @binding(1) var<storage, read_write> cache: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;

struct Shape {
    heads: u32,
    rank: u32,
    width: u32,
    pos: u32,
    chunks: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}
@group(0) @binding(3) var<uniform> shape: Shape;

const WG: u32 = 64u;
const CHUNK: u32 = 256u;
const G: u32 = {{G}}u;
const LOW: f32 = -3.0e38;

// Scores, then softmax weights, of the group's heads over the chunk's positions.
var<workgroup> weights: array<f32, G * CHUNK>;
// Per head of the group: the maximum score, then the sum of the weights.
var<workgroup> stats: array<f32, 2u * G>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wid.x;
    let h0 = wid.y * G;
    let t = wid.z;
    // Rows are read as vec4 (width and rank are multiples of 4).
    let w4 = shape.width / 4u;
    let r4n = shape.rank / 4u;
    let start = c * CHUNK;
    let end = min(start + CHUNK, shape.pos + t + 1u);
    let n = select(0u, end - start, end > start);
    let qb = (t * shape.heads + h0) * w4;

    // Invocation u scores positions start + u, start + u + 64, ...: each cache row is read once.
    for (var u = lid; u < n; u += WG) {
        let kb = (start + u) * w4;
{% for H in range(G) %}        var s{{H}} = 0.0;
{% endfor %}
        for (var i = 0u; i < w4; i++) {
            let k = cache[kb + i];
{% for H in range(G) %}            s{{H}} += dot(query[qb + {{H}}u * w4 + i], k);
{% endfor %}
        }
{% for H in range(G) %}        weights[{{H}}u * CHUNK + u] = s{{H}} * shape.scale;
{% endfor %}
    }
    workgroupBarrier();

    // Invocation h < G: the softmax of head h0 + h over the chunk.
    if (lid < G) {
        let b = lid * CHUNK;
        var m = LOW;
        for (var u = 0u; u < n; u++) {
            m = max(m, weights[b + u]);
        }
        var l = 0.0;
        for (var u = 0u; u < n; u++) {
            let e = exp(weights[b + u] - m);
            weights[b + u] = e;
            l += e;
        }
        stats[lid] = m;
        stats[G + lid] = l;
    }
    workgroupBarrier();

    // Invocation r: vec4 r of the latent's weighted sum, for every head of the group.
    let stride = shape.rank + 2u;
    for (var r = lid; r < r4n; r += WG) {
{% for H in range(G) %}        var a{{H}} = vec4<f32>(0.0);
{% endfor %}
        for (var u = 0u; u < n; u++) {
            let k = cache[(start + u) * w4 + r];
{% for H in range(G) %}            a{{H}} = fma(vec4<f32>(weights[{{H}}u * CHUNK + u]), k, a{{H}});
{% endfor %}
        }
{% for H in range(G) %}        let o{{H}} = ((t * shape.heads + h0 + {{H}}u) * shape.chunks + c) * stride + 4u * r;
{% endfor %}
{% for H in range(G) %}        partial[o{{H}}] = a{{H}}.x;
{% endfor %}
{% for H in range(G) %}        partial[o{{H}} + 1u] = a{{H}}.y;
{% endfor %}
{% for H in range(G) %}        partial[o{{H}} + 2u] = a{{H}}.z;
{% endfor %}
{% for H in range(G) %}        partial[o{{H}} + 3u] = a{{H}}.w;
{% endfor %}
    }
    if (lid < G) {
        let o = ((t * shape.heads + h0 + lid) * shape.chunks + c) * stride + shape.rank;
        partial[o] = stats[lid];
        partial[o + 1u] = stats[G + lid];
    }
}
