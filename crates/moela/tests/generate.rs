//! Generation on the fixtures: streaming events, the thinking budget, cache reuse across turns, determinism.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moela::{
    Engine, Event, FinishReason, GenerateOptions, LoadOptions, Message, SamplingOptions, SessionOptions, Stats,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn load(name: &str) -> Arc<Engine> {
    Arc::new(Engine::load_dir(&fixture(name), LoadOptions::default(), &mut |_| {}).unwrap())
}

struct Collected {
    reasoning: String,
    content: String,
    stats: Stats,
    order: Vec<&'static str>,
}

fn collect(mut g: moela::Generation<'_>) -> Collected {
    let (mut reasoning, mut content, mut stats, mut order) = (String::new(), String::new(), None, Vec::new());
    while let Some(ev) = g.next_blocking() {
        match ev.unwrap() {
            Event::Reasoning(t) => {
                assert!(!t.is_empty());
                reasoning.push_str(&t);
                order.push("r");
            }
            Event::Content(t) => {
                assert!(!t.is_empty());
                content.push_str(&t);
                order.push("c");
            }
            Event::Routing(r) => assert!(r.iter().all(|layer| !layer.is_empty())),
            Event::Done(s) => stats = Some(s),
        }
    }
    Collected {
        reasoning,
        content,
        stats: stats.expect("a Done event ends every generation"),
        order,
    }
}

fn user(text: &str) -> Vec<Message> {
    vec![Message {
        role: "user".into(),
        content: text.into(),
    }]
}

#[test]
fn greedy_generation_is_reproducible_and_matches_logits_argmax() {
    let engine = load("v2-lite-tiny");
    let options = GenerateOptions {
        max_tokens: 10,
        ..Default::default()
    };
    let mut s1 = engine.session(SessionOptions::default()).unwrap();
    let mut g = s1.complete("the cat sat", options.clone()).unwrap();
    while g.next_blocking().is_some() {}
    let first = g.generated().to_vec();
    assert!(!first.is_empty());
    // Greedy tokens equal the argmax of the prefill logits of the growing sequence.
    let tok = engine.tokenizer().unwrap();
    let mut seq = tok.encode("the cat sat", true).unwrap();
    for &t in &first {
        let logits = pollster::block_on(engine.logits(&seq)).unwrap();
        let last = logits.last().unwrap();
        let arg = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b });
        assert_eq!(arg as u32, t);
        seq.push(t);
        if engine.config().eos_token_id == Some(t) {
            break;
        }
    }
    let mut s2 = engine.session(SessionOptions::default()).unwrap();
    let mut g = s2.complete("the cat sat", options).unwrap();
    while g.next_blocking().is_some() {}
    assert_eq!(g.generated(), &first[..]);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let engine = load("v3-tiny");
    let run = |seed| {
        let mut s = engine.session(SessionOptions::default()).unwrap();
        let sampling = SamplingOptions {
            temperature: 1.0,
            top_p: 0.95,
            seed,
            ..Default::default()
        };
        let mut g = s
            .chat(
                &user("hello"),
                GenerateOptions {
                    max_tokens: 12,
                    sampling,
                    ..Default::default()
                },
            )
            .unwrap();
        while g.next_blocking().is_some() {}
        g.generated().to_vec()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn the_r1_template_starts_in_reasoning_and_the_budget_closes_it() {
    let engine = load("v3-tiny");
    let mut s = engine.session(SessionOptions::default()).unwrap();
    let c = collect(
        s.chat(
            &user("What is 2 + 3?"),
            GenerateOptions {
                max_tokens: 8,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    assert!(
        !c.reasoning.is_empty(),
        "the generation prompt opens <think>, so text starts as reasoning"
    );
    assert!(!c.reasoning.contains("<think>"));
    assert_eq!(c.order.first(), Some(&"r"));

    let options = GenerateOptions {
        max_tokens: 20,
        thinking_budget: Some(3),
        ..Default::default()
    };
    let mut s = engine.session(SessionOptions::default()).unwrap();
    let c = collect(s.chat(&user("What is 2 + 3?"), options).unwrap());
    assert!(!c.reasoning.contains("</think>") && !c.content.contains("</think>"));
    if c.stats.finish_reason != FinishReason::Eos {
        assert!(
            !c.content.is_empty(),
            "after the budget the text is content: {:?}",
            c.order
        );
        let first_content = c.order.iter().position(|k| *k == "c").unwrap();
        assert!(c.order[first_content..].iter().all(|k| *k == "c"), "{:?}", c.order);
    }
}

#[test]
fn a_follow_up_turn_reuses_the_cache() {
    let engine = load("v3-tiny");
    let mut s = engine.session(SessionOptions::default()).unwrap();
    let mut messages = user("What is 2 + 3?");
    let first = collect(
        s.chat(
            &messages,
            GenerateOptions {
                max_tokens: 6,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    assert_eq!(first.stats.reused_tokens, 0);
    messages.push(Message {
        role: "assistant".into(),
        content: first.content.clone(),
    });
    messages.push(Message {
        role: "user".into(),
        content: "And 4 + 4?".into(),
    });
    let second = collect(
        s.chat(
            &messages,
            GenerateOptions {
                max_tokens: 6,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    assert!(
        second.stats.reused_tokens >= first.stats.prompt_tokens - 2,
        "reused {} of the first turn's {} prompt tokens",
        second.stats.reused_tokens,
        first.stats.prompt_tokens
    );
    assert!(second.stats.prompt_tokens > first.stats.prompt_tokens);
    assert!(second.stats.cache_bytes > 0);
}

#[test]
fn stop_strings_and_max_tokens_end_generation() {
    let engine = load("v2-lite-tiny");
    let mut s = engine.session(SessionOptions::default()).unwrap();
    let c = collect(
        s.complete(
            "the cat",
            GenerateOptions {
                max_tokens: 5,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    assert!(c.stats.generated_tokens <= 5);
    if c.stats.finish_reason != FinishReason::Eos {
        assert_eq!(c.stats.finish_reason, FinishReason::Length);
    }
    // Stop on the first character the model would print: nothing is emitted, the reason is Stop.
    let text = c.content.clone() + &c.reasoning;
    if let Some(ch) = text.chars().find(|c| !c.is_whitespace()) {
        let mut s = engine.session(SessionOptions::default()).unwrap();
        let options = GenerateOptions {
            max_tokens: 5,
            stop: vec![ch.to_string()],
            ..Default::default()
        };
        let stopped = collect(s.complete("the cat", options).unwrap());
        assert_eq!(stopped.stats.finish_reason, FinishReason::Stop);
        assert!(!stopped.content.contains(ch) && !stopped.reasoning.contains(ch));
    }
}

#[test]
fn routing_events_name_k_distinct_experts_per_moe_layer() {
    let engine = load("v3-tiny");
    let c = engine.config().clone();
    let mut s = engine.session(SessionOptions::default()).unwrap();
    let options = GenerateOptions {
        max_tokens: 4,
        record_routing: true,
        ..Default::default()
    };
    let mut g = s.chat(&user("hi"), options).unwrap();
    let mut seen = 0;
    while let Some(ev) = g.next_blocking() {
        if let Event::Routing(r) = ev.unwrap() {
            seen += 1;
            assert_eq!(r.len(), c.num_hidden_layers - c.first_k_dense_replace);
            for layer in r {
                assert_eq!(layer.len(), c.num_experts_per_tok);
                let mut sorted = layer.clone();
                sorted.sort();
                sorted.dedup();
                assert_eq!(sorted.len(), layer.len(), "experts repeat: {layer:?}");
                assert!(layer.iter().all(|&e| (e as usize) < c.n_routed_experts));
            }
        }
    }
    assert!(seen >= 1);
}

/// A prompt longer than one prefill chunk is prefilled a chunk per `step` (each step returning no events),
/// and the generation that follows is the one `next` gives.
#[test]
fn a_long_prompt_is_prefilled_a_chunk_per_step() {
    let engine = load("v3-tiny");
    let prompt = "hello world ".repeat(150);
    let tokens = engine.tokenizer().unwrap().encode(&prompt, true).unwrap().len();
    assert!(
        tokens > 2 * moela::generate::PREFILL_CHUNK,
        "{tokens} tokens: more than two chunks"
    );
    let options = GenerateOptions {
        max_tokens: 6,
        ..GenerateOptions::default()
    };
    let mut s = engine.session(SessionOptions::default()).unwrap();
    let want = collect(s.complete(&prompt, options.clone()).unwrap());

    let mut s = engine.session(SessionOptions::default()).unwrap();
    let mut g = s.complete(&prompt, options).unwrap();
    let mut quiet = 0;
    let mut events = Vec::new();
    while let Some(step) = g.step_blocking() {
        let step = step.unwrap();
        if events.is_empty() && step.is_empty() {
            quiet += 1;
        }
        events.extend(step);
    }
    assert!(
        quiet >= tokens.div_ceil(moela::generate::PREFILL_CHUNK),
        "{quiet} quiet steps for {tokens} tokens"
    );
    let content: String = events
        .iter()
        .filter_map(|e| match e {
            Event::Content(t) | Event::Reasoning(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(content, format!("{}{}", want.reasoning, want.content));
    let Some(Event::Done(stats)) = events.last() else {
        panic!("the last event is Done: {events:?}")
    };
    assert_eq!(
        (stats.prompt_tokens, stats.generated_tokens),
        (want.stats.prompt_tokens, want.stats.generated_tokens)
    );
}

/// One token for each of several sessions in one batched step gives each session the logits it gets
/// stepping alone: more sessions than one launch takes (so the batch is split), every one at its own
/// position, on plain and LoRA queries, f32 weights and packed ones (whose experts read their weights once
/// for all the pairs that chose them: q8, q4, and a Q4_K_M file's q4k, q5 and q6k).
#[test]
fn a_batched_step_gives_each_session_its_logits_alone() {
    for (name, dtype) in [
        ("v2-lite-tiny", moela::WeightDtype::F32),
        ("v3-tiny", moela::WeightDtype::F32),
        ("v3-tiny", moela::WeightDtype::Q8),
        ("v2-lite-tiny", moela::WeightDtype::Q4),
        ("gguf/k256.q4_k_m.gguf", moela::WeightDtype::Q4K),
    ] {
        let options = LoadOptions {
            dtype,
            ..LoadOptions::default()
        };
        let engine = Arc::new(Engine::load_dir(&fixture(name), options, &mut |_| {}).unwrap());
        let tok = engine.tokenizer().unwrap();
        let prompts: Vec<Vec<u32>> = (0..11)
            .map(|i| tok.encode(&"the cat sat on the mat ".repeat(i + 1), true).unwrap())
            .collect();
        let open = || {
            prompts
                .iter()
                .map(|p| {
                    let mut s = engine.session(SessionOptions { max_context: 256 }).unwrap();
                    pollster::block_on(s.prefill(p)).unwrap();
                    s
                })
                .collect::<Vec<_>>()
        };
        let (mut alone, mut batched) = (open(), open());
        for step in 0..3u32 {
            let tokens: Vec<u32> = (0..prompts.len() as u32).map(|i| 5 + 7 * i + step).collect();
            let want: Vec<Vec<f32>> = alone
                .iter_mut()
                .zip(&tokens)
                .map(|(s, &t)| pollster::block_on(s.step(t)).unwrap())
                .collect();
            let mut sessions: Vec<&mut moela::Session> = batched.iter_mut().collect();
            let got = pollster::block_on(moela::Session::step_many(&mut sessions, &tokens)).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let scale = w.iter().map(|v| v.abs()).fold(0f32, f32::max);
                assert!(
                    diff <= 1e-4 * scale.max(1.0),
                    "{name} {dtype:?}, step {step}, session {i}: logits differ by {diff} (scale {scale})"
                );
            }
        }
        for (a, b) in alone.iter().zip(&batched) {
            assert_eq!(a.tokens(), b.tokens());
            assert_eq!(a.cache().len(), b.cache().len());
        }
    }
}

/// Generations stepped together (`Generation::step_all`: decoding ones batched, one prefill chunk per call)
/// give the tokens each gives alone, and finish each with its own reason; a long prompt is prefilled while
/// the others decode.
#[test]
fn generations_stepped_together_answer_as_alone() {
    let engine = load("v3-tiny");
    let long = "hello world ".repeat(150);
    let prompts = ["hello", "the cat sat", long.as_str(), "what is two plus two", "a"];
    let options = |i: usize| GenerateOptions {
        max_tokens: 6 + 3 * i,
        ..GenerateOptions::default()
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut s = engine.session(SessionOptions::default()).unwrap();
            let mut g = s.complete(p, options(i)).unwrap();
            while g.next_blocking().is_some() {}
            g.generated().to_vec()
        })
        .collect();
    let mut generations: Vec<moela::Generation<'static>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let s = engine.session(SessionOptions::default()).unwrap();
            s.into_complete(p, options(i)).map_err(|(e, _)| e).unwrap()
        })
        .collect();
    let mut done = vec![false; prompts.len()];
    let mut calls = 0;
    while done.iter().any(|d| !d) {
        calls += 1;
        assert!(calls < 200, "step_all makes progress");
        let mut all: Vec<&mut moela::Generation<'static>> = generations.iter_mut().collect();
        let results = pollster::block_on(moela::Generation::step_all(&mut all));
        for (i, r) in results.into_iter().enumerate() {
            match r {
                None => done[i] = true,
                Some(events) => {
                    let events = events.unwrap();
                    if events.iter().any(|e| matches!(e, Event::Done(_))) {
                        done[i] = true;
                    }
                }
            }
        }
    }
    for (i, g) in generations.into_iter().enumerate() {
        assert_eq!(g.generated(), &alone[i][..], "generation {i}");
        let session = g.into_session().expect("an owned generation gives its session back");
        assert!(session.tokens().len() >= alone[i].len());
    }
}
