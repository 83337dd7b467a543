// MoE output: out[t] = base[t] + sum over slots k of weight[t, k] * routed[t * K + k], where routed holds
// one row per (token, slot) pair from the gathered down projection and base is the shared experts' output
// (lines tagged BASE; without shared experts the sum starts at zero). One invocation per output value.
//
// Bindings: routed [T * K, H], weight [T * K], out [T, H], (base [T, H]), then the shape.

@group(0) @binding(0) var<storage, read_write> routed: array<f32>;
@group(0) @binding(1) var<storage, read_write> weight: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
{% if BASE %}@group(0) @binding(3) var<storage, read_write> base: array<f32>;{% endif %}

struct Shape {
    hidden: u32,
    top_k: u32,
    total: u32,   // T * H
    _pad0: u32,
}
@group(0) @binding({{U}}) var<uniform> shape: Shape;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.y * groups.x * 64u + gid.x;
    if (i >= shape.total) {
        return;
    }
    let h = shape.hidden;
    let t = i / h;
    let c = i - t * h;
    var acc = 0.0;
    for (var k = 0u; k < shape.top_k; k++) {
        let p = t * shape.top_k + k;
        acc = fma(weight[p], routed[p * h + c], acc);
    }
{% if BASE %}    acc += base[i];{% endif %}
    out[i] = acc;
}
