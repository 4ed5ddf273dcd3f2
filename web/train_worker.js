// The page's training worker (a module Web Worker): onnxruntime-web runs here, so training
// and statistics never hold up the page. The protocol is worker_host.js's; the page's side
// is remote_level.js. Stopping terminates the worker (the page makes a fresh one to start).

import * as ort from './ort/ort.wasm.min.mjs';

import { WorkerHost } from './worker_host.js';

ort.env.logLevel = 'warning';
const host = new WorkerHost(ort, (message, transfer) => self.postMessage(message, transfer));
self.onmessage = (event) => host.handle(event.data);
