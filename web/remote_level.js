// The page's side of the training worker (train_worker.js, protocol in worker_host.js).
//
// TrainerWorker owns one worker; level() gives a RemoteLevel with the trainer's interface
// (manifest, mismatchedHyperparameters, train, statistics, profile), so the device loop
// (client.js) cannot tell it from an in-page OnnxLevel. Training data is posted to the
// worker once (compact: uint8 pixels are standardised there).
//
// Stop: when the run's AbortSignal fires, the worker is terminated at once (mid-step) and
// every pending call rejects with the signal's reason; a TrainerWorker is not reused after
// that, nor after the worker failed (its `dead` is set): make a fresh one.

import { mismatchedHyperparameters } from './trainer.js';

export class WorkerError extends Error {
  constructor(message) {
    super(message);
    this.name = 'WorkerError';
  }
}

export class TrainerWorker {
  /**
   * @param {() => {postMessage: Function, terminate: Function, onmessage: any, onerror: any}} create
   *   makes the worker: () => new Worker('train_worker.js', {type: 'module'}) on the page
   * @param {{signal?: AbortSignal}} [options]
   */
  constructor(create, options = {}) {
    this.worker = create();
    this.signal = options.signal;
    this.pending = new Map(); // id -> {resolve, reject, onProgress}
    this.nextId = 1;
    this.dead = null; // why the worker is gone (an Error), once it is
    this.levels = new Map(); // key -> Promise<RemoteLevel>
    this.dataKeys = new WeakMap(); // data object -> key in the worker
    this.worker.onmessage = (event) => this._receive(event.data);
    this.worker.onerror = (event) => {
      event?.preventDefault?.();
      this._fail(new WorkerError(`the training worker failed: ${event?.message ?? 'unknown error'}`));
    };
    this.worker.onmessageerror = () => this._fail(new WorkerError('the training worker sent an unreadable message'));
    this._onAbort = () => this._fail(this.signal.reason, true);
    this.signal?.addEventListener('abort', this._onAbort, { once: true });
    if (this.signal?.aborted) this._onAbort();
  }

  _receive({ id, ok, result, error, progress }) {
    const call = this.pending.get(id);
    if (!call) return;
    if (progress !== undefined) {
      call.onProgress?.(progress);
      return;
    }
    this.pending.delete(id);
    if (ok) call.resolve(result);
    else {
      const err = new Error(error?.message ?? 'the training worker failed');
      err.name = error?.name ?? 'Error';
      call.reject(err);
    }
  }

  _fail(reason, terminate = true) {
    if (this.dead) return;
    this.dead = reason;
    if (terminate) this.worker.terminate();
    this.signal?.removeEventListener('abort', this._onAbort);
    for (const call of this.pending.values()) call.reject(reason);
    this.pending.clear();
  }

  /** End the worker now; pending calls reject with `reason`. */
  terminate(reason = new WorkerError('the training worker was stopped')) {
    this._fail(reason);
  }

  /**
   * One request; resolves with its result.
   * @param {string} op
   * @param {object} args
   * @param {{onProgress?: (p: object) => void, transfer?: Transferable[]}} [options]
   */
  call(op, args, { onProgress, transfer } = {}) {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, onProgress });
      try {
        this.worker.postMessage({ id, op, ...args }, transfer ?? []);
      } catch (err) {
        this.pending.delete(id);
        reject(err);
      }
    });
  }

  /**
   * Set wasm threads in the worker (before any level).
   * @returns {Promise<{threads: number, isolated: boolean, version: string | null}>}
   */
  init(threads) {
    return this.call('init', { threads });
  }

  /**
   * A level's programs in the worker, created once per key (the manifest URL).
   * @param {string} key
   * @param {object} manifest
   * @param {Record<string, Uint8Array>} files
   * @returns {Promise<RemoteLevel>}
   */
  level(key, manifest, files) {
    if (!this.levels.has(key)) {
      const made = this.call('level', { key, manifest, files }).then(() => new RemoteLevel(this, key, manifest));
      this.levels.set(key, made);
      made.catch(() => this.levels.delete(key));
    }
    return this.levels.get(key);
  }

  /**
   * Secure aggregation in the worker: the same methods as secagg_device.js SecAggDevice
   * (answer, maskTraining, maskStatistics), whose instances and keys live there.
   */
  get secagg() {
    const call = (method) => (...args) => this.call('secagg', { method, args });
    return { answer: call('answer'), maskTraining: call('maskTraining'), maskStatistics: call('maskStatistics') };
  }

  /** The worker's key for `data`, posting it the first time. */
  async dataKey(data) {
    let key = this.dataKeys.get(data);
    if (!key) {
      key = `data-${this.nextId}`;
      this.dataKeys.set(data, key);
      try {
        await this.call('data', { key, data });
      } catch (err) {
        this.dataKeys.delete(data);
        throw err;
      }
    }
    return key;
  }
}

/** A level whose sessions live in the worker; the same interface as trainer.js OnnxLevel. */
export class RemoteLevel {
  constructor(worker, key, manifest) {
    this.worker = worker;
    this.key = key;
    this.manifest = manifest;
  }

  mismatchedHyperparameters(task) {
    return mismatchedHyperparameters(this.manifest, task);
  }

  /** As OnnxLevel.train; onStep is called (not awaited) for every step the worker reports. */
  async train({ weights, data, labels, lr, epochs, batchSize, seed, onStep, signal }) {
    signal?.throwIfAborted();
    const dataKey = await this.worker.dataKey(data);
    const result = await this.worker.call(
      'train',
      { level: this.key, data: dataKey, weights: plain(weights), labels, lr, epochs, batchSize, seed },
      { onProgress: onStep },
    );
    return { ...result, weights: new Map(result.weights) };
  }

  /** As OnnxLevel.statistics; onBatch is called for every batch the worker reports. */
  async statistics(weights, data, signal, onBatch) {
    signal?.throwIfAborted();
    const dataKey = await this.worker.dataKey(data);
    const { tensors } = await this.worker.call(
      'statistics',
      { level: this.key, data: dataKey, weights: plain(weights) },
      { onProgress: onBatch },
    );
    return new Map(tensors);
  }

  /** Median ms per step in the worker (trainer.js profileStepMs). */
  async profile(data, options = {}) {
    const dataKey = await this.worker.dataKey(data);
    const { stepMs } = await this.worker.call('profile', { level: this.key, data: dataKey, ...options });
    return stepMs;
  }
}

/** [[name, Float32Array]] from a Map of arrays or {data} (what structured clone carries). */
function plain(weights) {
  return [...weights].map(([name, w]) => [name, w?.data ?? w]);
}
