// q4 for matvec_packed.wgsl: a word holds eight nibbles, rows 8g..8g+8 of a column (row 8g + i in bits
// 4i..4i+4) stored as code + 8 for codes -7..=7, so a block of 32 rows is four words. q4k's words are the
// same with codes 0..=15 (unpack_q4k.wgsl includes this with ZERO 0).
const GROUPS: u32 = 4u;

// Column i of the result: nibbles 4h..4h+4 of word i (rows 8g + 4h.. of column 4c+i), less ZERO.
fn unpack(words: vec4<u32>, h: u32) -> mat4x4<f32> {
    let shift = vec4<u32>(0u, 4u, 8u, 12u) + vec4<u32>(h * 16u);
    let mask = vec4<u32>(15u);
    return mat4x4<f32>(
        vec4<f32>((vec4<u32>(words.x) >> shift) & mask) - {{ZERO}},
        vec4<f32>((vec4<u32>(words.y) >> shift) & mask) - {{ZERO}},
        vec4<f32>((vec4<u32>(words.z) >> shift) & mask) - {{ZERO}},
        vec4<f32>((vec4<u32>(words.w) >> shift) & mask) - {{ZERO}},
    );
}
