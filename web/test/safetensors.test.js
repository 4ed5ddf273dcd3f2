import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { SafetensorsError, parseSafetensors, serializeSafetensors } from '../safetensors.js';

// Files written by Python's safetensors (tests/vectors/make_safetensors_vectors.py).
const folder = new URL('../../tests/vectors/safetensors/', import.meta.url);
const expected = JSON.parse(readFileSync(new URL('expected.json', folder), 'utf8'));
const pythonBytes = (name) => new Uint8Array(readFileSync(new URL(`${name}.safetensors`, folder)));

function plain(data) {
  return Array.from(data, (v) => (typeof v === 'bigint' ? v.toString() : v));
}

function headerOf(bytes) {
  const n = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  return { n, json: JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n))) };
}

test('reads what Python wrote: dtypes, shapes, values, metadata', () => {
  for (const [name, want] of Object.entries(expected)) {
    const { tensors, metadata } = parseSafetensors(pythonBytes(name));
    assert.deepEqual(metadata, want.metadata, name);
    assert.deepEqual([...tensors.keys()].sort(), Object.keys(want.tensors).sort(), name);
    for (const [tensor, { shape, values }] of Object.entries(want.tensors)) {
      const got = tensors.get(tensor);
      assert.deepEqual(got.shape, shape, `${name}/${tensor}`);
      assert.deepEqual(plain(got.data), values, `${name}/${tensor}`);
    }
  }
  const { tensors } = parseSafetensors(pythonBytes('mixed'));
  assert.ok(tensors.get('weight').data instanceof Float32Array);
  assert.ok(tensors.get('labels').data instanceof BigInt64Array);
  assert.ok(tensors.get('double').data instanceof Float64Array);
  assert.ok(tensors.get('ints').data instanceof Int32Array);
  assert.ok(tensors.get('pixels').data instanceof Uint8Array);
});

test('writes the same bytes as Python for the same tensors', () => {
  for (const name of ['mixed', 'metadata', 'empty_metadata', 'nothing']) {
    const original = pythonBytes(name);
    const { tensors, metadata } = parseSafetensors(original);
    assert.deepEqual(serializeSafetensors(tensors, metadata), original, name);
  }
});

test('an upload with several metadata keys equals Python up to their order', () => {
  const original = pythonBytes('upload');
  const { tensors, metadata } = parseSafetensors(original);
  const mine = serializeSafetensors(tensors, metadata);
  const [a, b] = [headerOf(mine), headerOf(original)];
  assert.equal(a.n, b.n);
  assert.deepEqual(a.json, b.json);
  assert.deepEqual(Object.keys(a.json).slice(1), Object.keys(b.json).slice(1)); // tensor order
  assert.deepEqual(mine.subarray(8 + a.n), original.subarray(8 + b.n));
  assert.deepEqual(Object.keys(a.json.__metadata__), ['labels', 'metrics', 'num_samples']);
});

test('typed arrays give their dtype; a round trip keeps everything', () => {
  const tensors = new Map([
    ['w', { data: new Float32Array([1, 2, 3, 4]), shape: [2, 2] }],
    ['y', { data: new BigInt64Array([7n, -1n]), shape: [2] }],
    ['u', { data: new Uint8Array([1, 2, 3]), shape: [3] }],
  ]);
  const bytes = serializeSafetensors(tensors, { num_samples: '2' });
  assert.equal(headerOf(bytes).n % 8, 0);
  const back = parseSafetensors(bytes.buffer);
  assert.deepEqual(back.metadata, { num_samples: '2' });
  assert.deepEqual(back.tensors.get('w').dtype, 'F32');
  assert.deepEqual(back.tensors.get('y').dtype, 'I64');
  assert.deepEqual(plain(back.tensors.get('y').data), ['7', '-1']);
  // a view into a larger buffer is written from its own bytes
  const big = new Float32Array([9, 8, 7, 6]);
  const one = serializeSafetensors({ v: { data: big.subarray(1, 3), shape: [2] } });
  assert.deepEqual(plain(parseSafetensors(one).tensors.get('v').data), [8, 7]);
});

test('corrupt or inconsistent files are refused', () => {
  const good = serializeSafetensors({ w: { data: new Float32Array([1, 2]), shape: [2] } });
  const refuse = (bytes) => assert.throws(() => parseSafetensors(bytes), SafetensorsError);
  refuse(good.subarray(0, 5)); // no header length
  refuse(good.subarray(0, good.length - 1)); // truncated data
  refuse(new Uint8Array([...good, 0])); // trailing bytes
  const huge = good.slice();
  new DataView(huge.buffer).setBigUint64(0, 1n << 40n, true);
  refuse(huge);
  const text = (s) => {
    const json = new TextEncoder().encode(s);
    const out = new Uint8Array(8 + json.length + 8);
    new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
    out.set(json, 8);
    return out;
  };
  refuse(text('not json'));
  refuse(text('[1, 2]'));
  refuse(text('{"w":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}'));
  refuse(text('{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}'));
  refuse(text('{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'));
  refuse(text('{"__metadata__":{"a":1},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'));
  assert.throws(
    () => serializeSafetensors({ w: { data: new Float32Array(3), shape: [2] } }),
    SafetensorsError,
  );
  assert.throws(
    () => serializeSafetensors({ w: { data: new Float32Array(1), shape: [1] } }, { a: 1 }),
    SafetensorsError,
  );
});

test('unaligned data (a writer that does not pad) is copied, not misread', () => {
  const json = new TextEncoder().encode('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}');
  const out = new Uint8Array(8 + json.length + 8);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  new DataView(out.buffer).setFloat32(8 + json.length, 1.5, true);
  new DataView(out.buffer).setFloat32(8 + json.length + 4, -2, true);
  assert.notEqual((8 + json.length) % 4, 0);
  assert.deepEqual(plain(parseSafetensors(out).tensors.get('w').data), [1.5, -2]);
});
