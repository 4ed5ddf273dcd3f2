// Local training on a level's ONNX programs, as device_sim/onnx_backend.py OnnxLevel does.
//
// train: E epochs of train_step.onnx (SGD with momentum, weight decay, clipping and the
// masked loss are inside the graph, as the manifest's hyperparameters say); momentum
// buffers start at zero every session; batches from shuffle.js (the same order as Python).
// statistics: statistics.onnx over consecutive batches of 500, per-batch moments merged
// exactly (Chan et al.) in float64, uploaded as float32 LAYER.count / .mean / .var.
//
// The onnxruntime module is passed in (`ort`), so the same code runs on onnxruntime-web
// in the page and in node's tests.

import { epochBatches, statsBatches } from './shuffle.js';

export const PROFILE_STEPS = 9; // timed steps; the profile is their median
export const PROFILE_WARMUP = 100; // untimed steps first: V8 tiers WebAssembly up after ~70-100 steps (measured in Chromium)
export const STATS_BATCH = 500;

export class TrainingError extends Error {
  constructor(message) {
    super(message);
    this.name = 'TrainingError';
  }
}

function product(dims) {
  return dims.reduce((a, b) => a * b, 1);
}

/**
 * The rows `indices` of a row-major array with `rowSize` values per row.
 * @template {Float32Array | BigInt64Array} T
 * @param {T} data
 * @param {ArrayLike<number>} indices
 * @param {number} rowSize
 * @returns {T}
 */
function gather(data, indices, rowSize) {
  const out = new data.constructor(indices.length * rowSize);
  for (let k = 0; k < indices.length; k++) {
    const at = indices[k] * rowSize;
    out.set(data.subarray(at, at + rowSize), k * rowSize);
  }
  return out;
}

/**
 * (count, mean, biased var) of the union of two disjoint sets, in float64
 * (the same operations, in the same order, as device_sim/onnx_backend.py merge_moments).
 */
export function mergeMoments([na, ma, va], [nb, mb, vb]) {
  const n = na + nb;
  const wb = nb / n;
  const wab = (na * nb) / n;
  const mean = new Float64Array(ma.length);
  const variance = new Float64Array(ma.length);
  for (let i = 0; i < ma.length; i++) {
    const delta = mb[i] - ma[i];
    mean[i] = ma[i] + delta * wb;
    variance[i] = (va[i] * na + vb[i] * nb + delta * delta * wab) / n;
  }
  return [n, mean, variance];
}

/**
 * Merge per-batch statistics into the upload's tensors.
 * @param {string[]} layers the manifest's bn_layers
 * @param {Iterable<[number, Array<{data: Float32Array, dims: number[]}>]>} reports
 *   (examples in the batch, [mean_1, var_1, ..., mean_L, var_L])
 * @returns {Map<string, {dtype: 'F32', shape: number[], data: Float32Array}>}
 */
export function mergeBatchStatistics(layers, reports) {
  const merged = new Map();
  const shapes = new Map();
  for (const [examples, out] of reports) {
    layers.forEach((layer, i) => {
      const moments = [examples, Float64Array.from(out[2 * i].data), Float64Array.from(out[2 * i + 1].data)];
      merged.set(layer, merged.has(layer) ? mergeMoments(merged.get(layer), moments) : moments);
      shapes.set(layer, out[2 * i].dims);
    });
  }
  const result = new Map();
  for (const [layer, [count, mean, variance]] of merged) {
    const shape = [...shapes.get(layer)];
    result.set(`${layer}.count`, { dtype: 'F32', shape: [], data: Float32Array.of(count) });
    result.set(`${layer}.mean`, { dtype: 'F32', shape, data: Float32Array.from(mean) });
    result.set(`${layer}.var`, { dtype: 'F32', shape: [...shape], data: Float32Array.from(variance) });
  }
  return result;
}

/**
 * Training data: x row-major [n, ...sample], y int64 [n], the labels held.
 * @typedef {{x: Float32Array, y: BigInt64Array, n: number, shape: number[], labels: number[]}} Data
 */

export class OnnxLevel {
  /**
   * @param {object} ort the onnxruntime module (onnxruntime-web or onnxruntime-node)
   * @param {object} manifest the level's manifest.json
   * @param {Record<string, object>} sessions InferenceSessions by program: train_step, statistics
   */
  constructor(ort, manifest, sessions) {
    this.ort = ort;
    this.manifest = manifest;
    this.sessions = sessions;
    this.paramNames = manifest.parameters.map((p) => p.name);
    this.shapes = new Map(manifest.parameters.map((p) => [p.name, p.shape]));
    this.numClasses = Number(manifest.num_classes);
    this.sampleShape = manifest.input.shape.slice(1);
  }

  /**
   * Create the sessions of the programs the device runs from their bytes.
   * @param {Record<string, Uint8Array>} files by path in the manifest ("onnx/train_step.onnx")
   */
  static async create(ort, manifest, files, options = {}) {
    const sessions = {};
    for (const program of ['train_step', 'statistics']) {
      const entry = manifest.programs?.onnx?.[program];
      if (entry && files[entry.file]) {
        sessions[program] = await ort.InferenceSession.create(files[entry.file], {
          executionProviders: ['wasm'],
          graphOptimizationLevel: 'all',
          ...options,
        });
      }
    }
    return new OnnxLevel(ort, manifest, sessions);
  }

  /** The artifact's built-in hyperparameters that differ from the task's (names). */
  mismatchedHyperparameters(task) {
    return mismatchedHyperparameters(this.manifest, task);
  }

  /** Milliseconds per training step on `data` (profileStepMs). */
  profile(data, options) {
    return profileStepMs(this, data, options);
  }

  labelMask(labels) {
    const mask = new Float32Array(this.numClasses);
    if (labels === null || labels === undefined) mask.fill(1);
    else for (const l of labels) mask[l] = 1;
    return mask;
  }

  _session(program) {
    const session = this.sessions[program];
    if (!session) throw new TrainingError(`the level has no ${program} program loaded`);
    return session;
  }

  _checkData(data) {
    const sample = data.shape.slice(1);
    if (sample.length !== this.sampleShape.length || sample.some((d, i) => d !== this.sampleShape[i])) {
      throw new TrainingError(
        `data of shape ${JSON.stringify(sample)} per example does not fit the model's ${JSON.stringify(this.sampleShape)}`,
      );
    }
    if (data.x.length !== data.n * product(sample) || data.y.length !== data.n) {
      throw new TrainingError('data arrays do not hold n examples');
    }
    return product(sample);
  }

  _weight(weights, name) {
    const w = weights.get(name);
    const data = w?.data ?? w;
    if (!(data instanceof Float32Array) || data.length !== product(this.shapes.get(name))) {
      throw new TrainingError(`weight ${name} is missing or does not fit ${JSON.stringify(this.shapes.get(name))}`);
    }
    return data;
  }

  /**
   * E local epochs from `weights`; returns the updated weights and the session's metrics.
   * @param {object} args
   * @param {Map<string, Float32Array | {data: Float32Array}>} args.weights by parameter name
   * @param {Data} args.data
   * @param {number[]} args.labels the labels this device holds (the label mask)
   * @param {number} args.lr
   * @param {number} args.epochs
   * @param {number} args.batchSize
   * @param {number} args.seed in [0, 2**32)
   * @param {(p: {epoch: number, step: number, stepsPerEpoch: number, loss: number}) => any} [args.onStep]
   *   awaited after each step (the page updates itself and lets the browser draw)
   * @param {AbortSignal} [args.signal] stops between steps
   * @returns {Promise<{weights: Map<string, Float32Array>, numExamples: number, steps: number,
   *                    loss: number, accuracy: number}>}
   */
  async train({ weights, data, labels, lr, epochs, batchSize, seed, onStep, signal }) {
    const { Tensor } = this.ort;
    const session = this._session('train_step');
    const rowSize = this._checkData(data);
    let params = this.paramNames.map((n) => this._weight(weights, n));
    let momenta = params.map((p) => new Float32Array(p.length));
    const mask = new Tensor('float32', this.labelMask(labels), [this.numClasses]);
    const rate = new Tensor('float32', Float32Array.of(lr), []);
    const stepsPerEpoch = Math.ceil(data.n / batchSize);
    let steps = 0;
    let lossSum = 0;
    let correct = 0;
    for (const batch of epochBatches(data.n, epochs, batchSize, seed)) {
      signal?.throwIfAborted();
      const feeds = { label_mask: mask, lr: rate };
      this.paramNames.forEach((name, i) => {
        const dims = this.shapes.get(name);
        feeds[`param.${name}`] = new Tensor('float32', params[i], dims);
        feeds[`momentum.${name}`] = new Tensor('float32', momenta[i], dims);
      });
      feeds.x = new Tensor('float32', gather(data.x, batch, rowSize), [batch.length, ...this.sampleShape]);
      feeds.y = new Tensor('int64', gather(data.y, batch, 1), [batch.length]);
      const out = await session.run(feeds);
      params = this.paramNames.map((n) => out[`updated.param.${n}`].data);
      momenta = this.paramNames.map((n) => out[`updated.momentum.${n}`].data);
      const loss = out.loss.data[0];
      steps += 1;
      lossSum += loss * batch.length;
      correct += Number(out.correct.data[0]);
      if (onStep) {
        await onStep({
          epoch: Math.floor((steps - 1) / stepsPerEpoch) + 1,
          step: steps,
          stepsPerEpoch,
          loss,
        });
      }
    }
    const seen = Math.max(1, steps && data.n * epochs);
    return {
      weights: new Map(this.paramNames.map((n, i) => [n, params[i]])),
      numExamples: data.n,
      steps,
      loss: lossSum / seen,
      accuracy: correct / seen,
    };
  }

  /**
   * LAYER.count / .mean / .var for every sBN layer over all of the data.
   * @param {Map<string, Float32Array | {data: Float32Array}>} weights
   * @param {Data} data
   * @param {AbortSignal} [signal]
   * @param {(p: {batch: number, batches: number}) => any} [onBatch] awaited after each batch
   */
  async statistics(weights, data, signal, onBatch) {
    const { Tensor } = this.ort;
    const session = this._session('statistics');
    const rowSize = this._checkData(data);
    const outputs = this.manifest.bn_layers.flatMap((l) => [`mean.${l}`, `var.${l}`]);
    const params = {};
    for (const name of this.paramNames) {
      params[`param.${name}`] = new Tensor('float32', this._weight(weights, name), this.shapes.get(name));
    }
    const reports = [];
    const batches = [...statsBatches(data.n, STATS_BATCH)];
    for (const [start, end] of batches) {
      signal?.throwIfAborted();
      const x = new Tensor('float32', data.x.subarray(start * rowSize, end * rowSize), [end - start, ...this.sampleShape]);
      const out = await session.run({ ...params, x });
      reports.push([end - start, outputs.map((name) => out[name])]);
      if (onBatch) await onBatch({ batch: reports.length, batches: batches.length });
    }
    return mergeBatchStatistics(this.manifest.bn_layers, reports);
  }
}

/**
 * The artifact's built-in hyperparameters that differ from the task's (names).
 * @param {object} manifest
 * @param {Record<string, unknown>} task the task's hyperparameters
 */
export function mismatchedHyperparameters(manifest, task) {
  const built = manifest.hyperparameters ?? {};
  return ['momentum', 'weight_decay', 'clip_grad_norm'].filter(
    (k) => k in task && k in built && Math.abs(Number(task[k]) - Number(built[k])) > 1e-12,
  );
}

/** The median of numbers (the mean of the middle two for an even count). */
export function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/**
 * Milliseconds per training step of `level`: the median of `steps` single steps from zero
 * weights at learning rate 0 on the first min(10, n) examples, after `warmup` untimed ones,
 * all in one session as a device trains. The warm-up matters in browsers: V8 first runs
 * WebAssembly from its baseline compiler and tiers up to optimised code while it runs, so
 * the first steps take several times as long as the steady ones; the median keeps one
 * stray slow step (a collection, another tab) out of the figure.
 * @param {OnnxLevel} level the reference (smallest) level in play
 * @param {Data} data
 * @param {{warmup?: number, steps?: number, now?: () => number}} [options]
 * @returns {Promise<number>}
 */
export async function profileStepMs(level, data, options = {}) {
  const warmup = options.warmup ?? PROFILE_WARMUP;
  const steps = options.steps ?? PROFILE_STEPS;
  const now = options.now ?? (() => performance.now());
  const batch = Math.min(10, data.n);
  const rowSize = product(data.shape.slice(1));
  const head = {
    x: data.x.subarray(0, batch * rowSize),
    y: data.y.subarray(0, batch),
    n: batch,
    shape: [batch, ...data.shape.slice(1)],
  };
  const weights = new Map(level.manifest.parameters.map((p) => [p.name, new Float32Array(product(p.shape))]));
  const stamps = [];
  const start = now();
  // One epoch of one batch per step: `warmup + steps` steps in one session.
  await level.train({
    weights,
    data: head,
    labels: data.labels,
    lr: 0,
    epochs: warmup + steps,
    batchSize: batch,
    seed: 0,
    onStep: () => {
      stamps.push(now());
    },
  });
  const times = stamps.map((t, i) => t - (i ? stamps[i - 1] : start));
  return median(times.slice(warmup));
}
