import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { test } from 'node:test';

import { ORT_FILES, PAGE_FILES } from '../tools/copy_assets.mjs';

const web = new URL('../', import.meta.url);

test('every file the page needs exists, and the pinned onnxruntime-web is the one installed', () => {
  for (const name of PAGE_FILES) assert.ok(existsSync(new URL(name, web)), name);
  for (const name of ORT_FILES) {
    assert.ok(existsSync(new URL(`node_modules/onnxruntime-web/dist/${name}`, web)), name);
  }
  const lock = JSON.parse(readFileSync(new URL('package-lock.json', web), 'utf8'));
  const installed = JSON.parse(readFileSync(new URL('node_modules/onnxruntime-web/package.json', web), 'utf8'));
  assert.equal(installed.version, lock.packages['node_modules/onnxruntime-web'].version);
});

test('the page imports and starts only files that are copied', () => {
  const copied = new Set([...PAGE_FILES, ...ORT_FILES.map((n) => `ort/${n}`)]);
  for (const name of PAGE_FILES.filter((n) => n.endsWith('.js'))) {
    const source = readFileSync(new URL(name, web), 'utf8');
    for (const [, path] of source.matchAll(/from '\.\/([^']+)'/g)) {
      assert.ok(copied.has(path), `${name} imports ${path}`);
    }
  }
  const html = readFileSync(new URL('device.html', web), 'utf8');
  for (const [, path] of html.matchAll(/(?:src|href)="([^":]+)"/g)) {
    if (path === '/favicon.ico') continue; // the coordinator's own route, shared with the live page
    assert.ok(copied.has(path), `device.html refers to ${path}`);
  }
  const page = readFileSync(new URL('device.js', web), 'utf8');
  for (const [, path] of page.matchAll(/new URL\('([^']+)', import\.meta\.url\)/g)) {
    assert.ok(copied.has(path), `device.js starts ${path}`);
  }
});
