// The moela demo page: load a DeepSeek-architecture checkpoint, chat with it, and watch its reasoning,
// speed, latent cache and expert routing. The engine runs in a Web Worker (WorkerEngine), so the page
// stays responsive while the model loads and generates.

import { ServerEngine, WorkerEngine, checkWebGPU } from '../src/moela.js';

/** The model the "Built-in" choice loads, relative to web/index.html. Change this to ship another one. */
export const DEFAULT_MODEL_URL = '../models/moela-arith-tiny/';
/** How the built-in model is described on the page. */
const DEFAULT_MODEL_LABEL =
  'moela-arith-tiny: a 4 MB DeepSeek-V3-architecture model trained by moela to add and subtract, reasoning step by step. Try "What is 457 + 389?"';
/** Load the built-in model as soon as the page opens (`?autoload=0` turns it off). */
const AUTOLOAD = true;
/** Prompt and generated tokens of the Bench button. */
const BENCH = { promptTokens: 64, genTokens: 16 };

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

const state = {
  engine: null,
  info: null,
  history: [],
  generating: null, // {controller, done: Promise}
  busy: false,
};

// ---------------------------------------------------------------------------------------------------
// Formatting.

function bytes(n) {
  if (!Number.isFinite(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

function count(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(n >= 1e10 ? 0 : 1)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(n >= 1e7 ? 0 : 1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(n >= 1e4 ? 0 : 1)}K`;
  return String(n);
}

function rate(x) {
  if (!Number.isFinite(x) || x <= 0) return '–';
  return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
}

// ---------------------------------------------------------------------------------------------------
// Status, banner, errors.

function setStatus(text, kind = 'idle') {
  $('status-text').textContent = text;
  $('status').dataset.state = kind;
}

function showBanner(title, text, kind = 'warn') {
  $('banner-title').textContent = title;
  // "WebGPU is not available: the browser has..." under the title "WebGPU is not available": say it once.
  const rest = text.startsWith(title) ? text.slice(title.length).replace(/^[\s:.]+/, '') : text;
  $('banner-text').textContent = rest.charAt(0).toUpperCase() + rest.slice(1);
  $('banner').classList.toggle('error', kind === 'error');
  $('banner').hidden = false;
}

$('banner-close').addEventListener('click', () => ($('banner').hidden = true));

/** A title for an error, from what the engine says. */
function errorTitle(e) {
  if (e?.name === 'WebGPUUnavailableError') return 'WebGPU is not available';
  if (e?.code === 'OUT_OF_MEMORY') return 'Out of memory';
  if (e?.code === 'CRASHED') return 'The engine crashed';
  if (/: unsupported |unsupported dtype|not supported/i.test(e?.message ?? '') && !/^cannot download/.test(e?.message ?? '')) {
    return 'Unsupported model';
  }
  return 'Could not load the model';
}

// ---------------------------------------------------------------------------------------------------
// Controls.

function source() {
  return document.querySelector('input[name="source"]:checked').value;
}

function updateControls() {
  const ready = !!state.engine;
  const generating = !!state.generating;
  // A model on the server needs no WebGPU here.
  $('load').disabled = state.busy || generating || (state.noWebGPU && source() !== 'server');
  $('bench').disabled = !ready || state.busy || generating;
  $('new-chat').disabled = !ready || state.busy;
  $('prompt').disabled = !ready || state.busy;
  $('send').disabled = !ready || state.busy || generating || $('prompt').value.trim() === '';
  $('send').hidden = generating;
  $('stop').hidden = !generating;
  $('prompt').placeholder = ready ? 'Message the model…' : 'Load a model to start…';
}

for (const radio of document.querySelectorAll('input[name="source"]')) {
  radio.addEventListener('change', () => {
    for (const pane of document.querySelectorAll('.source-pane')) pane.hidden = pane.dataset.source !== source();
    updateControls();
  });
}

$('model-folder').addEventListener('change', () => {
  const files = $('model-folder').files;
  const dir = files.length ? (files[0].webkitRelativePath || files[0].name).split('/')[0] : '';
  $('folder-text').textContent = files.length ? `${dir}: ${files.length} files` : 'Choose a checkpoint folder…';
});

$('model-gguf').addEventListener('change', () => {
  const files = $('model-gguf').files;
  $('gguf-text').textContent = files.length ? [...files].map((f) => f.name).join(', ') : 'Choose a GGUF file (all parts of a split one)…';
});

$('default-model-text').textContent = DEFAULT_MODEL_LABEL;

const promptBox = $('prompt');
promptBox.addEventListener('input', () => {
  promptBox.style.height = 'auto';
  promptBox.style.height = `${Math.min(promptBox.scrollHeight, 200)}px`;
  updateControls();
});
promptBox.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $('composer').requestSubmit();
  }
});

// ---------------------------------------------------------------------------------------------------
// Loading.

function showProgress(p) {
  $('progress').hidden = false;
  const frac = p.total > 0 ? Math.min(1, p.loaded / p.total) : 0;
  $('progress-bar').style.width = `${(frac * 100).toFixed(1)}%`;
  if (p.phase === 'download') {
    $('progress-text').textContent = `Reading ${p.file ?? 'files'} · ${bytes(p.loaded)} of ${bytes(p.total)} (${Math.round(frac * 100)}%)`;
  } else {
    $('progress-text').textContent = `Preparing weights on the GPU · ${Math.round(frac * 100)}%`;
  }
}

function showInfo(info) {
  const moe = info.layers - info.dense_layers;
  const facts = [
    ['Architecture', info.architecture],
    ['Parameters', `${count(info.total_parameters)} total · ${count(info.active_parameters_per_token)} active`],
    ['Layers', `${info.layers} (${info.dense_layers} dense + ${moe} MoE)`],
    ['Experts', `${info.routed_experts} routed · top-${info.experts_per_token} · ${info.shared_experts} shared`],
    ['Router', info.topk_method],
    ['Latent (kv_lora)', String(info.kv_lora_rank)],
    ['Cache per token', `${bytes(info.cache.bytes_per_token)} (${info.cache.compression.toFixed(1)}× < MHA)`],
    ['Weights', `${info.weight_dtype} · ${bytes(info.gpu_weight_bytes)} on GPU`],
  ];
  if (info.stored_types?.length) {
    facts.push(['Stored as', info.stored_types.map((t) => `${t.type} ${bytes(t.bytes)}`).join(' · ')]);
  }
  const dl = $('model-info');
  dl.replaceChildren();
  for (const [k, v] of facts) {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = v;
    dl.append(dt, dd);
  }
  dl.hidden = false;
}

async function load() {
  if (state.busy) return;
  const weights = $('weights').value;
  const options = { weights: weights === 'auto' ? undefined : weights, onProgress: showProgress };
  let label;
  switch (source()) {
    case 'server':
      label = 'the server\'s model';
      break;
    case 'default':
      options.model = params.get('model') ?? DEFAULT_MODEL_URL;
      label = options.model;
      break;
    case 'url': {
      const url = $('model-url').value.trim();
      if (!url) {
        $('load-error').textContent = 'Enter the URL of a Hugging Face checkpoint folder.';
        $('load-error').hidden = false;
        return;
      }
      options.model = url;
      label = url;
      break;
    }
    case 'folder': {
      const files = $('model-folder').files;
      if (!files?.length) {
        $('load-error').textContent = 'Choose a checkpoint folder first.';
        $('load-error').hidden = false;
        return;
      }
      options.files = files;
      label = 'the picked folder';
      break;
    }
    case 'gguf': {
      const files = $('model-gguf').files;
      if (!files?.length) {
        $('load-error').textContent = 'Choose a GGUF file first.';
        $('load-error').hidden = false;
        return;
      }
      options.files = files;
      label = files[0].name;
      break;
    }
  }
  state.busy = true;
  $('load-error').hidden = true;
  $('banner').hidden = true;
  updateControls();
  if (state.engine) {
    const old = state.engine;
    state.engine = null;
    await old.unload().catch(() => {});
    newChatView();
  }
  setStatus(`Loading ${label}…`, 'busy');
  showProgress({ phase: 'download', loaded: 0, total: 0 });
  const t0 = performance.now();
  try {
    const engine = source() === 'server' ? await ServerEngine.connect() : await WorkerEngine.load(options);
    state.engine = engine;
    state.info = engine.info();
    showInfo(state.info);
    heatmap.configure(state.info);
    const secs = ((performance.now() - t0) / 1000).toFixed(1);
    $('progress-text').textContent = `Loaded in ${secs} s`;
    $('progress-bar').style.width = '100%';
    setStatus(`${engine.model} · ready`, 'ready');
    await updateCache();
    promptBox.focus();
  } catch (e) {
    const title = errorTitle(e);
    $('load-error').textContent = `${title}: ${e.message}`;
    $('load-error').hidden = false;
    $('progress').hidden = true;
    setStatus(title, 'error');
    if (e?.name === 'WebGPUUnavailableError' || e?.code === 'OUT_OF_MEMORY' || e?.code === 'CRASHED') {
      showBanner(title, e.message, 'error');
    }
  } finally {
    state.busy = false;
    updateControls();
  }
}

$('load').addEventListener('click', load);

$('clear-cache').addEventListener('click', async () => {
  const had = await WorkerEngine.clearCache();
  $('clear-cache').textContent = had ? 'Downloaded files cleared' : 'Nothing was cached';
  setTimeout(() => ($('clear-cache').textContent = 'Clear downloaded files'), 2500);
});

// ---------------------------------------------------------------------------------------------------
// KV cache.

async function updateCache() {
  if (!state.engine) return;
  let u;
  try {
    u = await state.engine.cacheUsage();
  } catch {
    return;
  }
  $('cache-used').textContent = bytes(u.bytes);
  $('cache-mha').textContent = bytes(u.mhaBytes);
  $('cache-bar-mha').style.width = u.tokens > 0 ? '100%' : '0';
  $('cache-bar-latent').style.width = u.mhaBytes > 0 ? `${Math.max(1, (100 * u.bytes) / u.mhaBytes)}%` : '0';
  const c = state.info.cache;
  $('cache-text').textContent =
    u.tokens > 0
      ? `${u.tokens} tokens cached · ${c.compression.toFixed(1)}× smaller than a multi-head cache (${bytes(c.bytes_per_token)} vs ${bytes(c.mha_equivalent_values_per_token * c.dtype_bytes)} per token)`
      : 'No tokens cached yet.';
}

// ---------------------------------------------------------------------------------------------------
// Expert-routing heat map.

function cssColor(name, fallback) {
  const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  const m = /^#([0-9a-f]{6})$/i.exec(v);
  if (!m) return fallback;
  const n = parseInt(m[1], 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

class Heatmap {
  constructor(canvas) {
    this.canvas = canvas;
    this.rows = 0;
    this.cols = 0;
    this.firstLayer = 0;
    this.counts = null;
    this.latest = [];
    this.tokens = 0;
    this.pending = false;
    this.layout = null;
    new ResizeObserver(() => this.schedule()).observe(canvas.parentElement);
    matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => this.schedule());
    canvas.addEventListener('mousemove', (e) => this.hover(e));
  }

  configure(info) {
    this.rows = Math.max(0, info.layers - info.dense_layers);
    this.cols = info.routed_experts;
    this.firstLayer = info.dense_layers;
    this.reset();
  }

  reset() {
    this.counts = new Float64Array(this.rows * this.cols);
    this.latest = [];
    this.tokens = 0;
    $('heatmap-text').textContent = 'Routing appears here as tokens are generated.';
    this.schedule();
  }

  /** One generated token's picks: `experts[moeLayer][k]`. */
  add(experts) {
    if (experts.length !== this.rows) {
      // The engine knows best which layers route; follow it.
      this.rows = experts.length;
      this.counts = new Float64Array(this.rows * this.cols);
    }
    for (const [l, picks] of experts.entries()) {
      for (const e of picks) if (e < this.cols) this.counts[l * this.cols + e]++;
    }
    this.latest = experts;
    this.tokens++;
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const { canvas, rows, cols } = this;
    const width = canvas.parentElement.clientWidth;
    if (!width) return;
    const dpr = window.devicePixelRatio || 1;
    const labelW = rows > 0 ? 30 : 0;
    const top = 14;
    const cellW = cols > 0 ? (width - labelW) / cols : 0;
    const cellH = rows > 0 ? Math.max(4, Math.min(22, Math.min(cellW * 1.4, 260 / rows))) : 0;
    const height = rows > 0 ? Math.ceil(top + rows * cellH) : 60;
    canvas.style.height = `${height}px`;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    const ctx = canvas.getContext('2d');
    ctx.scale(dpr, dpr);
    ctx.clearRect(0, 0, width, height);
    this.layout = { labelW, top, cellW, cellH };

    const muted = cssColor('--muted', [120, 120, 140]);
    ctx.fillStyle = `rgb(${muted})`;
    ctx.font = '10px ui-sans-serif, system-ui, sans-serif';
    ctx.textBaseline = 'middle';
    if (rows === 0) {
      ctx.textAlign = 'center';
      ctx.fillText('Load a model to see its experts', width / 2, height / 2);
      return;
    }

    // Expert index ticks along the top, layer numbers down the side.
    ctx.textAlign = 'center';
    const tickEvery = [1, 2, 4, 8, 16, 32, 64].find((k) => (cellW * k) >= 18) ?? 64;
    for (let e = 0; e < cols; e += tickEvery) ctx.fillText(String(e), labelW + (e + 0.5) * cellW, top / 2);
    ctx.textAlign = 'right';
    const labelEvery = Math.ceil(12 / cellH);
    for (let l = 0; l < rows; l += labelEvery) ctx.fillText(`L${this.firstLayer + l}`, labelW - 5, top + (l + 0.5) * cellH);

    const empty = cssColor('--heat-empty', [236, 238, 246]);
    const cold = cssColor('--heat-cold', [201, 195, 255]);
    const hot = cssColor('--heat-hot', [75, 43, 214]);
    const latest = cssColor('--heat-latest', [255, 159, 28]);
    let max = 0;
    for (const c of this.counts) max = Math.max(max, c);
    const gap = cellW >= 5 && cellH >= 5 ? 1 : 0;
    for (let l = 0; l < rows; l++) {
      for (let e = 0; e < cols; e++) {
        const c = this.counts[l * cols + e];
        let rgb = empty;
        if (c > 0) {
          const t = Math.sqrt(c / max);
          rgb = cold.map((v, i) => Math.round(v + (hot[i] - v) * t));
        }
        ctx.fillStyle = `rgb(${rgb})`;
        ctx.fillRect(labelW + e * cellW + gap / 2, top + l * cellH + gap / 2, cellW - gap, cellH - gap);
      }
    }
    ctx.strokeStyle = `rgb(${latest})`;
    ctx.lineWidth = Math.max(1.5, Math.min(2.5, cellW / 4));
    for (const [l, picks] of this.latest.entries()) {
      for (const e of picks) {
        const inset = ctx.lineWidth / 2;
        ctx.strokeRect(labelW + e * cellW + inset, top + l * cellH + inset, cellW - 2 * inset, cellH - 2 * inset);
      }
    }
  }

  hover(ev) {
    if (!this.layout || this.rows === 0) return;
    const r = this.canvas.getBoundingClientRect();
    const { labelW, top, cellW, cellH } = this.layout;
    const e = Math.floor((ev.clientX - r.left - labelW) / cellW);
    const l = Math.floor((ev.clientY - r.top - top) / cellH);
    if (e < 0 || e >= this.cols || l < 0 || l >= this.rows) {
      this.canvas.title = '';
      return;
    }
    const c = this.counts[l * this.cols + e];
    const share = this.tokens ? ` (${Math.round((100 * c) / this.tokens)}% of tokens)` : '';
    this.canvas.title = `layer ${this.firstLayer + l}, expert ${e}: chosen ${c} times${share}`;
  }
}

const heatmap = new Heatmap($('heatmap'));

// ---------------------------------------------------------------------------------------------------
// Chat.

const messages = $('messages');

function scrollToEnd(force = false) {
  const near = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 120;
  if (force || near) messages.scrollTop = messages.scrollHeight;
}

function addUser(text) {
  $('empty').hidden = true;
  const row = document.createElement('div');
  row.className = 'msg user';
  const bubble = document.createElement('div');
  bubble.className = 'bubble';
  bubble.textContent = text;
  row.append(bubble);
  messages.append(row);
  scrollToEnd(true);
}

/** The view of one assistant reply, filled as chunks arrive. */
class AssistantView {
  constructor() {
    this.row = document.createElement('div');
    this.row.className = 'msg assistant';
    this.row.dataset.state = 'streaming';
    const avatar = document.createElement('div');
    avatar.className = 'avatar';
    this.body = document.createElement('div');
    this.body.className = 'body';
    this.contentEl = document.createElement('div');
    this.contentEl.className = 'content';
    this.footer = document.createElement('div');
    this.footer.className = 'footer';
    this.footer.textContent = 'Reading the prompt…';
    this.body.append(this.contentEl, this.footer);
    this.row.append(avatar, this.body);
    messages.append(this.row);
    this.thinking = null;
    this.content = '';
    this.started = performance.now();
    scrollToEnd(true);
  }

  #thinkingPane() {
    if (this.thinking) return this.thinking;
    const details = document.createElement('details');
    details.className = 'thinking';
    details.open = true;
    const summary = document.createElement('summary');
    const spinner = document.createElement('span');
    spinner.className = 'spinner';
    const label = document.createElement('span');
    label.textContent = 'Thinking…';
    summary.append(spinner, label);
    const text = document.createElement('div');
    text.className = 'reasoning';
    details.append(summary, text);
    this.body.prepend(details);
    this.thinking = { details, spinner, label, text, started: performance.now(), ended: null };
    return this.thinking;
  }

  reasoning(text) {
    const t = this.#thinkingPane();
    t.text.textContent += text;
    t.text.scrollTop = t.text.scrollHeight;
    this.footer.textContent = 'Thinking…';
    scrollToEnd();
  }

  #closeThinking() {
    const t = this.thinking;
    if (!t || t.ended) return;
    t.ended = performance.now();
    t.spinner.remove();
    const secs = ((t.ended - t.started) / 1000).toFixed(1);
    t.label.textContent = `Thought for ${secs} s`;
  }

  answer(text) {
    this.#closeThinking();
    this.content += text;
    this.contentEl.textContent = this.content;
    this.footer.textContent = '';
    scrollToEnd();
  }

  done(finish, stats) {
    this.#closeThinking();
    this.row.dataset.state = 'done';
    const parts = [];
    if (stats) {
      parts.push(`${stats.generated_tokens} tokens`);
      parts.push(`${rate(stats.decode_tokens_per_second)} tok/s`);
      parts.push(`prefill ${stats.prompt_tokens - stats.reused_tokens} tokens at ${rate(stats.prefill_tokens_per_second)} tok/s`);
      if (stats.reused_tokens) parts.push(`${stats.reused_tokens} reused from cache`);
    }
    const why = { stop: 'finished', length: 'hit the token limit', abort: 'stopped' }[finish] ?? finish;
    parts.push(why);
    this.footer.textContent = parts.join(' · ');
    if (!this.content && !this.thinking) this.contentEl.textContent = '(no text)';
  }

  error(e) {
    this.#closeThinking();
    this.row.dataset.state = 'error';
    this.footer.textContent = '';
    const box = document.createElement('div');
    box.className = 'msg-error';
    box.textContent = `${e?.code === 'OUT_OF_MEMORY' ? 'Out of memory' : 'Generation failed'}: ${e?.message ?? e}`;
    this.body.append(box);
    scrollToEnd(true);
  }
}

function setting(id, parse = Number) {
  const v = $(id).value.trim();
  if (v === '') return undefined;
  const n = parse(v);
  return Number.isFinite(n) ? n : undefined;
}

async function send(text) {
  const engine = state.engine;
  if (!engine || state.generating) return;
  addUser(text);
  state.history.push({ role: 'user', content: text });
  const view = new AssistantView();
  const controller = new AbortController();
  let resolveDone;
  state.generating = { controller, done: new Promise((r) => (resolveDone = r)) };
  updateControls();
  setStatus(`${engine.model} · generating`, 'busy');

  // Live decode speed, from the routing events (one per generated token).
  let tokens = 0;
  let firstAt = 0;
  $('decode-tps').textContent = '…';
  const request = {
    messages: state.history,
    stream: true,
    max_tokens: setting('max-tokens') ?? 256,
    temperature: setting('temperature') ?? 0.6,
    top_p: setting('top-p') ?? 1,
    thinking_budget: setting('thinking-budget'),
    seed: setting('seed') ?? Math.floor(Math.random() * 2 ** 31),
    signal: controller.signal,
    onRouting: (experts) => {
      heatmap.add(experts);
      tokens++;
      const now = performance.now();
      if (tokens === 1) firstAt = now;
      else $('decode-tps').textContent = rate((tokens - 1) / ((now - firstAt) / 1000));
      $('heatmap-text').textContent = `${heatmap.tokens} tokens routed; outlined: the last token's experts.`;
    },
  };
  try {
    const stream = await engine.chat.completions.create(request);
    let finish = null;
    let stats = null;
    for await (const chunk of stream) {
      const choice = chunk.choices[0];
      if (choice.delta.reasoning_content) {
        view.reasoning(choice.delta.reasoning_content);
      }
      if (choice.delta.content) {
        view.answer(choice.delta.content);
      }
      if (choice.finish_reason) {
        finish = choice.finish_reason;
        stats = chunk.x_moela ?? null;
      }
    }
    view.done(finish, stats);
    state.history.push({ role: 'assistant', content: view.content });
    if (stats) {
      $('decode-tps').textContent = rate(stats.decode_tokens_per_second);
      $('prefill-tps').textContent = rate(stats.prefill_tokens_per_second);
    }
    setStatus(`${engine.model} · ready`, 'ready');
  } catch (e) {
    view.error(e);
    state.history.pop();
    setStatus(errorTitle(e) === 'Out of memory' ? 'Out of memory' : 'Generation failed', 'error');
    if (e?.code === 'OUT_OF_MEMORY' || e?.code === 'CRASHED') showBanner(errorTitle(e), e.message, 'error');
  } finally {
    state.generating = null;
    resolveDone();
    updateControls();
    await updateCache();
  }
}

$('composer').addEventListener('submit', (e) => {
  e.preventDefault();
  const text = promptBox.value.trim();
  if (!text || !state.engine || state.generating || state.busy) return;
  promptBox.value = '';
  promptBox.style.height = 'auto';
  send(text);
});

$('stop').addEventListener('click', () => state.generating?.controller.abort());

function newChatView() {
  state.history = [];
  for (const el of [...messages.children]) if (el.id !== 'empty') el.remove();
  $('empty').hidden = false;
  heatmap.reset();
}

$('new-chat').addEventListener('click', async () => {
  if (!state.engine) return;
  if (state.generating) {
    state.generating.controller.abort();
    await state.generating.done;
  }
  try {
    await state.engine.resetChat();
  } catch (e) {
    showBanner('Could not reset the chat', e.message, 'error');
  }
  newChatView();
  $('decode-tps').textContent = '–';
  $('prefill-tps').textContent = '–';
  await updateCache();
  promptBox.focus();
});

$('bench').addEventListener('click', async () => {
  const engine = state.engine;
  if (!engine || state.busy || state.generating) return;
  state.busy = true;
  updateControls();
  setStatus(`${engine.model} · benchmarking`, 'busy');
  $('bench-result').textContent = `Running: ${BENCH.promptTokens}-token prefill, then ${BENCH.genTokens} decoded tokens…`;
  try {
    const r = await engine.bench(BENCH);
    $('decode-tps').textContent = rate(r.decode_tokens_per_second);
    $('prefill-tps').textContent = rate(r.prefill_tokens_per_second);
    const roof = r.roofline.bandwidth > 0 ? ` · ${(100 * r.roofline.bandwidth).toFixed(0)}% of copy bandwidth` : '';
    $('bench-result').textContent =
      `Bench (${r.prompt_tokens}-token prompt, ${r.gen_tokens} decoded, ${r.weight_dtype}): ` +
      `decode ${rate(r.decode_tokens_per_second)} tok/s, prefill ${rate(r.prefill_tokens_per_second)} tok/s${roof}.`;
    setStatus(`${engine.model} · ready`, 'ready');
  } catch (e) {
    $('bench-result').textContent = `Bench failed: ${e.message}`;
    setStatus('Bench failed', 'error');
  } finally {
    state.busy = false;
    updateControls();
    await updateCache();
  }
});

// ---------------------------------------------------------------------------------------------------
// Start.

async function start() {
  heatmap.schedule();
  updateControls();
  if (params.get('model')) {
    $('default-model-text').textContent = `From the page address: ${params.get('model')}`;
  }
  // Served by `moela serve`: its model, on the server's GPU, is the first choice.
  const served = await ServerEngine.served().catch(() => null);
  if (served) {
    const info = served.info();
    $('source-server').hidden = false;
    $('server-text').textContent =
      `${served.model} on the moela server at ${location.origin} (${info.slots} slots of ${info.context} tokens), ` +
      'run by the native engine: nothing is downloaded.';
    if (!params.get('model')) {
      document.querySelector('input[name="source"][value="server"]').checked = true;
      for (const pane of document.querySelectorAll('.source-pane')) pane.hidden = pane.dataset.source !== 'server';
    }
  }
  try {
    const adapter = await checkWebGPU();
    const gpu = [adapter.vendor, adapter.architecture, adapter.description].filter(Boolean).join(' ');
    setStatus(`WebGPU ready${gpu ? ` (${gpu})` : ''} · no model loaded`);
  } catch (e) {
    state.noWebGPU = true;
    updateControls();
    if (!served) {
      showBanner('WebGPU is not available', e.message, 'error');
      setStatus('WebGPU is not available', 'error');
      return;
    }
    setStatus('No WebGPU in this browser: the model runs on the server');
  }
  if (AUTOLOAD && params.get('autoload') !== '0') await load();
}

start();
