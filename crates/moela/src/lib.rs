//! # moela
//!
//! A portable WebGPU inference runtime for DeepSeek-architecture language models (DeepSeek-V2, V2-Lite, V3,
//! R1, Moonlight): multi-head latent attention with a compressed latent KV cache, and DeepSeekMoE routing
//! that stays on the GPU. The model is written with burn and runs on burn-wgpu (Vulkan, Metal, DX12, and
//! WebGPU in the browser).
//!
//! ```no_run
//! use moela::{Engine, Event, GenerateOptions, LoadOptions, Message, SessionOptions};
//! # fn main() -> moela::Result<()> {
//! let engine = std::sync::Arc::new(Engine::load_dir("path/to/hf-folder".as_ref(), LoadOptions::default(), &mut |_| {})?);
//! let mut session = engine.session(SessionOptions::default())?;
//! let messages = [Message { role: "user".into(), content: "What is 457 + 389?".into() }];
//! let mut events = session.chat(&messages, GenerateOptions::default())?;
//! while let Some(event) = events.next_blocking() {
//!     match event? {
//!         Event::Reasoning(t) => eprint!("{t}"),
//!         Event::Content(t) => print!("{t}"),
//!         Event::Done(stats) => eprintln!("\n{stats:?}"),
//!         Event::Routing(_) => {} // only with GenerateOptions::record_routing
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! What it does not do: training-time features (dropout, gradients through the cache), FP8 checkpoints,
//! the multi-token-prediction layer of V3 (its weights are ignored), or GGUF files (yet).

pub mod cache;
pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod info;
pub mod load;
pub mod memory;
pub mod model;
pub mod sample;
pub mod text;

/// The device a model is loaded onto ([`default_device_async`]; natively also `default_device`, and with the
/// `cpu` feature `cpu_device`).
pub use burn::tensor::Device;
pub use chat::{Message, Tokenizer};
pub use config::ModelConfig;
pub use engine::{Engine, LoadOptions, LoadReport};
pub use error::{Error, Result};
pub use generate::{Event, FinishReason, GenerateOptions, Generation, Session, SessionOptions, Stats};
pub use gpu::Kernels;
pub use gpu::WeightDtype;
#[cfg(feature = "cpu")]
pub use gpu::device::cpu_device;
#[cfg(not(target_arch = "wasm32"))]
pub use gpu::device::default_device;
pub use gpu::device::default_device_async;
pub use info::ModelInfo;
pub use load::{CheckpointFiles, Progress, WeightFile};
pub use sample::SamplingOptions;
