import assert from 'node:assert/strict';
import { test } from 'node:test';

import { epochBatches } from '../shuffle.js';
import { OnnxLevel, median, mergeBatchStatistics, mergeMoments, profileStepMs } from '../trainer.js';

import { Tensor, data, manifest, statistics, trainStep } from './fake_ort.js';

function fakeLevel() {
  const calls = [];
  return { level: new OnnxLevel({ Tensor }, manifest, { train_step: trainStep(calls), statistics: statistics() }), calls };
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
  const batches = [];
  const stats = await level.statistics(weights, data(1201), undefined, (p) => batches.push(p));
  assert.deepEqual(batches, [
    { batch: 1, batches: 3 },
    { batch: 2, batches: 3 },
    { batch: 3, batches: 3 },
  ]);
  assert.equal(stats.get('n0.count').data[0], 1201);
  assert.ok(Math.abs(stats.get('n0.mean').data[0] - 1200) < 1e-3); // x[2i] = 2i, mean 1200
});

test('the profile is the median of single timed steps after an untimed warm-up', async () => {
  const { level, calls } = fakeLevel();
  // A clock that reads 0 at the start, then each step took: 50 (warm-up), 40, 9, 7, 1000, 8 ms.
  const durations = [50, 40, 9, 7, 1000, 8];
  let clock = 0;
  const readings = [0, ...durations.map((d) => (clock += d))];
  const now = () => readings.shift();
  const ms = await profileStepMs(level, data(25), { warmup: 2, steps: 4, now });
  assert.equal(ms, median([9, 7, 1000, 8]));
  assert.equal(ms, 8.5);
  assert.equal(calls.length, 6); // warm-up and timed steps, one batch each
  for (const feeds of calls) {
    assert.deepEqual(feeds.x.dims, [10, 2]); // min(10, n) examples, the first ones
    assert.equal(feeds.lr.data[0], 0);
  }
  assert.equal(median([3, 1, 2]), 2);
});
