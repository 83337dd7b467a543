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
export async function launch({ webgpu = true, args } = {}) {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) or set CHROMIUM_PATH`);
  }
  const unlock = await lock();
  let browser;
  try {
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: args ?? (webgpu ? WEBGPU_ARGS : NO_WEBGPU_ARGS),
      timeout: 60_000,
    });
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
