import assert from 'node:assert/strict';
import { test } from 'node:test';

import { materialise } from '../data.js';
import { fromBase64 } from '../secagg_device.js';
import { RemoteLevel, TrainerWorker, WorkerError } from '../remote_level.js';
import { OnnxLevel } from '../trainer.js';
import { WorkerHost, transferables } from '../worker_host.js';

import { data, fakeOrt, files, manifest } from './fake_ort.js';

/**
 * A Worker stand-in: messages cross by structured clone (transfers detach the sender's
 * buffers), are delivered on a later turn, and stop once terminated, as postMessage does.
 */
function fakeWorker(ort, secagg = undefined) {
  const worker = {
    terminated: false,
    received: [],
    onmessage: null,
    onerror: null,
    postMessage(message, transfer) {
      const copy = structuredClone(message, { transfer });
      this.received.push(copy.op);
      setImmediate(() => !this.terminated && host.handle(copy));
    },
    terminate() {
      this.terminated = true;
    },
  };
  const host = new WorkerHost(ort, (message, transfer) => {
    const copy = structuredClone(message, { transfer });
    setImmediate(() => !worker.terminated && worker.onmessage?.({ data: copy }));
  }, secagg);
  return worker;
}

function weights() {
  return new Map([
    ['w', Float32Array.of(1, 2, 3, 4)],
    ['b', Float32Array.of(5, 6)],
  ]);
}

const trainArgs = (d) => ({ weights: weights(), data: d, labels: [0, 2], lr: 0.5, epochs: 2, batchSize: 2, seed: 9 });

test('training, statistics and the profile in the worker equal the trainer in the page', async () => {
  const ort = fakeOrt();
  let worker;
  const trainer = new TrainerWorker(() => (worker = fakeWorker(ort)));
  assert.deepEqual(await trainer.init(4), { threads: 1, isolated: false, version: 'fake' }); // node: not isolated
  const level = await trainer.level('/v1/artifacts/conv/e/manifest.json', manifest, files);
  assert.ok(level instanceof RemoteLevel);
  assert.deepEqual(level.mismatchedHyperparameters({ momentum: 0.8 }), ['momentum']);
  const local = await OnnxLevel.create(fakeOrt(), manifest, files);
  const d = data(5);

  const steps = [];
  const got = await level.train({ ...trainArgs(d), onStep: (p) => steps.push(p) });
  const expected = await local.train(trainArgs(d));
  assert.deepEqual([...got.weights.keys()], ['w', 'b']);
  for (const name of ['w', 'b']) assert.deepEqual(Array.from(got.weights.get(name)), Array.from(expected.weights.get(name)));
  assert.deepEqual([got.steps, got.loss, got.accuracy, got.numExamples], [6, expected.loss, 1, 5]);
  assert.deepEqual(steps.map((p) => [p.epoch, p.step]), [[1, 1], [1, 2], [1, 3], [2, 4], [2, 5], [2, 6]]);

  const batches = [];
  const stats = await level.statistics(weights(), d, undefined, (p) => batches.push(p));
  const localStats = await local.statistics(weights(), d);
  assert.deepEqual([...stats.keys()], [...localStats.keys()]);
  for (const [name, t] of localStats) assert.deepEqual(stats.get(name), t);
  assert.deepEqual(batches, [{ batch: 1, batches: 1 }]);

  assert.equal(typeof (await level.profile(d, { warmup: 1, steps: 3 })), 'number');
  // the data crossed once; the level's sessions were made once
  assert.equal(worker.received.filter((op) => op === 'data').length, 1);
  assert.equal(ort.created, 2);
  await trainer.level('/v1/artifacts/conv/e/manifest.json', manifest, files);
  assert.equal(worker.received.filter((op) => op === 'level').length, 1);
});

test('uint8 pixels cross compact and are standardised in the worker', async () => {
  const ort = fakeOrt();
  let worker;
  const trainer = new TrainerWorker(() => (worker = fakeWorker(ort)));
  const level = await trainer.level('k', manifest, files);
  // the stand-in model takes [2] per example: two channels of one pixel each
  const compact = {
    pixels: Uint8Array.of(0, 64, 128, 255),
    normalise: { scale: 255, mean: [0.5, 0.25], std: [0.25, 0.5] },
    y: BigInt64Array.of(1n, 2n),
    n: 2,
    shape: [2, 2],
    labels: [1, 2],
  };
  const got = await level.train({ ...trainArgs(compact), epochs: 1, batchSize: 2 });
  const sent = worker.received.indexOf('data');
  assert.ok(sent >= 0);
  const floats = materialise(compact).x;
  const fed = ort.calls.at(-1).x.data; // one batch of both examples, in the seed's order
  assert.deepEqual(Array.from(fed).sort(), Array.from(floats).sort());
  const local = await OnnxLevel.create(fakeOrt(), manifest, files);
  const expected = await local.train({ ...trainArgs(materialise(compact)), epochs: 1, batchSize: 2 });
  assert.deepEqual(Array.from(got.weights.get('w')), Array.from(expected.weights.get('w')));
  assert.equal(got.loss, expected.loss);
});

test('Stop ends the worker at once: pending calls reject with the stop, nothing runs after', async () => {
  const ort = fakeOrt();
  let release;
  const held = new Promise((resolve) => {
    release = resolve;
  });
  const slow = ort.InferenceSession.create;
  ort.InferenceSession.create = async (bytes) => {
    const session = await slow(bytes);
    const run = session.run.bind(session);
    session.run = async (feeds) => {
      await held; // a step that never ends by itself
      return run(feeds);
    };
    return session;
  };
  const controller = new AbortController();
  let worker;
  const trainer = new TrainerWorker(() => (worker = fakeWorker(ort)), { signal: controller.signal });
  const level = await trainer.level('k', manifest, files);
  const steps = [];
  const training = level.train({ ...trainArgs(data(5)), onStep: (p) => steps.push(p), signal: controller.signal });
  await new Promise((resolve) => setImmediate(resolve));
  await new Promise((resolve) => setImmediate(resolve));
  const reason = new DOMException('stopped by the user', 'AbortError');
  controller.abort(reason);
  await assert.rejects(training, (err) => err === reason);
  assert.equal(worker.terminated, true);
  assert.equal(trainer.dead, reason);
  await assert.rejects(level.statistics(weights(), data(5)), (err) => err === reason);
  release();
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(steps, []); // the stopped step never reported
});

test('worker failures reject what is pending with a message', async () => {
  const ort = fakeOrt();
  let worker;
  const trainer = new TrainerWorker(() => (worker = fakeWorker(ort)));
  await assert.rejects(trainer.call('train', { level: 'nothing' }), /has no level nothing/);
  await assert.rejects(trainer.call('explode', {}), /no operation "explode"/);
  const never = trainer.call('level', { key: 'k', manifest, files });
  worker.terminated = true; // the worker's script died before answering
  worker.onerror({ message: 'Uncaught SyntaxError', preventDefault() {} });
  await assert.rejects(never, (err) => err instanceof WorkerError && /Uncaught SyntaxError/.test(err.message));
  await assert.rejects(trainer.level('k2', manifest, files), WorkerError);
});

test('only whole, distinct, unshared buffers are transferred', () => {
  const owned = new Float32Array(4);
  const big = new Float32Array(8);
  const views = [owned, owned, big.subarray(0, 2), big.subarray(2, 4)];
  assert.deepEqual(transferables(views), [owned.buffer]);
  if (typeof SharedArrayBuffer === 'function') {
    assert.deepEqual(transferables([new Float32Array(new SharedArrayBuffer(16))]), []);
  }
});

test('secure aggregation through the worker: keys made there, its refusals arrive as SecAggSkip', async () => {
  const trainer = new TrainerWorker(() => fakeWorker(fakeOrt()));
  const stage = { round: 3, phase: 'training', context: 'round 3 training ab', index: 2 };
  const keys = await trainer.secagg.answer({ ...stage, stage: 'advertise' });
  assert.deepEqual(Object.keys(keys).sort(), ['c_public', 'context', 's_public', 'stage']);
  for (const key of [keys.c_public, keys.s_public]) {
    const point = fromBase64(key);
    assert.equal(point.length, 65); // an uncompressed P-256 point
    assert.equal(point[0], 4);
  }
  // the client decides on the error's name, which must survive the worker boundary
  await assert.rejects(trainer.secagg.answer({ ...stage, context: 'another', stage: 'unmask' }), {
    name: 'SecAggSkip',
    message: /no keys for this aggregation/,
  });
  const secure = { context: 'another', layers: [], peers: {}, ciphertexts: {} };
  await assert.rejects(trainer.secagg.maskStatistics(secure, new Map()), { name: 'SecAggSkip' });
});
