import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { SplitMix64, epochBatches, shuffled, statsBatches } from '../shuffle.js';

// The same file tests/test_batching.py checks: one source of truth for both languages.
const vectors = JSON.parse(
  readFileSync(new URL('../../tests/vectors/shuffle.json', import.meta.url), 'utf8'),
);

test('SplitMix64 streams match the shared vectors', () => {
  for (const { seed, next64 } of vectors.splitmix64) {
    const rng = new SplitMix64(seed);
    assert.deepEqual(
      next64.map(() => rng.next64().toString()),
      next64,
      `seed ${seed}`,
    );
  }
});

test('bounded draws match the shared vectors, rejections included', () => {
  for (const { seed, bounds, values, state_after: stateAfter } of vectors.below) {
    const rng = new SplitMix64(seed);
    assert.deepEqual(bounds.map((b) => rng.below(b)), values, `seed ${seed}`);
    assert.equal(rng.state.toString(), stateAfter);
  }
});

test('epoch batches match the shared vectors', () => {
  for (const c of vectors.epoch_batches) {
    const got = [...epochBatches(c.num_examples, c.epochs, c.batch_size, c.seed)].map((b) =>
      Array.from(b),
    );
    assert.deepEqual(got, c.batches, `seed ${c.seed}, n ${c.num_examples}`);
  }
});

test('a shuffle of 60000 is a permutation', () => {
  const order = shuffled(60000, new SplitMix64(5));
  const seen = new Uint8Array(60000);
  for (const i of order) seen[i] += 1;
  assert.ok(seen.every((v) => v === 1));
});

test('out-of-range seeds, bounds and batch sizes are refused', () => {
  assert.throws(() => new SplitMix64(2 ** 32), RangeError);
  assert.throws(() => new SplitMix64(-1), RangeError);
  assert.throws(() => new SplitMix64(1.5), RangeError);
  assert.throws(() => new SplitMix64(0).below(0), RangeError);
  assert.throws(() => [...epochBatches(3, 1, 0, 0)], RangeError);
});

test('statistics batches are consecutive ranges of 500', () => {
  assert.deepEqual([...statsBatches(1201)], [[0, 500], [500, 1000], [1000, 1201]]);
});
