// MNIST idx files in the browser, normalised bit for bit as heterofl_edge/data/idx.py does:
// x = float32(pixel) / float32(255); x = (x - float32(0.1307)) / float32(0.3081), every
// operation rounded to float32. A double-precision +, -, / of two float32 values rounded
// once to float32 is the correctly rounded float32 result, so Math.fround after each step
// reproduces numpy's float32 arithmetic exactly; a 256-entry table holds the results.

export const MNIST_MEAN = 0.1307;
export const MNIST_STD = 0.3081;

export class DataError extends Error {
  constructor(message) {
    super(message);
    this.name = 'DataError';
  }
}

const TABLE = (() => {
  const mean = Math.fround(MNIST_MEAN);
  const std = Math.fround(MNIST_STD);
  const table = new Float32Array(256);
  for (let p = 0; p < 256; p++) {
    const x = Math.fround(p / 255);
    table[p] = Math.fround(Math.fround(x - mean) / std);
  }
  return table;
})();

/**
 * uint8 pixels -> float32 standardised with MNIST's mean and std (same bits as Python).
 * @param {Uint8Array} pixels
 * @returns {Float32Array}
 */
export function normalise(pixels) {
  const out = new Float32Array(pixels.length);
  for (let i = 0; i < pixels.length; i++) out[i] = TABLE[pixels[i]];
  return out;
}

/**
 * One unsigned-byte idx file (already decompressed).
 * @param {Uint8Array} raw
 * @param {string} [name] for messages
 * @returns {{shape: number[], data: Uint8Array}}
 */
export function parseIdx(raw, name = 'idx file') {
  if (raw.length < 4 || raw[0] !== 0 || raw[1] !== 0 || raw[2] !== 0x08) {
    throw new DataError(`${name} is not an unsigned-byte idx file (bad magic number)`);
  }
  const ndim = raw[3];
  const header = 4 + 4 * ndim;
  if (ndim === 0 || raw.length < header) throw new DataError(`${name} has a truncated idx header`);
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const shape = [];
  for (let d = 0; d < ndim; d++) shape.push(view.getUint32(4 + 4 * d, false));
  const expected = shape.reduce((a, b) => a * b, 1);
  if (raw.length - header !== expected) {
    throw new DataError(
      `${name} holds ${raw.length - header} data bytes, its header promises ${expected}`,
    );
  }
  return { shape, data: raw.subarray(header) };
}

/**
 * The bytes of a file the user picked (or any Blob / buffer), gunzipped when they start
 * with gzip's magic number (DecompressionStream, in browsers and node >= 18).
 * @param {Blob | ArrayBuffer | Uint8Array} source
 * @returns {Promise<Uint8Array>}
 */
export async function readMaybeGzip(source) {
  const blob = source instanceof Blob ? source : new Blob([source]);
  const head = new Uint8Array(await blob.slice(0, 2).arrayBuffer());
  if (head[0] !== 0x1f || head[1] !== 0x8b) return new Uint8Array(await blob.arrayBuffer());
  try {
    const stream = blob.stream().pipeThrough(new DecompressionStream('gzip'));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  } catch (err) {
    throw new DataError(`cannot gunzip the file: ${err.message}`);
  }
}

/**
 * Training data from an images and a labels idx file (gzip or not).
 * @returns {Promise<{x: Float32Array, y: BigInt64Array, n: number, shape: number[],
 *                    labels: number[]}>} x is [n, 1, 28, 28] row-major, labels the classes held
 */
export async function loadMnist(imagesSource, labelsSource) {
  const images = parseIdx(await readMaybeGzip(imagesSource), 'the images file');
  const labels = parseIdx(await readMaybeGzip(labelsSource), 'the labels file');
  if (images.shape.length !== 3 || labels.shape.length !== 1 || images.shape[0] !== labels.shape[0]) {
    throw new DataError(
      `the files disagree: images ${JSON.stringify(images.shape)}, labels ${JSON.stringify(labels.shape)}` +
        ' (pick train-images and train-labels of the same set)',
    );
  }
  const n = labels.shape[0];
  const y = new BigInt64Array(n);
  const held = new Set();
  for (let i = 0; i < n; i++) {
    const v = labels.data[i];
    if (v > 9) throw new DataError(`labels go up to ${v}, expected 0..9`);
    y[i] = BigInt(v);
    held.add(v);
  }
  return {
    x: normalise(images.data),
    y,
    n,
    shape: [n, 1, images.shape[1], images.shape[2]],
    labels: [...held].sort((a, b) => a - b),
  };
}
