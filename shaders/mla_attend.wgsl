// MLA decode, step 2 of 3: one token's attention in latent space over its sequence's cache, split over
// chunks of positions (flash-decoding) and over groups of G heads. Workgroup (c, g) reads the cache rows
// c * CHUNK .. (c + 1) * CHUNK up to the token's position pos once for all the heads of group g (the heads
// share the cache: MLA's one latent per token): it scores them against each head's query (score = scale *
// query[row, h] . [c' | k_pe]) into workgroup memory, takes each head's softmax over the chunk (its maximum
// m and sum l of exp(score - m)), then the exp-weighted sums of the latents c'. It writes [acc (rank values)
// | m | l] per head; mla_output merges the chunks. A chunk past the token's position writes m = LOW, l = 0
// (so the tokens of a batch of sequences can share one chunk count). Lines in a `for H` loop are written
// once per head of the group, so each head's sums stay in registers.
//
// The launch also makes the token's cache row: the workgroups of the chunk that holds position pos compute
// it (kv_a_layernorm of the latent, eps from the shape, and the roped shared key: [c' | k_pe]; rope dims in
// half-split order, model/rope.rs) into workgroup memory and score it from there, and the first of them
// writes it into the cache. So each token takes one launch here and none before it (a sequence's several
// new tokens one launch each, in order, each reading the rows the ones before wrote).
//
// Bindings: query [T, heads, width] (a storage buffer, or in texture launches where it fits a uniform copy:
// QS / QU lines), cache [capacity, width] (read as vec4), partial [T, heads, chunks, rank + 2], kv
// (token t's kv_a_proj_with_mqa output, rank + rope values at t * kv_stride + kv_off), gain [rank],
// cos / sin [rows, rope / 2] (token t's row at table_row + t), then the shape.

{% if QS %}@group(0) @binding(0) var<storage, read_write> query: array<vec4<f32>>;{% endif %}
{% if QU %}@group(0) @binding(0) var<uniform> query: array<vec4<f32>, 4096>;{% endif %}
@group(0) @binding(1) var<storage, read_write> cache: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;
@group(0) @binding(3) var<storage, read_write> kv: array<f32>;
@group(0) @binding(4) var<storage, read_write> gain: array<f32>;
@group(0) @binding(5) var<storage, read_write> cos_t: array<f32>;
@group(0) @binding(6) var<storage, read_write> sin_t: array<f32>;

struct Shape {
    heads: u32,
    rank: u32,
    width: u32,
    pos: u32,
    chunks: u32,
    scale: f32,
    row: u32,       // the launch's token among the T of query and partial
    _pad0: u32,
    eps: f32,
    kv_stride: u32,
    kv_off: u32,    // token 0's first latent value in kv
    table_row: u32, // the rope tables' row of token 0
}
@group(0) @binding(7) var<uniform> shape: Shape;

const WG: u32 = 64u;
const CHUNK: u32 = 256u;
const G: u32 = {{G}}u;
const LOW: f32 = -3.0e38;
const MAX_WIDTH: u32 = 1152u;

// Scores, then softmax weights, of the group's heads over the chunk's positions (first the new row's sum of
// squares, for its norm).
var<workgroup> weights: array<f32, G * CHUNK>;
// Per head of the group: the maximum score, then the sum of the weights.
var<workgroup> stats: array<f32, 2u * G>;
// The token's own cache row.
var<workgroup> fresh: array<vec4<f32>, MAX_WIDTH / 4u>;

// Scores of the group's heads for the key row `key` reads (a function of i, the row's vec4), into weights at u.
{% macro score(key) %}
{% for H in range(G) %}        var s{{H}} = 0.0;
{% endfor %}
        for (var i = 0u; i < w4; i++) {
            let k = {{ key }};
{% for H in range(G) %}            s{{H}} += dot(query[qb + {{H}}u * w4 + i], k);
{% endfor %}
        }
{% for H in range(G) %}        weights[{{H}}u * CHUNK + u] = s{{H}} * shape.scale;
{% endfor %}
{% endmacro %}

// Makes token t's cache row in `fresh` (all invocations take part) and, from workgroup g = 0, writes it
// into the cache at position pos.
fn make_fresh(lid: u32, t: u32, g: u32) {
    let rank = shape.rank;
    let half = (shape.width - rank) / 2u;
    let kb = t * shape.kv_stride + shape.kv_off;
    var ss = 0.0;
    for (var r = lid; r < rank; r += WG) {
        let v = kv[kb + r];
        ss = fma(v, v, ss);
    }
    weights[lid] = ss;
    workgroupBarrier();
    for (var step = WG / 2u; step > 0u; step >>= 1u) {
        if (lid < step) {
            weights[lid] += weights[lid + step];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(weights[0] / f32(rank) + shape.eps);
    let tr = (shape.table_row + t) * half;
    for (var i4 = lid; i4 < shape.width / 4u; i4 += WG) {
        var v = vec4<f32>(0.0);
        for (var j = 0u; j < 4u; j++) {
            let i = 4u * i4 + j;
            if (i < rank) {
                v[j] = gain[i] * (kv[kb + i] * inv);
            } else if (i < rank + half) {
                let k = i - rank;
                v[j] = kv[kb + i] * cos_t[tr + k] - kv[kb + i + half] * sin_t[tr + k];
            } else {
                let k = i - rank - half;
                v[j] = kv[kb + i] * cos_t[tr + k] + kv[kb + i - half] * sin_t[tr + k];
            }
        }
        fresh[i4] = v;
        if (g == 0u) {
            cache[shape.pos * (shape.width / 4u) + i4] = v;
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wid.x;
    let h0 = wid.y * G;
    let t = shape.row;
    // Rows are read as vec4 (width and rank are multiples of 4).
    let w4 = shape.width / 4u;
    let r4n = shape.rank / 4u;
    let start = c * CHUNK;
    let end = min(start + CHUNK, shape.pos + 1u);
    let n = select(0u, end - start, end > start);
    let qb = (t * shape.heads + h0) * w4;
    // The chunk that holds the token's own position has it last (n - 1), read from workgroup memory.
    let has_fresh = n > 0u && end == shape.pos + 1u;
    if (has_fresh) {
        make_fresh(lid, t, wid.y);
    }
    let cached = select(n, n - 1u, has_fresh);

    // Invocation u scores positions start + u, start + u + 64, ...: each cache row is read once.
    for (var u = lid; u < n; u += WG) {
        if (u < cached) {
            let kb = (start + u) * w4;
{{ score("cache[kb + i]") }}
        } else {
{{ score("fresh[i]") }}
        }
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
        for (var u = 0u; u < cached; u++) {
            let k = cache[(start + u) * w4 + r];
{% for H in range(G) %}            a{{H}} = fma(vec4<f32>(weights[{{H}}u * CHUNK + u]), k, a{{H}});
{% endfor %}
        }
        if (has_fresh) {
            let k = fresh[r];
{% for H in range(G) %}            a{{H}} = fma(vec4<f32>(weights[{{H}}u * CHUNK + cached]), k, a{{H}});
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
