//! A conversation of several turns with moela's Rust API. Each turn sends the whole conversation, as chat
//! APIs do; the session keeps its latent cache and prefills only what differs from what it holds
//! (`Stats::reused_tokens` counts the rest). R1-style chat templates leave the reasoning out of earlier
//! turns, so the cached prefix ends where the last answer's reasoning began.
//!
//! The shipped model was trained on single questions, so its answers after the first turn are not to be
//! trusted; a DeepSeek chat model's are. What this shows is the API and the cache.
//!
//!     cargo run --release -p moela --example chat -- [MODEL_DIR]

use std::sync::Arc;

use moela::{Engine, Event, GenerateOptions, LoadOptions, Message, SessionOptions};

fn main() -> moela::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/moela-arith-tiny").into());
    let engine = Arc::new(Engine::load_dir(dir.as_ref(), LoadOptions::default(), &mut |_| {})?);
    let mut session = engine.session(SessionOptions::default())?;

    let mut conversation: Vec<Message> = Vec::new();
    for question in ["What is 457 + 389?", "What is 250 + 125?"] {
        conversation.push(Message::user(question));
        let mut answer = String::new();
        let mut generation = session.chat(&conversation, GenerateOptions::default())?;
        while let Some(event) = generation.next_blocking() {
            match event? {
                Event::Content(text) => answer.push_str(&text),
                Event::Done(stats) => println!(
                    "> {question}\n{}\n[{} prompt tokens, {} of them reused from the cache, {} generated]",
                    answer.trim(),
                    stats.prompt_tokens,
                    stats.reused_tokens,
                    stats.generated_tokens
                ),
                Event::Reasoning(_) | Event::Routing(_) => {}
            }
        }
        // The answer joins the conversation: the next turn's prompt repeats it.
        conversation.push(Message::assistant(answer.trim()));
    }
    Ok(())
}
