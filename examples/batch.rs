//! Answer several questions at once with moela's Rust API: each question gets its own session and
//! generation, and `Generation::step_all` advances them together, so every step feeds the next token of
//! all of them through the model in one batched forward (the weights are read once per step for all of
//! them). This is what `moela serve` does with concurrent requests.
//!
//!     cargo run --release -p moela --example batch -- [MODEL_DIR] [QUESTION ...]
//!
//! MODEL_DIR is an HF folder or a GGUF file; the default is the small model moela ships, which answers
//! arithmetic questions.

use std::sync::Arc;

use moela::{Engine, Event, GenerateOptions, Generation, LoadOptions, Message, SessionOptions};

fn main() -> moela::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/moela-arith-tiny").into());
    let mut questions: Vec<String> = args.collect();
    if questions.is_empty() {
        questions = ["What is 457 + 389?", "What is 803 - 377?", "What is 64 + 36?"]
            .map(String::from)
            .to_vec();
    }

    let engine = Arc::new(Engine::load_dir(dir.as_ref(), LoadOptions::default(), &mut |_| {})?);
    // Each generation owns its session (`into_chat`), so the generations can live side by side in one Vec.
    let mut generations = Vec::new();
    for q in &questions {
        let session = engine.session(SessionOptions::default())?;
        let generation = session
            .into_chat(&[Message::user(q.clone())], GenerateOptions::default())
            .map_err(|(e, _session)| e)?;
        generations.push(generation);
    }

    // Step them all until each has finished; collect each one's answer as it streams.
    let mut answers = vec![String::new(); questions.len()];
    let mut running = questions.len();
    while running > 0 {
        let mut all: Vec<&mut Generation<'static>> = generations.iter_mut().collect();
        for (i, result) in Generation::step_all_blocking(&mut all).into_iter().enumerate() {
            // `None`: this one finished at an earlier step.
            let Some(events) = result else { continue };
            for event in events? {
                match event {
                    Event::Content(text) => answers[i].push_str(&text),
                    Event::Done(stats) => {
                        running -= 1;
                        eprintln!(
                            "[{}: {} tokens, {:?}]",
                            questions[i], stats.generated_tokens, stats.finish_reason
                        );
                    }
                    Event::Reasoning(_) | Event::Routing(_) => {}
                }
            }
        }
    }
    for (q, a) in questions.iter().zip(&answers) {
        println!("{q} {}", a.trim());
    }
    Ok(())
}
