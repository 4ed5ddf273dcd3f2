// Run trainer.js on onnxruntime-web (wasm, in node) for one exported level, so that Python
// can compare the result with device_sim/onnx_backend.py on Python onnxruntime
// (tests/test_web_trainer.py) and time it (bench/).
//
//   node web/tools/run_level.mjs LEVEL_DIR INPUTS.safetensors OUTPUT.safetensors
//
// INPUTS holds the parameters by name, `x` float32 [n, ...] and `y` int64 [n]; its metadata
// holds JSON strings lr, epochs, batch_size, seed, labels and optionally threads.
// OUTPUT holds `trained.NAME` for every parameter and `stats.LAYER.count/.mean/.var`; its
// metadata holds JSON strings loss, accuracy, steps, train_ms, step_ms (a profile).

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

import * as ort from 'onnxruntime-web';

import { parseSafetensors, serializeSafetensors } from '../safetensors.js';
import { OnnxLevel, profileStepMs } from '../trainer.js';

const [levelDir, inputsPath, outputPath] = process.argv.slice(2);
if (!outputPath) {
  console.error('usage: node run_level.mjs LEVEL_DIR INPUTS.safetensors OUTPUT.safetensors');
  process.exit(2);
}
const manifest = JSON.parse(readFileSync(join(levelDir, 'manifest.json'), 'utf8'));
const { tensors, metadata } = parseSafetensors(readFileSync(inputsPath));
const meta = Object.fromEntries(Object.entries(metadata).map(([k, v]) => [k, JSON.parse(v)]));
ort.env.wasm.numThreads = meta.threads ?? 1;

const files = {};
for (const program of ['train_step', 'statistics']) {
  const file = manifest.programs.onnx[program].file;
  files[file] = readFileSync(join(levelDir, file));
}
const level = await OnnxLevel.create(ort, manifest, files);
const x = tensors.get('x');
const data = {
  x: x.data,
  y: tensors.get('y').data,
  n: x.shape[0],
  shape: x.shape,
  labels: meta.labels,
};
const weights = new Map(manifest.parameters.map((p) => [p.name, tensors.get(p.name).data]));

const stepMs = await profileStepMs(level, data);
const start = performance.now();
const result = await level.train({
  weights,
  data,
  labels: meta.labels,
  lr: meta.lr,
  epochs: meta.epochs,
  batchSize: meta.batch_size,
  seed: meta.seed,
});
const trainMs = performance.now() - start;
const stats = await level.statistics(result.weights, data);

const out = new Map();
for (const p of manifest.parameters) {
  out.set(`trained.${p.name}`, { data: result.weights.get(p.name), shape: p.shape });
}
for (const [name, t] of stats) out.set(`stats.${name}`, t);
writeFileSync(
  outputPath,
  serializeSafetensors(out, {
    loss: JSON.stringify(result.loss),
    accuracy: JSON.stringify(result.accuracy),
    steps: JSON.stringify(result.steps),
    train_ms: JSON.stringify(trainMs),
    step_ms: JSON.stringify(stepMs),
  }),
);
