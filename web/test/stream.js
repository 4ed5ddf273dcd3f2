// The shared vectors' reproducible `random` (tests/vectors/secagg_vectors.py `stream`).

import { createHash } from 'node:crypto';

/** Bytes of SHA-256(label | counter), 32 at a time, handed out `count` at a time. */
export function stream(label) {
  let counter = 0;
  let buffer = new Uint8Array(0);
  return (count) => {
    while (buffer.length < count) {
      const block = createHash('sha256').update(`${label}|${counter}`).digest();
      const next = new Uint8Array(buffer.length + block.length);
      next.set(buffer, 0);
      next.set(block, buffer.length);
      buffer = next;
      counter += 1;
    }
    const out = buffer.slice(0, count);
    buffer = buffer.slice(count);
    return out;
  };
}
