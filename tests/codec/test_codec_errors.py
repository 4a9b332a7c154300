"""Bad frames and broken streams: always a CodecError naming the problem, never another exception."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from support import examples

import codec
from codec import MAX_FRAME_BYTES, CodecError, CodecSpec
from codec.frame import encode_header, pack_frame, unpack_frame

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


def seal(head: bytes, payload: bytes = b"") -> bytes:
    """An FSN2 frame around hand-made header bytes, with a valid header checksum."""
    return b"FSN2" + struct.pack("<HI", len(head), zlib.crc32(head)) + head + payload


W = SMALL["w"].tobytes()  # (6, 5) float32: 120 bytes


def w_head(dtype=11, selection=0, index=0, values=0, byte_stage=0, name=b"\x01w", shape=b"\x02\x06\x05",
           ranges=b"\x00\x01\x00\x1e", tail=b"") -> bytes:
    """Header bytes of tensor 'w' sent dense and raw in one part, field by field (see codec/frame.py)."""
    codes = bytes([dtype, selection, index, values, byte_stage]) + struct.pack("<I", zlib.crc32(W))
    return codes + name + shape + ranges + tail


def test_the_hand_made_header_is_the_one_the_codec_writes():
    written = next(codec.encode_tensors({"w": SMALL["w"]}, CodecSpec(zstd_level=0)))

    assert written == seal(w_head(), W)
    assert len(written) - len(W) == 10 + 9 + 2 + 3 + 4  # prefix, codes + crc, name, shape, part/parts/start/stop


def test_the_fixture_frames_are_valid_and_small():
    assert all(len(f) < 3000 for f in FRAMES)  # crc32 detects every 1-3 bit error at this size
    assert {codec.read_header(f).encoding for f in FRAMES} >= {"dense+raw", "dense+raw+zstd", "topk+int8", "topk+int4"}
    decode_all(FRAMES[:3])


@settings(max_examples=examples(100), deadline=None)
@given(st.sampled_from(FRAMES), st.lists(st.integers(0, 10**9), min_size=1, max_size=3, unique=True))
def test_any_bit_flip_is_detected(frame, positions):
    corrupted = bytearray(frame)
    bits = {p % (8 * len(frame)) for p in positions}
    for bit in bits:
        corrupted[bit // 8] ^= 1 << (bit % 8)

    with pytest.raises(CodecError):
        decode_all([bytes(corrupted)])


@settings(max_examples=examples(60), deadline=None)
@given(st.sampled_from(FRAMES), st.integers(0, 10**9))
def test_any_truncated_frame_is_refused(frame, cut):
    with pytest.raises(CodecError):
        decode_all([frame[: cut % len(frame)]])


@settings(max_examples=examples(100), deadline=None)
@given(st.binary(max_size=2000)
       | st.binary(max_size=2000).map(lambda b: b"FSNF\x01\x00\x00\x00" + b)  # not a format (any more)
       | st.binary(max_size=2000).map(lambda b: b"FSN2" + b))
def test_random_bytes_are_refused(data):
    with pytest.raises(CodecError):
        decode_all([data])
    with pytest.raises(CodecError):
        codec.read_header(data)


@pytest.mark.slow  # 150 examples
@settings(max_examples=examples(150), deadline=None)
@given(st.sampled_from(FRAMES), st.data())
def test_any_header_bytes_with_a_valid_checksum_are_refused_or_read_back_canonically(frame, data):
    # The header's own checksum is fixed up, so the field parser itself sees the junk.
    head_len = int.from_bytes(frame[4:6], "little")
    head, payload = bytearray(frame[10 : 10 + head_len]), frame[10 + head_len :]
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(head)))
        kind = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if kind == "insert" or at == len(head):
            head[at:at] = bytes([data.draw(st.integers(0, 255))])
        elif kind == "set":
            head[at] = data.draw(st.integers(0, 255))
        else:
            del head[at]
    forged = seal(bytes(head), payload)

    try:
        header = codec.read_header(forged)
    except CodecError:
        return
    assert encode_header(header) == forged[: 10 + len(head)]  # one header, one spelling
    try:
        decode_all([forged])
    except CodecError:
        pass  # e.g. the payload checksum no longer matches


@settings(max_examples=examples(60), deadline=None)
@given(st.sampled_from(FRAMES),
       st.sampled_from(["part", "parts", "start", "stop", "crc", "count", "size"]),
       st.integers(0, 2**63 - 1) | st.integers(0, 2000))
def test_any_header_field_replaced_is_refused_with_a_codec_error(frame, key, value):
    header, payload = unpack_frame(frame)
    try:
        forged = encode_header(dataclasses.replace(header, **{key: value})) + bytes(payload)
    except CodecError:
        return  # not even writable (e.g. a count the shape does not give)
    try:
        decode_all([forged])
    except CodecError:
        pass  # the only acceptable failure; a value equal to the real one decodes fine


@pytest.mark.parametrize(
    "head, problem",
    [
        (w_head(values=9), "tensor 'w': unknown values code 9 (known: {0: 'raw', 1: 'fp16', 2: 'int8', 3: 'int4', 4: 'sign'})"),
        (w_head(selection=7), "tensor 'w': unknown selection code 7"),
        (w_head(byte_stage=2), "tensor 'w': unknown byte stage code 2 (known: {0: 'none', 1: 'zstd'})"),
        (w_head(dtype=0), "tensor 'w': unknown dtype code 0"),
        (w_head(dtype=99), "tensor 'w': unknown dtype code 99"),
        (w_head(selection=1, index=3, tail=b"\x01\x01"), "tensor 'w': unknown index coding code 3"),
        (w_head(index=1), "tensor 'w': dense selection takes index coding 'none', got 'varint'"),
        (w_head(selection=1, index=0), "topk selection needs an index coding"),
        (w_head(dtype=12), "tensor 'w' part 1/1: payload of 120 bytes, header says 240"),
        (w_head(shape=b"\x02\x05\x05"), "header field 'stop' must be an integer in [0, 25], got 30"),
        (w_head(ranges=b"\x01\x01\x00\x1e"), "header field 'part' must be an integer in [0, 0], got 1"),
        (w_head(ranges=b"\x00\x00\x00\x1e"), "header field 'parts' must be an integer in [1, 1099511627776], got 0"),
        (w_head(ranges=b"\x00\x01\x00\x1d"), "tensor 'w' part 1/1: payload of 120 bytes, header says 116"),
        (w_head(values=2, tail=b"\x00"), "stage 'int8' needs integer 'block' in [1, 1048576], got 0"),
        (w_head(selection=1, index=1, tail=b"\x1f\x1f"), "stage 'topk' needs integer 'k' in [0, 30], got 31"),
        (w_head(tail=b"\x00"), "tensor 'w': frame header has 1 bytes after its last field"),
        (w_head(ranges=b"\x00\x01\x00\x9e\x00"), "header field 'stop' is an overlong varint"),
        (w_head(ranges=b"\x00\x01\x00" + b"\xff" * 9 + b"\x01"), "header field 'stop' is a varint longer than 9 bytes"),
        (w_head(ranges=b"\x00\x01\x00"), "tensor 'w': frame header is truncated in field 'stop'"),
        (w_head(shape=b"\x41"), "tensor 'w': header shape has 65 dimensions, at most 64"),
        (w_head(shape=b"\x02" + b"\x80" * 8 + b"\x40" + b"\x04"),  # (2**62, 4)
         "header shape [4611686018427387904, 4] has 18446744073709551616 elements, more than 2**63"),
        (w_head(name=b"\x00"), "frame header: tensor name of 0 bytes (must be 1..1024)"),
        (w_head(name=b"\x02\xff\xfe"), "frame header: tensor name is not valid UTF-8"),
        (w_head()[:5], "frame: frame header is truncated in field 'codes'"),
    ],
)
def test_inconsistent_headers_name_the_tensor_and_the_problem(head, problem):
    frame = seal(head, W)

    with pytest.raises(CodecError) as info:
        decode_all([frame])

    assert problem in str(info.value)
    assert str(info.value).startswith("frame 0: ")


def test_a_header_longer_than_the_limit_is_refused_before_reading_it():
    frame = b"FSN2" + struct.pack("<HI", 9000, 0) + bytes(9000)

    with pytest.raises(CodecError, match="frame header of 9000 bytes exceeds 8192"):
        codec.read_header(frame)


def test_integer_tensors_cannot_claim_a_lossy_encoding():
    n = np.arange(4, dtype=np.int8).tobytes()
    codes = bytes([2, 0, 0, 2, 0]) + struct.pack("<I", zlib.crc32(n + bytes(4)))
    lying = seal(codes + b"\x01n\x01\x04\x00\x01\x00\x04\x04", n + bytes(4))  # int8 codes + one scale

    with pytest.raises(CodecError, match="int8 tensors are sent dense and raw, got dense\\+int8"):
        decode_all([lying])


def test_payload_corruption_is_reported_as_a_checksum_mismatch_naming_the_tensor():
    frame = bytearray(next(codec.encode_tensors({"enc.conv.weight": SMALL["w"]}, CodecSpec(zstd_level=0))))
    frame[-1] ^= 0x40

    with pytest.raises(CodecError, match="frame 0: tensor 'enc.conv.weight' part 1/1: payload checksum mismatch"):
        decode_all([bytes(frame)])


def test_a_decompression_bomb_is_refused_before_decompressing():
    # 100 MB of zeros compress to a few kB; a header may imply at most PAYLOAD_BUDGET raw bytes.
    bomb = zstandard.ZstdCompressor(level=1).compress(b"\0" * 100_000_000)
    shape_25m = b"\x01\xc0\xf0\xf5\x0b"  # (25_000_000,) as a varint
    head = bytes([11, 0, 0, 0, 1]) + bytes(4) + b"\x04bomb" + shape_25m + b"\x00\x01\x00" + shape_25m[1:]

    with pytest.raises(CodecError, match="payload of 100000000 bytes \\(dense\\+raw\\+zstd\\) exceeds the per-frame limit"):
        decode_all([seal(head, bomb)])
    # A frame within the budget whose zstd payload declares more than the header says:
    small = {
        "name": "bomb", "shape": [1000], "dtype": "<f4", "count": 1000, "part": 0, "parts": 1, "start": 0,
        "stop": 1000, "chain": [{"stage": "dense"}, {"stage": "raw"}, {"stage": "zstd"}], "size": 4000, "crc": 0,
    }
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
    for magic in (b"FSN2", b"FSNF"):
        with pytest.raises(CodecError, match=f"exceeds the limit of {MAX_FRAME_BYTES}"):
            codec.read_header(magic + bytes(MAX_FRAME_BYTES))
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
