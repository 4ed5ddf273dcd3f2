import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { DataError, demoData, materialise, standardise } from '../data.js';

// float32 bits of coordinator.demo_data.Normalise.apply (image_arrays' arithmetic) per channel.
const { cases } = JSON.parse(
  readFileSync(new URL('../../tests/vectors/standardise.json', import.meta.url), 'utf8'),
);

test('standardising uint8 pixels per channel is bit-identical to Python for every value', () => {
  assert.ok(cases.length >= 3);
  for (const { normalise, bits } of cases) {
    const channels = normalise.mean.length;
    const pixels = Uint8Array.from({ length: channels * 256 }, (_, i) => i % 256); // [1, C, 256]
    const got = new Uint32Array(standardise(pixels, [1, channels, 256], normalise).buffer);
    assert.deepEqual(Array.from(got), bits.flat(), JSON.stringify(normalise));
  }
});

test('channels are planes of the row-major [n, C, H, W] layout', () => {
  const rule = { scale: 255, mean: [0, 0.5], std: [1, 0.25] };
  const pixels = Uint8Array.of(0, 255, 255, 0, 51, 102, 153, 204); // n=2, C=2, H*W=2
  const x = standardise(pixels, [2, 2, 1, 2], rule);
  const f = Math.fround;
  const c0 = (p) => f(f(f(p / 255) - 0) / 1);
  const c1 = (p) => f(f(f(p / 255) - f(0.5)) / f(0.25));
  assert.deepEqual(Array.from(x), [c0(0), c0(255), c1(255), c1(0), c0(51), c0(102), c1(153), c1(204)]);
});

function shard(x, y, metadata) {
  return demoData(new Map([['x', x], ['y', y]]), metadata);
}

test('demo shards: uint8 with its rule, or float32 without; labels held', () => {
  const y = { dtype: 'I64', shape: [2], data: BigInt64Array.of(7n, 3n) };
  const rule = JSON.stringify({ scale: 255, mean: [0.1307], std: [0.3081] });
  const pixels = { dtype: 'U8', shape: [2, 1, 2, 2], data: Uint8Array.of(0, 1, 2, 3, 4, 5, 6, 255) };
  const compact = shard(pixels, y, { normalise: rule, shard: '0 of 100' });
  assert.equal(compact.pixels, pixels.data);
  assert.deepEqual(compact.labels, [3, 7]);
  assert.equal(compact.n, 2);
  const ready = materialise(compact);
  assert.equal(ready.x.length, 8);
  assert.equal(ready.x[7], standardise(Uint8Array.of(255), [1, 1], JSON.parse(rule))[0]);
  const floats = { dtype: 'F32', shape: [2, 4], data: new Float32Array(8) };
  const plain = shard(floats, y, null);
  assert.equal(plain.x, floats.data);
  assert.equal(materialise(plain), plain);
});

test('demo shards that cannot be read are refused with a message', () => {
  const y = { dtype: 'I64', shape: [2], data: BigInt64Array.of(1n, 2n) };
  const pixels = { dtype: 'U8', shape: [2, 1, 1, 1], data: Uint8Array.of(1, 2) };
  assert.throws(() => shard(pixels, y, {}), /without a readable "normalise"/);
  assert.throws(() => shard(pixels, y, { normalise: '{' }), DataError);
  const wrong = JSON.stringify({ scale: 255, mean: [0.1, 0.2], std: [1, 1] });
  assert.throws(() => shard(pixels, y, { normalise: wrong }), /does not fit 1 channel/);
  const zero = JSON.stringify({ scale: 255, mean: [0.1], std: [0] });
  assert.throws(() => shard(pixels, y, { normalise: zero }), DataError);
  assert.throws(() => shard({ ...pixels, dtype: 'I32' }, y, {}), /I32/);
  assert.throws(() => shard(pixels, { ...y, shape: [3] }, {}), /y int64/);
  assert.throws(() => shard(pixels, { ...y, dtype: 'I32' }, {}), DataError);
});
