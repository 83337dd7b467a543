// Products with f16 weights read from a texture (native adapters; gpu/texture.rs): the words of
// gpu/packed.rs's f16 layout ([K, N/2] words, a word holding columns 2j and 2j + 1 of row k) as 16-byte
// texels, one texel holding eight adjacent columns of one row. Same entry points and bindings as
// matvec_f16.wgsl; each invocation owns one texel column (eight outputs, two vec4 accumulators per row of
// x), or two adjacent ones in a prompt's matvec / grouped launches where N/8 is even (P in this
// variant), so N must be a multiple of 8. f32 accumulation; unpack2x16float needs no shader-f16.
//
// Bindings: x [rows, K] (a storage buffer, or a uniform copy: XS / XU lines), w (texture of
// [count, K, N/8] texels), idx [P] i32, y [rows, N/4] vec4, then the shape.

{% if XS %}@group(0) @binding(0) var<storage, read_write> x: array<f32>;{% endif %}
{% if XU %}@group(0) @binding(0) var<uniform> x: array<vec4<f32>, 4096>;{% endif %}
@group(0) @binding(1) var w: texture_2d_array<u32>;
@group(0) @binding(2) var<storage, read_write> idx: array<i32>;
@group(0) @binding(3) var<storage, read_write> y: array<vec4<f32>>;

struct Shape {
    k: u32,
    n4: u32,          // N / 4
    first: u32,       // first expert of the chunk (gathered)
    count: u32,       // matrices in the stack
    x_div: u32,       // pairs per row of x (gathered)
    row_mask: u32,    // texture rows per layer - 1 (all ones for one layer)
    layer_shift: u32, // log2(rows per layer) (31 for one layer)
    _pad0: u32,
    keep: u32,        // gathered: 1 leaves the rows of pairs outside the chunk as they are, 0 writes zeros
    order: u32,       // grouped: where the plan's pair order starts
    m: u32,           // matvec: rows of x (in groups of {{M}}, one workgroup row each)
    _pad3: u32,
}
@group(0) @binding(4) var<uniform> shape: Shape;

// Value i of x.
fn xs(i: u32) -> f32 {
{% if XS %}    return x[i];{% endif %}
{% if XU %}    return x[i >> 2u][i & 3u];{% endif %}
}

// Texel (k, c) of matrix e, as its eight f16 values: columns 8c..8c+4 and 8c+4..8c+8 of row k. A row-order
// texture holds a matrix's texels as [K, N/8]; a column-order one (CPU adapters, gpu/texture.rs) as
// [N/8, K], each column contiguous along K, so an invocation reads one sequential stream (COLS).
fn texel(e: u32, k: u32, c: u32) -> mat2x4<f32> {
    let n8 = shape.n4 / 2u;
{% if ROWS %}    let i = (e * shape.k + k) * n8 + c;{% endif %}
{% if COLS %}    let i = (e * n8 + c) * shape.k + k;{% endif %}
    let row = i >> 12u;
    let t = textureLoad(w, vec2<u32>(i & 4095u, row & shape.row_mask), row >> shape.layer_shift, 0);
    return mat2x4<f32>(
        vec4<f32>(unpack2x16float(t.x), unpack2x16float(t.y)),
        vec4<f32>(unpack2x16float(t.z), unpack2x16float(t.w)),
    );
}

@compute @workgroup_size(64)
fn matvec(@builtin(global_invocation_id) gid: vec3<u32>) {
    // P adjacent texel columns per invocation (lines in a `for C` loop are written once per column): one in
    // decode, two in a prompt's launches, where each x value read then serves 16 outputs.
    let c = gid.x * {{P}}u;
    let n8 = shape.n4 / 2u;
    if (c >= n8) {
        return;
    }
    let k_len = shape.k;
    let e = u32(idx[0]);
    // This workgroup row's rows of x: r0.. (the last group's rows past M repeat row M - 1, unwritten);
    // a launch of one group (ONE lines, decode) has exactly M rows.
{% if MANY %}    let r0 = gid.y * {{M}}u;{% endif %}
{% if MANY %}{% for R in range(M) %}    let row{{R}} = min(r0 + {{R}}u, shape.m - 1u) * k_len;
{% endfor %}{% endif %}
{% if ONE %}{% for R in range(M) %}    let row{{R}} = {{R}}u * k_len;
{% endfor %}{% endif %}
{% for C in range(P) %}{% for R in range(M) %}    var lo{{R}}_{{C}} = vec4<f32>(0.0);
{% endfor %}{% endfor %}
{% for C in range(P) %}{% for R in range(M) %}    var hi{{R}}_{{C}} = vec4<f32>(0.0);
{% endfor %}{% endfor %}
    for (var k = 0u; k < k_len; k++) {
{% for C in range(P) %}        let wv{{C}} = texel(e, k, c + {{C}}u);
{% endfor %}
{% for R in range(M) %}        let xv{{R}} = vec4<f32>(xs(row{{R}} + k));
{% endfor %}
{% for C in range(P) %}{% for R in range(M) %}        lo{{R}}_{{C}} = fma(xv{{R}}, wv{{C}}[0], lo{{R}}_{{C}});
{% endfor %}{% endfor %}
{% for C in range(P) %}{% for R in range(M) %}        hi{{R}}_{{C}} = fma(xv{{R}}, wv{{C}}[1], hi{{R}}_{{C}});
{% endfor %}{% endfor %}
    }
{% if MANY %}{% for C in range(P) %}{% for R in range(M) %}    if (r0 + {{R}}u < shape.m) { y[(r0 + {{R}}u) * shape.n4 + 2u * (c + {{C}}u)] = lo{{R}}_{{C}}; }
{% endfor %}{% endfor %}{% endif %}
{% if MANY %}{% for C in range(P) %}{% for R in range(M) %}    if (r0 + {{R}}u < shape.m) { y[(r0 + {{R}}u) * shape.n4 + 2u * (c + {{C}}u) + 1u] = hi{{R}}_{{C}}; }
{% endfor %}{% endfor %}{% endif %}
{% if ONE %}{% for C in range(P) %}{% for R in range(M) %}    y[{{R}}u * shape.n4 + 2u * (c + {{C}}u)] = lo{{R}}_{{C}};
{% endfor %}{% endfor %}{% endif %}
{% if ONE %}{% for C in range(P) %}{% for R in range(M) %}    y[{{R}}u * shape.n4 + 2u * (c + {{C}}u) + 1u] = hi{{R}}_{{C}};
{% endfor %}{% endfor %}{% endif %}
}

@compute @workgroup_size(64)
fn gathered(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let p = gid.y;
    let n8 = shape.n4 / 2u;
    if (c >= n8) {
        return;
    }
    let k_len = shape.k;
    let e = idx[p] - i32(shape.first);
    let inside = e >= 0 && u32(e) < shape.count;
    if (!inside && shape.keep == 1u) {
        return;
    }
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    if (inside) {
        let row = (p / shape.x_div) * k_len;
        for (var k = 0u; k < k_len; k++) {
            let wv = texel(u32(e), k, c);
            let xv = vec4<f32>(xs(row + k));
            lo = fma(xv, wv[0], lo);
            hi = fma(xv, wv[1], hi);
        }
    }
    y[p * shape.n4 + 2u * c] = lo;
    y[p * shape.n4 + 2u * c + 1u] = hi;
}

@compute @workgroup_size(64)
fn grouped(@builtin(global_invocation_id) gid: vec3<u32>) {
    // Tile gid.y of the plan (shaders/moe_sort.wgsl), as in matvec_packed.wgsl; P texel columns per
    // invocation, as in matvec.
    let t = 4u * gid.y;
    let pairs = u32(idx[t + 2u]);
    let e = idx[t] - i32(shape.first);
    let c = gid.x * {{P}}u;
    let n8 = shape.n4 / 2u;
    let inside = e >= 0 && u32(e) < shape.count;
    if (pairs == 0u || c >= n8 || (!inside && shape.keep == 1u)) {
        return;
    }
    let k_len = shape.k;
    let at = shape.order + u32(idx[t + 1u]);
{% for R in range(M) %}    let p{{R}} = u32(idx[at + min({{R}}u, pairs - 1u)]);
{% endfor %}
{% for R in range(M) %}    let row{{R}} = (p{{R}} / shape.x_div) * k_len;
{% endfor %}
{% for C in range(P) %}{% for R in range(M) %}    var lo{{R}}_{{C}} = vec4<f32>(0.0);
{% endfor %}{% endfor %}
{% for C in range(P) %}{% for R in range(M) %}    var hi{{R}}_{{C}} = vec4<f32>(0.0);
{% endfor %}{% endfor %}
    if (inside) {
        for (var k = 0u; k < k_len; k++) {
{% for C in range(P) %}            let wv{{C}} = texel(u32(e), k, c + {{C}}u);
{% endfor %}
{% for R in range(M) %}            let xv{{R}} = vec4<f32>(xs(row{{R}} + k));
{% endfor %}
{% for C in range(P) %}{% for R in range(M) %}            lo{{R}}_{{C}} = fma(xv{{R}}, wv{{C}}[0], lo{{R}}_{{C}});
{% endfor %}{% endfor %}
{% for C in range(P) %}{% for R in range(M) %}            hi{{R}}_{{C}} = fma(xv{{R}}, wv{{C}}[1], hi{{R}}_{{C}});
{% endfor %}{% endfor %}
        }
    }
{% for C in range(P) %}{% for R in range(M) %}    if ({{R}}u < pairs) { y[p{{R}} * shape.n4 + 2u * (c + {{C}}u)] = lo{{R}}_{{C}}; }
{% endfor %}{% endfor %}
{% for C in range(P) %}{% for R in range(M) %}    if ({{R}}u < pairs) { y[p{{R}} * shape.n4 + 2u * (c + {{C}}u) + 1u] = hi{{R}}_{{C}}; }
{% endfor %}{% endfor %}
}

@compute @workgroup_size(64)
fn dequant(@builtin(global_invocation_id) gid: vec3<u32>) {
    // x and idx are unused here but bound (the binding list is shared): touch them so they stay in the layout.
    _ = xs(0u);
    _ = idx[0];
    let c = gid.x;
    let k = gid.y;
    let e = gid.z;
    let n8 = shape.n4 / 2u;
    if (c >= n8 || k >= shape.k) {
        return;
    }
    let i = (e * shape.k + k) * n8 + c;
    let wv = texel(e, k, c);
    y[2u * i] = wv[0];
    y[2u * i + 1u] = wv[1];
}
