// The demo page served by `moela serve`: its "This server" engine runs the model natively behind the OpenAI
// stream, so the page works in a browser without WebGPU, with its thinking pane, speed, cache and heat map.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { launch, nativeMoela, watch } from './helpers.mjs';

/** Starts `moela serve` on a free loopback port; resolves to `{url, close()}`. */
function startServer() {
  const child = spawn(nativeMoela(), ['serve', '--port', '0', '--parallel', '2'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error('moela serve did not start within 120 s')), 120_000);
    child.stdout.on('data', (d) => {
      out += d;
      const m = /http:\/\/[0-9.:]+/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve({ url: m[0], close: () => child.kill() });
      }
    });
    child.on('exit', (code) => reject(new Error(`moela serve exited (${code}) before listening: ${out}`)));
  });
}

test('the demo page served by moela serve answers on the server, without WebGPU in the browser', { timeout: 300_000 }, async () => {
  const server = await startServer();
  const browser = await launch({ webgpu: false });
  try {
    const page = watch(await browser.newPage());
    await page.goto(`${server.url}/index.html`);
    await page.locator('#status[data-state="ready"], #status[data-state="error"]').waitFor({ timeout: 120_000 });
    const loadError = (await page.locator('#load-error').isVisible()) ? await page.locator('#load-error').innerText() : '';
    assert.equal(await page.locator('#status').getAttribute('data-state'), 'ready', `not ready: ${loadError}`);
    assert.equal(await page.locator('input[name="source"][value="server"]').isChecked(), true);
    assert.match(await page.locator('#server-text').innerText(), /moela-arith-tiny on the moela server/);
    assert.match(await page.locator('#model-info').innerText(), /deepseek_v3/);
    assert.equal(await page.locator('#banner').isVisible(), false, 'no WebGPU banner: the server runs the model');

    await page.locator('.settings summary').click();
    await page.locator('#temperature').fill('0');
    await page.locator('#prompt').fill('What is 2 + 3?');
    await page.locator('#send').click();
    const reply = page.locator('.msg.assistant').last();
    await page.locator('.msg.assistant[data-state="done"], .msg.assistant[data-state="error"]').waitFor({ timeout: 120_000 });
    assert.equal(await reply.getAttribute('data-state'), 'done', `the reply failed: ${await reply.innerText()}`);
    assert.equal(await reply.locator('.content').textContent(), 'The answer is 5.');
    assert.match(await reply.locator('.reasoning').textContent(), /2 \+ 3 = 5/);
    assert.match(await page.locator('#heatmap-text').innerText(), /^\d+ tokens routed/);
    assert.match(await page.locator('#decode-tps').innerText(), /^\d+(\.\d+)?$/);
    assert.match(await page.locator('#cache-text').innerText(), /^\d+ tokens cached/);
    assert.deepEqual(page.problems.filter((p) => !/WebGPU/.test(p)), []);
  } finally {
    await browser.close();
    server.close();
  }
});
