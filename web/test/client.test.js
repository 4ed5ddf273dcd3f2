import assert from 'node:assert/strict';
import { test } from 'node:test';

import { DeviceClient, ENROLLMENT_MESSAGE, FatalError, initialState } from '../client.js';
import { decodeTensors, encodeTensors } from '../encoding.js';
import { ApiError, IntegrityError } from '../protocol.js';

const manifest = { level: 'e', parameters: [{ name: 'w', shape: [2] }] };

function fakeLevel(result = [0.5, -0.5], { gate = null, entered = () => {} } = {}) {
  return {
    manifest,
    trained: [],
    mismatchedHyperparameters: () => [],
    async profile(data) {
      this.profiled = data;
      return 4.5;
    },
    async train(args) {
      this.trained.push(args);
      entered();
      if (gate) await gate;
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
    heartbeats: 0,
    heartbeatReply: 5,
    failHeartbeats: 0,
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
      if (this.refuseRegistration) throw this.refuseRegistration;
      return { device_id: `d${this.registered}`, token: 't', level: null, rate: null, heartbeat_seconds: this.heartbeatReply };
    },
    async heartbeat() {
      this.heartbeats += 1;
      if (this.failHeartbeats-- > 0) throw new TypeError('Failed to fetch');
      return { device_id: 'd1', state: 'training' };
    },
    async task() {
      const next = tasks.shift() ?? { action: 'done' };
      if (next instanceof Error) throw next;
      return next;
    },
    weights: { tensors: new Map([['w', { dtype: 'F32', shape: [2], data: new Float32Array(2) }]]), metadata: null },
    async tensors() {
      return this.weights;
    },
    async upload(path, tensors, metadata, encoded = {}) {
      const next = uploads.shift();
      if (next instanceof Error) throw next;
      this.uploaded.push({ path, tensors, metadata, encoded });
      return {};
    },
  };
}

/** setInterval / clearInterval on a clock the test moves (advance awaits each tick's work). */
function fakeTimers() {
  return {
    now: 0,
    timers: new Map(),
    next: 1,
    setInterval(fn, ms) {
      const id = this.next++;
      this.timers.set(id, { fn, ms, at: this.now + ms });
      return id;
    },
    clearInterval(id) {
      this.timers.delete(id);
    },
    async advance(ms) {
      const end = this.now + ms;
      for (;;) {
        const due = [...this.timers.values()].filter((t) => t.at <= end).sort((a, b) => a.at - b.at)[0];
        if (!due) break;
        this.now = due.at;
        due.at += due.ms;
        await due.fn();
      }
      this.now = end;
    },
  };
}

function device(coordinator, loadLevel, timers = fakeTimers()) {
  const sleeps = [];
  const state = initialState();
  const client = new DeviceClient({
    coordinator,
    loadLevel,
    data: { x: new Float32Array(8), y: new BigInt64Array(2), n: 2, shape: [2, 4], labels: [1, 3] },
    state,
    sleep: async (ms) => sleeps.push(ms),
    signal: new AbortController().signal,
    timers,
  });
  return { client, state, sleeps, timers };
}

/** A promise and its resolve function. */
function deferred() {
  let resolve;
  const promise = new Promise((r) => {
    resolve = r;
  });
  return { promise, resolve };
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
  assert.deepEqual(coordinator.profile, {
    step_ms: 4.5, // the level's own (median) profile
    reference_rate: 0.0625,
    memory_mb: 2048,
    bandwidth_mbps: coordinator.profile.bandwidth_mbps,
    num_examples: 2, // the examples it trains on: the policy plans its steps from them
  });
  assert.equal(level.profiled.n, 2);
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

test('a stale update (buffered aggregation) is logged like a closed round; the device takes the next task', async () => {
  const level = fakeLevel();
  const coordinator = fakeCoordinator(
    [trainTask(2), trainTask(5)],
    [new ApiError(409, 'stale_update', 'version 1 is 4 versions behind', '')],
  );
  const { client, state } = device(coordinator, async () => level);
  await client.run();
  assert.equal(coordinator.registered, 1);
  assert.deepEqual(coordinator.uploaded.map((u) => u.path), ['/v1/rounds/5/uploads']);
  assert.equal(state.uploads, 1);
  assert.match(state.messages.map((m) => m.text).join('\n'), /round 2: too late/);
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

test('heartbeats go out every heartbeat_seconds while a task is worked on, and stop after', async () => {
  const gate = deferred();
  const entered = deferred();
  const level = fakeLevel([0.5, -0.5], { gate: gate.promise, entered: entered.resolve });
  const coordinator = fakeCoordinator([trainTask(1), { action: 'wait', retry_after: 1 }]);
  coordinator.heartbeatReply = 2; // the registration reply's interval
  const { client, state, timers } = device(coordinator, async () => level);
  const running = client.run();
  await entered.promise; // training, blocked on the gate
  assert.equal(coordinator.heartbeats, 0);
  await timers.advance(10_000);
  assert.equal(coordinator.heartbeats, 5);
  assert.equal(state.heartbeats, 5);
  gate.resolve();
  await running;
  assert.equal(timers.timers.size, 0); // the beat stopped with the task
  await timers.advance(60_000);
  assert.equal(coordinator.heartbeats, 5);
  assert.equal(coordinator.uploaded.length, 1);
});

test('a task reply sets the interval for a device resuming with a stored token', async () => {
  const gate = deferred();
  const entered = deferred();
  const level = fakeLevel([0.5, -0.5], { gate: gate.promise, entered: entered.resolve });
  const coordinator = fakeCoordinator([{ ...trainTask(4), heartbeat_seconds: 3 }]);
  coordinator.identity = { token: 'stored', device_id: 'd9', level: 'e', rate: 0.0625 };
  const { client, timers } = device(coordinator, async () => level);
  const running = client.run();
  await entered.promise;
  await timers.advance(9_000);
  assert.equal(coordinator.registered, 0);
  assert.equal(coordinator.heartbeats, 3);
  gate.resolve();
  await running;
});

test('without an interval from the coordinator a device beats every 5 s', async () => {
  const gate = deferred();
  const entered = deferred();
  const level = fakeLevel([0.5, -0.5], { gate: gate.promise, entered: entered.resolve });
  const coordinator = fakeCoordinator([trainTask(1)]);
  coordinator.heartbeatReply = undefined;
  const { client, timers } = device(coordinator, async () => level);
  const running = client.run();
  await entered.promise;
  await timers.advance(14_999);
  assert.equal(coordinator.heartbeats, 2);
  gate.resolve();
  await running;
});

test('failed heartbeats are logged once and the work goes on', async () => {
  const gate = deferred();
  const entered = deferred();
  const level = fakeLevel([0.5, -0.5], { gate: gate.promise, entered: entered.resolve });
  const coordinator = fakeCoordinator([trainTask(1)]);
  coordinator.heartbeatReply = 1;
  coordinator.failHeartbeats = 3;
  const { client, state, timers } = device(coordinator, async () => level);
  const running = client.run();
  await entered.promise;
  await timers.advance(5_000);
  gate.resolve();
  await running;
  const failures = state.messages.filter((m) => m.text.startsWith('heartbeat failed'));
  assert.equal(failures.length, 1);
  assert.match(failures[0].text, /Failed to fetch/);
  assert.equal(coordinator.heartbeats, 5);
  assert.equal(state.heartbeats, 2); // acknowledged ones
  assert.equal(coordinator.uploaded.length, 1);
  assert.equal(state.phase, 'done');
});

test('a refused enrollment stops the device with what to do, without retrying', async () => {
  for (const code of ['enrollment_required', 'bad_enrollment_token']) {
    const coordinator = fakeCoordinator([trainTask(1)]);
    coordinator.refuseRegistration = new ApiError(401, code, 'registration needs the device link', '');
    const { client, state, sleeps } = device(coordinator, async () => fakeLevel());
    await assert.rejects(client.run(), (err) => err instanceof FatalError && err.message === ENROLLMENT_MESSAGE);
    assert.equal(coordinator.registered, 1);
    assert.deepEqual(sleeps, []);
    assert.equal(state.alert, ENROLLMENT_MESSAGE);
    assert.equal(state.phase, 'stopped');
    assert.equal(coordinator.uploaded.length, 0);
  }
});

test('statistics progress is reported batch by batch', async () => {
  const level = fakeLevel();
  level.statistics = async (weights, data, signal, onBatch) => {
    for (let batch = 1; batch <= 3; batch++) await onBatch({ batch, batches: 3 });
    return new Map([['n.count', { dtype: 'F32', shape: [], data: Float32Array.of(2) }]]);
  };
  const coordinator = fakeCoordinator([
    { action: 'statistics', round: 2, artifact: trainTask(2).artifact, weights_url: '/w', upload_url: '/s' },
  ]);
  const { client, state } = device(coordinator, async () => level);
  const seen = [];
  client.changed = () => state.phase === 'statistics' && seen.push(`${state.statsBatch}/${state.statsBatches}`);
  await client.run();
  assert.deepEqual([...new Set(seen)], ['0/null', '0/1', '1/3', '2/3', '3/3']); // 2 examples: 1 batch of 500 announced
  assert.equal(state.statisticsUploads, 1);
});

test('weights come in the task\'s encoding and updates go up in its upload encoding', async () => {
  const level = fakeLevel([0.75, -0.25]);
  const encodedTask = (round, seed) => ({
    ...trainTask(round),
    rounding_seed: seed,
    download_encoding: 'fp16',
    upload_encoding: 'int8',
    error_feedback: true,
    encoding_note: round === 1 ? 'the run uses download bf16 at level e; fp16 instead' : null,
  });
  const coordinator = fakeCoordinator(
    [encodedTask(1, 5), encodedTask(2, 6), encodedTask(3, 7)],
    [undefined, new ApiError(409, 'round_closed', 'too late', '')],
  );
  const start = Float32Array.of(0.5, 0.125);
  coordinator.weights = encodeTensors(new Map([['w', { data: start, shape: [2] }]]), 'fp16');
  const { client, state } = device(coordinator, async () => level);
  await client.run();
  assert.deepEqual(Array.from(level.trained[0].weights.get('w')), [0.5, 0.125]); // decoded fp16
  const [first, third] = coordinator.uploaded;
  assert.equal(first.tensors.get('w').dtype, 'I8');
  assert.equal(first.encoded.encoding, '"int8"');
  const update = decodeTensors(first.tensors, first.encoded).arrays.get('w').data;
  // The update (trained - received) within one int8 step of its row (peak 0.375 / 127).
  const step = Math.fround(0.375 / 127);
  assert.ok(Math.abs(update[0] - 0.25) <= step && Math.abs(update[1] + 0.375) <= step, `${update}`);
  // Round 2's upload was refused: its residual is dropped, so round 3 encodes as a fresh device.
  const fresh = encodeTensors(new Map([['w', { data: Float32Array.of(0.25, -0.375), shape: [2] }]]), 'int8', 7);
  assert.deepEqual(Array.from(third.tensors.get('w').data), Array.from(fresh.tensors.get('w').data));
  assert.equal(state.lastUpload.encoding, 'int8');
  const notes = state.messages.filter((m) => m.text.includes('fp16 instead'));
  assert.equal(notes.length, 1); // said once
});
