// q5 for matvec_packed.wgsl (GGUF's Q5_0, gpu/packed.rs has the layout): q4's words hold the codes' low four
// bits, and one word per block and column holds their fifth bits (row i of the block in bit i), after the
// scales in s. A code q is 0..=31 and the weight (q - 16) * scale. The shared loop reads a block's fifth
// bits once (HIGH lines) and hands unpack the ones of each word's eight rows. q5k's codes are the same with
// the weight scale * q - min (ZERO 0, MINS), and its super-block words before the fifth bits.
const GROUPS: u32 = 4u;

// Column i of the result: nibbles 4h..4h+4 of word i (rows 8g + 4h.. of column 4c+i) with their fifth bits,
// bits 4h..4h+4 of high (the block's bits shifted to this word's rows), less ZERO.
fn unpack(words: vec4<u32>, h: u32, high: vec4<u32>) -> mat4x4<f32> {
    let shift = vec4<u32>(0u, 4u, 8u, 12u) + vec4<u32>(h * 16u);
    let bit = vec4<u32>(0u, 1u, 2u, 3u) + vec4<u32>(h * 4u);
    let mask = vec4<u32>(15u);
    let one = vec4<u32>(1u);
    let four = vec4<u32>(4u);
    return mat4x4<f32>(
        vec4<f32>(((vec4<u32>(words.x) >> shift) & mask) | (((vec4<u32>(high.x) >> bit) & one) << four)) - {{ZERO}},
        vec4<f32>(((vec4<u32>(words.y) >> shift) & mask) | (((vec4<u32>(high.y) >> bit) & one) << four)) - {{ZERO}},
        vec4<f32>(((vec4<u32>(words.z) >> shift) & mask) | (((vec4<u32>(high.z) >> bit) & one) << four)) - {{ZERO}},
        vec4<f32>(((vec4<u32>(words.w) >> shift) & mask) | (((vec4<u32>(high.w) >> bit) & one) << four)) - {{ZERO}},
    );
}

// Word j of a block's share of its fifth bits: the block's shifted to the word's eight rows.
fn high_at(high: vec4<u32>, j: u32) -> vec4<u32> {
    return high >> vec4<u32>(8u * j);
}

// Block b of matrix e, texel column c: the four columns' fifth-bit words, which follow every block's scales
// in s (two vec2 per texel column), each matrix's after its super-block words (q5k).
fn high_bits(e: u32, b: u32, c: u32) -> vec4<u32> {
{% if MINS %}    let supers = shape.blocks / 8u;{% else %}    let supers = 0u;{% endif %}
    let at = shape.count * shape.blocks * shape.n4 + ((e * (supers + shape.blocks) + supers + b) * shape.n4 + c) * 2u;
    let lo = s[at];
    let hi = s[at + 1u];
    return vec4<u32>(lo.x, lo.y, hi.x, hi.y);
}
