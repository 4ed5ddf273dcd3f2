// The page: picks data, wires onnxruntime-web, the coordinator client and the device loop
// to the DOM. Everything it shows lives in `state`, exposed as window.heterofl for tests.
//
// URL query parameters (all optional):
//   data=demo           use the coordinator's demo data (GET /v1/demo-data) without a click
//   shard, clients, split, seed, train_examples
//                       forwarded as they are to GET /v1/demo-data (which shard of which split)
//   autostart=1         start training as soon as the data is ready
//   threads=N           wasm threads (default: up to 4 when cross-origin isolated, else 1)
//   fresh=1             forget the stored token and register as a new device

import * as ort from './ort/ort.wasm.min.mjs';

import { DeviceClient, KEPT_MESSAGES, addMessage, initialState } from './client.js';
import { DataError, loadMnist } from './mnist.js';
import { Coordinator, sha256Hex } from './protocol.js';
import { OnnxLevel } from './trainer.js';

const DEMO_PARAMETERS = ['shard', 'clients', 'split', 'seed', 'train_examples'];
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

const state = initialState();
const current = { data: null }; // the training data itself (state.data describes it)
let controller = null;
let coordinator = null;
let client = null; // the DeviceClient of the current (or last) run
let running = null;
const levels = new Map(); // manifest URL -> Promise<OnnxLevel>

const isolated = globalThis.crossOriginIsolated === true;
const threads = Math.max(1, Number(params.get('threads')) || (isolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1));
ort.env.wasm.numThreads = isolated ? threads : 1;
ort.env.logLevel = 'warning';
state.hashCheck = globalThis.crypto?.subtle ? 'sha256' : 'unavailable';

// ---------------------------------------------------------------- rendering

let renderQueued = false;
const shown = new WeakSet(); // log lines already on the page

function changed() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(render);
}

function text(id, value) {
  const el = $(id);
  const shown = value === null || value === undefined ? '–' : String(value);
  if (el.textContent !== shown) el.textContent = shown;
}

const PHASES = {
  idle: 'Idle: pick data, then start.',
  loading: 'Loading…',
  profiling: 'Timing a few training steps…',
  registering: 'Registering with the coordinator…',
  polling: 'Asking the coordinator for a task…',
  waiting: 'Waiting for the next round.',
  training: 'Training.',
  statistics: 'Computing sBN statistics for the coordinator.',
  uploading: 'Uploading.',
  backoff: 'Retrying after an error.',
  stopped: 'Stopped.',
  done: 'Done: the coordinator has finished the run.',
};

function render() {
  renderQueued = false;
  text('phase', PHASES[state.phase] ?? state.phase);
  const alert = $('alert');
  alert.hidden = !state.alert;
  text('alert', state.alert ?? '');
  text('device-id', state.deviceId);
  text('round', state.round);
  text('level', state.level === null ? null : `${state.level}${state.rate ? ` (rate ${state.rate})` : ''}`);
  text('epoch', state.epoch === null ? null : `${state.epoch} of ${state.epochs}`);
  text('step', state.step === null ? null : `${state.step}${state.stepsPerEpoch ? ` (${state.stepsPerEpoch} per epoch)` : ''}`);
  text('loss', state.loss === null ? null : state.loss.toFixed(4));
  text('uploads', `${state.uploads} trained, ${state.statisticsUploads} statistics`);
  text('bytes-received', formatBytes(state.bytesReceived));
  text('bytes-sent', formatBytes(state.bytesSent));
  text(
    'hash-check',
    state.hashCheck === 'sha256'
      ? 'sha256 of every artifact checked against its manifest'
      : 'not checked: this page has no crypto.subtle (plain HTTP from another address); use HTTPS or localhost',
  );
  text(
    'threads',
    isolated
      ? `${ort.env.wasm.numThreads} (cross-origin isolated)`
      : '1 (the page is not cross-origin isolated: no wasm threads)',
  );
  $('start').disabled = !state.data || running !== null;
  $('stop').disabled = running === null;
  const log = $('log');
  for (const m of state.messages) {
    if (shown.has(m)) continue;
    shown.add(m);
    const li = document.createElement('li');
    li.className = m.level;
    li.textContent = `${m.time.slice(11, 19)} ${m.text}`;
    log.prepend(li);
  }
  while (log.children.length > KEPT_MESSAGES) log.lastChild.remove();
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 ** 2).toFixed(2)} MiB`;
}

function log(textValue, level = 'info') {
  addMessage(state, textValue, level);
  changed();
}

// ---------------------------------------------------------------- data

function useData(data, source, description) {
  state.data = { source, n: data.n, labels: data.labels, description };
  current.data = data;
  text('data-status', `${data.n} examples, labels ${data.labels.join(' ')} — ${description}`);
  const banner = $('demo-banner');
  banner.hidden = source !== 'demo';
  banner.textContent = source === 'demo' ? `DEMO DATA served by the coordinator: ${description}. Not data from this device.` : '';
  log(`data: ${data.n} examples from ${description}`);
  changed();
  if (params.get('autostart') === '1') start();
}

async function useFiles() {
  const images = $('images-file').files[0];
  const labels = $('labels-file').files[0];
  if (!images || !labels) return;
  try {
    const data = await loadMnist(images, labels);
    useData(data, 'files', `${images.name} and ${labels.name} on this device`);
  } catch (err) {
    state.alert = err instanceof DataError ? err.message : `cannot read the files: ${err.message}`;
    log(state.alert, 'error');
  }
}

async function useDemo() {
  const query = new URLSearchParams();
  for (const key of DEMO_PARAMETERS) if (params.has(key)) query.set(key, params.get(key));
  const path = `/v1/demo-data${query.toString() ? `?${query}` : ''}`;
  state.phase = 'loading';
  changed();
  const api = new Coordinator({ storage: null, onRetry: retried });
  try {
    const { tensors, metadata } = await api.tensors(path);
    const x = tensors.get('x');
    const y = tensors.get('y');
    if (!x || !y || x.dtype !== 'F32' || y.dtype !== 'I64' || x.shape[0] !== y.shape[0]) {
      throw new DataError('the demo data is not x float32 [N, ...] and y int64 [N]');
    }
    const held = new Set();
    for (const v of y.data) held.add(Number(v));
    const told = Object.entries(metadata ?? {}).map(([k, v]) => `${k} ${v}`);
    const asked = [...query].map(([k, v]) => `${k}=${v}`);
    const description = `demo data${told.length ? ` (${told.join(', ')})` : asked.length ? ` (${asked.join(', ')})` : ''}`;
    state.phase = 'idle';
    state.bytesReceived += api.bytesReceived;
    useData(
      { x: x.data, y: y.data, n: x.shape[0], shape: x.shape, labels: [...held].sort((a, b) => a - b) },
      'demo',
      description,
    );
  } catch (err) {
    state.phase = 'idle';
    state.alert = `cannot load the demo data: ${err.message}`;
    log(state.alert, 'error');
    changed();
  }
}

function retried({ attempt, delayMs, reason, path }) {
  const message = `coordinator unreachable or busy (${reason}) on ${path}; retry ${attempt} in ${(delayMs / 1000).toFixed(1)} s`;
  state.alert = message;
  if (attempt === 1 || attempt % 10 === 0) log(message, 'warn');
  changed();
}

// ---------------------------------------------------------------- training

function loadLevel(manifestUrl) {
  if (!levels.has(manifestUrl)) {
    const loading = (async () => {
      const { manifest, files, checked } = await coordinator.artifact(manifestUrl);
      if (!checked) state.hashCheck = 'unavailable';
      log(`level ${manifest.level}: ${Object.keys(files).join(', ')} ${checked ? 'sha256-checked' : 'NOT checked (no crypto.subtle)'}`);
      return OnnxLevel.create(ort, manifest, files);
    })();
    levels.set(manifestUrl, loading);
    loading.catch(() => levels.delete(manifestUrl)); // a failed download is tried again
  }
  return levels.get(manifestUrl);
}

const sleep = (ms, signal) =>
  new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(timer);
      reject(signal.reason);
    }, { once: true });
  });

function start() {
  if (running || !current.data) return;
  controller = new AbortController();
  if (params.get('fresh') === '1' && !start.freshDone) {
    localStorage.removeItem('heterofl-edge.device');
    start.freshDone = true;
  }
  coordinator = new Coordinator({ signal: controller.signal, onRetry: retried });
  coordinator.bytesReceived = state.bytesReceived; // totals go on from the page's earlier calls
  coordinator.bytesSent = state.bytesSent;
  levels.clear();
  client = new DeviceClient({
    coordinator,
    loadLevel,
    data: current.data,
    state,
    changed,
    sleep,
    signal: controller.signal,
    breathe: () => new Promise((resolve) => setTimeout(resolve, 0)),
    device: {
      memoryMb: navigator.deviceMemory ? navigator.deviceMemory * 1024 : undefined,
      bandwidthMbps: navigator.connection?.downlink || undefined,
    },
  });
  let wakeLock = null; // keeps a phone's screen on while it trains (secure contexts only)
  navigator.wakeLock
    ?.request('screen')
    .then((lock) => {
      wakeLock = lock;
    })
    .catch(() => {}); // refused: the screen may sleep and the browser may pause the page
  running = client
    .run()
    .catch((err) => {
      if (controller.signal.aborted) {
        state.phase = 'stopped';
        state.alert = null;
        log('stopped by the user');
      } else {
        state.phase = 'stopped';
        state.alert = `stopped by an unexpected error: ${err.message}`;
        log(state.alert, 'error');
      }
    })
    .finally(() => {
      running = null;
      wakeLock?.release().catch(() => {});
      changed();
    });
  changed();
}

function stop() {
  controller?.abort(new DOMException('stopped by the user', 'AbortError'));
}

// ---------------------------------------------------------------- page

window.heterofl = {
  state,
  start,
  stop,
  useDemo,
  /** The exact bytes (safetensors) of the last upload of a kind: 'train' or 'statistics'. */
  lastUploadBody: (kind = 'train') => client?.uploadBodies[kind] ?? null,
  /** The training data in use: {x: Float32Array, y: BigInt64Array, n, shape, labels}. */
  data: () => current.data,
  running: () => running,
  sha256Hex,
};

async function init() {
  $('images-file').addEventListener('change', () => {
    $('use-files').disabled = !($('images-file').files[0] && $('labels-file').files[0]);
  });
  $('labels-file').addEventListener('change', () => {
    $('use-files').disabled = !($('images-file').files[0] && $('labels-file').files[0]);
  });
  $('use-files').addEventListener('click', useFiles);
  $('use-demo').addEventListener('click', useDemo);
  $('start').addEventListener('click', start);
  $('stop').addEventListener('click', stop);
  text(
    'environment',
    `onnxruntime-web ${ort.env.versions?.web ?? ''} (wasm) · ${window.isSecureContext ? 'secure context' : 'not a secure context'}` +
      ` · ${isolated ? 'cross-origin isolated' : 'not cross-origin isolated'}`,
  );
  changed();
  try {
    const api = new Coordinator({ storage: null, onRetry: retried });
    const health = await api.health();
    state.bytesReceived += api.bytesReceived;
    state.alert = null;
    if (health.demo_data) $('use-demo').hidden = false;
    log(`coordinator: model ${health.model}, mode ${health.mode}${health.demo_data ? ', demo data offered' : ''}`);
    if (params.get('data') === 'demo') await useDemo();
  } catch (err) {
    state.alert = `cannot reach the coordinator: ${err.message}`;
    log(state.alert, 'error');
  }
  changed();
}

init();
