// Gathered expert products for MoE decode (entry `gathered`): for each (token, slot) pair p choosing expert e = idx[p],
// y[p, n] = sum_k x[row(p), k] * w[e, k, n], reading only the chosen experts' weights and never copying them.
//
// w is one chunk of stacked expert weights, [count, K, N] (each expert [in, out], the engine's layout), for
// experts first..first+count; pairs whose expert is outside the chunk get zeros, or with `keep` are left as
// they are (the chunks of a stack write one output, each its own pairs).
// row(p) = p / x_div: x_div = top-k when x holds one row per token (gate/up), 1 when it holds one row per pair
// (down). Each invocation owns four adjacent outputs of one pair and walks K with vec4 weight loads, as in
// matvec.wgsl. N must be a multiple of 4.
//
// The `grouped` entry (prefill) takes the pairs sorted by expert instead (shaders/moe_sort.wgsl's plan in
// idx): each workgroup row is one tile of up to M pairs of one expert (the lines of a `for R` loop are
// written once per pair), whose weights it reads once for all of them; there an invocation owns
// P groups of four outputs (4 where N/4 allows, else 1).
//
// Bindings: x [rows, K], w [count, K, N/4] as vec4, idx [P] (i32), y [P, N/4] as vec4, then the shape.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> w: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> idx: array<i32>;
@group(0) @binding(3) var<storage, read_write> y: array<vec4<f32>>;

struct Shape {
    k: u32,
    n4: u32,
    first: u32,
    count: u32,
    x_div: u32,
    keep: u32,    // 1 leaves the rows of pairs outside the chunk as they are, 0 writes zeros
    order: u32,   // grouped: where the plan's pair order starts
    _pad2: u32,
}
@group(0) @binding(4) var<uniform> shape: Shape;

@compute @workgroup_size(64)
fn gathered(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let p = gid.y;
    let n4 = shape.n4;
    if (c >= n4) {
        return;
    }
    let k_len = shape.k;
    let e = idx[p] - i32(shape.first);
    let inside = e >= 0 && u32(e) < shape.count;
    if (!inside && shape.keep == 1u) {
        return;
    }
    var acc = vec4<f32>(0.0);
    if (inside) {
        let base = u32(e) * k_len * n4 + c;
        let row = (p / shape.x_div) * k_len;
        for (var k = 0u; k < k_len; k++) {
            acc = fma(vec4<f32>(x[row + k]), w[base + k * n4], acc);
        }
    }
    y[p * n4 + c] = acc;
}

@compute @workgroup_size(64)
fn grouped(@builtin(global_invocation_id) gid: vec3<u32>) {
    // Tile gid.y of the plan: (expert, first position in the order, pairs); the rows past its pairs
    // repeat its last pair and are not written. Each invocation owns P adjacent groups of four
    // outputs (lines in a `for C` loop are written once per group), so each x value read serves all of them.
    let t = 4u * gid.y;
    let pairs = u32(idx[t + 2u]);
    let e = idx[t] - i32(shape.first);
    let c = gid.x * {{P}}u;
    let n4 = shape.n4;
    let inside = e >= 0 && u32(e) < shape.count;
    if (pairs == 0u || c >= n4 || (!inside && shape.keep == 1u)) {
        return;
    }
    let k_len = shape.k;
    let at = shape.order + u32(idx[t + 1u]);
{% for R in range(M) %}    let p{{R}} = u32(idx[at + min({{R}}u, pairs - 1u)]);
{% endfor %}
{% for R in range(M) %}    let row{{R}} = (p{{R}} / shape.x_div) * k_len;
{% endfor %}
{% for C in range(P) %}{% for R in range(M) %}    var acc{{R}}_{{C}} = vec4<f32>(0.0);
{% endfor %}{% endfor %}
    if (inside) {
        let base = u32(e) * k_len * n4 + c;
        for (var k = 0u; k < k_len; k++) {
{% for C in range(P) %}            let wv{{C}} = w[base + k * n4 + {{C}}u];
{% endfor %}
{% for R in range(M) %}            let xv{{R}} = vec4<f32>(x[row{{R}} + k]);
{% endfor %}
{% for C in range(P) %}{% for R in range(M) %}            acc{{R}}_{{C}} = fma(xv{{R}}, wv{{C}}, acc{{R}}_{{C}});
{% endfor %}{% endfor %}
        }
    }
{% for C in range(P) %}{% for R in range(M) %}    if ({{R}}u < pairs) { y[p{{R}} * n4 + c + {{C}}u] = acc{{R}}_{{C}}; }
{% endfor %}{% endfor %}
}
