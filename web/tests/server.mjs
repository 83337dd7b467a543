// A tiny static file server for the browser tests: serves the repository root on 127.0.0.1 (a secure
// context, so WebGPU is exposed) at a random port, with the MIME types a browser insists on
// (application/wasm for streaming compilation, text/javascript for modules).
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.wasm': 'application/wasm',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.ico': 'image/x-icon',
  '.txt': 'text/plain; charset=utf-8',
  '.md': 'text/plain; charset=utf-8',
  '.ts': 'text/plain; charset=utf-8',
  '.safetensors': 'application/octet-stream',
};

/** Starts the server; resolves to `{url, close()}` where url ends with a slash. */
export function serve(root = repoRoot) {
  const server = http.createServer((req, res) => {
    // A model folder may be served from a port of its own (bench.mjs --model): the page reads it cross-origin.
    res.setHeader('access-control-allow-origin', '*');
    let rel;
    try {
      rel = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    } catch {
      res.writeHead(400).end('bad url');
      return;
    }
    const file = path.join(root, path.normalize(rel));
    if (!file.startsWith(root)) {
      res.writeHead(403).end('forbidden');
      return;
    }
    fs.stat(file, (err, st) => {
      if (err) {
        res.writeHead(404, { 'content-type': 'text/plain' }).end(`not found: ${rel}`);
        return;
      }
      if (st.isDirectory()) {
        if (!rel.endsWith('/')) {
          res.writeHead(301, { location: rel + '/' }).end();
          return;
        }
        const index = path.join(file, 'index.html');
        if (fs.existsSync(index)) {
          sendFile(res, index, fs.statSync(index));
        } else {
          res.writeHead(404, { 'content-type': 'text/plain' }).end(`no index in ${rel}`);
        }
        return;
      }
      sendFile(res, file, st);
    });
  });
  return new Promise((resolve, reject) => {
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      resolve({
        url: `http://127.0.0.1:${port}/`,
        close: () => new Promise((r) => { server.closeAllConnections?.(); server.close(() => r()); }),
      });
    });
  });
}

function sendFile(res, file, st) {
  const type = MIME[path.extname(file).toLowerCase()] ?? 'application/octet-stream';
  res.writeHead(200, {
    'content-type': type,
    'content-length': st.size,
    'cache-control': 'no-store',
  });
  fs.createReadStream(file).pipe(res);
}
