// Types of the `moela` npm package (src/moela.js).

/** Name of the Cache API store that keeps downloaded checkpoint files. */
export const CACHE_NAME: 'moela-v1';
/** URL of the model shipped in the package (moela-arith-tiny); `Engine.load()` without a model loads it. */
export const DEFAULT_MODEL: string;

/** Thrown when the browser has no WebGPU, or WebGPU has no adapter; the message says what is needed. */
export class WebGPUUnavailableError extends Error {
  name: 'WebGPUUnavailableError';
  code: 'NO_WEBGPU';
}

/** What `checkWebGPU` learns about the adapter. */
export interface AdapterSummary {
  vendor: string;
  architecture: string;
  description: string;
  /** Whether the adapter has shader-f16 (moela's f16 weights do not need it). */
  shaderF16: boolean;
  maxBufferSize: number;
  maxStorageBufferBindingSize: number;
}

/** Resolves when WebGPU is usable here; throws a `WebGPUUnavailableError` otherwise. */
export function checkWebGPU(): Promise<AdapterSummary>;

/** Imports and initialises the wasm module (done by `load`; call it to start the download early). */
export function initWasm(): Promise<unknown>;
/** Bytes of this thread's wasm memory (`WebAssembly.Memory`); 0 before the module is initialised. */
export function wasmMemoryBytes(): number;

/** Load progress: reading files (`download`, from the network, the cache or disk), then `convert`. */
export type LoadProgress =
  | { phase: 'download'; file?: string; loaded: number; total: number }
  | { phase: 'convert'; loaded: number; total: number };

export interface LoadOptions {
  /**
   * Base URL of a Hugging Face checkpoint folder (config.json, tokenizer.json, model.safetensors or shards),
   * or the URL of a GGUF file (a split one's: any part). Without `model` or `files`, the package's own model
   * ({@link DEFAULT_MODEL}) loads.
   */
  model?: string | URL;
  /**
   * The folder's files instead, e.g. from `<input type="file" webkitdirectory>`, or a GGUF file (a split one's
   * parts together).
   */
  files?: FileList | File[];
  /**
   * How projection and expert weights are stored on the GPU: "f32", "f16" (packed pairs), "q8" or "q4" (8- or
   * 4-bit codes with an f16 scale per block of 32). All run on any WebGPU adapter. Default: for a GGUF file
   * the format nearest its main type (Q8_0, Q5, K-quants: "q8"; Q4_0: "q4"; F16/BF16: "f16"), else "f32".
   */
  weights?: WeightFormat;
  /** Tokens the chat session holds; 0 (default) is min(max_position_embeddings, 4096). */
  maxContext?: number;
  onProgress?: (progress: LoadProgress) => void;
  /** Keep downloads in the Cache API ("moela-v1") and reuse them. Default true. */
  cache?: boolean;
  /** Aborts the download (a WorkerEngine's load is ended with its worker). */
  signal?: AbortSignal;
}

/** Storage of projection and expert weights on the GPU. */
export type WeightFormat = 'f32' | 'f16' | 'q8' | 'q4';

export interface PresetOptions {
  seed?: number;
  weights?: WeightFormat;
  maxContext?: number;
}

/** What `info()` says about the model (as `moela info --json`). */
export interface ModelInfo {
  architecture: 'deepseek_v2' | 'deepseek_v3';
  total_parameters: number;
  active_parameters_per_token: number;
  layers: number;
  hidden_size: number;
  heads: number;
  vocab_size: number;
  /** Layers before the first MoE layer. */
  dense_layers: number;
  routed_experts: number;
  experts_per_token: number;
  shared_experts: number;
  topk_method: string;
  q_lora_rank: number | null;
  kv_lora_rank: number;
  rope_scaling: string;
  max_position_embeddings: number;
  weight_dtype: WeightFormat;
  gpu_weight_bytes: number;
  /** Bytes of weights one decoded token reads, in the stored format. */
  active_weight_bytes_per_token: number;
  /** How the checkpoint's files store the weights (a GGUF's quantisation mix), the most bytes first. */
  stored_types: { type: string; tensors: number; bytes: number }[];
  cache: {
    /** layers x (kv_lora_rank + qk_rope_head_dim). */
    values_per_token: number;
    bytes_per_token: number;
    dtype_bytes: number;
    /** layers x heads x (qk_head_dim + v_head_dim): an uncompressed multi-head cache. */
    mha_equivalent_values_per_token: number;
    compression: number;
  };
}

export interface CacheUsage {
  /** Tokens in the latent cache. */
  tokens: number;
  /** Bytes of latent cache in use. */
  bytes: number;
  /** Bytes an uncompressed multi-head K/V cache would take for as many tokens. */
  mhaBytes: number;
}

export interface BenchOptions {
  promptTokens?: number;
  genTokens?: number;
}

export interface BenchReport {
  prompt_tokens: number;
  gen_tokens: number;
  prefill_tokens_per_second: number;
  decode_tokens_per_second: number;
  weight_dtype: WeightFormat;
  active_weights_per_token: number;
  bytes_per_token: number;
  achieved_bandwidth_gbs: number;
  copy_bandwidth_gbs: number;
  /** Weights per second of the engine's matrix-vector product (4096 x 4096) on this device. */
  matvec_weights_per_second: number;
  /** Decode as fractions of the device's copy bandwidth and of its matrix-vector throughput. */
  roofline: { bandwidth: number; kernel: number };
}

/** The engine's numbers about one generation (`x_moela`). */
export interface GenerationStats {
  prompt_tokens: number;
  /** Prompt tokens already in the cache from earlier turns. */
  reused_tokens: number;
  generated_tokens: number;
  prefill_seconds: number;
  prefill_tokens_per_second: number;
  decode_seconds: number;
  decode_tokens_per_second: number;
  cache_bytes: number;
  finish_reason: 'eos' | 'length' | 'stop' | 'context_full';
}

export type TextPart = { type: 'text'; text: string };

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | (string & {});
  content: string | TextPart[];
}

export interface ChatCompletionRequest {
  messages: ChatMessage[];
  /** Raw text to continue instead of `messages` (no chat template). */
  prompt?: string;
  stream?: boolean;
  /** Most tokens to generate, reasoning included (default 256). */
  max_tokens?: number;
  max_completion_tokens?: number;
  /** 0 (the default) is greedy. */
  temperature?: number;
  top_p?: number;
  top_k?: number;
  min_p?: number;
  repetition_penalty?: number;
  /** OpenAI's: minus this times a token's count so far, in [-2, 2]. */
  frequency_penalty?: number;
  /** OpenAI's: minus this for every token seen so far, in [-2, 2]. */
  presence_penalty?: number;
  seed?: number;
  /** Stop when the answer contains one of these (not emitted). */
  stop?: string | string[];
  /** Close the reasoning with </think> after this many reasoning tokens. */
  thinking_budget?: number;
  /** Stops the generation between tokens; the stream then ends with finish_reason "abort". */
  signal?: AbortSignal;
  /** The experts each MoE layer chose for each generated token: `experts[moeLayer][k]`. */
  onRouting?: (experts: number[][]) => void;
  n?: 1;
}

/** "stop": eos or a stop string; "length": max_tokens or the context is full; "abort": the signal. */
export type FinishReason = 'stop' | 'length' | 'abort';

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  prompt_tokens_details: { cached_tokens: number };
}

export interface ChatCompletionChunk {
  id: string;
  object: 'chat.completion.chunk';
  created: number;
  model: string;
  choices: [
    {
      index: 0;
      delta: { role?: 'assistant'; content?: string; reasoning_content?: string };
      finish_reason: FinishReason | null;
      logprobs: null;
    },
  ];
  /** On the last chunk (absent when aborted). */
  usage?: Usage;
  /** On the last chunk (absent when aborted): the engine's numbers, decode tok/s among them. */
  x_moela?: GenerationStats;
}

export interface ChatCompletion {
  id: string;
  object: 'chat.completion';
  created: number;
  model: string;
  choices: [
    {
      index: 0;
      message: { role: 'assistant'; content: string; reasoning_content: string };
      finish_reason: FinishReason;
      logprobs: null;
    },
  ];
  usage?: Usage;
  x_moela?: GenerationStats;
}

/** An async iterable of chunks; `abort()` stops the generation between tokens. */
export class ChatCompletionStream implements AsyncIterable<ChatCompletionChunk> {
  abort(): void;
  [Symbol.asyncIterator](): AsyncIterator<ChatCompletionChunk>;
}

export interface Completions {
  create(request: ChatCompletionRequest & { stream: true }): Promise<ChatCompletionStream>;
  create(request: ChatCompletionRequest & { stream?: false }): Promise<ChatCompletion>;
  create(request: ChatCompletionRequest): Promise<ChatCompletionStream | ChatCompletion>;
}

/** What `Engine` and `WorkerEngine` share. */
export interface MoelaEngine {
  /** OpenAI-shaped chat; the conversation's cached prefix is reused across calls. */
  readonly chat: { completions: Completions };
  /** The model's name (its folder's name, or the preset's). */
  readonly model: string;
  info(): ModelInfo;
  /** Token ids of `text` (bos first when `special`). */
  encode(text: string, special?: boolean): Promise<number[]>;
  /** Logits at every position of `tokens`, from one prefill. */
  logits(tokens: ArrayLike<number>): Promise<Float32Array[]>;
  cacheUsage(): Promise<CacheUsage>;
  /** Forgets the conversation held in the cache. */
  resetChat(): Promise<void>;
  bench(options?: BenchOptions): Promise<BenchReport>;
  /** Frees the model's GPU memory; the engine cannot be used afterwards. */
  unload(): Promise<void>;
}

/** A model on this thread. Its instance members are those of `MoelaEngine` (merged below). */
export class Engine {
  static load(options?: LoadOptions): Promise<Engine>;
  /** A random-weight model in the shape of a real one: "v2-lite-mini" or "v3-mini". */
  static loadPreset(name: string, options?: PresetOptions): Promise<Engine>;
  /** Deletes the Cache API store; resolves to whether there was one. */
  static clearCache(): Promise<boolean>;
}
export interface Engine extends MoelaEngine {}

/**
 * The same API, with the engine in a module Web Worker, so the page never freezes. `unload()` also ends the
 * worker.
 */
export class WorkerEngine {
  static load(options?: LoadOptions): Promise<WorkerEngine>;
  static loadPreset(name: string, options?: PresetOptions): Promise<WorkerEngine>;
  static clearCache(): Promise<boolean>;
}
export interface WorkerEngine extends MoelaEngine {}

/**
 * A model served by `moela serve` (OpenAI's HTTP API), with the chat API of `Engine`: no WebGPU needed on the
 * page. `encode` and `logits` are not served.
 */
export class ServerEngine {
  /** Connects to the server at `base` (default: the page's origin); fails if it is not a moela server. */
  static connect(base?: string): Promise<ServerEngine>;
  /** The `moela serve` that served this page (its responses carry `x-moela-server`), or null. */
  static served(): Promise<ServerEngine | null>;
  readonly chat: { completions: Completions };
  readonly model: string;
  /** `Engine.info()`'s facts, and the server's `context` (tokens per slot) and `slots`. */
  info(): ModelInfo & { context: number; slots: number };
  /** The cache the last answer left in its slot. */
  cacheUsage(): Promise<CacheUsage>;
  resetChat(): Promise<void>;
  /** Rejects: benchmarks run on the server's machine (`moela bench`). */
  bench(options?: BenchOptions): Promise<BenchReport>;
  unload(): Promise<void>;
}

/** Folds a stream's chunks into a `chat.completion`. */
export function collectCompletion(stream: AsyncIterable<ChatCompletionChunk>): Promise<ChatCompletion>;

/** An Error as it crosses postMessage (used by the worker). */
export function serializeError(e: unknown): { name: string; message: string; code?: string; stack?: string };
