import assert from 'node:assert/strict';
import { test } from 'node:test';

import { DeviceClient, initialState } from '../client.js';
import { ApiError, IntegrityError } from '../protocol.js';

const manifest = { level: 'e', parameters: [{ name: 'w', shape: [2] }] };

function fakeLevel(result = [0.5, -0.5]) {
  return {
    manifest,
    trained: [],
    mismatchedHyperparameters: () => [],
    async train(args) {
      this.trained.push(args);
      await args.onStep?.({ epoch: 1, step: 1, stepsPerEpoch: 1, loss: 0.7 });
      return { weights: new Map([['w', Float32Array.from(result)]]), numExamples: args.data.n, steps: 1, loss: 0.7, accuracy: 0.5 };
    },
    async statistics() {
      return new Map([['n.count', { dtype: 'F32', shape: [], data: Float32Array.of(2) }]]);
    },
  };
}

const trainTask = (round) => ({
  action: 'train',
  round,
  seed: 7,
  level: 'e',
  rate: 0.0625,
  lr: 0.01,
  hyperparameters: { epochs: 1, batch_size: 10, momentum: 0.9, weight_decay: 5e-4, clip_grad_norm: 1 },
  artifact: { model: 'conv', level: 'e', manifest_url: '/v1/artifacts/conv/e/manifest.json', formats: ['onnx'] },
  weights_url: `/v1/rounds/${round}/weights`,
  upload_url: `/v1/rounds/${round}/uploads`,
});

/** A coordinator whose task() and upload() follow a script (values or errors to throw). */
function fakeCoordinator(tasks, uploads = []) {
  return {
    identity: null,
    bytesSent: 0,
    bytesReceived: 0,
    registered: 0,
    uploaded: [],
    get token() {
      return this.identity?.token ?? null;
    },
    forget() {
      this.identity = null;
    },
    async health() {
      return { model: 'conv', mode: 'c-e' };
    },
    async register(profile) {
      this.registered += 1;
      this.profile = profile;
      this.identity = { token: `t${this.registered}`, device_id: `d${this.registered}`, level: null };
      return { device_id: `d${this.registered}`, token: 't', level: null, rate: null };
    },
    async task() {
      const next = tasks.shift() ?? { action: 'done' };
      if (next instanceof Error) throw next;
      return next;
    },
    async tensors() {
      return { tensors: new Map([['w', { dtype: 'F32', shape: [2], data: new Float32Array(2) }]]), metadata: null };
    },
    async upload(path, tensors, metadata) {
      const next = uploads.shift();
      if (next instanceof Error) throw next;
      this.uploaded.push({ path, tensors, metadata });
      return {};
    },
  };
}

function device(coordinator, loadLevel) {
  const sleeps = [];
  const state = initialState();
  const client = new DeviceClient({
    coordinator,
    loadLevel,
    data: { x: new Float32Array(8), y: new BigInt64Array(2), n: 2, shape: [2, 4], labels: [1, 3] },
    state,
    sleep: async (ms) => sleeps.push(ms),
    signal: new AbortController().signal,
  });
  return { client, state, sleeps };
}

test('profiles on the reference level, registers, trains, uploads and stops when done', async () => {
  const level = fakeLevel();
  const seenUrls = [];
  const coordinator = fakeCoordinator([{ action: 'wait', retry_after: 2 }, trainTask(1)]);
  const { client, state, sleeps } = device(coordinator, async (url) => {
    seenUrls.push(url);
    return level;
  });
  await client.run();
  assert.equal(seenUrls[0], '/v1/artifacts/conv/e/manifest.json'); // smallest of c-e
  assert.equal(coordinator.profile.reference_rate, 0.0625);
  assert.ok(coordinator.profile.step_ms >= 0);
  assert.deepEqual(sleeps, [2000]);
  assert.equal(level.trained.at(-1).seed, 7);
  assert.deepEqual(level.trained.at(-1).labels, [1, 3]);
  const [upload] = coordinator.uploaded;
  assert.equal(upload.path, '/v1/rounds/1/uploads');
  assert.deepEqual(upload.metadata, { num_samples: 2, labels: [1, 3], metrics: { loss: 0.7, accuracy: 0.5, steps: 1 } });
  assert.deepEqual(upload.tensors.get('w').shape, [2]);
  assert.equal(state.phase, 'done');
  assert.equal(state.uploads, 1);
  assert.equal(state.round, 1);
});

test('a refused token registers again; a closed round moves on to the next task', async () => {
  const level = fakeLevel();
  const coordinator = fakeCoordinator(
    [new ApiError(401, 'unknown_token', 'who are you', ''), trainTask(2), trainTask(3), { action: 'statistics', round: 3, artifact: trainTask(3).artifact, weights_url: '/w', upload_url: '/s' }],
    [new ApiError(409, 'round_closed', 'round 2 closed', '')],
  );
  const { client, state } = device(coordinator, async () => level);
  await client.run();
  assert.equal(coordinator.registered, 2);
  assert.deepEqual(coordinator.uploaded.map((u) => u.path), ['/v1/rounds/3/uploads', '/s']);
  assert.deepEqual(coordinator.uploaded[1].metadata, {});
  assert.equal(state.statisticsUploads, 1);
  const texts = state.messages.map((m) => m.text).join('\n');
  assert.match(texts, /refused this device's token/);
  assert.match(texts, /round 2: too late/);
});

test('a damaged artifact is shown and retried with backoff; nothing is uploaded from it', async () => {
  const level = fakeLevel();
  let failures = 2;
  const coordinator = fakeCoordinator([trainTask(1), trainTask(1), trainTask(1)]);
  const alerts = [];
  const { client, state, sleeps } = device(coordinator, async (url) => {
    if (url.includes('/e/') && coordinator.registered && failures-- > 0) {
      throw new IntegrityError('onnx/train_step.onnx failed its sha256 check');
    }
    return level;
  });
  client.changed = () => state.alert && alerts.push(state.alert);
  await client.run();
  assert.deepEqual(sleeps, [250, 500]);
  assert.match(alerts[0], /damaged download: onnx\/train_step.onnx failed its sha256 check; retrying in 0.3 s/);
  assert.equal(coordinator.uploaded.length, 1);
  assert.equal(state.alert, null);
});

test('non-finite weights are never uploaded', async () => {
  const coordinator = fakeCoordinator([trainTask(1)]);
  const { client, state } = device(coordinator, async () => fakeLevel([Number.NaN, 1]));
  await client.run();
  assert.equal(coordinator.uploaded.length, 0);
  assert.match(state.messages.map((m) => m.text).join('\n'), /non-finite weights; nothing uploaded/);
});
