"""The codec's conformance vectors (codec/testdata/vectors, docs/protocol.md §9).

This codec decodes every valid vector to the tensors its JSON describes and refuses every invalid
one with the message it names; the generator rewrites the committed bytes exactly; and a second,
independent decoder (Node.js, codec/testdata/node/fsn2.mjs, written from docs/protocol.md) agrees
on every vector where ``node`` is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import codec
from codec.frame import unpack_frame
from codec.testdata import generate

VECTORS = generate.VECTORS
REPO = Path(__file__).resolve().parents[2]
NAMES = sorted(p.stem for p in VECTORS.glob("*.json"))
VALID = [n for n in NAMES if not n.startswith("invalid-")]
INVALID = [n for n in NAMES if n.startswith("invalid-")]
FZSTD = REPO / ".tools" / "node_modules" / "fzstd"


def meta(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / f"{name}.json").read_text())


def frames(name: str) -> list[bytes]:
    with open(VECTORS / f"{name}.frames", "rb") as fh:
        return list(codec.read_frames(fh))


def decode(name: str) -> list[tuple[str, np.ndarray]]:
    base = meta(name)["base"]
    if base is None:
        return list(codec.decode_frames(frames(name)))
    return list(codec.apply_model_delta(decode(base), frames(name)))


def test_the_vectors_exist() -> None:
    assert len(VALID) >= 12 and len(INVALID) >= 25


@pytest.mark.parametrize("name", VALID)
def test_valid_vector_decodes_to_its_digests(name: str) -> None:
    m = meta(name)
    tensors = decode(name)
    assert generate.describe(tensors) == m["tensors"]
    assert len(frames(name)) == m["frames"]
    assert generate.frames_sha256(frames(name)) == m["frames_sha256"]
    assert generate.lossless_sha256(tensors) == m["lossless_sha256"]


@pytest.mark.parametrize("name", INVALID)
def test_invalid_vector_is_refused_with_its_error(name: str) -> None:
    m = meta(name)
    with pytest.raises(codec.CodecError, match=re.escape(m["message"])):
        decode(name)


def test_the_generator_reproduces_the_committed_vectors() -> None:
    built = generate.build()
    on_disk = {p.name for p in VECTORS.iterdir() if p.suffix in (".frames", ".json")}
    assert on_disk == set(built), "run `python -m codec.testdata.generate` and commit the result"
    for name, data in built.items():
        assert (VECTORS / name).read_bytes() == data, f"{name} differs from what the generator writes"


def test_the_vectors_cover_every_encoding_and_error_class() -> None:
    encodings: set[str] = set()
    indexes: set[str] = set()
    multipart: set[str] = set()
    for name in VALID:
        for frame in frames(name):
            header, _ = unpack_frame(frame)
            encodings.add(header.encoding.removesuffix("+zstd"))
            encodings.add("zstd") if header.compressed else None
            step = header.chain.describe()[0]
            if "index" in step:
                indexes.add(step["index"])
            if header.parts > 1:
                multipart.add(step["stage"])
    for selection in ("dense", "topk"):
        for values in ("raw", "fp16", "int8", "int4", "sign"):
            assert f"{selection}+{values}" in encodings
    assert "zstd" in encodings and indexes == {"varint", "bitmap"} and multipart == {"dense", "topk"}
    assert any(meta(n)["base"] for n in VALID), "a delta vector"
    errors = {meta(n)["error"] for n in INVALID}
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", _spec_section("Error classes"), re.MULTILINE))
    assert errors == documented


def _spec_section(title: str) -> str:
    text = (REPO / "docs" / "protocol.md").read_text()
    start = text.index(title)
    end = text.find("\n#", start)
    return text[start:end if end > 0 else len(text)]


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the second decoder is Node.js: install node, then `make setup`)")
    if not (FZSTD / "package.json").exists():
        pytest.skip("fzstd is not installed: `npm install --prefix .tools fzstd@0.1.1` (run by `make setup`)")
    return node


@pytest.mark.slow  # starts a node process
def test_node_decoder_agrees_on_every_vector() -> None:
    node = _node()
    result = subprocess.run(
        [node, str(REPO / "codec" / "testdata" / "node" / "check_vectors.mjs"), str(VECTORS)],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "FZSTD": str(FZSTD)},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report) == NAMES
    for name in NAMES:
        m, got = meta(name), report[name]
        if m["valid"]:
            assert got.get("error") is None, f"{name}: node refused a valid vector: {got}"
            assert got["tensors"] == m["tensors"], name
            assert (got["frames"], got["frames_sha256"], got["lossless_sha256"]) == (
                m["frames"], m["frames_sha256"], m["lossless_sha256"]), name
        else:
            assert got.get("error") == m["error"], f"{name}: node says {got}, the vector wants {m['error']!r}"


def test_the_specs_constants_and_dtype_codes_are_the_codecs() -> None:
    spec = (REPO / "docs" / "protocol.md").read_text()
    budget = int(re.search(r"`PAYLOAD_BUDGET = .*= ([\d ]+)`", spec).group(1).replace(" ", ""))  # type: ignore[union-attr]
    assert (budget, codec.frame.MAX_FRAME_BYTES, codec.frame.MAX_HEADER_BYTES) == (
        codec.PAYLOAD_BUDGET, 1_048_576, 8192)
    assert f"a dense float32 part holds {budget // 4:,} values".replace(",", " ") in spec
    rows = re.findall(r"^ *\| (\d+) \| (\w+)[^|]*\| (\d+) \| \| (\d+) \| (\w+)[^|]*\| (\d+) \|$", spec, re.MULTILINE)
    table = {int(c): (n, int(b)) for row in rows for c, n, b in (row[:3], row[3:])}
    assert table == {c: (np.dtype(s).name, np.dtype(s).itemsize) for c, s in codec.frame.DTYPE_CODES.items()}
