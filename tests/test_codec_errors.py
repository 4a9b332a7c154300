"""Bad frames and broken streams: always a CodecError naming the problem, never another exception."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import codec
from codec import MAX_FRAME_BYTES, CodecError, CodecSpec
from codec.frame import pack_frame, unpack_frame

RNG = np.random.default_rng(11)
SMALL = {
    "w": RNG.standard_normal((6, 5)).astype(np.float32),
    "z": np.zeros(300, np.float32),  # compresses: exercises the zstd path
    "n": np.arange(4),
}
SPECS = [
    CodecSpec(),
    CodecSpec(zstd_level=0),
    CodecSpec(quantization="fp16"),
    CodecSpec(top_k_fraction=0.3, quantization="int8", block_size=4),
    CodecSpec(top_k_fraction=0.9, quantization="int4", block_size=8),  # bitmap indices
]
FRAMES = [f for spec in SPECS for f in codec.encode_tensors(SMALL, spec)]


def decode_all(frames):
    return list(codec.decode_frames(frames))


def repack(frame: bytes, **changes) -> bytes:
    """The same frame with header fields replaced (and a valid header checksum)."""
    header, payload = unpack_frame(frame)
    return pack_frame({**header.to_json(), **changes}, bytes(payload))


def test_the_fixture_frames_are_valid_and_small():
    assert all(len(f) < 3000 for f in FRAMES)  # crc32 detects every 1-3 bit error at this size
    assert {codec.read_header(f).encoding for f in FRAMES} >= {"dense+raw", "dense+raw+zstd", "topk+int8", "topk+int4"}
    decode_all(FRAMES[:3])


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(FRAMES), st.lists(st.integers(0, 10**9), min_size=1, max_size=3, unique=True))
def test_any_bit_flip_is_detected(frame, positions):
    corrupted = bytearray(frame)
    bits = {p % (8 * len(frame)) for p in positions}
    for bit in bits:
        corrupted[bit // 8] ^= 1 << (bit % 8)

    with pytest.raises(CodecError):
        decode_all([bytes(corrupted)])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(FRAMES), st.integers(0, 10**9))
def test_any_truncated_frame_is_refused(frame, cut):
    with pytest.raises(CodecError):
        decode_all([frame[: cut % len(frame)]])


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000) | st.binary(max_size=2000).map(lambda b: b"FSNF\x01\x00\x00\x00" + b))
def test_random_bytes_are_refused(data):
    with pytest.raises(CodecError):
        decode_all([data])
    with pytest.raises(CodecError):
        codec.read_header(data)


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=10),
       st.sampled_from(["name", "shape", "dtype", "count", "part", "parts", "start", "stop", "chain", "size", "crc"]))
def test_any_header_field_replaced_by_junk_is_refused_with_a_codec_error(junk, key):
    frame = repack(FRAMES[0], **{key: junk})
    try:
        decode_all([frame])
    except CodecError:
        pass  # the only acceptable failure; a junk value equal to the real one decodes fine


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"chain": [{"stage": "dense"}, {"stage": "bf16"}]}, "tensor 'w' part 1/1: unknown value stage 'bf16'"),
        ({"chain": [{"stage": "sketch"}, {"stage": "raw"}]}, "unknown selection stage 'sketch'"),
        ({"chain": [{"stage": "dense"}, {"stage": "raw"}, {"stage": "lz4"}]}, "unknown byte stage 'lz4'"),
        ({"chain": [{"stage": "dense"}, {"stage": "raw", "scale": 2}]}, "unknown parameters ['scale']"),
        ({"count": 31}, "header count 31 does not match shape [6, 5] (30 elements)"),
        ({"shape": [5, 5]}, "header count 30 does not match shape [5, 5] (25 elements)"),
        ({"dtype": "|O"}, "tensor 'w': unsupported dtype '|O'"),
        ({"dtype": "<f8"}, "payload size 120 does not match its chain"),
        ({"part": 1}, "header field 'part' must be an integer in [0, 0], got 1"),
        ({"stop": 29}, "payload size 120 does not match its chain (dense+raw: 116 bytes)"),
        ({"size": 2 * MAX_FRAME_BYTES}, "header field 'size' must be an integer in [0,"),
        ({"extra": 1}, "has unknown keys ['extra']"),
        ({"name": ""}, "tensor name must be a non-empty str"),
    ],
)
def test_inconsistent_headers_name_the_tensor_and_the_problem(changes, problem):
    frame = repack(codec.encode_tensors({"w": SMALL["w"]}, CodecSpec(zstd_level=0)).__next__(), **changes)

    with pytest.raises(CodecError) as info:
        decode_all([frame])

    assert problem in str(info.value)
    assert str(info.value).startswith("frame 0: ")


def test_integer_tensors_cannot_claim_a_lossy_encoding():
    frame = next(codec.encode_tensors({"n": np.arange(4, dtype=np.int8)}, CodecSpec(zstd_level=0)))
    lying = repack(frame, chain=[{"stage": "dense"}, {"stage": "int8", "block": 4}], size=8)

    with pytest.raises(CodecError, match="int8 tensors are sent dense and raw, got dense\\+int8"):
        decode_all([lying])


def test_payload_corruption_is_reported_as_a_checksum_mismatch_naming_the_tensor():
    frame = bytearray(next(codec.encode_tensors({"enc.conv.weight": SMALL["w"]}, CodecSpec(zstd_level=0))))
    frame[-1] ^= 0x40

    with pytest.raises(CodecError, match="frame 0: tensor 'enc.conv.weight' part 1/1: payload checksum mismatch"):
        decode_all([bytes(frame)])


def test_a_decompression_bomb_is_refused_before_decompressing():
    # 100 MB of zeros compress to a few kB; a header may claim at most PAYLOAD_BUDGET bytes.
    bomb = zstandard.ZstdCompressor(level=1).compress(b"\0" * 100_000_000)
    header = {
        "name": "bomb", "shape": [25_000_000], "dtype": "<f4", "count": 25_000_000, "part": 0, "parts": 1,
        "start": 0, "stop": 25_000_000, "chain": [{"stage": "dense"}, {"stage": "raw"}, {"stage": "zstd"}],
        "size": 100_000_000, "crc": 0,
    }

    with pytest.raises(CodecError, match="header field 'size' must be an integer in"):
        decode_all([pack_frame(header, bomb)])
    # A frame within the budget whose zstd payload declares more than the header says:
    small = {**header, "shape": [1000], "count": 1000, "stop": 1000, "size": 4000}
    with pytest.raises(CodecError, match="tensor 'bomb' part 1/1: zstd frame declares 100000000 bytes, header says 4000"):
        decode_all([pack_frame(small, bomb)])


def test_a_tensor_claiming_more_than_the_limit_is_refused_before_allocating():
    huge = {
        "name": "huge", "shape": [10**6, 10**6], "dtype": "<f4", "count": 10**12, "part": 0, "parts": 1,
        "start": 0, "stop": 10**12, "chain": [{"stage": "topk", "k": 0, "index": "varint", "index_bytes": 0},
                                              {"stage": "raw"}], "size": 0, "crc": 0,
    }

    with pytest.raises(CodecError, match="tensor 'huge' claims 4000000000000 bytes .* over the limit of 1000"):
        decode_all_limited = list(codec.decode_frames([pack_frame(huge, b"")], max_tensor_bytes=1000))
        del decode_all_limited
    with pytest.raises(CodecError, match="over the limit"):
        decode_all([pack_frame(huge, b"")])


def test_oversized_frames_and_non_bytes_are_refused():
    with pytest.raises(CodecError, match=f"exceeds the limit of {MAX_FRAME_BYTES}"):
        codec.read_header(b"FSNF" + bytes(MAX_FRAME_BYTES))
    with pytest.raises(CodecError, match="a frame must be bytes, got str"):
        decode_all(["not a frame"])


# ---------------------------------------------------------------------------------- stream structure

MULTI = list(codec.encode_tensors({"a": np.ones(600_000, np.float32), "b": np.ones(3, np.float32)}, CodecSpec(zstd_level=0)))


@pytest.mark.parametrize(
    "frames, problem",
    [
        (MULTI[:1], "frame 1: stream ended after part 1 of 3 of tensor 'a' (truncated)"),
        (MULTI[:2] + MULTI[3:], "frame 2: tensor 'a' is missing parts 3..3 (next frame starts tensor 'b')"),
        ([MULTI[1], MULTI[0]], "frame 0: tensor 'a' part 2/3 is out of order: expected part 1 of a new tensor"),
        ([MULTI[0], MULTI[2]], "frame 1: tensor 'a' part 3/3 is out of order: expected part 2"),
        (MULTI + MULTI[3:], "frame 4: tensor 'b' appears twice in the stream"),
    ],
)
def test_broken_streams_are_refused(frames, problem):
    with pytest.raises(CodecError) as info:
        decode_all(frames)

    assert str(info.value) == problem


def test_parts_must_tile_the_tensor():
    middle = codec.read_header(MULTI[1])
    gap = repack(MULTI[1], start=middle.start + 1, stop=middle.stop + 1)

    with pytest.raises(CodecError, match="part 2/3: starts at .*, previous part stopped at"):
        decode_all([MULTI[0], gap, MULTI[2]])


def test_accumulate_and_verify_refuse_the_same_broken_streams():
    with pytest.raises(CodecError, match="truncated"):
        codec.accumulate_frames(MULTI[:2], 1.0, {})
    with pytest.raises(CodecError, match="truncated"):
        codec.verify_frames(MULTI[:2])
