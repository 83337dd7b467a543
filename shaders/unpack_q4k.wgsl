// q4k for matvec_packed.wgsl (GGUF's Q4_K, gpu/packed.rs has the layout): q4's words with codes 0..=15, and
// the K-quants' frame.
{% include "unpack_q4.wgsl" %}
{% include "frame_k.wgsl" %}
