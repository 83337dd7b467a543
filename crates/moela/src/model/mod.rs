//! The DeepSeek-V2/V3 transformer in burn: one file per block.
//!
//! Reference: DeepSeek-V2 (arXiv:2405.04434) and DeepSeek-V3 (arXiv:2412.19437) technical reports, and
//! HF transformers' `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM`, which the tests compare against.

pub mod block;
pub mod embedding;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod params;
mod reader;
pub mod rope;
pub mod transformer;
