"""Property-based fuzzing of what the aggregator reads from the network.

The codec decoder and the submission handler (``rounds.spool_update``) get mutated versions of
valid input: flipped, cut, inserted, dropped, repeated and swapped bytes and frames; header
fields replaced by arbitrary values and header bytes rewritten (re-sealed with a valid header
checksum, so the parser sees them); payloads rewritten with a matching payload checksum (so the index and value
decoders see them). Each must answer with its documented error (``CodecError``, ``AggregatorError``) or a
valid result: no other exception, no hang, no spool file left behind.

A fixed budget (``max_examples``) keeps CI fast; ``benchmarks/fuzz_codec.py`` is the
coverage-guided (atheris) harness for long local runs.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from numpy_federation import config, delta, digest, frames_of, model
from support import examples

import codec
from aggregator_service import rounds
from aggregator_service.errors import AggregatorError
from aggregator_service.rounds import UpdateCommit, UpdateHeader
from aggregator_service.store import Store
from codec.frame import (
    SUPPORTED_DTYPES,
    FrameHeader,
    encode_header,
    unpack_frame,
)
from codec.stages import (
    Chain,
    DenseSelection,
    Fp16Coder,
    IntCoder,
    RawCoder,
    SparseSelection,
)

# No shrinking: a failure prints its example at once instead of spending minutes minimising it.
SETTINGS = settings(max_examples=examples(200), deadline=None, derandomize=True,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TENSORS: dict[str, np.ndarray] = {
    "f32": np.linspace(-2, 2, 300, dtype=np.float32).reshape(3, 100),
    "f16": np.linspace(-1, 1, 64, dtype=np.float16),
    "i64": np.arange(5, dtype=np.int64),
    "flag": np.array([True, False, True]),
}
SPECS = [
    codec.LOSSLESS,
    codec.CodecSpec(top_k_fraction=0.1, quantization="int8", block_size=16),
    codec.CodecSpec(top_k_fraction=0.5, quantization="int4", block_size=8, zstd_level=0),
    codec.CodecSpec(quantization="fp16", zstd_level=0),
    codec.CodecSpec(top_k_fraction=0.9, zstd_level=0),  # dense-ish top-k: bitmap index coding
    codec.CodecSpec(top_k_fraction=0.1, quantization="sign", zstd_level=0),  # STC
    codec.CodecSpec(quantization="sign"),  # EF-signSGD
    codec.CodecSpec(byte_budget=400, quantization="int8", zstd_level=0),
]


VALID = [frames_of(TENSORS, spec) for spec in SPECS]

def _flip(frame: bytes, data: st.DataObject) -> bytes:
    if not frame:
        return b"\0"
    at = data.draw(st.integers(0, len(frame) - 1))
    return frame[:at] + bytes([frame[at] ^ data.draw(st.integers(1, 255))]) + frame[at + 1:]


chains = st.builds(
    Chain,
    st.just(DenseSelection())
    | st.builds(SparseSelection, st.integers(0, 400), st.sampled_from(["varint", "bitmap"]), st.integers(0, 600)),
    st.builds(RawCoder, st.sampled_from([1, 2, 4, 8])) | st.just(Fp16Coder())
    | st.builds(IntCoder, st.sampled_from([8, 4]), st.integers(1, 300)),
    st.booleans(),
)
field_values = {
    "name": st.text(min_size=1, max_size=8),
    "shape": st.lists(st.integers(0, 400) | st.integers(0, 2**62), max_size=4).map(tuple),
    "dtype": st.sampled_from(sorted(SUPPORTED_DTYPES)).map(np.dtype),
    "part": st.integers(0, 4) | st.integers(0, 2**63 - 1),
    "parts": st.integers(0, 4) | st.integers(0, 2**63 - 1),
    "start": st.integers(0, 400) | st.integers(0, 2**63 - 1),
    "stop": st.integers(0, 400) | st.integers(0, 2**63 - 1),
    "chain": chains,
    "crc": st.integers(0, 2**32 - 1),
}


def _seal(frame: bytes, head: bytes, payload: bytes) -> bytes:
    """A frame with header bytes ``head`` and a valid header checksum."""
    return b"FSN2" + struct.pack("<HI", len(head), zlib.crc32(head)) + head + payload


def _rewritten(header: FrameHeader, key: str, value: object) -> bytes:
    """FSN2 header bytes of ``header`` with one field replaced (count and size follow, as in the format)."""
    h = dataclasses.replace(header, **{key: value})
    count = math.prod(h.shape)
    size = h.chain.selection.index_bytes + h.chain.values.encoded_size(max(0, h.chain.value_count(h.stop - h.start)))
    return encode_header(dataclasses.replace(h, count=count, size=size))


def _header_field(frame: bytes, data: st.DataObject) -> bytes:
    """Replace one header field by an arbitrary value, re-written with a valid header checksum."""
    try:
        header, payload = unpack_frame(frame)
    except codec.CodecError:  # already broken (an earlier mutation)
        return _flip(frame, data)
    key = data.draw(st.sampled_from(sorted(field_values)))
    try:
        return _rewritten(header, key, data.draw(field_values[key])) + bytes(payload)
    except codec.CodecError:  # not writable in FSN2 (e.g. a name too long): send the original
        return frame


def _header_bytes(frame: bytes, data: st.DataObject) -> bytes:
    """Overwrite, insert or delete a few header bytes, re-sealed with a valid header checksum."""
    try:
        _header, payload = unpack_frame(frame)
    except codec.CodecError:
        return _flip(frame, data)
    start = 10
    head = bytearray(frame[start : len(frame) - len(payload)])
    at = data.draw(st.integers(0, len(head) - 1))
    kind = data.draw(st.sampled_from(["set", "insert", "delete"]))
    if kind == "set":
        head[at] = data.draw(st.integers(0, 255))
    elif kind == "insert":
        head[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    else:
        del head[at : at + data.draw(st.integers(1, 4))]
    return _seal(frame, bytes(head), bytes(payload))


def _payload(frame: bytes, data: st.DataObject) -> bytes:
    """Rewrite an uncompressed payload's bytes and fix its crc, so the decoders themselves run."""
    try:
        header, payload = unpack_frame(frame)
    except codec.CodecError:
        return _flip(frame, data)
    if header.compressed or not len(payload):
        return _flip(frame, data)
    raw = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    return encode_header(dataclasses.replace(header, crc=zlib.crc32(raw))) + bytes(raw)


def _cut(frame: bytes, data: st.DataObject) -> bytes:
    return frame[: data.draw(st.integers(0, max(0, len(frame) - 1)))]


def _insert(frame: bytes, data: st.DataObject) -> bytes:
    at = data.draw(st.integers(0, len(frame)))
    return frame[:at] + data.draw(st.binary(min_size=1, max_size=16)) + frame[at:]


FRAME_MUTATIONS = [_flip, _header_field, _header_bytes, _payload, _cut, _insert]


def mutate(frames: list[bytes], data: st.DataObject) -> list[bytes]:
    """One to three mutations of a frame stream, of single frames or of the stream's structure."""
    frames = list(frames)
    for _ in range(data.draw(st.integers(1, 3))):
        if not frames:
            break
        i = data.draw(st.integers(0, len(frames) - 1))
        kind = data.draw(st.sampled_from(["frame", "frame", "drop", "repeat", "swap", "garbage"]))
        if kind == "frame":
            frames[i] = data.draw(st.sampled_from(FRAME_MUTATIONS))(frames[i], data)
        elif kind == "drop":
            del frames[i]
        elif kind == "repeat":
            frames.insert(i, frames[i])
        elif kind == "swap":
            j = data.draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        else:
            frames.insert(i, data.draw(st.binary(max_size=64)))
    return frames


# ---------------------------------------------------------------------------------------------
# the codec decoder


@pytest.mark.slow  # the largest fuzz budget of the suite
@SETTINGS
@given(data=st.data())
def test_decoder_refuses_mutated_streams_with_codec_error_only(data: st.DataObject) -> None:
    frames = mutate(data.draw(st.sampled_from(VALID)), data)

    try:
        decoded = dict(codec.decode_frames(frames, max_tensor_bytes=1 << 20))
    except codec.CodecError as exc:
        assert str(exc)  # the message names the problem
        return

    # Accepted: every array is what its (possibly mutated but self-consistent) headers describe.
    for name, array in decoded.items():
        assert isinstance(array, np.ndarray) and array.nbytes <= 1 << 20, name


@pytest.mark.slow  # a fuzz budget
@SETTINGS
@given(blob=st.binary(max_size=4096))
def test_decoder_refuses_arbitrary_bytes_with_codec_error_only(blob: bytes) -> None:
    with pytest.raises(codec.CodecError):
        list(codec.decode_frames([blob]))


# ---------------------------------------------------------------------------------------------
# the submission handler

INITIAL = model()
CFG = config(sites=("a", "b", "c"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("fuzz")
    codec.save_tensors(root / "initial.frames", list(INITIAL.items()))
    s = Store(root / "store")
    rounds.initialize(s, CFG, root / "initial.frames", now=0.0)
    return s


UPLOADS = [frames_of(delta("a", 1, INITIAL), spec) for spec in (codec.LOSSLESS, SPECS[1], SPECS[2])]

headers = st.builds(
    UpdateHeader,
    site=st.sampled_from(["a", "b", "zz", "", "../a", "a" * 70]) | st.text(max_size=10),
    round_id=st.sampled_from([1, 1, 1, 0, 2, 2**32 - 1]),
    sample_count=st.sampled_from([10, 10, 0, 2**63]),
    metrics=st.dictionaries(st.sampled_from(["dice", "hd95"]),
                            st.floats(allow_nan=True, allow_infinity=True), max_size=2),
)


@pytest.mark.slow  # a fuzz budget
@SETTINGS
@given(data=st.data())
def test_spool_update_refuses_mutated_uploads_with_aggregator_errors_only(store: Store, data: st.DataObject) -> None:
    frames = data.draw(st.sampled_from(UPLOADS))
    honest = data.draw(st.booleans())
    header = UpdateHeader("a", 1, 10, {"dice": 0.5}) if honest else data.draw(headers)
    # An honest header always comes with mutated frames (else it is simply accepted).
    sent = mutate(frames, data) if honest or data.draw(st.booleans()) else frames
    commit = UpdateCommit(
        chunk_count=data.draw(st.sampled_from([len(sent), len(sent), len(sent) + 1, 0])),
        digest=data.draw(st.sampled_from([digest(sent), digest(sent), "", "0" * 64])),
    )
    parts: list[Any] = [*sent, commit] if data.draw(st.integers(0, 9)) else list(sent)  # 1 in 10: no commit

    try:
        spool, record = rounds.spool_update(store, CFG, header, parts)
    except AggregatorError as exc:
        assert exc.reason and str(exc)
        assert list((store.root / "spool").iterdir()) == []
        return

    # Accepted: the spooled frames are exactly what arrived, finite, and the record says so.
    with open(spool, "rb") as fh:
        stored = list(codec.read_frames(fh))
    spool.unlink()
    assert stored == sent
    assert record.digest == codec.frames_digest(sent)
    assert math.isfinite(record.update_norm)
    assert store.committed_sites(1) == []


def test_the_fuzzed_upload_is_valid_before_mutation(store: Store) -> None:
    # Anchors the property above: unmutated uploads are accepted, so refusals come from mutations.
    for frames in UPLOADS:
        spool, record = rounds.spool_update(
            store, CFG, UpdateHeader("a", 1, 10), [*frames, UpdateCommit(len(frames), digest(frames))]
        )
        spool.unlink()
        assert record.chunks == len(frames)


def test_valid_streams_decode(tmp_path: Path) -> None:
    for frames in VALID:
        decoded = dict(codec.decode_frames(frames))
        assert list(decoded) == list(TENSORS)
        np.testing.assert_array_equal(decoded["i64"], TENSORS["i64"])
