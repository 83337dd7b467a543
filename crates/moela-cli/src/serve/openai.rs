//! The OpenAI API's shapes as `moela serve` speaks them: requests read field by field (so that a bad one is
//! an error naming its `param`), responses and stream chunks, and errors as `{"error": {"message", "type",
//! "param", "code"}}` with their HTTP status.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use moela::{FinishReason, GenerateOptions, Message, SamplingOptions, Stats};

/// An error as the OpenAI API returns it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400, about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// Another status, with a code.
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: Some(code),
        }
    }

    /// An engine error met while serving a request: the request's fault where the engine says so (a limit, a
    /// bad argument, a template that cannot render these messages), else the server's.
    pub fn from_engine(e: &moela::Error) -> Self {
        match e {
            moela::Error::Limit(m) => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "context_length_exceeded",
                m.clone(),
            ),
            moela::Error::InvalidArgument(_) | moela::Error::Template(_) | moela::Error::Tokenizer { .. } => Self {
                status: StatusCode::BAD_REQUEST,
                message: e.to_string(),
                kind: "invalid_request_error",
                param: None,
                code: None,
            },
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "engine_error",
                e.to_string(),
            ),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let busy = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut r = (self.status, Json(self.body())).into_response();
        if busy {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// What a completion request asks for, chat or raw.
#[derive(Clone)]
pub struct Request {
    /// `model`, when given.
    pub model: Option<String>,
    /// The conversation (chat) or `None` (raw completion).
    pub messages: Option<Vec<Message>>,
    /// The raw prompt (completions).
    pub prompt: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    pub options: GenerateOptions,
}

/// Largest `max_tokens` accepted (the context bounds it further).
const MAX_TOKENS: u64 = 1 << 20;

impl Request {
    /// Reads a `/v1/chat/completions` (`chat`) or `/v1/completions` body.
    pub fn parse(body: &[u8], chat: bool) -> Result<Self, ApiError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("the body is not valid JSON: {e}"),
            kind: "invalid_request_error",
            param: None,
            code: None,
        })?;
        let Value::Object(o) = v else {
            return Err(ApiError::invalid("body", "the body must be a JSON object"));
        };
        let f = Fields(&o);
        let (messages, prompt) = if chat {
            (Some(f.messages()?), None)
        } else {
            (None, Some(f.prompt()?))
        };
        let max_tokens = match f.uint("max_completion_tokens")? {
            Some(n) => Some(n),
            None => f.uint("max_tokens")?,
        };
        if max_tokens == Some(0) {
            return Err(ApiError::invalid("max_tokens", "max_tokens must be at least 1"));
        }
        let sampling = SamplingOptions {
            temperature: f.float("temperature")?.unwrap_or(0.0),
            top_p: f.float("top_p")?.unwrap_or(1.0),
            top_k: f.uint("top_k")?.unwrap_or(0) as usize,
            min_p: f.float("min_p")?.unwrap_or(0.0),
            repetition_penalty: f.float("repetition_penalty")?.unwrap_or(1.0),
            frequency_penalty: f.float("frequency_penalty")?.unwrap_or(0.0),
            presence_penalty: f.float("presence_penalty")?.unwrap_or(0.0),
            seed: f.uint("seed")?.unwrap_or(0),
        };
        if let Some((param, message)) = sampling.invalid_field() {
            return Err(ApiError::invalid(param, message));
        }
        if let Some(n) = f.uint("n")?
            && n != 1
        {
            return Err(ApiError::invalid(
                "n",
                "moela serve gives one choice per request (n = 1)",
            ));
        }
        let include_usage = match o.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(so)) => Fields(so).boolean("include_usage")?.unwrap_or(false),
            Some(_) => return Err(ApiError::invalid("stream_options", "stream_options must be an object")),
        };
        Ok(Self {
            model: f.string("model")?,
            messages,
            prompt,
            stream: f.boolean("stream")?.unwrap_or(false),
            include_usage,
            options: GenerateOptions {
                sampling,
                // Without a limit, the answer may take the rest of the context (`start` bounds it there).
                max_tokens: max_tokens.map_or(usize::MAX, |n| n as usize),
                thinking_budget: f.uint("thinking_budget")?.map(|n| n as usize),
                stop: f.stop()?,
                // moela's own: stream the experts each generated token was routed to (chunks with no choices
                // and a `moela_routing` field), as the demo page's heat map draws them.
                record_routing: f.boolean("moela_routing")?.unwrap_or(false),
            },
        })
    }
}

/// A request object's fields, read with errors that name them.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn float(&self, name: &str) -> Result<Option<f32>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(|x| Some(x as f32))
                .ok_or_else(|| ApiError::invalid(name, format!("{name} must be a number, not {v}"))),
        }
    }

    fn uint(&self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| name == "seed" || n <= MAX_TOKENS)
                .map(Some)
                .ok_or_else(|| {
                    ApiError::invalid(
                        name,
                        format!("{name} must be a whole number from 0 to {MAX_TOKENS}, not {v}"),
                    )
                }),
        }
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::invalid(
                name,
                format!("{name} must be true or false, not {v}"),
            )),
        }
    }

    fn string(&self, name: &str) -> Result<Option<String>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(ApiError::invalid(name, format!("{name} must be a string, not {v}"))),
        }
    }

    /// `stop`: a string or an array of at most four strings.
    fn stop(&self) -> Result<Vec<String>, ApiError> {
        let bad = || ApiError::invalid("stop", "stop must be a string or an array of up to 4 strings");
        match self.get("stop") {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) if a.len() <= 4 => a
                .iter()
                .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
                .collect(),
            Some(_) => Err(bad()),
        }
        .map(|stops| stops.into_iter().filter(|s| !s.is_empty()).collect())
    }

    /// `prompt`: a string, or an array holding one.
    fn prompt(&self) -> Result<String, ApiError> {
        match self.get("prompt") {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::Array(a)) if a.len() == 1 && a[0].as_str().is_some_and(|s| !s.is_empty()) => {
                Ok(a[0].as_str().unwrap_or_default().to_string())
            }
            None => Err(ApiError::invalid("prompt", "prompt is required")),
            Some(_) => Err(ApiError::invalid("prompt", "prompt must be a non-empty string")),
        }
    }

    /// `messages`: objects with a `role` and a `content` that is text or an array of text parts.
    fn messages(&self) -> Result<Vec<Message>, ApiError> {
        let Some(Value::Array(list)) = self.get("messages") else {
            return Err(ApiError::invalid("messages", "messages must be a non-empty array"));
        };
        if list.is_empty() {
            return Err(ApiError::invalid("messages", "messages must be a non-empty array"));
        }
        list.iter()
            .enumerate()
            .map(|(i, m)| {
                let param = format!("messages[{i}]");
                let Value::Object(m) = m else {
                    return Err(ApiError::invalid(&param, format!("{param} must be an object")));
                };
                let role = match m.get("role") {
                    Some(Value::String(r))
                        if ["system", "user", "assistant", "developer", "tool"].contains(&r.as_str()) =>
                    {
                        if r == "developer" {
                            "system".to_string()
                        } else {
                            r.clone()
                        }
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            &format!("{param}.role"),
                            format!("{param}.role must be system, user, assistant, developer or tool"),
                        ));
                    }
                };
                let content = match m.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    None | Some(Value::Null) if role == "assistant" => String::new(),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                            _ => Err(ApiError::invalid(
                                &format!("{param}.content"),
                                "content parts must be text parts ({\"type\": \"text\", \"text\": ...})",
                            )),
                        })
                        .collect::<Result<Vec<_>, _>>()?
                        .join(""),
                    _ => {
                        return Err(ApiError::invalid(
                            &format!("{param}.content"),
                            format!("{param}.content must be a string or an array of text parts"),
                        ));
                    }
                };
                Ok(Message::new(role, content))
            })
            .collect()
    }
}

/// OpenAI's name for why a generation ended.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    }
}

/// The `usage` object: prompt, completion and reasoning tokens, and the prompt tokens the slot's cache held
/// already.
pub fn usage(s: &Stats) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.reused_tokens},
        "completion_tokens_details": {"reasoning_tokens": s.reasoning_tokens},
    })
}
