// RMSNorm over each row (docs/architecture.md §2): out = gain * (x / sqrt(mean(x^2) + eps)), one
// workgroup per row. The residual variant (lines tagged ADD) first adds the previous block's output to
// the residual stream: sum = x + delta is written out and normalised, so the add and the norm are one
// launch. The MoE variant (also MOE) mixes that output here too: the sum over the K slots of
// weight[row, k] * routed[row * K + k], from the gathered down projections, plus delta (lines tagged
// BASE; a MoE block whose shared experts run apart from the routed ones) or not.
//
// Rows are read as T: vec4 where the row length is a multiple of 4 (a quarter of the loads), else f32.
//
// x's rows may be the first columns of a wider tensor (the queries' LoRA columns of one product for a batch
// of tokens), `stride` values apart.
//
// Bindings: x [rows, stride], gain [n], out [rows, n], (sum [rows, n]), (routed [rows * K, n], weight [rows, K]),
// (delta [rows, n]), then the shape.

@group(0) @binding(0) var<storage, read_write> x: array<{{T}}>;
@group(0) @binding(1) var<storage, read_write> gain: array<{{T}}>;
@group(0) @binding(2) var<storage, read_write> out: array<{{T}}>;
{% if ADD %}@group(0) @binding(3) var<storage, read_write> sum: array<{{T}}>;{% endif %}
{% if MOE %}@group(0) @binding(4) var<storage, read_write> routed: array<{{T}}>;{% endif %}
{% if MOE %}@group(0) @binding(5) var<storage, read_write> weight: array<f32>;{% endif %}
{% if BASE %}@group(0) @binding({{D}}) var<storage, read_write> delta: array<{{T}}>;{% endif %}

struct Shape {
    n: u32,       // {{T}} values per row
    eps: f32,
    top_k: u32,   // MoE variant
    len: u32,     // f32 values per row
    stride: u32,  // {{T}} values from one row of x to the next
}
@group(0) @binding({{U}}) var<uniform> shape: Shape;

const WG: u32 = 64u;
var<workgroup> partial: array<f32, WG>;

fn squares(v: {{T}}) -> f32 {
{% if V4 %}    return dot(v, v);{% endif %}
{% if V1 %}    return v * v;{% endif %}
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = shape.n;
    let row = wid.x;
    let base = row * n;
    let xbase = row * shape.stride;
    var ss = 0.0;
    for (var i = lid; i < n; i += WG) {
        var v = x[xbase + i];
{% if ADD %}        var d = {{T}}(0.0);{% endif %}
{% if MOE %}        for (var k = 0u; k < shape.top_k; k++) { {% endif %}
{% if MOE %}            let p = row * shape.top_k + k;{% endif %}
{% if MOE %}            d = fma({{T}}(weight[p]), routed[p * n + i], d);{% endif %}
{% if MOE %}        }{% endif %}
{% if BASE %}        d += delta[base + i];{% endif %}
{% if ADD %}        v += d;{% endif %}
{% if ADD %}        sum[base + i] = v;{% endif %}
        ss += squares(v);
    }
    partial[lid] = ss;
    workgroupBarrier();
    for (var step = WG / 2u; step > 0u; step >>= 1u) {
        if (lid < step) {
            partial[lid] += partial[lid + step];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(partial[0] / f32(shape.len) + shape.eps);
    for (var i = lid; i < n; i += WG) {
        var v = x[xbase + i];
{% if ADD %}        v = sum[base + i];{% endif %}
        out[base + i] = gain[i] * (v * inv);
    }
}
