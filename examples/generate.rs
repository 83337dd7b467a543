//! Stream one answer from a model with moela's Rust API: load, open a session, chat, and read the events,
//! the reasoning (inside `<think>`) apart from the answer.
//!
//!     cargo run --release -p moela --example generate -- [MODEL_DIR] [PROMPT]
//!
//! MODEL_DIR is an HF folder (config.json, *.safetensors, tokenizer.json); the default is the small model
//! moela ships, which answers arithmetic questions.

use std::io::Write;
use std::sync::Arc;

use moela::{Engine, Event, GenerateOptions, LoadOptions, Message, SessionOptions};

fn main() -> moela::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/moela-arith-tiny").into());
    let prompt = args.next().unwrap_or_else(|| "What is 457 + 389?".into());

    // Weights are read tensor by tensor onto the default GPU device (lavapipe or a real GPU); the callback
    // sees the bytes loaded so far.
    let engine = Engine::load_dir(dir.as_ref(), LoadOptions::default(), &mut |_progress| {})?;
    // A session owns a latent cache; it holds the engine by Arc so it can outlive the caller's borrow.
    let mut session = Arc::new(engine).session(SessionOptions::default())?;

    let mut generation = session.chat(&[Message::user(prompt)], GenerateOptions::default())?;
    let mut out = std::io::stdout();
    while let Some(event) = generation.next_blocking() {
        match event? {
            // The model's reasoning: shown here on stderr, apart from the answer.
            Event::Reasoning(text) => eprint!("{text}"),
            Event::Content(text) => {
                print!("{text}");
                let _ = out.flush();
            }
            Event::Done(stats) => eprintln!(
                "\n[{} prompt tokens, {} generated, {:.1} tok/s, {:?}]",
                stats.prompt_tokens, stats.generated_tokens, stats.decode_tokens_per_second, stats.finish_reason
            ),
            Event::Routing(_) => {} // only with GenerateOptions::record_routing
        }
    }
    println!();
    Ok(())
}
