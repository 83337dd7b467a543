// q8 for matvec_packed.wgsl: a word holds four signed bytes, rows 4g..4g+4 of a column (row 4g + i in
// byte i), so a block of 32 rows is eight words.
const GROUPS: u32 = 8u;

// Column i of the result: the four signed bytes of word i (rows 4g..4g+4 of column 4c+i); one matrix per
// word, so `h` is always 0.
fn unpack(words: vec4<u32>, h: u32) -> mat4x4<f32> {
    let up = vec4<u32>(24u, 16u, 8u, 0u);
    let down = vec4<u32>(24u);
    return mat4x4<f32>(
        vec4<f32>((vec4<i32>(bitcast<i32>(words.x)) << up) >> down),
        vec4<f32>((vec4<i32>(bitcast<i32>(words.y)) << up) >> down),
        vec4<f32>((vec4<i32>(bitcast<i32>(words.z)) << up) >> down),
        vec4<f32>((vec4<i32>(bitcast<i32>(words.w)) << up) >> down),
    );
}
