// Training data on the device, kept compact: uint8 pixels plus the rule that standardises
// them (MNIST files picked on the phone, the coordinator's demo shards), or float32 model
// inputs where there is no pixel form. The float32 inputs are made where training runs (the
// worker), so the page holds one byte per pixel.
//
// The rule is the demo data's `normalise` metadata: {scale, mean: [per channel], std: [...]};
// x = (fround(p / scale) - fround(mean_c)) / fround(std_c), each operation rounded to
// float32. A double-precision +, -, / of two float32 values rounded once to float32 is the
// correctly rounded float32 result, so this gives numpy's float32 bits exactly
// (heterofl_edge.data.idx.normalise for MNIST, heterofl_edge/data/image_arrays.py for image
// folders; tests/vectors/normalise.json and standardise.json pin them).

export const MNIST_RULE = Object.freeze({ scale: 255, mean: [0.1307], std: [0.3081] });

export class DataError extends Error {
  constructor(message) {
    super(message);
    this.name = 'DataError';
  }
}

/**
 * A {scale, mean, std} rule checked for use (finite numbers, one mean and std per channel).
 * @param {unknown} rule
 * @param {number} channels
 */
export function checkRule(rule, channels) {
  const ok =
    rule &&
    typeof rule === 'object' &&
    Number.isFinite(rule.scale) &&
    rule.scale > 0 &&
    Array.isArray(rule.mean) &&
    Array.isArray(rule.std) &&
    rule.mean.length === channels &&
    rule.std.length === channels &&
    [...rule.mean, ...rule.std].every(Number.isFinite) &&
    rule.std.every((s) => s !== 0);
  if (!ok) {
    throw new DataError(`the normalisation ${JSON.stringify(rule)} does not fit ${channels} channel(s)`);
  }
  return rule;
}

/**
 * The 256 float32 values of each channel: table[c * 256 + p].
 * @param {{scale: number, mean: number[], std: number[]}} rule
 */
export function standardiseTable(rule) {
  const channels = rule.mean.length;
  const table = new Float32Array(256 * channels);
  for (let c = 0; c < channels; c++) {
    const mean = Math.fround(rule.mean[c]);
    const std = Math.fround(rule.std[c]);
    for (let p = 0; p < 256; p++) {
      const x = Math.fround(p / Math.fround(rule.scale));
      table[c * 256 + p] = Math.fround(Math.fround(x - mean) / std);
    }
  }
  return table;
}

/**
 * uint8 pixels [n, C, ...] (row-major) -> float32 standardised per channel.
 * @param {Uint8Array} pixels
 * @param {number[]} shape [n, C, ...]
 * @param {{scale: number, mean: number[], std: number[]}} rule
 * @returns {Float32Array}
 */
export function standardise(pixels, shape, rule) {
  const channels = shape[1];
  checkRule(rule, channels);
  const table = standardiseTable(rule);
  const plane = shape.slice(2).reduce((a, b) => a * b, 1);
  if (pixels.length % (channels * plane) !== 0) {
    throw new DataError(`${pixels.length} pixels do not fill examples of shape ${JSON.stringify(shape.slice(1))}`);
  }
  const out = new Float32Array(pixels.length);
  for (let i = 0; i < pixels.length; ) {
    for (let c = 0; c < channels; c++) {
      const offset = c * 256;
      for (const end = i + plane; i < end; i++) out[i] = table[offset + pixels[i]];
    }
  }
  return out;
}

/**
 * Training data as the trainer wants it: {x: Float32Array, y, n, shape, labels}.
 * @param {Data} data compact (pixels + normalise) or already float32 (x)
 */
export function materialise(data) {
  if (data.x) return data;
  const x = standardise(data.pixels, data.shape, data.normalise);
  return { x, y: data.y, n: data.n, shape: data.shape, labels: data.labels };
}

/** The labels present in int64 labels, ascending. */
export function heldLabels(y) {
  const held = new Set();
  for (const v of y) held.add(Number(v));
  return [...held].sort((a, b) => a - b);
}

/**
 * Demo data from the parsed GET /v1/demo-data reply: x uint8 with metadata `normalise`, or
 * x float32 without it; y int64 [N].
 * @param {Map<string, {dtype: string, shape: number[], data: ArrayLike<number | bigint>}>} tensors
 * @param {Record<string, string> | null} metadata
 * @returns {Data}
 */
export function demoData(tensors, metadata) {
  const x = tensors.get('x');
  const y = tensors.get('y');
  if (!x || !y || y.dtype !== 'I64' || x.shape.length < 2 || x.shape[0] !== y.shape[0] || y.shape.length !== 1) {
    throw new DataError('the demo data is not x [N, ...] and y int64 [N]');
  }
  const base = { y: y.data, n: x.shape[0], shape: x.shape, labels: heldLabels(y.data) };
  if (x.dtype === 'U8') {
    let rule;
    try {
      rule = JSON.parse(metadata?.normalise ?? 'null');
    } catch {
      rule = null;
    }
    if (!rule) throw new DataError('the demo data is uint8 pixels without a readable "normalise" rule');
    return { ...base, pixels: x.data, normalise: checkRule(rule, x.shape[1]) };
  }
  if (x.dtype === 'F32') return { ...base, x: x.data };
  throw new DataError(`the demo data's x is ${x.dtype}; expected uint8 pixels or float32`);
}

/**
 * Training data: x row-major float32 [n, ...sample], or uint8 pixels with their rule; y int64
 * [n]; the labels held.
 * @typedef {{x?: Float32Array, pixels?: Uint8Array, normalise?: {scale: number, mean: number[],
 *            std: number[]}, y: BigInt64Array, n: number, shape: number[], labels: number[]}} Data
 */
