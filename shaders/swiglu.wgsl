// The SwiGLU activation of a fused [gate | up] product: out[r, i] = silu(gu[r, i]) * gu[r, width + i],
// silu(g) = g / (1 + exp(-g)). One invocation per output T (vec4 where the width is a multiple of 4, a
// quarter of the loads; else f32; the width and total in the shape count T values). The 8-bit and
// 4-bit products do this inside their own launch (matvec_packed.wgsl); this kernel serves the other formats.
//
// Bindings: gu [rows, 2 * width], out [rows, width], then the shape.

@group(0) @binding(0) var<storage, read_write> gu: array<{{T}}>;
@group(0) @binding(1) var<storage, read_write> out: array<{{T}}>;

struct Shape {
    width: u32,
    total: u32,   // rows * width
    _pad0: u32,
    _pad1: u32,
}
@group(0) @binding(2) var<uniform> shape: Shape;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.y * groups.x * 64u + gid.x;
    if (i >= shape.total) {
        return;
    }
    let w = shape.width;
    let r = i / w;
    let c = i - r * w;
    let g = gu[r * 2u * w + c];
    let u = gu[r * 2u * w + w + c];
    out[i] = g / (1.0 + exp(-g)) * u;
}
