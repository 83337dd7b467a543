// The moela JS API in Chromium on WebGPU (SwiftShader): logits against HF transformers, greedy text against
// the native binary, OpenAI-shaped streaming and responses, routing, abort, cache reuse, the Cache API.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import {
  argmax,
  launch,
  nativeMoela,
  openHarness,
  parseNativeRun,
  readJson,
  relL2,
  repoRoot,
  requirePkg,
  serve,
  writeRealWidthCheckpoint,
} from './helpers.mjs';

const FIXTURES = ['v2-lite-tiny', 'v3-tiny', 'v2-group-odd', 'v3-moonlight-odd'];
const QUESTION = 'What is 2 + 3?';

let server;
let browser;
let page;

before(async () => {
  requirePkg();
  server = await serve();
  browser = await launch();
  page = await openHarness(browser, server);
});

after(async () => {
  await browser?.close();
  await server?.close();
});

/** Loads a fixture into window.engines[key] with Engine (this thread) or WorkerEngine. */
async function load(key, fixture, { worker = false, cache = false } = {}) {
  return page.evaluate(
    async ({ key, fixture, worker, cache }) => {
      const Cls = worker ? window.moela.WorkerEngine : window.moela.Engine;
      const progress = [];
      const engine = await Cls.load({
        model: `/tests/fixtures/${fixture}/`,
        cache,
        onProgress: (p) => progress.push(p),
      });
      window.engines[key] = engine;
      return { info: engine.info(), model: engine.model, progress };
    },
    { key, fixture, worker, cache },
  );
}

/** Loads the fixture unless an earlier test left it loaded under `key`. */
async function ensure(key, fixture) {
  if (!(await page.evaluate((key) => key in window.engines, key))) await load(key, fixture);
}

async function unload(key) {
  await page.evaluate(async (key) => {
    await window.engines[key].unload();
    delete window.engines[key];
  }, key);
}

for (const fixture of FIXTURES) {
  test(`logits of ${fixture} match HF transformers`, { timeout: 240_000 }, async () => {
    const ref = readJson(`tests/fixtures/${fixture}/reference.json`);
    const { progress } = await load('logits', fixture);
    assert.ok(progress.some((p) => p.phase === 'download' && p.total > 0), 'download progress was reported');
    const last = progress.filter((p) => p.phase === 'convert').at(-1);
    assert.ok(last && last.loaded === last.total && last.total > 0, `conversion progress ends complete: ${JSON.stringify(last)}`);

    const sets = [[ref.tokens, ref.logits]];
    if (ref.long) sets.push([ref.long.tokens, ref.long.logits]);
    for (const [tokens, expected] of sets) {
      const rows = await page.evaluate(
        async (tokens) => (await window.engines.logits.logits(tokens)).map((r) => Array.from(r)),
        tokens,
      );
      assert.equal(rows.length, tokens.length, 'one row of logits per position');
      for (const [i, row] of rows.entries()) {
        assert.equal(row.length, expected[i].length, `position ${i}: vocabulary size`);
        const err = relL2(row, expected[i]);
        assert.ok(err <= 1e-2, `${fixture} position ${i}: relative L2 ${err.toExponential(3)} > 1e-2`);
        assert.equal(argmax(row), argmax(expected[i]), `${fixture} position ${i}: argmax`);
      }
    }
    await unload('logits');
  });
}

test('a GGUF file by URL (a split one by any part) runs with its own tokenizer, and its logits match HF transformers', { timeout: 240_000 }, async () => {
  for (const [file, fixture, weights] of [
    ['v2-lite-tiny.f32.gguf', 'v2-lite-tiny', 'f32'],
    ['v3-tiny.f16-00003-of-00003.gguf', 'v3-tiny', 'f16'],
  ]) {
    const ref = readJson(`tests/fixtures/${fixture}/reference.json`);
    const got = await page.evaluate(
      async ({ file, weights, tokens }) => {
        const engine = await window.moela.Engine.load({ model: `/tests/fixtures/gguf/${file}`, weights, cache: false });
        const rows = (await engine.logits(tokens)).map((r) => Array.from(r));
        const ids = Array.from(await engine.encode('Hello world'));
        await engine.unload();
        return { rows, ids, model: engine.model };
      },
      { file, weights, tokens: ref.tokens },
    );
    assert.ok(got.ids.length > 0, `${file}: its tokenizer encodes`);
    for (const [i, row] of got.rows.entries()) {
      const err = relL2(row, ref.logits[i]);
      assert.ok(err <= 1e-2, `${file} position ${i}: relative L2 ${err.toExponential(3)} > 1e-2`);
      assert.equal(argmax(row), argmax(ref.logits[i]), `${file} position ${i}: argmax`);
    }
  }
});

test('a Q4_K_M GGUF runs in the q4k kernels by default, and its logits match llama.cpp\'s for the same file', { timeout: 240_000 }, async () => {
  const ref = readJson('tests/fixtures/gguf/k256.llama.json');
  const want = ref.files.q4_k_m.logits;
  const got = await page.evaluate(async (tokens) => {
    const engine = await window.moela.Engine.load({ model: '/tests/fixtures/gguf/k256.q4_k_m.gguf', cache: false });
    const rows = (await engine.logits(tokens)).map((r) => Array.from(r));
    const info = engine.info();
    await engine.unload();
    return { rows, dtype: info.weight_dtype };
  }, ref.tokens);
  assert.equal(got.dtype, 'q4k', 'a Q4_K file is stored as q4k without being asked');
  // As natively (crates/moela/tests/gguf.rs): llama.cpp rounds activations to 8 bits, moela does not.
  let differs = 0;
  for (const [i, row] of got.rows.entries()) {
    const err = relL2(row, want[i]);
    assert.ok(err <= 0.1, `position ${i}: relative L2 ${err.toExponential(3)} > 0.1`);
    differs += argmax(row) === argmax(want[i]) ? 0 : 1;
  }
  assert.ok(differs * 8 <= want.length, `the argmax differs at ${differs} of ${want.length} positions`);
});

test('Engine.load() without a model loads the shipped model, and its logits match HF transformers', { timeout: 240_000 }, async () => {
  const ref = readJson('tests/fixtures/moela-arith-tiny.reference.json');
  const { model, default: url } = await page.evaluate(async () => {
    const engine = await window.moela.Engine.load({ cache: false });
    window.engines.shipped = engine;
    return { model: engine.model, default: window.moela.DEFAULT_MODEL };
  });
  assert.equal(model, 'model');
  assert.match(url, /\/web\/model\/$/);
  const { ids, rows } = await page.evaluate(async ({ prompt, tokens }) => {
    const engine = window.engines.shipped;
    return { ids: await engine.encode(prompt), rows: (await engine.logits(tokens)).map((r) => Array.from(r)) };
  }, { prompt: ref.chat_prompt, tokens: ref.tokens });
  assert.deepEqual(ids, ref.chat_prompt_ids, 'the chat prompt encodes as the HF tokenizer does');
  for (const [i, row] of rows.entries()) {
    const err = relL2(row, ref.logits[i]);
    assert.ok(err <= 1e-2, `position ${i}: relative L2 ${err.toExponential(3)} > 1e-2`);
    assert.equal(argmax(row), argmax(ref.logits[i]), `position ${i}: argmax`);
  }
  await unload('shipped');

  // Packed weights run their own kernels (Tint must accept them): f16 stays within the transformers
  // tolerance, q8 within 5e-2 of f32, q4 is bounded.
  for (const [weights, bound, against] of [['f16', 1e-2, ref.logits], ['q8', 5e-2, rows], ['q4', 0.5, rows]]) {
    const packed = await page.evaluate(async ({ weights, tokens }) => {
      const engine = await window.moela.Engine.load({ cache: false, weights });
      const info = engine.info();
      const rows = (await engine.logits(tokens)).map((r) => Array.from(r));
      await engine.unload();
      return { rows, dtype: info.weight_dtype };
    }, { weights, tokens: ref.tokens });
    assert.equal(packed.dtype, weights);
    const worst = Math.max(...packed.rows.map((row, i) => relL2(row, against[i])));
    console.log(`shipped model, ${weights} weights: worst relative L2 ${worst.toExponential(2)}`);
    assert.ok(worst <= bound, `${weights}: worst relative L2 ${worst.toExponential(3)} > ${bound}`);
  }
});

test('greedy generation in a worker gives the native binary\'s text', { timeout: 300_000 }, async () => {
  const out = execFileSync(
    nativeMoela(),
    ['run', '--model', 'tests/fixtures/v3-tiny', '--prompt', QUESTION, '--max-tokens', '8'],
    { cwd: repoRoot, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 240_000 },
  );
  const native = parseNativeRun(out);
  assert.ok(native.reasoning.length + native.content.length > 0, 'the native run printed text');

  const { info } = await load('worker', 'v3-tiny', { worker: true });
  assert.equal(info.architecture, 'deepseek_v3');
  const res = await page.evaluate(
    (q) =>
      window.engines.worker.chat.completions.create({
        messages: [{ role: 'user', content: q }],
        max_tokens: 8,
        temperature: 0,
      }),
    QUESTION,
  );
  assert.equal(res.object, 'chat.completion');
  assert.equal(res.choices[0].message.reasoning_content, native.reasoning);
  assert.equal(res.choices[0].message.content, native.content);
  assert.equal(res.usage.completion_tokens, 8);
  assert.equal(res.choices[0].finish_reason, 'length');

  // Through the worker, an AbortSignal stops the stream too, and routing events arrive.
  const aborted = await page.evaluate(async (q) => {
    const engine = window.engines.worker;
    const controller = new AbortController();
    let routed = 0;
    const chunks = [];
    const stream = await engine.chat.completions.create({
      messages: [{ role: 'user', content: q }],
      stream: true,
      max_tokens: 8,
      signal: controller.signal,
      onRouting: () => routed++,
    });
    for await (const c of stream) {
      chunks.push(c);
      if (chunks.length === 1) controller.abort();
    }
    return { routed, last: chunks.at(-1), usage: await engine.cacheUsage() };
  }, QUESTION);
  assert.equal(aborted.last.choices[0].finish_reason, 'abort');
  assert.ok(aborted.routed < 7, `generation stopped early (${aborted.routed} tokens routed)`);
  assert.ok(aborted.usage.tokens > 0);
  await unload('worker');
});

test('streaming keeps reasoning and content apart; responses are OpenAI-shaped', { timeout: 300_000 }, async () => {
  const { info } = await load('chat', 'v3-tiny');
  const request = {
    messages: [{ role: 'user', content: QUESTION }],
    max_tokens: 8,
    temperature: 0,
    thinking_budget: 2,
  };
  const streamed = await page.evaluate(async (request) => {
    const engine = window.engines.chat;
    const routing = [];
    const chunks = [];
    const stream = await engine.chat.completions.create({ ...request, stream: true, onRouting: (e) => routing.push(e) });
    for await (const c of stream) chunks.push(c);
    const usage = await engine.cacheUsage();
    return { chunks, routing, usage };
  }, request);

  const { chunks, routing } = streamed;
  assert.ok(chunks.length >= 2);
  const id = chunks[0].id;
  for (const c of chunks) {
    assert.equal(c.object, 'chat.completion.chunk');
    assert.equal(c.id, id, 'one id per completion');
    assert.equal(c.model, 'v3-tiny');
    assert.equal(typeof c.created, 'number');
    assert.equal(c.choices.length, 1);
    const d = c.choices[0].delta;
    assert.ok(!(d.content && d.reasoning_content), 'a chunk carries reasoning or content, not both');
  }
  const body = chunks.slice(0, -1);
  const last = chunks.at(-1);
  assert.ok(body.every((c) => c.choices[0].finish_reason === null));
  assert.equal(body[0].choices[0].delta.role, 'assistant');
  const reasoning = body.map((c) => c.choices[0].delta.reasoning_content ?? '').join('');
  const content = body.map((c) => c.choices[0].delta.content ?? '').join('');
  assert.ok(reasoning.length > 0, 'reasoning was streamed');
  assert.ok(content.length > 0, 'content was streamed after the thinking budget closed the reasoning');
  const firstContent = body.findIndex((c) => c.choices[0].delta.content);
  assert.ok(body.slice(firstContent).every((c) => !c.choices[0].delta.reasoning_content), 'reasoning comes first');
  assert.ok(['stop', 'length'].includes(last.choices[0].finish_reason));
  assert.deepEqual(last.choices[0].delta, {});
  const u = last.usage;
  assert.ok(u.prompt_tokens > 0 && u.completion_tokens > 0 && u.completion_tokens <= 8);
  assert.equal(u.total_tokens, u.prompt_tokens + u.completion_tokens);
  assert.equal(last.x_moela.generated_tokens, u.completion_tokens);
  assert.ok(last.x_moela.decode_tokens_per_second > 0);

  // A routing event ([MoE layer][k] expert ids) for each generated token fed back through the model: all
  // but the last one, which ends the generation without a forward pass.
  assert.equal(routing.length, u.completion_tokens - 1);
  for (const r of routing) {
    assert.equal(r.length, info.layers - info.dense_layers);
    for (const picks of r) {
      assert.equal(picks.length, info.experts_per_token);
      assert.equal(new Set(picks).size, picks.length);
      assert.ok(picks.every((e) => Number.isInteger(e) && e >= 0 && e < info.routed_experts));
    }
  }

  // The latent cache holds prompt + answer; an MHA cache would be `compression` times larger.
  const usage = streamed.usage;
  assert.ok(usage.tokens >= u.prompt_tokens + u.completion_tokens - 1, JSON.stringify(usage));
  assert.equal(usage.bytes, usage.tokens * info.cache.bytes_per_token);
  assert.ok(Math.abs(usage.mhaBytes / usage.bytes - info.cache.compression) < 1e-6);

  // The same request without stream, from a fresh chat: the same text, as a chat.completion.
  const res = await page.evaluate(async (request) => {
    await window.engines.chat.resetChat();
    return window.engines.chat.chat.completions.create(request);
  }, request);
  assert.equal(res.object, 'chat.completion');
  assert.equal(res.choices.length, 1);
  const m = res.choices[0].message;
  assert.equal(m.role, 'assistant');
  assert.equal(m.reasoning_content, reasoning);
  assert.equal(m.content, content);
  assert.equal(res.choices[0].finish_reason, last.choices[0].finish_reason);
  assert.deepEqual(
    [res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.total_tokens],
    [u.prompt_tokens, u.completion_tokens, u.total_tokens],
  );
  assert.equal(res.usage.prompt_tokens_details.cached_tokens, 0, 'a reset chat reuses nothing');

  // A follow-up turn reuses the cached conversation.
  const next = await page.evaluate(
    async ({ request, answer }) =>
      window.engines.chat.chat.completions.create({
        ...request,
        messages: [...request.messages, { role: 'assistant', content: answer }, { role: 'user', content: 'And 4 + 4?' }],
        max_tokens: 2,
      }),
    { request, answer: m.content },
  );
  assert.ok(next.usage.prompt_tokens > res.usage.prompt_tokens);
  // At least bos + the first user turn up to the assistant tag stays cached (what follows the tag differs:
  // the template drops the reasoning from earlier answers).
  const firstTurn = await page.evaluate(
    (q) => window.engines.chat.encode(`<｜User｜>${q}<｜Assistant｜>`, true),
    QUESTION,
  );
  const cached = next.usage.prompt_tokens_details.cached_tokens;
  assert.ok(cached >= firstTurn.length && cached < res.usage.prompt_tokens, `${JSON.stringify(next.usage)}, first turn ${firstTurn.length} tokens`);
  assert.equal(next.usage.prompt_tokens_details.cached_tokens, next.x_moela.reused_tokens);
});

test('an AbortSignal stops generation between tokens', { timeout: 240_000 }, async () => {
  await ensure('chat', 'v3-tiny');
  const r = await page.evaluate(async () => {
    const engine = window.engines.chat;
    await engine.resetChat();
    const controller = new AbortController();
    const chunks = [];
    let tokens = 0;
    const stream = await engine.chat.completions.create({
      messages: [{ role: 'user', content: 'Count to ten.' }],
      stream: true,
      max_tokens: 8,
      temperature: 0,
      signal: controller.signal,
      onRouting: () => {
        if (++tokens === 2) controller.abort();
      },
    });
    for await (const c of stream) chunks.push(c);
    return { tokens, last: chunks.at(-1) };
  });
  assert.equal(r.last.choices[0].finish_reason, 'abort');
  assert.equal(r.tokens, 2, 'no token was generated after the abort');
});

test('bad requests and bad models fail with clear errors', { timeout: 180_000 }, async () => {
  await ensure('chat', 'v3-tiny');
  // A checkpoint of another architecture, and one whose weights were cut short.
  const config = readJson('tests/fixtures/v2-lite-tiny/config.json');
  const weightRequests = [];
  await page.route((url) => url.pathname.startsWith('/bad/'), async (route) => {
    const url = new URL(route.request().url());
    const [, , kind, file] = url.pathname.split('/');
    if (file === 'config.json') {
      const body = kind === 'llama' ? { ...config, model_type: 'llama', architectures: ['LlamaForCausalLM'] } : config;
      return route.fulfill({ contentType: 'application/json', body: JSON.stringify(body) });
    }
    if (file.endsWith('.gguf')) {
      // A GGUF file of another architecture: its header names it.
      const response = await route.fetch({ url: new URL('/tests/fixtures/gguf/v2-lite-tiny.f32.gguf', url).href });
      if (route.request().method() !== 'GET') return route.fulfill({ response });
      weightRequests.push(`${kind}/${file}`);
      const body = Buffer.from(await response.body());
      const at = body.indexOf('deepseek2');
      body.write('deepseek9', at);
      return route.fulfill({ status: 200, contentType: 'application/octet-stream', body });
    }
    const response = await route.fetch({ url: new URL(`/tests/fixtures/v2-lite-tiny/${file}`, url).href });
    if (route.request().method() !== 'GET' || response.status() !== 200) return route.fulfill({ response });
    if (file.endsWith('.safetensors')) weightRequests.push(`${kind}/${file}`);
    let body = await response.body();
    if (kind === 'cut' && file.endsWith('.safetensors')) body = body.subarray(0, 5000);
    return route.fulfill({ status: 200, contentType: 'application/octet-stream', body });
  });
  const r = await page.evaluate(async () => {
    const msg = async (f) => {
      try {
        await f();
        return 'no error';
      } catch (e) {
        return e.message;
      }
    };
    const { Engine } = window.moela;
    return {
      noMessages: await msg(() => window.engines.chat.chat.completions.create({ messages: [] })),
      badType: await msg(() =>
        window.engines.chat.chat.completions.create({ messages: [{ role: 'user', content: 'x' }], max_tokens: 'many' }),
      ),
      missing: await msg(() => Engine.load({ model: '/tests/fixtures/does-not-exist/', cache: false })),
      notAModel: await msg(() => Engine.load({ model: '/web/', cache: false })),
      llama: await msg(() => Engine.load({ model: '/bad/llama/', cache: false })),
      cut: await msg(() => Engine.load({ model: '/bad/cut/', cache: false })),
      gguf: await msg(() => Engine.load({ model: '/bad/gguf/other.gguf', cache: false })),
    };
  });
  await page.unrouteAll();
  assert.match(r.noMessages, /messages must be a non-empty array/);
  assert.match(r.badType, /invalid type|expected/i);
  assert.match(r.missing, /does-not-exist\/config\.json: HTTP 404/);
  assert.match(r.notAModel, /config\.json: HTTP 404/);
  assert.match(r.llama, /config\.json: unsupported model_type = "llama"/);
  assert.match(r.cut, /model\.safetensors: .*truncated/);
  assert.match(r.gguf, /other\.gguf.*general\.architecture is "deepseek9"/);
  // The GGUF was read once, for its header (a range request), and not downloaded.
  assert.deepEqual(weightRequests, ['cut/model.safetensors', 'gguf/other.gguf'], 'unsupported models were refused before their weights downloaded');
  await unload('chat');
});

test('downloaded files are kept in the Cache API and reused without the network', { timeout: 240_000 }, async () => {
  await page.evaluate(() => window.moela.Engine.clearCache());
  await load('cached', 'v2-lite-tiny', { cache: true });
  const keys = await page.evaluate(async () => {
    const c = await caches.open('moela-v1');
    return (await c.keys()).map((r) => new URL(r.url).pathname);
  });
  for (const f of ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'model.safetensors', 'moela-manifest.json']) {
    assert.ok(keys.includes(`/tests/fixtures/v2-lite-tiny/${f}`), `${f} is cached: ${keys}`);
  }
  await unload('cached');

  // The second load gets nothing from the server.
  const requests = [];
  await page.route('**/tests/fixtures/**', (route) => {
    requests.push(route.request().url());
    return route.abort();
  });
  try {
    const { info } = await load('cached', 'v2-lite-tiny', { cache: true });
    assert.equal(info.architecture, 'deepseek_v2');
    assert.deepEqual(requests, []);
  } finally {
    await page.unroute('**/tests/fixtures/**');
  }
  const ref = readJson('tests/fixtures/v2-lite-tiny/reference.json');
  const first = await page.evaluate(
    async (tokens) => Array.from((await window.engines.cached.logits(tokens))[0]),
    ref.tokens,
  );
  assert.ok(relL2(first, ref.logits[0]) <= 1e-2);
  await unload('cached');

  assert.equal(await page.evaluate(() => window.moela.Engine.clearCache()), true);
  assert.equal(await page.evaluate(async () => (await caches.has('moela-v1'))), false);
});

test('weights read by ranges give the same logits as weights passed as bytes', { timeout: 240_000 }, async () => {
  const ref = readJson('tests/fixtures/v2-lite-tiny/reference.json');
  const { ranged, whole } = await page.evaluate(async (tokens) => {
    const mod = await window.moela.initWasm();
    const get = async (f) => new Uint8Array(await (await fetch(`/tests/fixtures/v2-lite-tiny/${f}`)).arrayBuffer());
    const meta = { config: await get('config.json'), tokenizer: await get('tokenizer.json'), tokenizerConfig: await get('tokenizer_config.json') };
    const bytes = await get('model.safetensors');
    const blob = new Blob([bytes]);
    const reads = [];
    const read = async (start, end) => {
      reads.push(end - start);
      return new Uint8Array(await blob.slice(start, end).arrayBuffer());
    };
    const logits = async (weights) => {
      const engine = await mod.WasmEngine.load({ ...meta, weights: [weights] }, { weights: 'f32' });
      const rows = (await engine.logits(tokens)).map((r) => Array.from(r));
      engine.unload();
      return rows;
    };
    const ranged = await logits({ name: 'model.safetensors', size: blob.size, read });
    const whole = await logits({ name: 'model.safetensors', bytes });
    return { ranged: { rows: ranged, reads: reads.length, largest: Math.max(...reads), size: blob.size }, whole };
  }, ref.tokens);
  assert.deepEqual(ranged.rows, whole, 'the same logits either way');
  assert.ok(ranged.reads > 10 && ranged.largest < ranged.size, `read tensor by tensor: ${JSON.stringify({ ...ranged, rows: undefined })}`);
  assert.ok(relL2(ranged.rows[0], ref.logits[0]) <= 1e-2);
});

test('a real-width checkpoint streams into the GPU with wasm memory below its size', { timeout: 600_000 }, async () => {
  const dir = path.join(repoRoot, 'web/tests/.generated/v2-lite-width');
  fs.rmSync(dir, { recursive: true, force: true });
  const size = writeRealWidthCheckpoint(dir);
  const fresh = await openHarness(browser, server);
  try {
    const r = await fresh.evaluate(async () => {
      const t0 = performance.now();
      const engine = await window.moela.Engine.load({ model: '/web/tests/.generated/v2-lite-width/', weights: 'q4', cache: false });
      const seconds = (performance.now() - t0) / 1000;
      const memory = window.moela.wasmMemoryBytes();
      const rows = await engine.logits([0, 5, 17]);
      const last = Array.from(rows.at(-1));
      await engine.unload();
      return { seconds, memory, finite: last.every(Number.isFinite), spread: Math.max(...last) - Math.min(...last) };
    });
    console.log(`real-width checkpoint: ${(size / 1e6).toFixed(0)} MB loaded in ${r.seconds.toFixed(1)} s, wasm memory ${(r.memory / 1e6).toFixed(0)} MB`);
    assert.ok(r.finite && r.spread > 0, JSON.stringify(r));
    // Loading from bytes would need the whole file in wasm memory, and more.
    assert.ok(r.memory < size * 0.75, `wasm memory ${r.memory} for a ${size}-byte checkpoint`);
  } finally {
    await fresh.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
