// Products with 4-bit block-quantised weights (gpu/packed.rs has the layout): w[k, n] = (code - 8) * scale,
// code a nibble, one f16 scale per block of 32 consecutive k of a column. Same entry points, bindings and
// work split as matvec_q8.wgsl (SwiGLU variants and the grouped entry included); here one word holds eight rows of a column, so
// a word group is 8 k and takes two vec4 of x.
//
// Bindings: x [rows, K/4] vec4, w [count, Kp/8, N/4] vec4<u32>, s [count, Kp/32, N/4] vec2<u32> (f16 x4),
// idx [P] i32, y, then the shape.

// x: a storage buffer, or (texture launches, x up to 64 KiB) a copy in a uniform buffer, whose loads a
// software driver serves once per workgroup instead of once per invocation ({{XU}} lines).
@group(0) @binding(0) var<storage, read_write> x: array<vec4<f32>>; {{XS}}
@group(0) @binding(0) var<uniform> x: array<vec4<f32>, 4096>; {{XU}}
// The words: a storage buffer, or (native) an rgba32uint texture of 4096-texel rows, array layers past the
// adapter's height (gpu/texture.rs). The launcher keeps the {{BUF}} or the {{TEX}} lines.
@group(0) @binding(1) var<storage, read_write> w: array<vec4<u32>>; {{BUF}}
@group(0) @binding(1) var w: texture_2d_array<u32>; {{TEX}}
@group(0) @binding(2) var<storage, read_write> s: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read_write> idx: array<i32>;
@group(0) @binding(4) var<storage, read_write> y: array<vec4<f32>>;

struct Shape {
    blocks: u32,  // Kp / 32
    n4: u32,      // N / 4
    first: u32,   // first expert of the chunk (gathered)
    count: u32,   // matrices in the stack
    x_div: u32,   // pairs per row of x (gathered)
    row_mask: u32,     // texture rows per layer - 1 (all ones for one layer)
    layer_shift: u32,  // log2(rows per layer) (31 for one layer)
    x_k4: u32,         // vec4 per row of x: K / 4, the reads past it zero
    keep: u32,         // gathered: 1 leaves the rows of pairs outside the chunk as they are, 0 writes zeros
    order: u32,        // grouped: where the plan's pair order starts
    m: u32,            // matvec: rows of x (in groups of {{M}}, one workgroup row each)
    _pad2: u32,
}
@group(0) @binding(5) var<uniform> shape: Shape;

// Values 4g..4g+4 of the row of x that starts at vec4 `row`, zero past K (x is not padded to whole blocks;
// the weights' padding rows are zero, but what lies past a row is not always a number).
fn xs(row: u32, g: u32) -> vec4<f32> {
    return select(vec4<f32>(0.0), x[row + min(g, shape.x_k4 - 1u)], g < shape.x_k4);
}

// Texel (g, c) of matrix e: word group g (eight k), texel column c (four outputs). A buffer and a row-order
// texture hold a matrix's texels as [k8, n4]; a column-order texture (CPU adapters, gpu/texture.rs)
// as [n4, k8], each column contiguous along K, so an invocation reads one sequential stream ({{COLS}}).
fn word(e: u32, g: u32, c: u32) -> vec4<u32> {
    let k8 = shape.blocks * GROUPS;
    let i = (e * k8 + g) * shape.n4 + c; {{ROWS}}
    let i = (e * shape.n4 + c) * k8 + g; {{COLS}}
    return w[i]; {{BUF}}
    let row = i >> 12u; {{TEX}}
    return textureLoad(w, vec2<u32>(i & 4095u, row & shape.row_mask), row >> shape.layer_shift, 0); {{TEX}}
}

const GROUPS: u32 = 4u; // word groups (of 8 k) per block

// Column i of the result: nibbles `first`..`first + 4` of word i (four rows of column 4c+i), centred.
fn unpack(words: vec4<u32>, first: u32) -> mat4x4<f32> {
    let shift = vec4<u32>(0u, 4u, 8u, 12u) + vec4<u32>(first * 4u);
    let mask = vec4<u32>(15u);
    return mat4x4<f32>(
        vec4<f32>((vec4<u32>(words.x) >> shift) & mask) - 8.0,
        vec4<f32>((vec4<u32>(words.y) >> shift) & mask) - 8.0,
        vec4<f32>((vec4<u32>(words.z) >> shift) & mask) - 8.0,
        vec4<f32>((vec4<u32>(words.w) >> shift) & mask) - 8.0,
    );
}

// Invocation i's first texel column, the bound on it and the step from its gate columns to its up
// columns: {{P}} adjacent groups, or (SwiGLU) H adjacent groups of the gate half and the same of the up
// half, half the texel columns apart. Column group k of an invocation is at c + col(k, step).
const H: u32 = {{H}}u;
fn column_groups(i: u32) -> vec3<u32> {
    return vec3<u32>(i * {{P}}u, shape.n4, 0u); {{LIN}}
    return vec3<u32>(i * H, shape.n4 / 2u, shape.n4 / 2u); {{GLU}}
}

fn col(k: u32, step: u32) -> u32 {
    return k % H + (k / H) * step;
}

// silu(v) = v * sigmoid(v), as shaders/swiglu.wgsl computes it.
fn silu(v: vec4<f32>) -> vec4<f32> {
    return v / (1.0 + exp(-v));
}

fn scale(v: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
}

@compute @workgroup_size(64)
fn matvec(@builtin(global_invocation_id) gid: vec3<u32>) {
    // {{P}} adjacent texel columns per invocation (lines holding {{C}} are repeated per column): each x
    // value read serves all of them.
    let n4 = shape.n4;
    let cols = column_groups(gid.x);
    let c = cols.x;
    let lim = cols.y;
    let step = cols.z;
    if (c >= lim) {
        return;
    }
    let blocks = shape.blocks;
    let e = u32(idx[0]);
    // This workgroup row's rows of x: r0.. (the last group's rows past M repeat row M - 1, unwritten);
    // a launch of one group ({{ONE}} lines, decode) has exactly {{M}} rows.
    let r0 = gid.y * {{M}}u; {{MANY}}
    let row{{R}} = min(r0 + {{R}}u, shape.m - 1u) * shape.x_k4; {{MANY}}
    let row{{R}} = {{R}}u * shape.x_k4; {{ONE}}
    let sbase = e * blocks * n4 + c;
    var acc{{R}}_{{C}} = vec4<f32>(0.0);
    for (var b = 0u; b < blocks; b++) {
        var part{{R}}_{{C}} = vec4<f32>(0.0);
        for (var j = 0u; j < GROUPS; j++) {
            let g = b * GROUPS + j;
            let words{{C}} = word(e, g, c + col({{C}}u, step));
            let lo{{C}} = unpack(words{{C}}, 0u);
            let hi{{C}} = unpack(words{{C}}, 4u);
            let xlo{{R}} = xs(row{{R}}, 2u * g);
            let xhi{{R}} = xs(row{{R}}, 2u * g + 1u);
            part{{R}}_{{C}} += xlo{{R}} * lo{{C}} + xhi{{R}} * hi{{C}};
        }
        let sc{{C}} = scale(s[sbase + b * n4 + col({{C}}u, step)]);
        acc{{R}}_{{C}} = fma(part{{R}}_{{C}}, sc{{C}}, acc{{R}}_{{C}});
    }
    if (r0 + {{R}}u < shape.m) { y[(r0 + {{R}}u) * n4 + c + {{C}}u] = acc{{R}}_{{C}}; } {{LIN}} {{MANY}}
    if (r0 + {{R}}u < shape.m) { y[(r0 + {{R}}u) * lim + c + {{G}}u] = silu(acc{{R}}_{{G}}) * acc{{R}}_{{GU}}; } {{GLU}} {{MANY}}
    y[{{R}}u * n4 + c + {{C}}u] = acc{{R}}_{{C}}; {{LIN}} {{ONE}}
    y[{{R}}u * lim + c + {{G}}u] = silu(acc{{R}}_{{G}}) * acc{{R}}_{{GU}}; {{GLU}} {{ONE}}
}

@compute @workgroup_size(64)
fn gathered(@builtin(global_invocation_id) gid: vec3<u32>) {
    let p = gid.y;
    let n4 = shape.n4;
    let cols = column_groups(gid.x);
    let c = cols.x;
    let lim = cols.y;
    let step = cols.z;
    if (c >= lim) {
        return;
    }
    let blocks = shape.blocks;
    let e = idx[p] - i32(shape.first);
    let inside = e >= 0 && u32(e) < shape.count;
    if (!inside && shape.keep == 1u) {
        return;
    }
    var acc{{C}} = vec4<f32>(0.0);
    if (inside) {
        let sbase = u32(e) * blocks * n4 + c;
        let row = (p / shape.x_div) * shape.x_k4;
        for (var b = 0u; b < blocks; b++) {
            var part{{C}} = vec4<f32>(0.0);
            for (var j = 0u; j < GROUPS; j++) {
                let g = b * GROUPS + j;
                let xlo = xs(row, 2u * g);
                let xhi = xs(row, 2u * g + 1u);
                let words{{C}} = word(u32(e), g, c + col({{C}}u, step));
                part{{C}} += xlo * unpack(words{{C}}, 0u) + xhi * unpack(words{{C}}, 4u);
            }
            acc{{C}} = fma(part{{C}}, scale(s[sbase + b * n4 + col({{C}}u, step)]), acc{{C}});
        }
    }
    y[p * n4 + c + {{C}}u] = acc{{C}}; {{LIN}}
    y[p * lim + c + {{G}}u] = silu(acc{{G}}) * acc{{GU}}; {{GLU}}
}

@compute @workgroup_size(64)
fn grouped(@builtin(global_invocation_id) gid: vec3<u32>) {
    // Tile gid.y of the plan (shaders/moe_sort.wgsl), as in matvec_q8.wgsl.
    let t = 4u * gid.y;
    let pairs = u32(idx[t + 2u]);
    let e = idx[t] - i32(shape.first);
    let inside = e >= 0 && u32(e) < shape.count;
    if (pairs == 0u || (!inside && shape.keep == 1u)) {
        return;
    }
    let n4 = shape.n4;
    let cols = column_groups(gid.x);
    let c = cols.x;
    let lim = cols.y;
    let step = cols.z;
    if (c >= lim) {
        return;
    }
    let blocks = shape.blocks;
    let at = shape.order + u32(idx[t + 1u]);
    let p{{R}} = u32(idx[at + min({{R}}u, pairs - 1u)]);
    let row{{R}} = (p{{R}} / shape.x_div) * shape.x_k4;
    var acc{{R}}_{{C}} = vec4<f32>(0.0);
    if (inside) {
        let sbase = u32(e) * blocks * n4 + c;
        for (var b = 0u; b < blocks; b++) {
            var part{{R}}_{{C}} = vec4<f32>(0.0);
            for (var j = 0u; j < GROUPS; j++) {
                let g = b * GROUPS + j;
                let words{{C}} = word(u32(e), g, c + col({{C}}u, step));
                let lo{{C}} = unpack(words{{C}}, 0u);
                let hi{{C}} = unpack(words{{C}}, 4u);
                let xlo{{R}} = xs(row{{R}}, 2u * g);
                let xhi{{R}} = xs(row{{R}}, 2u * g + 1u);
                part{{R}}_{{C}} += xlo{{R}} * lo{{C}} + xhi{{R}} * hi{{C}};
            }
            let sc{{C}} = scale(s[sbase + b * n4 + col({{C}}u, step)]);
            acc{{R}}_{{C}} = fma(part{{R}}_{{C}}, sc{{C}}, acc{{R}}_{{C}});
        }
    }
    if ({{R}}u < pairs) { y[p{{R}} * n4 + c + {{C}}u] = acc{{R}}_{{C}}; } {{LIN}}
    if ({{R}}u < pairs) { y[p{{R}} * lim + c + {{G}}u] = silu(acc{{R}}_{{G}}) * acc{{R}}_{{GU}}; } {{GLU}}
}

@compute @workgroup_size(64)
fn dequant(@builtin(global_invocation_id) gid: vec3<u32>) {
    // x and idx are unused here but bound (the binding list is shared): touch them so they stay in the layout.
    _ = x[0];
    _ = idx[0];
    let c = gid.x;
    let g = gid.y;
    let e = gid.z;
    let n4 = shape.n4;
    let k8 = shape.blocks * GROUPS;
    if (c >= n4 || g >= k8) {
        return;
    }
    let words = word(e, g, c);
    let sc = scale(s[(e * shape.blocks + g / GROUPS) * n4 + c]);
    let out = (e * k8 + g) * 8u * n4 + c;
    for (var half = 0u; half < 2u; half++) {
        // Row i of the transpose: the four columns at k = 8g + 4 half + i.
        let rows = transpose(unpack(words, half * 4u));
        let o = out + half * 4u * n4;
        y[o] = rows[0] * sc;
        y[o + n4] = rows[1] * sc;
        y[o + 2u * n4] = rows[2] * sc;
        y[o + 3u * n4] = rows[3] * sc;
    }
}
