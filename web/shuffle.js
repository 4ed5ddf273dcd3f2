// The local batch order, identical to heterofl_edge/batching.py (which holds the full
// specification): SplitMix64 seeded with an integer in [0, 2**32), Lemire's unbiased
// bounded draw on the upper 32 bits of each output, a Fisher-Yates shuffle of the
// identity per epoch with one continuing generator, consecutive batches with the last
// one short. tests/vectors/shuffle.json pins it for both languages.

const MASK64 = (1n << 64n) - 1n;
const GAMMA = 0x9e3779b97f4a7c15n;
const MIX1 = 0xbf58476d1ce4e5b9n;
const MIX2 = 0x94d049bb133111ebn;
const TWO32 = 2 ** 32;

export class SplitMix64 {
  /** @param {number} seed an integer in [0, 2**32) */
  constructor(seed) {
    if (!Number.isInteger(seed) || seed < 0 || seed >= TWO32) {
      throw new RangeError(`seed ${seed} must be an integer in [0, 2**32)`);
    }
    /** @type {bigint} */
    this.state = BigInt(seed);
  }

  /** @returns {bigint} the next 64-bit output */
  next64() {
    this.state = (this.state + GAMMA) & MASK64;
    let z = this.state;
    z = ((z ^ (z >> 30n)) * MIX1) & MASK64;
    z = ((z ^ (z >> 27n)) * MIX2) & MASK64;
    return z ^ (z >> 31n);
  }

  /** @returns {number} the upper half of the next output, in [0, 2**32) */
  next32() {
    return Number(this.next64() >> 32n);
  }

  /**
   * An integer drawn uniformly from [0, bound), 1 <= bound <= 2**32 (Lemire's method).
   * @param {number} bound
   */
  below(bound) {
    if (!Number.isInteger(bound) || bound < 1 || bound > TWO32) {
      throw new RangeError(`bound ${bound} must be an integer in [1, 2**32]`);
    }
    let [high, low] = mulWide(this.next32(), bound);
    if (low < bound) {
      const threshold = (TWO32 - bound) % bound;
      while (low < threshold) {
        [high, low] = mulWide(this.next32(), bound);
      }
    }
    return high;
  }
}

/**
 * The exact product of x < 2**32 and b <= 2**32 as [product >> 32, product mod 2**32],
 * in doubles: each partial product stays below 2**53.
 */
function mulWide(x, b) {
  const xHigh = Math.floor(x / 65536);
  const xLow = x % 65536;
  const low = xLow * b; // < 2**48
  const mid = xHigh * b; // < 2**48, weighs 2**16
  const lowHigh = Math.floor(low / TWO32);
  const lowLow = low % TWO32;
  const midHigh = Math.floor(mid / 65536); // mid * 2**16 = midHigh * 2**32 + (mid mod 2**16) * 2**16
  const midLow = (mid % 65536) * 65536;
  const sumLow = lowLow + midLow; // < 2**33
  const carry = sumLow >= TWO32 ? 1 : 0;
  return [lowHigh + midHigh + carry, sumLow - carry * TWO32];
}

/**
 * A permutation of 0..n-1 (Fisher-Yates, draws from rng).
 * @param {number} n
 * @param {SplitMix64} rng
 * @returns {Int32Array}
 */
export function shuffled(n, rng) {
  const order = new Int32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  for (let i = n - 1; i > 0; i--) {
    const j = rng.below(i + 1);
    const t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  return order;
}

/**
 * Index arrays of each local batch: a fresh shuffle per epoch, the last batch short.
 * @param {number} numExamples
 * @param {number} epochs
 * @param {number} batchSize
 * @param {number} seed an integer in [0, 2**32)
 * @returns {Generator<Int32Array>}
 */
export function* epochBatches(numExamples, epochs, batchSize, seed) {
  if (!Number.isInteger(batchSize) || batchSize < 1) {
    throw new RangeError(`batch size ${batchSize} must be at least 1`);
  }
  const rng = new SplitMix64(seed);
  for (let e = 0; e < epochs; e++) {
    const order = shuffled(numExamples, rng);
    for (let start = 0; start < numExamples; start += batchSize) {
      yield order.subarray(start, Math.min(start + batchSize, numExamples));
    }
  }
}

/**
 * Consecutive [start, end) ranges for the sBN statistics pass (data order).
 * @param {number} numExamples
 * @param {number} [batchSize]
 * @returns {Generator<[number, number]>}
 */
export function* statsBatches(numExamples, batchSize = 500) {
  for (let start = 0; start < numExamples; start += batchSize) {
    yield [start, Math.min(start + batchSize, numExamples)];
  }
}
