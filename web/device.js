// The page: picks data, wires the training worker, the coordinator client and the device
// loop to the DOM. Everything it shows lives in `state`, exposed as window.heterofl for tests.
// The main thread only renders, talks HTTP and sends heartbeats; onnxruntime-web runs in a
// module Web Worker (train_worker.js), so the page answers while the device trains. Secure
// aggregation's keys and masking live in that worker too (secagg_device.js).
//
// URL query parameters (all optional):
//   data=demo           download the demo shard (GET /v1/demo-data) without a click
//   shard, clients      which demo shard (default: the last choice on this device, else 0 of 100)
//   split, seed, train_examples
//                       forwarded as they are to GET /v1/demo-data (which split)
//   autostart=1         start training as soon as the data is ready
//   threads=N           wasm threads when cross-origin isolated (default: up to 4)
//   fresh=1             forget the stored token and register as a new device
// URL fragment: #enroll=TOKEN (the coordinator's device link) is kept on this device and
// sent with the registration; it is removed from the address bar.

import { DeviceClient, KEPT_MESSAGES, addMessage, initialState } from './client.js';
import { demoData } from './data.js';
import { DataError, loadMnist } from './mnist.js';
import { Coordinator, checkMessage, sha256Hex } from './protocol.js';
import { TrainerWorker } from './remote_level.js';

const DEMO_PARAMETERS = ['split', 'seed', 'train_examples']; // forwarded from the page's URL
const DEMO_KEY = 'heterofl-edge.demo'; // the last demo shard chosen on this device
const ENROLL_KEY = 'heterofl-edge.enroll';
const TOKEN_KEY = 'heterofl-edge.device';
const HEALTH_MS = 10_000; // how often the page asks for the latest global accuracy while running
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

const state = initialState();
const current = { data: null, demoInfo: null, trainer: null, runner: null };
let controller = null;
let client = null; // the DeviceClient of the current (or last) run
let running = null;
let loadingData = false;
const artifacts = new Map(); // manifest URL -> Promise<{manifest, files, checked}>, across runs

const secure = window.isSecureContext === true;
const isolated = globalThis.crossOriginIsolated === true;
const threads = Math.max(1, Number(params.get('threads')) || Math.min(4, navigator.hardwareConcurrency || 1));
state.hashCheck = globalThis.crypto?.subtle ? 'sha256' : 'unavailable';

// ---------------------------------------------------------------- enrollment link

function takeEnrollment() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get('enroll');
  if (token) {
    localStorage.setItem(ENROLL_KEY, token);
    fragment.delete('enroll');
    const rest = fragment.toString();
    history.replaceState(null, '', location.pathname + location.search + (rest ? `#${rest}` : ''));
    log('kept the enrollment token of the device link');
  }
  return localStorage.getItem(ENROLL_KEY);
}

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
  loading: 'Loading data…',
  starting: 'Starting the training worker…',
  profiling: 'Timing a few training steps…',
  registering: 'Registering with the coordinator…',
  polling: 'Asking the coordinator for a task…',
  waiting: 'Waiting for the next round.',
  training: 'Training.',
  statistics: 'Computing sBN statistics for the coordinator.',
  secagg: 'Secure aggregation: exchanging keys and shares with the coordinator.',
  uploading: 'Uploading.',
  backoff: 'Retrying after an error.',
  stopped: 'Stopped.',
  done: 'Done: the coordinator has finished the run.',
  blocked: 'Cannot train from this page.',
};

const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });

function duration(seconds) {
  if (seconds < 60) return `${Math.max(1, Math.round(seconds))} s`;
  const minutes = Math.round(seconds / 60);
  return minutes < 60 ? `${minutes} min` : `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function phaseText() {
  if (state.phase === 'idle' && loadingData) return PHASES.loading;
  if (state.phase === 'idle' && state.data) {
    return `Ready: ${state.data.n} examples loaded. Press Start training.`;
  }
  if (state.phase === 'training' && state.round !== null) return `Training round ${state.round}.`;
  return PHASES[state.phase] ?? state.phase;
}

/** The progress bar's value (0..1) and its line, or null when nothing is in progress. */
function progress() {
  if (state.phase === 'training' && state.stepsPerEpoch && state.epochs) {
    const total = state.stepsPerEpoch * state.epochs;
    const step = state.step ?? 0;
    let line = `epoch ${Math.max(1, state.epoch ?? 1)} of ${state.epochs} · step ${step} of ${total}`;
    if (step > 1 && state.trainStartedAt !== null && state.stepAt !== null) {
      const perStep = (state.stepAt - state.trainStartedAt) / (step - 1);
      const left = (perStep * (total - step)) / 1000;
      line += ` · about ${duration(left)} left (done ≈ ${clock(state.stepAt + left * 1000)})`;
    }
    return { value: step / total, line };
  }
  if (state.phase === 'statistics') {
    const batches = state.statsBatches;
    return batches
      ? { value: state.statsBatch / batches, line: `sBN statistics: ${state.statsBatch} of ${batches} batch(es) done` }
      : { value: 0, line: 'sBN statistics: fetching the global model' };
  }
  if (state.phase === 'uploading') return { value: 1, line: 'sending the result' };
  return null;
}

function render() {
  renderQueued = false;
  document.body.classList.toggle('blocked', state.phase === 'blocked');
  text('phase', phaseText());
  const alert = $('alert');
  alert.hidden = !state.alert;
  text('alert', state.alert ?? '');
  const bar = progress();
  $('progress-block').hidden = bar === null;
  if (bar) {
    $('progress').value = bar.value;
    let line = bar.line;
    if (state.deadline) line += ` · deadline ${clock(state.deadline * 1000)}`;
    text('progress-text', line);
  }
  text('level', state.level === null ? null : `${state.level}${state.rate ? ` (rate ${state.rate})` : ''}`);
  text('round', state.round);
  const evaluation = state.evaluation;
  text(
    'accuracy',
    typeof evaluation?.global_accuracy === 'number'
      ? `${(100 * evaluation.global_accuracy).toFixed(1)}% after round ${evaluation.round}`
      : 'none yet',
  );
  text('device-id', state.deviceId);
  text('epoch', state.epoch === null ? null : `${state.epoch} of ${state.epochs}`);
  text('step', state.step === null ? null : `${state.step}${state.stepsPerEpoch ? ` (${state.stepsPerEpoch} per epoch)` : ''}`);
  text('loss', state.loss === null ? null : state.loss.toFixed(4));
  text('step-ms', state.stepMs === null ? null : `${state.stepMs.toFixed(1)} ms (median)`);
  text('uploads', `${state.uploads} trained, ${state.statisticsUploads} statistics`);
  text('heartbeats', String(state.heartbeats));
  text('bytes-received', formatBytes(state.bytesReceived));
  text('bytes-sent', formatBytes(state.bytesSent));
  text(
    'hash-check',
    state.hashCheck === 'sha256' ? 'sha256 of every artifact checked against its manifest' : 'not available',
  );
  text('runner', current.runner ?? 'a Web Worker (starts with training)');
  text(
    'threads',
    isolated ? `up to ${threads} (cross-origin isolated)` : '1 (the page is not cross-origin isolated: no wasm threads)',
  );
  const busy = running !== null;
  const blocked = state.phase === 'blocked';
  $('start').disabled = blocked || busy || loadingData || !current.data;
  $('stop').disabled = !busy;
  $('use-demo').disabled = blocked || busy || loadingData || !current.demoInfo;
  $('use-files').disabled = blocked || busy || loadingData || !($('images-file').files[0] && $('labels-file').files[0]);
  for (const id of ['demo-shard', 'demo-clients', 'images-file', 'labels-file']) $(id).disabled = blocked || busy || loadingData;
  text('data-summary', state.data ? `${state.data.n} examples · ${state.data.description}` : '');
  const log = $('log');
  for (const m of state.messages) {
    if (shown.has(m)) continue;
    shown.add(m);
    const li = document.createElement('li');
    li.className = m.level;
    li.textContent = `${clock(Date.parse(m.time))} ${m.text}`;
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

function showError(message) {
  state.alert = message;
  log(message, 'error');
}

// ---------------------------------------------------------------- data

function useData(data, source, description) {
  state.data = { source, n: data.n, labels: data.labels, description };
  current.data = data;
  text('data-status', `${data.n} examples, labels ${data.labels.join(' ')}: ${description}`);
  const banner = $('demo-banner');
  banner.hidden = source !== 'demo';
  banner.textContent = source === 'demo' ? `DEMO DATA served by the coordinator: ${description}. Not data from this device.` : '';
  state.alert = null;
  log(`data: ${data.n} examples from ${description}`);
  changed();
  if (params.get('autostart') === '1') start();
}

async function useFiles() {
  const images = $('images-file').files[0];
  const labels = $('labels-file').files[0];
  if (!images || !labels || running) return;
  loadingData = true;
  changed();
  try {
    const data = await loadMnist(images, labels);
    useData(data, 'files', `${images.name} and ${labels.name} on this device`);
  } catch (err) {
    showError(err instanceof DataError ? err.message : `cannot read the files: ${err.message}`);
  } finally {
    loadingData = false;
    changed();
  }
}

/** The demo shard the inputs name, or an error message for inputs that name none. */
function demoChoice() {
  const shard = Number($('demo-shard').value);
  const clients = Number($('demo-clients').value);
  if (!Number.isInteger(clients) || clients < 1) return { error: 'the number of shards must be a whole number, at least 1' };
  if (!Number.isInteger(shard) || shard < 0 || shard >= clients) {
    return { error: `the shard must be a whole number from 0 to ${clients - 1}` };
  }
  const query = new URLSearchParams({ shard: String(shard), clients: String(clients) });
  for (const key of DEMO_PARAMETERS) if (params.has(key)) query.set(key, params.get(key));
  return { shard, clients, query };
}

let infoAsked = 0;

/** GET /v1/demo-data/info for the inputs' shard: its size before any download. */
async function describeDemo() {
  const asked = ++infoAsked;
  current.demoInfo = null;
  const choice = demoChoice();
  if (choice.error) {
    text('demo-size', choice.error);
    changed();
    return null;
  }
  text('demo-size', `asking the coordinator for the size of shard ${choice.shard} of ${choice.clients}…`);
  changed();
  const api = new Coordinator({ storage: null, onRetry: retried });
  try {
    const info = checkMessage('DemoDataInfo', await api.json(`/v1/demo-data/info?${choice.query}`));
    if (asked !== infoAsked) return null; // the inputs changed meanwhile
    current.demoInfo = { ...info, query: choice.query };
    const kind = info.dtype === 'uint8' ? 'uint8 pixels' : 'float32';
    text('demo-size', `${info.examples} examples, ${formatBytes(info.bytes)} to download (${kind}), from ${info.source}`);
    $('use-demo').textContent = `Download demo shard ${info.shard} of ${info.clients} (${formatBytes(info.bytes)})`;
    state.alert = null;
    return current.demoInfo;
  } catch (err) {
    if (asked !== infoAsked) return null;
    text('demo-size', `the coordinator refuses this shard: ${err.message}`);
    $('use-demo').textContent = 'Download the demo shard';
    return null;
  } finally {
    changed();
  }
}

async function useDemo() {
  if (running || loadingData) return;
  const info = current.demoInfo ?? (await describeDemo());
  if (!info) {
    showError(`cannot load the demo data: ${$('demo-size').textContent}`);
    changed();
    return;
  }
  loadingData = true;
  changed();
  const api = new Coordinator({ storage: null, onRetry: retried });
  try {
    const { tensors, metadata } = await api.tensors(`/v1/demo-data?${info.query}`);
    const data = demoData(tensors, metadata);
    state.bytesReceived += api.bytesReceived;
    localStorage.setItem(DEMO_KEY, JSON.stringify({ shard: info.shard, clients: info.clients }));
    const split = [info.split, `seed ${info.seed}`].join(', ');
    useData(data, 'demo', `demo shard ${info.shard} of ${info.clients} (${split}) of ${info.source}`);
  } catch (err) {
    showError(`cannot load the demo data: ${err.message}`);
  } finally {
    loadingData = false;
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

/** A level's programs in the current worker (artifact bytes are downloaded once per page). */
function loadLevel(coordinator, manifestUrl) {
  if (!artifacts.has(manifestUrl)) {
    const loading = coordinator.artifact(manifestUrl).then((artifact) => {
      if (!artifact.checked) state.hashCheck = 'unavailable';
      const files = Object.keys(artifact.files).join(', ');
      log(`level ${artifact.manifest.level}: ${files} ${artifact.checked ? 'sha256-checked' : 'NOT checked (no crypto.subtle)'}`);
      return artifact;
    });
    artifacts.set(manifestUrl, loading);
    loading.catch(() => artifacts.delete(manifestUrl)); // a failed download is tried again
  }
  return artifacts.get(manifestUrl).then(({ manifest, files }) => current.trainer.level(manifestUrl, manifest, files));
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

/** A fresh training worker for a run; it ends when the run's signal aborts. */
async function startWorker(signal) {
  const trainer = new TrainerWorker(() => new Worker(new URL('train_worker.js', import.meta.url), { type: 'module' }), {
    signal,
  });
  const taken = await trainer.init(isolated ? threads : 1);
  current.runner = `a Web Worker, onnxruntime-web ${taken.version ?? ''} (wasm), ${taken.threads} thread(s)${
    taken.isolated ? '' : ' (the worker is not cross-origin isolated)'
  }`;
  return trainer;
}

let healthTimer = null;
let healthAsking = false;

/**
 * The coordinator's latest evaluation (GET /v1/health), for the status card. While training,
 * one try each time (the next poll is the retry); at start-up, retried until it answers.
 */
async function refreshHealth({ retry = false } = {}) {
  if (healthAsking) return null;
  healthAsking = true;
  const api = new Coordinator({ storage: null, onRetry: retried });
  try {
    const health = await api.health({ retry });
    state.evaluation = health.evaluation ?? null;
    changed();
    return health;
  } finally {
    healthAsking = false;
  }
}

function start() {
  if (running || !current.data || state.phase === 'blocked') return;
  controller = new AbortController();
  const signal = controller.signal;
  if (params.get('fresh') === '1' && !start.freshDone) {
    localStorage.removeItem(TOKEN_KEY);
    start.freshDone = true;
  }
  const coordinator = new Coordinator({ signal, onRetry: retried, enrollmentToken: localStorage.getItem(ENROLL_KEY) });
  coordinator.bytesReceived = state.bytesReceived; // totals go on from the page's earlier calls
  coordinator.bytesSent = state.bytesSent;
  client = new DeviceClient({
    coordinator,
    loadLevel: (url) => loadLevel(coordinator, url),
    data: current.data,
    state,
    changed,
    sleep,
    signal,
    // the worker's instances (keys never reach the page); the worker starts before the run
    secagg: {
      answer: (task) => current.trainer.secagg.answer(task),
      maskTraining: (...args) => current.trainer.secagg.maskTraining(...args),
      maskStatistics: (...args) => current.trainer.secagg.maskStatistics(...args),
    },
    device: {
      memoryMb: navigator.deviceMemory ? navigator.deviceMemory * 1024 : undefined,
      bandwidthMbps: navigator.connection?.downlink || undefined,
    },
  });
  $('data-section').open = false;
  let wakeLock = null; // keeps a phone's screen on while it trains (secure contexts only)
  navigator.wakeLock
    ?.request('screen')
    .then((lock) => {
      wakeLock = lock;
    })
    .catch(() => {}); // refused: the screen may sleep and the browser may pause the page
  healthTimer = setInterval(() => refreshHealth().catch(() => {}), HEALTH_MS);
  state.alert = null;
  state.phase = 'starting';
  running = startWorker(signal)
    .then((trainer) => {
      current.trainer = trainer;
      return client.run();
    })
    .catch((err) => {
      state.phase = 'stopped';
      if (signal.aborted) {
        state.alert = null;
        log('stopped by the user');
      } else if (err.name === 'FatalError') {
        state.alert = err.message;
      } else {
        showError(`stopped by an unexpected error: ${err.message}`);
      }
    })
    .finally(() => {
      current.trainer?.terminate();
      current.trainer = null;
      running = null;
      clearInterval(healthTimer);
      refreshHealth().catch(() => {});
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
  describeDemo,
  /** The exact bytes (safetensors) of the last upload of a kind: 'train' or 'statistics'. */
  lastUploadBody: (kind = 'train') => client?.uploadBodies[kind] ?? null,
  /** The training data in use: {pixels + normalise | x, y: BigInt64Array, n, shape, labels}. */
  data: () => current.data,
  running: () => running,
  sha256Hex,
};

/** Not a secure context: say what is wrong and how to fix it; start nothing. */
function block() {
  state.phase = 'blocked';
  state.alert =
    `This page is not a secure context (${location.protocol}//${location.host} is plain HTTP from another ` +
    'machine), so the browser withholds what a device needs (artifact hashes, wasm threads, a wake lock). ' +
    'Nothing was started. Fix: start the coordinator with --tls-cert and --tls-key ' +
    `(README, "Train on a phone") and open https://${location.host}/device/ instead.`;
  log(state.alert, 'error');
  text('environment', 'not a secure context: nothing started');
  changed();
}

function initDemoInputs() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(DEMO_KEY) ?? '{}') ?? {};
  } catch {
    saved = {};
  }
  $('demo-shard').value = params.get('shard') ?? String(saved.shard ?? 0);
  $('demo-clients').value = params.get('clients') ?? String(saved.clients ?? 100);
  let timer = null;
  for (const id of ['demo-shard', 'demo-clients']) {
    $(id).addEventListener('input', () => {
      current.demoInfo = null;
      changed();
      clearTimeout(timer);
      timer = setTimeout(describeDemo, 300);
    });
  }
}

async function init() {
  if (!secure) {
    block();
    return;
  }
  takeEnrollment();
  for (const id of ['images-file', 'labels-file']) $(id).addEventListener('change', changed);
  $('use-files').addEventListener('click', useFiles);
  $('use-demo').addEventListener('click', useDemo);
  $('start').addEventListener('click', start);
  $('stop').addEventListener('click', stop);
  initDemoInputs();
  text('environment', `secure context · ${isolated ? 'cross-origin isolated' : 'not cross-origin isolated'}`);
  changed();
  try {
    const health = await refreshHealth({ retry: true });
    state.alert = null;
    log(`coordinator: model ${health.model}, mode ${health.mode}${health.demo_data ? ', demo data offered' : ''}`);
    if (health.demo_data) {
      $('demo-choice').hidden = false;
      const info = await describeDemo();
      if (params.get('data') === 'demo') {
        if (info) await useDemo();
        else showError(`cannot load the demo data: ${$('demo-size').textContent}`);
      }
    } else if (params.get('data') === 'demo') {
      showError('cannot load the demo data: this coordinator serves none (start it with --demo-data DIR)');
    }
  } catch (err) {
    showError(`cannot reach the coordinator: ${err.message}`);
  }
  changed();
}

init();
