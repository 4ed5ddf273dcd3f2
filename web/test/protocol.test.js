import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  ApiError,
  Codes,
  Coordinator,
  IntegrityError,
  TASKS,
  checkTask,
  outgoing,
  referenceLevel,
} from '../protocol.js';
import { parseSafetensors } from '../safetensors.js';

/** A scripted fetch: each entry answers one request ([status, body, headers] or an Error). */
function scripted(replies) {
  const seen = [];
  const fetch = async (url, init) => {
    seen.push({ url, ...init });
    const next = replies.shift();
    if (!next) throw new Error(`unexpected request ${url}`);
    if (next instanceof Error) throw next;
    const [status, body, headers] = next;
    const payload = typeof body === 'string' || body instanceof Uint8Array ? body : JSON.stringify(body);
    return new Response(status === 204 ? null : payload, { status, headers });
  };
  return { fetch, seen };
}

class MemoryStorage {
  constructor() {
    this.items = new Map();
  }
  getItem(k) {
    return this.items.has(k) ? this.items.get(k) : null;
  }
  setItem(k, v) {
    this.items.set(k, String(v));
  }
  removeItem(k) {
    this.items.delete(k);
  }
}

/** A registration reply with every field the Registered message declares. */
function registered(fields) {
  return { level: null, rate: null, policy: 'profile', poll_seconds: 2, heartbeat_seconds: 5, ...fields };
}

const HEALTH = {
  status: 'ok', model: 'conv', mode: 'a-e', reference_level: 'e', reference_rate: 0.0625,
  demo_data: false, evaluation: null, done: false,
};

function client(replies, extra = {}) {
  const { fetch, seen } = scripted(replies);
  const sleeps = [];
  const retries = [];
  const coordinator = new Coordinator({
    fetch,
    storage: new MemoryStorage(),
    sleep: async (ms) => sleeps.push(ms),
    onRetry: (r) => retries.push(r),
    ...extra,
  });
  return { coordinator, seen, sleeps, retries };
}

test('register sends the profile with runtimes, encodings and secure aggregation and keeps the token', async () => {
  const storage = new MemoryStorage();
  const { coordinator, seen } = client(
    [
      [201, registered({ device_id: 'd1', token: 'secret', level: 'c', rate: 0.25 })],
      [200, { action: 'wait', retry_after: 2 }],
    ],
    { storage },
  );
  await coordinator.register({ step_ms: 3, reference_rate: 0.0625, memory_mb: 2048, bandwidth_mbps: 10 });
  assert.equal(seen[0].method, 'POST');
  assert.equal(seen[0].url, '/v1/devices');
  assert.equal(seen[0].headers.Authorization, undefined);
  assert.deepEqual(JSON.parse(new TextDecoder().decode(seen[0].body)), {
    step_ms: 3,
    reference_rate: 0.0625,
    memory_mb: 2048,
    bandwidth_mbps: 10,
    runtimes: ['onnx-web'],
    encodings: ['fp32', 'fp16', 'bf16', 'int8'],
    secure_aggregation: true,
  });
  assert.deepEqual(await coordinator.task(), { action: 'wait', retry_after: 2 });
  assert.equal(seen[1].headers.Authorization, 'Bearer secret');
  // a page reload finds the token again
  assert.equal(new Coordinator({ fetch: () => {}, storage }).token, 'secret');
  assert.ok(coordinator.bytesSent > 0 && coordinator.bytesReceived > 0);
});

test('network failures, 5xx and 429 are retried with capped exponential backoff', async () => {
  const { coordinator, sleeps, retries } = client([
    new TypeError('Failed to fetch'),
    [503, { code: 'unavailable', message: 'restarting' }],
    new TypeError('Failed to fetch'),
    new TypeError('Failed to fetch'),
    new TypeError('Failed to fetch'),
    new TypeError('Failed to fetch'),
    [429, { code: 'busy', message: 'slow down' }, { 'Retry-After': '1' }],
    [200, HEALTH],
  ]);
  assert.deepEqual(await coordinator.health(), HEALTH);
  assert.deepEqual(sleeps, [250, 500, 1000, 2000, 4000, 4000, 1000]);
  assert.equal(retries.length, 7);
  assert.match(retries[1].reason, /HTTP 503/);
});

test('4xx replies become ApiErrors decided by code; old coordinators map by status', async () => {
  const { coordinator } = client([
    [409, { code: 'round_closed', message: 'round 3 closed', hint: 'take the next task' }],
    [401, { error: 'unknown token' }],
    [403, { code: 'not_your_assignment', message: 'no' }],
    [400, 'not json at all'],
  ]);
  await assert.rejects(coordinator.task(), (err) => {
    assert.ok(err instanceof ApiError);
    assert.equal(err.code, Codes.roundClosed);
    assert.equal(err.hint, 'take the next task');
    return true;
  });
  await assert.rejects(coordinator.task(), { code: Codes.unknownToken, status: 401 });
  await assert.rejects(coordinator.task(), { code: 'not_your_assignment' });
  await assert.rejects(coordinator.task(), { code: 'http_400' });
});

test('artifacts are checked against the manifest sha256; a mismatch is refused', async () => {
  const program = new TextEncoder().encode('onnx bytes');
  const digest = Buffer.from(await crypto.subtle.digest('SHA-256', program)).toString('hex');
  const manifest = (sha) => ({
    programs: { onnx: { train_step: { file: 'onnx/train_step.onnx' } } },
    files: { 'onnx/train_step.onnx': { sha256: sha } },
  });
  const good = client([
    [200, manifest(digest)],
    [200, program],
  ]);
  const got = await good.coordinator.artifact('/v1/artifacts/conv/e/manifest.json');
  assert.deepEqual(got.files['onnx/train_step.onnx'], program);
  assert.equal(got.checked, true);
  assert.equal(good.seen[1].url, '/v1/artifacts/conv/e/onnx/train_step.onnx');
  const bad = client([
    [200, manifest('0'.repeat(64))],
    [200, program],
  ]);
  await assert.rejects(bad.coordinator.artifact('/v1/artifacts/conv/e/manifest.json'), IntegrityError);
});

test('uploads are safetensors with JSON-string metadata', async () => {
  const { coordinator, seen } = client([[200, { accepted: true, round: 3 }]]);
  const tensors = new Map([['w', { data: new Float32Array([1, 2]), shape: [2] }]]);
  const reply = await coordinator.upload('/v1/rounds/1/uploads', tensors, {
    num_samples: 2,
    labels: [0, 7],
    metrics: { loss: 0.5, accuracy: 1, steps: 1 },
  });
  assert.deepEqual(reply, { accepted: true, round: 3 });
  assert.equal(seen[0].headers['Content-Type'], 'application/octet-stream');
  const { metadata, tensors: back } = parseSafetensors(seen[0].body);
  assert.deepEqual(metadata, {
    num_samples: '2',
    labels: '[0,7]',
    metrics: '{"loss":0.5,"accuracy":1,"steps":1}',
  });
  assert.deepEqual(Array.from(back.get('w').data), [1, 2]);
  assert.equal(coordinator.bytesSent, seen[0].body.length);
});

test('an aborted request stops retrying', async () => {
  const stop = new AbortController();
  const { coordinator } = client([new TypeError('Failed to fetch')], {
    signal: stop.signal,
    sleep: async () => {
      stop.abort();
      throw stop.signal.reason;
    },
  });
  await assert.rejects(coordinator.health(), { name: 'AbortError' });
});

test('the reference level is the smallest of the mode', () => {
  assert.deepEqual(referenceLevel('a-b-c-d-e'), { label: 'e', rate: 0.0625 });
  assert.deepEqual(referenceLevel('a2-b8'), { label: 'b', rate: 0.5 });
  assert.deepEqual(referenceLevel('0.3x2-a1'), { label: '0.3', rate: 0.3 });
  assert.throws(() => referenceLevel('a-z'));
});

test('registration carries the enrollment token of the device link; refusals keep their code', async () => {
  const { coordinator, seen } = client(
    [
      [401, { code: 'bad_enrollment_token', message: 'not this coordinator', hint: 'open the link' }],
      [201, registered({ device_id: 'd1', token: 't', level: 'e', rate: 0.0625 })],
    ],
    { enrollmentToken: 'E-123' },
  );
  const profile = { step_ms: 3, reference_rate: 0.0625, memory_mb: 2048, bandwidth_mbps: 10, num_examples: 600 };
  await assert.rejects(coordinator.register(profile), (err) => err instanceof ApiError && err.code === Codes.badEnrollmentToken);
  await coordinator.register(profile);
  for (const request of seen) {
    const body = JSON.parse(new TextDecoder().decode(request.body));
    assert.equal(body.enrollment_token, 'E-123');
    assert.equal(body.num_examples, 600);
  }
  const { coordinator: plain, seen: plainSeen } = client([[201, registered({ device_id: 'd2', token: 'u' })]]);
  await plain.register(profile);
  assert.equal('enrollment_token' in JSON.parse(new TextDecoder().decode(plainSeen[0].body)), false);
});

test('a heartbeat is one bearer POST with no retry; a failure is thrown to the caller', async () => {
  const { coordinator, seen, sleeps, retries } = client([
    [201, registered({ device_id: 'd1', token: 'secret' })],
    [200, { device_id: 'd1', state: 'training' }],
    new TypeError('Failed to fetch'),
    [503, { code: 'storage_error', message: 'disk' }],
  ]);
  await coordinator.register({ step_ms: 3, reference_rate: 1, memory_mb: 1, bandwidth_mbps: 1 });
  assert.deepEqual(await coordinator.heartbeat(), { device_id: 'd1', state: 'training' });
  assert.equal(seen[1].method, 'POST');
  assert.equal(seen[1].url, '/v1/heartbeat');
  assert.equal(seen[1].headers.Authorization, 'Bearer secret');
  await assert.rejects(coordinator.heartbeat(), /Failed to fetch/);
  await assert.rejects(coordinator.heartbeat(), /HTTP 503/);
  assert.deepEqual(sleeps, []);
  assert.deepEqual(retries, []);
});

test('replies are checked against their declared message; an unknown action reads as a wait', () => {
  const task = {
    action: 'statistics', round: 2, level: 'a', rate: 1, weights_url: '/w', upload_url: '/u',
    deadline: 1, heartbeat_seconds: 5, expected_count: null,
    artifact: { model: 'conv', level: 'a', manifest_url: '/m', formats: ['onnx'] },
  };
  assert.equal(checkTask(task), task);
  assert.throws(() => checkTask({ ...task, weights_url: undefined }), {
    name: 'ProtocolError',
    message: 'StatisticsTask.weights_url should be string, got null',
  });
  assert.throws(() => checkTask({ ...task, artifact: { model: 'conv' } }), /ArtifactRef.level/);
  assert.deepEqual(checkTask({ action: 'reticulate', retry_after: 3 }), {
    action: 'wait',
    retry_after: 3,
    asked: 'reticulate',
  });
  // secure aggregation's stages are tasks this page does; their fields and peers are checked
  const stage = {
    action: 'secagg', round: 1, phase: 'training', stage: 'share', context: 'c', index: 2,
    answer_url: '/v1/rounds/1/secagg', deadline: 1, heartbeat_seconds: 5, threshold: 1,
    neighbours: [{ index: 1, c_public: 'AA==', s_public: 'AA==' }], dropped: [], survivors: [],
  };
  assert.equal(checkTask(stage), stage);
  assert.throws(() => checkTask({ ...stage, answer_url: undefined }), /SecAggTask.answer_url/);
  assert.throws(() => checkTask({ ...stage, neighbours: [{ index: 1, c_public: 'AA==' }] }), /SecAggPeer.s_public/);
  const secure = { context: 'c', index: 2, peers: { 1: 0.5 }, ciphertexts: {}, layers: [['n', 2]] };
  assert.equal(checkTask({ ...task, secure }).secure, secure);
  assert.throws(() => checkTask({ ...task, secure: { ...secure, peers: [] } }), /SecureMasking.peers should be object/);
  assert.deepEqual(Object.keys(TASKS).sort(), ['done', 'secagg', 'statistics', 'train', 'wait']);
  assert.deepEqual(outgoing('DeviceProfile', { step_ms: 1, secret: 'x', num_examples: null }), { step_ms: 1 });
});

test('a distributed DP noise share: holders per element as in Python, and its variance', async () => {
  const { holderCounts, addDistributedNoise, standardNormals } = await import('../dp_noise.js');
  // The same hand-worked case as tests/test_privacy.py: widths 4x3 at sizes (4,3), (2,1), (2,1).
  assert.deepEqual(Array.from(holderCounts([4, 3], [[4, 2, 2], [3, 1, 1]], [1, 1])), [3, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1]);
  assert.deepEqual(Array.from(holderCounts([8], [[2, 1]], [2])), [2, 1, 0, 0, 2, 1, 0, 0]);
  assert.deepEqual(Array.from(holderCounts([5], [[-1, -1]], [0])), [2, 2, 2, 2, 2]);
  let state = 12345;
  const random = (words) => {
    for (let i = 0; i < words.length; i++) {
      state = (Math.imul(state, 1103515245) + 12345) >>> 0;
      words[i] = state;
    }
    return words;
  };
  const draws = standardNormals(200000, random);
  const mean = draws.reduce((a, b) => a + b, 0) / draws.length;
  const variance = draws.reduce((a, b) => a + (b - mean) ** 2, 0) / draws.length;
  assert.ok(Math.abs(mean) < 0.01 && Math.abs(variance - 1) < 0.02, `${mean} ${variance}`);
  const noise = { clip: 2, noise_multiplier: 0, reporting_fraction: 1, sizes: { w: [[2]] }, blocks: { w: [1] } };
  const clipped = addDistributedNoise(new Map([['w', Float64Array.of(3, 4)]]), new Map([['w', [2]]]), noise, random);
  const got = Array.from(clipped.get('w'));
  assert.ok(Math.abs(got[0] - 1.2) < 1e-12 && Math.abs(got[1] - 1.6) < 1e-12, String(got)); // norm 5 -> 2
});
