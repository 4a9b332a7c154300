"""Frames of the previous release (FSNF, JSON headers) still decode, and pass the same checks.

Aggregator stores and client state directories hold them: model files, spooled updates,
residuals. The fixtures in tests/data/ were written by that release's codec (tests/data/README.md)
and decoded by it into legacy_v1_expected.npz.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import codec
from codec import CodecError
from codec.frame import pack_frame, unpack_frame

DATA = Path(__file__).parent / "data"
MODEL = DATA / "legacy_v1_model.frames"
UPDATE = DATA / "legacy_v1_update.frames"


def frames(path: Path) -> list[bytes]:
    with open(path, "rb") as fh:
        return list(codec.read_frames(fh))


def legacy_frame(fields: object, payload: bytes) -> bytes:
    """An FSNF frame around any JSON header, with a valid header checksum (as the old codec wrote)."""
    head = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return struct.pack("<4sB3sII", b"FSNF", 1, bytes(3), len(head), zlib.crc32(head)) + head + payload


EXPECTED = dict(np.load(DATA / "legacy_v1_expected.npz"))
ALL = frames(MODEL) + frames(UPDATE)


def test_the_fixtures_are_fsnf_frames_of_every_encoding():
    headers = [codec.read_header(f) for f in ALL]

    assert {f[:4] for f in ALL} == {b"FSNF"}
    assert {h.encoding for h in headers} == {
        "dense+raw", "dense+raw+zstd", "dense+fp16", "topk+raw", "topk+int8", "topk+int8+zstd", "topk+int4",
    }
    assert {h.chain.selection.index for h in headers if h.encoding.startswith("topk")} == {"varint", "bitmap"}
    assert max(h.parts for h in headers) == 3


@pytest.mark.parametrize("path", [MODEL, UPDATE], ids=["model", "update"])
def test_legacy_files_decode_to_the_tensors_the_old_codec_decoded(path):
    decoded = codec.load_tensors(path)

    assert decoded  # every tensor of the file, in order
    for name, array in decoded.items():
        assert array.dtype == EXPECTED[name].dtype and array.shape == EXPECTED[name].shape, name
        np.testing.assert_array_equal(array, EXPECTED[name], err_msg=name)


def test_legacy_updates_verify_and_accumulate_like_new_ones():
    update = frames(UPDATE)
    into: dict[str, np.ndarray] = {}

    summary = codec.verify_frames(update)
    codec.accumulate_frames(update, 0.5, into, dtype=np.float64)

    assert list(summary) == list(into)
    for name, info in summary.items():
        np.testing.assert_allclose(info.sq_norm, float(np.sum(EXPECTED[name].astype(np.float64) ** 2)), rtol=1e-12)
        np.testing.assert_allclose(into[name], 0.5 * EXPECTED[name].astype(np.float64), rtol=0, atol=0)


def test_a_legacy_model_is_rewritten_in_fsn2_with_the_same_tensors(tmp_path):
    model = codec.load_tensors(MODEL)

    # The legacy fixture was written with zstd level 3 (the old codec.LOSSLESS); the same spec now
    # gives a smaller file, the binary headers being the only difference.
    size = codec.save_tensors(tmp_path / "model.frames", model, codec.CodecSpec(zstd_level=3))

    assert {f[:4] for f in frames(tmp_path / "model.frames")} == {b"FSN2"}
    assert size < MODEL.stat().st_size
    again = codec.load_tensors(tmp_path / "model.frames")
    assert list(again) == list(model)
    for name in model:
        np.testing.assert_array_equal(again[name], model[name])


def test_a_legacy_frame_repacked_is_the_same_frame_in_fsn2():
    # Header and payload carry over unchanged; only the header's spelling changes.
    for frame in ALL:
        header, payload = unpack_frame(frame)

        again = pack_frame(header, bytes(payload))

        assert again[:4] == b"FSN2" and len(again) < len(frame)
        assert unpack_frame(again)[0].to_json() == header.to_json()


def test_a_stream_may_mix_legacy_and_new_frames():
    legacy = frames(MODEL)[:2]
    new = list(codec.encode_tensors({"new": np.ones(3, np.float32)}))

    decoded = dict(codec.decode_frames(legacy + new))

    assert list(decoded) == ["enc.0.conv.weight", "enc.0.norm.bias", "new"]


W = next(f for f in ALL if codec.read_header(f).name == "enc.0.conv.weight")


def with_fields(**changes: object) -> bytes:
    header, payload = unpack_frame(W)
    return legacy_frame({**header.to_json(), **changes}, bytes(payload))


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"chain": [{"stage": "dense"}, {"stage": "bf16"}]}, "part 1/1: unknown value stage 'bf16'"),
        ({"chain": [{"stage": "sketch"}, {"stage": "raw"}]}, "unknown selection stage 'sketch'"),
        ({"chain": [{"stage": "dense"}, {"stage": "raw"}, {"stage": "lz4"}]}, "unknown byte stage 'lz4'"),
        ({"chain": [{"stage": "dense"}, {"stage": "raw", "scale": 2}]}, "unknown parameters ['scale']"),
        ({"count": 217}, "header count 217 does not match shape [4, 2, 3, 3, 3] (216 elements)"),
        ({"dtype": "|O"}, "tensor 'enc.0.conv.weight': unsupported dtype '|O'"),
        ({"part": 1}, "header field 'part' must be an integer in [0, 0], got 1"),
        ({"size": 2 * codec.MAX_FRAME_BYTES}, "header field 'size' must be an integer in [0,"),
        ({"stop": 215}, "payload size 864 does not match its chain"),
        ({"extra": 1}, "has unknown keys ['extra']"),
        ({"name": ""}, "tensor name must be a non-empty str"),
    ],
)
def test_legacy_headers_get_the_same_checks(changes, problem):
    with pytest.raises(CodecError) as info:
        list(codec.decode_frames([with_fields(**changes)]))

    assert problem in str(info.value)
    assert str(info.value).startswith("frame 0: ")


def test_a_legacy_frame_of_another_version_is_refused():
    frame = bytearray(W)
    frame[4] = 2

    with pytest.raises(CodecError, match="unsupported FSNF frame format version 2"):
        codec.read_header(bytes(frame))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(ALL), st.sampled_from(sorted(codec.read_header(W).to_json())), json_values)
def test_any_legacy_header_field_replaced_by_junk_is_refused_with_a_codec_error(frame, key, junk):
    header, payload = unpack_frame(frame)
    fields = header.to_json()
    fields[key] = junk
    forged = legacy_frame(fields, bytes(payload))

    try:
        list(codec.decode_frames([forged]))
    except CodecError:
        pass  # the only acceptable failure; a junk value equal to the real one decodes fine

