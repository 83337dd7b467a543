// Products with block-quantised weights (gpu/packed.rs has the layouts): w[k, n] = q * scale - min, q a
// code of the format, a scale (and for q4k a minimum; MINS lines) per block of 32 consecutive k of a
// column. The format's own part, how a word holds its codes, is the include `unpack` names (unpack_q8.wgsl,
// unpack_q4.wgsl, unpack_q4k.wgsl, unpack_q5.wgsl, unpack_q5k.wgsl, unpack_q6k.wgsl): GROUPS (words per block
// of a column) and unpack(words, h), the 4x4 matrix of the h-th four rows of four adjacent columns' words; each word holds X4 * 4 rows of a
// column; with MINS, frame(), a block's scales and minimums (else the f16 scales of s); with HIGH,
// high_bits(), what a block's codes have beyond their nibbles (q5: fifth bits; q6k: two bits and the
// 16-value scales), and high_at(), the part of it word j of the block needs, which unpack takes as a
// third argument. Everything else here is shared. Unpacked in registers, accumulated in f32; the words are plain u32, so no shader-f16 or
// integer-dot extension is needed. A block's minimum is applied once: sum(x * (q * scale - min)) =
// scale * sum(x * q) - min * sum(x).
//
// Five entry points over one binding list:
// - matvec: y[m] = x[m] @ w[idx[0]] for the M rows of x, M (1..=8) rows per workgroup row; lines
//   in a `for R` loop are written once per row (one accumulator variable per row keeps them in
//   registers), so a prefill's product over all its rows is one launch;
// - gathered: for each (token, slot) pair p, y[p] = x[p / x_div] @ w[idx[p] - first] (MoE decode: only the
//   chosen experts' weights are read); a pair whose expert is outside this chunk gets zeros, or with `keep`
//   its row is left to the launch of the chunk that holds it (several chunks write one output);
// - grouped: the gathered product with the pairs sorted by expert (shaders/moe_sort.wgsl's plan in idx):
//   each workgroup row takes one tile of up to R-many pairs of one expert and reads that expert's
//   weights once for all of them (prefill); tiles of experts outside the chunk are skipped;
// - collected: the gathered product for a few pairs (a batch's decode step): one workgroup row per pair
//   as in gathered, but the first pair of each expert finds the next ones of that expert, up to M in
//   all (scanning idx, shape.m pairs), and reads the expert's weights once for all of them; the pairs it
//   took return;
// - dequant: y = w as f32 [count, Kp, N], for burn's ops (training, the dense expert form).
//
// Each invocation owns four adjacent columns c (one vec4<u32> of words: four rows of each column), or
// P such groups side by side (N/4 a multiple of P: 2 in decode, 4 in a prompt's launches, whose
// x values each serve 8 rows' worth of weights), and walks K a block at a time: xv (four x values) times
// the 4x4 matrix of one word group gives the four columns' partial sums, and each block's sums are scaled
// once.
//
// SwiGLU variants of matvec, gathered and grouped (GLU lines, else LIN): for a fused [gate | up]
// weight (N = 2I) the P column groups of an invocation are H adjacent groups of the gate half and the
// same groups of the up half, and it writes silu(gate) * up: y is [rows, I], and SwiGLU takes no launch of
// its own.
//
// Bindings: x [rows, K/4] vec4, w [count, Kp/(4 X4), N/4] vec4<u32>, s [count, Kp/32, N/4] vec2<u32> (f16 x4),
// idx [P] i32, y, then the shape.

// x: a storage buffer, or (texture launches, x up to 64 KiB) a copy in a uniform buffer, whose loads a
// software driver serves once per workgroup instead of once per invocation (XU lines).
{% if XS %}@group(0) @binding(0) var<storage, read_write> x: array<vec4<f32>>;{% endif %}
{% if XU %}@group(0) @binding(0) var<uniform> x: array<vec4<f32>, 4096>;{% endif %}
// The words: a storage buffer, or (native) an rgba32uint texture of 4096-texel rows, array layers past the
// adapter's height (gpu/texture.rs). The variant keeps the `if BUF` or the `if TEX` lines.
{% if BUF %}@group(0) @binding(1) var<storage, read_write> w: array<vec4<u32>>;{% endif %}
{% if TEX %}@group(0) @binding(1) var w: texture_2d_array<u32>;{% endif %}
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
    m: u32,            // matvec: rows of x (in groups of {{M}}, one workgroup row each); collected: pairs (P)
    _pad2: u32,
}
@group(0) @binding(5) var<uniform> shape: Shape;

// Values 4g..4g+4 of the row of x that starts at vec4 `row`, zero past K (x is not padded to whole blocks;
// the weights' padding rows are zero, but what lies past a row is not always a number).
fn xs(row: u32, g: u32) -> vec4<f32> {
    return select(vec4<f32>(0.0), x[row + min(g, shape.x_k4 - 1u)], g < shape.x_k4);
}

// Texel (g, c) of matrix e: word group g (4 X4 k), texel column c (four outputs). A buffer and a row-order
// texture hold a matrix's texels as [kw, n4]; a column-order texture (CPU adapters, gpu/texture.rs)
// as [n4, kw], each column contiguous along K, so an invocation reads one sequential stream (COLS).
fn word(e: u32, g: u32, c: u32) -> vec4<u32> {
    let kw = shape.blocks * GROUPS;
{% if ROWS %}    let i = (e * kw + g) * shape.n4 + c;{% endif %}
{% if COLS %}    let i = (e * shape.n4 + c) * kw + g;{% endif %}
{% if BUF %}    return w[i];{% endif %}
{% if TEX %}    let row = i >> 12u;{% endif %}
{% if TEX %}    return textureLoad(w, vec2<u32>(i & 4095u, row & shape.row_mask), row >> shape.layer_shift, 0);{% endif %}
}

{% include unpack %}
{% if not FRAME %}
// Block b's scales: four columns' f16s in s[i] (no minimums).
fn frame(e: u32, b: u32, c: u32, i: u32) -> mat2x4<f32> {
    return mat2x4<f32>(scale(s[i]), vec4<f32>(0.0));
}
{% endif %}

// The sums of the first `pairs` rows (accR_C) into the output rows of their pairs (pR): grouped's tile
// and collected's expert.
{% macro write_pairs() %}
{% if LIN %}{% for C in range(P) %}{% for R in range(M) %}    if ({{R}}u < pairs) { y[p{{R}} * n4 + c + {{C}}u] = acc{{R}}_{{C}}; }
{% endfor %}{% endfor %}{% endif %}
{% if GLU %}{% for G in range(H) %}{% for R in range(M) %}    if ({{R}}u < pairs) { y[p{{R}} * lim + c + {{G}}u] = silu(acc{{R}}_{{G}}) * acc{{R}}_{{ G + H }}; }
{% endfor %}{% endfor %}{% endif %}
{% endmacro %}

// The rows of x (rowR, m of them, m up to M) times the P texel columns of matrix `expert` from c, block by block,
// into accR_C: the inner loop every product entry shares, each block's partial sums scaled once.
{% macro rows_times_blocks(expert, m) %}
    for (var b = 0u; b < blocks; b++) {
{% for C in range(P) %}{% for R in range(m) %}        var part{{R}}_{{C}} = vec4<f32>(0.0);
{% endfor %}{% endfor %}
{% if MINS %}{% for R in range(m) %}        var xsum{{R}} = vec4<f32>(0.0);
{% endfor %}{% endif %}
{% if HIGH %}{% for C in range(P) %}        let high{{C}} = high_bits({{ expert }}, b, c + col({{C}}u, step));
{% endfor %}{% endif %}
        for (var j = 0u; j < GROUPS; j++) {
            let g = b * GROUPS + j;
{% for C in range(P) %}            let words{{C}} = word({{ expert }}, g, c + col({{C}}u, step));
{% for h in range(X4) %}            let q{{C}}_{{h}} = unpack(words{{C}}, {{h}}u{% if HIGH %}, high_at(high{{C}}, j){% endif %});
{% endfor %}{% endfor %}
{% for R in range(m) %}{% for h in range(X4) %}            let xv{{R}}_{{h}} = xs(row{{R}}, {{X4}}u * g + {{h}}u);
{% endfor %}{% endfor %}
{% if MINS %}{% for R in range(m) %}            xsum{{R}} += {% for h in range(X4) %}{% if not loop.first %} + {% endif %}xv{{R}}_{{h}}{% endfor %};
{% endfor %}{% endif %}
{% for C in range(P) %}{% for R in range(m) %}            part{{R}}_{{C}} += {% for h in range(X4) %}{% if not loop.first %} + {% endif %}xv{{R}}_{{h}} * q{{C}}_{{h}}{% endfor %};
{% endfor %}{% endfor %}
        }
{% for C in range(P) %}        let f{{C}} = frame({{ expert }}, b, c + col({{C}}u, step), sbase + b * n4 + col({{C}}u, step));
{% endfor %}
{% for C in range(P) %}{% for R in range(m) %}        acc{{R}}_{{C}} = fma(part{{R}}_{{C}}, f{{C}}[0], acc{{R}}_{{C}});
{% if MINS %}        acc{{R}}_{{C}} -= dot(xsum{{R}}, vec4<f32>(1.0)) * f{{C}}[1];
{% endif %}{% endfor %}{% endfor %}
    }
{% endmacro %}

// Invocation i's first texel column, the bound on it and the step from its gate columns to its up
// columns: P adjacent groups, or (SwiGLU) H adjacent groups of the gate half and the same of the up
// half, half the texel columns apart. Column group k of an invocation is at c + col(k, step).
const H: u32 = {{H}}u;
fn column_groups(i: u32) -> vec3<u32> {
{% if LIN %}    return vec3<u32>(i * {{P}}u, shape.n4, 0u);{% endif %}
{% if GLU %}    return vec3<u32>(i * H, shape.n4 / 2u, shape.n4 / 2u);{% endif %}
}

// An entry's texel columns (c, lim and step as column_groups gives them, n4 the matrix's): an invocation
// past the last returns.
{% macro invocation_columns() %}
    let n4 = shape.n4;
    let cols = column_groups(gid.x);
    let c = cols.x;
    let lim = cols.y;
    let step = cols.z;
    if (c >= lim) {
        return;
    }
{% endmacro %}

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
    // P adjacent texel columns per invocation (lines in a `for C` loop are written once per column): each x
    // value read serves all of them.
{{ invocation_columns() }}
    let blocks = shape.blocks;
    let e = u32(idx[0]);
    // This workgroup row's rows of x: r0.. (the last group's rows past M repeat row M - 1, unwritten);
    // a launch of one group (ONE lines, decode) has exactly M rows.
{% if MANY %}    let r0 = gid.y * {{M}}u;{% endif %}
{% if MANY %}{% for R in range(M) %}    let row{{R}} = min(r0 + {{R}}u, shape.m - 1u) * shape.x_k4;
{% endfor %}{% endif %}
{% if ONE %}{% for R in range(M) %}    let row{{R}} = {{R}}u * shape.x_k4;
{% endfor %}{% endif %}
    let sbase = e * blocks * n4 + c;
{% for C in range(P) %}{% for R in range(M) %}    var acc{{R}}_{{C}} = vec4<f32>(0.0);
{% endfor %}{% endfor %}
{{ rows_times_blocks("e", M) }}
{% if LIN %}{% if MANY %}{% for C in range(P) %}{% for R in range(M) %}    if (r0 + {{R}}u < shape.m) { y[(r0 + {{R}}u) * n4 + c + {{C}}u] = acc{{R}}_{{C}}; }
{% endfor %}{% endfor %}{% endif %}{% endif %}
{% if GLU %}{% if MANY %}{% for G in range(H) %}{% for R in range(M) %}    if (r0 + {{R}}u < shape.m) { y[(r0 + {{R}}u) * lim + c + {{G}}u] = silu(acc{{R}}_{{G}}) * acc{{R}}_{{ G + H }}; }
{% endfor %}{% endfor %}{% endif %}{% endif %}
{% if LIN %}{% if ONE %}{% for C in range(P) %}{% for R in range(M) %}    y[{{R}}u * n4 + c + {{C}}u] = acc{{R}}_{{C}};
{% endfor %}{% endfor %}{% endif %}{% endif %}
{% if GLU %}{% if ONE %}{% for G in range(H) %}{% for R in range(M) %}    y[{{R}}u * lim + c + {{G}}u] = silu(acc{{R}}_{{G}}) * acc{{R}}_{{ G + H }};
{% endfor %}{% endfor %}{% endif %}{% endif %}
}

@compute @workgroup_size(64)
fn gathered(@builtin(global_invocation_id) gid: vec3<u32>) {
    let p = gid.y;
{{ invocation_columns() }}
    let blocks = shape.blocks;
    let e = idx[p] - i32(shape.first);
    let inside = e >= 0 && u32(e) < shape.count;
    if (!inside && shape.keep == 1u) {
        return;
    }
{% for C in range(P) %}    var acc{{C}} = vec4<f32>(0.0);
{% endfor %}
    if (inside) {
        let sbase = u32(e) * blocks * n4 + c;
        let row = (p / shape.x_div) * shape.x_k4;
        for (var b = 0u; b < blocks; b++) {
{% for C in range(P) %}            var part{{C}} = vec4<f32>(0.0);
{% endfor %}
{% if MINS %}            var xsum = vec4<f32>(0.0);
{% endif %}
{% if HIGH %}{% for C in range(P) %}            let high{{C}} = high_bits(u32(e), b, c + col({{C}}u, step));
{% endfor %}{% endif %}
            for (var j = 0u; j < GROUPS; j++) {
                let g = b * GROUPS + j;
{% for h in range(X4) %}                let xv_{{h}} = xs(row, {{X4}}u * g + {{h}}u);
{% endfor %}
{% if MINS %}                xsum += {% for h in range(X4) %}{% if not loop.first %} + {% endif %}xv_{{h}}{% endfor %};
{% endif %}
{% for C in range(P) %}                let words{{C}} = word(u32(e), g, c + col({{C}}u, step));
                part{{C}} += {% for h in range(X4) %}{% if not loop.first %} + {% endif %}xv_{{h}} * unpack(words{{C}}, {{h}}u{% if HIGH %}, high_at(high{{C}}, j){% endif %}){% endfor %};
{% endfor %}
            }
{% for C in range(P) %}            let f{{C}} = frame(u32(e), b, c + col({{C}}u, step), sbase + b * n4 + col({{C}}u, step));
            acc{{C}} = fma(part{{C}}, f{{C}}[0], acc{{C}});
{% if MINS %}            acc{{C}} -= dot(xsum, vec4<f32>(1.0)) * f{{C}}[1];
{% endif %}{% endfor %}
        }
    }
{% if LIN %}{% for C in range(P) %}    y[p * n4 + c + {{C}}u] = acc{{C}};
{% endfor %}{% endif %}
{% if GLU %}{% for G in range(H) %}    y[p * lim + c + {{G}}u] = silu(acc{{G}}) * acc{{ G + H }};
{% endfor %}{% endif %}
}

@compute @workgroup_size(64)
fn grouped(@builtin(global_invocation_id) gid: vec3<u32>) {
    // Tile gid.y of the plan: (expert, first position in the order, pairs); the rows past its pairs
    // repeat its last pair and are not written.
    let t = 4u * gid.y;
    let pairs = u32(idx[t + 2u]);
    let e = idx[t] - i32(shape.first);
    let inside = e >= 0 && u32(e) < shape.count;
    if (pairs == 0u || (!inside && shape.keep == 1u)) {
        return;
    }
{{ invocation_columns() }}
    let blocks = shape.blocks;
    let at = shape.order + u32(idx[t + 1u]);
{% for R in range(M) %}    let p{{R}} = u32(idx[at + min({{R}}u, pairs - 1u)]);
{% endfor %}
{% for R in range(M) %}    let row{{R}} = (p{{R}} / shape.x_div) * shape.x_k4;
{% endfor %}
{% for C in range(P) %}{% for R in range(M) %}    var acc{{R}}_{{C}} = vec4<f32>(0.0);
{% endfor %}{% endfor %}
    if (inside) {
        let sbase = u32(e) * blocks * n4 + c;
{{ rows_times_blocks("u32(e)", M) }}
    }
{{ write_pairs() }}
}

@compute @workgroup_size(64)
fn collected(@builtin(global_invocation_id) gid: vec3<u32>) {
{{ invocation_columns() }}
    // The pairs of one expert, in order, go in groups of M: workgroup row q leads a group when the pairs
    // before it that chose its expert are a multiple of M (none, for a batch's decode step, where each
    // token chooses an expert once), finds the rest of its group and computes them all; the others return.
    let q0 = gid.y;
    let chosen = idx[q0];
    var before = 0u;
    for (var q = 0u; q < q0; q++) {
        before += u32(idx[q] == chosen);
    }
    if (before % {{M}}u != 0u) {
        return;
    }
    // Each pair found is written to its row and the rows after it, so the rows past the pairs repeat the
    // last (computed, not written). Plain variables rather than an array indexed by the count keep each
    // row the same across the workgroup, which lets a SIMD driver (lavapipe) read x once per row.
{% for R in range(M) %}    var p{{R}} = q0;
{% endfor %}
    var pairs = 1u;
    for (var q = q0 + 1u; q < shape.m; q++) {
        if (idx[q] == chosen && pairs < {{M}}u) {
{% for R in range(1, M) %}            if (pairs <= {{R}}u) { p{{R}} = q; }
{% endfor %}
            pairs += 1u;
        }
    }
    let e = chosen - i32(shape.first);
    let inside = e >= 0 && u32(e) < shape.count;
    if (!inside && shape.keep == 1u) {
        return;
    }
    let blocks = shape.blocks;
{% for R in range(M) %}    let row{{R}} = (p{{R}} / shape.x_div) * shape.x_k4;
{% endfor %}
{% for C in range(P) %}{% for R in range(M) %}    var acc{{R}}_{{C}} = vec4<f32>(0.0);
{% endfor %}{% endfor %}
    if (inside) {
        let sbase = u32(e) * blocks * n4 + c;
        // As many rows as there are pairs, in steps of a power of two (a row's sums are the same whichever
        // step computes them).
{% for m in [1, 2, 4] %}{% if m < M %}        {% if m > 1 %}else {% endif %}if (pairs <= {{m}}u) {
{{ rows_times_blocks("u32(e)", m) }}
        }
{% endif %}{% endfor %}        {% if M > 1 %}else {% endif %}{
{{ rows_times_blocks("u32(e)", M) }}
        }
    }
{{ write_pairs() }}
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
    let kw = shape.blocks * GROUPS;
    if (c >= n4 || g >= kw) {
        return;
    }
    let words = word(e, g, c);
    let f = frame(e, g / GROUPS, c, (e * shape.blocks + g / GROUPS) * n4 + c);
    let out = (e * kw + g) * (4u * {{X4}}u) * n4 + c;
    for (var h = 0u; h < {{X4}}u; h++) {
        // Row i of the transpose: the four columns at k = 4 (X4 g + h) + i.
        let rows = transpose(unpack(words, h{% if HIGH %}, high_at(high_bits(e, g / GROUPS, c), g % GROUPS){% endif %}));
        let o = out + h * 4u * n4;
        y[o] = rows[0] * f[0] - f[1];
        y[o + n4] = rows[1] * f[0] - f[1];
        y[o + 2u * n4] = rows[2] * f[0] - f[1];
        y[o + 3u * n4] = rows[3] * f[0] - f[1];
    }
}
