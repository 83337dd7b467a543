// MLA decode, step 3 of 3: merges mla_attend's chunks for each token t and head h (each chunk's sums
// rescaled by exp(m_chunk - m), divided by the total l) into the attention-weighted latent, then maps it out
// with the value up-projection: out[t, h * dv + v] = sum_r latent[r] W_UV^T[h, r, v]. Workgroup (h, g) takes
// tokens g * M .. g * M + M (lines in a `for R` loop are written once per token slot; slots past the T
// tokens repeat the last one and are not written), so each W_UV value read serves M tokens: a batch of
// sequences reads W_UV once per M of them, not once per sequence.
//
// Bindings: partial [T, heads, chunks, rank + 2], w_uv [heads, rank, dv] (read as vec4: a storage buffer,
// or natively an f32 texture, BUF / TEX lines), out [T, heads * dv], then the shape.

@group(0) @binding(0) var<storage, read_write> partial: array<f32>;
{% if BUF %}@group(0) @binding(1) var<storage, read_write> w_uv: array<vec4<f32>>;{% endif %}
{% if TEX %}@group(0) @binding(1) var w_uv: texture_2d_array<u32>;{% endif %}
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

struct Shape {
    heads: u32,
    rank: u32,
    dv: u32,
    chunks: u32,
    uv_mask: u32,   // texture rows per layer - 1 (all ones for one layer)
    uv_shift: u32,  // log2(rows per layer) (31 for one layer)
    rows: u32,      // T
    _pad1: u32,
}
@group(0) @binding(3) var<uniform> shape: Shape;

// Values 4 v4 .. 4 v4 + 4 of row r of head h's W_UV^T. A buffer and a row-order texture hold a head's texels
// as [rank, dv / 4]; a column-order texture (CPU adapters, gpu/texture.rs) as [dv / 4, rank], each
// column contiguous along r (COLS).
fn uv(h: u32, r: u32, v4: u32) -> vec4<f32> {
    let v4n = shape.dv / 4u;
{% if ROWS %}    let i = (h * shape.rank + r) * v4n + v4;{% endif %}
{% if COLS %}    let i = (h * v4n + v4) * shape.rank + r;{% endif %}
{% if BUF %}    return w_uv[i];{% endif %}
{% if TEX %}    let row = i >> 12u;{% endif %}
{% if TEX %}    let texel = textureLoad(w_uv, vec2<u32>(i & 4095u, row & shape.uv_mask), row >> shape.uv_shift, 0);{% endif %}
{% if TEX %}    return bitcast<vec4<f32>>(texel);{% endif %}
}

const WG: u32 = 64u;
const CTX: u32 = 3584u; // P * rank at most (the launcher checks)
const M: u32 = {{M}}u;
const LOW: f32 = -3.0e38;

// The merged latents of the workgroup's tokens, token slot R's at R * rank.
var<workgroup> ctx: array<f32, CTX>;
var<workgroup> red: array<vec4<f32>, WG>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let t0 = wid.y * M;
    let rank = shape.rank;
    let stride = rank + 2u;
    for (var k = 0u; k < M; k++) {
        let t = min(t0 + k, shape.rows - 1u);
        let pb = (t * shape.heads + h) * shape.chunks * stride;
        var m = LOW;
        for (var c = 0u; c < shape.chunks; c++) {
            m = max(m, partial[pb + c * stride + rank]);
        }
        var l = 0.0;
        for (var c = 0u; c < shape.chunks; c++) {
            l += partial[pb + c * stride + rank + 1u] * exp(partial[pb + c * stride + rank] - m);
        }
        for (var r = lid; r < rank; r += WG) {
            var a = 0.0;
            for (var c = 0u; c < shape.chunks; c++) {
                a = fma(partial[pb + c * stride + r], exp(partial[pb + c * stride + rank] - m), a);
            }
            ctx[k * rank + r] = a / l;
        }
    }
    workgroupBarrier();
    // Four outputs per invocation (one vec4 of W_UV per latent value; dv is a multiple of 4). With fewer
    // vec4 columns than invocations, the latent values are split into slices summed at the end.
    let v4n = shape.dv / 4u;
    let lanes = min(v4n, WG);
    let slices = WG / lanes;
    let col = lid % lanes;
    let slice = lid / lanes;
    for (var base = 0u; base < v4n; base += lanes) {
        let v4 = base + col;
{% for R in range(M) %}        var a{{R}} = vec4<f32>(0.0);
{% endfor %}
        if (v4 < v4n && slice < slices) {
            for (var r = slice; r < rank; r += slices) {
                let w = uv(h, r, v4);
{% for R in range(M) %}                a{{R}} = fma(vec4<f32>(ctx[{{R}}u * rank + r]), w, a{{R}});
{% endfor %}
            }
        }
{% for R in range(M) %}        red[lid] = a{{R}};
        workgroupBarrier();
        if (slice == 0u && v4 < v4n && t0 + {{R}}u < shape.rows) {
            var sum = red[lid];
            for (var k = 1u; k < slices; k++) {
                sum += red[lid + k * lanes];
            }
            let o = ((t0 + {{R}}u) * shape.heads + h) * shape.dv + 4u * v4;
            out[o] = sum.x;
            out[o + 1u] = sum.y;
            out[o + 2u] = sum.z;
            out[o + 3u] = sum.w;
        }
        workgroupBarrier();
{% endfor %}
    }
}
