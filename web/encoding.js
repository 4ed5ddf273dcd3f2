// Transport encodings: weights down, updates up. Bit for bit heterofl_edge/encoding.py, whose
// docstring is the specification (tests/vectors/encoding.json pins both):
//
// * fp32 as is; fp16 IEEE half, round to nearest even; bf16 the upper half of the float32,
//   round to nearest even.
// * int8: one float32 scale per output channel (row 0 of a tensor with two or more
//   dimensions; one for a vector or scalar), scale = float32(max|row| / 127) (1 for a row of
//   zeros), q = clip(floor(x / scale + u), -127, 127) in doubles, with u = (next64 >> 11) *
//   2**-53 from SplitMix64 seeded with the task's rounding_seed: one draw per element, tensors
//   in sorted name order, each row-major, one continuing generator. Decoding: float32(q * scale).
// * A lossy upload is the update, float32(trained - received); with error feedback the residual
//   (what quantization dropped) is added to the next update at the same level.
// * The metadata (JSON strings) says "encoding" and, for int8, "scales": {name: base64 of the
//   scales as little-endian float32}.

export const ENCODINGS = Object.freeze(['fp32', 'fp16', 'bf16', 'int8']);
const DTYPES = Object.freeze({ fp32: 'F32', fp16: 'F16', bf16: 'BF16', int8: 'I8' });
const INT8_LIMIT = 127;

export class EncodingError extends Error {
  constructor(message, code = 'bad_payload') {
    super(message);
    this.name = 'EncodingError';
    this.code = code;
  }
}

// -- SplitMix64 in 32-bit halves (exact in doubles; web/shuffle.js has the BigInt form) ---------

const GAMMA_HI = 0x9e3779b9;
const GAMMA_LO = 0x7f4a7c15;

/** The high 32 bits of a * b, for a, b < 2**32 (16-bit pieces keep doubles exact). */
function mulHigh(a, b) {
  const a0 = a & 0xffff;
  const a1 = a >>> 16;
  const b0 = b & 0xffff;
  const b1 = b >>> 16;
  const mid = a0 * b1 + a1 * b0; // < 2**33
  const low = a0 * b0 + (mid % 65536) * 65536; // < 2**33
  return (a1 * b1 + Math.floor(mid / 65536) + Math.floor(low / 4294967296)) >>> 0;
}

/** Uniform doubles in [0, 1) from SplitMix64 seeded with an integer in [0, 2**32). */
export class Uniforms {
  constructor(seed) {
    if (!Number.isInteger(seed) || seed < 0 || seed >= 2 ** 32) {
      throw new RangeError(`seed ${seed} must be an integer in [0, 2**32)`);
    }
    this.hi = 0;
    this.lo = seed;
    this.outHi = 0; // the last output's halves (next64)
    this.outLo = 0;
  }

  /** Advance and mix: the next 64-bit output in outHi, outLo (no allocation per draw). */
  step() {
    const sum = this.lo + GAMMA_LO;
    this.lo = sum >>> 0;
    this.hi = (this.hi + GAMMA_HI + (sum > 0xffffffff ? 1 : 0)) >>> 0;
    // z ^= z >> 30; z *= 0xBF58476D1CE4E5B9
    let h = (this.hi ^ (this.hi >>> 30)) >>> 0;
    let l = (this.lo ^ ((this.lo >>> 30) | (this.hi << 2))) >>> 0;
    let mh = (mulHigh(l, 0x1ce4e5b9) + Math.imul(h, 0x1ce4e5b9) + Math.imul(l, 0xbf58476d)) >>> 0;
    l = Math.imul(l, 0x1ce4e5b9) >>> 0;
    h = mh;
    // z ^= z >> 27; z *= 0x94D049BB133111EB
    const l2 = (l ^ ((l >>> 27) | (h << 5))) >>> 0;
    const h2 = (h ^ (h >>> 27)) >>> 0;
    mh = (mulHigh(l2, 0x133111eb) + Math.imul(h2, 0x133111eb) + Math.imul(l2, 0x94d049bb)) >>> 0;
    l = Math.imul(l2, 0x133111eb) >>> 0;
    h = mh;
    // z ^= z >> 31
    this.outLo = (l ^ ((l >>> 31) | (h << 1))) >>> 0;
    this.outHi = (h ^ (h >>> 31)) >>> 0;
  }

  /** [hi, lo] of the next 64-bit output. */
  next64() {
    this.step();
    return [this.outHi, this.outLo];
  }

  /** (next64 >> 11) * 2**-53. */
  next() {
    this.step();
    return this.outHi * 2 ** -32 + (this.outLo >>> 11) * 2 ** -53;
  }
}

// -- the numbers ------------------------------------------------------------------------------

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** IEEE half bits of a float32 value, round to nearest even (numpy's float16 conversion). */
export function halfBits(value) {
  f32[0] = value;
  const bits = u32[0];
  const sign = (bits >>> 16) & 0x8000;
  const exponent = (bits >>> 23) & 0xff;
  const mantissa = bits & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa ? 0x200 : 0);
  const e = exponent - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    const shift = 14 - e; // the half's subnormal: float32 mantissa (with its 1) >> shift
    if (shift > 24) return sign;
    const m = mantissa | 0x800000;
    let result = Math.floor(m / 2 ** shift);
    const rest = m - result * 2 ** shift;
    const half = 2 ** (shift - 1);
    if (rest > half || (rest === half && result & 1)) result += 1;
    return sign | result;
  }
  let result = (e << 10) | (mantissa >>> 13);
  const rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && result & 1)) result += 1; // may carry into inf
  return sign | result;
}

/** The float value of IEEE half bits. */
export function fromHalfBits(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >>> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa ? NaN : sign * Infinity;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

let HALVES = null;

/** Every half's float32 value, by its bits (256 KiB, made once). */
function halfTable() {
  if (HALVES === null) {
    HALVES = new Float32Array(65536);
    for (let bits = 0; bits < 65536; bits++) HALVES[bits] = fromHalfBits(bits);
  }
  return HALVES;
}

/** bfloat16 bits of a finite float32 value, round to nearest even. */
export function bf16Bits(value) {
  f32[0] = value;
  const bits = u32[0];
  return Math.floor((bits + 0x7fff + ((bits >>> 16) & 1)) / 65536) & 0xffff;
}

export function fromBf16Bits(bits) {
  u32[0] = (bits << 16) >>> 0;
  return f32[0];
}

/** How many int8 scales a tensor of `shape` has: its first dimension, else one. */
export function rowsOf(shape) {
  return shape.length >= 2 ? shape[0] : 1;
}

function product(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

function quantize(x, shape, rng) {
  const rows = rowsOf(shape);
  const cols = rows ? x.length / rows : 0;
  const scales = new Float32Array(rows);
  const q = new Int8Array(x.length);
  for (let r = 0; r < rows; r++) {
    let peak = 0;
    for (let i = r * cols; i < (r + 1) * cols; i++) peak = Math.max(peak, Math.abs(x[i]));
    const scale = Math.fround(peak / INT8_LIMIT);
    scales[r] = scale > 0 ? scale : 1;
  }
  for (let r = 0; r < rows; r++) {
    const scale = scales[r];
    for (let i = r * cols; i < (r + 1) * cols; i++) {
      const v = Math.floor(x[i] / scale + rng.next());
      q[i] = v > INT8_LIMIT ? INT8_LIMIT : v < -INT8_LIMIT ? -INT8_LIMIT : v;
    }
  }
  return { q, scales };
}

function base64Of(bytes) {
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function bytesOf(text) {
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function checkEncoding(encoding) {
  if (!ENCODINGS.includes(encoding)) throw new EncodingError(`unknown encoding ${encoding}`, 'bad_metadata');
  return encoding;
}

/**
 * Encode float32 tensors.
 * @param {Map<string, {data: Float32Array, shape: number[]}>} tensors
 * @param {string} encoding fp32 | fp16 | bf16 | int8
 * @param {number} seed the rounding seed (int8)
 * @returns {{tensors: Map<string, {dtype: string, shape: number[], data: ArrayBufferView}>,
 *            metadata: Record<string, string>}} safetensors entries and the metadata to add
 */
export function encodeTensors(tensors, encoding, seed = 0) {
  checkEncoding(encoding);
  const rng = new Uniforms(seed);
  const out = new Map();
  const scales = {};
  for (const name of [...tensors.keys()].sort()) {
    const { data, shape } = tensors.get(name);
    if (data.length !== product(shape)) throw new EncodingError(`${name}: ${data.length} values do not fit ${shape}`);
    if (encoding === 'fp32') {
      out.set(name, { dtype: 'F32', shape, data });
      continue;
    }
    for (let i = 0; i < data.length; i++) {
      if (!Number.isFinite(data[i])) throw new EncodingError(`${name} holds NaN or Inf values`, 'not_finite');
    }
    if (encoding === 'fp16') {
      const bits = new Uint16Array(data.length);
      for (let i = 0; i < data.length; i++) {
        bits[i] = halfBits(data[i]);
        if ((bits[i] & 0x7c00) === 0x7c00) {
          throw new EncodingError(`${name} holds values beyond fp16's range (±65504)`, 'not_finite');
        }
      }
      out.set(name, { dtype: 'F16', shape, data: bits });
    } else if (encoding === 'bf16') {
      const bits = new Uint16Array(data.length);
      for (let i = 0; i < data.length; i++) {
        bits[i] = bf16Bits(data[i]);
        if ((bits[i] & 0x7f80) === 0x7f80) throw new EncodingError(`${name} holds values beyond bf16's range`, 'not_finite');
      }
      out.set(name, { dtype: 'BF16', shape, data: bits });
    } else {
      const { q, scales: s } = quantize(data, shape, rng);
      out.set(name, { dtype: 'I8', shape, data: q });
      scales[name] = base64Of(new Uint8Array(s.buffer, s.byteOffset, s.byteLength));
    }
  }
  const metadata = {};
  if (encoding !== 'fp32') metadata.encoding = JSON.stringify(encoding);
  if (encoding === 'int8') {
    const sorted = Object.fromEntries(Object.keys(scales).sort().map((k) => [k, scales[k]]));
    metadata.scales = JSON.stringify(sorted);
  }
  return { tensors: out, metadata };
}

/** The encoding a payload's metadata declares (none: fp32). */
export function declaredEncoding(metadata) {
  const text = metadata?.encoding;
  if (text === undefined) return 'fp32';
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    throw new EncodingError('metadata encoding is not JSON', 'bad_metadata');
  }
  return checkEncoding(value);
}

/**
 * float32 arrays of a parsed safetensors payload (parseSafetensors), whatever its encoding.
 * @param {Map<string, {dtype: string, shape: number[], data: ArrayBufferView}>} tensors
 * @param {Record<string, string> | null} metadata
 * @returns {{arrays: Map<string, {data: Float32Array, shape: number[]}>, encoding: string}}
 */
export function decodeTensors(tensors, metadata) {
  const encoding = declaredEncoding(metadata);
  let scales = {};
  if (encoding === 'int8') {
    try {
      scales = JSON.parse(metadata.scales);
    } catch {
      throw new EncodingError('an int8 payload needs metadata scales', 'bad_scales');
    }
  }
  const arrays = new Map();
  for (const [name, { dtype, shape, data }] of tensors) {
    if (dtype !== DTYPES[encoding]) {
      throw new EncodingError(`${name} is ${dtype}, the payload's encoding ${encoding} sends ${DTYPES[encoding]}`, 'bad_dtype');
    }
    const values = new Float32Array(data.length);
    if (encoding === 'fp32') values.set(data);
    else if (encoding === 'fp16') {
      const table = halfTable();
      for (let i = 0; i < data.length; i++) values[i] = table[data[i]];
    }
    else if (encoding === 'bf16') for (let i = 0; i < data.length; i++) values[i] = fromBf16Bits(data[i]);
    else {
      const rows = rowsOf(shape);
      const raw = typeof scales[name] === 'string' ? bytesOf(scales[name]) : new Uint8Array(0);
      if (raw.length !== 4 * rows) throw new EncodingError(`${name} needs ${rows} scales`, 'bad_scales');
      const s = new Float32Array(raw.buffer);
      for (const v of s) {
        if (!(Number.isFinite(v) && v > 0)) throw new EncodingError(`${name} has a scale that is not positive`, 'bad_scales');
      }
      const cols = rows ? data.length / rows : 0;
      for (let i = 0; i < data.length; i++) values[i] = data[i] * s[Math.floor(i / cols)];
    }
    for (let i = 0; i < values.length; i++) {
      if (!Number.isFinite(values[i])) throw new EncodingError(`${name} holds NaN or Inf values`, 'not_finite');
    }
    arrays.set(name, { data: values, shape });
  }
  return { arrays, encoding };
}

/**
 * A device's uploads: the trained weights (fp32) or the update, with the error-feedback
 * residual kept for one level (another level, fp32, no error feedback or `forget` drop it).
 */
export class UpdateEncoder {
  constructor() {
    this.level = null;
    this.residual = null; // Map<string, Float32Array>
  }

  forget() {
    this.level = null;
    this.residual = null;
  }

  /**
   * @param {Map<string, Float32Array>} trained
   * @param {Map<string, Float32Array>} received the weights the session started from
   * @param {Map<string, number[]>} shapes
   * @returns {{tensors: Map<string, object>, metadata: Record<string, string>}}
   */
  encode(trained, received, shapes, { encoding, seed, level, errorFeedback }) {
    const input = new Map();
    if (encoding === 'fp32') {
      this.forget();
      for (const [name, data] of trained) input.set(name, { data, shape: shapes.get(name) });
      return encodeTensors(input, 'fp32', seed);
    }
    const carried = errorFeedback && this.level === level ? this.residual : null;
    for (const [name, data] of trained) {
      const start = received.get(name);
      const update = new Float32Array(data.length);
      for (let i = 0; i < data.length; i++) update[i] = data[i] - start[i];
      const residual = carried?.get(name);
      if (residual) for (let i = 0; i < update.length; i++) update[i] += residual[i];
      input.set(name, { data: update, shape: shapes.get(name) });
    }
    const encoded = encodeTensors(input, encoding, seed);
    if (errorFeedback) {
      const { arrays } = decodeTensors(encoded.tensors, encoded.metadata);
      this.residual = new Map();
      for (const [name, { data }] of input) {
        const sent = arrays.get(name).data;
        const left = new Float32Array(data.length);
        for (let i = 0; i < data.length; i++) left[i] = data[i] - sent[i];
        this.residual.set(name, left);
      }
      this.level = level;
    } else {
      this.forget();
    }
    return encoded;
  }
}
