import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import {
  SecAggClient,
  combineShares,
  deriveKey,
  embedding,
  encodeFixed,
  encodeWide,
  hex,
  planLayout,
  prg,
  splitSecret,
  statisticsVector,
  secureEncoder,
  trainingVector,
  unhex,
} from '../secagg.js';
import { stream } from './stream.js';

// Written by tests/vectors/make_vectors.py from heterofl_edge/secagg.py: one source of truth.
const vectors = JSON.parse(
  readFileSync(new URL('../../tests/vectors/secagg.json', import.meta.url), 'utf8'),
);

test('the AES-CTR mask stream matches numpy word for word', async () => {
  for (const c of vectors.prg) {
    const words = await prg(unhex(c.key), c.count);
    assert.deepEqual(Array.from(words.slice(0, 8)), c.head);
    assert.equal(words[c.count - 1], c.last);
    assert.equal(words.reduce((a, w) => (a + w) % 4294967296, 0), c.sum);
  }
});

test('HKDF keys match', async () => {
  for (const c of vectors.hkdf) {
    assert.equal(hex(await deriveKey(unhex(c.secret), c.purpose, c.context)), c.key);
  }
});

test('fixed point and wide encodings match, ties to even included', () => {
  const f = vectors.fixed_point;
  assert.deepEqual(Array.from(encodeFixed(f.values, f.scale, f.clip)), f.encoded);
  const w = vectors.wide;
  assert.deepEqual(Array.from(encodeWide(w.values, w.scale)), w.digits);
});

test('training and statistics vectors match: label split, presence tiers, wide sums', () => {
  const v = vectors.vectors;
  const got = trainingVector(v.update, v.plan, v.rate, secureEncoder({ scale: v.scale, clip: v.clip }), v.labels);
  assert.deepEqual(Array.from(got), v.training);
  // int8 (SharedInt8): the same update in steps of clip / 127, rounded with SplitMix64
  const int8 = secureEncoder({ encoding: 'int8', clip: v.clip }, v.rounding_seed);
  assert.deepEqual(Array.from(trainingVector(v.update, v.plan, v.rate, int8, v.labels)), v.training_int8);
  assert.equal(got.length, planLayout(v.plan, v.rate).segments.reduce((n, s) => n + s.shape[0] * s.shape[1], 0) + 4);
  assert.deepEqual(Array.from(statisticsVector(v.statistics, v.layers, v.statistics_scale)), v.statistics_vector);
});

test('nested-slice embeddings match', () => {
  for (const c of vectors.embedding) {
    assert.deepEqual(Array.from(embedding(c.small, c.large)), c.positions);
  }
});

test('Shamir: the same coefficients give the same shares, any threshold of them the secret', async () => {
  const s = vectors.shamir;
  const holders = Object.keys(s.shares).map(Number);
  const shares = await splitSecret(BigInt(s.secret), holders, s.threshold, stream('shamir'));
  for (const x of holders) assert.equal(shares.get(x).toString(), s.shares[String(x)]);
  const some = new Map(holders.slice(-s.threshold).map((x) => [x, BigInt(s.shares[String(x)])]));
  assert.equal(combineShares(some).toString(), s.secret);
  const few = new Map(holders.slice(0, s.threshold - 1).map((x) => [x, BigInt(s.shares[String(x)])]));
  assert.notEqual(combineShares(few).toString(), s.secret);
});

test('a browser client in a Python instance: the same keys, shares, masked vector and unmasking', async () => {
  const p = vectors.protocol;
  const peer = (n) => ({ cPublic: unhex(p.clients[n].c_public), sPublic: unhex(p.clients[n].s_public) });
  const byIndex = Object.fromEntries(Object.entries(p.clients).map(([n, c]) => [c.index, n]));
  for (const [name, c] of Object.entries(p.clients)) {
    const client = await SecAggClient.create(p.context, c.index, {
      random: stream(c.random_label),
      keys: {
        c: { scalar: BigInt(`0x${c.c_private}`), publicBytes: unhex(c.c_public) },
        s: { scalar: BigInt(`0x${c.s_private}`), publicBytes: unhex(c.s_public) },
      },
    });
    const neighbours = new Map(c.neighbours.map((v) => [v, peer(byIndex[v])]));
    const sent = await client.shareKeys(neighbours, p.threshold);
    for (const v of c.neighbours) assert.equal(hex(sent.get(v)), c.shares_sent[String(v)], `${name} -> ${v}`);
    const peers = new Map(c.peers.map((v) => [v, p.clients[byIndex[v]].layout]));
    const received = new Map(c.peers.map((v) => [v, unhex(p.clients[byIndex[v]].shares_sent[String(c.index)])]));
    const masked = await client.mask(Uint32Array.from(c.vector), c.layout, peers, received);
    assert.deepEqual(Array.from(masked), c.masked, `client ${name}'s masked vector`);
    if (c.unmask) {
      const shares = await client.unmask(c.unmask.dropped, c.unmask.survivors);
      const got = Object.fromEntries([...shares].map(([v, x]) => [String(v), x.toString()]));
      assert.deepEqual(got, c.unmask.shares);
      await assert.rejects(client.unmask(c.unmask.dropped, c.unmask.survivors), /already/);
    }
  }
});

test('fresh WebCrypto keys agree with each other through the shares and masks', async () => {
  const layouts = { 1: { segments: [{ name: 'w', shape: [3, 2], blocks: [1, 1] }], presence: 0 },
    2: { segments: [{ name: 'w', shape: [2, 1], blocks: [1, 1] }], presence: 0 } };
  const a = await SecAggClient.create('ctx', 1);
  const b = await SecAggClient.create('ctx', 2);
  const toA = await b.shareKeys(new Map([[1, a.advertise()]]), 1);
  const toB = await a.shareKeys(new Map([[2, b.advertise()]]), 1);
  const fromB = new Map([[2, toA.get(1)]]);
  const fromA = new Map([[1, toB.get(2)]]);
  const ma = await a.mask(new Uint32Array(6).fill(5), layouts[1], new Map([[2, layouts[2]]]), fromB);
  const mb = await b.mask(new Uint32Array(2).fill(7), layouts[2], new Map([[1, layouts[1]]]), fromA);
  // b's seed comes back from a's share (threshold 1): the self masks can be removed
  const bSeed = (await a.unmask([], [2])).get(2);
  const aSeed = (await b.unmask([], [1])).get(1);
  const selfA = await prg(await deriveKey(unhex(aSeed.toString(16).padStart(64, '0')), 'self mask', 'ctx'), 6);
  const selfB = await prg(await deriveKey(unhex(bSeed.toString(16).padStart(64, '0')), 'self mask', 'ctx'), 2);
  const sum = Uint32Array.from(ma);
  const positions = embedding(layouts[2], layouts[1]);
  for (let i = 0; i < 2; i++) sum[positions[i]] += mb[i];
  for (let i = 0; i < 6; i++) sum[i] -= selfA[i];
  for (let i = 0; i < 2; i++) sum[positions[i]] -= selfB[i];
  assert.deepEqual(Array.from(sum), [12, 5, 12, 5, 5, 5]); // the pair masks cancelled
});
