// A device's share of the differential-privacy noise (--dp-placement distributed), as
// heterofl_edge/dp_noise.py computes it: clip the update to L2 norm `clip` over the slice,
// then add to an element held by k clients this round Gaussian noise of variance
// (noise_multiplier * clip)^2 / (reporting_fraction * k). Holders follow from the task's
// per-tensor block sizes at each selected client's rate (nested slices). Gaussian draws come
// from crypto.getRandomValues (Box-Muller): noise nobody can predict.

/** Uniform draws in (0, 1] from the browser's cryptographic generator. */
function uniforms(count, random) {
  const words = new Uint32Array(count);
  for (let at = 0; at < count; at += 16384) random(words.subarray(at, Math.min(count, at + 16384)));
  return Array.from(words, (w) => (w + 1) / 4294967296);
}

/** `count` standard normal draws (Box-Muller over cryptographic uniforms). */
export function standardNormals(count, random = (a) => globalThis.crypto.getRandomValues(a)) {
  const u = uniforms(2 * Math.ceil(count / 2), random);
  const out = new Float64Array(count);
  for (let i = 0; i < count; i += 2) {
    const radius = Math.sqrt(-2 * Math.log(u[i]));
    out[i] = radius * Math.cos(2 * Math.PI * u[i + 1]);
    if (i + 1 < count) out[i + 1] = radius * Math.sin(2 * Math.PI * u[i + 1]);
  }
  return out;
}

/** How many clients hold each element (row-major) of a tensor of `shape` at this rate. */
export function holderCounts(shape, sizes, blocks) {
  const total = shape.reduce((a, b) => a * b, 1);
  const counts = new Int32Array(total);
  const clients = sizes.length ? sizes[0].length : 0;
  const strides = shape.map((_, d) => shape.slice(d + 1).reduce((a, b) => a * b, 1));
  for (let i = 0; i < total; i++) {
    let held = 0;
    for (let c = 0; c < clients; c++) {
      let all = true;
      for (let d = 0; d < shape.length && all; d++) {
        if (blocks[d] === 0) continue;
        const index = Math.floor(i / strides[d]) % shape[d];
        all = index % (shape[d] / blocks[d]) < sizes[d][c];
      }
      if (all) held += 1;
    }
    counts[i] = held;
  }
  return counts;
}

/**
 * The update clipped and noised.
 * @param {Map<string, Float64Array>} update trained minus received, per tensor
 * @param {Map<string, number[]>} shapes
 * @param {{clip: number, noise_multiplier: number, reporting_fraction: number,
 *          sizes: Record<string, number[][]>, blocks: Record<string, number[]>}} noise
 * @returns {Map<string, Float64Array>}
 */
export function addDistributedNoise(update, shapes, noise, random) {
  let square = 0;
  for (const values of update.values()) for (const v of values) square += v * v;
  const norm = Math.sqrt(square);
  const scale = norm > 0 ? Math.min(1, noise.clip / norm) : 1;
  const sigma = noise.noise_multiplier * noise.clip;
  const out = new Map();
  for (const [name, values] of update) {
    const counts = holderCounts(shapes.get(name), noise.sizes[name], noise.blocks[name]);
    const draws = standardNormals(values.length, random);
    const noised = new Float64Array(values.length);
    for (let i = 0; i < values.length; i++) {
      const std = sigma / Math.sqrt(noise.reporting_fraction * Math.max(counts[i], 1));
      noised[i] = values[i] * scale + std * draws[i];
    }
    out.set(name, noised);
  }
  return out;
}
