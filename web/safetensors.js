// safetensors in the browser and in node: read and write, byte-compatible with Python's
// `safetensors` library (0.4 and later) for the same tensors and metadata.
//
// Layout: 8 bytes little-endian header length N; N bytes of JSON header, padded with
// spaces to a multiple of 8; then the tensors' bytes, little-endian, C order, back to back.
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
// (offsets into the data part) and may hold "__metadata__": {string: string}.
//
// The writer orders tensors as Python's does: by dtype, widest first in the library's
// dtype order, then by name (UTF-8 bytes). Python orders metadata keys arbitrarily (a Rust
// HashMap), so a file with two or more metadata keys is equal to Python's only up to that
// order; this writer sorts them.

const DTYPES = {
  // name: [typed array, bytes per element, rank in the library's dtype order]
  BOOL: [Uint8Array, 1, 0],
  U8: [Uint8Array, 1, 1],
  I8: [Int8Array, 1, 2],
  I16: [Int16Array, 2, 5],
  U16: [Uint16Array, 2, 6],
  F16: [Uint16Array, 2, 7], // raw half-precision bits
  BF16: [Uint16Array, 2, 8], // raw bfloat16 bits
  I32: [Int32Array, 4, 9],
  U32: [Uint32Array, 4, 10],
  F32: [Float32Array, 4, 11],
  F64: [Float64Array, 8, 12],
  I64: [BigInt64Array, 8, 13],
  U64: [BigUint64Array, 8, 14],
};

const MAX_HEADER = 100_000_000;

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new Error('safetensors.js needs a little-endian platform');
}

export class SafetensorsError extends Error {
  constructor(message) {
    super(message);
    this.name = 'SafetensorsError';
  }
}

/** The dtype a typed array stands for when none is given. */
function dtypeOf(data) {
  if (data instanceof Float32Array) return 'F32';
  if (data instanceof Float64Array) return 'F64';
  if (data instanceof BigInt64Array) return 'I64';
  if (data instanceof BigUint64Array) return 'U64';
  if (data instanceof Int32Array) return 'I32';
  if (data instanceof Uint32Array) return 'U32';
  if (data instanceof Int16Array) return 'I16';
  if (data instanceof Uint16Array) return 'U16';
  if (data instanceof Int8Array) return 'I8';
  if (data instanceof Uint8Array) return 'U8';
  throw new SafetensorsError('tensor data must be a typed array (or give its dtype)');
}

function elements(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

const encoder = new TextEncoder();

function compareBytes(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    if (a[i] !== b[i]) return a[i] - b[i];
  }
  return a.length - b.length;
}

function entriesOf(tensors) {
  return tensors instanceof Map ? [...tensors] : Object.entries(tensors);
}

/**
 * Parse a safetensors file.
 * @param {ArrayBuffer | Uint8Array} input
 * @returns {{tensors: Map<string, {dtype: string, shape: number[], data: ArrayBufferView}>,
 *            metadata: Record<string, string> | null}}
 * Throws SafetensorsError for anything a strict reader would refuse (Python's checks).
 */
export function parseSafetensors(input) {
  const bytes = input instanceof Uint8Array ? input : new Uint8Array(input);
  if (bytes.length < 8) throw new SafetensorsError('file shorter than its 8-byte header length');
  const n = Number(new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true));
  if (n > MAX_HEADER) throw new SafetensorsError(`header of ${n} bytes is too large`);
  if (8 + n > bytes.length) throw new SafetensorsError('header runs past the end of the file');
  let header;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(8, 8 + n)));
  } catch (err) {
    throw new SafetensorsError(`header is not UTF-8 JSON (${err.message})`);
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) {
    throw new SafetensorsError('header is not a JSON object');
  }
  let metadata = null;
  const infos = [];
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') {
      if (info === null || typeof info !== 'object' || Array.isArray(info)) {
        throw new SafetensorsError('__metadata__ is not an object');
      }
      for (const v of Object.values(info)) {
        if (typeof v !== 'string') throw new SafetensorsError('__metadata__ values must be strings');
      }
      metadata = info;
      continue;
    }
    const spec = DTYPES[info?.dtype];
    if (!spec) throw new SafetensorsError(`tensor ${name}: unsupported dtype ${info?.dtype}`);
    const { shape, data_offsets: offsets } = info;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new SafetensorsError(`tensor ${name}: bad shape`);
    }
    if (
      !Array.isArray(offsets) ||
      offsets.length !== 2 ||
      !offsets.every((d) => Number.isSafeInteger(d) && d >= 0)
    ) {
      throw new SafetensorsError(`tensor ${name}: bad data_offsets`);
    }
    infos.push({ name, dtype: info.dtype, shape, begin: offsets[0], end: offsets[1], spec });
  }
  infos.sort((a, b) => a.begin - b.begin || a.end - b.end);
  const dataStart = 8 + n;
  const dataLength = bytes.length - dataStart;
  let expected = 0;
  const tensors = new Map();
  for (const { name, dtype, shape, begin, end, spec } of infos) {
    const [Typed, size] = spec;
    if (begin !== expected || end < begin) {
      throw new SafetensorsError(`tensor ${name}: data_offsets leave a gap or overlap`);
    }
    if (end - begin !== elements(shape) * size) {
      throw new SafetensorsError(`tensor ${name}: ${end - begin} bytes do not fit ${dtype}${JSON.stringify(shape)}`);
    }
    expected = end;
    if (end > dataLength) throw new SafetensorsError(`tensor ${name}: data runs past the end of the file`);
    const at = bytes.byteOffset + dataStart + begin;
    const count = (end - begin) / size;
    // A typed-array view needs an aligned offset; copy the bytes when the file's are not.
    const data =
      at % size === 0
        ? new Typed(bytes.buffer, at, count)
        : new Typed(bytes.slice(dataStart + begin, dataStart + end).buffer);
    tensors.set(name, { dtype, shape, data });
  }
  if (expected !== dataLength) {
    throw new SafetensorsError(`the tensors cover ${expected} data bytes, the file holds ${dataLength}`);
  }
  return { tensors, metadata };
}

/**
 * Write tensors (and optional string metadata) as safetensors bytes.
 * @param {Map<string, object> | Record<string, object>} tensors name -> {data, shape, dtype?}
 *   where data is a typed array of the dtype (F16/BF16: raw Uint16Array bits; BOOL: Uint8Array)
 * @param {Record<string, string> | null} [metadata]
 * @returns {Uint8Array}
 */
export function serializeSafetensors(tensors, metadata = null) {
  const items = entriesOf(tensors).map(([name, t]) => {
    const dtype = t.dtype ?? dtypeOf(t.data);
    const spec = DTYPES[dtype];
    if (!spec) throw new SafetensorsError(`tensor ${name}: unsupported dtype ${dtype}`);
    const shape = t.shape ?? [t.data.length];
    if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new SafetensorsError(`tensor ${name}: bad shape ${JSON.stringify(shape)}`);
    }
    const nbytes = elements(shape) * spec[1];
    if (t.data.byteLength !== nbytes) {
      throw new SafetensorsError(`tensor ${name}: ${t.data.byteLength} bytes do not fit ${dtype}${JSON.stringify(shape)}`);
    }
    if (name === '__metadata__') throw new SafetensorsError('__metadata__ is not a tensor name');
    return { name, key: encoder.encode(name), dtype, rank: spec[2], shape, data: t.data, nbytes };
  });
  items.sort((a, b) => b.rank - a.rank || compareBytes(a.key, b.key));
  const parts = [];
  if (metadata !== null && metadata !== undefined) {
    const keys = Object.keys(metadata)
      .map((k) => [encoder.encode(k), k])
      .sort((a, b) => compareBytes(a[0], b[0]));
    const fields = keys.map(([, k]) => {
      if (typeof metadata[k] !== 'string') {
        throw new SafetensorsError(`metadata ${k} must be a string (JSON-encode it)`);
      }
      return `${JSON.stringify(k)}:${JSON.stringify(metadata[k])}`;
    });
    parts.push(`"__metadata__":{${fields.join(',')}}`);
  }
  let offset = 0;
  for (const it of items) {
    parts.push(
      `${JSON.stringify(it.name)}:{"dtype":"${it.dtype}","shape":[${it.shape.join(',')}],` +
        `"data_offsets":[${offset},${offset + it.nbytes}]}`,
    );
    offset += it.nbytes;
  }
  const json = encoder.encode(`{${parts.join(',')}}`);
  const headerLength = Math.ceil(json.length / 8) * 8;
  const out = new Uint8Array(8 + headerLength + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerLength), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.length, 8 + headerLength);
  let at = 8 + headerLength;
  for (const it of items) {
    out.set(new Uint8Array(it.data.buffer, it.data.byteOffset, it.nbytes), at);
    at += it.nbytes;
  }
  return out;
}
