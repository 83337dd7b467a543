//! Training data: problems drawn from the task generator (never the held-out evaluation problems), the
//! byte-level BPE tokenizer trained on them, the R1-style chat template, and token batches.

use std::collections::HashSet;

use anyhow::{Context, Result};
use moela::{Message, Tokenizer};
use moela_tools::arith::{self, Kind, Op, Problem};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

/// DeepSeek-R1's special tokens.
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
/// End of sentence (and of every assistant turn).
pub const EOS: &str = "<｜end▁of▁sentence｜>";
/// Opens a user turn.
pub const USER: &str = "<｜User｜>";
/// Opens an assistant turn.
pub const ASSISTANT: &str = "<｜Assistant｜>";

/// R1's chat template, reduced to what this model uses: system text first, user and assistant turns, earlier
/// assistant turns without their reasoning, and a generation prompt that opens `<think>\n`.
pub const CHAT_TEMPLATE: &str = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}\
{{ bos_token }}\
{%- for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}{% endfor %}\
{%- for message in messages %}\
{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}\
{%- elif message['role'] == 'assistant' %}{% set content = message['content'] %}\
{%- if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}\
{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}\
{%- endif %}\
{%- endfor %}\
{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}";

/// Draws training problems from `seed`, skipping every held-out evaluation problem.
pub struct ProblemStream {
    rng: ChaCha8Rng,
    held_out: HashSet<(i64, Vec<(Op, i64)>)>,
}

impl ProblemStream {
    /// A stream from `seed`.
    pub fn new(seed: u64, held_out: HashSet<(i64, Vec<(Op, i64)>)>) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            held_out,
        }
    }

    /// The next training problem: 40% addition, 50% subtraction, 10% word problems (each several times
    /// longer than a single operation; attention makes them costlier still). Operands have exactly 3 digits
    /// half of the time (the shape users ask most) and 1-3 digits otherwise; a quarter of the subtractions
    /// take two close 3-digit operands, whose short results need their leading zeros dropped.
    pub fn next_problem(&mut self) -> Problem {
        self.draw(0.40, 0.90, 0.25)
    }

    /// The next GRPO prompt, drawn towards what the model finds hardest: 50% subtraction (half of them with
    /// close operands), 50% word problems.
    pub fn next_hard_problem(&mut self) -> Problem {
        self.draw(0.0, 0.5, 0.5)
    }

    /// Addition below `add`, subtraction below `sub`, word problems above; `close` of the subtractions with
    /// operands less than 100 apart.
    fn draw(&mut self, add: f64, sub: f64, close: f64) -> Problem {
        loop {
            let r: f64 = self.rng.random();
            let any_length = self.rng.random_bool(0.5);
            let p = if r < add {
                arith::make(Kind::Add { digits: 3 }, &mut self.rng, any_length)
            } else if r < sub {
                if self.rng.random_bool(close) {
                    let a: i64 = self.rng.random_range(100..1000);
                    let b = (a + self.rng.random_range(-99..100)).clamp(100, 999);
                    arith::binary(a, Op::Sub, b, &mut self.rng)
                } else {
                    arith::make(Kind::Sub { digits: 3 }, &mut self.rng, any_length)
                }
            } else {
                arith::make(Kind::Word, &mut self.rng, true)
            };
            if !self.held_out.contains(&arith::key(&p)) {
                return p;
            }
        }
    }
}

/// Trains the byte-level BPE (digits always split one by one) on `texts`; returns `tokenizer.json`.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<String> {
    let special = [BOS, EOS, USER, ASSISTANT];
    let think = ["<think>", "</think>"];
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(
                special
                    .iter()
                    .map(|s| AddedToken::from(*s, true))
                    .chain(think.iter().map(|s| AddedToken::from(*s, false)))
                    .collect(),
            )
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]))));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    tok.add_special_tokens(&special.iter().map(|s| AddedToken::from(*s, true)).collect::<Vec<_>>());
    tok.add_tokens(&think.iter().map(|s| AddedToken::from(*s, false)).collect::<Vec<_>>());
    tok.to_string(true)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))
}

/// `tokenizer_config.json`: R1's tokens and template; the template writes the BOS itself.
pub fn tokenizer_config() -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1024,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }))
    .expect("static JSON")
}

/// One training example: the ids, and which positions' next tokens are learned (the assistant's).
#[derive(Debug, Clone)]
pub struct Example {
    /// Prompt then completion ids (EOS last).
    pub ids: Vec<u32>,
    /// Prompt length: targets start at the token after it.
    pub prompt_len: usize,
}

/// The chat prompt for a question, as the engine renders it (ending in `<think>\n`).
pub fn prompt_ids(tok: &Tokenizer, question: &str) -> Result<Vec<u32>> {
    Ok(tok.encode_chat(&[Message::user(question)], true)?.1)
}

/// A problem with its worked solution, tokenised the way generation sees it.
pub fn example(tok: &Tokenizer, p: &Problem, eos: u32) -> Result<Example> {
    let mut ids = prompt_ids(tok, &p.question)?;
    let prompt_len = ids.len();
    ids.extend(tok.encode(&p.completion(), false).context("encoding a solution")?);
    ids.push(eos);
    Ok(Example { ids, prompt_len })
}

/// A padded batch: `[B, T]` ids, next-token targets and a 0/1 weight per position.
pub struct Batch {
    /// Sequences.
    pub b: usize,
    /// Padded length.
    pub t: usize,
    /// `[B*T]` input ids.
    pub ids: Vec<u32>,
    /// `[B*T]` target ids (the next token).
    pub targets: Vec<i64>,
    /// `[B*T]` 1 where the target is learned.
    pub mask: Vec<f32>,
}

impl Batch {
    /// Pads `examples` with `pad`; a position learns its next token when that token is the assistant's.
    pub fn new(examples: &[Example], pad: u32) -> Self {
        let b = examples.len();
        let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
        let mut ids = vec![pad; b * t];
        let mut targets = vec![i64::from(pad); b * t];
        let mut mask = vec![0f32; b * t];
        for (i, e) in examples.iter().enumerate() {
            let row = i * t;
            ids[row..row + e.ids.len()].copy_from_slice(&e.ids);
            for j in 0..e.ids.len() - 1 {
                targets[row + j] = i64::from(e.ids[j + 1]);
                if j + 1 >= e.prompt_len {
                    mask[row + j] = 1.0;
                }
            }
        }
        Self {
            b,
            t,
            ids,
            targets,
            mask,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_splits_digits_and_keeps_the_special_tokens_whole() {
        let mut s = ProblemStream::new(3, HashSet::new());
        let texts: Vec<String> = (0..300).map(|_| s.next_problem().completion()).collect();
        let json = train_tokenizer(&texts, 300).unwrap();
        let tok = Tokenizer::from_bytes(json.as_bytes(), Some(tokenizer_config().as_bytes())).unwrap();
        let ids = tok.encode("<think>\n457 + 389", false).unwrap();
        let pieces: Vec<String> = ids.iter().map(|&i| tok.decode(&[i], false).unwrap()).collect();
        assert_eq!(pieces[0], "<think>");
        assert!(
            pieces
                .iter()
                .all(|p| p.trim().len() <= 1 || !p.trim().chars().all(|c| c.is_ascii_digit()))
        );
        let (text, ids) = tok.encode_chat(&[Message::user("What is 1 + 2?")], true).unwrap();
        assert_eq!(text, format!("{BOS}{USER}What is 1 + 2?{ASSISTANT}<think>\n"));
        assert_eq!(ids[0], tok.bos_id().unwrap());
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }

    #[test]
    fn batches_learn_only_the_assistant_tokens() {
        let e = Example {
            ids: vec![5, 6, 7, 8],
            prompt_len: 2,
        };
        let short = Example {
            ids: vec![5, 9, 1],
            prompt_len: 2,
        };
        let b = Batch::new(&[e, short], 1);
        assert_eq!((b.b, b.t), (2, 4));
        assert_eq!(b.targets[..3], [6, 7, 8]);
        assert_eq!(b.mask, vec![0., 1., 1., 0., 0., 1., 0., 0.]);
    }
}
