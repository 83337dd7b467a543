// moela in the browser: DeepSeek-V2/V3/R1 (MLA + MoE) inference on WebGPU.
//
// This module wraps the wasm-bindgen surface (`pkg/moela_wasm.js`, built by scripts/build-wasm.sh) in an
// OpenAI-shaped API:
//
//   const engine = await Engine.load({ model: "https://host/hf-folder/", onProgress });
//   for await (const chunk of await engine.chat.completions.create({ messages, stream: true })) { ... }
//
// `Engine` runs on the thread that loads it; `WorkerEngine` has the same API and runs an `Engine` in a
// module Web Worker (src/worker.js), so a page never freezes while a model loads or generates.

/**
 * The URL of the model shipped in this package: moela-arith-tiny, a tiny DeepSeek-V3-architecture model
 * trained by moela to add and subtract with R1-style reasoning. `Engine.load()` without a model loads it.
 */
export const DEFAULT_MODEL = new URL('../model/', import.meta.url).href;

/** Name of the Cache API store that keeps downloaded checkpoint files between visits. */
export const CACHE_NAME = 'moela-v1';

const BROWSERS =
  'moela needs a browser with WebGPU: Chrome or Edge 113+, Safari 26+ or Firefox 141+. ' +
  'On Linux, Chrome must be started with --enable-unsafe-webgpu (and hardware acceleration on).';

/** Thrown when the browser has no WebGPU, or WebGPU has no adapter. */
export class WebGPUUnavailableError extends Error {
  constructor(message) {
    super(message);
    this.name = 'WebGPUUnavailableError';
    this.code = 'NO_WEBGPU';
  }
}

/**
 * Checks that WebGPU can be used here (a page or a worker). Resolves to what the adapter says about
 * itself; throws a `WebGPUUnavailableError` whose message says which browser or flag is needed.
 */
export async function checkWebGPU() {
  const where = typeof window === 'undefined' ? 'this worker' : 'this browser';
  if (globalThis.isSecureContext === false) {
    throw new WebGPUUnavailableError(
      `WebGPU is not available: the page is not a secure context (${globalThis.location?.origin}). ` +
        'Serve it over https, or from localhost / 127.0.0.1. ' + BROWSERS,
    );
  }
  if (typeof navigator === 'undefined' || !navigator.gpu) {
    throw new WebGPUUnavailableError(`WebGPU is not available in ${where} (navigator.gpu is missing). ${BROWSERS}`);
  }
  let adapter;
  try {
    adapter = await navigator.gpu.requestAdapter();
  } catch (e) {
    throw new WebGPUUnavailableError(
      `WebGPU is not available: requestAdapter() failed (${e?.message ?? e}). ${BROWSERS}`,
    );
  }
  if (!adapter) {
    throw new WebGPUUnavailableError(
      'WebGPU is not available: the browser has WebGPU but found no GPU adapter (requestAdapter() returned ' +
        'null; the GPU may be blocklisted, or hardware acceleration is off). ' + BROWSERS,
    );
  }
  const info = adapter.info ?? {};
  return {
    vendor: info.vendor ?? '',
    architecture: info.architecture ?? '',
    description: info.description ?? '',
    shaderF16: adapter.features.has('shader-f16'),
    maxBufferSize: adapter.limits.maxBufferSize,
    maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
  };
}

// ---------------------------------------------------------------------------------------------------
// The wasm module, initialised once per thread.

let wasmModule;
/** The initialised wasm instance's exports (its `memory` among them). */
let wasmExports = null;
/** The most recent Rust panic message (console_error_panic_hook writes it with console.error). */
let lastPanic = null;
/** Set once the wasm instance has panicked: it cannot be used again. */
let crashed = null;

function hookPanics() {
  if (hookPanics.done || typeof console === 'undefined') return;
  hookPanics.done = true;
  const original = console.error.bind(console);
  console.error = (...args) => {
    const text = String(args[0] ?? '');
    if (text.includes('panicked at')) lastPanic = text;
    original(...args);
  };
}

/** Imports and initialises `pkg/moela_wasm.js` (once). */
export function initWasm() {
  if (!wasmModule) {
    hookPanics();
    wasmModule = (async () => {
      const url = new URL('../pkg/moela_wasm.js', import.meta.url);
      let mod;
      try {
        mod = await import(url.href);
      } catch (e) {
        throw new Error(
          `cannot load the moela wasm module ${url.href} (${e?.message ?? e}); ` +
            'build it with scripts/build-wasm.sh, which writes web/pkg/',
        );
      }
      try {
        wasmExports = await mod.default();
      } catch (e) {
        throw new Error(`cannot initialise the moela wasm module (${e?.message ?? e})`);
      }
      return mod;
    })();
    wasmModule.catch(() => {
      wasmModule = undefined;
    });
  }
  return wasmModule;
}

/**
 * Bytes of this thread's wasm memory (`WebAssembly.Memory`), or 0 before the module is initialised. A load
 * keeps it bounded (the embedding table in its format plus one slice of weights), whatever the model's size.
 */
export function wasmMemoryBytes() {
  return wasmExports?.memory?.buffer?.byteLength ?? 0;
}

function panicText(text) {
  // "panicked at crates/x.rs:1:2:\nmessage\n\nStack:\n..." -> "message (at crates/x.rs:1:2)"
  const m = /panicked at ([^\n]*?):?\n([\s\S]*?)(\n\nStack:|$)/.exec(text);
  return m ? `${m[2].trim()} (at ${m[1]})` : text.split('\n')[0];
}

/** Turns what the wasm side threw into an Error with a clear message. */
function explain(e) {
  if (e instanceof Error && e.name === 'AbortError') return e;
  const message = e instanceof Error ? e.message : String(e);
  if (
    (typeof WebAssembly !== 'undefined' && e instanceof WebAssembly.RuntimeError) ||
    /^unreachable|RuntimeError: unreachable/.test(message)
  ) {
    const why = lastPanic ? panicText(lastPanic) : message;
    crashed = why;
    const oom = /memory allocation|capacity overflow|out of memory|OutOfMemory/i.test(why);
    const err = new Error(
      oom
        ? `Out of memory: moela could not allocate what this model needs (${why}). Try weights "f16", a smaller maxContext or a smaller model, then reload the page.`
        : `moela crashed: ${why}. Reload the page (or create a new WorkerEngine) to start again.`,
    );
    err.code = oom ? 'OUT_OF_MEMORY' : 'CRASHED';
    return err;
  }
  if (e instanceof RangeError && /memory|allocation|array buffer/i.test(message)) {
    const err = new Error(
      `Out of memory: ${message}. The model's files do not fit in this tab's memory; try a smaller model.`,
    );
    err.code = 'OUT_OF_MEMORY';
    return err;
  }
  if (/out of memory|OutOfMemory|allocation failed|Not enough memory/i.test(message)) {
    const err = new Error(`Out of memory: ${message}`);
    err.code = 'OUT_OF_MEMORY';
    return err;
  }
  return e instanceof Error ? e : new Error(message);
}

// ---------------------------------------------------------------------------------------------------
// Getting a checkpoint's files: from a URL (with the Cache API) or from File objects.

const MANIFEST = 'moela-manifest.json';

function folderUrl(model) {
  const base = new URL(model, globalThis.location?.href);
  if (!base.pathname.endsWith('/')) base.pathname += '/';
  base.search = '';
  base.hash = '';
  return base;
}

function folderName(path) {
  const parts = path.split('/').filter(Boolean);
  return decodeURIComponent(parts[parts.length - 1] ?? 'model');
}

/** Which weight files `model.safetensors.index.json` names, in first-seen order. */
function indexFiles(bytes) {
  let index;
  try {
    index = JSON.parse(new TextDecoder().decode(bytes));
  } catch (e) {
    throw new Error(`model.safetensors.index.json is not valid JSON (${e.message})`);
  }
  if (!index || typeof index.weight_map !== 'object') {
    throw new Error('model.safetensors.index.json has no weight_map');
  }
  return [...new Set(Object.values(index.weight_map))];
}

/** Reads a body to a Uint8Array, calling `onBytes(n)` as bytes arrive. */
async function readStream(stream, expected, onBytes, signal) {
  const reader = stream.getReader();
  let buffer = expected > 0 ? new Uint8Array(expected) : null;
  const chunks = [];
  let n = 0;
  try {
    for (;;) {
      if (signal?.aborted) throw signal.reason ?? new DOMException('aborted', 'AbortError');
      const { done, value } = await reader.read();
      if (done) break;
      if (buffer && n + value.length <= buffer.length) {
        buffer.set(value, n);
      } else {
        if (buffer) {
          chunks.push(buffer.subarray(0, n));
          buffer = null;
        }
        chunks.push(value);
      }
      n += value.length;
      onBytes(value.length);
    }
  } finally {
    reader.releaseLock();
  }
  if (buffer) return buffer.subarray(0, n);
  const out = new Uint8Array(n);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

class UrlSource {
  constructor(base, useCache) {
    this.base = base;
    this.useCache = useCache;
    this.store = null;
  }

  async open() {
    if (!this.useCache || !globalThis.caches) return;
    try {
      this.store = await caches.open(CACHE_NAME);
    } catch (e) {
      console.warn(`moela: the Cache API is not usable here (${e.message}); downloading without caching`);
    }
  }

  url(name) {
    return new URL(name, this.base).href;
  }

  async cached(name) {
    if (!this.store) return null;
    const hit = await this.store.match(this.url(name));
    if (hit) return hit;
    // Files too large for a Cache API entry are kept in the origin private file system.
    const file = await opfsFile(this.url(name));
    return file ? new Response(file, { headers: { 'content-length': String(file.size) } }) : null;
  }

  /** A Response for `name` (cache first), or null when the server says 404 and the file is optional. */
  async response(name, { optional = false, signal } = {}) {
    const hit = await this.cached(name);
    if (hit) return { response: hit, cached: true };
    const url = this.url(name);
    let response;
    try {
      response = await fetch(url, { signal });
    } catch (e) {
      if (e?.name === 'AbortError') throw e;
      throw new Error(
        `cannot download ${url}: ${e?.message ?? e} (is the server reachable, and does it allow cross-origin requests?)`,
      );
    }
    if (response.status === 404 && optional) return null;
    if (!response.ok) {
      throw new Error(
        `cannot download ${url}: HTTP ${response.status} ${response.statusText}` +
          (response.status === 404 ? ` (is ${this.base.href} a Hugging Face checkpoint folder?)` : ''),
      );
    }
    return { response, cached: false };
  }

  async size(name, signal) {
    const hit = await this.cached(name);
    if (hit) return Number(hit.headers.get('content-length')) || 0;
    try {
      const r = await fetch(this.url(name), { method: 'HEAD', signal });
      if (r.status === 404) throw new Error(`cannot download ${this.url(name)}: HTTP 404 (named by the checkpoint but missing)`);
      return r.ok ? Number(r.headers.get('content-length')) || 0 : 0;
    } catch (e) {
      if (e?.name === 'AbortError' || /HTTP 404/.test(e.message)) throw e;
      return 0;
    }
  }

  async read(name, { optional = false, expected = 0, onBytes = () => {}, signal } = {}) {
    const got = await this.response(name, { optional, signal });
    if (!got) return null;
    const { response, cached } = got;
    const length = Number(response.headers.get('content-length')) || expected;
    const bytes = response.body
      ? await readStream(response.body, length, onBytes, signal)
      : new Uint8Array(await response.arrayBuffer());
    if (!response.body) onBytes(bytes.length);
    if (!cached && this.store) {
      const complete = !response.headers.get('content-length') || bytes.length >= length;
      if (complete) await this.put(name, bytes);
    }
    return bytes;
  }

  /**
   * The file `name` as a Blob that the engine reads by byte ranges, so it never has to fit in memory: from the
   * Cache API (or, for files over 1 GiB, the origin private file system) when an earlier visit stored it;
   * else downloaded as a stream, straight into that store (the browser keeps it on disk; an interrupted
   * download stores nothing, and the next load starts it again) or, without a cache, into a Blob (which the
   * browser also moves to disk when it is large).
   */
  async blob(name, { expected = 0, onBytes = () => {}, signal } = {}) {
    // A large file kept in the origin private file system is its own File (read by ranges, never copied).
    const kept = this.store ? await opfsFile(this.url(name)) : null;
    if (kept) {
      onBytes(kept.size);
      return kept;
    }
    const hit = await this.cached(name);
    if (hit) {
      const blob = await hit.blob();
      onBytes(blob.size);
      return blob;
    }
    const { response } = await this.response(name, { signal });
    const url = this.url(name);
    const length = Number(response.headers.get('content-length')) || 0;
    let seen = 0;
    const aborted = () => signal?.reason ?? new DOMException('the load was aborted', 'AbortError');
    const counted = response.body.pipeThrough(
      new TransformStream({
        transform(chunk, controller) {
          if (signal?.aborted) {
            controller.error(aborted());
            return;
          }
          seen += chunk.length;
          onBytes(chunk.length);
          controller.enqueue(chunk);
        },
      }),
    );
    const short = (cause) =>
      new Error(
        `cannot download ${url}: the transfer ended after ${seen} of ${length || expected} bytes` +
          (cause ? ` (${cause?.message ?? cause})` : '') +
          '; load again to restart it',
      );
    // What a failed attempt to keep the file says: the quota, a short transfer, or the store's own error.
    const failed = (e) => {
      if (signal?.aborted) return aborted();
      if (e?.name === 'QuotaExceededError') {
        return new Error(
          `cannot keep ${url} (${(length / 1e9).toFixed(2)} GB) in this site's storage: the browser's quota is full. ` +
            'Free space (Engine.clearCache()) or load with cache: false',
        );
      }
      return length && seen < length ? short(e) : new Error(`cannot download ${url}: ${e?.message ?? e}`);
    };
    if (this.store && (length || expected) > CACHE_ENTRY_MAX && (await opfsDir())) {
      try {
        return await opfsStore(url, counted, () => {
          if (length && seen !== length) throw short();
        });
      } catch (e) {
        throw failed(e);
      }
    }
    if (this.store) {
      const headers = { 'content-type': 'application/octet-stream' };
      if (length) headers['content-length'] = String(length);
      try {
        await this.store.put(url, new Response(counted, { headers }));
      } catch (e) {
        await this.store.delete(url).catch(() => {});
        throw failed(e);
      }
      if (length && seen !== length) {
        await this.store.delete(url).catch(() => {});
        throw short();
      }
      const stored = await this.store.match(url);
      if (stored) return stored.blob();
    }
    // No cache: gathered into a Blob, 64 MiB at a time, so the chunks themselves can be let go.
    const parts = [];
    let pending = [];
    let pendingBytes = 0;
    const reader = counted.getReader();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        pending.push(value);
        pendingBytes += value.length;
        if (pendingBytes >= 64 << 20) {
          parts.push(new Blob(pending));
          pending = [];
          pendingBytes = 0;
        }
      }
    } finally {
      reader.releaseLock();
    }
    parts.push(new Blob(pending));
    if (length && seen !== length) throw short();
    return new Blob(parts);
  }

  async put(name, bytes) {
    if (!this.store) return;
    try {
      await this.store.put(
        this.url(name),
        new Response(bytes, {
          headers: { 'content-type': 'application/octet-stream', 'content-length': String(bytes.length) },
        }),
      );
    } catch (e) {
      console.warn(`moela: cannot cache ${name} (${e.message}); the next visit downloads it again`);
      this.store = null;
    }
  }
}

/** Chromium cannot keep a Cache API entry of 2 GiB or more: files over 1 GiB go to the origin private file system. */
const CACHE_ENTRY_MAX = 2 ** 30;

/** The folder in the origin private file system that holds large downloads, or null where there is none. */
async function opfsDir({ create = true } = {}) {
  try {
    const root = await globalThis.navigator?.storage?.getDirectory?.();
    return root ? await root.getDirectoryHandle(CACHE_NAME, { create }) : null;
  } catch {
    return null;
  }
}

/** A file name for a URL in that folder: its SHA-256, then the URL's last part (for whoever looks). */
async function opfsName(url) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(url)));
  const hex = Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
  return `${hex}-${url.split('/').pop().replace(/[^A-Za-z0-9._-]/g, '_')}`;
}

/** The complete download of `url` kept in the origin private file system, or null. */
async function opfsFile(url) {
  const dir = await opfsDir({ create: false });
  if (!dir) return null;
  try {
    return await (await dir.getFileHandle(await opfsName(url))).getFile();
  } catch {
    return null;
  }
}

/**
 * Streams `body` into the origin private file system as the download of `url` and returns the stored File.
 * It is written under a temporary name and renamed once `checkComplete()` accepts it, so an interrupted download leaves nothing
 * that a later load would take for the file (the next load starts it again).
 */
async function opfsStore(url, body, checkComplete) {
  const dir = await opfsDir();
  const name = await opfsName(url);
  const part = await dir.getFileHandle(`${name}.part`, { create: true });
  try {
    await body.pipeTo(await part.createWritable());
    checkComplete();
    await part.move(name);
  } catch (e) {
    await dir.removeEntry(`${name}.part`).catch(() => {});
    throw e;
  }
  return (await dir.getFileHandle(name)).getFile();
}

/**
 * Asks the engine whether it can run this config and tokenizer (with the f32/f16 choice) before any weight
 * is read, so an unsupported model fails before a download.
 */
async function preflight(mod, meta, options) {
  let info;
  try {
    info = await mod.WasmEngine.check(meta, options);
  } catch (e) {
    throw explain(e);
  }
  checkFits(info, await adapterLimits());
}

/** wasm32's address space. */
const WASM_MAX_BYTES = 4 * 2 ** 30;
/** What a load holds in wasm memory besides the embedding table: one slice of weights as f32, one packed
 *  expert stack, their copies on the way to the GPU, and the engine itself. */
const LOAD_HEAP_BYTES = 2 ** 30;
/** The largest storage binding moela's kernels use (every adapter must allow 128 MiB). */
const BINDING_BYTES = 128 * 2 ** 20;

async function adapterLimits() {
  const adapter = await navigator.gpu?.requestAdapter?.().catch(() => null);
  return adapter?.limits ?? null;
}

/** Throws, with the numbers, when a model described by `info` (`WasmEngine.check`) cannot load here. */
function checkFits(info, limits) {
  const gib = (b) => `${(b / 2 ** 30).toFixed(2)} GiB`;
  const heap = info.host_weight_bytes + LOAD_HEAP_BYTES;
  if (heap > WASM_MAX_BYTES) {
    throw new Error(
      `this model needs about ${gib(heap)} of wasm memory (its ${info.weight_dtype} embedding table of ` +
        `${gib(info.host_weight_bytes)}, plus ${gib(LOAD_HEAP_BYTES)} while loading) but wasm32 has at most 4 GiB; ` +
        'try weights "q4" or "q8"',
    );
  }
  if (limits && (limits.maxStorageBufferBindingSize < BINDING_BYTES || limits.maxBufferSize < BINDING_BYTES)) {
    throw new Error(
      `this GPU's WebGPU limits (maxStorageBufferBindingSize ${limits.maxStorageBufferBindingSize}, maxBufferSize ` +
        `${limits.maxBufferSize}) are below the ${BINDING_BYTES} bytes moela binds at once`,
    );
  }
}

/** llama.cpp's names for the parts of a split GGUF model: `NAME-00001-of-00003.gguf`. */
const GGUF_PART = /^(.*)-(\d+)-of-(\d+)\.gguf$/;

/** The model's name from a GGUF file's: without `.gguf` and a split part's `-0000K-of-0000N`. */
function ggufModelName(file) {
  return file.replace(/(-\d+-of-\d+)?\.gguf$/, '');
}

/** A GGUF model's file names from one of them: the file, or every part of a split one, in order. */
function ggufParts(name) {
  const m = GGUF_PART.exec(name);
  if (!m) return [name];
  const [, prefix, , count] = m;
  const n = Number(count);
  return Array.from({ length: n }, (_, i) => `${prefix}-${String(i + 1).padStart(count.length, '0')}-of-${count}.gguf`);
}

/** The first `n` bytes at `url` (a range request; a server that ignores it is read only that far). */
async function fetchPrefix(url, n, signal) {
  const r = await fetch(url, { headers: { Range: `bytes=0-${n - 1}` }, signal });
  if (!r.ok) throw new Error(`cannot download ${url}: HTTP ${r.status}`);
  const reader = r.body.getReader();
  const out = new Uint8Array(n);
  let at = 0;
  while (at < n) {
    const { done, value } = await reader.read();
    if (done) break;
    const take = Math.min(value.length, n - at);
    out.set(value.subarray(0, take), at);
    at += take;
  }
  await reader.cancel().catch(() => {});
  return out.subarray(0, at);
}

/**
 * Downloads (or reads from the cache) the GGUF model at `url` (a split one's parts from any part's URL): its
 * config and tokenizer are in its header, which the engine reads from the kept file.
 */
async function ggufFromUrl(url, { cache, onProgress, signal, checkHeader }) {
  const file = decodeURIComponent(url.pathname.split('/').pop());
  const base = new URL('.', url);
  const src = new UrlSource(base, cache);
  await src.open();
  const names = ggufParts(file);
  // The header (config, tokenizer, tensor table) is checked from the first part's first bytes before any
  // weight is downloaded.
  const first = await src.cached(names[0]);
  if (!first) {
    const size = await src.size(names[0], signal);
    let want = Math.min(4 * 2 ** 20, size || 4 * 2 ** 20);
    for (;;) {
      const prefix = await fetchPrefix(src.url(names[0]), want, signal);
      const need = await checkHeader(prefix, size || prefix.length, names[0]);
      if (!need) break;
      if (need <= prefix.length || (size && need > size)) throw new Error(`${src.url(names[0])}: the GGUF header ends past the end of the file`);
      want = Math.max(need, want * 2);
    }
  }
  const sizes = [];
  for (const n of names) sizes.push(await src.size(n, signal));
  const total = sizes.reduce((a, b) => a + b, 0);
  if (src.store) await checkStorage(total, url.href);
  let loaded = 0;
  const weights = [];
  for (const [i, name] of names.entries()) {
    const blob = await src.blob(name, {
      expected: sizes[i],
      signal,
      onBytes: (n) => {
        loaded += n;
        onProgress?.({ phase: 'download', file: name, loaded, total });
      },
    });
    weights.push(ranges(name, blob));
  }
  return { weights };
}

/** Downloads (or reads from the cache) the files of the HF folder at `base`. */
async function filesFromUrl(base, { cache, onProgress, signal, check }) {
  const src = new UrlSource(base, cache);
  await src.open();
  const text = (b) => JSON.parse(new TextDecoder().decode(b));
  const report = (p) => onProgress?.({ phase: 'download', ...p });

  // A manifest of a folder downloaded before lets a later visit load from the cache alone (offline).
  let manifest = null;
  const m = await src.cached(MANIFEST);
  if (m) {
    manifest = await m.json().catch(() => null);
    if (manifest) {
      const names = ['config.json', 'tokenizer.json', ...(manifest.tokenizerConfig ? ['tokenizer_config.json'] : []), ...manifest.weights];
      for (const n of names) {
        if (!(await src.cached(n))) {
          manifest = null;
          break;
        }
      }
    }
  }

  let loaded = 0;
  let total = 0;
  const small = async (name, optional) => {
    const bytes = await src.read(name, { optional, signal });
    if (bytes) {
      loaded += bytes.length;
      total += bytes.length;
      report({ file: name, loaded, total });
    }
    return bytes;
  };
  const config = await small('config.json', false);
  try {
    text(config);
  } catch (e) {
    throw new Error(`${src.url('config.json')} is not valid JSON (${e.message})`);
  }
  const tokenizer = await small('tokenizer.json', false);
  const tokenizerConfig = manifest
    ? manifest.tokenizerConfig
      ? await small('tokenizer_config.json', false)
      : null
    : await small('tokenizer_config.json', true);

  await check({ config, tokenizer: tokenizer ?? undefined, tokenizerConfig: tokenizerConfig ?? undefined });

  let names;
  if (manifest) {
    names = manifest.weights;
  } else {
    const index = await small('model.safetensors.index.json', true);
    names = index ? indexFiles(index) : ['model.safetensors'];
  }

  // Sizes first, so progress has a total; at most 4 requests at a time.
  const sizes = new Array(names.length).fill(0);
  for (let i = 0; i < names.length; i += 4) {
    const batch = names.slice(i, i + 4);
    const got = await Promise.all(batch.map((n) => src.size(n, signal)));
    got.forEach((s, j) => (sizes[i + j] = s));
  }
  const weightBytes = sizes.reduce((a, b) => a + b, 0);
  total += weightBytes;
  if (src.store && !manifest) await checkStorage(weightBytes, src.base.href);

  const weights = [];
  for (const [i, name] of names.entries()) {
    let seen = 0;
    const blob = await src.blob(name, {
      expected: sizes[i],
      signal,
      onBytes: (n) => {
        seen += n;
        loaded += n;
        if (seen > sizes[i]) {
          total += seen - sizes[i];
          sizes[i] = seen;
        }
        report({ file: name, loaded, total });
      },
    });
    weights.push(ranges(name, blob));
  }
  if (src.store && !manifest) {
    const body = JSON.stringify({ tokenizerConfig: !!tokenizerConfig, weights: names });
    await src.put(MANIFEST, new TextEncoder().encode(body));
  }
  return { config, tokenizer, tokenizerConfig, weights };
}

/**
 * A weight file the engine reads by byte ranges from a Blob (a picked File, a download kept in the Cache API):
 * only the range of the tensor being loaded is ever in memory.
 */
function ranges(name, blob) {
  return {
    name,
    size: blob.size,
    read: async (start, end) => {
      try {
        return new Uint8Array(await blob.slice(start, end).arrayBuffer());
      } catch (e) {
        throw new Error(`cannot read ${name} (bytes ${start}..${end}): ${e?.message ?? e}`);
      }
    },
  };
}

/** Fails before a download that cannot fit the storage the browser grants this site, with the numbers. */
async function checkStorage(bytes, where) {
  const estimate = await globalThis.navigator?.storage?.estimate?.().catch(() => null);
  if (!estimate?.quota) return;
  const free = estimate.quota - (estimate.usage ?? 0);
  if (bytes > free) {
    throw new Error(
      `the weights of ${where} take ${(bytes / 1e9).toFixed(2)} GB but the browser lets this site store only ` +
        `${(free / 1e9).toFixed(2)} GB more (quota ${(estimate.quota / 1e9).toFixed(2)} GB); free space with ` +
        'Engine.clearCache(), or load with cache: false to keep nothing',
    );
  }
}

/** Reads the files of a checkpoint folder picked with `<input type=file webkitdirectory>` (or dropped). */
async function filesFromFileList(fileList, { onProgress, signal, check }) {
  const all = Array.from(fileList ?? []);
  if (all.length === 0) throw new Error('no files given: pick the checkpoint folder (config.json, *.safetensors, tokenizer.json) or a GGUF file');
  const path = (f) => f.webkitRelativePath || f.name;
  const ggufs = all.filter((f) => f.name.endsWith('.gguf'));
  if (ggufs.length && !all.some((f) => f.name === 'config.json')) {
    // A GGUF model: one file, or every part of a split one (pick them together).
    const byName = new Map(ggufs.map((f) => [f.name, f]));
    const names = ggufParts(ggufs.map((f) => f.name).sort()[0]);
    const missing = names.filter((n) => !byName.has(n));
    if (missing.length) throw new Error(`the GGUF model is split in ${names.length} files; pick them all (missing: ${missing.join(', ')})`);
    onProgress?.({ phase: 'download', file: names[0], loaded: 0, total: 0 });
    return { weights: names.map((n) => ranges(n, byName.get(n))), name: ggufModelName(names[0]) };
  }
  const dirOf = (p) => p.slice(0, p.lastIndexOf('/') + 1);
  // The folder holding config.json (the shallowest one, when the picked folder has subfolders).
  const configs = all.filter((f) => path(f).split('/').pop() === 'config.json');
  if (configs.length === 0) throw new Error('the picked folder has no config.json: is it a Hugging Face checkpoint folder?');
  configs.sort((a, b) => path(a).split('/').length - path(b).split('/').length);
  const dir = dirOf(path(configs[0]));
  const byName = new Map();
  for (const f of all) {
    const p = path(f);
    if (dirOf(p) === dir) byName.set(p.slice(dir.length), f);
  }

  let names;
  const index = byName.get('model.safetensors.index.json');
  if (index) {
    names = indexFiles(new Uint8Array(await index.arrayBuffer()));
    const missing = names.filter((n) => !byName.has(n));
    if (missing.length) throw new Error(`model.safetensors.index.json names files the folder lacks: ${missing.join(', ')}`);
  } else if (byName.has('model.safetensors')) {
    names = ['model.safetensors'];
  } else {
    names = [...byName.keys()].filter((n) => n.endsWith('.safetensors')).sort();
    if (names.length === 0) throw new Error('the picked folder has no *.safetensors weights');
  }
  if (!byName.has('tokenizer.json')) throw new Error('the picked folder has no tokenizer.json');

  const wanted = ['config.json', 'tokenizer.json', 'tokenizer_config.json'].filter((n) => byName.has(n));
  const total = wanted.reduce((s, n) => s + byName.get(n).size, 0);
  let loaded = 0;
  const read = async (name) => {
    const f = byName.get(name);
    if (!f) return null;
    return readStream(f.stream(), f.size, (n) => {
      loaded += n;
      onProgress?.({ phase: 'download', file: name, loaded, total });
    }, signal);
  };
  const config = await read('config.json');
  const tokenizer = await read('tokenizer.json');
  const tokenizerConfig = await read('tokenizer_config.json');
  await check({ config, tokenizer, tokenizerConfig: tokenizerConfig ?? undefined });
  // The weights stay in their files: the engine reads them by ranges, tensor by tensor.
  const weights = names.map((name) => ranges(name, byName.get(name)));
  return { config, tokenizer, tokenizerConfig, weights, name: folderName(dir || path(configs[0]).replace(/config\.json$/, '')) };
}

// ---------------------------------------------------------------------------------------------------
// Chat completions: OpenAI-shaped requests, chunks and responses.

function randomId(prefix) {
  const b = new Uint8Array(12);
  crypto.getRandomValues(b);
  return prefix + Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

function messageText(content) {
  if (typeof content === 'string') return content;
  if (content == null) return '';
  if (Array.isArray(content)) {
    return content
      .map((part) => {
        if (typeof part === 'string') return part;
        if (part?.type === 'text') return part.text ?? '';
        throw new Error(`message content part of type "${part?.type}" is not supported (text only)`);
      })
      .join('');
  }
  throw new Error('message content must be a string or an array of text parts');
}

function finishReason(reason) {
  switch (reason) {
    case 'eos':
    case 'stop':
      return 'stop';
    case 'length':
    case 'context_full':
      return 'length';
    case 'cancelled':
      return 'abort';
    default:
      return reason ?? 'abort';
  }
}

function usageOf(stats) {
  if (!stats) return undefined;
  return {
    prompt_tokens: stats.prompt_tokens,
    completion_tokens: stats.generated_tokens,
    total_tokens: stats.prompt_tokens + stats.generated_tokens,
    prompt_tokens_details: { cached_tokens: stats.reused_tokens },
  };
}

/** What the wasm `generate` takes, from an OpenAI-shaped request. */
function wasmRequest(req) {
  if (!req || typeof req !== 'object') throw new TypeError('create() takes a request object');
  if (req.n != null && req.n !== 1) throw new Error('only n = 1 is supported');
  const hasPrompt = typeof req.prompt === 'string';
  if (!hasPrompt && (!Array.isArray(req.messages) || req.messages.length === 0)) {
    throw new TypeError('messages must be a non-empty array of {role, content}');
  }
  const messages = (req.messages ?? []).map((m, i) => {
    if (!m || typeof m.role !== 'string') throw new TypeError(`messages[${i}] needs a role`);
    return { role: m.role, content: messageText(m.content) };
  });
  const out = {
    messages,
    max_tokens: req.max_tokens ?? req.max_completion_tokens,
    temperature: req.temperature,
    top_p: req.top_p,
    top_k: req.top_k,
    min_p: req.min_p,
    repetition_penalty: req.repetition_penalty,
    frequency_penalty: req.frequency_penalty,
    presence_penalty: req.presence_penalty,
    seed: req.seed,
    stop: req.stop,
    thinking_budget: req.thinking_budget,
    record_routing: typeof req.onRouting === 'function',
  };
  if (hasPrompt) out.prompt = req.prompt;
  for (const k of Object.keys(out)) if (out[k] === undefined || out[k] === null) delete out[k];
  return out;
}

/** A push-pull queue: producers push values, one consumer iterates. */
class Channel {
  constructor(onReturn) {
    this.items = [];
    this.waiting = null;
    this.closed = false;
    this.error = null;
    this.onReturn = onReturn;
    this.iterated = false;
  }

  push(v) {
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = null;
      w.resolve({ value: v, done: false });
    } else {
      this.items.push(v);
    }
  }

  close(error = null) {
    this.closed = true;
    this.error = error;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = null;
      if (error) w.reject(error);
      else w.resolve({ value: undefined, done: true });
    }
  }

  next() {
    if (this.items.length) return Promise.resolve({ value: this.items.shift(), done: false });
    if (this.closed) {
      if (this.error) {
        const e = this.error;
        this.error = null;
        return Promise.reject(e);
      }
      return Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => (this.waiting = { resolve, reject }));
  }

  [Symbol.asyncIterator]() {
    if (this.iterated) throw new Error('a completion stream can be iterated only once');
    this.iterated = true;
    return {
      next: () => this.next(),
      return: async () => {
        this.onReturn?.();
        this.items = [];
        return { value: undefined, done: true };
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }
}

/**
 * The stream `create({stream: true})` resolves to: an async iterable of `chat.completion.chunk`s.
 * `abort()` stops the generation between tokens (as the request's `signal` does).
 */
export class ChatCompletionStream {
  constructor(channel, abort) {
    this._channel = channel;
    this._abort = abort;
  }

  abort() {
    this._abort();
  }

  [Symbol.asyncIterator]() {
    return this._channel[Symbol.asyncIterator]();
  }
}

/** Folds a stream's chunks into a `chat.completion` (what `create` returns without `stream`). */
export async function collectCompletion(stream) {
  let content = '';
  let reasoning = '';
  let last = null;
  let first = null;
  for await (const chunk of stream) {
    first ??= chunk;
    last = chunk;
    const d = chunk.choices[0]?.delta ?? {};
    if (d.content) content += d.content;
    if (d.reasoning_content) reasoning += d.reasoning_content;
  }
  const out = {
    id: first.id,
    object: 'chat.completion',
    created: first.created,
    model: first.model,
    choices: [
      {
        index: 0,
        message: { role: 'assistant', content, reasoning_content: reasoning },
        finish_reason: last.choices[0].finish_reason,
        logprobs: null,
      },
    ],
    usage: last.usage,
  };
  if (last.x_moela) out.x_moela = last.x_moela;
  return out;
}

// ---------------------------------------------------------------------------------------------------
// The engine.

/** A loaded model and its chat session, on this thread. */
export class Engine {
  #wasm;
  #info;
  #queue = Promise.resolve();
  #model;

  /** Use `Engine.load` or `Engine.loadPreset`. */
  constructor(wasm, model) {
    this.#wasm = wasm;
    this.#model = model;
    this.#info = wasm.info();
    /** OpenAI-shaped chat API: `engine.chat.completions.create(request)`. */
    this.chat = { completions: { create: (request) => this.#create(request) } };
  }

  /**
   * Loads a Hugging Face checkpoint folder: `model` is its base URL (files are fetched and kept in the
   * Cache API unless `cache` is false), or `files` are its File objects (from a folder picker). `model` may
   * also be a GGUF file's URL (a split one's: any part), and `files` a GGUF file (or a split one's parts):
   * its config, tokenizer and chat template come from its header. With neither, the package's own model
   * loads ({@link DEFAULT_MODEL}: moela-arith-tiny).
   */
  static async load({ model, files, weights, maxContext = 0, onProgress, cache = true, signal } = {}) {
    await checkWebGPU();
    const mod = await initWasm();
    if (crashed) throw new Error(`moela crashed earlier (${crashed}): reload the page`);
    const check = (meta) => preflight(mod, meta, { weights, maxContext });
    let checkpoint;
    let name;
    if (files) {
      checkpoint = await filesFromFileList(files, { onProgress, signal, check });
      name = checkpoint.name;
    } else if (model && new URL(model, globalThis.location?.href).pathname.endsWith('.gguf')) {
      const url = new URL(model, globalThis.location?.href);
      const checkHeader = async (bytes, size, file) => {
        let info;
        try {
          info = await mod.WasmEngine.checkGguf(bytes, size, file, { weights, maxContext });
        } catch (e) {
          throw explain(e);
        }
        if (info.need) return info.need;
        checkFits(info, await adapterLimits());
        return 0;
      };
      checkpoint = await ggufFromUrl(url, { cache, onProgress, signal, checkHeader });
      name = ggufModelName(decodeURIComponent(url.pathname.split('/').pop()));
    } else if (model) {
      const base = folderUrl(model);
      checkpoint = await filesFromUrl(base, { cache, onProgress, signal, check });
      name = folderName(base.pathname);
    } else {
      const base = folderUrl(DEFAULT_MODEL);
      checkpoint = await filesFromUrl(base, { cache, onProgress, signal, check });
      name = folderName(base.pathname);
    }
    const wasmFiles = {
      config: checkpoint.config ?? undefined,
      tokenizer: checkpoint.tokenizer ?? undefined,
      tokenizerConfig: checkpoint.tokenizerConfig ?? undefined,
      weights: checkpoint.weights,
    };
    checkpoint = null;
    try {
      const wasm = await mod.WasmEngine.load(wasmFiles, { weights, maxContext }, (p) =>
        onProgress?.({ phase: 'convert', loaded: p.loaded, total: p.total }),
      );
      return new Engine(wasm, name);
    } catch (e) {
      throw explain(e);
    }
  }

  /** A random-weight model in the shape of a real one (`v2-lite-mini`, `v3-mini`), for benchmarks. */
  static async loadPreset(name, { seed = 0, weights = 'f32', maxContext = 0 } = {}) {
    await checkWebGPU();
    const mod = await initWasm();
    try {
      const wasm = await mod.WasmEngine.loadPreset(name, BigInt(seed), { weights, maxContext });
      return new Engine(wasm, name);
    } catch (e) {
      throw explain(e);
    }
  }

  /** Deletes the downloaded files kept in the Cache API. Resolves to whether there was a cache. */
  static async clearCache() {
    const root = await globalThis.navigator?.storage?.getDirectory?.().catch(() => null);
    const large = root ? await root.removeEntry(CACHE_NAME, { recursive: true }).then(() => true, () => false) : false;
    if (!globalThis.caches) return large;
    return (await caches.delete(CACHE_NAME)) || large;
  }

  /** The model's name (its folder's name, or the preset's). */
  get model() {
    return this.#model;
  }

  /** Facts about the model: architecture, parameters, experts, cache sizes (as `moela info --json`). */
  info() {
    return structuredClone(this.#info);
  }

  /** Runs `fn(wasm)` after every earlier call on this engine has finished. */
  #run(fn) {
    const p = this.#queue.then(() => {
      if (!this.#wasm) throw new Error('this engine was unloaded');
      if (crashed) throw new Error(`moela crashed earlier (${crashed}): reload the page`);
      return fn(this.#wasm);
    });
    this.#queue = p.catch(() => {});
    return p.catch((e) => {
      throw explain(e);
    });
  }

  /** Token ids of `text` (bos first when `special`). */
  encode(text, special = false) {
    return this.#run((w) => Array.from(w.encode(text, special)));
  }

  /** Logits at every position of `tokens`, from one prefill: a `Float32Array` per position. */
  logits(tokens) {
    const ids = Uint32Array.from(tokens);
    return this.#run((w) => w.logits(ids));
  }

  /** Latent cache in use: `{tokens, bytes, mhaBytes}` (mhaBytes: an uncompressed MHA cache's size). */
  cacheUsage() {
    return this.#run((w) => w.cacheUsage());
  }

  /** Forgets the conversation held in the cache. */
  resetChat() {
    return this.#run((w) => w.resetChat());
  }

  /** Decode and prefill tok/s of this model on this device. */
  bench({ promptTokens = 128, genTokens = 32 } = {}) {
    return this.#run((w) => w.bench(promptTokens, genTokens));
  }

  /** Frees the model's GPU memory; the engine cannot be used afterwards. */
  unload() {
    return this.#run((w) => {
      this.#wasm = null;
      w.unload();
    });
  }

  #create(request) {
    let wreq;
    try {
      wreq = wasmRequest(request);
    } catch (e) {
      return Promise.reject(e);
    }
    const { signal, onRouting } = request;
    const id = randomId('chatcmpl-');
    const created = Math.floor(Date.now() / 1000);
    const model = this.#model;
    let stopped = false;
    const shouldStop = () => stopped || !!signal?.aborted;
    const channel = new Channel(() => (stopped = true));
    let first = true;
    const chunk = (delta, finish_reason = null) => ({
      id,
      object: 'chat.completion.chunk',
      created,
      model,
      choices: [{ index: 0, delta, finish_reason, logprobs: null }],
    });
    const onEvent = (ev) => {
      if (ev.type === 'reasoning' || ev.type === 'content') {
        if (!ev.text) return;
        const delta = ev.type === 'reasoning' ? { reasoning_content: ev.text } : { content: ev.text };
        if (first) {
          first = false;
          channel.push(chunk({ role: 'assistant', ...delta }));
        } else {
          channel.push(chunk(delta));
        }
      } else if (ev.type === 'routing') {
        onRouting?.(ev.experts);
      }
    };
    const done = this.#run(async (w) => {
      if (shouldStop()) return undefined;
      return w.generate(wreq, onEvent, shouldStop);
    });
    done.then(
      (stats) => {
        const last = chunk(first ? { role: 'assistant' } : {}, stats ? finishReason(stats.finish_reason) : 'abort');
        if (stats) {
          last.usage = usageOf(stats);
          last.x_moela = stats;
        }
        channel.push(last);
        channel.close();
      },
      (e) => channel.close(e),
    );
    const stream = new ChatCompletionStream(channel, () => (stopped = true));
    if (request.stream) return Promise.resolve(stream);
    return collectCompletion(stream);
  }
}

// ---------------------------------------------------------------------------------------------------
// The same chat API over `moela serve` (the native engine, reached over OpenAI's HTTP API).

/**
 * A model served by `moela serve`, with the chat API of `Engine`: the page needs no WebGPU, and the model runs
 * on the server's GPU. `ServerEngine.connect()` reaches the server that served the page.
 */
export class ServerEngine {
  #base;
  #info;
  #last = null;

  /** Connects to the `moela serve` at `base` (default: the page's own origin); fails if it is not one. */
  static async connect(base = '/') {
    const url = new URL(base, location.href);
    let response;
    try {
      response = await fetch(new URL('moela/info', url));
    } catch (e) {
      throw new Error(`cannot reach ${url.origin}: ${e.message}`);
    }
    if (!response.ok) throw new Error(`${url.href} is not a moela server (GET /moela/info: HTTP ${response.status})`);
    const engine = new ServerEngine();
    engine.#base = url;
    engine.#info = await response.json();
    return engine;
  }

  /**
   * The `moela serve` that served this page, connected, or null: its responses carry an `x-moela-server`
   * header, so the page asks for itself rather than for a path that fails on other hosts.
   */
  static async served() {
    const page = await fetch(location.href, { method: 'HEAD', cache: 'no-store' }).catch(() => null);
    return page?.headers.get('x-moela-server') ? ServerEngine.connect() : null;
  }

  /** The served model's name. */
  get model() {
    return this.#info.model;
  }

  /** Facts about the model, as `Engine.info()` gives them (and the server's `context` and `slots`). */
  info() {
    return structuredClone(this.#info);
  }

  /** The cache the last answer left in its slot: `{tokens, bytes, mhaBytes}`. */
  async cacheUsage() {
    const s = this.#last;
    const tokens = s ? s.prompt_tokens + s.generated_tokens : 0;
    const c = this.#info.cache;
    return { tokens, bytes: s?.cache_bytes ?? 0, mhaBytes: tokens * c.mha_equivalent_values_per_token * c.dtype_bytes };
  }

  /** Forgets the conversation (the server keeps its slots' caches and reuses whatever prefix matches). */
  async resetChat() {
    this.#last = null;
  }

  /** Nothing to release on the page. */
  async unload() {}

  /** Benchmarks run where the GPU is: `moela bench` on the server's machine. */
  async bench() {
    throw new Error('the model runs on the server: run `moela bench --model ...` on that machine');
  }

  /** OpenAI-shaped chat API, as `Engine`'s: `engine.chat.completions.create(request)`. */
  get chat() {
    return { completions: { create: (request) => this.#create(request) } };
  }

  async #create(request) {
    const { signal, onRouting, ...fields } = request;
    const body = { ...fields, stream: true, stream_options: { include_usage: true } };
    if (typeof onRouting === 'function') body.moela_routing = true;
    for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
    const response = await fetch(new URL('v1/chat/completions', this.#base), {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
      signal,
    });
    if (!response.ok) {
      const e = await response.json().catch(() => null);
      throw new Error(e?.error?.message ?? `the server answered HTTP ${response.status}`);
    }
    const stream = this.#chunks(response, signal, onRouting);
    return request.stream ? stream : collectCompletion(stream);
  }

  /** The server-sent events as chunks; stopping (`signal`) ends the stream with finish_reason "abort". */
  async *#chunks(response, signal, onRouting) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    let last = null;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of event.split('\n')) {
            if (!line.startsWith('data: ')) continue;
            const data = line.slice(6);
            if (data === '[DONE]') return;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            if (chunk.moela_routing) onRouting?.(chunk.moela_routing);
            if (chunk.x_moela) this.#last = chunk.x_moela;
            if (chunk.choices?.length) {
              last = chunk;
              yield chunk;
            }
          }
        }
      }
    } catch (e) {
      if (!signal?.aborted) throw e;
      // Stopped by the caller: the server cancels the generation when the connection closes.
      yield { ...(last ?? { object: 'chat.completion.chunk', model: this.model }), choices: [{ index: 0, delta: {}, finish_reason: 'abort', logprobs: null }] };
    } finally {
      reader.releaseLock();
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// The same API, with the engine in a module Web Worker.

const ERROR_CLASSES = { WebGPUUnavailableError };

/** An Error as it crosses postMessage. */
export function serializeError(e) {
  if (e instanceof Error) return { name: e.name, message: e.message, code: e.code, stack: e.stack };
  return { name: 'Error', message: String(e) };
}

function deserializeError(o) {
  const Cls = ERROR_CLASSES[o?.name];
  const e = Cls ? new Cls(o.message) : new Error(o?.message ?? 'unknown error in the moela worker');
  if (!Cls && o?.name && o.name !== 'Error') e.name = o.name;
  if (o?.code) e.code = o.code;
  return e;
}

class WorkerClient {
  constructor(worker) {
    this.worker = worker;
    this.next = 1;
    this.pending = new Map();
    this.dead = null;
    worker.onmessage = (e) => this.#message(e.data);
    worker.onerror = (e) => {
      e.preventDefault?.();
      this.#fail(
        new Error(
          `the moela worker failed: ${e.message || 'it could not start (src/worker.js or pkg/moela_wasm.js did not load)'}`,
        ),
      );
    };
    worker.onmessageerror = () => this.#fail(new Error('the moela worker sent a message that could not be read'));
  }

  #fail(error) {
    this.dead = error;
    for (const p of this.pending.values()) p.reject(error);
    this.pending.clear();
  }

  #message(m) {
    const p = this.pending.get(m.id);
    if (!p) return;
    switch (m.type) {
      case 'progress':
        p.onProgress?.(m.progress);
        break;
      case 'chunk':
        p.onChunk?.(m.chunk);
        break;
      case 'routing':
        p.onRouting?.(m.experts);
        break;
      case 'result':
        this.pending.delete(m.id);
        p.resolve(m.value);
        break;
      case 'error':
        this.pending.delete(m.id);
        p.reject(deserializeError(m.error));
        break;
    }
  }

  /** Sends `op`; resolves to its result. Returns the promise and the request's id. */
  call(op, args, handlers = {}, transfer = []) {
    const id = this.next++;
    const promise = new Promise((resolve, reject) => {
      if (this.dead) return reject(this.dead);
      this.pending.set(id, { resolve, reject, ...handlers });
      this.worker.postMessage({ id, op, args }, transfer);
    });
    return { id, promise };
  }

  abort(target) {
    if (!this.dead) this.worker.postMessage({ id: 0, op: 'abort', args: { target } });
  }

  terminate(reason = new Error('this engine was unloaded')) {
    this.worker.terminate();
    this.#fail(reason);
  }
}

/** `Engine`'s API, with the engine running in a module Web Worker (src/worker.js). */
export class WorkerEngine {
  #client;
  #info;
  #model;

  constructor(client, info, model) {
    this.#client = client;
    this.#info = info;
    this.#model = model;
    this.chat = { completions: { create: (request) => this.#create(request) } };
  }

  static async #start(op, args, onProgress, signal) {
    await checkWebGPU();
    if (signal?.aborted) throw signal.reason ?? new DOMException('aborted', 'AbortError');
    let worker;
    try {
      worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module', name: 'moela' });
    } catch (e) {
      throw new Error(`cannot start the moela worker (${e.message}); this browser needs module workers`);
    }
    const client = new WorkerClient(worker);
    // Aborting a load ends the worker, and with it whatever it had downloaded or converted.
    const abort = () => client.terminate(signal.reason ?? new DOMException('loading was aborted', 'AbortError'));
    signal?.addEventListener('abort', abort, { once: true });
    try {
      const { info, model } = await client.call(op, args, { onProgress }).promise;
      return new WorkerEngine(client, info, model);
    } catch (e) {
      client.terminate();
      throw e;
    } finally {
      signal?.removeEventListener('abort', abort);
    }
  }

  /** As `Engine.load`, in a worker. A relative `model` URL is resolved against the page. */
  static async load(options = {}) {
    const { onProgress, signal, ...rest } = options;
    if (rest.model) rest.model = folderUrl(rest.model).href;
    if (rest.files) rest.files = Array.from(rest.files);
    return WorkerEngine.#start('load', rest, onProgress, signal);
  }

  /** As `Engine.loadPreset`, in a worker. */
  static async loadPreset(name, options = {}) {
    return WorkerEngine.#start('loadPreset', { name, ...options });
  }

  /** As `Engine.clearCache` (the Cache API is shared by the page and its workers). */
  static clearCache() {
    return Engine.clearCache();
  }

  get model() {
    return this.#model;
  }

  info() {
    return structuredClone(this.#info);
  }

  encode(text, special = false) {
    return this.#client.call('encode', { text, special }).promise;
  }

  logits(tokens) {
    return this.#client.call('logits', { tokens: Array.from(tokens) }).promise;
  }

  cacheUsage() {
    return this.#client.call('cacheUsage').promise;
  }

  resetChat() {
    return this.#client.call('resetChat').promise;
  }

  bench(options = {}) {
    return this.#client.call('bench', options).promise;
  }

  async unload() {
    try {
      await this.#client.call('unload').promise;
    } finally {
      this.#client.terminate();
    }
  }

  #create(request) {
    let wreq;
    try {
      wasmRequest(request);
      const { signal, onRouting, ...rest } = request;
      wreq = { ...rest, stream: true, routing: typeof onRouting === 'function' };
    } catch (e) {
      return Promise.reject(e);
    }
    const { signal, onRouting } = request;
    let callId;
    const stop = () => callId !== undefined && this.#client.abort(callId);
    const channel = new Channel(stop);
    const { id, promise } = this.#client.call('chat', wreq, {
      onChunk: (c) => channel.push(c),
      onRouting: (experts) => onRouting?.(experts),
    });
    callId = id;
    if (signal) {
      if (signal.aborted) stop();
      else signal.addEventListener('abort', stop, { once: true });
    }
    promise.then(
      () => channel.close(),
      (e) => channel.close(e),
    ).finally(() => signal?.removeEventListener('abort', stop));
    const stream = new ChatCompletionStream(channel, stop);
    if (request.stream) return Promise.resolve(stream);
    return collectCompletion(stream);
  }
}
