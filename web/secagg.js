// A browser client of secure aggregation over nested slices, as heterofl_edge/secagg.py's
// SecAggClient computes it, byte for byte (tests/vectors/secagg.json, web/test/secagg.test.js):
// P-256 ECDH, HKDF-SHA256, AES-256-GCM share encryption and AES-256-CTR masks from WebCrypto,
// Shamir's scheme over the prime 2^521 - 1 with BigInt, masks added modulo 2^32 over the
// intersection of two clients' nested slices (`embedding`). The device page uses it through
// secagg_device.js (the stages' answers, the masked training and statistics uploads), in its
// training worker (README, "Secure aggregation").

import { Uniforms } from './encoding.js';

export const PRIME = (1n << 521n) - 1n;
export const SHARE_BYTES = 66;
export const WIDE_DIGITS = 4;
const SALT = new TextEncoder().encode('heterofl-edge secure aggregation v1');
const subtle = () => globalThis.crypto.subtle;
const utf8 = (text) => new TextEncoder().encode(text);

/** Bytes -> BigInt, big-endian. */
export function bytesToBigInt(bytes) {
  let value = 0n;
  for (const b of bytes) value = (value << 8n) | BigInt(b);
  return value;
}

/** BigInt -> `length` bytes, big-endian. */
export function bigIntToBytes(value, length) {
  const out = new Uint8Array(length);
  let v = value;
  for (let i = length - 1; i >= 0; i--) {
    out[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  if (v !== 0n) throw new Error(`a value does not fit ${length} bytes`);
  return out;
}

const mod = (a) => ((a % PRIME) + PRIME) % PRIME;

function modPow(base, exponent) {
  let result = 1n;
  let b = mod(base);
  let e = exponent;
  while (e > 0n) {
    if (e & 1n) result = (result * b) % PRIME;
    b = (b * b) % PRIME;
    e >>= 1n;
  }
  return result;
}

/**
 * Shamir shares of `secret` (BigInt below PRIME) at the points `holders`, any `threshold` of
 * which rebuild it. Coefficients: 80 bytes each from `random` (awaited), reduced mod PRIME.
 */
export async function splitSecret(secret, holders, threshold, random) {
  if (secret < 0n || secret >= PRIME) throw new Error('a Shamir secret must lie in the field');
  if (threshold < 1 || threshold > holders.length) throw new Error('bad Shamir threshold');
  const coefficients = [secret];
  for (let i = 1; i < threshold; i++) coefficients.push(bytesToBigInt(await random(80)) % PRIME);
  const shares = new Map();
  for (const x of holders) {
    let y = 0n;
    for (let i = coefficients.length - 1; i >= 0; i--) y = (y * BigInt(x) + coefficients[i]) % PRIME;
    shares.set(x, y);
  }
  return shares;
}

/** The secret behind `shares` (Map point -> BigInt) by Lagrange interpolation at 0. */
export function combineShares(shares) {
  const points = [...shares.keys()];
  let secret = 0n;
  for (const i of points) {
    let numerator = 1n;
    let denominator = 1n;
    for (const j of points) {
      if (j === i) continue;
      numerator = mod(numerator * -BigInt(j));
      denominator = mod(denominator * BigInt(i - j));
    }
    const inverse = modPow(denominator, PRIME - 2n);
    secret = mod(secret + shares.get(i) * numerator * inverse);
  }
  return secret;
}

/** A 32-byte key for `purpose` in the instance `context` (HKDF-SHA256, the fixed salt). */
export async function deriveKey(secret, purpose, context) {
  const base = await subtle().importKey('raw', secret, 'HKDF', false, ['deriveBits']);
  const bits = await subtle().deriveBits(
    { name: 'HKDF', hash: 'SHA-256', salt: SALT, info: utf8(`${purpose}|${context}`) },
    base,
    256,
  );
  return new Uint8Array(bits);
}

/** `count` uint32s: AES-256-CTR keystream from a zero counter, little-endian words. */
export async function prg(key, count) {
  const aes = await subtle().importKey('raw', key, 'AES-CTR', false, ['encrypt']);
  const stream = await subtle().encrypt(
    { name: 'AES-CTR', counter: new Uint8Array(16), length: 64 },
    aes,
    new Uint8Array(4 * count),
  );
  const view = new DataView(stream);
  const out = new Uint32Array(count);
  for (let i = 0; i < count; i++) out[i] = view.getUint32(4 * i, true);
  return out;
}

/** numpy's rint: to the nearest integer, ties to even. */
export function rint(x) {
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff < 0.5) return floor;
  if (diff > 0.5) return floor + 1;
  return floor % 2 === 0 ? floor : floor + 1;
}

/** Values clipped to [-clip, clip], times `scale`, rounded, in Z_2^32 (two's complement). */
export function encodeFixed(values, scale, clip) {
  const out = new Uint32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const clipped = Math.min(clip, Math.max(-clip, values[i]));
    out[i] = rint(clipped * scale) >>> 0;
  }
  return out;
}

export const INT8_STEPS = 127;

/**
 * Shared int8 (secagg.py SharedInt8): values clipped to [-clip, clip], q = floor(x / step + u)
 * with step = clip / 127 and u from `uniforms` (encoding.js Uniforms, one draw per element),
 * q in [-127, 127], in Z_2^32 (two's complement; the upload reduces it mod 2^modulus_bits).
 */
export function encodeSharedInt8(values, clip, uniforms) {
  const step = clip / INT8_STEPS;
  const out = new Uint32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const clipped = Math.min(clip, Math.max(-clip, values[i]));
    const q = Math.floor(clipped / step + uniforms.next());
    out[i] = Math.min(INT8_STEPS, Math.max(-INT8_STEPS, q)) >>> 0;
  }
  return out;
}

/**
 * The encoder of a task's secure training upload (SecureMasking JSON): `int8` draws its
 * rounding from SplitMix64 seeded with the task's `rounding_seed`, one generator over the
 * whole vector; `fixed_point` rounds to nearest.
 */
export function secureEncoder(secure, roundingSeed) {
  const clip = Number(secure.clip ?? 0);
  if (!(clip > 0)) throw new Error('the task carries no clip');
  if ((secure.encoding ?? 'fixed_point') === 'int8') {
    const uniforms = new Uniforms(Number(roundingSeed ?? 0));
    return (values) => encodeSharedInt8(values, clip, uniforms);
  }
  if (secure.encoding !== undefined && secure.encoding !== 'fixed_point') {
    throw new Error(`no secure encoding ${JSON.stringify(secure.encoding)}`);
  }
  const scale = Number(secure.scale ?? 0);
  return (values) => encodeFixed(values, scale, clip);
}

/** A masked uint32 vector reduced to Z_2^bits: Uint16Array up to 16 bits, else Uint32Array. */
export function reduceMasked(vector, bits) {
  if (bits >= 32) return vector;
  const mask = 2 ** bits - 1;
  const out = bits <= 16 ? new Uint16Array(vector.length) : new Uint32Array(vector.length);
  for (let i = 0; i < vector.length; i++) out[i] = vector[i] & mask;
  return out;
}

/** round(v * scale) as int64, four 16-bit digits per value, low first (uint32 each). */
export function encodeWide(values, scale) {
  const out = new Uint32Array(WIDE_DIGITS * values.length);
  values.forEach((v, i) => {
    const scaled = rint(v * scale);
    if (!(Math.abs(scaled) < 2 ** 62)) throw new Error('a value is too large for the wide fixed point');
    const unsigned = BigInt.asUintN(64, BigInt(scaled));
    for (let k = 0; k < WIDE_DIGITS; k++) {
      out[WIDE_DIGITS * i + k] = Number((unsigned >> BigInt(16 * k)) & 0xffffn);
    }
  });
  return out;
}

const product = (shape) => shape.reduce((a, b) => a * b, 1);

/** Elements of a layout ({segments: [{name, shape, blocks}], presence}). */
export function layoutSize(layout) {
  return layout.segments.reduce((n, s) => n + product(s.shape), 0) + (layout.presence || 0);
}

function dimMap(small, large, blocks) {
  const out = new Array(small);
  if (blocks === 0) {
    if (small !== large) throw new Error(`a fixed dimension differs between slices (${small}, ${large})`);
    for (let i = 0; i < small; i++) out[i] = i;
    return out;
  }
  if (small % blocks || large % blocks || small > large) throw new Error('the slices do not nest');
  const perSmall = small / blocks;
  const perLarge = large / blocks;
  for (let i = 0; i < small; i++) out[i] = Math.floor(i / perSmall) * perLarge + (i % perSmall);
  return out;
}

/** Each element of a `small` vector's position in a `large` one (nested slices), row-major. */
export function embedding(small, large) {
  if (small.segments.length !== large.segments.length) throw new Error('the layouts do not nest');
  const positions = [];
  let start = 0;
  small.segments.forEach((a, s) => {
    const b = large.segments[s];
    if (a.name !== b.name || a.shape.length !== b.shape.length) throw new Error(`${a.name}: no nest`);
    const strides = b.shape.map((_, d) => product(b.shape.slice(d + 1)));
    let flat = [0];
    a.shape.forEach((size, d) => {
      const map = dimMap(size, b.shape[d], a.blocks[d]);
      const next = new Array(flat.length * map.length);
      let at = 0;
      for (const f of flat) for (const m of map) next[at++] = f + m * strides[d];
      flat = next;
    });
    for (const f of flat) positions.push(f + start);
    start += product(b.shape);
  });
  for (let i = 0; i < (small.presence || 0); i++) positions.push(start + i);
  return Int32Array.from(positions);
}

/** A client's vector layout at `rate` from a task's plan (`LayoutPlan.to_json` in Python). */
export function planLayout(plan, rate) {
  const match = plan.shapes.find(([r]) => Math.abs(r - rate) <= 1e-9 * Math.max(Math.abs(r), Math.abs(rate)));
  if (!match) throw new Error(`rate ${rate} is not a level of this round's layout`);
  const shapes = match[1];
  const held = plan.tiers.filter((t) => t <= rate * (1 + 1e-12)).length;
  return {
    segments: plan.names.map((name) => ({ name, shape: shapes[name], blocks: plan.blocks[name] })),
    presence: plan.classes ? plan.classes * held : 0,
  };
}

/**
 * A client's update (trained minus received: name -> row-major values of its slice) as its
 * vector in Z_2^32 before masking: each tensor through `encode` (`secureEncoder`: fixed point
 * or shared int8) with the rows of labels it does not hold zeroed (the label split), then its
 * label presence once per tier at or below its level. `labels` null: it holds every label.
 */
export function trainingVector(update, plan, rate, encode, labels) {
  const layout = planLayout(plan, rate);
  const held = new Array(Math.max(plan.classes, 1)).fill(true);
  if (labels !== null && plan.classes) {
    held.fill(false);
    for (const label of labels) held[label] = true;
  }
  const parts = [];
  for (const segment of layout.segments) {
    const values = Float64Array.from(update[segment.name]);
    if (values.length !== product(segment.shape)) throw new Error(`${segment.name}: wrong size`);
    const dim = plan.label_dims[segment.name];
    if (dim !== undefined && plan.classes) {
      const stride = product(segment.shape.slice(dim + 1));
      for (let i = 0; i < values.length; i++) {
        const row = Math.floor(i / stride) % segment.shape[dim];
        values[i] = values[i] * (held[row] ? 1 : 0);
      }
    }
    parts.push(encode(values));
  }
  if (layout.presence) {
    const tiers = layout.presence / plan.classes;
    const presence = new Uint32Array(layout.presence);
    for (let t = 0; t < tiers; t++) for (let c = 0; c < plan.classes; c++) presence[t * plan.classes + c] = held[c] ? 1 : 0;
    parts.push(presence);
  }
  const out = new Uint32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** The sBN statistics as wide-encoded sums: per layer count, sum and sum of squares. */
export function statisticsVector(stats, layers, scale) {
  const values = [];
  for (const [name, channels] of layers) {
    const count = Number(stats[`${name}.count`][0]);
    const mean = Array.from(stats[`${name}.mean`]);
    const variance = Array.from(stats[`${name}.var`]);
    if (mean.length !== channels || variance.length !== channels) {
      throw new Error(`statistics of ${name} must have ${channels} channels`);
    }
    values.push(count, ...mean.map((m) => count * m), ...mean.map((m, i) => count * (variance[i] + m * m)));
  }
  return encodeWide(values, scale);
}

function addAt(target, values, positions, subtract) {
  for (let i = 0; i < values.length; i++) {
    const at = positions === null ? i : positions[i];
    target[at] = subtract ? target[at] - values[i] : target[at] + values[i]; // wraps mod 2^32
  }
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
const unhex = (text) => Uint8Array.from(text.match(/../g) || [], (h) => parseInt(h, 16));
const base64url = (bytes) =>
  btoa(String.fromCharCode(...bytes)).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
const unbase64url = (text) =>
  Uint8Array.from(atob(text.replace(/-/g, '+').replace(/_/g, '/')), (c) => c.charCodeAt(0));

export { hex, unhex };

async function importPrivate(scalar, publicBytes) {
  const jwk = {
    kty: 'EC',
    crv: 'P-256',
    d: base64url(bigIntToBytes(scalar, 32)),
    x: base64url(publicBytes.slice(1, 33)),
    y: base64url(publicBytes.slice(33, 65)),
    ext: true,
  };
  return subtle().importKey('jwk', jwk, { name: 'ECDH', namedCurve: 'P-256' }, true, ['deriveBits']);
}

async function agree(privateKey, publicBytes) {
  if (publicBytes.length !== 65) throw new Error('a public key is a 65-byte P-256 point');
  const peer = await subtle().importKey('raw', publicBytes, { name: 'ECDH', namedCurve: 'P-256' }, false, []);
  return new Uint8Array(await subtle().deriveBits({ name: 'ECDH', public: peer }, privateKey, 256));
}

const shareAad = (context, sender, receiver) => utf8(`secagg share|${context}|${sender}|${receiver}`);

/**
 * One client's side of one instance: `advertise` -> `shareKeys` -> `mask` -> `unmask`, each
 * once and in order. Public keys and ciphertexts are Uint8Arrays; shares are BigInts.
 */
export class SecAggClient {
  /**
   * A client with fresh keys (or `keys`: {c: {scalar, publicBytes}, s: {...}}, for the shared
   * vectors) and a self-mask seed from `random` (count -> bytes, may be async), which also
   * draws Shamir's coefficients and the nonces.
   */
  static async create(context, index, { random, keys } = {}) {
    const draw = random || ((n) => globalThis.crypto.getRandomValues(new Uint8Array(n)));
    const client = new SecAggClient(context, index, draw);
    if (keys) {
      client.cKey = await importPrivate(keys.c.scalar, keys.c.publicBytes);
      client.sKey = await importPrivate(keys.s.scalar, keys.s.publicBytes);
      client.cPublic = keys.c.publicBytes;
      client.sPublic = keys.s.publicBytes;
    } else {
      const algorithm = { name: 'ECDH', namedCurve: 'P-256' };
      const c = await subtle().generateKey(algorithm, true, ['deriveBits']);
      const s = await subtle().generateKey(algorithm, true, ['deriveBits']);
      client.cKey = c.privateKey;
      client.sKey = s.privateKey;
      client.cPublic = new Uint8Array(await subtle().exportKey('raw', c.publicKey));
      client.sPublic = new Uint8Array(await subtle().exportKey('raw', s.publicKey));
    }
    client.seed = new Uint8Array(await draw(32));
    return client;
  }

  constructor(context, index, random) {
    this.context = context;
    this.index = index;
    this.random = random;
    this.neighbours = null; // index -> {cPublic, sPublic}
    this.shareKeysByPeer = new Map();
    this.ciphertexts = null;
    this.masked = false;
    this.unmasked = false;
  }

  advertise() {
    return { cPublic: this.cPublic, sPublic: this.sPublic };
  }

  /** Encrypted shares of this client's `s` key and seed for each neighbour (Map index -> bytes). */
  async shareKeys(neighbours, threshold) {
    if (this.neighbours) throw new Error('keys were shared already in this instance');
    const holders = [...neighbours.keys()].sort((a, b) => a - b);
    if (holders.includes(this.index) || threshold < 1 || threshold > holders.length) {
      throw new Error(`cannot share among ${holders.length} neighbours at threshold ${threshold}`);
    }
    const sk = bytesToBigInt(unbase64url((await subtle().exportKey('jwk', this.sKey)).d));
    const skShares = await splitSecret(sk, holders, threshold, this.random);
    const bShares = await splitSecret(bytesToBigInt(this.seed), holders, threshold, this.random);
    const out = new Map();
    for (const v of holders) {
      const secret = await agree(this.cKey, neighbours.get(v).cPublic);
      const key = await deriveKey(secret, 'shares', this.context);
      this.shareKeysByPeer.set(v, key);
      const nonce = new Uint8Array(await this.random(12));
      const plain = new Uint8Array(2 * SHARE_BYTES);
      plain.set(bigIntToBytes(skShares.get(v), SHARE_BYTES), 0);
      plain.set(bigIntToBytes(bShares.get(v), SHARE_BYTES), SHARE_BYTES);
      const aes = await subtle().importKey('raw', key, 'AES-GCM', false, ['encrypt']);
      const sealed = new Uint8Array(
        await subtle().encrypt(
          { name: 'AES-GCM', iv: nonce, additionalData: shareAad(this.context, this.index, v) },
          aes,
          plain,
        ),
      );
      const blob = new Uint8Array(12 + sealed.length);
      blob.set(nonce, 0);
      blob.set(sealed, 12);
      out.set(v, blob);
    }
    this.neighbours = neighbours;
    return out;
  }

  /**
   * `vector` (Uint32Array in `layout`) plus the self mask and, per neighbour in `peers` (Map
   * index -> layout: those that shared keys), +-PRG over the two vectors' intersection.
   * `ciphertexts` (Map index -> bytes): the shares they sent this client, kept for `unmask`.
   */
  /**
   * `vector` (Uint32Array, this client's layout) with its self mask and pairwise masks, in
   * Z_2^modulusBits (`reduceMasked`: the upload's array).
   */
  async mask(vector, layout, peers, ciphertexts, modulusBits = 32) {
    if (this.masked) throw new Error('this client masked its input already');
    const size = layoutSize(layout);
    if (vector.length !== size) throw new Error(`the vector has ${vector.length} elements, the layout ${size}`);
    for (const v of [...peers.keys(), ...ciphertexts.keys()]) {
      if (!this.neighbours || !this.neighbours.has(v)) throw new Error(`client ${v} is not a neighbour`);
    }
    const out = Uint32Array.from(vector);
    addAt(out, await prg(await deriveKey(this.seed, 'self mask', this.context), size), null, false);
    for (const v of [...peers.keys()].sort((a, b) => a - b)) {
      const other = peers.get(v);
      const otherSize = layoutSize(other);
      const secret = await agree(this.sKey, this.neighbours.get(v).sPublic);
      const seed = await deriveKey(secret, 'pair mask', this.context);
      let positions = null;
      let mask;
      if (otherSize <= size) {
        if (otherSize !== size) positions = embedding(other, layout);
        mask = await prg(seed, otherSize);
      } else {
        embedding(layout, other); // checks that they nest
        mask = await prg(seed, size);
      }
      addAt(out, mask, positions, this.index > v);
    }
    this.masked = true;
    this.ciphertexts = ciphertexts;
    return reduceMasked(out, modulusBits);
  }

  /** Shares for the server (Map index -> BigInt): `s`-key shares of `dropped`, seed shares of `survivors`. */
  async unmask(dropped, survivors) {
    if (this.unmasked) throw new Error('this client answered the unmask request already');
    if (!this.masked) throw new Error('this client has not masked an input');
    const gone = new Set(dropped);
    const asked = [...new Set([...dropped, ...survivors])].sort((a, b) => a - b);
    if (asked.length !== dropped.length + survivors.length) throw new Error('a client is listed twice');
    const out = new Map();
    for (const v of asked) {
      if (!this.ciphertexts.has(v)) throw new Error(`no shares of client ${v}`);
      const blob = this.ciphertexts.get(v);
      const aes = await subtle().importKey('raw', this.shareKeysByPeer.get(v), 'AES-GCM', false, ['decrypt']);
      const plain = new Uint8Array(
        await subtle().decrypt(
          { name: 'AES-GCM', iv: blob.slice(0, 12), additionalData: shareAad(this.context, v, this.index) },
          aes,
          blob.slice(12),
        ),
      );
      const share = gone.has(v) ? plain.slice(0, SHARE_BYTES) : plain.slice(SHARE_BYTES);
      out.set(v, bytesToBigInt(share));
    }
    this.unmasked = true;
    return out;
  }
}
