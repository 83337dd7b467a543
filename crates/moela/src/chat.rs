//! The tokenizer and the chat template: `tokenizer.json` + `tokenizer_config.json` -> prompt token ids.
//!
//! [`Tokenizer`] wraps a HF `tokenizers` tokenizer together with what `tokenizer_config.json` says about it:
//! the BOS / EOS tokens, whether a BOS is added to raw prompts, and the Jinja chat template. The template is
//! rendered with minijinja the way HF `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`,
//! Python string methods such as `.split()` / `.strip()` through `minijinja_contrib::pycompat`, and a
//! `raise_exception(msg)` function).
//!
//! BOS rule (the one thing that is easy to get wrong): a rendered chat prompt already starts with the BOS
//! *text* (`{{ bos_token }}` in the template), so it is encoded with `add_special = false`, exactly like HF
//! `apply_chat_template(tokenize=True)`. [`Tokenizer::encode_chat`] does this for you.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::{Error, Result};

const TOKENIZER_JSON: &str = "tokenizer.json";
const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";
const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
const TEMPLATE_NAME: &str = "chat_template";

/// The template used when `tokenizer_config.json` has no `chat_template` but the vocabulary has DeepSeek-V3's
/// `<｜User｜>` / `<｜Assistant｜>` tokens: system prompts first, then the turns, no reasoning prefix.
///
/// Rendered: `{bos}{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜>...<｜Assistant｜>`.
pub const DEEPSEEK_V3_FALLBACK_TEMPLATE: &str = "{{ bos_token }}\
{%- for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}{% endfor %}\
{%- for message in messages %}\
{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}\
{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}\
{%- endif %}{% endfor %}\
{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}";

/// The tokens whose presence in the vocabulary selects [`DEEPSEEK_V3_FALLBACK_TEMPLATE`].
const FALLBACK_TEMPLATE_TOKENS: [&str; 2] = ["<｜User｜>", "<｜Assistant｜>"];

/// One chat message as chat templates see it: `{"role": ..., "content": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or `tool`, for templates that know it).
    pub role: String,
    /// The message text. For earlier assistant turns of a reasoning model this may include the
    /// `<think>...</think>` block; DeepSeek-R1's template keeps only the text after `</think>`.
    pub content: String,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A tokenizer with its special tokens and chat template, loaded from a HF checkpoint folder or from bytes.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    /// `Some`: moela adds the BOS / EOS itself (the post-processor of `tokenizer.json` is bypassed).
    /// `None`: the post-processor of `tokenizer.json` decides, as HF `PreTrainedTokenizerFast` does.
    add_special: Option<AddSpecial>,
    /// The configured template source (`None` when using the fallback or when there is none).
    template_source: Option<String>,
    /// The compiled template: configured, or [`DEEPSEEK_V3_FALLBACK_TEMPLATE`], or none.
    template: Option<Box<Environment<'static>>>,
}

/// `add_bos_token` / `add_eos_token` as resolved from `tokenizer_config.json`.
#[derive(Debug, Clone, Copy)]
struct AddSpecial {
    bos: bool,
    eos: bool,
}

/// A special token: its text and its id in the vocabulary.
#[derive(Debug, Clone)]
struct SpecialToken {
    text: String,
    id: u32,
}

impl Tokenizer {
    /// Loads the tokenizer from the bytes of `tokenizer.json` and, if the checkpoint has one, of
    /// `tokenizer_config.json`.
    ///
    /// From `tokenizer_config.json` it reads `chat_template` (a string, or a list of `{name, template}` of
    /// which `default` is used), `bos_token` / `eos_token` (a string or an AddedToken object with `content`),
    /// `add_bos_token`, `add_eos_token` and `tokenizer_class`.
    ///
    /// BOS / EOS policy for [`encode`](Self::encode) with `add_special = true`:
    /// - if the config sets `add_bos_token` / `add_eos_token`, or `tokenizer_class` is a Llama tokenizer
    ///   (DeepSeek-V2/V3/R1 use `LlamaTokenizerFast`, whose defaults are `add_bos_token = true`,
    ///   `add_eos_token = false`), moela adds the tokens itself and bypasses the post-processor of
    ///   `tokenizer.json`, so a `TemplateProcessing` there can never add a second BOS;
    /// - otherwise the post-processor of `tokenizer.json` decides, as in HF `PreTrainedTokenizerFast`.
    ///
    /// The BOS / EOS ids are looked up in the vocabulary (added tokens included); a configured token that is
    /// not in the vocabulary is an error.
    pub fn from_bytes(tokenizer_json: &[u8], tokenizer_config_json: Option<&[u8]>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|e| Error::Tokenizer {
            file: TOKENIZER_JSON.into(),
            message: format!("not a valid tokenizers file: {e}"),
        })?;
        let config = match tokenizer_config_json {
            Some(bytes) => TokenizerConfig::parse(bytes)?,
            None => TokenizerConfig::default(),
        };
        let lookup = |field: &str, text: Option<String>| -> Result<Option<SpecialToken>> {
            let Some(text) = text else { return Ok(None) };
            match inner.token_to_id(&text) {
                Some(id) => Ok(Some(SpecialToken { text, id })),
                None => Err(Error::Tokenizer {
                    file: TOKENIZER_CONFIG_JSON.into(),
                    message: format!("{field} {text:?} is not in the vocabulary of {TOKENIZER_JSON}"),
                }),
            }
        };
        let bos = lookup("bos_token", config.bos_token)?;
        let eos = lookup("eos_token", config.eos_token)?;
        let llama_class = config
            .tokenizer_class
            .as_deref()
            .is_some_and(|c| c.to_ascii_lowercase().contains("llama"));
        let explicit = llama_class || config.add_bos_token.is_some() || config.add_eos_token.is_some();
        let add_special = explicit.then(|| AddSpecial {
            bos: config.add_bos_token.unwrap_or(llama_class),
            eos: config.add_eos_token.unwrap_or(false),
        });
        if add_special.is_some_and(|a| a.bos) && bos.is_none() {
            log::warn!("{TOKENIZER_CONFIG_JSON}: add_bos_token is true but there is no bos_token; no BOS is added");
        }
        if add_special.is_some_and(|a| a.eos) && eos.is_none() {
            log::warn!("{TOKENIZER_CONFIG_JSON}: add_eos_token is true but there is no eos_token; no EOS is added");
        }
        let mut tokenizer = Self {
            inner,
            bos,
            eos,
            add_special,
            template_source: None,
            template: None,
        };
        match config.chat_template {
            Some(source) => tokenizer = tokenizer.with_chat_template(&source)?,
            None => {
                let fits = FALLBACK_TEMPLATE_TOKENS
                    .iter()
                    .all(|t| tokenizer.inner.token_to_id(t).is_some());
                if fits {
                    log::info!("{TOKENIZER_CONFIG_JSON} has no chat_template; using the DeepSeek-V3 fallback template");
                    let env = compile_template(DEEPSEEK_V3_FALLBACK_TEMPLATE.into())?;
                    tokenizer.template = Some(Box::new(env));
                }
            }
        }
        Ok(tokenizer)
    }

    /// Loads `tokenizer.json` (required), `tokenizer_config.json` (optional) and `chat_template.jinja`
    /// (optional; when present it replaces the config's `chat_template`, as in recent HF checkpoints) from a
    /// checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| Error::Io { path, source })
        };
        let read_optional = |name: &str| -> Result<Option<Vec<u8>>> {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(Error::Io { path, source }),
            }
        };
        let tokenizer_json = read(TOKENIZER_JSON)?;
        let config = read_optional(TOKENIZER_CONFIG_JSON)?;
        let tokenizer = Self::from_bytes(&tokenizer_json, config.as_deref())?;
        match read_optional(CHAT_TEMPLATE_JINJA)? {
            Some(bytes) => {
                let source = String::from_utf8(bytes).map_err(|_| Error::Tokenizer {
                    file: CHAT_TEMPLATE_JINJA.into(),
                    message: "not valid UTF-8".into(),
                })?;
                tokenizer.with_chat_template(&source)
            }
            None => Ok(tokenizer),
        }
    }

    /// Replaces the chat template with `source` (Jinja), e.g. the contents of a `chat_template.jinja`.
    /// Fails with [`Error::Template`] if it does not compile.
    pub fn with_chat_template(mut self, source: &str) -> Result<Self> {
        self.template = Some(Box::new(compile_template(source.to_owned())?));
        self.template_source = Some(source.to_owned());
        Ok(self)
    }

    /// The configured chat template source, if any (the built-in fallback is not reported here).
    pub fn chat_template(&self) -> Option<&str> {
        self.template_source.as_deref()
    }

    /// The wrapped HF tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The number of tokens, added tokens included (HF `len(tokenizer)`). The model's embedding may have
    /// more rows than this.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token given by its exact text (e.g. `<think>`, `</think>`), added tokens included.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// The BOS token text from `tokenizer_config.json`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|t| t.text.as_str())
    }

    /// The BOS token id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|t| t.id)
    }

    /// The EOS token text from `tokenizer_config.json`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|t| t.text.as_str())
    }

    /// The EOS token id (generation usually stops on it).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|t| t.id)
    }

    /// Encodes `text` to token ids.
    ///
    /// `add_special = false` encodes the text alone (special tokens written in it, like a BOS in a rendered
    /// chat prompt, are still recognised). Use it for rendered chat prompts.
    ///
    /// `add_special = true` is for raw prompts: adds the BOS (and EOS) as described in
    /// [`from_bytes`](Self::from_bytes). Never yields two leading BOS: if the text already starts with the
    /// BOS token, none is added.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encode = |with_post_processor: bool| {
            self.inner
                .encode(text, with_post_processor)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer {
                    file: TOKENIZER_JSON.into(),
                    message: format!("cannot encode text: {e}"),
                })
        };
        if !add_special {
            return encode(false);
        }
        match self.add_special {
            Some(add) => {
                let body = encode(false)?;
                let mut ids = Vec::with_capacity(body.len() + 2);
                if let Some(bos) = self.bos_id().filter(|&b| add.bos && body.first() != Some(&b)) {
                    ids.push(bos);
                }
                ids.extend_from_slice(&body);
                if let Some(eos) = self.eos_id().filter(|_| add.eos) {
                    ids.push(eos);
                }
                Ok(ids)
            }
            None => {
                let mut ids = encode(true)?;
                // The post-processor prepended a token the text already starts with (a BOS written in the
                // text): keep one.
                if ids.len() >= 2 && ids[0] == ids[1] {
                    let body = encode(false)?;
                    if ids.len() > body.len() && body.first() == Some(&ids[0]) {
                        ids.remove(0);
                    }
                }
                Ok(ids)
            }
        }
    }

    /// Decodes token ids to text. Ids not in the vocabulary decode to nothing (as in HF `tokenizers`).
    /// `skip_special` drops special tokens (BOS, EOS, ...); DeepSeek-R1's `<think>` / `</think>` are not
    /// special and are kept.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer {
            file: TOKENIZER_JSON.into(),
            message: format!("cannot decode token ids: {e}"),
        })
    }

    /// Renders the chat template for `messages`, ending with the assistant prefix when
    /// `add_generation_prompt` is true.
    ///
    /// Template variables: `messages`, `add_generation_prompt`, `bos_token`, `eos_token` (undefined when the
    /// config has none), `tools` and `documents` (none). Without a configured template the
    /// [`DEEPSEEK_V3_FALLBACK_TEMPLATE`] is used when the vocabulary has its tokens; otherwise this is an
    /// [`Error::Template`].
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_chat_with(messages, add_generation_prompt, &[])
    }

    /// [`render_chat`](Self::render_chat) with extra template variables, which override the standard ones
    /// (e.g. `("thinking", true.into())` for DeepSeek-V3.1, `("enable_thinking", false.into())`).
    pub fn render_chat_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &[(&str, Json)],
    ) -> Result<String> {
        let Some(env) = &self.template else {
            return Err(Error::Template(format!(
                "{TOKENIZER_CONFIG_JSON} has no chat_template and the vocabulary has no {} tokens for \
                     the built-in DeepSeek-V3 template; encode a raw prompt instead",
                FALLBACK_TEMPLATE_TOKENS.join(" / ")
            )));
        };
        let mut context: BTreeMap<&str, Json> = BTreeMap::new();
        let messages = serde_json::to_value(messages).map_err(|e| Error::Template(e.to_string()))?;
        context.insert("messages", messages);
        context.insert("add_generation_prompt", add_generation_prompt.into());
        context.insert("tools", Json::Null);
        context.insert("documents", Json::Null);
        if let Some(bos) = &self.bos {
            context.insert("bos_token", bos.text.clone().into());
        }
        if let Some(eos) = &self.eos {
            context.insert("eos_token", eos.text.clone().into());
        }
        for (name, value) in extra {
            context.insert(name, value.clone());
        }
        let template = env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        template.render(&context).map_err(template_error)
    }

    /// Renders the chat template and encodes it without adding special tokens (the template writes the BOS),
    /// like HF `apply_chat_template(tokenize=True)`. Returns the rendered text and its token ids.
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<(String, Vec<u32>)> {
        let rendered = self.render_chat(messages, add_generation_prompt)?;
        let ids = self.encode(&rendered, false)?;
        Ok((rendered, ids))
    }
}

/// True when the rendered prompt ends with an unclosed `<think>` (possibly followed by whitespace), as in
/// DeepSeek-R1's generation prompt `<｜Assistant｜><think>\n`: the model's output then starts inside the
/// reasoning block, and the think-tag splitter must start in reasoning mode.
pub fn prompt_opens_think(rendered: &str) -> bool {
    rendered.trim_end().ends_with("<think>")
}

/// Builds the minijinja environment for one chat template, set up like HF's Jinja environment.
fn compile_template(source: String) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_template_owned(TEMPLATE_NAME, source).map_err(template_error)?;
    Ok(env)
}

/// `raise_exception(msg)`: how HF chat templates reject a conversation.
fn raise_exception(message: String) -> std::result::Result<minijinja::Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// A minijinja error as [`Error::Template`], with its detail and location.
fn template_error(e: minijinja::Error) -> Error {
    let mut message = match e.detail() {
        Some(detail) => detail.to_owned(),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        message.push_str(&format!(" (line {line})"));
    }
    Error::Template(message)
}

/// The fields of `tokenizer_config.json` that moela uses.
#[derive(Debug, Default)]
struct TokenizerConfig {
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    tokenizer_class: Option<String>,
}

impl TokenizerConfig {
    fn parse(bytes: &[u8]) -> Result<Self> {
        let bad = |message: String| Error::Tokenizer {
            file: TOKENIZER_CONFIG_JSON.into(),
            message,
        };
        let json: Json = serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Json::Object(map) = json else {
            return Err(bad("expected a JSON object at the top level".into()));
        };
        let field = |name: &str| map.get(name).filter(|v| !v.is_null());
        let token = |name: &str| -> Result<Option<String>> {
            match field(name) {
                None => Ok(None),
                Some(Json::String(s)) => Ok(Some(s.clone())),
                Some(Json::Object(o)) => match o.get("content") {
                    Some(Json::String(s)) => Ok(Some(s.clone())),
                    _ => Err(bad(format!("{name} is an object without a string \"content\""))),
                },
                Some(other) => Err(bad(format!(
                    "{name} must be a string or an object with \"content\", found {other}"
                ))),
            }
        };
        let flag = |name: &str| -> Result<Option<bool>> {
            match field(name) {
                None => Ok(None),
                Some(Json::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(bad(format!("{name} must be true or false, found {other}"))),
            }
        };
        let chat_template = match field("chat_template") {
            None => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Array(list)) => Some(pick_named_template(list).map_err(bad)?),
            Some(other) => {
                return Err(bad(format!(
                    "chat_template must be a string or a list of {{name, template}}, found {}",
                    json_kind(other)
                )));
            }
        };
        let tokenizer_class = match field("tokenizer_class") {
            Some(Json::String(s)) => Some(s.clone()),
            _ => None,
        };
        Ok(Self {
            chat_template,
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            add_bos_token: flag("add_bos_token")?,
            add_eos_token: flag("add_eos_token")?,
            tokenizer_class,
        })
    }
}

/// Picks the `default` template of a list of `{name, template}` (or the only one).
fn pick_named_template(list: &[Json]) -> std::result::Result<String, String> {
    let mut named = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let name = entry.get("name").and_then(Json::as_str);
        let template = entry.get("template").and_then(Json::as_str);
        match (name, template) {
            (Some(n), Some(t)) => named.push((n, t)),
            _ => {
                return Err(format!(
                    "chat_template[{i}] must be an object with string \"name\" and \"template\""
                ));
            }
        }
    }
    if let Some((_, t)) = named.iter().find(|(n, _)| *n == "default") {
        return Ok((*t).to_owned());
    }
    match named.as_slice() {
        [(_, t)] => Ok((*t).to_owned()),
        _ => Err(format!(
            "chat_template lists templates {:?} but none is named \"default\"",
            named.iter().map(|(n, _)| *n).collect::<Vec<_>>()
        )),
    }
}

/// The JSON type name of a value, for error messages.
fn json_kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// DeepSeek-R1's chat template, verbatim from its `tokenizer_config.json`.
    pub(crate) const R1_TEMPLATE: &str = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}";

    pub(crate) const BOS: &str = "<｜begin▁of▁sentence｜>";
    pub(crate) const EOS: &str = "<｜end▁of▁sentence｜>";

    /// GPT-2's byte -> printable char map used by byte-level BPE vocabularies.
    fn byte_chars() -> Vec<char> {
        let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
        printable.extend(0xA1..=0xAC);
        printable.extend(0xAE..=0xFF);
        let mut map = vec!['\0'; 256];
        let mut extra = 0;
        for b in 0..256u32 {
            let c = if printable.contains(&b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            map[b as usize] = char::from_u32(c).expect("valid char");
        }
        map
    }

    /// A tiny byte-level BPE `tokenizer.json`: ids 0..256 are the bytes, a few merges make tokens that hold
    /// a whole (é) or part of (中, 🙂) a multi-byte character, then DeepSeek-R1's added tokens.
    /// `bos_post_processor` adds a `TemplateProcessing` that prepends the BOS, as some DeepSeek exports do.
    pub(crate) fn tokenizer_json(bos_post_processor: bool) -> String {
        let chars = byte_chars();
        let mut vocab = serde_json::Map::new();
        for (id, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), json!(id));
        }
        let mut merges = Vec::new();
        for pair in [[0xC3u8, 0xA9], [0xE4, 0xB8], [0x9F, 0x99]] {
            let (a, b) = (chars[pair[0] as usize], chars[pair[1] as usize]);
            merges.push(json!([a.to_string(), b.to_string()]));
            let id = vocab.len();
            vocab.insert(format!("{a}{b}"), json!(id));
        }
        let added = [
            (BOS, true),
            (EOS, true),
            ("<｜User｜>", false),
            ("<｜Assistant｜>", false),
            ("<think>", false),
            ("</think>", false),
        ];
        let first_added = vocab.len();
        let added_tokens: Vec<Json> = added
            .iter()
            .enumerate()
            .map(|(i, (content, special))| {
                json!({"id": first_added + i, "content": content, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": special})
            })
            .collect();
        let post_processor = if bos_post_processor {
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {BOS: {"id": BOS, "ids": [first_added], "tokens": [BOS]}}})
        } else {
            Json::Null
        };
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added_tokens,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": merges}
        })
        .to_string()
    }

    /// DeepSeek-R1's `tokenizer_config.json` (the fields moela reads), with `template` as `chat_template`.
    pub(crate) fn config_json(template: Option<&str>) -> String {
        let added = |content: &str| {
            json!({"__type": "AddedToken", "content": content, "lstrip": false, "normalized": true,
                   "rstrip": false, "single_word": false})
        };
        let mut config = json!({
            "add_bos_token": true, "add_eos_token": false,
            "bos_token": added(BOS), "eos_token": added(EOS), "pad_token": added(EOS),
            "clean_up_tokenization_spaces": false, "legacy": true, "model_max_length": 16384,
            "sp_model_kwargs": {}, "unk_token": null, "tokenizer_class": "LlamaTokenizerFast"
        });
        if let Some(t) = template {
            config["chat_template"] = json!(t);
        }
        config.to_string()
    }

    /// The R1-like test tokenizer with R1's chat template.
    pub(crate) fn r1_tokenizer() -> Tokenizer {
        let config = config_json(Some(R1_TEMPLATE));
        Tokenizer::from_bytes(tokenizer_json(false).as_bytes(), Some(config.as_bytes())).expect("test tokenizer")
    }

    fn conversation() -> Vec<Message> {
        vec![
            Message::system("You are a helpful assistant."),
            Message::user("What is 2+2?"),
            Message::assistant("<think>\nEasy: 2+2 is 4.\n</think>\n\n2+2 = 4."),
            Message::user("And 3+3?"),
        ]
    }

    #[test]
    fn renders_r1_two_turns_exactly() {
        let tok = r1_tokenizer();
        let rendered = tok.render_chat(&conversation(), true).expect("renders");
        assert_eq!(
            rendered,
            "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?\
             <｜Assistant｜>\n\n2+2 = 4.<｜end▁of▁sentence｜><｜User｜>And 3+3?<｜Assistant｜><think>\n"
        );
        assert!(prompt_opens_think(&rendered));
        let without = tok.render_chat(&conversation(), false).expect("renders");
        assert!(without.ends_with("<｜User｜>And 3+3?"));
        assert!(!prompt_opens_think(&without));
    }

    #[test]
    fn renders_r1_tool_outputs_and_first_turn() {
        let tok = r1_tokenizer();
        // No system prompt: nothing between BOS and the first user turn.
        assert_eq!(
            tok.render_chat(&[Message::user("hi")], true).expect("renders"),
            "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>\n"
        );
        // Tool outputs: the namespace flags carry across iterations, and no generation prompt follows them.
        let msgs = [
            Message::user("q"),
            Message::new("tool", "42"),
            Message::new("tool", "43"),
        ];
        assert_eq!(
            tok.render_chat(&msgs, true).expect("renders"),
            "<｜begin▁of▁sentence｜><｜User｜>q<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>42<｜tool▁output▁end｜>\
             \n<｜tool▁output▁begin｜>43<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
        );
    }

    #[test]
    fn python_string_methods_work() {
        let tok = r1_tokenizer()
            .with_chat_template(
                "{{ messages[0].content.strip().upper() }}|{{ 'a,b'.split(',')[-1] }}|{{ 'xy'.startswith('x') }}",
            )
            .expect("compiles");
        assert_eq!(
            tok.render_chat(&[Message::user("  hey ")], false).expect("renders"),
            "HEY|b|True"
        );
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_template_errors() {
        let tok = r1_tokenizer()
            .with_chat_template("{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}")
            .expect("compiles");
        match tok.render_chat(&[Message::user("x")], true) {
            Err(Error::Template(m)) => assert!(m.contains("system first"), "{m}"),
            other => panic!("expected a template error, got {other:?}"),
        }
        match r1_tokenizer().with_chat_template("{% for %}") {
            Err(Error::Template(_)) => {}
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    #[test]
    fn extra_variables_reach_the_template() {
        let tok = r1_tokenizer()
            .with_chat_template("{% if thinking %}<think>{% else %}</think>{% endif %}{{ tools is none }}")
            .expect("compiles");
        let out = tok
            .render_chat_with(&[], true, &[("thinking", json!(true))])
            .expect("renders");
        assert_eq!(out, "<think>True");
        assert_eq!(tok.render_chat(&[], true).expect("renders"), "</think>True");
    }

    #[test]
    fn special_tokens_resolved_from_vocabulary() {
        let tok = r1_tokenizer();
        assert_eq!(tok.bos_token(), Some(BOS));
        assert_eq!(tok.eos_token(), Some(EOS));
        assert_eq!(tok.bos_id(), Some(259));
        assert_eq!(tok.eos_id(), Some(260));
        assert_eq!(tok.token_id("<think>"), Some(263));
        assert_eq!(tok.token_id("</think>"), Some(264));
        assert_eq!(tok.token_id("<nope>"), None);
        assert_eq!(tok.vocab_size(), 265);
    }

    #[test]
    fn bos_added_once_for_raw_prompts_and_never_for_rendered_chats() {
        for post_processor in [false, true] {
            let config = config_json(Some(R1_TEMPLATE));
            let tok = Tokenizer::from_bytes(tokenizer_json(post_processor).as_bytes(), Some(config.as_bytes()))
                .expect("loads");
            let bos = tok.bos_id().expect("bos");
            let raw = tok.encode("hi", true).expect("encodes");
            assert_eq!(
                raw,
                vec![bos, u32::from(b'h'), u32::from(b'i')],
                "post_processor={post_processor}"
            );
            assert_eq!(tok.encode("hi", false).expect("encodes"), vec![104, 105]);
            let (rendered, ids) = tok.encode_chat(&[Message::user("hi")], true).expect("encodes");
            assert!(rendered.starts_with(BOS));
            assert_eq!(
                ids.iter().filter(|&&i| i == bos).count(),
                1,
                "post_processor={post_processor}"
            );
            assert_eq!(ids[0], bos);
            // A raw prompt that already starts with the BOS text gets no second one.
            let ids = tok.encode(&format!("{BOS}hi"), true).expect("encodes");
            assert_eq!(ids, vec![bos, 104, 105]);
            assert_eq!(tok.decode(&ids, true).expect("decodes"), "hi");
            assert_eq!(tok.decode(&ids, false).expect("decodes"), format!("{BOS}hi"));
        }
    }

    #[test]
    fn without_config_the_post_processor_decides() {
        let plain = Tokenizer::from_bytes(tokenizer_json(false).as_bytes(), None).expect("loads");
        assert_eq!(plain.encode("hi", true).expect("encodes"), vec![104, 105]);
        assert_eq!(plain.bos_id(), None);
        let with_pp = Tokenizer::from_bytes(tokenizer_json(true).as_bytes(), None).expect("loads");
        assert_eq!(with_pp.encode("hi", true).expect("encodes"), vec![259, 104, 105]);
        assert_eq!(
            with_pp.encode(&format!("{BOS}hi"), true).expect("encodes"),
            vec![259, 104, 105]
        );
    }

    #[test]
    fn add_flags_are_honoured() {
        let mut config: Json = serde_json::from_str(&config_json(None)).expect("json");
        config["add_bos_token"] = json!(false);
        config["add_eos_token"] = json!(true);
        let tok =
            Tokenizer::from_bytes(tokenizer_json(true).as_bytes(), Some(config.to_string().as_bytes())).expect("loads");
        assert_eq!(tok.encode("hi", true).expect("encodes"), vec![104, 105, 260]);
    }

    #[test]
    fn fallback_template_when_config_has_none() {
        let config = config_json(None);
        let tok = Tokenizer::from_bytes(tokenizer_json(false).as_bytes(), Some(config.as_bytes())).expect("loads");
        assert_eq!(tok.chat_template(), None);
        let out = tok.render_chat(&conversation(), true).expect("renders");
        assert_eq!(
            out,
            "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜>\
             <think>\nEasy: 2+2 is 4.\n</think>\n\n2+2 = 4.<｜end▁of▁sentence｜><｜User｜>And 3+3?<｜Assistant｜>"
        );
    }

    #[test]
    fn missing_template_is_a_clear_error() {
        // A vocabulary without <｜User｜>: no fallback.
        let json = tokenizer_json(false).replace("<｜User｜>", "<|user|>");
        let tok = Tokenizer::from_bytes(json.as_bytes(), None).expect("loads");
        match tok.render_chat(&[Message::user("x")], true) {
            Err(Error::Template(m)) => assert!(m.contains("no chat_template"), "{m}"),
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    #[test]
    fn named_template_list_uses_default() {
        let mut config: Json = serde_json::from_str(&config_json(None)).expect("json");
        config["chat_template"] = json!([
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT{{ bos_token }}"}
        ]);
        let tok = Tokenizer::from_bytes(tokenizer_json(false).as_bytes(), Some(config.to_string().as_bytes()))
            .expect("loads");
        assert_eq!(tok.render_chat(&[], false).expect("renders"), format!("DEFAULT{BOS}"));
        config["chat_template"] = json!([{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]);
        let err = Tokenizer::from_bytes(tokenizer_json(false).as_bytes(), Some(config.to_string().as_bytes()))
            .expect_err("no default");
        assert!(err.to_string().contains("\"default\""), "{err}");
    }

    #[test]
    fn bad_files_are_named_in_errors() {
        let err = Tokenizer::from_bytes(b"{not json", None).expect_err("bad tokenizer.json");
        assert!(err.to_string().starts_with("tokenizer.json:"), "{err}");
        let tj = tokenizer_json(false);
        for (config, needle) in [
            ("[1]", "top level"),
            ("{\"bos_token\": 3}", "bos_token"),
            ("{\"add_bos_token\": \"yes\"}", "add_bos_token"),
            ("{\"chat_template\": 7}", "chat_template"),
            ("{\"eos_token\": \"<missing>\"}", "not in the vocabulary"),
            ("{\"chat_template\": \"{% if %}\"}", "chat template"),
        ] {
            let err = Tokenizer::from_bytes(tj.as_bytes(), Some(config.as_bytes())).expect_err(config);
            let text = err.to_string();
            assert!(text.contains("tokenizer_config.json"), "{text}");
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }

    #[test]
    fn from_dir_reads_files_and_prefers_chat_template_jinja() {
        let dir = std::env::temp_dir().join(format!("moela-chat-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let missing = Tokenizer::from_dir(&dir).expect_err("no tokenizer.json");
        assert!(matches!(missing, Error::Io { ref path, .. } if path.ends_with("tokenizer.json")));
        std::fs::write(dir.join("tokenizer.json"), tokenizer_json(false)).expect("write");
        std::fs::write(dir.join("tokenizer_config.json"), config_json(Some(R1_TEMPLATE))).expect("write");
        let tok = Tokenizer::from_dir(&dir).expect("loads");
        assert_eq!(tok.chat_template(), Some(R1_TEMPLATE));
        std::fs::write(dir.join("chat_template.jinja"), "J{{ messages | length }}").expect("write");
        let tok = Tokenizer::from_dir(&dir).expect("loads");
        assert_eq!(tok.render_chat(&[Message::user("a")], true).expect("renders"), "J1");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn opens_think_detection() {
        assert!(prompt_opens_think("<｜Assistant｜><think>\n"));
        assert!(prompt_opens_think("<｜Assistant｜><think>"));
        assert!(prompt_opens_think("x<think> \n\t"));
        assert!(!prompt_opens_think("<｜Assistant｜></think>"));
        assert!(!prompt_opens_think("<think>a</think>"));
        assert!(!prompt_opens_think("<think>a"));
        assert!(!prompt_opens_think(""));
    }

    #[test]
    fn tokenizer_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn message_serde_round_trip() {
        let m: Message = serde_json::from_str(r#"{"role":"user","content":"é"}"#).expect("parses");
        assert_eq!(m, Message::user("é"));
        assert_eq!(
            serde_json::to_string(&m).expect("json"),
            r#"{"role":"user","content":"é"}"#
        );
    }
}
