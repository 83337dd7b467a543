//! Sessions and the generation loop: prefill (reusing the cached prefix), sample, decode through the latent
//! cache, and turn tokens into a stream of [`Event`]s with reasoning and answer apart.
//!
//! Per decoded token the only read-back is the logits row of the last position (sampling is on the host).

use std::collections::VecDeque;
use std::sync::Arc;

use burn::tensor::Tensor;
use serde::Serialize;

use crate::cache::LatentCache;
use crate::chat::{Message, prompt_opens_think};
use crate::engine::{Engine, read_rows};
use crate::error::{Error, Result};
use crate::gpu::matvec::MAX_ROWS;
use crate::model::transformer::LogitsFor;
use crate::sample::{Sampler, SamplingOptions};
use crate::text::{StopMatcher, StreamDecoder, TextEvent, ThinkSplitter};

/// Prompts are prefilled in chunks of at most this many tokens, so activation memory stays bounded.
pub const PREFILL_CHUNK: usize = 256;

/// Options of a session.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionOptions {
    /// Tokens the latent cache holds (prompt + answer, over all turns). 0 means
    /// `min(max_position_embeddings, 4096)`.
    pub max_context: usize,
}

/// Options of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Sampling (greedy by default).
    pub sampling: SamplingOptions,
    /// Most tokens to generate (reasoning included).
    pub max_tokens: usize,
    /// Close the reasoning with `</think>` after this many reasoning tokens.
    pub thinking_budget: Option<usize>,
    /// Stop when the text contains one of these (the stop string is not emitted).
    pub stop: Vec<String>,
    /// Emit [`Event::Routing`] after each generated token (one more read-back per token).
    pub record_routing: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            sampling: SamplingOptions::default(),
            max_tokens: 256,
            thinking_budget: None,
            stop: Vec::new(),
            record_routing: false,
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model emitted its end-of-sentence token.
    Eos,
    /// `max_tokens` reached.
    Length,
    /// A stop string appeared.
    Stop,
    /// The session's context is full.
    ContextFull,
    /// The caller stopped it ([`Generation::cancel`]).
    Cancelled,
}

/// Numbers about one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Tokens in the prompt (the whole conversation for chat).
    pub prompt_tokens: usize,
    /// Prompt tokens already in the cache from earlier turns (not prefilled again).
    pub reused_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Of those, tokens generated inside `<think>...</think>`.
    pub reasoning_tokens: usize,
    /// Seconds spent prefilling.
    pub prefill_seconds: f64,
    /// Prefilled tokens per second.
    pub prefill_tokens_per_second: f64,
    /// Seconds spent decoding.
    pub decode_seconds: f64,
    /// Decoded tokens per second.
    pub decode_tokens_per_second: f64,
    /// Bytes of latent cache in use after the generation.
    pub cache_bytes: u64,
    /// Why it stopped.
    pub finish_reason: FinishReason,
}

/// One item of the stream.
#[derive(Debug, Clone, Serialize)]
pub enum Event {
    /// Text inside `<think>...</think>`.
    Reasoning(String),
    /// The answer.
    Content(String),
    /// The experts each MoE layer chose for a generated token when it was fed back through the model,
    /// `[moe layer][k]` (only with [`GenerateOptions::record_routing`]; the last token of a generation is never
    /// fed back, so n tokens give n - 1 of these).
    Routing(Vec<Vec<u32>>),
    /// The end, with numbers.
    Done(Stats),
}

impl Engine {
    /// Opens a session with its own latent cache (call on an `Arc<Engine>`).
    pub fn session(self: &Arc<Self>, options: SessionOptions) -> Result<Session> {
        Session::new(self.clone(), options)
    }

    /// Logits at every position of `tokens`, fed one token at a time through the latent cache (`[T][V]`).
    pub async fn logits_decode(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut cache = self.new_cache(tokens.len().max(1));
        let mut replay = Replay::default();
        let mut rows = Vec::with_capacity(tokens.len());
        for &t in tokens {
            rows.push(self.decode_step(&mut cache, &mut replay, t).await?);
        }
        Ok(rows)
    }

    /// Runs `token` through `cache` (one decode step) and returns its logits: replayed from `replay`'s
    /// recorded step where that covers the step, else run as usual and, natively with moela's kernels,
    /// recorded for the steps after it (`gpu/replay.rs`).
    pub(crate) async fn decode_step(
        &self,
        cache: &mut LatentCache,
        replay: &mut Replay,
        token: u32,
    ) -> Result<Vec<f32>> {
        #[cfg(not(target_arch = "wasm32"))]
        if self.model.replayable() && cache.len() < cache.capacity() {
            use crate::gpu::replay::Recording;
            let pos = cache.len();
            if let Some(plan) = &replay.plan
                && plan.covers(&[pos], &[cache.layers()])
                && let Some(inputs) = self.model.step_inputs(&[token], &[pos])?
            {
                let logits = plan.run(&inputs, &[pos])?;
                cache.advance(1);
                replay.replayed += 1;
                return Ok(logits);
            }
            let recording = Recording::start(&[pos]);
            let out = self.model.forward(&[token], cache, LogitsFor::Last, None)?;
            replay.plan = recording.finish(&out, &[cache.layers()]);
            return Ok(read_rows(out).await?.pop().unwrap_or_default());
        }
        #[cfg(target_arch = "wasm32")]
        let _ = replay;
        let out = self.model.forward(&[token], cache, LogitsFor::Last, None)?;
        Ok(read_rows(out).await?.pop().unwrap_or_default())
    }

    /// One token for each of several caches (`tokens[i]` into `caches[i]`), in batched steps of at most
    /// [`MAX_ROWS`] rows; the logits of each row, read back together.
    ///
    /// Natively with moela's kernels each batch's step is recorded and replayed while the same caches step
    /// together (`gpu/replay.rs`), as a single session's decode steps are.
    pub(crate) async fn decode_rows(&self, caches: &mut [&mut LatentCache], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        #[cfg(not(target_arch = "wasm32"))]
        if self.model.replayable() {
            let mut rows = Vec::with_capacity(tokens.len());
            for (caches, tokens) in caches.chunks_mut(MAX_ROWS).zip(tokens.chunks(MAX_ROWS)) {
                rows.extend(self.replay_rows(caches, tokens).await?);
            }
            return Ok(rows);
        }
        let mut out = Vec::with_capacity(tokens.len().div_ceil(MAX_ROWS));
        for (caches, tokens) in caches.chunks_mut(MAX_ROWS).zip(tokens.chunks(MAX_ROWS)) {
            out.push(self.model.forward_rows(tokens, caches)?);
        }
        let out = if out.len() == 1 {
            out.pop().expect("one batch")
        } else {
            Tensor::cat(out, 0)
        };
        read_rows(out).await
    }

    /// One batched step of at most [`MAX_ROWS`] caches: replayed from a recorded step of the same caches
    /// where one covers their positions, else run and recorded.
    #[cfg(not(target_arch = "wasm32"))]
    async fn replay_rows(&self, caches: &mut [&mut LatentCache], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        match self.replay_or_record(caches, tokens)? {
            Ok(logits) => Ok(logits.chunks(self.config().vocab_size).map(|r| r.to_vec()).collect()),
            Err(out) => read_rows(out).await,
        }
    }

    /// [`Engine::replay_rows`] up to the read-back: the logits of a replayed step (`Ok`), or those of a step
    /// run and recorded, still on the device (`Err`).
    #[cfg(not(target_arch = "wasm32"))]
    fn replay_or_record(
        &self,
        caches: &mut [&mut LatentCache],
        tokens: &[u32],
    ) -> Result<std::result::Result<Vec<f32>, Tensor<2>>> {
        use crate::gpu::replay::Recording;
        /// Batches whose recorded steps are kept.
        const KEPT: usize = 4;
        let positions: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let mut plans = self.batch_plans.lock().unwrap_or_else(|e| e.into_inner());
        {
            let layers: Vec<&[Tensor<2>]> = caches.iter().map(|c| c.layers()).collect();
            if let Some(i) = plans.iter().position(|p| p.covers(&positions, &layers))
                && caches.iter().all(|c| c.len() < c.capacity())
                && let Some(inputs) = self.model.step_inputs(tokens, &positions)?
            {
                let logits = plans[i].run(&inputs, &positions)?;
                for c in caches.iter_mut() {
                    c.advance(1);
                }
                return Ok(Ok(logits));
            }
        }
        let recording = Recording::start(&positions);
        let out = self.model.forward_rows(tokens, caches)?;
        let layers: Vec<&[Tensor<2>]> = caches.iter().map(|c| c.layers()).collect();
        if let Some(plan) = recording.finish(&out, &layers) {
            if plans.len() == KEPT {
                plans.remove(0);
            }
            plans.push(plan);
        }
        Ok(Err(out))
    }
}

/// The recorded decode step of one latent cache, replayed for the steps after it (native adapters with
/// moela's kernels; `gpu/replay.rs`). Empty until the first decode step.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    #[cfg(not(target_arch = "wasm32"))]
    plan: Option<crate::gpu::replay::Plan>,
    /// Steps served by replaying.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) replayed: usize,
}

/// A conversation's state on the GPU: the latent cache and the tokens it holds.
///
/// It holds its engine by `Arc`, so it can live as long as its owner needs (a browser tab, a server task).
#[derive(Debug)]
pub struct Session {
    engine: Arc<Engine>,
    cache: LatentCache,
    tokens: Vec<u32>,
    replay: Replay,
}

impl Drop for Session {
    /// A batch's recorded step that bound this session's cache is dropped with it, so that the cache's
    /// memory goes back to the device's pool (a plan keeps the buffers it binds allocated).
    fn drop(&mut self) {
        #[cfg(not(target_arch = "wasm32"))]
        if let Ok(mut plans) = self.engine.batch_plans.lock() {
            plans.retain(|p| !p.binds_cache(self.cache.layers()));
        }
    }
}

/// Seconds on a monotonic clock (also in browsers), for tok/s only; never asserted on.
fn now() -> f64 {
    static START: std::sync::OnceLock<web_time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(web_time::Instant::now).elapsed().as_secs_f64()
}

impl Session {
    /// Opens a session on `engine` with its own latent cache.
    pub fn new(engine: Arc<Engine>, options: SessionOptions) -> Result<Self> {
        let limit = engine.config().max_position_embeddings;
        let max_context = match options.max_context {
            0 => limit.min(4096),
            n if n > limit => {
                return Err(Error::Limit(format!(
                    "max_context {n} exceeds the model's max_position_embeddings ({limit})"
                )));
            }
            n => n,
        };
        Ok(Self {
            cache: engine.new_cache(max_context),
            engine,
            tokens: Vec::new(),
            replay: Replay::default(),
        })
    }

    /// The engine this session runs on.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Tokens held in the cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The latent cache.
    pub fn cache(&self) -> &LatentCache {
        &self.cache
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) {
        self.cache.truncate(0);
        self.tokens.clear();
    }

    /// Makes the cache hold `prompt`, reusing the longest cached prefix, and returns the logits after its
    /// last token plus how many tokens were reused.
    pub async fn prefill(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize)> {
        let common = self.keep_prefix(prompt)?;
        let mut logits = None;
        for chunk in prompt[common..].chunks(PREFILL_CHUNK) {
            logits = self
                .prefill_chunk(chunk, self.tokens.len() + chunk.len() == prompt.len())
                .await?;
        }
        Ok((logits.unwrap_or_default(), common))
    }

    /// The first part of [`prefill`](Self::prefill): checks `prompt` against the context and cuts the cache
    /// back to the longest prefix it shares with it (never the whole prompt: its last token must run to give
    /// logits). Returns that prefix's length; the rest of the prompt then goes through
    /// [`prefill_chunk`](Self::prefill_chunk) in order.
    pub fn keep_prefix(&mut self, prompt: &[u32]) -> Result<usize> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("empty prompt".into()));
        }
        if prompt.len() > self.cache.capacity() {
            return Err(Error::Limit(format!(
                "prompt of {} tokens is longer than the session's context of {} tokens",
                prompt.len(),
                self.cache.capacity()
            )));
        }
        let common = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let common = common.min(prompt.len() - 1);
        self.cache.truncate(common);
        self.tokens.truncate(common);
        Ok(common)
    }

    /// Runs the next `chunk` of a prompt (at most [`PREFILL_CHUNK`] tokens) into the cache; with `last`, returns
    /// the logits after its last token.
    pub async fn prefill_chunk(&mut self, chunk: &[u32], last: bool) -> Result<Option<Vec<f32>>> {
        if chunk.is_empty() || chunk.len() > PREFILL_CHUNK {
            return Err(Error::InvalidArgument(format!(
                "a prefill chunk of {} tokens: expected 1 to {PREFILL_CHUNK}",
                chunk.len()
            )));
        }
        if self.tokens.len() + chunk.len() > self.cache.capacity() {
            return Err(Error::Limit(format!(
                "{} more tokens do not fit the session's context of {} tokens ({} held)",
                chunk.len(),
                self.cache.capacity(),
                self.tokens.len()
            )));
        }
        let logits = self
            .engine
            .model
            .forward(chunk, &mut self.cache, LogitsFor::Last, None)?;
        self.tokens.extend_from_slice(chunk);
        if !last {
            return Ok(None);
        }
        Ok(Some(read_rows(logits).await?.pop().unwrap_or_default()))
    }

    /// Runs one token through the cache and returns its logits.
    pub async fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        Ok(self.step_with_routing(token, false).await?.0)
    }

    /// One token for each of several sessions of one engine in one batched forward (`tokens[i]` into
    /// `sessions[i]`): the weights are read once for all of them and each attends to its own cache. Returns
    /// each session's logits, in order. A server decodes its streams together this way; a single session takes
    /// [`Session::step`]. On an error no session keeps a partial step.
    pub async fn step_many(sessions: &mut [&mut Session], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        if sessions.len() != tokens.len() {
            return Err(Error::InvalidArgument(format!(
                "{} tokens for {} sessions: expected one token per session",
                tokens.len(),
                sessions.len()
            )));
        }
        match sessions {
            [] => return Ok(Vec::new()),
            [one] => return Ok(vec![one.step(tokens[0]).await?]),
            _ => {}
        }
        let engine = sessions[0].engine.clone();
        if sessions.iter().any(|s| !Arc::ptr_eq(&s.engine, &engine)) {
            return Err(Error::InvalidArgument(
                "sessions of different engines cannot share a step".into(),
            ));
        }
        let mut caches: Vec<&mut LatentCache> = sessions.iter_mut().map(|s| &mut s.cache).collect();
        let logits = engine.decode_rows(&mut caches, tokens).await;
        for (s, &t) in sessions.iter_mut().zip(tokens) {
            match logits {
                Ok(_) => s.tokens.push(t),
                Err(_) => s.cache.truncate(s.tokens.len()),
            }
        }
        logits
    }

    /// [`Session::step`], also returning (when `record`) the experts each MoE layer chose for the token,
    /// `[moe layer][k]`: one more read-back, for visualisations.
    pub async fn step_with_routing(&mut self, token: u32, record: bool) -> Result<(Vec<f32>, Option<Vec<Vec<u32>>>)> {
        if !record {
            let logits = self
                .engine
                .decode_step(&mut self.cache, &mut self.replay, token)
                .await?;
            self.tokens.push(token);
            return Ok((logits, None));
        }
        let mut routing = Vec::new();
        let out = self
            .engine
            .model
            .forward(&[token], &mut self.cache, LogitsFor::Last, Some(&mut routing))?;
        self.tokens.push(token);
        let logits = read_rows(out).await?.pop().unwrap_or_default();
        if routing.is_empty() {
            return Ok((logits, None));
        }
        let k = routing[0].dims()[1];
        let data = Tensor::cat(routing, 0)
            .into_data_async()
            .await
            .map_err(|e| Error::Device(format!("reading routing back: {e:?}")))?;
        let ids: Vec<u32> = data.iter::<i64>().map(|v| v as u32).collect();
        Ok((logits, Some(ids.chunks(k).map(|c| c.to_vec()).collect())))
    }

    /// Continues the conversation `messages` (rendered with the checkpoint's chat template).
    pub fn chat(&mut self, messages: &[Message], options: GenerateOptions) -> Result<Generation<'_>> {
        let (ids, opens) = self.chat_prompt(messages)?;
        Generation::new(Held::Borrowed(self), ids, options, opens).map_err(|(e, _)| e)
    }

    /// `messages` rendered with the chat template and tokenized, and whether the prompt opens `<think>`.
    fn chat_prompt(&self, messages: &[Message]) -> Result<(Vec<u32>, bool)> {
        let (text, ids) = self.engine.require_tokenizer()?.encode_chat(messages, true)?;
        Ok((ids, prompt_opens_think(&text)))
    }

    /// Raw text tokenized (bos added as the tokenizer config says), and whether it opens `<think>`.
    fn text_prompt(&self, prompt: &str) -> Result<(Vec<u32>, bool)> {
        let ids = self.engine.require_tokenizer()?.encode(prompt, true)?;
        Ok((ids, prompt_opens_think(prompt)))
    }

    /// Continues raw text (no chat template; bos added as the tokenizer config says).
    pub fn complete(&mut self, prompt: &str, options: GenerateOptions) -> Result<Generation<'_>> {
        let (ids, opens) = self.text_prompt(prompt)?;
        Generation::new(Held::Borrowed(self), ids, options, opens).map_err(|(e, _)| e)
    }

    /// [`Session::chat`] on a session it takes, so that the generation can be kept in a struct or moved to
    /// another thread (a server's batch); [`Generation::into_session`] gives the session back. On an error the
    /// session comes back with it.
    pub fn into_chat(
        self,
        messages: &[Message],
        options: GenerateOptions,
    ) -> std::result::Result<Generation<'static>, (Error, Box<Session>)> {
        let prompt = self.chat_prompt(messages);
        Generation::owned(Box::new(self), prompt, options)
    }

    /// A generation of a prompt already tokenized, on a session it takes (see [`Session::into_chat`]):
    /// `prompt` as [`Tokenizer::encode_chat`](crate::Tokenizer::encode_chat) or `encode` gave it, and
    /// `opens_think` whether its text leaves a `<think>` block open
    /// ([`prompt_opens_think`](crate::chat::prompt_opens_think)), so that the answer starts in reasoning. For
    /// a caller that tokenized the prompt already (a server checking it against the context).
    pub fn into_generation(
        self,
        prompt: Vec<u32>,
        opens_think: bool,
        options: GenerateOptions,
    ) -> std::result::Result<Generation<'static>, (Error, Box<Session>)> {
        Generation::owned(Box::new(self), Ok((prompt, opens_think)), options)
    }

    /// [`Session::complete`] on a session it takes (see [`Session::into_chat`]).
    pub fn into_complete(
        self,
        prompt: &str,
        options: GenerateOptions,
    ) -> std::result::Result<Generation<'static>, (Error, Box<Session>)> {
        let prompt = self.text_prompt(prompt);
        Generation::owned(Box::new(self), prompt, options)
    }
}

/// The session a generation runs in: its caller's, or its own ([`Session::into_chat`]).
enum Held<'s> {
    Borrowed(&'s mut Session),
    Owned(Box<Session>),
}

impl std::ops::Deref for Held<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        match self {
            Held::Borrowed(s) => s,
            Held::Owned(s) => s,
        }
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Session {
        match self {
            Held::Borrowed(s) => s,
            Held::Owned(s) => s,
        }
    }
}

/// A generation in progress: call [`Generation::next`] until it returns `None`.
pub struct Generation<'s> {
    session: Held<'s>,
    options: GenerateOptions,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    splitter: ThinkSplitter,
    eos: Vec<u32>,
    close_think: Vec<u32>,
    prompt: Option<Vec<u32>>,
    /// Where the prefill has got to in `prompt` (`None` before it starts).
    prefilled: Option<usize>,
    prompt_tokens: usize,
    reused: usize,
    logits: Vec<f32>,
    forced: VecDeque<u32>,
    generated: Vec<u32>,
    reasoning_tokens: usize,
    budget_spent: bool,
    pending: VecDeque<Event>,
    finished: bool,
    prefill_seconds: f64,
    decode_start: f64,
}

impl Generation<'static> {
    /// A generation that owns its session; on an error the session comes back with it.
    fn owned(
        session: Box<Session>,
        prompt: Result<(Vec<u32>, bool)>,
        options: GenerateOptions,
    ) -> std::result::Result<Self, (Error, Box<Session>)> {
        let (ids, opens_think) = match prompt {
            Ok(p) => p,
            Err(e) => return Err((e, session)),
        };
        Generation::new(Held::Owned(session), ids, options, opens_think).map_err(|(e, held)| match held {
            Held::Owned(s) => (e, s),
            Held::Borrowed(_) => unreachable!("an owned generation holds its own session"),
        })
    }
}

impl<'s> Generation<'s> {
    fn new(
        session: Held<'s>,
        prompt: Vec<u32>,
        options: GenerateOptions,
        opens_think: bool,
    ) -> std::result::Result<Self, (Error, Held<'s>)> {
        let engine = session.engine.clone();
        let checked = (|| {
            let tok = engine.require_tokenizer()?;
            let sampler = Sampler::new(options.sampling.clone())?;
            if options.max_tokens == 0 {
                return Err(Error::InvalidArgument("max_tokens must be at least 1".into()));
            }
            let mut eos: Vec<u32> = tok.eos_id().into_iter().collect();
            if let Some(e) = engine.config().eos_token_id
                && !eos.contains(&e)
            {
                eos.push(e);
            }
            let close_think = if options.thinking_budget.is_some() {
                tok.encode("\n</think>\n\n", false)?
            } else {
                Vec::new()
            };
            Ok((sampler, eos, close_think))
        })();
        let (sampler, eos, close_think) = match checked {
            Ok(parts) => parts,
            Err(e) => return Err((e, session)),
        };
        Ok(Self {
            prompt_tokens: prompt.len(),
            prompt: Some(prompt),
            prefilled: None,
            decoder: StreamDecoder::new(true),
            stop: StopMatcher::new(&options.stop),
            splitter: ThinkSplitter::new("<think>", "</think>", opens_think),
            session,
            options,
            sampler,
            eos,
            close_think,
            reused: 0,
            logits: Vec::new(),
            forced: VecDeque::new(),
            generated: Vec::new(),
            reasoning_tokens: 0,
            budget_spent: false,
            pending: VecDeque::new(),
            finished: false,
            prefill_seconds: 0.0,
            decode_start: 0.0,
        })
    }

    /// One step of work, with the events it produced (often none): a chunk of the prompt's prefill (at most
    /// [`PREFILL_CHUNK`] tokens), or one token. `None` once the generation has finished and its events were
    /// taken. Callers that share a device between generations (`moela serve`) take turns between steps, so a
    /// long prompt does not hold it for its whole prefill.
    pub async fn step(&mut self) -> Option<Result<Vec<Event>>> {
        if self.pending.is_empty() {
            if self.finished {
                return None;
            }
            if let Err(e) = self.advance().await {
                self.finished = true;
                return Some(Err(e));
            }
        }
        self.take_pending()
    }

    /// [`Generation::step`] for native callers that can block.
    pub fn step_blocking(&mut self) -> Option<Result<Vec<Event>>> {
        pollster::block_on(self.step())
    }

    /// The next event, or `None` after [`Event::Done`].
    pub async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(Ok(ev));
            }
            if self.finished {
                return None;
            }
            if let Err(e) = self.advance().await {
                self.finished = true;
                return Some(Err(e));
            }
        }
    }

    /// [`Generation::next`] for native callers that can block.
    pub fn next_blocking(&mut self) -> Option<Result<Event>> {
        pollster::block_on(self.next())
    }

    /// Stops the generation between tokens: the text held back is released and [`Event::Done`] follows with
    /// [`FinishReason::Cancelled`]. Does nothing once the generation has finished.
    pub fn cancel(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        self.prompt = None;
        self.finish(FinishReason::Cancelled)
    }

    /// Token ids generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// The session of a generation started with [`Session::into_chat`] or [`Session::into_complete`], holding
    /// the conversation so far (`None` for one that borrows its session).
    pub fn into_session(self) -> Option<Session> {
        match self.session {
            Held::Owned(s) => Some(*s),
            Held::Borrowed(_) => None,
        }
    }

    /// Steps several generations at once, each as [`Generation::step`] would, except that the tokens of all
    /// those decoding go through the model together ([`Session::step_many`]: the weights are read once per
    /// step for all of them) and that at most one of them prefills per call, one chunk of its prompt, so
    /// that a new prompt holds up the others' streams for one chunk at a time. The others still prefilling
    /// wait for a later call (their result is no events). Generations that record routing step alone.
    /// Returns one result per generation, in order.
    pub async fn step_all(generations: &mut [&mut Generation<'_>]) -> Vec<Option<Result<Vec<Event>>>> {
        let mut out: Vec<Option<Result<Vec<Event>>>> = Vec::with_capacity(generations.len());
        let mut prefilled = false;
        let mut feed: Vec<(usize, u32)> = Vec::new();
        for (i, g) in generations.iter_mut().enumerate() {
            if !g.pending.is_empty() || g.finished {
                out.push(g.take_pending());
                continue;
            }
            let step = if g.prompt.is_some() {
                if prefilled {
                    Ok(())
                } else {
                    prefilled = true;
                    g.prefill_step().await
                }
            } else {
                match g.next_token() {
                    Ok(Some(token)) if g.options.record_routing => g.feed(token).await,
                    Ok(Some(token)) => {
                        feed.push((i, token));
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                }
            };
            out.push(step.err().map(|e| {
                g.finished = true;
                Err(e)
            }));
        }
        if !feed.is_empty() {
            let tokens: Vec<u32> = feed.iter().map(|&(_, t)| t).collect();
            let mut fed = feed.iter().map(|&(i, _)| i).peekable();
            let mut sessions: Vec<&mut Session> = Vec::with_capacity(feed.len());
            for (i, g) in generations.iter_mut().enumerate() {
                if fed.next_if_eq(&i).is_some() {
                    sessions.push(&mut g.session);
                }
            }
            match Session::step_many(&mut sessions, &tokens).await {
                Ok(logits) => {
                    for (&(i, _), logits) in feed.iter().zip(logits) {
                        generations[i].logits = logits;
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    let mut first = Some(e);
                    for &(i, _) in &feed {
                        generations[i].finished = true;
                        let e = first
                            .take()
                            .unwrap_or_else(|| Error::Device(format!("a batched decode step failed: {message}")));
                        out[i] = Some(Err(e));
                    }
                }
            }
        }
        out.into_iter()
            .zip(generations.iter_mut())
            .map(|(o, g)| o.or_else(|| g.take_pending()))
            .collect()
    }

    /// [`Generation::step_all`] for native callers that can block.
    pub fn step_all_blocking(generations: &mut [&mut Generation<'_>]) -> Vec<Option<Result<Vec<Event>>>> {
        pollster::block_on(Self::step_all(generations))
    }

    fn emit(&mut self, events: Vec<TextEvent>) {
        for ev in events {
            self.pending.push_back(match ev {
                TextEvent::Reasoning(t) => Event::Reasoning(t),
                TextEvent::Content(t) => Event::Content(t),
            });
        }
    }

    async fn advance(&mut self) -> Result<()> {
        if self.prompt.is_some() {
            return self.prefill_step().await;
        }
        match self.next_token()? {
            Some(token) => self.feed(token).await,
            None => Ok(()),
        }
    }

    /// One chunk of the prompt through the model (the first one after cutting the cache back to the prefix
    /// it shares with the prompt).
    async fn prefill_step(&mut self) -> Result<()> {
        let Some(prompt) = &self.prompt else {
            return Ok(());
        };
        let t0 = now();
        let at = match self.prefilled {
            Some(at) => at,
            None => {
                let common = self.session.keep_prefix(prompt)?;
                self.reused = common;
                common
            }
        };
        let end = (at + PREFILL_CHUNK).min(prompt.len());
        let last = end == prompt.len();
        let logits = self.session.prefill_chunk(&prompt[at..end], last).await?;
        self.prefill_seconds += now() - t0;
        self.prefilled = Some(end);
        if let Some(logits) = logits {
            self.logits = logits;
            self.prompt = None;
            self.decode_start = now();
        }
        Ok(())
    }

    /// The next token (sampled from the last logits, or forced), with its text emitted: returned when it is
    /// to be fed back through the model, `None` when it ended the generation.
    fn next_token(&mut self) -> Result<Option<u32>> {
        let token = match self.forced.pop_front() {
            Some(t) => t,
            // The session's tokens are the prompt and every generated token fed so far.
            None => self.sampler.sample(&mut self.logits, &self.session.tokens)?,
        };
        self.generated.push(token);
        if self.eos.contains(&token) {
            return self.finish(FinishReason::Eos).map(|()| None);
        }
        let tok = self.session.engine.require_tokenizer()?;
        let piece = self.decoder.push(tok, token)?.unwrap_or_default();
        if self.splitter.in_reasoning() {
            self.reasoning_tokens += 1;
        }
        let out = self.stop.push(&piece);
        let events = self.splitter.push(&out.text);
        self.emit(events);
        if out.stop.is_some() {
            return self.finish(FinishReason::Stop).map(|()| None);
        }
        if let Some(budget) = self.options.thinking_budget
            && !self.budget_spent
            && self.splitter.in_reasoning()
            && self.reasoning_tokens >= budget
        {
            self.budget_spent = true;
            self.forced.extend(self.close_think.iter().copied());
        }
        if self.generated.len() >= self.options.max_tokens {
            return self.finish(FinishReason::Length).map(|()| None);
        }
        if self.session.cache.len() >= self.session.cache.capacity() {
            return self.finish(FinishReason::ContextFull).map(|()| None);
        }
        Ok(Some(token))
    }

    /// Runs `token` through the model for the next logits (and its routing, when recorded).
    async fn feed(&mut self, token: u32) -> Result<()> {
        let (logits, routing) = self
            .session
            .step_with_routing(token, self.options.record_routing)
            .await?;
        self.logits = logits;
        if let Some(r) = routing {
            self.pending.push_back(Event::Routing(r));
        }
        Ok(())
    }

    /// The events waiting to be taken; `None` once the generation has finished and they were taken.
    fn take_pending(&mut self) -> Option<Result<Vec<Event>>> {
        if self.finished && self.pending.is_empty() {
            return None;
        }
        Some(Ok(self.pending.drain(..).collect()))
    }

    fn finish(&mut self, reason: FinishReason) -> Result<()> {
        let tok = self.session.engine.require_tokenizer()?;
        let tail = self.decoder.flush(tok)?.unwrap_or_default();
        let out = self.stop.push(&tail);
        let mut events = self.splitter.push(&out.text);
        if reason != FinishReason::Stop {
            let rest = self.stop.finish();
            events.extend(self.splitter.push(&rest));
        }
        events.extend(self.splitter.finish());
        self.emit(events);
        let decode_seconds = now() - self.decode_start;
        let prefilled = self.prompt_tokens - self.reused;
        self.pending.push_back(Event::Done(Stats {
            prompt_tokens: self.prompt_tokens,
            reused_tokens: self.reused,
            generated_tokens: self.generated.len(),
            reasoning_tokens: self.reasoning_tokens,
            prefill_seconds: self.prefill_seconds,
            prefill_tokens_per_second: rate(prefilled, self.prefill_seconds),
            decode_seconds,
            decode_tokens_per_second: rate(self.generated.len().saturating_sub(1), decode_seconds),
            cache_bytes: self.session.cache.bytes_used(),
            finish_reason: reason,
        }));
        self.finished = true;
        Ok(())
    }
}

fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 { n as f64 / seconds } else { 0.0 }
}
