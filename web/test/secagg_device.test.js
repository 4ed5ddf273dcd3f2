import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { DeviceClient, initialState } from '../client.js';
import { serializeSafetensors } from '../safetensors.js';
import { SecAggClient } from '../secagg.js';
import { KEPT_INSTANCES, SecAggDevice, fromBase64, statisticsLayout, toBase64 } from '../secagg_device.js';
import { WorkerHost } from '../worker_host.js';
import { stream } from './stream.js';

// Written by tests/vectors/make_vectors.py: the Python device (device_sim.Device) answering
// and masking in two instances, training and statistics, beside three protocol clients.
const vectors = JSON.parse(
  readFileSync(new URL('../../tests/vectors/secagg.json', import.meta.url), 'utf8'),
).device;

/** A SecAggDevice whose instances have the vectors' fixed keys and random streams. */
function fixedDevice(...cases) {
  return new SecAggDevice({
    create: (context, index) => {
      const c = cases.find((x) => x.context === context);
      return SecAggClient.create(context, index, {
        random: stream(c.random_label),
        keys: {
          c: { scalar: BigInt(`0x${c.c_private}`), publicBytes: fromBase64(c.advertise.c_public) },
          s: { scalar: BigInt(`0x${c.s_private}`), publicBytes: fromBase64(c.advertise.s_public) },
        },
      });
    },
  });
}

const advertiseTask = (c) => ({ ...c.share_task, stage: 'advertise', threshold: null, neighbours: [] });
const floats = (record) => new Map(Object.entries(record).map(([name, v]) => [name, Float32Array.from(v)]));
const sha256 = (bytes) => createHash('sha256').update(bytes).digest('hex');

test('base64 as Python writes it; anything else is refused', () => {
  const bytes = Uint8Array.from({ length: 70000 }, (_, i) => (i * 7) & 0xff); // past one chunk
  assert.equal(toBase64(bytes), Buffer.from(bytes).toString('base64'));
  assert.deepEqual(fromBase64(toBase64(bytes)), bytes);
  for (const bad of ['abc', 'a b=', '!!!!', 12]) assert.throws(() => fromBase64(bad), { name: 'SecAggSkip' });
});

test("the browser's answers and masked training update equal the Python device's", async () => {
  const c = vectors.training;
  const device = fixedDevice(c);
  assert.deepEqual(await device.answer(advertiseTask(c)), c.advertise);
  assert.deepEqual(await device.answer(c.share_task), c.share_answer);
  const masked = await device.maskTraining(c.secure, c.rate, floats(c.received), floats(c.trained), c.labels);
  assert.ok(masked instanceof Uint32Array);
  assert.deepEqual(Array.from(masked), c.masked);
  const body = serializeSafetensors(new Map([['masked', { data: masked, shape: [masked.length], dtype: 'U32' }]]), {});
  assert.equal(sha256(body), c.upload_sha256); // the bytes the Python device uploads
  assert.deepEqual(await device.answer(c.unmask_task), c.unmask_answer);
  // a second unmasking request is refused, as Python's duplicate_unmask
  await assert.rejects(device.answer(c.unmask_task), { name: 'SecAggSkip', message: /already/ });
});

test("an int8 run's masked update is the Python device's, in Z_2^10 as uint16 bytes", async () => {
  const c = vectors.training_int8;
  assert.equal(c.secure.encoding, 'int8');
  const device = fixedDevice(c);
  assert.deepEqual(await device.answer(advertiseTask(c)), c.advertise);
  assert.deepEqual(await device.answer(c.share_task), c.share_answer);
  const received = floats(c.received);
  const masked = await device.maskTraining(c.secure, c.rate, received, floats(c.trained), c.labels, c.rounding_seed);
  assert.ok(masked instanceof Uint16Array);
  assert.ok(masked.every((x) => x < 2 ** c.secure.modulus_bits));
  assert.deepEqual(Array.from(masked), c.masked);
  const body = serializeSafetensors(new Map([['masked', { data: masked, shape: [masked.length], dtype: 'U16' }]]), {});
  assert.equal(sha256(body), c.upload_sha256);
  assert.deepEqual(await device.answer(c.unmask_task), c.unmask_answer);
});

test("the browser's masked sBN statistics equal the Python device's", async () => {
  const c = vectors.statistics;
  const device = fixedDevice(c);
  await device.answer(advertiseTask(c));
  assert.deepEqual(await device.answer(c.share_task), c.share_answer);
  const stats = new Map(
    Object.entries(c.statistics).map(([name, v]) => [name, { dtype: 'F32', shape: [v.length], data: Float32Array.from(v) }]),
  );
  const masked = await device.maskStatistics(c.secure, stats);
  assert.deepEqual(Array.from(masked), c.masked);
  assert.equal(masked.length, statisticsLayout(c.secure.layers).segments[0].shape[0]);
  assert.deepEqual(await device.answer(c.unmask_task), c.unmask_answer);
});

test('refusals skip: unknown context, a second share, a wrong plan rate, the fifth instance evicts the first', async () => {
  const c = vectors.training;
  const device = fixedDevice(c);
  await assert.rejects(device.answer(c.share_task), { name: 'SecAggSkip', message: /no keys for this aggregation/ });
  await device.answer(advertiseTask(c));
  await device.answer(c.share_task);
  await assert.rejects(device.answer(c.share_task), { name: 'SecAggSkip', message: /shared already/ });
  await assert.rejects(
    device.maskTraining(c.secure, 0.3, floats(c.received), floats(c.trained), c.labels),
    { name: 'SecAggSkip', message: /cannot mask: rate 0.3 is not a level/ },
  );
  const stranger = { ...c.secure, peers: { ...c.secure.peers, 9: 1 } };
  await assert.rejects(device.maskTraining(stranger, c.rate, floats(c.received), floats(c.trained), c.labels), {
    name: 'SecAggSkip',
    message: /client 9 is not a neighbour/,
  });
  const fresh = new SecAggDevice();
  for (let i = 0; i <= KEPT_INSTANCES; i++) await fresh.answer({ ...advertiseTask(c), context: `ctx ${i}` });
  assert.deepEqual([...fresh.instances.keys()], ['ctx 1', 'ctx 2', 'ctx 3', 'ctx 4']);
  await assert.rejects(fresh.answer({ ...c.unmask_task, context: 'ctx 0' }), /no keys/);
});

test("the training worker's secagg operation runs SecAggDevice there and transfers the vector", async () => {
  const c = vectors.training;
  const posted = [];
  const host = new WorkerHost({}, (message, transfer) => posted.push({ message, transfer }), fixedDevice(c));
  await host.handle({ id: 1, op: 'secagg', method: 'answer', args: [advertiseTask(c)] });
  await host.handle({ id: 2, op: 'secagg', method: 'answer', args: [c.share_task] });
  await host.handle({
    id: 3, op: 'secagg', method: 'maskTraining', args: [c.secure, c.rate, floats(c.received), floats(c.trained), c.labels],
  });
  await host.handle({ id: 4, op: 'secagg', method: 'instances', args: [] });
  assert.deepEqual(posted[0].message, { id: 1, ok: true, result: c.advertise });
  assert.deepEqual(posted[1].message.result, c.share_answer);
  assert.deepEqual(Array.from(posted[2].message.result), c.masked);
  assert.deepEqual(posted[2].transfer, [posted[2].message.result.buffer]);
  assert.equal(posted[3].message.ok, false); // only the three operations are reachable
  assert.match(posted[3].message.error.message, /no operation "instances"/);
});

/** A coordinator that hands out the vectors' tasks and keeps what the device sends. */
function scriptedCoordinator(tasks, weights) {
  return {
    identity: { token: 't', device_id: 'd1', level: 'b', rate: 0.5 },
    token: 't',
    bytesSent: 0,
    bytesReceived: 0,
    answers: [],
    uploaded: [],
    forget() {},
    async task() {
      return tasks.shift() ?? { action: 'done' };
    },
    async heartbeat() {
      return { device_id: 'd1', state: 'training' };
    },
    async tensors() {
      return { tensors: weights, metadata: null };
    },
    async answer(path, body) {
      this.answers.push({ path, body });
      return { accepted: true, round: 7 };
    },
    async upload(path, tensors, metadata, encoded = {}) {
      const body = serializeSafetensors(tensors, { ...metadata, ...encoded }); // as protocol.js
      this.uploaded.push({ path, tensors, metadata, body });
      this.lastUpload = { path, body };
      return { accepted: true, round: 7 };
    },
  };
}

test('a browser device in a secure round: answers each stage and uploads only the masked update', async () => {
  const c = vectors.training;
  const shapes = { w: [2, 3], cls: [4, 2] };
  const manifest = { level: 'b', parameters: Object.entries(shapes).map(([name, shape]) => ({ name, shape })) };
  const weights = new Map(
    Object.entries(c.received).map(([name, v]) => [name, { dtype: 'F32', shape: shapes[name], data: Float32Array.from(v) }]),
  );
  const level = {
    manifest,
    mismatchedHyperparameters: () => [],
    async train() {
      return { weights: floats(c.trained), numExamples: 3, steps: 1, loss: 0.25, accuracy: 0.5 };
    },
  };
  const train = {
    action: 'train', round: 7, seed: 1, level: 'b', rate: c.rate, lr: 0.01, secure: c.secure,
    hyperparameters: { epochs: 1, batch_size: 10, momentum: 0.9, weight_decay: 5e-4, clip_grad_norm: null },
    artifact: { model: 'conv', level: 'b', manifest_url: '/m', formats: ['onnx'] },
    weights_url: '/v1/rounds/7/weights', upload_url: '/v1/rounds/7/uploads', heartbeat_seconds: 60,
  };
  const coordinator = scriptedCoordinator(
    [
      advertiseTask(c), c.share_task, train, c.unmask_task,
      { ...c.unmask_task, context: 'gone' }, // an instance it holds no keys for (a reload)
      { ...c.unmask_task, context: 'gone' }, // asked again until the stage closes
      { ...train, secure: { ...c.secure, context: 'gone' } },
    ],
    weights,
  );
  const state = initialState();
  const sleeps = [];
  const client = new DeviceClient({
    coordinator,
    loadLevel: async () => level,
    data: { n: 3, labels: c.labels },
    state,
    sleep: async (ms) => sleeps.push(ms),
    signal: new AbortController().signal,
    secagg: fixedDevice(c),
  });
  await client.run();
  assert.deepEqual(
    coordinator.answers.map((a) => a.body),
    [c.advertise, c.share_answer, c.unmask_answer],
  );
  assert.ok(coordinator.answers.every((a) => a.path === '/v1/rounds/7/secagg'));
  assert.equal(coordinator.uploaded.length, 1);
  const [upload] = coordinator.uploaded;
  assert.deepEqual([...upload.tensors.keys()], ['masked']); // nothing else: no labels, metrics or counts
  assert.deepEqual(upload.metadata, {});
  assert.equal(sha256(upload.body), c.upload_sha256);
  assert.equal(state.uploads, 1);
  assert.equal(state.lastUpload.masked, true);
  assert.equal(state.secaggAnswers, 3);
  assert.equal(state.phase, 'done');
  // the stage of an instance it holds no keys for is logged once and left unanswered; that
  // instance's stage and training task are then waited out, not answered or trained again
  const out = state.messages.filter((m) => m.level === 'warn');
  assert.equal(out.length, 1);
  assert.match(out[0].text, /secure aggregation unmask: no keys for this aggregation.*out of this aggregation/);
  assert.deepEqual(sleeps, [2000, 2000]);
});
