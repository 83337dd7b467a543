// The SwiGLU activation of a fused [gate | up] product: out[r, i] = silu(gu[r, i]) * gu[r, width + i],
// silu(g) = g / (1 + exp(-g)). One invocation per output {{T}} (vec4 where both widths are multiples of 4,
// a quarter of the loads; else f32; the widths and totals in the shape count {{T}} values). The pair
// variant (lines tagged {{TWO}}) does a second, independent product in the same launch (a MoE layer's
// routed and shared experts).
//
// Bindings: gu [rows, 2 * width], out [rows, width], (gu2 [rows2, 2 * width2], out2 [rows2, width2]), then
// the shape.

@group(0) @binding(0) var<storage, read_write> gu: array<{{T}}>;
@group(0) @binding(1) var<storage, read_write> out: array<{{T}}>;
@group(0) @binding(2) var<storage, read_write> gu2: array<{{T}}>; {{TWO}}
@group(0) @binding(3) var<storage, read_write> out2: array<{{T}}>; {{TWO}}

struct Shape {
    width: u32,
    total: u32,   // rows * width
    width2: u32,
    total2: u32,  // rows2 * width2 (0 without the second product)
}
@group(0) @binding({{U}}) var<uniform> shape: Shape;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.y * groups.x * 64u + gid.x;
    if (i < shape.total) {
        let w = shape.width;
        let r = i / w;
        let c = i - r * w;
        let g = gu[r * 2u * w + c];
        let u = gu[r * 2u * w + w + c];
        out[i] = g / (1.0 + exp(-g)) * u;
        return;
    }
    let j = i - shape.total; {{TWO}}
    if (j < shape.total2) { {{TWO}}
        let w = shape.width2; {{TWO}}
        let r = j / w; {{TWO}}
        let c = j - r * w; {{TWO}}
        let g = gu2[r * 2u * w + c]; {{TWO}}
        let u = gu2[r * 2u * w + w + c]; {{TWO}}
        out2[j] = g / (1.0 + exp(-g)) * u; {{TWO}}
    } {{TWO}}
}
