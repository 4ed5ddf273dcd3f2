// A stand-in for onnxruntime shared by the trainer and worker tests (no assertions here).
// Tensor records what it is given; the train_step "graph" subtracts lr from every
// parameter, adds 1 to every momentum, reports the batch's first label as its loss and
// every example as correct; the statistics "graph" gives the mean and biased variance of
// each example's first value. InferenceSession.create reads the program's name from the
// file's bytes, so a level can be created from {file: bytes} as on a device.

export class Tensor {
  constructor(type, data, dims) {
    Object.assign(this, { type, data, dims });
  }
}

export const manifest = Object.freeze({
  level: 'e',
  num_classes: 4,
  input: { shape: ['batch', 2] },
  parameters: [
    { name: 'w', shape: [2, 2] },
    { name: 'b', shape: [2] },
  ],
  bn_layers: ['n0'],
  hyperparameters: { momentum: 0.9, weight_decay: 0.0005, clip_grad_norm: 1.0 },
  programs: { onnx: { train_step: { file: 'onnx/train_step.onnx' }, statistics: { file: 'onnx/statistics.onnx' } } },
});

export const files = {
  'onnx/train_step.onnx': new TextEncoder().encode('train_step'),
  'onnx/statistics.onnx': new TextEncoder().encode('statistics'),
};

export function trainStep(calls = []) {
  return {
    async run(feeds) {
      calls.push(feeds);
      const out = {
        loss: new Tensor('float32', Float32Array.of(Number(feeds.y.data[0])), []),
        correct: new Tensor('int64', BigInt64Array.of(BigInt(feeds.y.data.length)), []),
      };
      for (const name of ['w', 'b']) {
        const lr = feeds.lr.data[0];
        out[`updated.param.${name}`] = { data: feeds[`param.${name}`].data.map((v) => v - lr) };
        out[`updated.momentum.${name}`] = { data: feeds[`momentum.${name}`].data.map((v) => v + 1) };
      }
      return out;
    },
  };
}

export function statistics() {
  return {
    async run(feeds) {
      const x = feeds.x.data;
      const n = feeds.x.dims[0];
      let mean = 0;
      for (let i = 0; i < n; i++) mean += x[2 * i];
      mean /= n;
      let v = 0;
      for (let i = 0; i < n; i++) v += (x[2 * i] - mean) ** 2;
      return {
        'mean.n0': { data: Float32Array.of(mean), dims: [1] },
        'var.n0': { data: Float32Array.of(v / n), dims: [1] },
      };
    },
  };
}

/** An onnxruntime stand-in whose sessions are the graphs above; `created` counts sessions. */
export function fakeOrt() {
  const ort = {
    Tensor,
    env: { wasm: { numThreads: 0 }, versions: { web: 'fake' } },
    created: 0,
    calls: [],
    InferenceSession: {
      async create(bytes) {
        ort.created += 1;
        const name = new TextDecoder().decode(bytes);
        if (name === 'train_step') return trainStep(ort.calls);
        if (name === 'statistics') return statistics();
        throw new Error(`no program ${name}`);
      },
    },
  };
  return ort;
}

export function data(n) {
  const x = Float32Array.from({ length: 2 * n }, (_, i) => i);
  const y = BigInt64Array.from({ length: n }, (_, i) => BigInt(i % 3));
  return { x, y, n, shape: [n, 2], labels: [0, 1, 2] };
}
