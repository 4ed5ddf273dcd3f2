// The training worker's side of its message protocol: a thin layer around trainer.js.
//
// The page (remote_level.js) posts requests {id, op, ...}; the host answers each with
// {id, ok: true, result} or {id, ok: false, error: {name, message}}, and posts
// {id, progress} while it runs (one per training step, one per statistics batch).
// Requests run one at a time, in the order they arrive.
//
//   init        {threads}                       -> {threads, isolated, version}  (before any level)
//   level       {key, manifest, files}          -> {}         (creates the sessions once per key)
//   data        {key, data}                     -> {n}        (uint8 pixels are standardised here)
//   train       {level, data, weights: [[name, Float32Array]], labels, lr, epochs, batchSize, seed}
//                                               -> {weights: [[name, Float32Array]], numExamples,
//                                                   steps, loss, accuracy};  progress {epoch, step,
//                                                   stepsPerEpoch, loss, at (the worker's clock, ms)}
//   statistics  {level, data, weights}          -> {tensors: [[name, {dtype, shape, data}]]};
//                                                   progress {batch, batches}
//   profile     {level, data, warmup, steps}    -> {stepMs}
//   secagg      {method, args}                  -> what SecAggDevice's `method` (answer,
//                                                   maskTraining, maskStatistics) gives for
//                                                   `args`: secure aggregation's keys stay here
//
// `ort` and `post` are passed in, so node's tests run the host with a stand-in runtime.

import { materialise } from './data.js';
import { SecAggDevice } from './secagg_device.js';
import { OnnxLevel } from './trainer.js';

/** The distinct, transferable buffers under typed arrays (never a wasm or shared memory). */
export function transferables(arrays) {
  const buffers = new Set();
  for (const a of arrays) {
    const buffer = a?.buffer;
    if (buffer instanceof ArrayBuffer && buffer.byteLength === a.byteLength) buffers.add(buffer);
  }
  return [...buffers];
}

export class WorkerHost {
  /**
   * @param {object} ort onnxruntime-web (or a stand-in)
   * @param {(message: object, transfer?: Transferable[]) => void} post
   * @param {SecAggDevice} [secagg] the secure aggregation instances (fresh keys by default)
   */
  constructor(ort, post, secagg = new SecAggDevice()) {
    this.ort = ort;
    this.post = post;
    this.levels = new Map();
    this.datasets = new Map();
    this.secagg = secagg;
    this.queue = Promise.resolve();
  }

  /** Queue one request; its answer is posted when it has run. */
  handle(message) {
    this.queue = this.queue.then(() => this._run(message));
    return this.queue;
  }

  async _run({ id, op, ...args }) {
    try {
      const method = OPERATIONS[op];
      if (!method) throw new Error(`the training worker has no operation ${JSON.stringify(op)}`);
      const [result, transfer] = await method.call(this, args, (progress) => this.post({ id, progress }));
      this.post({ id, ok: true, result }, transfer ?? []);
    } catch (err) {
      this.post({ id, ok: false, error: { name: err?.name ?? 'Error', message: err?.message ?? String(err) } });
    }
  }

  _level(key) {
    const level = this.levels.get(key);
    if (!level) throw new Error(`the training worker has no level ${key}`);
    return level;
  }

  _data(key) {
    const data = this.datasets.get(key);
    if (!data) throw new Error(`the training worker has no data ${key}`);
    return data;
  }
}

const OPERATIONS = {
  async init({ threads }) {
    const wasm = this.ort.env?.wasm;
    const isolated = globalThis.crossOriginIsolated === true;
    if (wasm) wasm.numThreads = isolated ? threads : 1; // wasm threads need isolation here too
    return [{ threads: wasm?.numThreads ?? 1, isolated, version: this.ort.env?.versions?.web ?? null }];
  },

  async level({ key, manifest, files }) {
    if (!this.levels.has(key)) this.levels.set(key, await OnnxLevel.create(this.ort, manifest, files));
    return [{}];
  },

  async data({ key, data }) {
    const ready = materialise(data);
    this.datasets.set(key, ready);
    return [{ n: ready.n }];
  },

  async train({ level, data, weights, labels, lr, epochs, batchSize, seed }, progress) {
    const result = await this._level(level).train({
      weights: new Map(weights),
      data: this._data(data),
      labels,
      lr,
      epochs,
      batchSize,
      seed,
      onStep: (step) => progress({ ...step, at: performance.now() }),
    });
    const trained = [...result.weights];
    return [{ ...result, weights: trained }, transferables(trained.map(([, w]) => w))];
  },

  async statistics({ level, data, weights }, progress) {
    const stats = await this._level(level).statistics(new Map(weights), this._data(data), undefined, progress);
    const tensors = [...stats];
    return [{ tensors }, transferables(tensors.map(([, t]) => t.data))];
  },

  async profile({ level, data, warmup, steps }) {
    return [{ stepMs: await this._level(level).profile(this._data(data), { warmup, steps }) }];
  },

  async secagg({ method, args }) {
    if (!SECAGG_METHODS.has(method)) throw new Error(`secure aggregation has no operation ${JSON.stringify(method)}`);
    const result = await this.secagg[method](...args);
    return [result, result instanceof Uint32Array ? transferables([result]) : []];
  },
};

/** What the page may ask of the worker's SecAggDevice. */
export const SECAGG_METHODS = new Set(['answer', 'maskTraining', 'maskStatistics']);
