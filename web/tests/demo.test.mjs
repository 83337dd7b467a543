// The demo page (web/index.html) in Chromium: the no-WebGPU banner, an unsupported model's error, and a
// full chat turn with the default model (reasoning pane, speed, cache, routing heat map, screenshot).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { launch, readJson, repoRoot, requirePkg, serve, watch } from './helpers.mjs';

const OUTPUT = path.join(repoRoot, 'web', 'tests', 'output');

async function withBrowser(webgpu, fn) {
  const server = await serve();
  const browser = await launch({ webgpu });
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    const page = watch(await context.newPage());
    await fn({ server, context, page });
  } finally {
    await browser.close();
    await server.close();
  }
}

test('the demo shows a banner when the browser has no WebGPU', { timeout: 120_000 }, async () => {
  await withBrowser(false, async ({ server, page }) => {
    await page.goto(`${server.url}web/index.html`);
    const gpu = await page.evaluate(async () =>
      !navigator.gpu ? 'absent' : (await navigator.gpu.requestAdapter()) ? 'adapter' : 'no adapter',
    );
    assert.notEqual(gpu, 'adapter', 'Chromium was started without WebGPU, yet it found an adapter');
    const banner = page.locator('#banner');
    await banner.waitFor({ state: 'visible', timeout: 30_000 });
    const text = await banner.innerText();
    assert.match(text, /WebGPU is not available/);
    assert.match(text, /Chrome or Edge 113\+, Safari 26\+ or Firefox 141\+/);
    assert.match(text, /--enable-unsafe-webgpu/);
    assert.equal(await page.locator('#load').isDisabled(), true);
    assert.equal(await page.locator('#status').getAttribute('data-state'), 'error');
    fs.mkdirSync(OUTPUT, { recursive: true });
    await page.screenshot({ path: path.join(OUTPUT, 'no-webgpu.png') });
  });
});

test('the demo shows the engine\'s error for an unsupported model', { timeout: 180_000 }, async () => {
  requirePkg();
  const config = readJson('tests/fixtures/v2-lite-tiny/config.json');
  await withBrowser(true, async ({ server, context, page }) => {
    // The worker's requests go through the context's routes.
    // v2-lite-tiny with another model_type; the weights must not even be downloaded.
    const weightRequests = [];
    await context.route((url) => url.pathname.startsWith('/unsupported/'), async (route) => {
      const url = new URL(route.request().url());
      const file = url.pathname.split('/').pop();
      if (file === 'config.json') {
        return route.fulfill({ contentType: 'application/json', body: JSON.stringify({ ...config, model_type: 'llama' }) });
      }
      if (file.endsWith('.safetensors') && route.request().method() === 'GET') weightRequests.push(file);
      return route.fulfill({ response: await route.fetch({ url: new URL(`/tests/fixtures/v2-lite-tiny/${file}`, url).href }) });
    });
    await page.goto(`${server.url}web/index.html?model=/unsupported/`);
    const error = page.locator('#load-error');
    await error.waitFor({ state: 'visible', timeout: 120_000 });
    const text = await error.innerText();
    assert.match(text, /^Unsupported model: /);
    assert.match(text, /config\.json: unsupported model_type = "llama"/);
    assert.equal(await page.locator('#status').getAttribute('data-state'), 'error');
    assert.equal(await page.locator('#prompt').isDisabled(), true);
    assert.deepEqual(weightRequests, [], 'an unsupported config is refused before the weights download');
  });
});

/** Counts heat-map pixels that changed since `window.heatBefore` and those in the last-token colour. */
async function heatPixels(page, { save = false } = {}) {
  return page.evaluate((save) => {
    const canvas = document.getElementById('heatmap');
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    if (save) {
      window.heatBefore = { data, width: canvas.width, height: canvas.height };
      return null;
    }
    const hex = getComputedStyle(document.documentElement).getPropertyValue('--heat-latest').trim();
    const n = parseInt(hex.slice(1), 16);
    const latest = [(n >> 16) & 255, (n >> 8) & 255, n & 255];
    const before = window.heatBefore;
    const sameSize = before.width === canvas.width && before.height === canvas.height;
    let changed = 0;
    let highlighted = 0;
    for (let i = 0; i < data.length; i += 4) {
      if (!sameSize || Math.abs(data[i] - before.data[i]) + Math.abs(data[i + 1] - before.data[i + 1]) + Math.abs(data[i + 2] - before.data[i + 2]) > 30) changed++;
      if (Math.abs(data[i] - latest[0]) + Math.abs(data[i + 1] - latest[1]) + Math.abs(data[i + 2] - latest[2]) < 40 && data[i + 3] > 200) highlighted++;
    }
    return { changed, highlighted, pixels: data.length / 4 };
  }, save);
}

test('the demo loads the default model, answers a prompt and draws the routing heat map', { timeout: 420_000 }, async () => {
  requirePkg();
  await withBrowser(true, async ({ server, page }) => {
    await page.goto(`${server.url}web/index.html`);
    // The default model loads by itself.
    const status = page.locator('#status[data-state="ready"], #status[data-state="error"]');
    await status.waitFor({ timeout: 240_000 });
    const loadError = (await page.locator('#load-error').isVisible()) ? await page.locator('#load-error').innerText() : '';
    assert.equal(await page.locator('#status').getAttribute('data-state'), 'ready', `the model did not load: ${loadError}`);
    assert.match(await page.locator('#model-info').innerText(), /deepseek_v3/);
    await heatPixels(page, { save: true });

    await page.locator('.settings summary').click();
    await page.locator('#max-tokens').fill('8');
    await page.locator('#temperature').fill('0');
    await page.locator('#thinking-budget').fill('3');
    await page.locator('#prompt').fill('What is 2 + 3?');
    await page.locator('#send').click();
    const reply = page.locator('.msg.assistant').last();
    await page.locator('.msg.assistant[data-state="done"], .msg.assistant[data-state="error"]').waitFor({ timeout: 240_000 });
    const state = await reply.getAttribute('data-state');
    assert.equal(state, 'done', `the reply failed: ${await reply.innerText()}`);

    assert.ok((await reply.locator('.reasoning').textContent()).length > 0, 'the Thinking pane has the reasoning');
    assert.match(await reply.locator('.thinking summary').innerText(), /Thought for/);
    assert.ok((await reply.locator('.content').textContent()).length > 0, 'the answer is shown');
    assert.match(await reply.locator('.footer').innerText(), /8 tokens · [\d.]+ tok\/s/);
    assert.match(await page.locator('#decode-tps').innerText(), /^\d+(\.\d+)?$/);
    assert.match(await page.locator('#cache-text').innerText(), /^\d+ tokens cached · [\d.]+× smaller/);
    assert.notEqual(await page.locator('#cache-used').innerText(), '0 B');

    await page.waitForTimeout(200); // the heat map redraws on the next animation frame
    const heat = await heatPixels(page);
    assert.ok(heat.changed > 100, `the heat map shows the routing: ${JSON.stringify(heat)}`);
    assert.ok(heat.highlighted > 10, `the last token's experts are outlined: ${JSON.stringify(heat)}`);

    fs.mkdirSync(OUTPUT, { recursive: true });
    await page.screenshot({ path: path.join(OUTPUT, 'demo.png') });
    await page.emulateMedia({ colorScheme: 'dark' });
    await page.waitForTimeout(200);
    await page.screenshot({ path: path.join(OUTPUT, 'demo-dark.png') });

    // New chat forgets the conversation and its cache.
    await page.locator('#new-chat').click();
    await page.locator('#cache-text', { hasText: 'No tokens cached yet.' }).waitFor({ timeout: 30_000 });
    assert.equal(await page.locator('.msg').count(), 0);

    // A local folder (webkitdirectory) replaces the model.
    await page.locator('input[name="source"][value="folder"]').check({ force: true });
    await page.locator('#model-folder').setInputFiles(path.join(repoRoot, 'tests', 'fixtures', 'v2-lite-tiny'));
    assert.match(await page.locator('#folder-text').innerText(), /^v2-lite-tiny: \d+ files$/);
    await page.locator('#load').click();
    await page.locator('#status-text', { hasText: 'v2-lite-tiny · ready' }).waitFor({ timeout: 120_000 });
    assert.match(await page.locator('#model-info').innerText(), /deepseek_v2/);

    // A picked GGUF file replaces it, stored in the format nearest its own, its quantisation mix shown.
    await page.locator('input[name="source"][value="gguf"]').check({ force: true });
    await page.locator('#model-gguf').setInputFiles(path.join(repoRoot, 'tests', 'fixtures', 'gguf', 'v2-lite-tiny.q8_0.gguf'));
    await page.locator('#load').click();
    await page.locator('#status-text', { hasText: 'v2-lite-tiny.q8_0 · ready' }).waitFor({ timeout: 120_000 });
    const info = await page.locator('#model-info').innerText();
    assert.match(info, /q8 ·/, info);
    assert.match(info, /Stored as\s+Q8_0 [\d.]+ [KM]iB · /, info);
    assert.deepEqual(page.problems, [], 'no errors in the console');
  });
});

test('examples/browser: the smallest page using the package streams reasoning and answer apart', { timeout: 180_000 }, async () => {
  await withBrowser(true, async ({ server, page }) => {
    await page.goto(`${server.url}examples/browser/index.html`);
    await page.waitForFunction(() => /Done|moela:/.test(document.getElementById('status').textContent), null, {
      timeout: 150_000,
    });
    const got = await page.evaluate(() => ({
      status: document.getElementById('status').textContent,
      reasoning: document.getElementById('reasoning').textContent,
      answer: document.getElementById('answer').textContent,
    }));
    assert.equal(got.status, 'Done.', got.status);
    assert.equal(got.answer, 'The answer is 846.');
    assert.match(got.reasoning, /457 \+ 389 = 846/);
    // The loader asks for a shard index first (a 404 for a one-file model); nothing else may fail.
    assert.deepEqual(page.problems.filter((p) => !/status of 404/.test(p)), []);
  });
});
