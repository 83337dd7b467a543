// The MoE router's selection on the GPU (docs/architecture.md §4), one workgroup per token: the router
// logits (lines tagged GATE: x times the router weight, written to `logits`; otherwise `logits` holds
// them already), scores (softmax or sigmoid of the logits), the choice scores (plus the correction bias, lines tagged
// BIAS: noaux_tc), the group limit (groups ranked by their best score, or by the sum of their best two
// for noaux_tc; experts of the groups not kept are masked), the top K, and their mixing weights (the
// unbiased scores, renormalised and scaled as the config says). Nothing goes back to the host: the indices
// feed the gathered expert kernels directly. With `extra` > 0 each token's row ends with that many more
// slots, experts E..E+extra at weight 1: the shared experts, stacked after the routed ones, so that one
// gathered launch serves both.
//
// One workgroup of 64 invocations per token, each holding experts lid, lid + 64, ...: workgroup reductions
// give the softmax statistics, one invocation per group ranks the groups, and each of the K picks is a
// workgroup arg-max over the experts ranked below the previous pick (by score, then lower index first).
//
// Bindings: logits [T, E], idx [T, K + extra] i32, weight [T, K + extra], (x [T, H], gate [H, E]),
// (bias [E]), then the shape.

@group(0) @binding(0) var<storage, read_write> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> idx: array<i32>;
@group(0) @binding(2) var<storage, read_write> weight: array<f32>;
// x and gate are read as GT: vec4 where H and E are multiples of 4 (G4 lines: four experts per
// invocation, four k per step), else f32 (G1 lines).
{% if GATE %}@group(0) @binding(3) var<storage, read_write> x: array<{{GT}}>;{% endif %}
{% if GATE %}@group(0) @binding(4) var<storage, read_write> gate: array<{{GT}}>;{% endif %}
{% if BIAS %}@group(0) @binding({{B}}) var<storage, read_write> bias: array<f32>;{% endif %}

struct Shape {
    experts: u32,
    top_k: u32,
    method: u32,       // 0 greedy, 1 group_limited_greedy, 2 noaux_tc
    sigmoid: u32,      // 1: sigmoid scores, 0: softmax
    groups: u32,       // at most 64
    keep_groups: u32,
    normalise: u32,    // 1: weights / (their sum + 1e-20)
    factor: f32,       // applied to the weights last
    hidden: u32,       // H (with the router product)
    extra: u32,        // slots appended per token: experts E.., weight 1
    _pad1: u32,
    _pad2: u32,
}
@group(0) @binding({{U}}) var<uniform> shape: Shape;

const WG: u32 = 64u;
const LOW: f32 = -3.0e38;   // below every score: the reference's -inf

var<workgroup> red_v: array<f32, WG>;
var<workgroup> red_i: array<u32, WG>;
var<workgroup> gscore: array<f32, WG>;
var<workgroup> gkept: array<u32, WG>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x;
    let e_n = shape.experts;
    let base = t * e_n;
    let sigmoid = shape.sigmoid == 1u;

{% if G1 %}    let h = shape.hidden;{% endif %}
{% if G1 %}    for (var e = lid; e < e_n; e += WG) { {% endif %}
{% if G1 %}        var l = 0.0;{% endif %}
{% if G1 %}        for (var k = 0u; k < h; k++) { {% endif %}
{% if G1 %}            l = fma(x[t * h + k], gate[k * e_n + e], l);{% endif %}
{% if G1 %}        }{% endif %}
{% if G1 %}        logits[base + e] = l;{% endif %}
{% if G1 %}    }{% endif %}
{% if G4 %}    let h4 = shape.hidden / 4u;{% endif %}
{% if G4 %}    let e4n = e_n / 4u;{% endif %}
{% if G4 %}    for (var e4 = lid; e4 < e4n; e4 += WG) { {% endif %}
{% if G4 %}        var l = vec4<f32>(0.0);{% endif %}
{% if G4 %}        for (var k4 = 0u; k4 < h4; k4++) { {% endif %}
{% if G4 %}            let xv = x[t * h4 + k4];{% endif %}
{% if G4 %}            let r = 4u * k4 * e4n + e4;{% endif %}
{% if G4 %}            l = fma(vec4<f32>(xv.x), gate[r], l);{% endif %}
{% if G4 %}            l = fma(vec4<f32>(xv.y), gate[r + e4n], l);{% endif %}
{% if G4 %}            l = fma(vec4<f32>(xv.z), gate[r + 2u * e4n], l);{% endif %}
{% if G4 %}            l = fma(vec4<f32>(xv.w), gate[r + 3u * e4n], l);{% endif %}
{% if G4 %}        }{% endif %}
{% if G4 %}        logits[base + 4u * e4] = l.x;{% endif %}
{% if G4 %}        logits[base + 4u * e4 + 1u] = l.y;{% endif %}
{% if G4 %}        logits[base + 4u * e4 + 2u] = l.z;{% endif %}
{% if G4 %}        logits[base + 4u * e4 + 3u] = l.w;{% endif %}
{% if G4 %}    }{% endif %}
{% if GATE %}    storageBarrier();{% endif %}

    // Softmax statistics: m = max logit, inv = 1 / sum exp(logit - m).
    var local = LOW;
    for (var e = lid; e < e_n; e += WG) {
        local = max(local, logits[base + e]);
    }
    red_v[lid] = local;
    workgroupBarrier();
    for (var step = WG / 2u; step > 0u; step >>= 1u) {
        if (lid < step) {
            red_v[lid] = max(red_v[lid], red_v[lid + step]);
        }
        workgroupBarrier();
    }
    let m = red_v[0];
    workgroupBarrier();
    var part = 0.0;
    for (var e = lid; e < e_n; e += WG) {
        part += exp(logits[base + e] - m);
    }
    red_v[lid] = part;
    workgroupBarrier();
    for (var step = WG / 2u; step > 0u; step >>= 1u) {
        if (lid < step) {
            red_v[lid] += red_v[lid + step];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / red_v[0];
    workgroupBarrier();

    // Groups: invocation g scores group g (its best choice score, or its best two summed for noaux_tc);
    // a group is kept when fewer than keep_groups groups score strictly higher (the reference keeps every
    // group scoring at least the keep_groups-th best).
    let g_n = shape.groups;
    let per = e_n / g_n;
    let limit = shape.method != 0u && shape.keep_groups < g_n;
    if (limit) {
        if (lid < g_n) {
            var best = LOW;
            var second = LOW;
            for (var e = lid * per; e < (lid + 1u) * per; e++) {
                let l = logits[base + e];
                var v = select(exp(l - m) * inv, 1.0 / (1.0 + exp(-l)), sigmoid);
{% if BIAS %}                v += bias[e];{% endif %}
                if (v > best) {
                    second = best;
                    best = v;
                } else if (v > second) {
                    second = v;
                }
            }
            gscore[lid] = select(best, best + second, shape.method == 2u);
        }
        workgroupBarrier();
        if (lid < g_n) {
            var higher = 0u;
            for (var g = 0u; g < g_n; g++) {
                higher += u32(gscore[g] > gscore[lid]);
            }
            gkept[lid] = u32(higher < shape.keep_groups);
        }
        workgroupBarrier();
    }

    // K picks, best first: each a workgroup arg-max over the kept experts ranked below the previous pick.
    let k_n = shape.top_k;
    let stride = k_n + shape.extra;
    var pv = 3.4e38;
    var pi = 0u;
    var total = 0.0;
    for (var j = 0u; j < k_n; j++) {
        var bv = LOW;
        var bi = e_n;
        for (var e = lid; e < e_n; e += WG) {
            let l = logits[base + e];
            var v = select(exp(l - m) * inv, 1.0 / (1.0 + exp(-l)), sigmoid);
{% if BIAS %}            v += bias[e];{% endif %}
            if (limit && gkept[e / per] == 0u) {
                v = LOW;
            }
            let later = v < pv || (v == pv && e > pi);
            if (later && (bi == e_n || v > bv)) {
                bv = v;
                bi = e;
            }
        }
        red_v[lid] = bv;
        red_i[lid] = bi;
        workgroupBarrier();
        for (var step = WG / 2u; step > 0u; step >>= 1u) {
            if (lid < step) {
                let ov = red_v[lid + step];
                let oi = red_i[lid + step];
                let mine = red_i[lid];
                if (mine == e_n || (oi != e_n && (ov > red_v[lid] || (ov == red_v[lid] && oi < mine)))) {
                    red_v[lid] = ov;
                    red_i[lid] = oi;
                }
            }
            workgroupBarrier();
        }
        pv = red_v[0];
        pi = red_i[0];
        workgroupBarrier();
        let l = logits[base + pi];
        let w = select(exp(l - m) * inv, 1.0 / (1.0 + exp(-l)), sigmoid);
        total += w;
        if (lid == 0u) {
            idx[t * stride + j] = i32(pi);
            weight[t * stride + j] = w;
        }
    }
    if (lid == 0u) {
        var div = 1.0;
        if (shape.normalise == 1u) {
            div = total + 1e-20;
        }
        for (var j = 0u; j < k_n; j++) {
            weight[t * stride + j] = weight[t * stride + j] / div * shape.factor;
        }
        for (var j = 0u; j < shape.extra; j++) {
            idx[t * stride + k_n + j] = i32(e_n + j);
            weight[t * stride + k_n + j] = 1.0;
        }
    }
}
