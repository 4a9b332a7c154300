"""The binary frame header (FSN2): encode_header / decode_header round trips, its size, its layout."""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import examples

import codec
from codec import CodecSpec
from codec.frame import (
    DTYPE_CODES,
    MAX_NAME_BYTES,
    MAX_NDIM,
    SUPPORTED_DTYPES,
    FrameHeader,
    decode_header,
    encode_header,
    pack_frame,
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

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda s: len(s.encode("utf-8")) <= MAX_NAME_BYTES
)


@st.composite
def headers(draw: st.DrawFn) -> FrameHeader:
    """Any header a decoder accepts: ranges consistent, payload within the frame budget."""
    dtype = np.dtype(draw(st.sampled_from(sorted(SUPPORTED_DTYPES))))
    shape = tuple(draw(st.lists(st.integers(0, 70) | st.integers(0, 2**20), max_size=5)
                       .filter(lambda dims: math.prod(dims) <= 2**63)))
    count = math.prod(shape)
    parts = draw(st.integers(1, 5) | st.integers(1, 2**40))
    part = draw(st.integers(0, parts - 1))
    start = draw(st.integers(0, count))
    stop = draw(st.integers(start, min(count, start + 50_000)))  # keeps the payload within the frame budget
    span = stop - start
    if dtype.kind == "f" and draw(st.booleans()):
        k = draw(st.integers(0, span))
        selection: DenseSelection | SparseSelection = SparseSelection(
            k, draw(st.sampled_from(["varint", "bitmap"])), draw(st.integers(0, 2 * k + 8))
        )
        values = draw(st.sampled_from([RawCoder(dtype.itemsize), Fp16Coder()])
                      | st.builds(IntCoder, st.sampled_from([8, 4]), st.integers(1, 1 << 20)))
    else:
        selection = DenseSelection()
        values = RawCoder(dtype.itemsize)
    chain = Chain(selection, values, draw(st.booleans()))
    size = selection.index_bytes + values.encoded_size(chain.value_count(span))
    return FrameHeader(
        name=draw(names), shape=shape, dtype=dtype, count=count, part=part, parts=parts, start=start, stop=stop,
        chain=chain, size=size, crc=draw(st.integers(0, 2**32 - 1)),
    )


@pytest.mark.slow  # 300 examples
@settings(max_examples=examples(300), deadline=None)
@given(headers())
def test_a_header_reads_back_as_written(header):
    written = encode_header(header)

    read, end = decode_header(written)

    assert end == len(written)
    assert read == dataclasses.replace(header, frame_bytes=len(written))
    assert encode_header(read) == written


@settings(max_examples=examples(100), deadline=None)
@given(headers())
def test_a_frame_reads_back_its_header_and_payload(header):
    payload = bytes(range(256)) * (header.size // 256) + bytes(header.size % 256) if not header.compressed else b"z"
    frame = encode_header(header) + payload

    read, stored = unpack_frame(frame)

    assert read == dataclasses.replace(header, frame_bytes=len(frame))
    assert bytes(stored) == payload


def test_every_supported_dtype_has_exactly_one_code():
    assert sorted(DTYPE_CODES.values()) == sorted(SUPPORTED_DTYPES)
    assert len(set(DTYPE_CODES.values())) == len(DTYPE_CODES)
    assert 0 not in DTYPE_CODES  # a zeroed header byte is never a valid dtype


def varint_len(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


def test_a_small_sparse_tensor_frame_has_a_header_of_about_40_bytes_plus_its_name():
    name = "enc.0.conv.weight"
    x = np.random.default_rng(0).standard_normal((32, 16, 3, 3, 3)).astype(np.float32)  # 13 824 elements
    frame = next(codec.encode_tensors({name: x}, CodecSpec(top_k_fraction=0.01, quantization="int8")))
    header, payload = unpack_frame(frame)

    header_bytes = len(frame) - len(payload)

    # prefix 10; codes + payload crc 9; name 1 + 17; ndim + 5 dims 6; part 0, parts 1, start 0: 3;
    # stop 13824: 2; k 139: 2; index_bytes; block 256: 2.
    assert header.sent == 139
    assert header_bytes == 10 + 9 + 1 + len(name) + 6 + 3 + 2 + 2 + varint_len(header.chain.selection.index_bytes) + 2
    assert header_bytes - len(name) <= 40


def test_the_layout_of_a_multi_part_sparse_frame_is_as_documented():
    # Hand-built header of a topk + int4 + zstd part 2/3 of a (4, 1000) float64 tensor.
    name = "blocks.1.attn.qkv"
    head = (
        bytes([12, 1, 2, 3, 1]) + struct.pack("<I", 0xDEADBEEF)   # f8, topk, bitmap, int4, zstd; payload crc
        + bytes([len(name)]) + name.encode()
        + b"\x02\x04\xe8\x07"                                    # shape (4, 1000)
        + b"\x01\x03" + b"\xd0\x0f" + b"\xa0\x1f"                # part 1 of 3, start 2000, stop 4000
        + b"\x64" + b"\xfa\x01"                                  # k 100, index_bytes 250 (2000 bits)
        + b"\x20"                                                # block 32
    )
    frame = b"FSN2" + struct.pack("<HI", len(head), zlib.crc32(head)) + head + b"zstd-bytes"

    header = codec.read_header(frame)

    assert (header.name, header.shape, header.dtype, header.count) == (name, (4, 1000), np.float64, 4000)
    assert (header.part, header.parts, header.start, header.stop, header.crc) == (1, 3, 2000, 4000, 0xDEADBEEF)
    assert header.chain == Chain(SparseSelection(100, "bitmap", 250), IntCoder(4, 32), True)
    assert header.size == 250 + 50 + 4 * 4  # bitmap + 100 nibbles + 4 block scales
    assert header.frame_bytes == len(frame)
    assert encode_header(header) == frame[: -len(b"zstd-bytes")]


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"count": 7}, "count 7 is not the product of shape [6, 5]"),
        ({"size": 1}, "size 1 is not what its chain implies (120 bytes)"),
        ({"crc": -1}, "crc must be an unsigned 32-bit integer"),
        ({"start": -1, "stop": 29}, "header field 'start' must be in [0, 2**63) to be written, got -1"),
        ({"part": 2**63}, "header field 'part' must be in [0, 2**63) to be written"),
        ({"parts": 1.5}, "header field 'parts' must be an integer, got 1.5"),
        ({"dtype": np.dtype(">f4")}, "dtype '>f4' has no FSN2 code"),
        ({"shape": (1,) * (MAX_NDIM + 1), "count": 1}, "65 dimensions, at most 64"),
        ({"name": ""}, "tensor name must be a non-empty str"),
    ],
)
def test_a_header_the_format_cannot_say_is_refused_when_written(change, problem):
    frame = next(codec.encode_tensors({"w": np.zeros((6, 5), np.float32)}, CodecSpec(zstd_level=0)))
    header = dataclasses.replace(codec.read_header(frame), **change)

    with pytest.raises(codec.CodecError) as info:
        encode_header(header)

    assert problem in str(info.value)


def test_pack_frame_takes_json_fields_and_writes_fsn2():
    frame = next(codec.encode_tensors({"w": np.arange(30, dtype=np.float32).reshape(6, 5)}, CodecSpec(zstd_level=0)))
    header, payload = unpack_frame(frame)

    again = pack_frame(header.to_json(), bytes(payload))

    assert again == frame and again[:4] == b"FSN2"
    with pytest.raises(codec.CodecError, match="header count 31 does not match shape"):
        pack_frame({**header.to_json(), "count": 31}, bytes(payload))
