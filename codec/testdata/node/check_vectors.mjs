// Decode every conformance vector of a directory with fsn2.mjs and print what came out, as JSON:
// { NAME: { frames, frames_sha256, lossless_sha256, tensors: [{ name, shape, dtype, values_sha256 }] }
//   or { error: CLASS, message } }. tests/codec/test_conformance.py compares it with the vectors' JSON.
//
//   FZSTD=.tools/node_modules/fzstd node codec/testdata/node/check_vectors.mjs codec/testdata/vectors

import fs from "node:fs";
import path from "node:path";
import { DecodeError, applyDelta, decodeFrames, losslessFrames, readContainer, sha256 } from "./fsn2.mjs";

const dir = process.argv[2];
const load = (name) => readContainer(new Uint8Array(fs.readFileSync(path.join(dir, `${name}.frames`))));

function decode(name) {
  const { base } = JSON.parse(fs.readFileSync(path.join(dir, `${name}.json`), "utf-8"));
  const frames = load(name);
  const tensors = base ? applyDelta(decode(base).tensors, frames) : decodeFrames(frames);
  return { frames, tensors };
}

const report = {};
for (const file of fs.readdirSync(dir).filter((f) => f.endsWith(".json")).sort()) {
  const name = file.slice(0, -".json".length);
  try {
    const { frames, tensors } = decode(name);
    report[name] = {
      frames: frames.length,
      frames_sha256: sha256(...frames),
      lossless_sha256: sha256(...losslessFrames(tensors)),
      tensors: tensors.map((t) => ({ name: t.name, shape: t.shape, dtype: t.dtype, values_sha256: sha256(t.bytes) })),
    };
  } catch (e) {
    if (!(e instanceof DecodeError)) throw e;
    report[name] = { error: e.code, message: e.message };
  }
}
process.stdout.write(JSON.stringify(report, null, 1) + "\n");
