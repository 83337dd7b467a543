// Shared by the browser tests: Debian's Chromium driven by playwright-core (no downloaded browser), one
// Chromium at a time across test files, the static server, the native moela binary and a few numbers.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { chromium } from 'playwright-core';
import { repoRoot, serve } from './server.mjs';

export { repoRoot, serve };

export const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';

const COMMON_ARGS = [
  '--no-sandbox',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--headless=new',
];

/** WebGPU on SwiftShader's Vulkan (CPU): what a machine without a GPU can offer Chromium. */
export const WEBGPU_ARGS = [
  '--enable-unsafe-webgpu',
  '--enable-features=Vulkan',
  '--use-vulkan=swiftshader',
  '--use-webgpu-adapter=swiftshader',
  ...COMMON_ARGS,
];

/** No GPU process, no WebGPU flags: the page must say WebGPU is missing. */
export const NO_WEBGPU_ARGS = ['--disable-gpu', ...COMMON_ARGS];

const LOCK = path.join(os.tmpdir(), 'moela-web-tests.lock');

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Waits until no other test process holds a Chromium (the machine may have 2 cores). */
async function lock() {
  const deadline = Date.now() + 20 * 60_000;
  for (;;) {
    try {
      fs.mkdirSync(LOCK);
      fs.writeFileSync(path.join(LOCK, 'pid'), String(process.pid));
      return () => fs.rmSync(LOCK, { recursive: true, force: true });
    } catch (e) {
      if (e.code !== 'EEXIST') throw e;
      const pid = Number(fs.readFileSync(path.join(LOCK, 'pid'), 'utf8').trim() || 0);
      if (pid && !alive(pid)) {
        fs.rmSync(LOCK, { recursive: true, force: true });
        continue;
      }
      if (Date.now() > deadline) throw new Error(`another test process has held ${LOCK} for 20 minutes`);
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

/** Fails clearly when the wasm package has not been built. */
export function requirePkg() {
  const js = path.join(repoRoot, 'web', 'pkg', 'moela_wasm.js');
  const wasm = path.join(repoRoot, 'web', 'pkg', 'moela_wasm_bg.wasm');
  if (!fs.existsSync(js) || !fs.existsSync(wasm)) {
    throw new Error(`${path.relative(repoRoot, js)} is missing: build it with scripts/build-wasm.sh`);
  }
}

/** Launches Chromium (holding the lock until close). `browser.close()` releases it. */
export async function launch({ webgpu = true, args, profile } = {}) {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) or set CHROMIUM_PATH`);
  }
  const unlock = await lock();
  let browser;
  try {
    const options = {
      executablePath: CHROMIUM,
      args: args ?? (webgpu ? WEBGPU_ARGS : NO_WEBGPU_ARGS),
      timeout: 60_000,
    };
    // A profile folder gives the pages on-disk storage (OPFS, Cache API) with the disk's quota; without one,
    // Playwright's pages keep their storage in memory under a small quota.
    browser = profile ? await chromium.launchPersistentContext(profile, options) : await chromium.launch(options);
  } catch (e) {
    unlock();
    throw e;
  }
  const close = browser.close.bind(browser);
  browser.close = async () => {
    try {
      await close();
    } finally {
      unlock();
    }
  };
  return browser;
}

/**
 * A page at web/tests/harness.html, which exposes the moela module as `window.moela`. Console errors
 * and page errors are kept in `page.problems` (and printed when MOELA_TEST_VERBOSE is set).
 */
export async function openHarness(browser, server) {
  const page = await browser.newPage();
  watch(page);
  await page.goto(`${server.url}web/tests/harness.html`);
  await page.waitForFunction(() => window.moela !== undefined, null, { timeout: 30_000 });
  return page;
}

/** Keeps a page's console errors and uncaught errors in `page.problems`. */
export function watch(page) {
  page.problems = [];
  page.on('console', (m) => {
    if (process.env.MOELA_TEST_VERBOSE) console.log(`[browser ${m.type()}] ${m.text()}`);
    if (m.type() === 'error') page.problems.push(m.text());
  });
  page.on('pageerror', (e) => page.problems.push(`pageerror: ${e.message}`));
  return page;
}

export function readJson(rel) {
  return JSON.parse(fs.readFileSync(path.join(repoRoot, rel), 'utf8'));
}

/** ||a - b|| / ||b||. */
export function relL2(a, b) {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}

export function argmax(a) {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[best]) best = i;
  return best;
}

/** The native `moela` binary (MOELA_BIN, else $CARGO_TARGET_DIR or target/, built when missing). */
export function nativeMoela() {
  if (process.env.MOELA_BIN) return process.env.MOELA_BIN;
  const target = path.resolve(repoRoot, process.env.CARGO_TARGET_DIR ?? 'target');
  const bin = path.join(target, 'release', 'moela');
  if (!fs.existsSync(bin)) {
    execFileSync('cargo', ['build', '--release', '-p', 'moela-cli'], { cwd: repoRoot, stdio: 'inherit' });
  }
  return bin;
}

/** Splits what `moela run` prints when piped: `<think>\n` reasoning `\n</think>\n` answer `\n`. */
export function parseNativeRun(out) {
  let reasoning = '';
  let content = out;
  if (out.startsWith('<think>\n')) {
    const end = out.indexOf('\n</think>\n');
    if (end < 0) throw new Error(`native output opens <think> but never closes it: ${JSON.stringify(out)}`);
    reasoning = out.slice('<think>\n'.length, end);
    content = out.slice(end + '\n</think>\n'.length);
  }
  if (!content.endsWith('\n')) throw new Error(`native output does not end with a newline: ${JSON.stringify(out)}`);
  return { reasoning, content: content.slice(0, -1) };
}

/**
 * Writes a checkpoint folder with DeepSeek-V2-Lite's widths (hidden 2048, 16 heads, kv_lora_rank 512, expert
 * width 1408, dense width 10944) but fewer layers, experts and tokens, so that the browser's streaming path is
 * tested on real-width tensors in a few hundred MB. bf16 values from a seeded generator; the shipped model's
 * tokenizer. Returns the folder's size in bytes. (scripts/write_real_shape.py writes full-size folders.)
 */
export function writeRealWidthCheckpoint(dir, { layers = 2, experts = 8, topK = 2, vocab = 4096, dense = 10944, seed = 1 } = {}) {
  const config = {
    architectures: ['DeepseekV2ForCausalLM'], model_type: 'deepseek_v2',
    vocab_size: vocab, hidden_size: 2048, intermediate_size: dense, moe_intermediate_size: 1408,
    num_hidden_layers: layers, num_attention_heads: 16, num_key_value_heads: 16,
    n_shared_experts: 2, n_routed_experts: experts, num_experts_per_tok: topK, routed_scaling_factor: 1.0,
    kv_lora_rank: 512, q_lora_rank: null, qk_rope_head_dim: 64, v_head_dim: 128, qk_nope_head_dim: 128,
    topk_method: 'greedy', n_group: 1, topk_group: 1, norm_topk_prob: false, scoring_func: 'softmax',
    first_k_dense_replace: 1, moe_layer_freq: 1, hidden_act: 'silu', max_position_embeddings: 4096,
    rms_norm_eps: 1e-6, rope_theta: 10000, bos_token_id: 0, eos_token_id: 1, tie_word_embeddings: false,
    torch_dtype: 'bfloat16',
  };
  const h = 2048;
  const tensors = [['model.embed_tokens.weight', [vocab, h]], ['model.norm.weight', [h]], ['lm_head.weight', [vocab, h]]];
  const mlp = (p, i) => tensors.push([`${p}gate_proj.weight`, [i, h]], [`${p}up_proj.weight`, [i, h]], [`${p}down_proj.weight`, [h, i]]);
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}.`;
    tensors.push(
      [`${p}input_layernorm.weight`, [h]],
      [`${p}post_attention_layernorm.weight`, [h]],
      [`${p}self_attn.q_proj.weight`, [16 * 192, h]],
      [`${p}self_attn.kv_a_proj_with_mqa.weight`, [512 + 64, h]],
      [`${p}self_attn.kv_a_layernorm.weight`, [512]],
      [`${p}self_attn.kv_b_proj.weight`, [16 * 256, 512]],
      [`${p}self_attn.o_proj.weight`, [h, 16 * 128]],
    );
    if (l === 0) {
      mlp(`${p}mlp.`, dense);
    } else {
      tensors.push([`${p}mlp.gate.weight`, [experts, h]]);
      for (let x = 0; x < experts; x++) mlp(`${p}mlp.experts.${x}.`, 1408);
      mlp(`${p}mlp.shared_experts.`, 2 * 1408);
    }
  }
  tensors.sort((a, b) => (a[0] < b[0] ? -1 : 1));
  const header = {};
  let offset = 0;
  for (const [name, shape] of tensors) {
    const bytes = shape.reduce((a, b) => a * b, 1) * 2;
    header[name] = { dtype: 'BF16', shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let text = JSON.stringify(header);
  text += ' '.repeat((8 - (text.length % 8)) % 8);
  fs.mkdirSync(dir, { recursive: true });
  const fd = fs.openSync(path.join(dir, 'model.safetensors'), 'w');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(text.length));
  fs.writeSync(fd, len);
  fs.writeSync(fd, text);
  // A pool of uniform bf16 values (std 0.02) that tensors take windows of, from a xorshift generator.
  let state = seed >>> 0 || 1;
  const next = () => ((state ^= state << 13), (state ^= state >>> 17), (state ^= state << 5), state >>> 0);
  const POOL = 1 << 22;
  const pool = new Uint16Array(2 * POOL);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < POOL; i++) {
    f[0] = ((next() / 2 ** 32) * 2 - 1) * 0.0346;
    pool[i] = pool[i + POOL] = u[0] >>> 16;
  }
  const ones = new Uint16Array(h).fill(0x3f80);
  for (const [name, shape] of tensors) {
    let n = shape.reduce((a, b) => a * b, 1);
    if (name.endsWith('norm.weight') || name.endsWith('layernorm.weight')) {
      fs.writeSync(fd, new Uint8Array(ones.buffer, 0, n * 2));
      continue;
    }
    while (n > 0) {
      const take = Math.min(n, POOL);
      const start = next() % POOL;
      fs.writeSync(fd, new Uint8Array(pool.buffer, start * 2, take * 2));
      n -= take;
    }
  }
  fs.closeSync(fd);
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config, null, 2));
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) {
    fs.copyFileSync(path.join(repoRoot, 'models/moela-arith-tiny', f), path.join(dir, f));
  }
  return 8 + text.length + offset;
}
