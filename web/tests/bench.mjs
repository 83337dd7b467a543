// Browser benchmark (a script, not a test): loads a random-weight preset, or a checkpoint folder from disk, in
// Chromium on WebGPU and prints engine.bench() as JSON, with the adapter, the model's facts, the load's time
// and MB/s, and the size of the page's wasm memory once loaded (it only grows, so this is its peak).
//
//   node web/tests/bench.mjs [--preset v3-mini|v2-lite-mini] [--prompt-tokens N] [--gen-tokens N] [--weights f32|f16|q8|q4]
//   node web/tests/bench.mjs --model DIR --weights q4 [--no-cache]   # DIR served over HTTP on a port of its
//       own and loaded as Engine.load({model: url}) does, in a fresh on-disk profile (--no-cache: downloaded
//       into a Blob, not kept)
//
// Chromium runs WebGPU on SwiftShader (the CPU) unless CHROMIUM_ARGS replaces the flags, e.g. on a machine
// with a GPU: CHROMIUM_ARGS="--enable-unsafe-webgpu --enable-features=Vulkan --headless=new --no-sandbox".
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { launch, requirePkg, serve, watch } from './helpers.mjs';

const { values: opts } = parseArgs({
  options: {
    preset: { type: 'string', default: 'v3-mini' },
    model: { type: 'string' },
    'no-cache': { type: 'boolean', default: false },
    'prompt-tokens': { type: 'string', default: '32' },
    'gen-tokens': { type: 'string', default: '8' },
    weights: { type: 'string', default: 'f32' },
    timeout: { type: 'string', default: '1200' },
  },
});

requirePkg();
const server = await serve();
const models = opts.model ? await serve(path.resolve(opts.model)) : null;
const args = process.env.CHROMIUM_ARGS ? process.env.CHROMIUM_ARGS.split(/\s+/).filter(Boolean) : undefined;
// A model from disk is kept (OPFS, Cache API) in a profile of its own on disk, with the disk's quota.
const profile = opts.model ? fs.mkdtempSync(path.join(os.tmpdir(), 'moela-bench-')) : undefined;
const browser = await launch({ args, profile });
try {
  const page = watch(await browser.newPage());
  page.setDefaultTimeout(Number(opts.timeout) * 1000);
  await page.goto(`${server.url}web/tests/harness.html`);
  await page.waitForFunction(() => window.moela !== undefined);
  const result = await page.evaluate(
    async ({ preset, model, cache, promptTokens, genTokens, weights }) => {
      const { Engine, checkWebGPU, wasmMemoryBytes } = window.moela;
      const adapter = await checkWebGPU();
      const t0 = performance.now();
      const engine = model
        ? await Engine.load({ model, weights, cache })
        : await Engine.loadPreset(preset, { seed: 0, weights });
      const loadSeconds = (performance.now() - t0) / 1000;
      const wasmMemory = wasmMemoryBytes();
      const bench = await engine.bench({ promptTokens, genTokens });
      const info = engine.info();
      await engine.unload();
      return {
        preset: model ? null : preset,
        model,
        adapter,
        userAgent: navigator.userAgent,
        load_seconds: loadSeconds,
        load_megabytes_per_second: bench.load?.bytes ? bench.load.bytes / 1e6 / loadSeconds : null,
        wasm_memory_bytes: wasmMemory,
        model: {
          architecture: info.architecture,
          total_parameters: info.total_parameters,
          active_parameters_per_token: info.active_parameters_per_token,
          layers: info.layers,
          routed_experts: info.routed_experts,
          experts_per_token: info.experts_per_token,
          gpu_weight_bytes: info.gpu_weight_bytes,
        },
        bench,
      };
    },
    {
      preset: opts.preset,
      model: models?.url ?? null,
      cache: !opts['no-cache'],
      promptTokens: Number(opts['prompt-tokens']),
      genTokens: Number(opts['gen-tokens']),
      weights: opts.weights,
    },
  );
  console.log(JSON.stringify(result, null, 2));
} finally {
  await browser.close();
  await server.close();
  await models?.close();
  if (profile) fs.rmSync(profile, { recursive: true, force: true });
}
