// Browser benchmark (a script, not a test): loads a random-weight preset in Chromium on WebGPU and prints
// engine.bench() as JSON, with the adapter and the model's facts.
//
//   node web/tests/bench.mjs [--preset v3-mini|v2-lite-mini] [--prompt-tokens N] [--gen-tokens N] [--weights f32|f16|q8|q4]
//
// Chromium runs WebGPU on SwiftShader (the CPU) unless CHROMIUM_ARGS replaces the flags, e.g. on a machine
// with a GPU: CHROMIUM_ARGS="--enable-unsafe-webgpu --enable-features=Vulkan --headless=new --no-sandbox".
import { parseArgs } from 'node:util';
import { launch, requirePkg, serve, watch } from './helpers.mjs';

const { values: opts } = parseArgs({
  options: {
    preset: { type: 'string', default: 'v3-mini' },
    'prompt-tokens': { type: 'string', default: '32' },
    'gen-tokens': { type: 'string', default: '8' },
    weights: { type: 'string', default: 'f32' },
    timeout: { type: 'string', default: '1200' },
  },
});

requirePkg();
const server = await serve();
const args = process.env.CHROMIUM_ARGS ? process.env.CHROMIUM_ARGS.split(/\s+/).filter(Boolean) : undefined;
const browser = await launch({ args });
try {
  const page = watch(await browser.newPage());
  page.setDefaultTimeout(Number(opts.timeout) * 1000);
  await page.goto(`${server.url}web/tests/harness.html`);
  await page.waitForFunction(() => window.moela !== undefined);
  const result = await page.evaluate(
    async ({ preset, promptTokens, genTokens, weights }) => {
      const { Engine, checkWebGPU } = window.moela;
      const adapter = await checkWebGPU();
      const t0 = performance.now();
      const engine = await Engine.loadPreset(preset, { seed: 0, weights });
      const loadSeconds = (performance.now() - t0) / 1000;
      const bench = await engine.bench({ promptTokens, genTokens });
      const info = engine.info();
      await engine.unload();
      return {
        preset,
        adapter,
        userAgent: navigator.userAgent,
        load_seconds: loadSeconds,
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
      promptTokens: Number(opts['prompt-tokens']),
      genTokens: Number(opts['gen-tokens']),
      weights: opts.weights,
    },
  );
  console.log(JSON.stringify(result, null, 2));
} finally {
  await browser.close();
  await server.close();
}
