// Copy what the device page needs into a folder the coordinator serves (npm run build).
//
//   node tools/copy_assets.mjs [DEST]     DEST defaults to ../coordinator/static/device
//
// DEST receives the page's modules and onnxruntime-web's wasm runtime under ort/, a
// gzip copy of the wasm binary (serve it with Content-Encoding: gzip where the browser
// accepts it) and assets.json: every file with its bytes, sha256 and content type.
// DEST is replaced as a whole, so no stale file survives an upgrade.

import { createHash } from 'node:crypto';
import { copyFileSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

const WEB = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const ORT = join(WEB, 'node_modules', 'onnxruntime-web', 'dist');

/** The page's own files (from web/) and onnxruntime-web's (into ort/). */
export const PAGE_FILES = [
  'device.html',
  'device.css',
  'device.js',
  'client.js',
  'dp_noise.js',
  'protocol.js',
  'remote_level.js',
  'train_worker.js',
  'worker_host.js',
  'trainer.js',
  'shuffle.js',
  'safetensors.js',
  'encoding.js',
  'secagg.js',
  'secagg_device.js',
  'data.js',
  'mnist.js',
];
export const ORT_FILES = ['ort.wasm.min.mjs', 'ort-wasm-simd-threaded.mjs', 'ort-wasm-simd-threaded.wasm'];
export const GZIPPED = ['ort/ort-wasm-simd-threaded.wasm'];

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.wasm': 'application/wasm',
};

function contentType(name) {
  return TYPES[name.slice(name.lastIndexOf('.'))];
}

function main() {
  const dest = resolve(process.argv[2] ?? join(WEB, '..', 'coordinator', 'static', 'device'));
  const staging = `${dest}.staging-${process.pid}`;
  rmSync(staging, { recursive: true, force: true });
  mkdirSync(join(staging, 'ort'), { recursive: true });
  const copied = [
    ...PAGE_FILES.map((name) => [join(WEB, name), name]),
    ...ORT_FILES.map((name) => [join(ORT, name), `ort/${name}`]),
  ];
  const files = {};
  for (const [source, target] of copied) {
    copyFileSync(source, join(staging, target));
    const bytes = readFileSync(source);
    files[target] = {
      bytes: bytes.length,
      sha256: createHash('sha256').update(bytes).digest('hex'),
      content_type: contentType(target),
    };
  }
  for (const target of GZIPPED) {
    const packed = gzipSync(readFileSync(join(staging, target)), { level: 9 });
    writeFileSync(join(staging, `${target}.gz`), packed);
    files[target].gzip = { file: `${target}.gz`, bytes: packed.length };
  }
  const version = JSON.parse(readFileSync(join(WEB, 'node_modules', 'onnxruntime-web', 'package.json'), 'utf8')).version;
  writeFileSync(
    join(staging, 'assets.json'),
    `${JSON.stringify({ page: 'device.html', onnxruntime_web: version, files }, null, 1)}\n`,
  );
  rmSync(dest, { recursive: true, force: true });
  mkdirSync(dirname(dest), { recursive: true });
  renameSync(staging, dest);
  console.log(`copied ${copied.length} files (onnxruntime-web ${version}) to ${dest}`);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) main();
