//! moela in the browser: the engine compiled to wasm32, on the browser's WebGPU.
//!
//! This is the thin wasm-bindgen surface; `web/src/moela.js` wraps it in the JS API (`Engine.load`,
//! `engine.chat.completions.create`, ...). Nothing about the model lives here: files arrive as bytes, the
//! engine crate does the rest. Every GPU read-back is async, as a browser requires.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use js_sys::{Array, Float32Array, Function, Promise, Reflect, Uint8Array};
use moela_tools::bench::bench;
use moela_tools::preset::preset_files;
use moela::{
    CheckpointFiles, Engine, Event, GenerateOptions, LoadOptions, Message, ModelConfig, Progress, SamplingOptions,
    Session, SessionOptions, Tokenizer, WeightDtype, WeightFile,
};
use moela::load::{FileData, RangeSource, ReadFuture};
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

fn get(obj: &JsValue, key: &str) -> Result<JsValue, JsError> {
    Reflect::get(obj, &JsValue::from_str(key)).map_err(|_| JsError::new(&format!("cannot read field {key}")))
}

fn bytes(obj: &JsValue, key: &str) -> Result<Option<Vec<u8>>, JsError> {
    let v = get(obj, key)?;
    if v.is_undefined() || v.is_null() {
        return Ok(None);
    }
    let arr: Uint8Array = v
        .dyn_into()
        .map_err(|_| JsError::new(&format!("field {key} must be a Uint8Array")))?;
    Ok(Some(arr.to_vec()))
}

/// A weight file the page reads by byte ranges (`read(start, end)` resolving to a `Uint8Array`): a download
/// kept in the Cache API, a picked `File`, or a `Blob`, sliced. Only the range the loader asks for enters
/// wasm memory, so a checkpoint of any size loads within a bounded heap.
struct JsRanges {
    name: String,
    size: u64,
    read: Function,
}

impl RangeSource for JsRanges {
    fn len(&self) -> u64 {
        self.size
    }

    fn read(&self, start: u64, end: u64) -> ReadFuture<'_> {
        Box::pin(async move {
            let fail = |what: String| moela::Error::Weights {
                file: self.name.clone(),
                message: format!("reading bytes {start}..{end}: {what}"),
            };
            let pending = self
                .read
                .call2(&JsValue::NULL, &(start as f64).into(), &(end as f64).into())
                .map_err(|e| fail(js_text(&e)))?;
            let value = wasm_bindgen_futures::JsFuture::from(Promise::resolve(&pending))
                .await
                .map_err(|e| fail(js_text(&e)))?;
            let bytes: Uint8Array = value
                .dyn_into()
                .map_err(|_| fail("the reader did not resolve to a Uint8Array".into()))?;
            Ok(bytes.to_vec())
        })
    }
}

/// What a JS exception says.
fn js_text(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

/// Options of `WasmEngine.load`.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct LoadOpts {
    /// "f32" (default) or "f16".
    weights: Option<String>,
    /// Tokens the chat session holds.
    max_context: usize,
}

fn load_opts(options: JsValue) -> Result<LoadOpts, JsError> {
    if options.is_undefined() || options.is_null() {
        Ok(LoadOpts::default())
    } else {
        serde_wasm_bindgen::from_value(options).map_err(js_err)
    }
}

/// One chat request, as the JS wrapper sends it (OpenAI field names).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Request {
    messages: Vec<Message>,
    /// Raw text to continue instead of messages (no chat template).
    prompt: Option<String>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<StopField>,
    thinking_budget: Option<usize>,
    record_routing: bool,
}

/// `stop` may be one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

/// What `on_event` receives.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum JsEvent {
    Reasoning { text: String },
    Content { text: String },
    Routing { experts: Vec<Vec<u32>> },
    Done { stats: moela::Stats },
}

fn to_js<T: Serialize>(v: &T) -> Result<JsValue, JsError> {
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(js_err)
}

/// A loaded model and its chat session.
#[wasm_bindgen]
pub struct WasmEngine {
    engine: Arc<Engine>,
    session: Rc<RefCell<Option<Session>>>,
}

#[wasm_bindgen]
impl WasmEngine {
    /// Loads a checkpoint from its files: `{config, tokenizer?, tokenizerConfig?, weights}` (bytes as
    /// `Uint8Array`), each weight file either `{name, bytes}` or `{name, size, read(start, end)}` (read by ranges,
    /// tensor by tensor); or a GGUF model, `{weights}` alone (its `*.gguf` file, or a split one's parts in
    /// order). `onProgress({loaded, total})` reports weight bytes converted.
    pub async fn load(files: JsValue, options: JsValue, on_progress: Option<Function>) -> Result<WasmEngine, JsError> {
        let opts = load_opts(options)?;
        let config = bytes(&files, "config")?;
        let weights_js: Array = get(&files, "weights")?
            .dyn_into()
            .map_err(|_| JsError::new("weights must be an array of {name, bytes}"))?;
        let mut weights = Vec::new();
        for w in weights_js.iter() {
            let name = get(&w, "name")?
                .as_string()
                .ok_or_else(|| JsError::new("every weight file needs a name"))?;
            let read = get(&w, "read")?;
            if let Some(read) = read.dyn_ref::<Function>() {
                let size = get(&w, "size")?
                    .as_f64()
                    .filter(|s| *s >= 0.0 && s.fract() == 0.0)
                    .ok_or_else(|| JsError::new(&format!("{name}: a ranged weight file needs its size")))?;
                weights.push(WeightFile {
                    name: name.clone(),
                    data: FileData::Ranges(Arc::new(JsRanges {
                        name,
                        size: size as u64,
                        read: read.clone(),
                    })),
                });
                continue;
            }
            let data = bytes(&w, "bytes")?.ok_or_else(|| JsError::new(&format!("{name}: no bytes or read")))?;
            weights.push(WeightFile::from_bytes(name, data));
        }
        let mut opts = opts;
        let files = match config {
            Some(config) => CheckpointFiles {
                config,
                tokenizer: bytes(&files, "tokenizer")?,
                tokenizer_config: bytes(&files, "tokenizerConfig")?,
                weights,
            },
            // A GGUF model carries its config and tokenizer in its first file's header, and is stored in the
            // format nearest its own unless another is asked for.
            None if weights.first().is_some_and(|w| w.name.ends_with(".gguf")) => {
                let (files, header) = moela::load::gguf::checkpoint(weights).await.map_err(js_err)?;
                opts.weights.get_or_insert_with(|| header.nearest_format().name().to_string());
                files
            }
            None => return Err(JsError::new("config.json is missing")),
        };
        Self::from_files(files, opts, on_progress).await
    }

    /// Checks that a checkpoint can run here before any weight is read: config.json and the tokenizer files.
    /// Resolves to the model's facts (`info()`), or throws the
    /// first problem found.
    pub async fn check(files: JsValue, options: JsValue) -> Result<JsValue, JsError> {
        let opts = load_opts(options)?;
        let dtype = WeightDtype::parse(opts.weights.as_deref().unwrap_or("f32")).map_err(js_err)?;
        let config = bytes(&files, "config")?.ok_or_else(|| JsError::new("config.json is missing"))?;
        let config = ModelConfig::from_json_bytes(&config, "config.json").map_err(js_err)?;
        if let Some(t) = bytes(&files, "tokenizer")? {
            let cfg = bytes(&files, "tokenizerConfig")?;
            let tok = Tokenizer::from_bytes(&t, cfg.as_deref()).map_err(js_err)?;
            if tok.vocab_size() > config.vocab_size {
                return Err(JsError::new(&format!(
                    "tokenizer.json: has {} tokens but config.json's vocab_size is {}",
                    tok.vocab_size(),
                    config.vocab_size
                )));
            }
        }
        to_js(&moela::ModelInfo::new(&config, dtype))
    }

    /// Checks a GGUF model from the first bytes of its (first) file, before any weight is downloaded:
    /// `header` is a prefix of the file `name` of `size` bytes. Resolves to `{need}` (bytes of the file the
    /// header takes, more than given) or to the model's facts (`info()`) for the format it would be stored in,
    /// or throws the first problem found (not a GGUF file, not a DeepSeek model, a damaged header or
    /// tokenizer).
    #[wasm_bindgen(js_name = checkGguf)]
    pub fn check_gguf(header: Vec<u8>, size: f64, name: String, options: JsValue) -> Result<JsValue, JsError> {
        use moela::load::gguf::{GgufHeader, Parsed};
        let opts = load_opts(options)?;
        let header = match GgufHeader::parse(&header, size as u64, &name).map_err(js_err)? {
            Parsed::NeedBytes(n) => {
                let o = js_sys::Object::new();
                let _ = Reflect::set(&o, &"need".into(), &(n as f64).into());
                return Ok(o.into());
            }
            Parsed::Header(h) => h,
        };
        let config = header.model_config(&name).map_err(js_err)?;
        if let Some((t, c)) = moela::load::gguf::vocab::tokenizer_files(&header, &name).map_err(js_err)? {
            Tokenizer::from_bytes(&t, Some(&c)).map_err(js_err)?;
        }
        let dtype = match opts.weights.as_deref() {
            Some(w) => WeightDtype::parse(w).map_err(js_err)?,
            None => header.nearest_format(),
        };
        to_js(&moela::ModelInfo::new(&config, dtype))
    }

    /// A random-weight model in the shape of a real checkpoint (`v2-lite-mini`, `v3-mini`; `v2-lite` and
    /// `v3-layer` at full size where the device holds them), for benchmarks.
    #[wasm_bindgen(js_name = loadPreset)]
    pub async fn load_preset(name: String, seed: u64, options: JsValue) -> Result<WasmEngine, JsError> {
        let opts = load_opts(options)?;
        let files = preset_files(&name, seed).map_err(js_err)?;
        Self::from_files(files, opts, None).await
    }

    async fn from_files(
        files: CheckpointFiles,
        opts: LoadOpts,
        on_progress: Option<Function>,
    ) -> Result<Self, JsError> {
        let dtype = WeightDtype::parse(opts.weights.as_deref().unwrap_or("f32")).map_err(js_err)?;
        let device = moela::default_device_async().await.map_err(js_err)?;
        let mut progress = |p: Progress| {
            if let Some(f) = &on_progress {
                let o = js_sys::Object::new();
                let _ = Reflect::set(&o, &"loaded".into(), &(p.loaded as f64).into());
                let _ = Reflect::set(&o, &"total".into(), &(p.total as f64).into());
                let _ = f.call1(&JsValue::NULL, &o);
            }
        };
        let engine = Arc::new(
            Engine::load(files, LoadOptions { dtype, ..LoadOptions::default() }, &device, &mut progress)
                .await
                .map_err(js_err)?,
        );
        let session = engine
            .session(SessionOptions {
                max_context: opts.max_context,
            })
            .map_err(js_err)?;
        Ok(Self {
            engine,
            session: Rc::new(RefCell::new(Some(session))),
        })
    }

    /// The same facts as `moela info --json`.
    pub fn info(&self) -> Result<JsValue, JsError> {
        to_js(&self.engine.info())
    }

    /// Token ids of `text` (bos added when `special`).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, JsError> {
        self.engine
            .require_tokenizer()
            .map_err(js_err)?
            .encode(text, special)
            .map_err(js_err)
    }

    /// Logits at every position of `tokens` (one prefill): an array of `Float32Array`.
    pub async fn logits(&self, tokens: Vec<u32>) -> Result<Array, JsError> {
        let rows = self.engine.logits(&tokens).await.map_err(js_err)?;
        Ok(rows.iter().map(|r| Float32Array::from(r.as_slice())).collect())
    }

    /// Forgets the conversation held in the latent cache.
    #[wasm_bindgen(js_name = resetChat)]
    pub fn reset_chat(&self) -> Result<(), JsError> {
        match self.session.borrow_mut().as_mut() {
            Some(s) => {
                s.reset();
                Ok(())
            }
            None => Err(JsError::new("a generation is running: abort it first")),
        }
    }

    /// Bytes of latent cache in use, and what an uncompressed multi-head cache would take for as many tokens.
    #[wasm_bindgen(js_name = cacheUsage)]
    pub fn cache_usage(&self) -> Result<JsValue, JsError> {
        let info = self.engine.info();
        let tokens = self.session.borrow().as_ref().map_or(0, |s| s.cache().len()) as u64;
        let used = tokens * info.cache.bytes_per_token;
        let mha = tokens * info.cache.mha_equivalent_values_per_token * info.cache.dtype_bytes;
        to_js(&serde_json::json!({ "tokens": tokens, "bytes": used, "mhaBytes": mha }))
    }

    /// Runs one chat request; `on_event` receives `{type: "reasoning"|"content", text}`,
    /// `{type: "routing", experts}` and finally `{type: "done", stats}`. Resolves to the stats.
    /// `should_stop()` is asked between tokens (an aborted `AbortSignal`, in the JS wrapper).
    pub async fn generate(
        &self,
        request: JsValue,
        on_event: Function,
        should_stop: Option<Function>,
    ) -> Result<JsValue, JsError> {
        let req: Request = serde_wasm_bindgen::from_value(request).map_err(js_err)?;
        let defaults = GenerateOptions::default();
        let options = GenerateOptions {
            sampling: SamplingOptions {
                temperature: req.temperature.unwrap_or(0.0),
                top_p: req.top_p.unwrap_or(1.0),
                top_k: req.top_k.unwrap_or(0),
                min_p: req.min_p.unwrap_or(0.0),
                repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
                frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
                presence_penalty: req.presence_penalty.unwrap_or(0.0),
                seed: req.seed.unwrap_or(0),
            },
            max_tokens: req.max_tokens.unwrap_or(defaults.max_tokens),
            thinking_budget: req.thinking_budget,
            stop: match req.stop {
                None => Vec::new(),
                Some(StopField::One(s)) => vec![s],
                Some(StopField::Many(v)) => v,
            },
            record_routing: req.record_routing,
        };
        let mut session = self
            .session
            .borrow_mut()
            .take()
            .ok_or_else(|| JsError::new("a generation is already running on this engine"))?;
        let result = run(
            &mut session,
            &req.messages,
            req.prompt.as_deref(),
            options,
            &on_event,
            should_stop,
        )
        .await;
        *self.session.borrow_mut() = Some(session);
        result
    }

    /// Decode and prefill speed on this device (`moela bench` in the browser).
    pub async fn bench(&self, prompt_tokens: usize, gen_tokens: usize) -> Result<JsValue, JsError> {
        let report = bench(&self.engine, prompt_tokens, gen_tokens, 0, false)
            .await
            .map_err(js_err)?;
        to_js(&report)
    }

    /// Frees the model's GPU memory now (the object is unusable afterwards).
    pub fn unload(self) {}
}

async fn run(
    session: &mut Session,
    messages: &[Message],
    prompt: Option<&str>,
    options: GenerateOptions,
    on_event: &Function,
    should_stop: Option<Function>,
) -> Result<JsValue, JsError> {
    let mut generation = match prompt {
        Some(p) => session.complete(p, options),
        None => session.chat(messages, options),
    }
    .map_err(js_err)?;
    let mut stats = JsValue::UNDEFINED;
    while let Some(ev) = generation.next().await {
        let ev = match ev.map_err(js_err)? {
            Event::Reasoning(text) => JsEvent::Reasoning { text },
            Event::Content(text) => JsEvent::Content { text },
            Event::Routing(experts) => JsEvent::Routing { experts },
            Event::Done(s) => {
                stats = to_js(&s)?;
                JsEvent::Done { stats: s }
            }
        };
        on_event
            .call1(&JsValue::NULL, &to_js(&ev)?)
            .map_err(|e| JsError::new(&format!("onEvent threw: {e:?}")))?;
        if let Some(f) = &should_stop
            && f.call0(&JsValue::NULL).map(|v| v.is_truthy()).unwrap_or(false)
        {
            // Ends with a Done event (finish_reason "cancelled") on the next turn of the loop.
            generation.cancel().map_err(js_err)?;
        }
    }
    Ok(stats)
}
