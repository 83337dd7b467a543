//! `moela`: run DeepSeek-architecture models (MLA + MoE) on any wgpu adapter.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use moela::{
    CheckpointFiles, Engine, Event, GenerateOptions, Kernels, LoadOptions, Message, Progress, SamplingOptions,
    SessionOptions, Stats, WeightDtype,
};
mod serve;

use moela_tools::bench::bench;
use moela_tools::preset::{PRESETS, preset_files};

/// The model used when `--model` is not given: the checkpoint folder shipped with moela.
const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/moela-arith-tiny");
/// The demo page `moela serve` serves by default.
const DEFAULT_WEB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../web");

#[derive(Parser)]
#[command(
    name = "moela",
    version,
    about = "Run DeepSeek-V2/V3/R1-architecture models on WebGPU (Vulkan, Metal, DX12)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an answer to one prompt, streaming reasoning and answer apart.
    Run(RunArgs),
    /// A multi-turn chat in the terminal that keeps the latent cache between turns.
    Chat(ChatArgs),
    /// Print the logits at every position of a token sequence as JSON.
    Logits(LogitsArgs),
    /// Describe a model: parameters, experts, and what the latent cache saves.
    Info(InfoArgs),
    /// Measure prefill and decode speed against the device's copy bandwidth (JSON with --json).
    Bench(BenchArgs),
    /// Score the arithmetic model on held-out problems with greedy decoding (JSON).
    Eval(EvalArgs),
    /// Write a model as a GGUF file that llama.cpp reads (its converter's tensor names, layouts and metadata).
    Quantize(QuantizeArgs),
    /// Serve the model over HTTP with the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models).
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests generated at once, each in a slot with its own latent cache.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Requests that may wait for a free slot; more are refused with 503 and Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Tokens each slot's cache holds (0: min(max_position_embeddings, 4096)).
    #[arg(long, default_value_t = 0)]
    max_context: usize,
    /// Largest request body in bytes (413 past it).
    #[arg(long, default_value_t = 4 << 20)]
    body_limit: usize,
    /// A folder served at / (default: the demo page, web/ of moela's source tree, when it is there); the
    /// page's "This server" engine is this server.
    #[arg(long)]
    web: Option<PathBuf>,
    /// Serve the API alone, no files.
    #[arg(long, conflicts_with = "web")]
    no_web: bool,
}

#[derive(Args)]
struct QuantizeArgs {
    /// The HF checkpoint folder (or GGUF file) to write.
    #[arg(long, short)]
    model: PathBuf,
    /// The GGUF file to write.
    #[arg(long, short)]
    out: PathBuf,
    /// The type of the matrices: f32, f16, bf16, q8_0, q4_0, q4_k, q5_k or q6_k. Norms, 1-D tensors and the
    /// router stay F32, and a matrix whose rows are not whole blocks of the type is F16, as llama.cpp's
    /// converter does (q4_k, q5_k: Q5_0, and a Q8_0 head; q6_k: Q8_0; as llama.cpp's quantiser chooses).
    #[arg(long = "type", default_value = "q8_0", value_parser = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k"])]
    ty: String,
}

#[derive(Args)]
struct ModelArgs {
    /// An HF checkpoint folder (config.json, *.safetensors, tokenizer.json, tokenizer_config.json) or a GGUF
    /// file (for a split one, any of its parts). Defaults to the model shipped with moela.
    #[arg(long, short)]
    model: Option<PathBuf>,
    /// How weights are stored on the GPU: f32, f16, q8 (8-bit blocks), q5 (GGUF's Q5_0), q4 (4-bit blocks),
    /// q4k (GGUF's Q4_K: 4-bit codes, a scale and minimum per 32), q5k (GGUF's Q5_K: the same with 5-bit
    /// codes) or q6k (GGUF's Q6_K: 6-bit codes, a scale per 16). Defaults to f32 for an HF folder and, for a
    /// GGUF file, to the format nearest its main type (Q8_0 and the rest: q8; Q5_0: q5; Q4_0: q4; Q4_K: q4k;
    /// Q5_K: q5k; Q6_K: q6k, the K-quants keeping each of the file's tensors in its own nearest format;
    /// F16, BF16: f16).
    #[arg(long)]
    weights: Option<String>,
    /// Hot-path implementation on the GPU: wgsl (moela's kernels) or generic (burn's ops, the reference).
    #[arg(long, default_value = "wgsl", value_parser = ["wgsl", "generic"])]
    kernels: String,
    /// Where the model runs: auto (the GPU when there is one, else the CPU with a notice), gpu (wgpu: Vulkan,
    /// Metal, DX12; an error without one) or cpu (burn's CPU backend).
    #[arg(long, default_value = "auto", value_parser = ["auto", "gpu", "cpu"])]
    device: String,
}

#[derive(Args)]
struct GenArgs {
    /// Most tokens to generate (reasoning included).
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens less likely than P times the most likely one (0: off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalise tokens already seen (1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Subtract this times a token's count so far from its logit (OpenAI's frequency_penalty, -2..2; 0: off).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    frequency_penalty: f32,
    /// Subtract this from the logit of every token seen so far (OpenAI's presence_penalty, -2..2; 0: off).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    presence_penalty: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Close the reasoning after N tokens by inserting </think>.
    #[arg(long)]
    thinking_budget: Option<usize>,
    /// Stop when the answer contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Do not print the reasoning.
    #[arg(long)]
    hide_reasoning: bool,
    /// Tokens of context the session holds (default: min(max_position_embeddings, 4096)).
    #[arg(long, default_value_t = 0)]
    max_context: usize,
}

impl GenArgs {
    fn options(&self) -> GenerateOptions {
        GenerateOptions {
            sampling: SamplingOptions {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                frequency_penalty: self.frequency_penalty,
                presence_penalty: self.presence_penalty,
                seed: self.seed,
            },
            max_tokens: self.max_tokens,
            thinking_budget: self.thinking_budget,
            stop: self.stop.clone(),
            record_routing: false,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (a user message, unless --raw).
    #[arg(long, short)]
    prompt: String,
    /// Feed the prompt as raw text, without the chat template.
    #[arg(long)]
    raw: bool,
    #[command(flatten)]
    gen_args: GenArgs,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    gen_args: GenArgs,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids, e.g. 0,15,300.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// Feed the tokens one at a time through the latent cache instead of one prefill.
    #[arg(long)]
    decode: bool,
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A random-weight model in the shape of a real checkpoint instead of --model: v2-lite (DeepSeek-V2-Lite
    /// at full size, made as it loads), v3-layer (one V3 layer at full width), v2-lite-mini, v3-mini.
    #[arg(long, conflicts_with = "model")]
    preset: Option<String>,
    /// Prompt tokens to prefill.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 16)]
    gen_tokens: usize,
    /// Seed of the preset weights and prompt.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Also time each kernel of the counted decode step and of one more prefill (run one at a time) and
    /// list where they go.
    #[arg(long)]
    profile: bool,
    /// Also measure the aggregate decode speed of this many streams stepped together (one batched
    /// forward per step, as `moela serve` runs concurrent requests), e.g. `--streams 1,4,8`.
    #[arg(long, value_delimiter = ',')]
    streams: Vec<usize>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Held-out problems per split (3-digit addition, 3-digit subtraction, word problems, 4-digit addition).
    #[arg(long, default_value_t = 100)]
    problems: usize,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 400)]
    max_tokens: usize,
}

/// The device `--device` names; with `auto`, the GPU when there is one, else the CPU with a one-line notice
/// saying how to get the GPU path.
fn choose_device(choice: &str) -> Result<moela::Device> {
    Ok(match choice {
        "cpu" => moela::cpu_device(),
        "gpu" => moela::default_device()?,
        _ => match moela::default_device() {
            Ok(d) => d,
            Err(_) => {
                eprintln!(
                    "moela: no GPU adapter, so this runs on the CPU. For the GPU path install a Vulkan driver (on \
                     Debian/Ubuntu without a GPU: apt-get install mesa-vulkan-drivers); --device cpu skips this check."
                );
                moela::cpu_device()
            }
        },
    })
}

/// Gives Mesa's window-system probing a valid `XDG_RUNTIME_DIR` where the environment has none (a server, a
/// container, CI): otherwise every run on a Mesa driver starts with four "XDG_RUNTIME_DIR is invalid" lines.
/// Only moela's own process sees it.
fn runtime_dir() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).is_dir()) {
        return;
    }
    let user = std::env::var("USER").unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("moela-runtime-{user}"));
    let made = std::fs::create_dir_all(&dir).is_ok() && {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).is_ok()
        }
        #[cfg(not(unix))]
        true
    };
    if made {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
    }
}

fn main() {
    runtime_dir();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => cmd_run(a),
        Command::Chat(a) => cmd_chat(a),
        Command::Logits(a) => cmd_logits(a),
        Command::Info(a) => cmd_info(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Quantize(a) => cmd_quantize(a),
        Command::Serve(a) => cmd_serve(a),
    }
}

fn model_dir(args: &ModelArgs) -> PathBuf {
    args.model.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL))
}

/// The `--weights` asked for, or the default for the model at `path`.
fn weight_dtype(args: &ModelArgs, path: &Path) -> Result<WeightDtype> {
    if let Some(w) = &args.weights {
        return Ok(WeightDtype::parse(w)?);
    }
    if path.is_file() && moela::load::gguf::is_gguf(path) {
        let header = moela::load::gguf::read_header(path)?;
        if let Some(&(main, ..)) = header.type_mix().first() {
            let dtype = header.nearest_format();
            eprintln!(
                "moela: {} holds mostly {}; its weights are stored as {} (--weights to choose)",
                path.display(),
                main.name(),
                dtype.name()
            );
            return Ok(dtype);
        }
    }
    Ok(WeightDtype::F32)
}

/// A progress bar in bytes on stderr, with speed and ETA, labelled `what` (hidden when stderr is not a terminal).
fn bytes_bar(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

fn load_files(files: CheckpointFiles, args: &ModelArgs, what: &str) -> Result<Arc<Engine>> {
    let dtype = weight_dtype(args, &model_dir(args))?;
    let bar = bytes_bar(&format!("loading {what}"));
    let device = choose_device(&args.device)?;
    let kernels = Kernels::parse(&args.kernels)?;
    let engine = pollster::block_on(Engine::load(
        files,
        LoadOptions { dtype, kernels },
        &device,
        &mut |p: Progress| {
            bar.set_length(p.total);
            bar.set_position(p.loaded);
        },
    ))
    .with_context(|| format!("loading {what}"))?;
    bar.finish_and_clear();
    Ok(Arc::new(engine))
}

fn load(args: &ModelArgs) -> Result<Arc<Engine>> {
    let dir = model_dir(args);
    let files = CheckpointFiles::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
    load_files(files, args, &dir.display().to_string())
}

/// Prints events: reasoning dimmed on a terminal (or hidden), the answer plain, stats on stderr.
struct Printer {
    hide_reasoning: bool,
    tty: bool,
    in_reasoning: bool,
}

impl Printer {
    fn new(hide_reasoning: bool) -> Self {
        Self {
            hide_reasoning,
            tty: std::io::stdout().is_terminal(),
            in_reasoning: false,
        }
    }

    fn event(&mut self, ev: Event, answer: &mut String) -> Result<Option<Stats>> {
        let mut out = std::io::stdout().lock();
        match ev {
            Event::Reasoning(t) => {
                if !self.hide_reasoning {
                    if !self.in_reasoning {
                        write!(out, "{}", if self.tty { "\x1b[2m" } else { "<think>\n" })?;
                        self.in_reasoning = true;
                    }
                    write!(out, "{t}")?;
                }
            }
            Event::Content(t) => {
                self.close(&mut out)?;
                answer.push_str(&t);
                write!(out, "{t}")?;
            }
            Event::Routing(_) => {}
            Event::Done(stats) => {
                self.close(&mut out)?;
                writeln!(out)?;
                return Ok(Some(stats));
            }
        }
        out.flush()?;
        Ok(None)
    }

    fn close(&mut self, out: &mut impl Write) -> Result<()> {
        if self.in_reasoning {
            write!(out, "{}", if self.tty { "\x1b[0m\n" } else { "\n</think>\n" })?;
            self.in_reasoning = false;
        }
        Ok(())
    }
}

/// The load's size, time and speed, on stderr.
fn print_load(engine: &Engine) {
    let l = engine.load_report();
    eprintln!(
        "[loaded {:.2} GB of weights in {:.1} s, {:.2} GB/s]",
        l.bytes as f64 / 1e9,
        l.seconds,
        l.gb_per_second()
    );
}

fn print_stats(s: &Stats) {
    eprintln!(
        "[{} prompt tokens ({} reused), {} generated, prefill {:.1} tok/s, decode {:.2} tok/s, cache {} KiB, {:?}]",
        s.prompt_tokens,
        s.reused_tokens,
        s.generated_tokens,
        s.prefill_tokens_per_second,
        s.decode_tokens_per_second,
        s.cache_bytes / 1024,
        s.finish_reason
    );
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let engine = load(&a.model)?;
    let mut session = engine.session(SessionOptions {
        max_context: a.gen_args.max_context,
    })?;
    let options = a.gen_args.options();
    let mut generation = if a.raw {
        session.complete(&a.prompt, options)?
    } else {
        let messages = [Message {
            role: "user".into(),
            content: a.prompt.clone(),
        }];
        session.chat(&messages, options)?
    };
    let mut printer = Printer::new(a.gen_args.hide_reasoning);
    let mut answer = String::new();
    while let Some(ev) = generation.next_blocking() {
        if let Some(stats) = printer.event(ev?, &mut answer)? {
            print_load(&engine);
            print_stats(&stats);
        }
    }
    Ok(())
}

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let engine = load(&a.model)?;
    let mut session = engine.session(SessionOptions {
        max_context: a.gen_args.max_context,
    })?;
    let mut messages: Vec<Message> = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message {
            role: "system".into(),
            content: s.clone(),
        });
    }
    eprintln!("moela chat: type a message; /reset starts over, /exit or Ctrl-D quits.");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                session.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(Message {
            role: "user".into(),
            content: line.to_string(),
        });
        let mut printer = Printer::new(a.gen_args.hide_reasoning);
        let mut answer = String::new();
        let result: Result<()> = (|| {
            let mut generation = session.chat(&messages, a.gen_args.options())?;
            while let Some(ev) = generation.next_blocking() {
                if let Some(stats) = printer.event(ev?, &mut answer)? {
                    print_stats(&stats);
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            eprintln!("error: {e:#}");
            messages.pop();
            continue;
        }
        messages.push(Message {
            role: "assistant".into(),
            content: answer,
        });
    }
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let engine = load(&a.model)?;
    let tty = std::io::stderr().is_terminal();
    let report = moela_tools::arith::evaluate(&engine, a.problems, a.max_tokens, &mut |split, done, total| {
        if tty {
            eprint!("\r{split}: {done}/{total}   ");
            if done == total {
                eprintln!();
            }
        }
    })?;
    print_line(&serde_json::to_string_pretty(&report)?)
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let engine = load(&a.model)?;
    let logits = if a.decode {
        pollster::block_on(engine.logits_decode(&a.tokens))?
    } else {
        pollster::block_on(engine.logits(&a.tokens))?
    };
    let out = serde_json::json!({ "tokens": a.tokens, "logits": logits });
    print_line(&out.to_string())
}

/// Prints a line to stdout; a closed pipe (`moela logits ... | head`) ends quietly instead of panicking.
fn print_line(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{s}").and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn cmd_info(a: InfoArgs) -> Result<()> {
    let dir = model_dir(&a.model);
    if dir.is_file() && moela::load::gguf::is_gguf(&dir) {
        return gguf_info(&dir, weight_dtype(&a.model, &dir)?, a.json);
    }
    let bytes =
        std::fs::read(dir.join("config.json")).with_context(|| format!("reading {}/config.json", dir.display()))?;
    let config = moela::ModelConfig::from_json_bytes(&bytes, "config.json")?;
    let info = moela::ModelInfo::new(&config, weight_dtype(&a.model, &dir)?);
    if a.json {
        print_line(&serde_json::to_string_pretty(&info)?)?;
        return Ok(());
    }
    print_info(&dir, &info)
}

/// `moela info` for a GGUF file: its metadata and quantisation mix, read from the header alone, and the
/// model its metadata describes.
fn gguf_info(path: &Path, dtype: WeightDtype, json: bool) -> Result<()> {
    use moela::load::gguf::Value;
    let h = moela::load::gguf::read_header(path)?;
    let model = h
        .model_config(&path.display().to_string())
        .map(|c| moela::ModelInfo::new(&c, dtype));
    if json {
        // Scalars as they are; arrays (a tokenizer's 100k tokens) by their length.
        let value = |v: &Value| match v {
            Value::String(s) => serde_json::Value::from(s.as_str()),
            Value::Bool(b) => (*b).into(),
            Value::Array(a) => serde_json::json!({ "array": a.len() }),
            Value::I8(v) => (*v).into(),
            Value::I16(v) => (*v).into(),
            Value::I32(v) => (*v).into(),
            Value::I64(v) => (*v).into(),
            Value::F32(v) => f64::from(*v).into(),
            Value::F64(v) => (*v).into(),
            other => other.as_u64().map_or(serde_json::Value::Null, serde_json::Value::from),
        };
        let metadata: serde_json::Map<String, serde_json::Value> =
            h.metadata.iter().map(|(k, v)| (k.clone(), value(v))).collect();
        let types: Vec<serde_json::Value> = h
            .type_mix()
            .iter()
            .map(|(t, n, bytes)| serde_json::json!({"type": t.name(), "tensors": n, "bytes": bytes}))
            .collect();
        let out = serde_json::json!({
            "file": path.display().to_string(),
            "gguf_version": h.version,
            "architecture": h.architecture(),
            "tensors": h.tensors.len(),
            "data_bytes": h.data_bytes(),
            "types": types,
            "metadata": metadata,
            "model": model.as_ref().ok(),
            "model_error": model.as_ref().err().map(ToString::to_string),
        });
        return print_line(&serde_json::to_string_pretty(&out)?);
    }
    let size = |b: u64| match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    };
    let mut out = format!("file           {} (GGUF v{})\n", path.display(), h.version);
    out += &format!("architecture   {}\n", h.architecture().unwrap_or("(none given)"));
    if let Some(name) = h.get("general.name").and_then(Value::as_str) {
        out += &format!("name           {name}\n");
    }
    out += &format!("tensors        {}, {} of data\n", h.tensors.len(), size(h.data_bytes()));
    out += "types          (bytes per ggml type, the most first)\n";
    for (t, n, bytes) in h.type_mix() {
        let share = 100.0 * bytes as f64 / h.data_bytes().max(1) as f64;
        out += &format!("  {:<8} {n:>5} tensors  {:>11}  {share:>5.1}%\n", t.name(), size(bytes));
    }
    out += "metadata";
    for (key, value) in &h.metadata {
        out += &format!("\n  {key} = {}", value.summary());
    }
    print_line(&out)?;
    match model {
        Ok(info) => print_info(path, &info),
        Err(e) => print_line(&format!("model          not one moela runs: {e}")),
    }
}

fn print_info(dir: &Path, i: &moela::ModelInfo) -> Result<()> {
    let mut out = String::new();
    let b = |n: u64| match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n => n.to_string(),
    };
    out += &format!("model          {}\n", dir.display());
    out += &format!("architecture   {}\n", i.architecture);
    out += &format!(
        "parameters     {} total, {} active per token\n",
        b(i.total_parameters),
        b(i.active_parameters_per_token)
    );
    out += &format!(
        "layers         {} ({} dense), hidden {}, {} heads, vocab {}\n",
        i.layers, i.dense_layers, i.hidden_size, i.heads, i.vocab_size
    );
    out += &format!(
        "experts        {} routed (top-{}, {}), {} shared\n",
        i.routed_experts, i.experts_per_token, i.topk_method, i.shared_experts
    );
    let q = i
        .q_lora_rank
        .map_or("none (plain q_proj)".to_string(), |r| r.to_string());
    out += &format!(
        "attention      MLA, q_lora_rank {q}, kv_lora_rank {}, rope scaling {}\n",
        i.kv_lora_rank, i.rope_scaling
    );
    out += &format!(
        "latent cache   {} values/token ({} bytes at f32) vs {} for an uncompressed MHA cache: {:.1}x smaller\n",
        i.cache.values_per_token, i.cache.bytes_per_token, i.cache.mha_equivalent_values_per_token, i.cache.compression
    );
    out += &format!(
        "GPU weights    {:.1} MiB as {}\n",
        i.gpu_weight_bytes as f64 / (1 << 20) as f64,
        i.weight_dtype
    );
    print_line(out.trim_end())
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    let engine = load(&a.model)?;
    print_load(&engine);
    let dir = model_dir(&a.model);
    // The model's name: its folder's, or its file's without `.gguf` (and a split file's part number).
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("moela");
    let name = name.strip_suffix(".gguf").unwrap_or(name);
    let split = name
        .len()
        .checked_sub(15)
        .and_then(|i| Some((name.get(..i)?, name.get(i..)?)));
    let name = match split {
        Some((head, tail)) if tail.starts_with('-') && tail.get(6..10) == Some("-of-") => head,
        _ => name,
    };
    serve::run(
        engine,
        serve::Options {
            addr: std::net::SocketAddr::new(a.host, a.port),
            parallel: a.parallel,
            queue: a.queue,
            max_context: a.max_context,
            body_limit: a.body_limit,
            model_id: name.to_string(),
            web: match (a.no_web, a.web) {
                (true, _) => None,
                (false, Some(dir)) => Some(dir),
                (false, None) => Some(PathBuf::from(DEFAULT_WEB)).filter(|d| d.join("index.html").is_file()),
            },
        },
    )
}

fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    use moela::load::gguf::GgmlType;
    let ty = match a.ty.as_str() {
        "f32" => GgmlType::F32,
        "f16" => GgmlType::F16,
        "bf16" => GgmlType::BF16,
        "q4_0" => GgmlType::Q4_0,
        "q4_k" => GgmlType::Q4_K,
        "q5_k" => GgmlType::Q5_K,
        "q6_k" => GgmlType::Q6_K,
        _ => GgmlType::Q8_0,
    };
    let bar = bytes_bar("writing");
    let started = std::time::Instant::now();
    let written = moela::load::gguf::write::quantize(&a.model, &a.out, ty, &mut |p: Progress| {
        bar.set_length(p.total);
        bar.set_position(p.loaded);
    })
    .with_context(|| format!("writing {}", a.out.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "[wrote {} tensors, {:.2} GB, to {} in {:.1} s]",
        written.tensors,
        written.bytes as f64 / 1e9,
        a.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let (engine, name) = match &a.preset {
        Some(p) => {
            if !PRESETS.iter().any(|(n, _)| n == p) {
                bail!(
                    "unknown preset {p:?}; presets: {}",
                    PRESETS.iter().map(|(n, d)| format!("\n  {n}: {d}")).collect::<String>()
                );
            }
            let files = preset_files(p, a.seed)?;
            (
                load_files(files, &a.model, &format!("preset {p}"))?,
                format!("preset:{p}"),
            )
        }
        None => (load(&a.model)?, model_dir(&a.model).display().to_string()),
    };
    let report = pollster::block_on(bench(&engine, a.prompt_tokens, a.gen_tokens, a.seed, a.profile))?;
    let streams = if a.streams.is_empty() {
        Vec::new()
    } else {
        pollster::block_on(moela_tools::bench::streams(
            &engine,
            a.prompt_tokens,
            a.gen_tokens,
            &a.streams,
            a.seed,
            a.profile,
        ))?
    };
    let info = engine.info();
    if a.json {
        let mut out = serde_json::json!({
            "model": name,
            "adapter": format!("{:?}", engine.device()),
            "parameters": { "total": info.total_parameters, "active_per_token": info.active_parameters_per_token },
            "bench": report,
        });
        if !streams.is_empty() {
            out["streams"] = serde_json::json!(streams);
        }
        print_line(&serde_json::to_string_pretty(&out)?)?;
    } else {
        println!("model            {name}");
        println!(
            "prefill          {:.1} tok/s ({} tokens)",
            report.prefill_tokens_per_second, report.prompt_tokens
        );
        println!(
            "decode           {:.2} tok/s ({} tokens)",
            report.decode_tokens_per_second, report.gen_tokens
        );
        println!(
            "bytes per token  {:.1} MiB",
            report.bytes_per_token as f64 / (1 << 20) as f64
        );
        println!(
            "bandwidth        {:.2} GB/s achieved, {:.2} GB/s copy: {:.1}% of the roofline",
            report.achieved_bandwidth_gbs,
            report.copy_bandwidth_gbs,
            100.0 * report.roofline.bandwidth
        );
        println!(
            "kernel           {:.0} M weights/s matrix-vector: a step runs at {:.1}% of it",
            report.matvec_weights_per_second / 1e6,
            100.0 * report.roofline.kernel
        );
        println!("dispatches       {} per decoded token", report.dispatches_per_token);
        println!(
            "load             {:.2} GB in {:.1} s, {:.2} GB/s",
            report.load.bytes as f64 / 1e9,
            report.load.seconds,
            report.load_gb_per_second
        );
        if let Some(peak) = report.peak_host_memory_bytes {
            println!(
                "host memory      {:.2} GiB peak resident",
                peak as f64 / (1u64 << 30) as f64
            );
        }
        if let Some(m) = report.gpu_memory {
            println!(
                "GPU memory       {:.1} MiB reserved, {:.2}x weights + cache ({:.1} MiB)",
                m.reserved_bytes as f64 / (1 << 20) as f64,
                m.ratio,
                m.weights_and_cache_bytes as f64 / (1 << 20) as f64
            );
        }
        let by_kernel = |title: &str, list: &[moela::gpu::KernelStat]| {
            println!("{title}");
            for k in list.iter().take(16) {
                println!(
                    "  {:>8.2} ms {:>5} x {}",
                    k.seconds.unwrap_or(0.0) * 1e3,
                    k.launches,
                    k.name
                );
            }
        };
        if a.profile {
            by_kernel("decode step, by kernel:", &report.dispatches_by_kernel);
        }
        if let Some(list) = &report.prefill_by_kernel {
            by_kernel("prefill, by kernel:", list);
        }
        for r in &streams {
            println!(
                "{:>2} streams       {:.2} tok/s together, {:.2}x one stream, {} dispatches per step",
                r.streams, r.decode_tokens_per_second, r.speedup, r.dispatches_per_step
            );
            if let Some(list) = &r.by_kernel {
                by_kernel(&format!("{} streams' step, by kernel:", r.streams), list);
            }
        }
    }
    Ok(())
}
