// MLA decode, step 1 of 3 (docs/architecture.md §3.4): the absorbed queries.
//
// Workgroup h, for every token t of the launch (rows of them, up to M): the rope half of token t's query for
// head h is rotated, and its no-rope half is moved into latent space with the absorbed key up-projection,
// q~[r] = sum_d q[d] W_UK[h, d, r]; query[t, h] = [q~ (rank values) | roped q_pe (rope values)]. Each W_UK
// value read serves all the tokens (lines in a `for R` loop are written once per token slot; slots past
// `rows` repeat the last token and are not written), so a batch of sequences reads W_UK once per step, not
// once per sequence. The tokens' cache rows are mla_attend's.
// Rope dims are in half-split order (model/rope.rs): x1 = first half, x2 = second half.
//
// Bindings: q (token t's query, heads * (nope + rope) values at t * q_stride + q_off: a storage buffer, or
// natively a uniform copy where it fits, QS / QU lines), w_uk [heads, nope, rank] (a storage buffer, or
// natively an f32 texture: BUF / TEX lines), cos [rows, rope / 2], sin [rows, rope / 2] (token t's row at
// table_row + t), query [T, heads, rank + rope], then the shape. rank and rope are multiples of 4 (vec4
// loads; the launcher checks).

{% if QS %}@group(0) @binding(0) var<storage, read_write> q: array<f32>;{% endif %}
{% if QU %}@group(0) @binding(0) var<uniform> q: array<vec4<f32>, 4096>;{% endif %}
{% if BUF %}@group(0) @binding(1) var<storage, read_write> w_uk: array<vec4<f32>>;{% endif %}
{% if TEX %}@group(0) @binding(1) var w_uk: texture_2d_array<u32>;{% endif %}
@group(0) @binding(2) var<storage, read_write> cos_t: array<f32>;
@group(0) @binding(3) var<storage, read_write> sin_t: array<f32>;
@group(0) @binding(4) var<storage, read_write> query: array<f32>;

struct Shape {
    heads: u32,
    nope: u32,
    rope: u32,
    rank: u32,
    q_stride: u32,
    q_off: u32,
    uk_mask: u32,   // texture rows per layer - 1 (all ones for one layer)
    uk_shift: u32,  // log2(rows per layer) (31 for one layer)
    table_row: u32, // the rope tables' row of token 0 (a batch of sequences shares one table)
    rows: u32,      // tokens of the launch (1..=M)
    _pad0: u32,
    _pad1: u32,
}
@group(0) @binding(5) var<uniform> shape: Shape;

// Value i of q.
fn qs(i: u32) -> f32 {
{% if QS %}    return q[i];{% endif %}
{% if QU %}    return q[i >> 2u][i & 3u];{% endif %}
}

// Latent values 4 r4 .. 4 r4 + 4 of row d of head h's W_UK. A buffer and a row-order texture hold a head's
// texels as [nope, rank / 4]; a column-order texture (CPU adapters, gpu/texture.rs) as [rank / 4, nope],
// each column contiguous along d (COLS).
fn uk(h: u32, d: u32, r4: u32) -> vec4<f32> {
    let r4n = shape.rank / 4u;
{% if ROWS %}    let i = (h * shape.nope + d) * r4n + r4;{% endif %}
{% if COLS %}    let i = (h * r4n + r4) * shape.nope + d;{% endif %}
{% if BUF %}    return w_uk[i];{% endif %}
{% if TEX %}    let row = i >> 12u;{% endif %}
{% if TEX %}    let texel = textureLoad(w_uk, vec2<u32>(i & 4095u, row & shape.uk_mask), row >> shape.uk_shift, 0);{% endif %}
{% if TEX %}    return bitcast<vec4<f32>>(texel);{% endif %}
}

const WG: u32 = 64u;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let rank = shape.rank;
    let nope = shape.nope;
    let half = shape.rope / 2u;
    let width = rank + shape.rope;
    for (var t = 0u; t < shape.rows; t++) {
        let qb = t * shape.q_stride + shape.q_off + h * (nope + shape.rope);
        let ob = (t * shape.heads + h) * width;
        for (var i = lid; i < half; i += WG) {
            let c = cos_t[(shape.table_row + t) * half + i];
            let s = sin_t[(shape.table_row + t) * half + i];
            let x1 = qs(qb + nope + i);
            let x2 = qs(qb + nope + half + i);
            query[ob + rank + i] = x1 * c - x2 * s;
            query[ob + rank + half + i] = x2 * c + x1 * s;
        }
    }
{% for R in range(M) %}    let qb{{R}} = min({{R}}u, shape.rows - 1u) * shape.q_stride + shape.q_off + h * (nope + shape.rope);
{% endfor %}
    // Four latent values per invocation: one vec4 of W_UK per query value (rank is a multiple of 4).
    let r4n = rank / 4u;
    for (var r4 = lid; r4 < r4n; r4 += WG) {
{% for R in range(M) %}        var acc{{R}} = vec4<f32>(0.0);
{% endfor %}
        for (var d = 0u; d < nope; d++) {
            let w = uk(h, d, r4);
{% for R in range(M) %}            acc{{R}} = fma(vec4<f32>(qs(qb{{R}} + d)), w, acc{{R}});
{% endfor %}
        }
{% for R in range(M) %}        if ({{R}}u < shape.rows) {
            let o = ({{R}}u * shape.heads + h) * width + 4u * r4;
            query[o] = acc{{R}}.x;
            query[o + 1u] = acc{{R}}.y;
            query[o + 2u] = acc{{R}}.z;
            query[o + 3u] = acc{{R}}.w;
        }
{% endfor %}
    }
}
