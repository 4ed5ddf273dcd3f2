import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import {
  UpdateEncoder,
  Uniforms,
  bf16Bits,
  decodeTensors,
  encodeTensors,
  fromBf16Bits,
  fromHalfBits,
  halfBits,
} from '../encoding.js';
import { parseSafetensors, serializeSafetensors } from '../safetensors.js';
import { SplitMix64 } from '../shuffle.js';

// The file tests/test_encoding.py checks too: Python's encoder wrote it.
const vectors = JSON.parse(readFileSync(new URL('../../tests/vectors/encoding.json', import.meta.url), 'utf8'));

function floats(bits) {
  return new Float32Array(new Uint32Array(bits).buffer);
}

function bitsOf(values) {
  return Array.from(new Uint32Array(Float32Array.from(values).buffer));
}

test('the rounding uniforms are SplitMix64 draws, as Python draws them', () => {
  for (const { seed, values } of vectors.uniforms) {
    const rng = new Uniforms(seed);
    assert.deepEqual(values.map(() => rng.next()), values, `seed ${seed}`);
    const reference = new SplitMix64(seed); // the BigInt generator of the batch order
    const fast = new Uniforms(seed);
    for (let i = 0; i < 1000; i++) {
      const [hi, lo] = fast.next64();
      assert.equal(((BigInt(hi) << 32n) | BigInt(lo)).toString(), reference.next64().toString());
    }
  }
});

test('fp16 and bf16 bits match numpy, ties and subnormals included', () => {
  const half = floats(vectors.fp16.float32);
  assert.deepEqual(Array.from(half, halfBits), vectors.fp16.half);
  for (let i = 0; i < half.length; i++) {
    const back = fromHalfBits(vectors.fp16.half[i]);
    assert.ok(Math.abs(back - half[i]) <= Math.max(Math.abs(half[i]) * 2 ** -11, 2 ** -25), `${half[i]}`);
  }
  const brain = floats(vectors.bf16.float32);
  assert.deepEqual(Array.from(brain, bf16Bits), vectors.bf16.bf16);
  for (let i = 0; i < brain.length; i++) {
    const error = Math.abs(fromBf16Bits(vectors.bf16.bf16[i]) - brain[i]);
    assert.ok(error <= Math.abs(brain[i]) * 2 ** -8 + 2 ** -133, `${brain[i]}`); // 2**-133: subnormals
  }
});

test('int8 tensors and scales match Python bit for bit, and decode within one step', () => {
  const inputs = new Map(
    Object.entries(vectors.int8.tensors).map(([name, t]) => [name, { data: floats(t.bits), shape: t.shape }]),
  );
  for (const expected of vectors.int8.cases) {
    const { tensors, metadata } = encodeTensors(inputs, 'int8', expected.seed);
    for (const [name, q] of Object.entries(expected.q)) {
      assert.deepEqual(Array.from(tensors.get(name).data), q, `${name}, seed ${expected.seed}`);
    }
    assert.deepEqual(metadata, expected.metadata);
    const { arrays } = decodeTensors(tensors, metadata);
    for (const [name, { data, shape }] of inputs) {
      const scales = floats(expected.scales[name]);
      const cols = data.length / scales.length;
      const got = arrays.get(name);
      assert.deepEqual(got.shape, shape);
      for (let i = 0; i < data.length; i++) {
        assert.ok(Math.abs(got.data[i] - data[i]) <= scales[Math.floor(i / cols)] * 1.0000001, name);
      }
    }
  }
});

test('lossy uploads with error feedback replay Python sessions bit for bit', () => {
  const { shapes, sessions } = vectors.error_feedback;
  const shapeMap = new Map(Object.entries(shapes));
  const encoder = new UpdateEncoder();
  for (const s of sessions) {
    const received = new Map(Object.entries(s.received).map(([n, b]) => [n, floats(b)]));
    const trained = new Map(Object.entries(s.trained).map(([n, b]) => [n, floats(b)]));
    const { tensors, metadata } = encoder.encode(trained, received, shapeMap, {
      encoding: 'int8',
      seed: s.seed,
      level: s.level,
      errorFeedback: true,
    });
    for (const [name, q] of Object.entries(s.q)) assert.deepEqual(Array.from(tensors.get(name).data), q, name);
    assert.deepEqual(metadata, s.metadata);
    for (const [name, bits] of Object.entries(s.residual_after)) {
      assert.deepEqual(bitsOf(encoder.residual.get(name)), bits, `residual ${name}`);
    }
  }
});

test('every encoding survives safetensors and decodes within its bound', () => {
  const data = new Float32Array(600).map((_, i) => Math.sin(i * 0.37) * (1 + (i % 7)));
  const input = new Map([['w', { data, shape: [20, 30] }], ['b', { data: data.subarray(0, 20), shape: [20] }]]);
  const bounds = { fp32: () => 0, fp16: (x) => Math.abs(x) * 2 ** -11, bf16: (x) => Math.abs(x) * 2 ** -8 };
  for (const encoding of ['fp32', 'fp16', 'bf16', 'int8']) {
    const { tensors, metadata } = encodeTensors(input, encoding, 3);
    const parsed = parseSafetensors(serializeSafetensors(tensors, metadata));
    const { arrays, encoding: declared } = decodeTensors(parsed.tensors, parsed.metadata);
    assert.equal(declared, encoding);
    const w = arrays.get('w').data;
    for (let i = 0; i < data.length; i++) {
      const bound = encoding === 'int8' ? 7 / 127 : bounds[encoding](data[i]);
      assert.ok(Math.abs(w[i] - data[i]) <= bound + 1e-12, `${encoding} ${i}`);
    }
  }
});

test('int8 stochastic rounding is unbiased over many seeds', () => {
  const x = new Float32Array(200).map((_, i) => (i / 200) * 0.9 - 0.3);
  x[0] = 1; // the row's peak: scale 1/127, each value between two steps
  const mean = new Float64Array(x.length);
  const draws = 4000;
  for (let seed = 0; seed < draws; seed++) {
    const { tensors, metadata } = encodeTensors(new Map([['x', { data: x, shape: [x.length] }]]), 'int8', seed);
    const got = decodeTensors(tensors, metadata).arrays.get('x').data;
    for (let i = 0; i < x.length; i++) mean[i] += got[i] / draws;
  }
  const step = Math.fround(1 / 127);
  for (let i = 0; i < x.length; i++) {
    assert.ok(Math.abs(mean[i] - x[i]) < (5 * step) / (2 * Math.sqrt(draws)), `${i}: ${mean[i]} vs ${x[i]}`);
  }
});

test('a scale that is NaN, zero or negative, or a missing one, is refused with a code', () => {
  const input = new Map([['w', { data: new Float32Array([1, -2, 3, 4]), shape: [2, 2] }]]);
  const { tensors, metadata } = encodeTensors(input, 'int8', 0);
  const bad = (value) => ({ ...metadata, scales: JSON.stringify({ w: value }) });
  const nan = Buffer.from(new Float32Array([Number.NaN, 1]).buffer).toString('base64');
  const zero = Buffer.from(new Float32Array([0, 1]).buffer).toString('base64');
  const negative = Buffer.from(new Float32Array([1, -1]).buffer).toString('base64');
  const short = Buffer.from(new Float32Array([1]).buffer).toString('base64');
  for (const value of [nan, zero, negative, short]) {
    assert.throws(() => decodeTensors(tensors, bad(value)), { code: 'bad_scales' });
  }
  assert.throws(() => decodeTensors(tensors, { encoding: metadata.encoding }), { code: 'bad_scales' });
  assert.throws(() => decodeTensors(tensors, { encoding: '"fp16"' }), { code: 'bad_dtype' });
});
