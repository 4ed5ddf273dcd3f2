// One browser device's life, without the DOM: profile, register, then do what the
// coordinator asks until it says done or the user stops (device_sim/device.py's loop).
//
// Nothing stops silently: every failure is logged with its message and the loop goes on
// after a backoff (FIRST_DELAY_MS doubling to MAX_DELAY_MS). Decisions read an ApiError's
// `code` only: unknown_token -> register again; round_closed -> take the next task;
// enrollment_required / bad_enrollment_token -> stop with what to do (no retry cures them).
// Nothing corrupt is uploaded: artifacts are sha256-checked where the browser can hash,
// weights are checked against the manifest, and non-finite results are not sent.
//
// Transport (encoding.js): weights arrive in the task's download_encoding and are decoded to
// float32; a training result goes up as the task's upload_encoding says: the trained weights
// (fp32) or the update, with the error-feedback residual kept per level.
//
// Secure aggregation (secagg_device.js, as device_sim/device.py): the page registers with
// `secure_aggregation: true`, answers each `secagg` stage (advertise, share, unmask) at the
// task's answer_url, and a training or statistics task that carries `secure` uploads one
// tensor `masked` (uint32, or uint16 for an int8 run) and nothing else (no labels, metrics or
// example count). On the page
// the instances and the masking live in the training worker (`secagg`: remote_level.js).
// What the protocol refuses (no keys for a context after a reload, say) is logged and
// nothing is sent, as the Python device does; the device is then out of that instance: the
// coordinator asks again until the stage closes, and each time it waits `pollSeconds`
// (the registration's poll_seconds) instead of answering, training or masking again.
//
// Liveness: while it works on a task (loading the artifact, training, statistics,
// uploading) the device POSTs /v1/heartbeat every `heartbeat_seconds`, from the
// registration reply or, for a device resuming with a stored token, the task reply
// (DEFAULT_HEARTBEAT_SECONDS until one says). A failed beat is logged once and work goes on.

import {
  ApiError,
  Codes,
  FATAL_CODES,
  FIRST_DELAY_MS,
  IntegrityError,
  MAX_DELAY_MS,
  referenceLevel,
  TASK_GONE_CODES,
} from './protocol.js';
import { addDistributedNoise } from './dp_noise.js';
import { UpdateEncoder, decodeTensors } from './encoding.js';
import { SecAggDevice } from './secagg_device.js';
import { STATS_BATCH } from './trainer.js';

export const DEFAULT_MEMORY_MB = 2048;
export const MIN_BANDWIDTH_MBPS = 1;
export const DEFAULT_HEARTBEAT_SECONDS = 5;
export const DEFAULT_POLL_SECONDS = 2;
export const ENROLLMENT_MESSAGE =
  'This coordinator needs the device link printed at its start-up: open that link ' +
  '(it ends in #enroll=…) on this device, then start again.';

/** A failure no retry cures (the coordinator refuses this device as it is): the run stops. */
export class FatalError extends Error {
  constructor(message, cause) {
    super(message, { cause });
    this.name = 'FatalError';
  }
}

/** Everything the page shows and tests read (window.heterofl.state). */
export function initialState() {
  return {
    phase: 'idle', // idle | starting | profiling | registering | polling | waiting | training | statistics | secagg | uploading | backoff | stopped | done
    deviceId: null,
    level: null,
    rate: null,
    round: null,
    epoch: null,
    epochs: null,
    step: null,
    stepsPerEpoch: null,
    trainStartedAt: null, // Date.now() at the first finished step of the current session
    stepAt: null, // Date.now() at the last finished step
    statsBatch: null, // statistics: batches done of statsBatches (set once the computation starts)
    statsBatches: null,
    deadline: null, // the task's deadline, seconds since the epoch (coordinator's clock)
    loss: null,
    accuracy: null,
    uploads: 0,
    statisticsUploads: 0,
    secaggAnswers: 0, // secure aggregation stages answered
    lastUpload: null, // the last training upload: {round, level, seed, loss, accuracy, steps, bytes, encoding, masked}
    lastStatistics: null, // the last statistics upload: {round, level}
    bytesSent: 0,
    bytesReceived: 0,
    hashCheck: null, // 'sha256' | 'unavailable' (no crypto.subtle: plain HTTP off localhost)
    stepMs: null,
    heartbeats: 0, // heartbeats the coordinator acknowledged
    evaluation: null, // the coordinator's last evaluation: {round, global_accuracy, ...}
    alert: null,
    data: null, // {source: 'files' | 'demo', n, labels, description}
    messages: [],
  };
}

export const KEPT_MESSAGES = 200;

/** Append a log line to state.messages, keeping the last KEPT_MESSAGES. */
export function addMessage(state, text, level = 'info') {
  state.messages.push({ time: new Date().toISOString(), level, text });
  if (state.messages.length > KEPT_MESSAGES) state.messages.splice(0, state.messages.length - KEPT_MESSAGES);
}

function finite(map) {
  for (const value of map.values()) {
    const data = value.data ?? value;
    for (let i = 0; i < data.length; i++) if (!Number.isFinite(data[i])) return false;
  }
  return true;
}

export class DeviceClient {
  /**
   * @param {object} options
   * @param {import('./protocol.js').Coordinator} options.coordinator
   * @param {(manifestUrl: string) => Promise<import('./trainer.js').OnnxLevel>} options.loadLevel
   *   a level's programs, downloaded (and checked) through the coordinator; cached by the caller
   * @param {import('./trainer.js').Data} options.data
   * @param {object} options.state initialState(), updated in place
   * @param {() => void} [options.changed] called after every state change
   * @param {(ms: number, signal?: AbortSignal) => Promise<void>} options.sleep
   * @param {AbortSignal} options.signal
   * @param {() => Promise<void>} [options.breathe] awaited now and then while training
   * @param {{memoryMb?: number, bandwidthMbps?: number}} [options.device]
   * @param {{setInterval: typeof setInterval, clearInterval: typeof clearInterval}} [options.timers]
   *   the heartbeat's clock (a fake one in tests)
   * @param {{answer: Function, maskTraining: Function, maskStatistics: Function}} [options.secagg]
   *   secure aggregation's instances (secagg_device.js SecAggDevice; on the page, the worker's)
   */
  constructor(options) {
    Object.assign(this, options);
    this.changed = options.changed ?? (() => {});
    this.breathe = options.breathe ?? (async () => {});
    this.device = options.device ?? {};
    this.timers = options.timers ?? globalThis;
    this.secagg = options.secagg ?? new SecAggDevice();
    this.heartbeatSeconds = DEFAULT_HEARTBEAT_SECONDS;
    this.pollSeconds = DEFAULT_POLL_SECONDS;
    this.skippedInstances = new Set(); // secure aggregation contexts this device is out of
    this.profile = null;
    /** The exact bytes of the last upload of each kind ('train', 'statistics'), for tests. */
    this.uploadBodies = {};
    this.unknownActions = new Set(); // actions of a newer coordinator, each logged once
    this.encoder = new UpdateEncoder(); // lossy uploads and their error-feedback residual
    this.notes = new Set(); // encoding fallbacks the coordinator told, each logged once
  }

  /** Log once that the coordinator replaced an encoding this page did not declare. */
  note(task) {
    if (task.encoding_note && !this.notes.has(task.encoding_note)) {
      this.notes.add(task.encoding_note);
      this.log(`round ${task.round}: ${task.encoding_note}`, 'warn');
    }
  }

  log(text, level = 'info') {
    addMessage(this.state, text, level);
    this.changed();
  }

  set(fields) {
    Object.assign(this.state, fields, {
      bytesSent: this.coordinator.bytesSent,
      bytesReceived: this.coordinator.bytesReceived,
    });
    this.changed();
  }

  /** Time a few steps of the smallest level in play (the reference artifact). */
  async measure() {
    const health = await this.coordinator.health();
    const reference = health.reference_level
      ? { label: String(health.reference_level), rate: Number(health.reference_rate) }
      : referenceLevel(health.mode);
    this.set({ phase: 'profiling' });
    const received = this.coordinator.bytesReceived;
    const started = performance.now();
    const level = await this.loadLevel(`/v1/artifacts/${health.model}/${reference.label}/manifest.json`);
    const seconds = Math.max((performance.now() - started) / 1000, 1e-3);
    const measured = ((this.coordinator.bytesReceived - received) * 8) / seconds / 1e6;
    const stepMs = await level.profile(this.data);
    this.profile = {
      step_ms: Math.max(stepMs, 1e-3),
      reference_rate: reference.rate,
      memory_mb: this.device.memoryMb ?? DEFAULT_MEMORY_MB,
      bandwidth_mbps: this.device.bandwidthMbps ?? Math.max(MIN_BANDWIDTH_MBPS, measured),
      num_examples: this.data.n,
    };
    this.set({ stepMs });
    this.log(`profile: ${stepMs.toFixed(1)} ms per step of level ${reference.label} (median)`);
    return this.profile;
  }

  async register() {
    const profile = this.profile ?? (await this.measure());
    this.set({ phase: 'registering' });
    const reply = await this.coordinator.register(profile);
    this.useHeartbeatSeconds(reply.heartbeat_seconds);
    if (Number(reply.poll_seconds) > 0) this.pollSeconds = Number(reply.poll_seconds);
    this.set({ deviceId: reply.device_id, level: reply.level ?? null, rate: reply.rate ?? null });
    this.log(`registered as ${reply.device_id} (level ${reply.level ?? 'per round'})`);
  }

  /** Take a coordinator's heartbeat interval (ignored unless a positive number). */
  useHeartbeatSeconds(seconds) {
    const value = Number(seconds);
    if (seconds !== undefined && seconds !== null && Number.isFinite(value) && value > 0) {
      this.heartbeatSeconds = value;
    }
  }

  /**
   * Run `work` while POSTing /v1/heartbeat every heartbeatSeconds; a failed beat is logged
   * once (until one succeeds again) and never stops the work.
   */
  async beating(work) {
    let failing = false;
    let inFlight = false;
    const beat = async () => {
      if (inFlight || this.signal.aborted) return;
      inFlight = true;
      try {
        await this.coordinator.heartbeat();
        failing = false;
        this.set({ heartbeats: this.state.heartbeats + 1 });
      } catch (err) {
        if (!failing && !this.signal.aborted) {
          this.log(`heartbeat failed (${err.message}); the work goes on`, 'warn');
        }
        failing = true;
      } finally {
        inFlight = false;
      }
    };
    const timer = this.timers.setInterval(beat, this.heartbeatSeconds * 1000);
    try {
      return await work();
    } finally {
      this.timers.clearInterval(timer);
    }
  }

  /** Run until the coordinator says done (resolves) or the signal aborts (rejects). */
  async run() {
    const identity = this.coordinator.identity;
    if (identity) {
      this.set({ deviceId: identity.device_id, level: identity.level, rate: identity.rate });
      this.log(`resuming as ${identity.device_id} with the stored token`);
    } else {
      await this.guard(() => this.register());
    }
    let idle = 0;
    for (;;) {
      this.signal.throwIfAborted();
      let finished = false;
      const ok = await this.guard(async () => {
        if (!this.coordinator.token) await this.register();
        this.set({ phase: 'polling' });
        const task = await this.coordinator.task();
        if (task.action === 'done') {
          finished = true;
        } else if (task.action === 'wait') {
          const seconds = Number(task.retry_after ?? 1);
          this.set({ phase: 'waiting', alert: null });
          if (task.asked && !this.unknownActions.has(task.asked)) {
            this.unknownActions.add(task.asked);
            this.log(`the coordinator asks for ${JSON.stringify(task.asked)}, which this page cannot do`, 'warn');
          }
          if (idle++ === 0) this.log(`waiting for a round (asked to come back in ${seconds} s)`);
          await this.sleep(Math.max(0, seconds) * 1000, this.signal);
        } else if (this.skippedInstances.has(task.secure?.context ?? task.context)) {
          this.set({ phase: 'waiting' }); // out of this instance: its tasks come back until it closes
          await this.sleep(this.pollSeconds * 1000, this.signal);
        } else if (task.action === 'train') {
          idle = 0;
          this.useHeartbeatSeconds(task.heartbeat_seconds);
          await this.beating(() => this.train(task));
        } else if (task.action === 'statistics') {
          idle = 0;
          this.useHeartbeatSeconds(task.heartbeat_seconds);
          await this.beating(() => this.statistics(task));
        } else if (task.action === 'secagg') {
          idle = 0;
          await this.secureStage(task);
        }
      });
      if (finished) {
        this.set({ phase: 'done', alert: null });
        this.log('the coordinator says done');
        return;
      }
      if (ok) this.failures = 0;
    }
  }

  /**
   * Run one piece of work; on failure log it, show it, back off, and return false.
   * unknown_token forgets the token (the next turn registers); round_closed and stale_update only log.
   */
  async guard(work) {
    try {
      await work();
      this.set({ alert: null });
      return true;
    } catch (err) {
      if (this.signal.aborted) throw this.signal.reason;
      if (err instanceof ApiError && FATAL_CODES.has(err.code)) {
        this.coordinator.forget();
        this.set({ phase: 'stopped', alert: ENROLLMENT_MESSAGE });
        this.log(`${ENROLLMENT_MESSAGE} (${err.code}: ${err.message})`, 'error');
        throw new FatalError(ENROLLMENT_MESSAGE, err);
      }
      if (err instanceof ApiError && TASK_GONE_CODES.has(err.code)) {
        this.log(`round ${this.state.round ?? '?'}: too late, the coordinator moved on (${err.message})`, 'warn');
        return false;
      }
      this.failures = (this.failures ?? 0) + 1;
      const delay = Math.min(FIRST_DELAY_MS * 2 ** (this.failures - 1), MAX_DELAY_MS);
      if (err instanceof ApiError && err.code === Codes.unknownToken) {
        this.coordinator.forget();
        this.set({ phase: 'backoff', alert: null });
        this.log(`the coordinator refused this device's token (${err.message}); registering again`, 'warn');
        await this.sleep(delay, this.signal);
        return false;
      }
      const kind = err instanceof IntegrityError ? 'damaged download' : (err.code ?? err.name);
      const text = `${kind}: ${err.message}; retrying in ${(delay / 1000).toFixed(1)} s`;
      this.set({ phase: 'backoff', alert: text });
      this.log(text, 'error');
      await this.sleep(delay, this.signal);
      return false;
    }
  }

  /** The level's weights from `url`, decoded to float32 whatever their encoding. */
  async weights(url, level) {
    const { tensors, metadata } = await this.coordinator.tensors(url);
    const { arrays } = decodeTensors(tensors, metadata);
    const out = new Map();
    for (const p of level.manifest.parameters) {
      const t = arrays.get(p.name);
      if (!t || t.shape.join(',') !== p.shape.join(',')) {
        throw new Error(`the weights for ${p.name} do not fit the manifest (${JSON.stringify(p.shape)})`);
      }
      out.set(p.name, t.data);
    }
    return out;
  }

  async train(task) {
    const hyper = task.hyperparameters;
    this.set({
      phase: 'training',
      round: task.round,
      level: task.level,
      rate: task.rate,
      epoch: 0,
      epochs: hyper.epochs,
      step: 0,
      stepsPerEpoch: Math.ceil(this.data.n / hyper.batch_size),
      trainStartedAt: null,
      stepAt: null,
      deadline: task.deadline ?? null,
      loss: null,
    });
    const level = await this.loadLevel(task.artifact.manifest_url);
    const differ = level.mismatchedHyperparameters(hyper);
    if (differ.length) {
      this.log(`the task's ${differ.join(', ')} differ from the artifact's; the artifact's apply`, 'warn');
    }
    this.note(task);
    const weights = await this.weights(task.weights_url, level);
    this.log(`round ${task.round}: training level ${task.level}, ${hyper.epochs} epoch(s) of ${this.data.n} examples`);
    let last = performance.now();
    const result = await level.train({
      weights: new Map([...weights].map(([name, w]) => [name, w.slice()])), // kept: the update's start
      data: this.data,
      labels: this.data.labels,
      lr: task.lr,
      epochs: hyper.epochs,
      batchSize: hyper.batch_size,
      seed: task.seed,
      signal: this.signal,
      onStep: async ({ epoch, step, stepsPerEpoch, loss }) => {
        const now = Date.now();
        this.set({ epoch, step, stepsPerEpoch, loss, stepAt: now, trainStartedAt: this.state.trainStartedAt ?? now });
        if (performance.now() - last > 100) {
          await this.breathe();
          last = performance.now();
        }
      },
    });
    if (!finite(result.weights)) {
      throw new Error(`round ${task.round}: training gave non-finite weights; nothing uploaded`);
    }
    let trained = result.weights;
    if (task.distributed_noise) trained = this.noised(level, weights, trained, task.distributed_noise);
    if (task.secure) {
      await this.uploadMasked(task, result, () =>
        this.secagg.maskTraining(task.secure, task.rate, weights, trained, this.data.labels, task.rounding_seed ?? 0),
      );
      return;
    }
    const encoding = task.upload_encoding ?? 'fp32';
    const encoded = this.encoder.encode(
      trained,
      weights,
      new Map(level.manifest.parameters.map((p) => [p.name, p.shape])),
      { encoding, seed: task.rounding_seed ?? 0, level: task.level, errorFeedback: Boolean(task.error_feedback) },
    );
    // A private run releases the update only: no example count, labels or metrics.
    const metadata = task.private
      ? {}
      : {
          num_samples: result.numExamples,
          labels: this.data.labels,
          metrics: { loss: result.loss, accuracy: result.accuracy, steps: result.steps },
        };
    this.set({ phase: 'uploading', loss: result.loss, accuracy: result.accuracy });
    const sentBefore = this.coordinator.bytesSent;
    try {
      await this.coordinator.upload(task.upload_url, encoded.tensors, metadata, encoded.metadata);
    } catch (err) {
      this.encoder.forget(); // the update was lost: so is what its residual refers to
      throw err;
    }
    this.recordUpload(task, result, sentBefore, { encoding });
    this.log(
      `round ${task.round}: uploaded level ${task.level}, loss ${result.loss.toFixed(4)}, ` +
        `accuracy ${result.accuracy.toFixed(3)}, ${result.steps} steps`,
    );
  }

  /** A training upload that went through: its body (for tests) and `lastUpload` in the state. */
  recordUpload(task, result, sentBefore, extra) {
    this.uploadBodies.train = this.coordinator.lastUpload?.body;
    this.set({
      uploads: this.state.uploads + 1,
      lastUpload: {
        round: task.round,
        level: task.level,
        seed: task.seed,
        loss: result.loss,
        accuracy: result.accuracy,
        steps: result.steps,
        bytes: this.coordinator.bytesSent - sentBefore,
        ...extra,
      },
    });
  }

  /** Received weights plus the clipped update with this device's share of the DP noise. */
  noised(level, received, trained, noise) {
    const update = new Map();
    const shapes = new Map();
    for (const p of level.manifest.parameters) {
      const before = received.get(p.name);
      const after = trained.get(p.name);
      update.set(p.name, Float64Array.from(after, (v, i) => v - before[i]));
      shapes.set(p.name, p.shape);
    }
    const noisy = addDistributedNoise(update, shapes, noise);
    return new Map(
      [...noisy].map(([name, values]) => {
        const before = received.get(name);
        return [name, Float32Array.from(values, (v, i) => before[i] + v)];
      }),
    );
  }

  /**
   * Answer a secure aggregation stage (keys, encrypted shares, unmasking shares) at its
   * answer_url; a stage the instance refuses (SecAggSkip) is logged and left unanswered.
   */
  async secureStage(task) {
    this.set({ phase: 'secagg', round: task.round });
    const answer = await this.skipping(task, `secure aggregation ${task.stage}`, () => this.secagg.answer(task));
    if (answer === null) return;
    await this.coordinator.answer(task.answer_url, answer);
    this.set({ secaggAnswers: this.state.secaggAnswers + 1 });
    this.log(`round ${task.round}: secure aggregation (${task.phase}): answered ${task.stage}`);
  }

  /**
   * `work()`, or null when secure aggregation refuses it (SecAggSkip: logged, and the device
   * is out of that instance from now on).
   */
  async skipping(task, what, work) {
    try {
      return await work();
    } catch (err) {
      if (err?.name !== 'SecAggSkip') throw err;
      this.skippedInstances.add(task.secure?.context ?? task.context);
      this.log(`round ${task.round}: ${what}: ${err.message}; out of this aggregation`, 'warn');
      return null;
    }
  }

  /**
   * Upload a secure task's result: one tensor `masked` (from `mask()`: uint32, or uint16 for a
   * modulus of 16 bits or fewer), no metadata.
   * `result`: a training session's (kept on the page, never sent), or null for statistics.
   */
  async uploadMasked(task, result, mask) {
    const started = performance.now();
    const masked = await this.skipping(task, 'cannot mask', mask);
    if (masked === null) return;
    const maskMs = Math.round(performance.now() - started);
    this.set({ phase: 'uploading', ...(result ? { loss: result.loss, accuracy: result.accuracy } : {}) });
    const sentBefore = this.coordinator.bytesSent;
    const dtype = masked instanceof Uint16Array ? 'U16' : 'U32';
    const tensors = new Map([['masked', { data: masked, shape: [masked.length], dtype }]]);
    await this.coordinator.upload(task.upload_url, tensors, {}); // no metadata: nothing but the vector
    if (result === null) {
      this.uploadBodies.statistics = this.coordinator.lastUpload?.body;
      this.set({
        statisticsUploads: this.state.statisticsUploads + 1,
        lastStatistics: { round: task.round, level: task.artifact?.level ?? null, masked: true, maskMs },
      });
      this.log(`round ${task.round}: sent masked sBN statistics (${masked.length} elements, masked in ${maskMs} ms)`);
      return;
    }
    this.recordUpload(task, result, sentBefore, { encoding: 'masked', masked: true, maskMs });
    this.log(
      `round ${task.round}: sent the masked update of level ${task.level} (${masked.length} elements, masked in ${maskMs} ms)`,
    );
  }

  async statistics(task) {
    this.set({ phase: 'statistics', round: task.round, statsBatch: 0, statsBatches: null, deadline: task.deadline ?? null });
    const level = await this.loadLevel(task.artifact.manifest_url);
    this.note(task);
    const weights = await this.weights(task.weights_url, level);
    this.set({ statsBatch: 0, statsBatches: Math.max(1, Math.ceil(this.data.n / STATS_BATCH)) }); // computing now
    const stats = await level.statistics(weights, this.data, this.signal, ({ batch, batches }) => {
      this.set({ statsBatch: batch, statsBatches: batches });
    });
    if (!finite(stats)) throw new Error(`round ${task.round}: statistics are not finite; nothing uploaded`);
    if (task.private) {
      // Each report weighs as one client: the example count is not released.
      for (const [name, tensor] of stats) if (name.endsWith('.count')) tensor.data.fill(1);
    }
    if (task.secure) {
      await this.uploadMasked(task, null, () => this.secagg.maskStatistics(task.secure, stats));
      return;
    }
    this.set({ phase: 'uploading' });
    await this.coordinator.upload(task.upload_url, stats, {});
    this.uploadBodies.statistics = this.coordinator.lastUpload?.body;
    this.set({
      statisticsUploads: this.state.statisticsUploads + 1,
      lastStatistics: { round: task.round, level: task.artifact?.level ?? null },
    });
    this.log(`round ${task.round}: sent sBN statistics`);
  }
}
