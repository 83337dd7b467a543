//! `moela serve`: an OpenAI-compatible HTTP server on one engine (axum on tokio).
//!
//! - Slots: each of `--parallel` slots keeps a session, with its own latent cache. A request takes the free
//!   slot whose cached tokens share the longest prefix with its prompt (else the least recently used one),
//!   so a follow-up that repeats the conversation so far prefills only its new turn.
//! - Batches: one engine thread steps every active generation together (`Generation::step_all`): the
//!   next token of all the streams that are decoding goes through the model in one batched forward, which
//!   reads the weights once for all of them, each row attending to its own slot's cache. A new prompt is
//!   prefilled one chunk per step between them, so it holds the others up for one chunk at a time.
//! - Back-pressure: with every slot busy a request waits in a queue of `--queue` places; past it, 503 with
//!   `Retry-After`. A client that disconnects cancels its generation before its next token and frees its
//!   slot.
//! - `/v1/chat/completions` (streamed as server-sent events or not), `/v1/completions`, `/v1/models`,
//!   `/health`; the text inside `<think>` is `reasoning_content`, the answer `content`. moela's own
//!   additions: the last chunk's (and a whole answer's) `x_moela` with the generation's numbers (speeds, cache
//!   in use), the experts of each token when asked (`moela_routing`), and `GET /moela/info`, the model's
//!   facts as `moela info --json` gives them.
//! - With a `web` folder, every other path is a file of it: the demo page, whose "This server" engine is
//!   this server.

mod openai;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::handler::HandlerWithoutStateExt;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use moela::{Engine, Event, Generation, Session, SessionOptions, Stats};
use openai::{ApiError, Request, finish_reason, usage};

/// How the server is set up.
pub struct Options {
    /// Where to listen.
    pub addr: SocketAddr,
    /// Slots: requests generated at once.
    pub parallel: usize,
    /// Requests that may wait for a slot; more get 503.
    pub queue: usize,
    /// Tokens each slot's cache holds (0: the engine's default).
    pub max_context: usize,
    /// Largest request body, in bytes (413 past it).
    pub body_limit: usize,
    /// The model's name in `/v1/models` and responses.
    pub model_id: String,
    /// A folder served at `/` (the demo page: `web/`), or none.
    pub web: Option<std::path::PathBuf>,
}

struct Slot {
    /// The slot's session, or `None` while a request holds it.
    session: Option<Session>,
    /// When it was last released (a counter), for least-recently-used reuse.
    used: u64,
}

struct Server {
    engine: Arc<Engine>,
    model_id: String,
    created: u64,
    slots: Mutex<Vec<Slot>>,
    free: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue: usize,
    /// Where requests go to be generated: the engine thread ([`drive`]).
    jobs: std::sync::mpsc::Sender<Job>,
    clock: AtomicU64,
    context: usize,
    next_id: AtomicU64,
    /// Generations stopped because their client left.
    cancelled: AtomicU64,
}

/// A slot held by one request: its session goes back to the slot (and the slot's permit to the pool) when
/// this is dropped, whatever ended the request.
struct Lease {
    server: Arc<Server>,
    index: usize,
    session: Option<Session>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut slots = self.server.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots[self.index].session = self.session.take();
        slots[self.index].used = self.server.clock.fetch_add(1, Ordering::Relaxed);
    }
}

/// One request in the queue, for as long as this lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs the server until Ctrl-C. Prints the address it listens on (`http://HOST:PORT`) on stdout first.
pub fn run(engine: Arc<Engine>, options: Options) -> anyhow::Result<()> {
    let sessions = (0..options.parallel.max(1))
        .map(|_| {
            engine
                .session(SessionOptions {
                    max_context: options.max_context,
                })
                .map(|s| Slot {
                    session: Some(s),
                    used: 0,
                })
        })
        .collect::<moela::Result<Vec<_>>>()?;
    let context = sessions[0].session.as_ref().map_or(0, |s| s.cache().capacity());
    let (jobs, queue) = std::sync::mpsc::channel();
    let server = Arc::new(Server {
        model_id: options.model_id,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        free: Arc::new(Semaphore::new(sessions.len())),
        slots: Mutex::new(sessions),
        waiting: AtomicUsize::new(0),
        queue: options.queue,
        jobs,
        clock: AtomicU64::new(1),
        context,
        next_id: AtomicU64::new(1),
        cancelled: AtomicU64::new(0),
        engine,
    });
    std::thread::Builder::new()
        .name("moela-engine".into())
        .spawn(move || drive(queue))?;
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/moela/info", get(info));
    let app = match &options.web {
        Some(dir) => {
            app.fallback_service(tower_http::services::ServeDir::new(dir).not_found_service(not_found.into_service()))
        }
        None => app.fallback(not_found),
    };
    let app = app
        .layer(DefaultBodyLimit::max(options.body_limit))
        .layer(axum::middleware::map_response(mark))
        .with_state(server.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(options.addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", options.addr))?;
        let addr = listener.local_addr()?;
        let slots = server.slots.lock().map_or(0, |s| s.len());
        println!(
            "moela serve: http://{addr} (model {}, {slots} slots of {context} tokens{})",
            server.model_id,
            if options.web.is_some() {
                "; the demo page at /"
            } else {
                ""
            }
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        anyhow::Ok(())
    })
}

impl Server {
    /// Fails unless `model` (when given) names the served model.
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.model_id => Err(ApiError {
                param: Some("model".into()),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "model_not_found",
                    format!(
                        "the model {m:?} is not served here; this server has {:?}",
                        self.model_id
                    ),
                )
            }),
            _ => Ok(()),
        }
    }

    /// A free slot for a prompt of `ids`: the one whose cache shares the longest prefix with it, else the
    /// least recently used. Waits in the queue when every slot is busy; 503 when the queue is full too.
    async fn lease(self: &Arc<Self>, ids: &[u32]) -> Result<Lease, ApiError> {
        let permit = match self.free.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.queue {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "server_busy",
                        format!(
                            "every slot is busy and {} requests are waiting already; retry shortly",
                            self.queue
                        ),
                    ));
                }
                // Counted as waiting until this ends, however it ends: a client that leaves while queued
                // drops this future at the await.
                let _waiting = Waiting(&self.waiting);
                self.free.clone().acquire_owned().await.map_err(|_| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "shutting_down",
                        "the server is stopping",
                    )
                })?
            }
        };
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let shared = |s: &Session| s.tokens().iter().zip(ids).take_while(|(a, b)| a == b).count();
        let index = slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| slot.session.as_ref().map(|s| (i, shared(s), slot.used)))
            .max_by_key(|&(_, common, used)| (common, std::cmp::Reverse(used)))
            .map(|(i, ..)| i)
            .expect("a permit guarantees a free slot");
        let session = slots[index].session.take();
        Ok(Lease {
            server: self.clone(),
            index,
            session,
            _permit: permit,
        })
    }

    fn id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:x}{:06x}",
            self.created,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// A request on its way to the engine thread, with its prompt's tokens, its slot and where its events go.
struct Job {
    lease: Lease,
    request: Request,
    prompt: Vec<u32>,
    /// The prompt's text leaves a `<think>` block open.
    opens_think: bool,
    tx: Events,
}

/// Where a request's events go (unbounded: the engine thread never waits for a slow client).
type Events = mpsc::UnboundedSender<moela::Result<Event>>;

/// A generation on the engine thread.
struct Active {
    generation: Generation<'static>,
    lease: Lease,
    tx: Events,
}

impl Active {
    /// Gives the slot its session back (and the slot's permit to the pool); returns where the events go,
    /// for the last of them: a client hears of the end after its slot, with its cache, is free again.
    fn release(self) -> Events {
        let Active {
            generation,
            mut lease,
            tx,
        } = self;
        lease.session = generation.into_session();
        tx
    }

    /// Ends the request with an error after a step that failed part-way: its slot's session is reset, since
    /// its cache may hold a partial step.
    fn fail(self) {
        let Active {
            generation,
            mut lease,
            tx,
        } = self;
        lease.session = generation.into_session().map(|mut s| {
            s.reset();
            s
        });
        drop(lease);
        let _ = tx.send(Err(moela::Error::Device("the engine failed during a step".into())));
    }

    /// Stops the generation because its client left, and frees its slot.
    fn cancel(mut self) {
        let _ = self.generation.cancel();
        self.lease.server.cancelled.fetch_add(1, Ordering::Relaxed);
        self.release();
    }
}

/// The engine thread: starts the requests that arrive and steps all active generations together until the
/// server stops (`Generation::step_all`: one batched forward for the decoding streams, at most one chunk of
/// prefill).
fn drive(jobs: std::sync::mpsc::Receiver<Job>) {
    let mut active: Vec<Active> = Vec::new();
    loop {
        // Wait for work when there is none; take every request that arrived since the last step.
        if active.is_empty() {
            match jobs.recv() {
                Ok(job) => active.extend(begin(job)),
                Err(_) => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            active.extend(begin(job));
        }
        // Clients that left are cancelled before the step.
        let (left, staying): (Vec<Active>, Vec<Active>) = active.drain(..).partition(|a| a.tx.is_closed());
        left.into_iter().for_each(Active::cancel);
        active = staying;
        if active.is_empty() {
            continue;
        }
        let mut generations: Vec<&mut Generation<'static>> = active.iter_mut().map(|a| &mut a.generation).collect();
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pollster::block_on(Generation::step_all(&mut generations))
        }));
        let results = match step {
            Ok(results) => results,
            Err(_) => {
                // Not expected; the requests in flight end with an error and their slots start afresh.
                for a in active.drain(..) {
                    a.fail();
                }
                continue;
            }
        };
        for (a, result) in std::mem::take(&mut active).into_iter().zip(results) {
            active.extend(deliver(a, result));
        }
    }
}

/// Starts `job`'s generation in its slot's session; an error goes to its client at once.
fn begin(job: Job) -> Option<Active> {
    let Job {
        mut lease,
        request,
        prompt,
        opens_think,
        tx,
    } = job;
    let session = lease.session.take()?;
    match session.into_generation(prompt, opens_think, request.options) {
        Ok(generation) => Some(Active { generation, lease, tx }),
        Err((e, session)) => {
            lease.session = Some(*session);
            drop(lease);
            let _ = tx.send(Err(e));
            None
        }
    }
}

/// Sends one step's events to `a`'s client; returns `a` while its generation goes on.
fn deliver(a: Active, result: Option<moela::Result<Vec<Event>>>) -> Option<Active> {
    let events = match result {
        None => {
            a.release();
            return None;
        }
        Some(Err(e)) => {
            let _ = a.release().send(Err(e));
            return None;
        }
        Some(Ok(events)) => events,
    };
    for event in events {
        if let Event::Done(_) = event {
            let _ = a.release().send(Ok(event));
            return None;
        }
        if a.tx.send(Ok(event)).is_err() {
            a.cancel();
            return None;
        }
    }
    Some(a)
}

/// Reads a request, checks it against the model and the context, and starts its generation: the events
/// arrive on the returned channel.
async fn start(
    server: &Arc<Server>,
    body: Result<Bytes, BytesRejection>,
    chat: bool,
) -> Result<(Request, mpsc::UnboundedReceiver<moela::Result<Event>>), ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
                format!("the request body is larger than this server takes ({e})"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad_body",
                e.to_string(),
            )
        }
    })?;
    let request = Request::parse(&body, chat)?;
    server.check_model(request.model.as_deref())?;
    let tok = server
        .engine
        .require_tokenizer()
        .map_err(|e| ApiError::from_engine(&e))?;
    // Tokenized once, here: checked against the context, matched against the slots' caches, generated.
    let (ids, opens_think) = match (&request.messages, &request.prompt) {
        (Some(m), _) => tok
            .encode_chat(m, true)
            .map(|(text, ids)| (ids, moela::chat::prompt_opens_think(&text))),
        (None, Some(p)) => tok.encode(p, true).map(|ids| (ids, moela::chat::prompt_opens_think(p))),
        (None, None) => Ok((Vec::new(), false)),
    }
    .map_err(|e| ApiError::from_engine(&e))?;
    if ids.len() >= server.context {
        return Err(ApiError {
            param: Some(if chat { "messages" } else { "prompt" }.into()),
            ..ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "context_length_exceeded",
                format!(
                    "the prompt is {} tokens, and this server's context is {} tokens (the answer needs at least one)",
                    ids.len(),
                    server.context
                ),
            )
        })?;
    }
    let mut request = request;
    request.options.max_tokens = request.options.max_tokens.min(server.context - ids.len());
    let lease = server.lease(&ids).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        lease,
        request: request.clone(),
        prompt: ids,
        opens_think,
        tx,
    };
    if server.jobs.send(job).is_err() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting_down",
            "the server is stopping",
        ));
    }
    Ok((request, rx))
}

async fn chat_completions(State(server): State<Arc<Server>>, body: Result<Bytes, BytesRejection>) -> Response {
    respond(server, body, true).await
}

async fn completions(State(server): State<Arc<Server>>, body: Result<Bytes, BytesRejection>) -> Response {
    respond(server, body, false).await
}

async fn respond(server: Arc<Server>, body: Result<Bytes, BytesRejection>, chat: bool) -> Response {
    let (request, mut rx) = match start(&server, body, chat).await {
        Ok(started) => started,
        Err(e) => return e.into_response(),
    };
    let shape = Shape {
        id: server.id(if chat { "chatcmpl" } else { "cmpl" }),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: server.model_id.clone(),
        chat,
        include_usage: request.include_usage,
    };
    if request.stream {
        return stream(shape, rx).into_response();
    }
    let (mut reasoning, mut content) = (String::new(), String::new());
    while let Some(item) = rx.recv().await {
        match item {
            Ok(Event::Reasoning(t)) => reasoning.push_str(&t),
            Ok(Event::Content(t)) => content.push_str(&t),
            Ok(Event::Routing(_)) => {}
            Ok(Event::Done(stats)) => return Json(shape.whole(&reasoning, &content, &stats)).into_response(),
            Err(e) => return ApiError::from_engine(&e).into_response(),
        }
    }
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "engine_error",
        "the generation ended without a result",
    )
    .into_response()
}

/// What every response and chunk of one request says about itself.
struct Shape {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    include_usage: bool,
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, true) => "chat.completion.chunk",
            (true, false) => "chat.completion",
            (false, _) => "text_completion",
        }
    }

    /// The whole answer (`stream: false`).
    fn whole(&self, reasoning: &str, content: &str, stats: &Stats) -> Value {
        let mut choice = if self.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": null})
        } else {
            json!({"index": 0, "text": content, "logprobs": null})
        };
        if !reasoning.is_empty() {
            let at = if self.chat { &mut choice["message"] } else { &mut choice };
            at["reasoning_content"] = reasoning.into();
        }
        choice["finish_reason"] = finish_reason(stats.finish_reason).into();
        json!({
            "id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage(stats), "x_moela": stats,
        })
    }

    /// One stream chunk: a delta (`chat`) or a text piece, with a finish reason on the last.
    fn chunk(&self, field: &str, text: &str, finish: Option<&str>) -> Value {
        let choice = if self.chat {
            let mut delta = json!({});
            if !field.is_empty() {
                delta[field] = text.into();
            }
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        } else {
            let mut c = json!({"index": 0, "text": if field == "content" { text } else { "" }, "logprobs": null, "finish_reason": finish});
            if field == "reasoning_content" {
                c["reasoning_content"] = text.into();
            }
            c
        };
        let mut v = json!({
            "id": self.id, "object": self.object(true), "created": self.created, "model": self.model,
            "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }
}

/// The events as server-sent events: chunks, the usage chunk when asked for, then `[DONE]`. Dropping the
/// stream (the client left) drops the receiver, which stops the generation.
fn stream(shape: Shape, mut rx: mpsc::UnboundedReceiver<moela::Result<Event>>) -> impl IntoResponse {
    let (out, body) = mpsc::channel::<Result<SseEvent, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| {
            let out = out.clone();
            async move { out.send(Ok(SseEvent::default().data(v.to_string()))).await.is_ok() }
        };
        if shape.chat && !send(shape.chunk("role", "assistant", None)).await {
            return;
        }
        while let Some(item) = rx.recv().await {
            let sent = match item {
                Ok(Event::Reasoning(t)) => send(shape.chunk("reasoning_content", &t, None)).await,
                Ok(Event::Content(t)) => send(shape.chunk("content", &t, None)).await,
                Ok(Event::Routing(experts)) => {
                    let mut c = shape.chunk("", "", None);
                    c["choices"] = json!([]);
                    c["moela_routing"] = json!(experts);
                    send(c).await
                }
                Ok(Event::Done(stats)) => {
                    let mut last = shape.chunk("", "", Some(finish_reason(stats.finish_reason)));
                    last["x_moela"] = json!(stats);
                    let mut ok = send(last).await;
                    if ok && shape.include_usage {
                        let mut last = json!({
                            "id": shape.id, "object": shape.object(true), "created": shape.created,
                            "model": shape.model, "choices": [],
                        });
                        last["usage"] = usage(&stats);
                        ok = send(last).await;
                    }
                    if ok {
                        let _ = out.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    }
                    return;
                }
                Err(e) => {
                    send(ApiError::from_engine(&e).body()).await;
                    return;
                }
            };
            if !sent {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(body)).keep_alive(KeepAlive::default())
}

/// Marks every response as moela serve's (`x-moela-server: VERSION`): a page it served finds its server
/// with a request that succeeds on any host (its own address), rather than one that fails elsewhere.
async fn mark(mut response: Response) -> Response {
    response.headers_mut().insert(
        "x-moela-server",
        axum::http::HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
    );
    response
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        "no such route: moela serve has /v1/chat/completions, /v1/completions, /v1/models, /health and /moela/info",
    )
}

/// The model's facts (`moela info --json`), its name and the slots' context: what the demo page shows.
async fn info(State(server): State<Arc<Server>>) -> Json<Value> {
    let mut v = json!(server.engine.info());
    v["model"] = server.model_id.clone().into();
    v["context"] = server.context.into();
    v["slots"] = server.slots.lock().map_or(0, |s| s.len()).into();
    Json(v)
}

async fn models(State(server): State<Arc<Server>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": server.model_id, "object": "model", "created": server.created, "owned_by": "moela"}],
    }))
}

async fn health(State(server): State<Arc<Server>>) -> Json<Value> {
    let (total, idle) = {
        let slots = server.slots.lock().unwrap_or_else(|e| e.into_inner());
        (slots.len(), slots.iter().filter(|s| s.session.is_some()).count())
    };
    Json(json!({
        "status": "ok",
        "model": server.model_id,
        "slots_idle": idle,
        "slots_processing": total - idle,
        "requests_waiting": server.waiting.load(Ordering::SeqCst),
        "requests_cancelled": server.cancelled.load(Ordering::Relaxed),
    }))
}
