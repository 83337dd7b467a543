// q5k for matvec_packed.wgsl (GGUF's Q5_K, gpu/packed.rs has the layout): q5's words and fifth bits with
// codes 0..=31 (ZERO 0), and the K-quants' frame.
{% include "unpack_q5.wgsl" %}
{% include "frame_k.wgsl" %}
