// q6k for matvec_packed.wgsl (GGUF's Q6_K, gpu/packed.rs has the layout): q4's words hold the codes' low
// four bits; each block of 32 has two words per column of their top two bits (rows 0-15, then 16-31; row i
// in bits 2i..2i+2) after the super-block words, and its scales entry holds the two 8-bit signed scales of
// its halves. A code q is 0..=63 and the weight (q - 32) * scale16 * d, d the super-block's f16 scale: the
// 16-value scales are applied in unpack (an integer times an integer, exact in f32), d by the frame.
const GROUPS: u32 = 4u;

// What a block's codes have beyond their nibbles, for its four columns: the top bits of rows 0-15 and
// 16-31, and the two halves' scales (low byte: rows 0-15).
struct Six {
    lo: vec4<u32>,
    hi: vec4<u32>,
    scales: vec4<u32>,
}

// Word j's share: its eight rows' top bits (bits 2i..2i+2 for row 8j + i) and its half's scale.
struct SixPart {
    bits: vec4<u32>,
    scale: vec4<f32>,
}

fn high_at(six: Six, j: u32) -> SixPart {
    let half = select(six.lo, six.hi, j >= 2u);
    let bits = half >> vec4<u32>(16u * (j & 1u));
    // The half's 8-bit scale, sign-extended.
    let byte = (six.scales >> vec4<u32>(8u * (j / 2u))) & vec4<u32>(255u);
    let scale = vec4<f32>(bitcast<vec4<i32>>(byte << vec4<u32>(24u)) >> vec4<u32>(24u));
    return SixPart(bits, scale);
}

// Column i of the result: nibbles 4h..4h+4 of word i (rows 8g + 4h.. of column 4c+i) with their top bits,
// centred and times their half's scale.
fn unpack(words: vec4<u32>, h: u32, part: SixPart) -> mat4x4<f32> {
    let shift = vec4<u32>(0u, 4u, 8u, 12u) + vec4<u32>(h * 16u);
    let bit = vec4<u32>(0u, 2u, 4u, 6u) + vec4<u32>(h * 8u);
    let mask = vec4<u32>(15u);
    let two = vec4<u32>(3u);
    let four = vec4<u32>(4u);
    let b = part.bits;
    return mat4x4<f32>(
        (vec4<f32>(((vec4<u32>(words.x) >> shift) & mask) | (((vec4<u32>(b.x) >> bit) & two) << four)) - 32.0) * part.scale.x,
        (vec4<f32>(((vec4<u32>(words.y) >> shift) & mask) | (((vec4<u32>(b.y) >> bit) & two) << four)) - 32.0) * part.scale.y,
        (vec4<f32>(((vec4<u32>(words.z) >> shift) & mask) | (((vec4<u32>(b.z) >> bit) & two) << four)) - 32.0) * part.scale.z,
        (vec4<f32>(((vec4<u32>(words.w) >> shift) & mask) | (((vec4<u32>(b.w) >> bit) & two) << four)) - 32.0) * part.scale.w,
    );
}

// Each matrix's extra words after every block's scales in s (two vec2 per texel column and row): its
// super-block words, then two rows of top bits per block.
fn extra_at(e: u32, row: u32, c: u32) -> u32 {
    let supers = shape.blocks / 8u;
    return shape.count * shape.blocks * shape.n4 + ((e * (supers + 2u * shape.blocks) + row) * shape.n4 + c) * 2u;
}

// Block b of matrix e, texel column c: its top bits and its halves' scales (its entry of s).
fn high_bits(e: u32, b: u32, c: u32) -> Six {
    let supers = shape.blocks / 8u;
    let at = extra_at(e, supers + 2u * b, c);
    let next = at + 2u * shape.n4;
    let sc = s[(e * shape.blocks + b) * shape.n4 + c];
    return Six(
        vec4<u32>(s[at].x, s[at].y, s[at + 1u].x, s[at + 1u].y),
        vec4<u32>(s[next].x, s[next].y, s[next + 1u].x, s[next + 1u].y),
        vec4<u32>(sc.x, sc.x >> 16u, sc.y, sc.y >> 16u) & vec4<u32>(65535u),
    );
}

// Block b's frame: its super-block's f16 scale d for the four columns (no minimums).
fn frame(e: u32, b: u32, c: u32, i: u32) -> mat2x4<f32> {
    let at = extra_at(e, b / 8u, c);
    let lo = s[at];
    let hi = s[at + 1u];
    let d = vec4<f32>(unpack2x16float(lo.x).x, unpack2x16float(lo.y).x, unpack2x16float(hi.x).x, unpack2x16float(hi.y).x);
    return mat2x4<f32>(d, vec4<f32>(0.0));
}
