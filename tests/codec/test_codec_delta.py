"""Lossless model deltas (codec.delta): encode_model_delta / apply_model_delta."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support import examples

import codec
from codec import MAX_FRAME_BYTES, CodecError

FAST = settings(max_examples=examples(60), deadline=None)
DTYPES = [np.float32, np.float16, np.float64, np.int64, np.int8, np.uint16, np.bool_, np.complex64]
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9)
SPECIAL_F32 = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0], np.float32)
# A NaN with a non-default payload: only bit-level handling keeps it.
PAYLOAD_NAN = np.array([0x7FC12345], np.uint32).view(np.float32)


def apply(old, frames):
    return dict(codec.apply_model_delta(old, frames))


def bits(array: np.ndarray) -> tuple:
    return array.dtype.str, array.shape, array.tobytes()


@st.composite
def model_pairs(draw):
    """(old, new): 1-3 tensors of random dtype and shape; new changes a random subset of positions
    to random bit patterns (NaN payloads, Inf, -0.0 and all)."""
    old, new = {}, {}
    for i in range(draw(st.integers(1, 3))):
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        shape = draw(shapes)
        size = int(np.prod(shape))
        raw_old = draw(st.binary(min_size=size * dtype.itemsize, max_size=size * dtype.itemsize))
        raw_new = draw(st.binary(min_size=size * dtype.itemsize, max_size=size * dtype.itemsize))
        keep = np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), dtype=bool)
        a = np.frombuffer(raw_old, dtype=dtype).reshape(shape)
        b = np.frombuffer(raw_new, dtype=dtype).reshape(shape).copy()
        b.reshape(-1)[keep] = a.reshape(-1)[keep]  # assignment copies bit patterns (no arithmetic)
        old[f"t{i}"], new[f"t{i}"] = a, b
    return old, new


@FAST
@given(model_pairs(), st.sampled_from([0, 1, 9]))
def test_round_trip_is_bit_exact_for_any_bit_patterns(pair, level):
    old, new = pair

    frames = list(codec.encode_model_delta(old, new, zstd_level=level))
    rebuilt = apply(old, frames)

    assert all(len(f) <= MAX_FRAME_BYTES for f in frames)
    assert list(rebuilt) == list(new)
    assert [bits(rebuilt[k]) for k in new] == [bits(new[k]) for k in new]


@pytest.mark.parametrize("changed", [SPECIAL_F32, PAYLOAD_NAN, np.array([-0.0], np.float32)])
def test_nan_inf_and_signed_zero_bit_patterns_survive(changed):
    old = {"w": np.zeros(64, np.float32)}
    new = {"w": old["w"].copy()}
    new["w"][: changed.size] = changed

    rebuilt = apply(old, codec.encode_model_delta(old, new))

    assert rebuilt["w"].view(np.uint32).tolist() == new["w"].view(np.uint32).tolist()


def test_a_changed_nan_payload_is_a_change():
    # NaN == NaN is false and equal-valued NaNs may differ in bits: only the bits decide.
    old = {"w": np.full(8, np.nan, np.float32)}
    new = {"w": np.repeat(PAYLOAD_NAN, 8)}

    rebuilt = apply(old, codec.encode_model_delta(old, new))

    assert rebuilt["w"].view(np.uint32).tolist() == [0x7FC12345] * 8


def full_size(tensors) -> int:
    return sum(len(f) for f in codec.encode_tensors(tensors, codec.LOSSLESS))


def delta_size(old, new) -> int:
    return sum(len(f) for f in codec.encode_model_delta(old, new))


# Bounds below what the dense body alone gives (0.021 at 1%, 0.143 at 10% of the values changed):
# the changed positions are sent on their own where that is smaller.
@pytest.mark.parametrize("fraction, at_most", [(0.0, 0.001), (0.01, 0.015), (0.1, 0.11)])
def test_a_sparse_change_costs_a_fraction_of_the_full_model(fraction, at_most):
    rng = np.random.default_rng(0)
    old = {"w": rng.standard_normal(100_000).astype(np.float32)}
    new = {"w": old["w"].copy()}
    picked = rng.choice(100_000, int(fraction * 100_000), replace=False)
    new["w"][picked] += rng.standard_normal(picked.size).astype(np.float32) * 1e-3

    ratio = delta_size(old, new) / full_size(new)

    assert ratio <= at_most


def test_a_dense_small_change_still_costs_less_than_the_full_model():
    # FedAvg moves every weight a little: sign and exponent bytes rarely change.
    rng = np.random.default_rng(1)
    old = {"w": rng.standard_normal(100_000).astype(np.float32)}
    new = {"w": old["w"] + rng.standard_normal(100_000).astype(np.float32) * 1e-3}

    assert delta_size(old, new) < 0.9 * full_size(new)


def test_big_tensors_span_several_frames_and_stream_from_files(tmp_path):
    rng = np.random.default_rng(2)
    old = {"big": rng.standard_normal(400_000).astype(np.float32), "b": np.arange(3.0)}
    new = {"big": rng.standard_normal(400_000).astype(np.float32), "b": np.arange(3.0) + 1}
    codec.save_tensors(tmp_path / "old.frames", old.items())
    codec.save_tensors(tmp_path / "new.frames", new.items())

    with open(tmp_path / "old.frames", "rb") as a, open(tmp_path / "new.frames", "rb") as b:
        frames = list(
            codec.encode_model_delta(codec.decode_frames(codec.read_frames(a)), codec.decode_frames(codec.read_frames(b)))
        )
    with open(tmp_path / "old.frames", "rb") as a:
        rebuilt = apply(codec.decode_frames(codec.read_frames(a)), frames)

    assert len(frames) > 2 and all(len(f) <= MAX_FRAME_BYTES for f in frames)
    assert [bits(rebuilt[k]) for k in new] == [bits(new[k]) for k in new]


# ------------------------------------------------------------------------- what is refused


OLD = {"a": np.arange(10, dtype=np.float32), "b": np.ones((2, 3), np.float64)}
NEW = {"a": np.arange(10, dtype=np.float32) * 2, "b": np.ones((2, 3), np.float64)}


@pytest.mark.parametrize(
    "old, new, message",
    [
        ({"a": OLD["a"]}, NEW, "beyond the base model's 1 tensors"),
        (OLD, {"a": NEW["a"]}, "beyond the new model's 1 tensors"),
        ({"b": OLD["b"], "a": OLD["a"]}, NEW, "same tensors in the same order"),
        ({"a": OLD["a"].reshape(2, 5), "b": OLD["b"]}, NEW, "equal shapes and dtypes"),
        ({"a": OLD["a"].astype(np.float64), "b": OLD["b"]}, NEW, "equal shapes and dtypes"),
    ],
)
def test_models_that_do_not_match_cannot_be_encoded(old, new, message):
    with pytest.raises(CodecError, match=message):
        list(codec.encode_model_delta(old, new))


def test_a_zstd_level_out_of_range_is_refused():
    with pytest.raises(CodecError, match=r"zstd_level must be in \[0, 22\]"):
        list(codec.encode_model_delta(OLD, NEW, zstd_level=23))


def test_a_delta_applied_to_another_base_is_refused_by_name():
    frames = list(codec.encode_model_delta(OLD, NEW))
    other = {"a": OLD["a"] + 1, "b": OLD["b"]}

    with pytest.raises(CodecError, match="tensor 'a': the delta was made from another base model"):
        apply(other, frames)


@pytest.mark.parametrize(
    "base, message",
    [
        ({"b": OLD["b"], "a": OLD["a"]}, "delta tensor 0 is 'a' but the base model's is 'b'"),
        ({"a": OLD["a"]}, "beyond the base model's 1 tensors"),
        ({**OLD, "c": np.zeros(1)}, "before the base model's 'c'"),
    ],
)
def test_a_delta_for_another_model_layout_is_refused(base, message):
    with pytest.raises(CodecError, match=message):
        apply(base, codec.encode_model_delta(OLD, NEW))


def test_a_stream_cut_at_a_tensor_boundary_is_refused():
    frames = list(codec.encode_model_delta(OLD, NEW))

    with pytest.raises(CodecError, match="truncated stream"):
        apply(OLD, frames[:-1])


def test_a_stream_cut_inside_a_tensor_is_refused():
    rng = np.random.default_rng(3)
    old = {"big": rng.standard_normal(400_000).astype(np.float32)}
    new = {"big": rng.standard_normal(400_000).astype(np.float32)}
    frames = list(codec.encode_model_delta(old, new))

    with pytest.raises(CodecError, match="truncated"):
        apply(old, frames[:-1])


@pytest.mark.parametrize("position", [0.1, 0.5, 0.99])
def test_a_flipped_byte_anywhere_in_a_frame_is_refused(position):
    frames = list(codec.encode_model_delta(OLD, NEW))
    frame = bytearray(frames[0])
    frame[int(position * (len(frame) - 1))] ^= 0x40

    with pytest.raises(CodecError):
        apply(OLD, [bytes(frame), *frames[1:]])


def test_a_cut_frame_is_refused():
    frames = list(codec.encode_model_delta(OLD, NEW))

    with pytest.raises(CodecError):
        apply(OLD, [frames[0][:-3], *frames[1:]])


def test_a_full_model_stream_is_not_taken_for_a_delta():
    frames = list(codec.encode_tensors(NEW, codec.LOSSLESS))

    with pytest.raises(CodecError, match="a delta payload is a 1-D uint8 tensor"):
        apply(OLD, frames)


# Hand-made payloads (well-formed frames around bad delta contents): the delta's own checks.
HEAD = struct.Struct("<BBBBIIQ")


def crc(array: np.ndarray) -> int:
    return zlib.crc32(array.tobytes())


def payload_frames(name: str, payload: bytes) -> list[bytes]:
    return list(codec.encode_tensors([(name, np.frombuffer(payload, np.uint8))], codec.CodecSpec(zstd_level=0)))


BASE = np.arange(4, dtype=np.float32)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x01\x00", "truncated"),
        (HEAD.pack(2, 0, 0, 0, crc(BASE), 0, 16) + bytes(16), "version 2 is not supported"),
        (HEAD.pack(1, 7, 0, 0, crc(BASE), 0, 16) + bytes(16), "unknown delta body kind 7"),
        (HEAD.pack(1, 0, 0, 0, crc(BASE), 0, 1 << 40), "claims 1099511627776 bytes"),
        (HEAD.pack(1, 0, 0, 0, crc(BASE), crc(BASE), 8) + bytes(8), "dense delta body of 8 bytes"),
        (HEAD.pack(1, 0, 0, 0, crc(BASE), crc(BASE), 16) + bytes(12), "delta body of 12 bytes"),
        (HEAD.pack(1, 0, 1, 0, crc(BASE), crc(BASE), 16) + b"not zstd at all", "not a zstd frame"),
        (HEAD.pack(1, 0, 0, 0, crc(BASE), 123, 16) + bytes(16), "fails its checksum"),
        # sparse: 1 change at position 4 of a 4-element tensor (gap 5)
        (HEAD.pack(1, 1, 0, 0, crc(BASE), 0, 16 + 8) + struct.pack("<B7sQ", 4, bytes(7), 1)
         + struct.pack("<I", 5) + bytes(4), "not increasing within"),
        (HEAD.pack(1, 1, 0, 0, crc(BASE), 0, 16 + 8) + struct.pack("<B7sQ", 3, bytes(7), 1) + bytes(8), "gap width 3"),
        (HEAD.pack(1, 1, 0, 0, crc(BASE), 0, 16) + struct.pack("<B7sQ", 4, bytes(7), 9), "does not hold 9 changes"),
    ],
)
def test_bad_payloads_are_refused_with_a_clear_error(payload, message):
    with pytest.raises(CodecError, match=message):
        apply({"w": BASE}, payload_frames("w", payload))


def test_a_zstd_body_that_declares_more_than_its_head_is_refused_before_decompressing():
    import zstandard

    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(1 << 20))
    payload = HEAD.pack(1, 0, 1, 0, crc(BASE), crc(BASE), 16) + bomb

    with pytest.raises(CodecError, match="delta body: zstd frame declares 1048576 bytes, header says 16"):
        apply({"w": BASE}, payload_frames("w", payload))


def test_identical_models_give_a_tiny_delta():
    rng = np.random.default_rng(4)
    model = {f"layer{i}": rng.standard_normal(10_000).astype(np.float32) for i in range(3)}
    stream = io.BytesIO()

    written = codec.write_frames(stream, codec.encode_model_delta(model, model))

    assert written < 0.01 * full_size(model)
    assert [bits(v) for v in apply(model, codec.read_frames(io.BytesIO(stream.getvalue()))).values()] == [
        bits(v) for v in model.values()
    ]
