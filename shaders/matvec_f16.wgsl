// Products with f16 weights packed in pairs in u32 words (gpu/packed.rs has the layout), unpacked with
// unpack2x16float: half the bytes of f32 on any adapter, with no shader-f16 needed. f32 accumulation.
// Same entry points and work split as matvec_packed.wgsl (matvec with the lines of a `for R` loop written once per row of x,
// gathered for MoE decode, grouped for MoE prefill, dequant for burn's ops); each invocation owns four adjacent columns and
// reads one vec2<u32> (four f16) per k.
//
// Bindings: x [rows, K], w [count, K, N/4] vec2<u32>, idx [P] i32, y, then the shape.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> w: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> idx: array<i32>;
@group(0) @binding(3) var<storage, read_write> y: array<vec4<f32>>;

struct Shape {
    k: u32,
    n4: u32,      // N / 4
    first: u32,   // first expert of the chunk (gathered)
    count: u32,   // matrices in the stack
    x_div: u32,   // pairs per row of x (gathered)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    keep: u32,    // gathered: 1 leaves the rows of pairs outside the chunk as they are, 0 writes zeros
    order: u32,   // grouped: where the plan's pair order starts
    m: u32,       // matvec: rows of x (in groups of {{M}}, one workgroup row each)
    _pad5: u32,
}
@group(0) @binding(4) var<uniform> shape: Shape;

fn unpack(v: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
}

@compute @workgroup_size(64)
fn matvec(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let n4 = shape.n4;
    if (c >= n4) {
        return;
    }
    let k_len = shape.k;
    let base = u32(idx[0]) * k_len * n4 + c;
    // This workgroup row's rows of x: r0.. (the last group's rows past M repeat row M - 1, unwritten);
    // a launch of one group (ONE lines, decode) has exactly M rows.
{% if MANY %}    let r0 = gid.y * {{M}}u;{% endif %}
{% if MANY %}{% for R in range(M) %}    let row{{R}} = min(r0 + {{R}}u, shape.m - 1u) * k_len;
{% endfor %}{% endif %}
{% if ONE %}{% for R in range(M) %}    let row{{R}} = {{R}}u * k_len;
{% endfor %}{% endif %}
{% for R in range(M) %}    var acc{{R}} = vec4<f32>(0.0);
{% endfor %}
    for (var k = 0u; k < k_len; k++) {
        let wv = unpack(w[base + k * n4]);
{% for R in range(M) %}        acc{{R}} = fma(vec4<f32>(x[row{{R}} + k]), wv, acc{{R}});
{% endfor %}
    }
{% if MANY %}{% for R in range(M) %}    if (r0 + {{R}}u < shape.m) { y[(r0 + {{R}}u) * n4 + c] = acc{{R}}; }
{% endfor %}{% endif %}
{% if ONE %}{% for R in range(M) %}    y[{{R}}u * n4 + c] = acc{{R}};
{% endfor %}{% endif %}
}

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
            acc = fma(vec4<f32>(x[row + k]), unpack(w[base + k * n4]), acc);
        }
    }
    y[p * n4 + c] = acc;
}

@compute @workgroup_size(64)
fn grouped(@builtin(global_invocation_id) gid: vec3<u32>) {
    // Tile gid.y of the plan (shaders/moe_sort.wgsl), as in matvec_packed.wgsl.
    let t = 4u * gid.y;
    let pairs = u32(idx[t + 2u]);
    let e = idx[t] - i32(shape.first);
    let c = gid.x;
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
{% for R in range(M) %}    var acc{{R}} = vec4<f32>(0.0);
{% endfor %}
    if (inside) {
        let base = u32(e) * k_len * n4 + c;
        for (var k = 0u; k < k_len; k++) {
            let wv = unpack(w[base + k * n4]);
{% for R in range(M) %}            acc{{R}} = fma(vec4<f32>(x[row{{R}} + k]), wv, acc{{R}});
{% endfor %}
        }
    }
{% for R in range(M) %}    if ({{R}}u < pairs) { y[p{{R}} * n4 + c] = acc{{R}}; }
{% endfor %}
}

@compute @workgroup_size(64)
fn dequant(@builtin(global_invocation_id) gid: vec3<u32>) {
    // x and idx are unused here but bound (the binding list is shared): touch them so they stay in the layout.
    _ = x[0];
    _ = idx[0];
    let c = gid.x;
    let k = gid.y;
    let e = gid.z;
    let n4 = shape.n4;
    if (c >= n4 || k >= shape.k) {
        return;
    }
    let i = (e * shape.k + k) * n4 + c;
    y[i] = unpack(w[i]);
}
