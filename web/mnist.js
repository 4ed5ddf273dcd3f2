// MNIST idx files in the browser, normalised bit for bit as heterofl_edge/data/idx.py does:
// x = float32(pixel) / float32(255); x = (x - float32(0.1307)) / float32(0.3081), every
// operation rounded to float32 (data.js standardise with MNIST_RULE). The files load as
// uint8 pixels plus that rule; the float32 inputs are made where training runs.

import { DataError, MNIST_RULE, heldLabels, standardise } from './data.js';

export { DataError };
export const MNIST_MEAN = MNIST_RULE.mean[0];
export const MNIST_STD = MNIST_RULE.std[0];

/**
 * uint8 pixels -> float32 standardised with MNIST's mean and std (same bits as Python).
 * @param {Uint8Array} pixels
 * @returns {Float32Array}
 */
export function normalise(pixels) {
  return standardise(pixels, [pixels.length, 1], MNIST_RULE);
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
 * @returns {Promise<import('./data.js').Data>} pixels uint8 [n, 1, 28, 28] row-major with
 *   MNIST's rule, y int64, the labels held
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
  for (let i = 0; i < n; i++) {
    const v = labels.data[i];
    if (v > 9) throw new DataError(`labels go up to ${v}, expected 0..9`);
    y[i] = BigInt(v);
  }
  return {
    pixels: images.data,
    normalise: MNIST_RULE,
    y,
    n,
    shape: [n, 1, images.shape[1], images.shape[2]],
    labels: heldLabels(y),
  };
}
