// The module Web Worker behind `WorkerEngine`: it holds one `Engine` and answers the page's requests.
//
// Page -> worker: {id, op, args}; op is load | loadPreset | encode | logits | cacheUsage | resetChat |
// bench | chat | unload | abort (args.target: the id of the chat to stop).
// Worker -> page: {id, type: "progress", progress} | {id, type: "chunk", chunk} |
// {id, type: "routing", experts} | {id, type: "result", value} | {id, type: "error", error}.

import { Engine, serializeError } from './moela.js';

let engine = null;
/** AbortControllers of the chats in flight, by request id. */
const chats = new Map();

const post = (message, transfer = []) => self.postMessage(message, transfer);

async function handle(id, op, args = {}) {
  switch (op) {
    case 'load':
    case 'loadPreset': {
      if (engine) {
        await engine.unload().catch(() => {});
        engine = null;
      }
      const onProgress = (progress) => post({ id, type: 'progress', progress });
      engine =
        op === 'load'
          ? await Engine.load({ ...args, onProgress })
          : await Engine.loadPreset(args.name, args);
      return { value: { info: engine.info(), model: engine.model } };
    }
    case 'chat': {
      const { routing, ...request } = args;
      const controller = new AbortController();
      chats.set(id, controller);
      try {
        const stream = await ready().chat.completions.create({
          ...request,
          stream: true,
          signal: controller.signal,
          onRouting: routing ? (experts) => post({ id, type: 'routing', experts }) : undefined,
        });
        for await (const chunk of stream) post({ id, type: 'chunk', chunk });
        return { value: null };
      } finally {
        chats.delete(id);
      }
    }
    case 'encode':
      return { value: await ready().encode(args.text, args.special) };
    case 'logits': {
      const rows = await ready().logits(args.tokens);
      return { value: rows, transfer: rows.map((r) => r.buffer) };
    }
    case 'cacheUsage':
      return { value: await ready().cacheUsage() };
    case 'resetChat':
      await ready().resetChat();
      return { value: null };
    case 'bench':
      return { value: await ready().bench(args) };
    case 'unload':
      if (engine) await engine.unload();
      engine = null;
      return { value: null };
    default:
      throw new Error(`unknown request "${op}"`);
  }
}

function ready() {
  if (!engine) throw new Error('no model is loaded in this worker');
  return engine;
}

self.onmessage = async (event) => {
  const { id, op, args } = event.data ?? {};
  if (op === 'abort') {
    chats.get(args?.target)?.abort();
    return;
  }
  try {
    const { value, transfer } = await handle(id, op, args);
    post({ id, type: 'result', value }, transfer);
  } catch (e) {
    post({ id, type: 'error', error: serializeError(e) });
  }
};
