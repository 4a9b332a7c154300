// A second, independent decoder of FedSegNet's FSN2 frames, frame files and model deltas, written
// from docs/protocol.md alone (plain Node.js; zstd through the pure-JS `fzstd` package, whose
// directory the FZSTD environment variable names). Every refusal is a DecodeError whose `code` is
// one of the error classes of docs/protocol.md §4.8.
//
// Tensors are { name, shape, dtype, bytes }: `bytes` holds the dense values, row-major, each
// element little-endian (the layout whose SHA-256 the conformance vectors record).

import { createHash } from "node:crypto";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(import.meta.url);
const fzstd = require(path.join(process.env.FZSTD || "fzstd", "lib", "index.js"));

export const MAX_FRAME_BYTES = 1 << 20;
export const MAX_HEADER_BYTES = 8192;
export const PAYLOAD_BUDGET = MAX_FRAME_BYTES - 10 - MAX_HEADER_BYTES;
const MAX_TENSOR_BYTES = 4 * 2 ** 30;

export class DecodeError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}
const fail = (code, message) => {
  throw new DecodeError(code, message);
};

// name, bytes per element, floating point?
const DTYPES = {
  1: ["bool", 1, false], 2: ["int8", 1, false], 3: ["uint8", 1, false], 4: ["int16", 2, false],
  5: ["uint16", 2, false], 6: ["int32", 4, false], 7: ["uint32", 4, false], 8: ["int64", 8, false],
  9: ["uint64", 8, false], 10: ["float16", 2, true], 11: ["float32", 4, true], 12: ["float64", 8, true],
  13: ["complex64", 8, false], 14: ["complex128", 16, false],
};
const ITEMSIZE = Object.fromEntries(Object.values(DTYPES).map(([name, size]) => [name, size]));
const SELECTIONS = { 0: "dense", 1: "topk" };
const INDEXES = { 0: "none", 1: "varint", 2: "bitmap" };
const VALUES = { 0: "raw", 1: "fp16", 2: "int8", 3: "int4", 4: "sign" };
const BYTE_STAGES = { 0: "none", 1: "zstd" };

// ------------------------------------------------------------------------------------ crc32, sha256

const CRC_TABLE = new Uint32Array(256).map((_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

export function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

export const sha256 = (...parts) => {
  const h = createHash("sha256");
  for (const p of parts) h.update(p);
  return h.digest("hex");
};

// ------------------------------------------------------------------------------------ half floats

const f32buf = new Float32Array(1);
const u32buf = new Uint32Array(f32buf.buffer);

function halfToNumber(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 31) return m ? NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

// float32 value -> float16 bits, rounded to nearest, ties to even (IEEE 754 conversion).
function numberToHalf(v) {
  f32buf[0] = v;
  const x = u32buf[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++;
  return sign | half;
}

// Store the float32 value `v` (a JS number that is a float32) as element `i` of a float tensor.
function putFloat(view, dtype, i, v) {
  if (dtype === "float32") view.setFloat32(4 * i, v, true);
  else if (dtype === "float64") view.setFloat64(8 * i, v, true);
  else view.setUint16(2 * i, numberToHalf(v), true);
}

// ------------------------------------------------------------------------------------ the header

class Reader {
  constructor(bytes) {
    this.b = bytes;
    this.at = 0;
    this.what = "frame";
  }
  take(n, field) {
    if (this.at + n > this.b.length) fail("header", `${this.what}: frame header is truncated in field '${field}'`);
    const out = this.b.subarray(this.at, this.at + n);
    this.at += n;
    return out;
  }
  varint(field) {
    let value = 0;
    for (let i = 0; i < 9; i++) {
      if (this.at >= this.b.length) fail("header", `${this.what}: frame header is truncated in field '${field}'`);
      const byte = this.b[this.at++];
      value += (byte & 0x7f) * 2 ** (7 * i);
      if (byte < 0x80) {
        if (byte === 0 && i > 0) fail("header", `${this.what}: header field '${field}' is an overlong varint`);
        return value;
      }
    }
    return fail("header", `${this.what}: header field '${field}' is a varint longer than 9 bytes`);
  }
}

function enumOf(table, code, field, what) {
  const tag = table[code];
  if (tag === undefined) fail("header", `${what}: unknown ${field} code ${code}`);
  return tag;
}

function inRange(value, field, low, high, what) {
  if (!(value >= low && value <= high)) fail("header", `${what}: header field '${field}' must be in [${low}, ${high}], got ${value}`);
  return value;
}

function valueBytes(values, block, count) {
  if (values === "raw") return null; // itemsize * count, set by the caller
  if (values === "fp16") return 2 * count;
  if (values === "sign") return Math.ceil(count / 8) + 4 * Math.ceil(count / block);
  const codes = values === "int8" ? count : Math.ceil(count / 2);
  return codes + 4 * Math.ceil(count / block);
}

export function parseFrame(frame) {
  if (frame.length > MAX_FRAME_BYTES) fail("length", `frame of ${frame.length} bytes exceeds ${MAX_FRAME_BYTES}`);
  if (frame.length < 4) fail("length", `frame of ${frame.length} bytes is truncated`);
  if (Buffer.from(frame.subarray(0, 4)).toString("latin1") !== "FSN2") fail("magic", "not an FSN2 frame");
  if (frame.length < 10) fail("length", `frame of ${frame.length} bytes is truncated`);
  const dv = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
  const headLen = dv.getUint16(4, true);
  if (headLen > MAX_HEADER_BYTES) fail("header", `header of ${headLen} bytes exceeds ${MAX_HEADER_BYTES}`);
  if (10 + headLen > frame.length) fail("length", `frame is truncated: header of ${headLen} bytes`);
  const head = frame.subarray(10, 10 + headLen);
  if (crc32(head) !== dv.getUint32(6, true)) fail("header_checksum", "frame header checksum mismatch");
  const r = new Reader(head);
  const codes = r.take(9, "codes");
  const crc = new DataView(codes.buffer, codes.byteOffset + 5, 4).getUint32(0, true);
  const nameLen = r.varint("name");
  if (nameLen < 1 || nameLen > 1024) fail("header", `tensor name of ${nameLen} bytes`);
  let name;
  try {
    name = new TextDecoder("utf-8", { fatal: true }).decode(r.take(nameLen, "name"));
  } catch (e) {
    if (e instanceof DecodeError) throw e;
    fail("header", "tensor name is not valid UTF-8");
  }
  const what = (r.what = `tensor '${name}'`);
  const dtypeEntry = DTYPES[codes[0]];
  if (dtypeEntry === undefined) fail("header", `${what}: unknown dtype code ${codes[0]}`);
  const [dtype, itemsize, floating] = dtypeEntry;
  const selection = enumOf(SELECTIONS, codes[1], "selection", what);
  const index = enumOf(INDEXES, codes[2], "index coding", what);
  const values = enumOf(VALUES, codes[3], "values", what);
  const zstd = enumOf(BYTE_STAGES, codes[4], "byte stage", what) === "zstd";
  const ndim = r.varint("shape");
  if (ndim > 64) fail("header", `${what}: ${ndim} dimensions, at most 64`);
  const shape = [];
  for (let i = 0; i < ndim; i++) shape.push(r.varint("shape"));
  const [part, parts, start, stop] = ["part", "parts", "start", "stop"].map((f) => r.varint(f));
  let k = null;
  let indexBytes = 0;
  if (selection === "dense") {
    if (index !== "none") fail("header", `${what}: dense selection takes index coding 'none', got '${index}'`);
  } else {
    if (index === "none") fail("header", `${what}: topk selection needs an index coding`);
    k = r.varint("k");
    indexBytes = r.varint("index_bytes");
  }
  const block = values === "int8" || values === "int4" || values === "sign" ? r.varint("block") : null;
  if (r.at !== head.length) fail("header", `${what}: frame header has ${head.length - r.at} bytes after its last field`);
  // Ranges and consistency.
  const count = shape.reduce((a, b) => a * b, 1);
  if (count > 2 ** 63) fail("header", `${what}: more than 2**63 elements`);
  inRange(parts, "parts", 1, 2 ** 40, what);
  inRange(part, "part", 0, parts - 1, what);
  const whatPart = `${what} part ${part + 1}/${parts}`;
  inRange(start, "start", 0, count, whatPart);
  inRange(stop, "stop", start, count, whatPart);
  const span = stop - start;
  if (k !== null) {
    inRange(k, "k", 0, span, whatPart);
    inRange(indexBytes, "index_bytes", 0, 2 ** 40, whatPart);
  }
  if (block !== null) inRange(block, "block", 1, 2 ** 20, whatPart);
  if (!floating && (values !== "raw" || selection !== "dense")) fail("header", `${whatPart}: ${dtype} tensors are sent dense and raw`);
  const sent = k === null ? span : k;
  const size = indexBytes + (values === "raw" ? itemsize * sent : valueBytes(values, block, sent));
  if (size > PAYLOAD_BUDGET) fail("header", `${whatPart}: payload of ${size} bytes exceeds ${PAYLOAD_BUDGET}`);
  const stored = frame.subarray(10 + headLen);
  if (!zstd && stored.length !== size) fail("length", `${whatPart}: payload of ${stored.length} bytes, header says ${size}`);
  if (zstd && stored.length === 0) fail("zstd", `${whatPart}: empty zstd payload`);
  return { name, dtype, itemsize, shape, count, part, parts, start, stop, span, selection, index, k, indexBytes,
    values, block, zstd, crc, size, sent, stored, what: whatPart };
}

// ------------------------------------------------------------------------------------ payloads

// The content size a zstd frame header declares (RFC 8878 §3.1.1.1), or -1 when it declares none.
function zstdContentSize(data) {
  if (data.length < 6 || data[0] !== 0x28 || data[1] !== 0xb5 || data[2] !== 0x2f || data[3] !== 0xfd) return null;
  const fhd = data[4];
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const dictBytes = [0, 1, 2, 4][fhd & 3];
  const fcsBytes = [single ? 1 : 0, 2, 4, 8][fcsFlag];
  if (fcsBytes === 0) return -1;
  const at = 5 + (single ? 0 : 1) + dictBytes;
  if (data.length < at + fcsBytes) return null;
  let v = 0;
  for (let i = fcsBytes - 1; i >= 0; i--) v = v * 256 + data[at + i];
  return fcsBytes === 2 ? v + 256 : v;
}

export function unzstd(stored, size, what) {
  const declared = zstdContentSize(stored);
  if (declared === null) fail("zstd", `${what}: payload is not a zstd frame`);
  if (declared !== size) fail("zstd", `${what}: zstd frame declares ${declared} bytes, header says ${size}`);
  let raw;
  try {
    raw = fzstd.decompress(stored);
  } catch (e) {
    fail("zstd", `${what}: corrupt zstd payload (${e.message})`);
  }
  if (raw.length !== size) fail("zstd", `${what}: zstd payload decompressed to ${raw.length} bytes, header says ${size}`);
  return raw;
}

function decodeIndex(h, data) {
  const positions = new Array(h.k);
  if (h.index === "varint") {
    let at = 0;
    let pos = -1;
    for (let i = 0; i < h.k; i++) {
      let gap = 0;
      for (let j = 0; ; j++) {
        if (j === 9) fail("payload", `${h.what}: varint index longer than 9 bytes`);
        if (at >= data.length) fail("payload", `${h.what}: varint index section is truncated`);
        const byte = data[at++];
        gap += (byte & 0x7f) * 2 ** (7 * j);
        if (byte < 0x80) break;
      }
      if (gap >= h.span) fail("payload", `${h.what}: index gap out of range for ${h.span} positions`);
      pos += gap + 1;
      positions[i] = pos;
    }
    if (at !== data.length) fail("payload", `${h.what}: varint index section holds more than ${h.k} indices`);
    if (h.k && pos >= h.span) fail("payload", `${h.what}: index ${pos} out of range for ${h.span} positions`);
  } else {
    if (data.length !== Math.ceil(h.span / 8)) fail("payload", `${h.what}: bitmap of ${data.length} bytes for ${h.span} positions`);
    let n = 0;
    for (let p = 0; p < 8 * data.length; p++) {
      if ((data[p >> 3] >> (p & 7)) & 1) {
        if (p >= h.span) fail("payload", `${h.what}: bitmap has bits set past position ${h.span}`);
        if (n < h.k) positions[n] = p;
        n++;
      }
    }
    if (n !== h.k) fail("payload", `${h.what}: bitmap marks ${n} positions, header says ${h.k}`);
  }
  return positions;
}

// Write the part's values into the tensor's bytes at `positions` (absolute; null = dense from start).
function decodeValues(h, data, out, positions) {
  const at = (i) => (positions === null ? h.start + i : positions[i]);
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  const src = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (h.values === "raw") {
    for (let i = 0; i < h.sent; i++) {
      const chunk = data.subarray(i * h.itemsize, (i + 1) * h.itemsize);
      if (h.dtype === "bool" && chunk[0] > 1) fail("payload", `${h.what}: bool values other than 0 and 1`);
      out.set(chunk, at(i) * h.itemsize);
    }
  } else if (h.values === "fp16") {
    for (let i = 0; i < h.sent; i++) {
      const bits = src.getUint16(2 * i, true);
      if (h.dtype === "float16") view.setUint16(2 * at(i), bits, true);
      else putFloat(view, h.dtype, at(i), halfToNumber(bits));
    }
  } else if (h.values === "sign") {
    const bitBytes = Math.ceil(h.sent / 8);
    const blocks = Math.ceil(h.sent / h.block);
    const scales = [];
    for (let b = 0; b < blocks; b++) {
      const s = src.getFloat32(bitBytes + 4 * b, true);
      if (!(Number.isFinite(s) && s >= 0)) fail("payload", `${h.what}: negative or non-finite sign scale`);
      scales.push(s);
    }
    if (h.sent % 8 && data[bitBytes - 1] >> (h.sent % 8)) fail("payload", `${h.what}: sign padding bits are not zero`);
    // bit set: +scale, clear: -scale (so a zero scale gives -0.0), in float32, then the tensor's dtype.
    for (let i = 0; i < h.sent; i++) {
      const s = scales[Math.floor(i / h.block)];
      putFloat(view, h.dtype, at(i), (data[i >> 3] >> (i & 7)) & 1 ? s : -s);
    }
  } else {
    const codeBytes = h.values === "int8" ? h.sent : Math.ceil(h.sent / 2);
    const blocks = Math.ceil(h.sent / h.block);
    const scales = [];
    for (let b = 0; b < blocks; b++) {
      const s = src.getFloat32(codeBytes + 4 * b, true);
      if (!(Number.isFinite(s) && s >= 0)) fail("payload", `${h.what}: negative or non-finite quantization scale`);
      scales.push(s);
    }
    const codes = new Array(h.sent);
    if (h.values === "int8") {
      for (let i = 0; i < h.sent; i++) {
        codes[i] = src.getInt8(i);
        if (codes[i] === -128) fail("payload", `${h.what}: int8 code -128 is not used`);
      }
    } else {
      if (h.sent % 2 && data[codeBytes - 1] >> 4) fail("payload", `${h.what}: int4 padding nibble is not zero`);
      for (let i = 0; i < h.sent; i++) {
        const nibble = (data[i >> 1] >> (4 * (i & 1))) & 0x0f;
        if (nibble === 0) fail("payload", `${h.what}: int4 code 0 (= -8) is not used`);
        codes[i] = nibble - 8;
      }
    }
    // value = float32(code) * scale, rounded to float32 (exact in a double, then one rounding).
    for (let i = 0; i < h.sent; i++) putFloat(view, h.dtype, at(i), Math.fround(codes[i] * scales[Math.floor(i / h.block)]));
  }
}

// ------------------------------------------------------------------------------------ streams

// Decode a stream of frames into tensors (in stream order), checking its structure.
export function decodeFrames(frames) {
  const tensors = [];
  const seen = new Set();
  let current = null; // the header of the last part of an unfinished tensor
  let out = null;
  frames.forEach((frame, i) => {
    try {
      const h = parseFrame(frame);
      if (h.part === 0) {
        if (current !== null) fail("stream", `tensor '${current.name}' is missing parts`);
        if (seen.has(h.name)) fail("stream", `tensor '${h.name}' appears twice in the stream`);
        if (h.count * h.itemsize > MAX_TENSOR_BYTES) fail("stream", `tensor '${h.name}' is over the limit`);
        if (h.start !== 0) fail("stream", `${h.what}: first part starts at ${h.start}`);
        seen.add(h.name);
        out = { name: h.name, shape: h.shape, dtype: h.dtype, bytes: new Uint8Array(h.count * h.itemsize) };
      } else {
        if (current === null || current.name !== h.name || h.part !== current.part + 1) fail("stream", `${h.what} is out of order`);
        if (JSON.stringify([h.shape, h.dtype, h.parts]) !== JSON.stringify([current.shape, current.dtype, current.parts])) {
          fail("stream", `${h.what}: shape/dtype/parts differ from the tensor's first part`);
        }
        if (h.start !== current.stop) fail("stream", `${h.what}: starts at ${h.start}, previous part stopped at ${current.stop}`);
      }
      if (h.part === h.parts - 1) {
        if (h.stop !== h.count) fail("stream", `${h.what}: last part stops at ${h.stop} of ${h.count}`);
        current = null;
      } else {
        current = h;
      }
      const raw = h.zstd ? unzstd(h.stored, h.size, h.what) : h.stored;
      if (crc32(raw) !== h.crc) fail("payload_checksum", `${h.what}: payload checksum mismatch`);
      const positions = h.selection === "topk" ? decodeIndex(h, raw.subarray(0, h.indexBytes)).map((p) => p + h.start) : null;
      decodeValues(h, raw.subarray(h.indexBytes), out.bytes, positions);
      if (h.part === h.parts - 1) tensors.push(out);
    } catch (e) {
      if (e instanceof DecodeError) e.message = `frame ${i}: ${e.message}`;
      throw e;
    }
  });
  if (current !== null) fail("stream", `stream ended after part ${current.part + 1} of ${current.parts} of tensor '${current.name}' (truncated)`);
  return tensors;
}

// The frames of a frame file: "FSNC" 01 00 00 00, then (u32 length, frame)*, then u32 0.
export function readContainer(file) {
  const magic = [0x46, 0x53, 0x4e, 0x43, 1, 0, 0, 0];
  if (file.length < 8 || magic.some((b, i) => file[i] !== b)) fail("container", "not a FedSegNet frame file");
  const dv = new DataView(file.buffer, file.byteOffset, file.byteLength);
  const frames = [];
  let at = 8;
  for (;;) {
    if (at + 4 > file.length) fail("container", `frame file is truncated after ${frames.length} frames (no end marker)`);
    const size = dv.getUint32(at, true);
    at += 4;
    if (size === 0) return frames;
    if (size > MAX_FRAME_BYTES) fail("container", `frame ${frames.length} claims ${size} bytes`);
    if (at + size > file.length) fail("container", `frame file is truncated in frame ${frames.length}`);
    frames.push(file.subarray(at, at + size));
    at += size;
  }
}

// ------------------------------------------------------------------------------------ model deltas

function planes(bytes, count, width) {
  // byte j of element i sits at j * count + i
  const rows = new Uint8Array(count * width);
  for (let j = 0; j < width; j++) for (let i = 0; i < count; i++) rows[i * width + j] = bytes[j * count + i];
  return rows;
}

function applyTensor(base, payload) {
  const what = `tensor '${base.name}'`;
  if (payload.dtype !== "uint8" || payload.shape.length !== 1) fail("delta", `${what}: a delta payload is a 1-D uint8 tensor`);
  const p = payload.bytes;
  if (p.length < 20) fail("delta", `${what}: delta payload is truncated`);
  const dv = new DataView(p.buffer, p.byteOffset, p.byteLength);
  const [version, mode, compressed, reserved] = [p[0], p[1], p[2], p[3]];
  if (version !== 1) fail("delta", `${what}: delta format version ${version}`);
  if (mode > 1 || compressed > 1 || reserved !== 0) fail("delta", `${what}: unknown delta body kind ${mode} / compression flag ${compressed}`);
  if (crc32(base.bytes) !== dv.getUint32(4, true)) fail("delta", `${what}: the delta was made from another base model`);
  const size = Number(dv.getBigUint64(12, true));
  const itemsize = ITEMSIZE[base.dtype];
  const count = base.shape.reduce((a, b) => a * b, 1);
  const limit = mode === 0 ? base.bytes.length : 16 + count * (itemsize + 8);
  if (size > limit) fail("delta", `${what}: delta body claims ${size} bytes, at most ${limit}`);
  let body = p.subarray(20);
  if (compressed) {
    try {
      body = unzstd(body, size, `${what}: delta body`);
    } catch (e) {
      fail("delta", e.message);
    }
  }
  if (body.length !== size) fail("delta", `${what}: delta body of ${body.length} bytes, its head says ${size}`);
  const rows = Uint8Array.from(base.bytes);
  if (mode === 0) {
    if (size !== rows.length) fail("delta", `${what}: dense delta body of ${size} bytes`);
    const x = planes(body, count, itemsize);
    for (let i = 0; i < rows.length; i++) rows[i] ^= x[i];
  } else {
    if (body.length < 16) fail("delta", `${what}: sparse delta body is truncated`);
    const bv = new DataView(body.buffer, body.byteOffset, body.byteLength);
    const width = body[0];
    if ((width !== 4 && width !== 8) || body.subarray(1, 8).some((b) => b !== 0)) fail("delta", `${what}: sparse delta body has gap width ${width}`);
    const k = Number(bv.getBigUint64(8, true));
    if (k > count || body.length !== 16 + k * (width + itemsize)) fail("delta", `${what}: sparse delta body does not hold ${k} changes`);
    const gapRows = planes(body.subarray(16, 16 + k * width), k, width);
    const x = planes(body.subarray(16 + k * width), k, itemsize);
    let pos = -1;
    for (let i = 0; i < k; i++) {
      let gap = 0;
      for (let j = width - 1; j >= 0; j--) gap = gap * 256 + gapRows[i * width + j];
      if (gap < 1) fail("delta", `${what}: sparse delta positions are not increasing`);
      pos += gap;
      if (pos >= count) fail("delta", `${what}: sparse delta position ${pos} out of range`);
      for (let j = 0; j < itemsize; j++) rows[pos * itemsize + j] ^= x[i * itemsize + j];
    }
  }
  if (crc32(rows) !== dv.getUint32(8, true)) fail("delta", `${what}: the tensor rebuilt from the delta fails its checksum`);
  return { name: base.name, shape: base.shape, dtype: base.dtype, bytes: rows };
}

// Rebuild a model from its base model (tensors) and the frames of a delta.
export function applyDelta(baseTensors, frames) {
  const payloads = decodeFrames(frames);
  if (payloads.length !== baseTensors.length) fail("delta", `the delta holds ${payloads.length} tensors, the base model ${baseTensors.length}`);
  return payloads.map((payload, i) => {
    if (payload.name !== baseTensors[i].name) fail("delta", `delta tensor ${i} is '${payload.name}' but the base model's is '${baseTensors[i].name}'`);
    return applyTensor(baseTensors[i], payload);
  });
}

// ------------------------------------------------------------------------------------ the canonical lossless encoding

function varint(n) {
  const out = [];
  while (n >= 0x80) {
    out.push((n % 0x80) | 0x80);
    n = Math.floor(n / 0x80);
  }
  out.push(n);
  return out;
}

// The frames of the canonical lossless encoding (docs/protocol.md §6): what model digests hash.
export function losslessFrames(tensors) {
  const codes = Object.fromEntries(Object.entries(DTYPES).map(([code, [name]]) => [name, Number(code)]));
  const frames = [];
  for (const t of tensors) {
    const itemsize = DTYPES[codes[t.dtype]][1];
    const count = t.shape.reduce((a, b) => a * b, 1);
    const perPart = Math.floor(PAYLOAD_BUDGET / itemsize);
    const parts = Math.max(1, Math.ceil(count / perPart));
    const name = Buffer.from(t.name, "utf-8");
    for (let part = 0; part < parts; part++) {
      const start = part * perPart;
      const stop = Math.min(count, (part + 1) * perPart);
      const payload = t.bytes.subarray(start * itemsize, stop * itemsize);
      const fixed = Buffer.alloc(9);
      fixed[0] = codes[t.dtype];
      fixed.writeUInt32LE(crc32(payload), 5);
      const head = Buffer.concat([fixed, Buffer.from(varint(name.length)), name,
        Buffer.from([...varint(t.shape.length), ...t.shape.flatMap(varint), ...[part, parts, start, stop].flatMap(varint)])]);
      const prefix = Buffer.alloc(10);
      prefix.write("FSN2", 0, "latin1");
      prefix.writeUInt16LE(head.length, 4);
      prefix.writeUInt32LE(crc32(head), 6);
      frames.push(Buffer.concat([prefix, head, payload]));
    }
  }
  return frames;
}
