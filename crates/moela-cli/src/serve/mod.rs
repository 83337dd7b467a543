//! `moela serve`: an OpenAI-compatible HTTP server on one engine (axum on tokio).
//!
//! - Slots: each of `--parallel` slots keeps a session, with its own latent cache. A request takes the free
//!   slot whose cached tokens share the longest prefix with its prompt (else the least recently used one),
//!   so a follow-up that repeats the conversation so far prefills only its new turn.
//! - Turns: a generation runs on a blocking thread of its own and takes the device for one step at a time
//!   (a chunk of its prompt's prefill, or one token), handing it on fairly to the next waiting generation
//!   after each, so every stream keeps moving while others are written or prefilled.
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

use moela::{Engine, Event, Session, SessionOptions, Stats};
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
    /// The device's turn: one generation step at a time.
    turn: parking_lot::Mutex<()>,
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
    let server = Arc::new(Server {
        model_id: options.model_id,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        free: Arc::new(Semaphore::new(sessions.len())),
        slots: Mutex::new(sessions),
        waiting: AtomicUsize::new(0),
        queue: options.queue,
        turn: parking_lot::Mutex::new(()),
        clock: AtomicU64::new(1),
        context,
        next_id: AtomicU64::new(1),
        cancelled: AtomicU64::new(0),
        engine,
    });
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

/// Generates `request` in `lease`'s session on this (blocking) thread, sending each event to `tx`. Stops at
/// the end, on an error, or as soon as the receiver is gone (the client disconnected).
fn generate(mut lease: Lease, request: Request, tx: mpsc::Sender<moela::Result<Event>>) {
    let server = lease.server.clone();
    let Some(session) = lease.session.as_mut() else {
        return;
    };
    let started = match (&request.messages, &request.prompt) {
        (Some(m), _) => session.chat(m, request.options),
        (None, Some(p)) => session.complete(p, request.options),
        (None, None) => return,
    };
    let mut generation = match started {
        Ok(g) => g,
        Err(e) => {
            let _ = tx.blocking_send(Err(e));
            return;
        }
    };
    let cancel = |generation: &mut moela::Generation<'_>| {
        let _ = generation.cancel();
        server.cancelled.fetch_add(1, Ordering::Relaxed);
    };
    loop {
        if tx.is_closed() {
            return cancel(&mut generation);
        }
        // One step (a chunk of the prompt, or one token) per turn on the device.
        let turn = server.turn.lock();
        let step = generation.step_blocking();
        parking_lot::MutexGuard::unlock_fair(turn);
        let events = match step {
            None => return,
            Some(Ok(events)) => events,
            Some(Err(e)) => {
                drop(generation);
                drop(lease);
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        for event in events {
            if let Event::Done(_) = event {
                // The end: the slot is free again before the client hears of it, so that its next request
                // finds its cache there.
                drop(generation);
                drop(lease);
                let _ = tx.blocking_send(Ok(event));
                return;
            }
            if tx.blocking_send(Ok(event)).is_err() {
                return cancel(&mut generation);
            }
        }
    }
}

/// Reads a request, checks it against the model and the context, and starts its generation: the events
/// arrive on the returned channel.
async fn start(
    server: &Arc<Server>,
    body: Result<Bytes, BytesRejection>,
    chat: bool,
) -> Result<(Request, mpsc::Receiver<moela::Result<Event>>), ApiError> {
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
    let ids = match (&request.messages, &request.prompt) {
        (Some(m), _) => tok.encode_chat(m, true).map(|(_, ids)| ids),
        (None, Some(p)) => tok.encode(p, true),
        (None, None) => Ok(Vec::new()),
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
    let (tx, rx) = mpsc::channel(256);
    let job = request.clone();
    tokio::task::spawn_blocking(move || generate(lease, job, tx));
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
fn stream(shape: Shape, mut rx: mpsc::Receiver<moela::Result<Event>>) -> impl IntoResponse {
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
