import assert from 'node:assert/strict';
import { test } from 'node:test';

import { epochBatches } from '../shuffle.js';
import { OnnxLevel, mergeBatchStatistics, mergeMoments } from '../trainer.js';

// A stand-in for onnxruntime: Tensor records what it is given; the train_step "graph"
// subtracts lr from every parameter, adds 1 to every momentum, reports the batch's first
// label as its loss and every example as correct.
class Tensor {
  constructor(type, data, dims) {
    Object.assign(this, { type, data, dims });
  }
}

function fakeLevel() {
  const manifest = {
    num_classes: 4,
    input: { shape: ['batch', 2] },
    parameters: [
      { name: 'w', shape: [2, 2] },
      { name: 'b', shape: [2] },
    ],
    bn_layers: ['n0'],
    hyperparameters: { momentum: 0.9, weight_decay: 0.0005, clip_grad_norm: 1.0 },
  };
  const calls = [];
  const trainStep = {
    async run(feeds) {
      calls.push(feeds);
      const out = {
        loss: new Tensor('float32', Float32Array.of(Number(feeds.y.data[0])), []),
        correct: new Tensor('int64', BigInt64Array.of(BigInt(feeds.y.data.length)), []),
      };
      for (const name of ['w', 'b']) {
        const lr = feeds.lr.data[0];
        out[`updated.param.${name}`] = { data: feeds[`param.${name}`].data.map((v) => v - lr) };
        out[`updated.momentum.${name}`] = { data: feeds[`momentum.${name}`].data.map((v) => v + 1) };
      }
      return out;
    },
  };
  const statistics = {
    async run(feeds) {
      const x = feeds.x.data;
      const n = feeds.x.dims[0];
      let mean = 0;
      for (let i = 0; i < n; i++) mean += x[2 * i];
      mean /= n;
      let v = 0;
      for (let i = 0; i < n; i++) v += (x[2 * i] - mean) ** 2;
      return {
        'mean.n0': { data: Float32Array.of(mean), dims: [1] },
        'var.n0': { data: Float32Array.of(v / n), dims: [1] },
      };
    },
  };
  return { level: new OnnxLevel({ Tensor }, manifest, { train_step: trainStep, statistics }), calls };
}

function data(n) {
  const x = Float32Array.from({ length: 2 * n }, (_, i) => i);
  const y = BigInt64Array.from({ length: n }, (_, i) => BigInt(i % 3));
  return { x, y, n, shape: [n, 2], labels: [0, 1, 2] };
}

test('train feeds every input by name and runs the shared batch order', async () => {
  const { level, calls } = fakeLevel();
  const weights = new Map([
    ['w', new Float32Array([1, 2, 3, 4])],
    ['b', { data: new Float32Array([5, 6]) }],
  ]);
  const progress = [];
  const result = await level.train({
    weights,
    data: data(5),
    labels: [0, 2],
    lr: 0.5,
    epochs: 2,
    batchSize: 2,
    seed: 9,
    onStep: (p) => progress.push(p.epoch),
  });
  const order = [...epochBatches(5, 2, 2, 9)];
  assert.equal(calls.length, order.length);
  calls.forEach((feeds, k) => {
    assert.deepEqual(Array.from(feeds.y.data), Array.from(order[k], (i) => BigInt(i % 3)));
    assert.ok(feeds.y.data instanceof BigInt64Array);
    assert.equal(feeds.y.type, 'int64');
    assert.deepEqual(feeds.x.dims, [order[k].length, 2]);
    assert.deepEqual(Array.from(feeds.x.data), Array.from(order[k]).flatMap((i) => [2 * i, 2 * i + 1]));
    assert.deepEqual(Array.from(feeds.label_mask.data), [1, 0, 1, 0]);
    assert.deepEqual(feeds.lr.dims, []);
    assert.deepEqual(Array.from(feeds['momentum.b'].data), [k, k]); // zero at the start
  });
  assert.deepEqual(Array.from(result.weights.get('w')), [-2, -1, 0, 1]); // 6 steps of 0.5
  assert.deepEqual(progress, [1, 1, 1, 2, 2, 2]);
  assert.equal(result.steps, 6);
  assert.equal(result.accuracy, 1);
  const lossSum = order.reduce((s, b) => s + (b[0] % 3) * b.length, 0);
  assert.equal(result.loss, lossSum / 10);
  assert.deepEqual(Array.from(weights.get('w')), [1, 2, 3, 4]); // inputs untouched
});

test('no data means no step and unchanged weights', async () => {
  const { level } = fakeLevel();
  const w = new Float32Array(4);
  const result = await level.train({
    weights: new Map([['w', w], ['b', new Float32Array(2)]]),
    data: data(0),
    labels: [],
    lr: 0.1,
    epochs: 3,
    batchSize: 4,
    seed: 0,
  });
  assert.equal(result.steps, 0);
  assert.equal(result.loss, 0);
  assert.equal(result.weights.get('w'), w);
});

test('bad weights, data shapes and a stop are reported', async () => {
  const { level } = fakeLevel();
  const args = {
    weights: new Map([['w', new Float32Array(3)], ['b', new Float32Array(2)]]),
    data: data(4),
    labels: [0],
    lr: 0.1,
    epochs: 1,
    batchSize: 2,
    seed: 0,
  };
  await assert.rejects(level.train(args), /weight w/);
  args.weights.set('w', new Float32Array(4));
  await assert.rejects(level.train({ ...args, data: { ...data(4), shape: [4, 3] } }), /does not fit/);
  const stop = new AbortController();
  stop.abort();
  await assert.rejects(level.train({ ...args, signal: stop.signal }), { name: 'AbortError' });
  assert.deepEqual(level.mismatchedHyperparameters({ momentum: 0.9, weight_decay: 0.001 }), ['weight_decay']);
});

test('moments merge exactly (hand-worked) and statistics run over batches of 500', async () => {
  // {1, 3} and {5}: mean 3, biased variance 8/3
  const [n, mean, variance] = mergeMoments([2, [2], [1]], [1, [5], [0]]);
  assert.equal(n, 3);
  assert.deepEqual(Array.from(mean), [3]);
  assert.ok(Math.abs(variance[0] - 8 / 3) < 1e-15);
  const merged = mergeBatchStatistics(['n0'], [
    [2, [{ data: Float32Array.of(2), dims: [1] }, { data: Float32Array.of(1), dims: [1] }]],
    [1, [{ data: Float32Array.of(5), dims: [1] }, { data: Float32Array.of(0), dims: [1] }]],
  ]);
  assert.deepEqual([...merged.keys()], ['n0.count', 'n0.mean', 'n0.var']);
  assert.deepEqual(merged.get('n0.count').shape, []);
  assert.equal(merged.get('n0.var').data[0], Math.fround(8 / 3));

  const { level } = fakeLevel();
  const weights = new Map([['w', new Float32Array(4)], ['b', new Float32Array(2)]]);
  const stats = await level.statistics(weights, data(1201));
  assert.equal(stats.get('n0.count').data[0], 1201);
  assert.ok(Math.abs(stats.get('n0.mean').data[0] - 1200) < 1e-3); // x[2i] = 2i, mean 1200
});
