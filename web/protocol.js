// The device side of the coordinator's HTTP protocol (/v1, README "The device protocol"),
// for a page served by the coordinator itself: every URL is relative (same origin, no CORS).
//
// Errors: a 4xx reply is an ApiError carrying the JSON body's `code` (with `message` and
// `hint` for people); callers decide on `code` alone. Coordinators that predate error codes
// reply {"error", "hint"}; for them 401 reads as `unknown_token` and 409 as `round_closed`.
// Network failures, 5xx and 429 are retried here with exponential backoff (0.25 s doubling,
// capped at MAX_DELAY_MS, or the reply's Retry-After within that cap) until the caller's
// AbortSignal stops it; every retry is reported through onRetry so the page can show it.

import { ENCODINGS } from './encoding.js';
import { parseSafetensors, serializeSafetensors } from './safetensors.js';

export const MAX_DELAY_MS = 4000;
export const FIRST_DELAY_MS = 250;
export const RUNTIME = 'onnx-web';
const STORAGE_KEY = 'heterofl-edge.device';

/** Codes the device acts on; any other code is shown and the task retried later. */
export const Codes = Object.freeze({
  unknownToken: 'unknown_token', // 401: register again
  roundClosed: 'round_closed', // 409: too late or a duplicate; take the next task
  staleUpdate: 'stale_update', // 409 (buffered): the update's model version is too old; take the next task
  enrollmentRequired: 'enrollment_required', // 401: registration needs the coordinator's device link
  badEnrollmentToken: 'bad_enrollment_token', // 401: the link's token is not this coordinator's
});

/** Codes that mean "this task is over": the device logs it and asks for the next one. */
export const TASK_GONE_CODES = new Set([Codes.roundClosed, Codes.staleUpdate]);

/** Codes no retry can cure: the device stops and says what to do. */
export const FATAL_CODES = new Set([Codes.enrollmentRequired, Codes.badEnrollmentToken]);

const CODE_BEFORE_CODES = { 401: Codes.unknownToken, 409: Codes.roundClosed };

export class ApiError extends Error {
  constructor(status, code, message, hint) {
    super(`${message}${hint ? ` (${hint})` : ''}`);
    this.name = 'ApiError';
    Object.assign(this, { status, code, hint, detail: message });
  }
}

/** A downloaded artifact whose sha256 differs from its manifest's. */
export class IntegrityError extends Error {
  constructor(message) {
    super(message);
    this.name = 'IntegrityError';
  }
}

/**
 * The /v1 messages this page reads and sends, field by field, with their JSON types (a `?`
 * suffix: may be absent or null). The component names are the coordinator's OpenAPI
 * schemas (heterofl_edge/protocol.py): tests/test_web_protocol.py checks every field here
 * against the served /v1/openapi.json, so a field renamed on either side fails that test.
 * Every reply is checked against its message when it arrives (`checkMessage`), and a
 * request carries only the fields its message declares.
 */
export const MESSAGES = Object.freeze({
  Health: {
    reads: {
      model: 'string', mode: 'string', reference_level: 'string', reference_rate: 'number',
      demo_data: 'boolean', evaluation: 'object?', done: 'boolean',
    },
  },
  DeviceProfile: {
    sends: {
      step_ms: 'number', reference_rate: 'number', memory_mb: 'number', bandwidth_mbps: 'number',
      runtimes: 'array', num_examples: 'integer?', secure_aggregation: 'boolean?', encodings: 'array?',
      enrollment_token: 'string?',
    },
  },
  Registered: {
    reads: {
      device_id: 'string', token: 'string', level: 'string?', rate: 'number?',
      poll_seconds: 'number', heartbeat_seconds: 'number',
    },
  },
  TrainTask: {
    action: 'train',
    reads: {
      action: 'string', round: 'integer', level: 'string', rate: 'number', seed: 'integer',
      lr: 'number', hyperparameters: 'object', artifact: 'object', weights_url: 'string',
      upload_url: 'string', deadline: 'number', heartbeat_seconds: 'number',
      private: 'boolean?', distributed_noise: 'object?', secure: 'object?',
      download_encoding: 'string?', upload_encoding: 'string?', rounding_seed: 'integer?',
      error_feedback: 'boolean?', encoding_note: 'string?',
    },
  },
  StatisticsTask: {
    action: 'statistics',
    reads: {
      action: 'string', round: 'integer', level: 'string', artifact: 'object',
      weights_url: 'string', upload_url: 'string', deadline: 'number',
      heartbeat_seconds: 'number', expected_count: 'integer?', private: 'boolean?', secure: 'object?',
      download_encoding: 'string?', encoding_note: 'string?',
    },
  },
  // Secure aggregation (secagg_device.js): a stage to answer at answer_url, and how a
  // training or statistics task's upload is masked (its `secure`).
  SecAggTask: {
    action: 'secagg',
    reads: {
      action: 'string', round: 'integer', phase: 'string', stage: 'string', context: 'string',
      index: 'integer', answer_url: 'string', deadline: 'number', heartbeat_seconds: 'number',
      threshold: 'integer?', neighbours: 'array?', dropped: 'array?', survivors: 'array?',
    },
  },
  SecAggPeer: { reads: { index: 'integer', c_public: 'string', s_public: 'string' } },
  SecAggAnswer: {
    sends: {
      context: 'string', stage: 'string', c_public: 'string?', s_public: 'string?', shares: 'object?',
      unmask: 'object?',
    },
  },
  SecureMasking: {
    reads: {
      context: 'string', index: 'integer', peers: 'object', ciphertexts: 'object', scale: 'number?',
      clip: 'number?', plan: 'object?', layers: 'array?', statistics_scale: 'number?',
    },
  },
  WaitTask: { action: 'wait', reads: { action: 'string', retry_after: 'number' } },
  DoneTask: { action: 'done', reads: { action: 'string', rounds: 'integer' } },
  Hyperparameters: {
    reads: {
      epochs: 'integer', batch_size: 'integer', momentum: 'number', weight_decay: 'number',
      clip_grad_norm: 'number?',
    },
  },
  ArtifactRef: { reads: { model: 'string', level: 'string', manifest_url: 'string' } },
  DistributedNoise: {
    reads: {
      clip: 'number', noise_multiplier: 'number', reporting_fraction: 'number',
      round_rates: 'array', sizes: 'object', blocks: 'object',
    },
  },
  Heartbeat: { reads: { device_id: 'string', state: 'string' } },
  Accepted: { reads: { accepted: 'boolean', round: 'integer' } },
  ErrorReply: { reads: { code: 'string', message: 'string', hint: 'string?' } },
  DemoDataInfo: {
    reads: {
      examples: 'integer', bytes: 'integer', shard: 'integer', clients: 'integer',
      dtype: 'string', source: 'string',
    },
  },
});

/** The task messages by their `action` (the OpenAPI document's discriminator). */
export const TASKS = Object.freeze(
  Object.fromEntries(Object.entries(MESSAGES).filter(([, m]) => m.action).map(([name, m]) => [m.action, name])),
);

/** A reply that does not fit the message it should be (a coordinator of another version). */
export class ProtocolError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ProtocolError';
  }
}

function typeOf(value) {
  if (value === null || value === undefined) return 'null';
  if (Array.isArray(value)) return 'array';
  if (Number.isInteger(value)) return 'integer';
  return typeof value;
}

/**
 * `value`, checked against message `name`'s `reads` (nested messages by their field names
 * where declared: hyperparameters, artifact); throws ProtocolError naming the field.
 */
export function checkMessage(name, value) {
  const fields = MESSAGES[name]?.reads;
  if (!fields) throw new ProtocolError(`no message ${name}`);
  if (typeOf(value) !== 'object') throw new ProtocolError(`${name} is not a JSON object`);
  for (const [field, declared] of Object.entries(fields)) {
    const optional = declared.endsWith('?');
    const type = declared.replace('?', '');
    const got = typeOf(value[field]);
    if (got === 'null' && optional) continue;
    const fits = got === type || (type === 'number' && got === 'integer');
    if (!fits) throw new ProtocolError(`${name}.${field} should be ${declared}, got ${got}`);
  }
  return value;
}

/** A task reply checked against its kind's message; an action this page cannot do reads as wait. */
export function checkTask(value) {
  const name = TASKS[value?.action];
  if (!name) {
    return { action: 'wait', retry_after: Number(value?.retry_after ?? 2), asked: String(value?.action) };
  }
  checkMessage(name, value);
  if (name === 'TrainTask') checkMessage('Hyperparameters', value.hyperparameters);
  if (name === 'TrainTask' || name === 'StatisticsTask') checkMessage('ArtifactRef', value.artifact);
  if (name === 'TrainTask' && value.distributed_noise) checkMessage('DistributedNoise', value.distributed_noise);
  if ((name === 'TrainTask' || name === 'StatisticsTask') && value.secure) checkMessage('SecureMasking', value.secure);
  if (name === 'SecAggTask') for (const peer of value.neighbours ?? []) checkMessage('SecAggPeer', peer);
  return value;
}

/** The fields of `value` that message `name` sends (none other goes on the wire). */
export function outgoing(name, value) {
  const fields = MESSAGES[name].sends;
  return Object.fromEntries(Object.entries(value).filter(([k, v]) => k in fields && v !== undefined && v !== null));
}

const LEVEL_RATES = { a: 1, b: 0.5, c: 0.25, d: 0.125, e: 0.0625 };

/**
 * The smallest level of a mode string ("a-e", "a2-b8", "0.3x2-e"): the reference
 * artifact a device profiles itself with (heterofl_edge.assignment.parse_mode's grammar).
 * @returns {{label: string, rate: number}}
 */
export function referenceLevel(mode) {
  const token = /^(?:([a-e])\d*|(\d*\.?\d+)(?:x\d+)?)$/;
  let best = null;
  for (const part of String(mode).trim().toLowerCase().split('-')) {
    const m = token.exec(part);
    if (!m) throw new Error(`cannot read level ${JSON.stringify(part)} of mode ${JSON.stringify(mode)}`);
    const rate = m[1] ? LEVEL_RATES[m[1]] : Number(m[2]);
    if (!(rate > 0 && rate <= 1)) throw new Error(`rate ${m[2]} of mode ${mode} is outside (0, 1]`);
    if (best === null || rate < best) best = rate;
  }
  if (best === null) throw new Error('empty mode');
  const letter = Object.keys(LEVEL_RATES).find((k) => LEVEL_RATES[k] === best);
  return { label: letter ?? String(best), rate: best };
}

/** Lowercase hex sha256 of bytes, or null where crypto.subtle is missing (no secure context). */
export async function sha256Hex(bytes) {
  const subtle = globalThis.crypto?.subtle;
  if (!subtle) return null;
  const digest = new Uint8Array(await subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

function abortableSleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

export class Coordinator {
  /**
   * @param {object} [options]
   * @param {string} [options.base] prefix of every path ('' on the page: same origin)
   * @param {typeof fetch} [options.fetch]
   * @param {Storage | null} [options.storage] where the token lives (localStorage)
   * @param {AbortSignal} [options.signal] stops requests and retries
   * @param {(r: {attempt: number, delayMs: number, reason: string, path: string}) => void} [options.onRetry]
   * @param {(ms: number, signal?: AbortSignal) => Promise<void>} [options.sleep]
   * @param {string | null} [options.enrollmentToken] sent with the registration (the
   *   coordinator's device link, /device/#enroll=TOKEN)
   */
  constructor(options = {}) {
    this.base = options.base ?? '';
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.storage = options.storage === undefined ? (globalThis.localStorage ?? null) : options.storage;
    this.signal = options.signal;
    this.onRetry = options.onRetry ?? (() => {});
    this.sleep = options.sleep ?? abortableSleep;
    this.enrollmentToken = options.enrollmentToken ?? null;
    this.bytesSent = 0;
    this.bytesReceived = 0;
    this.identity = this._load();
  }

  _load() {
    try {
      const saved = JSON.parse(this.storage?.getItem(STORAGE_KEY) ?? 'null');
      return saved && typeof saved.token === 'string' ? saved : null;
    } catch {
      return null;
    }
  }

  get token() {
    return this.identity?.token ?? null;
  }

  /** Forget the stored token (it was refused, or the user asked for a fresh device). */
  forget() {
    this.identity = null;
    this.storage?.removeItem(STORAGE_KEY);
  }

  /**
   * One request; retried through network failures, 5xx and 429 until it gets another reply
   * (with `retry: false`, the first failure is thrown).
   * @returns {Promise<Response>} a 2xx reply whose body has not been read
   */
  async _request(method, path, { body, contentType, retry = true } = {}) {
    let delay = FIRST_DELAY_MS;
    for (let attempt = 1; ; attempt++) {
      const headers = {};
      if (this.token) headers.Authorization = `Bearer ${this.token}`;
      if (contentType) headers['Content-Type'] = contentType;
      let reason;
      let wait = delay;
      try {
        const reply = await this.fetch(this.base + path, { method, headers, body, signal: this.signal });
        if (body) this.bytesSent += body.byteLength ?? body.length;
        if (reply.ok) return reply;
        if (reply.status < 500 && reply.status !== 429) throw await this._error(reply);
        await this._count(reply);
        reason = `HTTP ${reply.status}`;
        const after = Number(reply.headers.get('Retry-After'));
        if (after > 0) wait = Math.min(after * 1000, MAX_DELAY_MS);
      } catch (err) {
        if (err instanceof ApiError || this.signal?.aborted || !retry) throw err;
        reason = `${err.name}: ${err.message}`; // fetch's TypeError: the coordinator is unreachable
      }
      if (!retry) throw new Error(reason);
      this.onRetry({ attempt, delayMs: wait, reason, path });
      await this.sleep(wait, this.signal);
      delay = Math.min(delay * 2, MAX_DELAY_MS);
    }
  }

  async _count(reply) {
    const bytes = new Uint8Array(await reply.arrayBuffer());
    this.bytesReceived += bytes.length;
    return bytes;
  }

  async _error(reply) {
    const bytes = await this._count(reply);
    let body = {};
    try {
      body = JSON.parse(new TextDecoder().decode(bytes));
    } catch {
      body = {};
    }
    const code = typeof body.code === 'string' ? body.code : (CODE_BEFORE_CODES[reply.status] ?? `http_${reply.status}`);
    const message = body.message ?? body.error ?? `HTTP ${reply.status}`;
    return new ApiError(reply.status, code, String(message), body.hint ? String(body.hint) : '');
  }

  async _json(method, path, value, { retry = true } = {}) {
    const body = value === undefined ? undefined : new TextEncoder().encode(JSON.stringify(value));
    const reply = await this._request(method, path, { body, contentType: body ? 'application/json' : undefined, retry });
    return JSON.parse(new TextDecoder().decode(await this._count(reply)));
  }

  async bytes(path) {
    return this._count(await this._request('GET', path));
  }

  /** GET a JSON resource (retried as any request unless `retry` is false). */
  json(path, { retry = true } = {}) {
    return this._json('GET', path, undefined, { retry });
  }

  async health(options) {
    return checkMessage('Health', await this.json('/v1/health', options));
  }

  /**
   * POST /v1/devices; keeps the token (and device id, level) in storage.
   * @param {{step_ms: number, reference_rate: number, memory_mb: number, bandwidth_mbps: number,
   *          num_examples?: number}} profile
   */
  async register(profile) {
    this.forget();
    const body = outgoing('DeviceProfile', {
      ...profile,
      runtimes: [RUNTIME],
      encodings: [...ENCODINGS], // encoding.js decodes weights and encodes updates in all of them
      secure_aggregation: true, // secagg_device.js answers the stages and masks uploads when a run asks
      enrollment_token: this.enrollmentToken,
    });
    const reply = checkMessage('Registered', await this._json('POST', '/v1/devices', body));
    this.identity = {
      token: reply.token,
      device_id: reply.device_id,
      level: reply.level ?? null,
      rate: reply.rate ?? null,
    };
    this.storage?.setItem(STORAGE_KEY, JSON.stringify(this.identity));
    return reply;
  }

  /**
   * GET /v1/task: {action: "train" | "statistics" | "secagg" | "wait" | "done", ...}, checked; an action
   * this page does not know reads as a wait ({action: "wait", retry_after, asked}).
   */
  async task() {
    return checkTask(await this._json('GET', '/v1/task'));
  }

  /**
   * POST /v1/heartbeat once (no retries: the next beat is the retry).
   * @returns {Promise<{device_id: string, state: string}>}
   */
  async heartbeat() {
    const reply = await this._request('POST', '/v1/heartbeat', { retry: false });
    return checkMessage('Heartbeat', JSON.parse(new TextDecoder().decode(await this._count(reply))));
  }

  /**
   * A level's manifest and the files the browser runs (onnx/train_step.onnx, onnx/statistics.onnx),
   * each checked against the manifest's sha256 where crypto.subtle exists.
   * @returns {Promise<{manifest: object, files: Record<string, Uint8Array>, checked: boolean}>}
   */
  async artifact(manifestUrl, programs = ['train_step', 'statistics']) {
    const manifest = JSON.parse(new TextDecoder().decode(await this.bytes(manifestUrl)));
    const base = manifestUrl.slice(0, manifestUrl.lastIndexOf('/'));
    const files = {};
    let checked = true;
    for (const program of programs) {
      const file = manifest.programs?.onnx?.[program]?.file;
      if (!file) continue;
      const expected = manifest.files?.[file]?.sha256;
      const payload = await this.bytes(`${base}/${file}`);
      const actual = await sha256Hex(payload);
      if (actual === null) checked = false;
      else if (actual !== expected) {
        throw new IntegrityError(`${file} failed its sha256 check (got ${actual.slice(0, 12)}…, manifest says ${String(expected).slice(0, 12)}…)`);
      }
      files[file] = payload;
    }
    return { manifest, files, checked };
  }

  /**
   * POST a secure aggregation stage's answer (a SecAggAnswer, JSON) to the task's answer_url.
   * @returns {Promise<{accepted: boolean, round: number}>}
   */
  async answer(path, answer) {
    return checkMessage('Accepted', await this._json('POST', path, outgoing('SecAggAnswer', answer)));
  }

  /** GET a safetensors resource (weights_url, /v1/demo-data). */
  async tensors(path) {
    return parseSafetensors(await this.bytes(path));
  }

  /**
   * POST a task's result: safetensors with metadata values JSON-encoded (num_samples, labels,
   * metrics for training; none for statistics).
   * @param {string} path upload_url
   * @param {Map<string, {data: ArrayBufferView, shape: number[], dtype?: string}>} tensors
   * @param {Record<string, unknown>} metadata
   * @param {Record<string, string>} [encoded] metadata already JSON strings (encoding.js's
   *   `encoding` and `scales`), sent as they are
   */
  async upload(path, tensors, metadata = {}, encoded = {}) {
    const meta = Object.fromEntries(Object.entries(metadata).map(([k, v]) => [k, JSON.stringify(v)]));
    const body = serializeSafetensors(tensors, { ...meta, ...encoded });
    this.lastUpload = { path, body }; // for tests: the exact bytes sent
    const reply = await this._request('POST', path, { body, contentType: 'application/octet-stream' });
    return checkMessage('Accepted', JSON.parse(new TextDecoder().decode(await this._count(reply))));
  }
}
