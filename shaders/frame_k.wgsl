// The frame of a K-quant block (q4k, q5k; gpu/packed.rs has the layout): its weight is scale * q - min, both
// 6-bit multipliers of its super-block's f16 scale and minimum. The shared loop sums x over each block once
// per row and subtracts min * sum (MINS lines).

// Block b of matrix e, texel column c (four outputs), whose 6-bit pairs are s[i]: its scales and minimums.
// Each matrix's extra words follow every block's pairs in s: its super-block words (four columns' words,
// two vec2, per texel column), then q5k's fifth-bit words (HIGH).
fn frame(e: u32, b: u32, c: u32, i: u32) -> mat2x4<f32> {
    let pairs = s[i];
    let six = vec4<u32>(pairs.x, pairs.x >> 16u, pairs.y, pairs.y >> 16u);
    let supers = shape.blocks / 8u;
{% if HIGH %}    let rows = supers + shape.blocks;{% else %}    let rows = supers;{% endif %}
    let at = shape.count * shape.blocks * shape.n4 + ((e * rows + b / 8u) * shape.n4 + c) * 2u;
    let lo = s[at];
    let hi = s[at + 1u];
    let d = mat4x2<f32>(unpack2x16float(lo.x), unpack2x16float(lo.y), unpack2x16float(hi.x), unpack2x16float(hi.y));
    let scale = vec4<f32>(d[0].x, d[1].x, d[2].x, d[3].x) * vec4<f32>(six & vec4<u32>(63u));
    let min = vec4<f32>(d[0].y, d[1].y, d[2].y, d[3].y) * vec4<f32>((six >> vec4<u32>(8u)) & vec4<u32>(63u));
    return mat2x4<f32>(scale, min);
}
