// Matrix-vector and small-M products for decode: y[m, n] = sum_k x[m, k] * w[k, n] for the M (1..=8) rows
// of x, with f32 weights stored [K, N] (inputs by outputs, the engine's layout) and f32 accumulation.
//
// Each invocation owns four adjacent outputs (one vec4 of a weight row) for every row of x and walks K,
// reading one vec4 of weights per k: a workgroup's weight reads are contiguous, every weight is read once
// per launch, and no reduction or barrier is needed. The launcher writes one accumulator per row of x into
// the variant it compiles (no indexed array: those would live in memory, not registers). N must be a multiple of 4.
//
// Bindings: x [M, K], w [K, N/4] as vec4, y [M, N/4] as vec4, then the shape as a uniform.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> w: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<vec4<f32>>;

struct Shape {
    k: u32,
    n4: u32,
    _pad0: u32,
    _pad1: u32,
}
@group(0) @binding(3) var<uniform> shape: Shape;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= shape.n4) {
        return;
    }
    let k_len = shape.k;
    let n4 = shape.n4;
    // One accumulator per row of x: the launcher repeats each line holding R per row (1 to 8 rows).
{% for R in range(M) %}    var acc{{R}} = vec4<f32>(0.0);
{% endfor %}
    for (var k = 0u; k < k_len; k++) {
        let wv = w[k * n4 + c];
{% for R in range(M) %}        acc{{R}} = fma(vec4<f32>(x[{{R}}u * k_len + k]), wv, acc{{R}});
{% endfor %}
    }
{% for R in range(M) %}    y[{{R}}u * n4 + c] = acc{{R}};
{% endfor %}
}
