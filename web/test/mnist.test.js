import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { gzipSync } from 'node:zlib';

import { MNIST_RULE, materialise } from '../data.js';
import { DataError, loadMnist, normalise, parseIdx } from '../mnist.js';

// float32 bits of Python's heterofl_edge.data.idx.normalise for pixels 0..255.
const { bits } = JSON.parse(
  readFileSync(new URL('../../tests/vectors/normalise.json', import.meta.url), 'utf8'),
);

function idx(shape, values) {
  const out = new Uint8Array(4 + 4 * shape.length + values.length);
  out.set([0, 0, 8, shape.length]);
  const view = new DataView(out.buffer);
  shape.forEach((d, i) => view.setUint32(4 + 4 * i, d, false));
  out.set(values, 4 + 4 * shape.length);
  return out;
}

test('normalisation is bit-identical to Python for every pixel value', () => {
  const pixels = Uint8Array.from({ length: 256 }, (_, i) => i);
  const got = new Uint32Array(normalise(pixels).buffer);
  assert.deepEqual(Array.from(got), bits);
});

test('idx files, plain and gzipped, load as pixels with MNIST\'s rule and int64 labels', async () => {
  const pixels = Uint8Array.from({ length: 2 * 28 * 28 }, (_, i) => (i * 7) % 256);
  const images = idx([2, 28, 28], pixels);
  const labels = idx([2], [7, 3]);
  for (const [a, b] of [
    [images, labels],
    [gzipSync(images), gzipSync(labels)],
    [new Blob([gzipSync(images)]), new Blob([labels])],
  ]) {
    const data = await loadMnist(a, b);
    assert.equal(data.n, 2);
    assert.deepEqual(data.shape, [2, 1, 28, 28]);
    assert.deepEqual(Array.from(data.y), [7n, 3n]);
    assert.deepEqual(data.labels, [3, 7]);
    assert.deepEqual(data.pixels, pixels);
    assert.equal(data.normalise, MNIST_RULE);
    assert.deepEqual(materialise(data).x, normalise(pixels));
  }
});

test('damaged or mismatched files are refused with a message', async () => {
  assert.throws(() => parseIdx(new Uint8Array([0, 0, 9, 1, 0, 0, 0, 0])), DataError);
  assert.throws(() => parseIdx(new Uint8Array([0, 0, 8, 2, 0, 0])), DataError);
  assert.throws(() => parseIdx(idx([3], [1, 2, 3]).subarray(0, 9)), DataError);
  const images = idx([2, 2, 2], new Uint8Array(8));
  await assert.rejects(loadMnist(images, idx([3], [1, 2, 3])), DataError);
  await assert.rejects(loadMnist(images, idx([2], [1, 12])), /up to 12/);
  await assert.rejects(loadMnist(images, images), DataError);
  const broken = gzipSync(images).subarray(0, 12);
  await assert.rejects(loadMnist(broken, idx([2], [1, 2])), DataError);
});
