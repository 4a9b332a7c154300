"""Each codec stage and its inverse, on hand-computed inputs and on random ones."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support import examples

from codec import CodecError
from codec.select import GlobalThreshold, keep_count, top_k_positions
from codec.stages import (
    Fp16Coder,
    IntCoder,
    RawCoder,
    decode_indices,
    encode_indices,
    varint_decode,
    varint_encode,
    zstd_compress,
    zstd_decompress,
)

F32 = np.dtype(np.float32)


# ---------------------------------------------------------------------------------- varint


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (16384, b"\x80\x80\x01"),
        (2**63 - 1, b"\xff" * 8 + b"\x7f"),
    ],
)
def test_varint_matches_leb128(value, encoded):
    assert varint_encode(np.array([value], dtype=np.uint64)) == encoded
    assert varint_decode(encoded, 1, "t").tolist() == [value]


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.integers(0, 2**63 - 1), max_size=200))
def test_varint_round_trip(values):
    array = np.array(values, dtype=np.uint64)

    decoded = varint_decode(varint_encode(array), len(values), "t")

    assert decoded.tolist() == values


@pytest.mark.parametrize(
    "data, count, problem",
    [
        (b"\x80", 1, "truncated"),
        (b"\x01\x02", 1, "holds 2 indices, header says 1"),
        (b"\x80" * 9 + b"\x01", 1, "longer than 9 bytes"),
        (b"\x01", 0, "1 index bytes for 0 indices"),
    ],
)
def test_varint_decode_refuses_malformed_sections(data, count, problem):
    with pytest.raises(CodecError, match=problem):
        varint_decode(data, count, "tensor 'w'")


# ---------------------------------------------------------------------------------- indices


def test_sparse_positions_use_varint_gaps():
    # gaps: first position 3, then (7 - 3 - 1) = 3, then (200 - 7 - 1) = 192 -> 0xc0 0x01
    coding, data = encode_indices(np.array([3, 7, 200]), n=1000)

    assert (coding, data) == ("varint", b"\x03\x03\xc0\x01")


def test_dense_positions_use_a_bitmap():
    # 6 of 8 positions: a 1-byte bitmap beats 6 varint bytes; bit i (LSB first) = position i
    coding, data = encode_indices(np.array([0, 1, 2, 4, 5, 7]), n=8)

    assert (coding, data) == ("bitmap", bytes([0b10110111]))


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(1, 3000).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_index_coding_round_trip(case):
    n, chosen = case
    positions = np.array(sorted(chosen), dtype=np.int64)

    coding, data = encode_indices(positions, n)
    decoded = decode_indices(coding, data, n, positions.size, "t")

    assert decoded.tolist() == positions.tolist()
    assert len(data) <= max(1, (n + 7) // 8)  # never worse than the bitmap


@pytest.mark.parametrize(
    "coding, data, n, k, problem",
    [
        ("varint", b"\x05", 5, 1, "gap out of range"),
        ("varint", b"\x02\x02", 5, 2, "index 5 out of range"),
        ("bitmap", b"\x01\x00", 8, 1, "bitmap of 2 bytes for 8 positions"),
        ("bitmap", b"\x81", 4, 1, "bits set past position 4"),
        ("bitmap", b"\x03", 8, 1, "marks 2 positions, header says 1"),
        ("rle", b"", 8, 0, "unknown index coding 'rle'"),
    ],
)
def test_index_decoding_refuses_inconsistent_sections(coding, data, n, k, problem):
    with pytest.raises(CodecError, match=problem):
        decode_indices(coding, data, n, k, "tensor 'w'")


# ---------------------------------------------------------------------------------- values


def test_int8_codes_are_rounded_against_the_block_max():
    # block max 2.54 -> scale 0.02; -1.27 / 0.02 = -63.5 rounds half to even -> -64 -> -1.28
    coder = IntCoder(8, block=256)
    values = np.array([2.54, -1.27, 0.0], dtype=F32)

    data = coder.encode(values, None)
    decoded = coder.decode(data, 3, F32, "t")

    assert len(data) == 3 + 4
    assert np.frombuffer(data[:3], np.int8).tolist() == [127, -64, 0]
    np.testing.assert_allclose(decoded, [2.54, -1.28, 0.0], rtol=1e-6)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    # block of 2: [7.0, -3.0] scale 1.0 -> codes 7, -3 -> nibbles 15, 5; block [1.0] scale 1/7 -> 7 -> 15
    coder = IntCoder(4, block=2)
    values = np.array([7.0, -3.0, 1.0], dtype=F32)

    data = coder.encode(values, None)

    assert bytes(data[:2]) == bytes([0x5F, 0x0F])  # third byte group: 15 then a zero padding nibble
    assert np.frombuffer(data[2:], "<f4").tolist() == pytest.approx([1.0, 1.0 / 7.0])
    np.testing.assert_allclose(coder.decode(data, 3, F32, "t"), values, rtol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("stochastic", [False, True])
@settings(max_examples=examples(40), deadline=None)
@given(
    values=hnp.arrays(F32, st.integers(0, 300), elements=st.floats(-1e6, 1e6, width=32)),
    block=st.integers(1, 64),
    seed=st.integers(0, 2**32),
)
def test_int_codes_are_within_one_step_of_the_value(bits, stochastic, values, block, seed):
    coder = IntCoder(bits, block, stochastic)
    levels = 127 if bits == 8 else 7

    decoded = coder.decode(coder.encode(values, np.random.default_rng(seed)), values.size, F32, "t")

    padded = np.zeros(-(-values.size // block) * block, F32)
    padded[: values.size] = values
    step = np.repeat(np.abs(padded.reshape(-1, block)).max(axis=1) / levels, block)[: values.size]
    bound = step * (1.0 if stochastic else 0.5) * (1 + 1e-5) + 1e-30
    assert np.all(np.abs(decoded.astype(np.float64) - values) <= bound)
    assert np.array_equal(values - decoded + decoded, values)  # the error-feedback residual is exact


def test_stochastic_rounding_is_unbiased():
    # 0.25 / (1/127) = 31.75: code 32 with probability 0.75, 31 with 0.25
    values = np.array([1.0, 0.25], dtype=F32)
    coder = IntCoder(8, block=2, stochastic=True)

    codes = [np.frombuffer(coder.encode(values, np.random.default_rng(s)), np.int8)[1] for s in range(400)]

    assert set(codes) == {31, 32}
    assert abs(np.mean(codes) - 31.75) < 0.1


@settings(max_examples=examples(50), deadline=None)
@given(hnp.arrays(F32, st.integers(0, 100), elements=st.floats(-1e9, 1e9, width=32)))
def test_fp16_rounds_to_nearest_half_and_keeps_the_residual_exact(values):
    decoded = Fp16Coder().decode(Fp16Coder().encode(values, None), values.size, F32, "t")

    in_range = np.abs(values) <= 65504
    assert np.array_equal(decoded[in_range], values[in_range].astype(np.float16).astype(F32))
    assert np.all(np.isin(decoded[~in_range], [0.0, 65504.0, -65504.0]))
    assert np.array_equal(values - decoded + decoded, values)


@pytest.mark.parametrize(
    "dtype, values",
    [
        (np.bool_, [True, False, True]),
        (np.int64, [-(2**62), 0, 2**62]),
        (np.uint16, [0, 65535]),
        (np.float64, [np.pi, -0.0, np.inf]),
        (np.complex64, [1 + 2j, -3j]),
    ],
)
def test_raw_values_round_trip_bit_exactly(dtype, values):
    array = np.array(values, dtype=dtype)
    coder = RawCoder(array.dtype.itemsize)

    decoded = coder.decode(coder.encode(array, None), array.size, array.dtype, "t")

    assert decoded.dtype == array.dtype and decoded.tobytes() == array.tobytes()


def test_raw_bool_refuses_bytes_other_than_0_and_1():
    with pytest.raises(CodecError, match="bool values other than 0 and 1"):
        RawCoder(1).decode(b"\x00\x02", 2, np.dtype(np.bool_), "t")


@pytest.mark.parametrize(
    "coder, data, count, problem",
    [
        (IntCoder(8, 4), b"\x80" + np.float32(1).tobytes(), 1, "int8 code -128"),
        (IntCoder(8, 4), b"\x01" + np.float32(-1).tobytes(), 1, "negative or non-finite quantization scale"),
        (IntCoder(8, 4), b"\x01" + np.float32(np.nan).tobytes(), 1, "non-finite quantization scale"),
        (IntCoder(4, 4), b"\x00" + np.float32(1).tobytes(), 1, "int4 code 0"),
        (IntCoder(4, 4), b"\x88" + np.float32(1).tobytes(), 1, "padding nibble is not zero"),
    ],
)
def test_int_decoding_refuses_codes_the_encoder_never_writes(coder, data, count, problem):
    with pytest.raises(CodecError, match=problem):
        coder.decode(data, count, F32, "t")


# ---------------------------------------------------------------------------------- zstd


def test_zstd_is_skipped_when_it_does_not_pay():
    compressor = zstandard.ZstdCompressor(level=3)
    noise = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()

    assert zstd_compress(compressor, noise) is None
    assert zstd_compress(compressor, b"\0" * 10_000) is not None


def test_zstd_decompress_checks_the_declared_size_before_decompressing():
    bomb = zstandard.ZstdCompressor(level=1).compress(b"\0" * 10_000_000)
    decompressor = zstandard.ZstdDecompressor()

    with pytest.raises(CodecError, match="declares 10000000 bytes, header says 100"):
        zstd_decompress(decompressor, bomb, 100, "tensor 'w'")
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 100)
    with pytest.raises(CodecError, match="declares -1 bytes"):
        zstd_decompress(decompressor, no_size, 100, "tensor 'w'")


# ---------------------------------------------------------------------------------- top-k


@pytest.mark.parametrize(
    "magnitude, k, expected",
    [
        ([0.1, 3.0, 2.0, 0.0, 0.5], 2, [1, 2]),
        ([1.0, 1.0, 1.0, 1.0], 2, [0, 1]),  # ties: first positions win
        ([0.0, 2.0, 0.0], 2, [1]),  # zeros are never sent
        ([5.0, 4.0], 5, [0, 1]),
        ([5.0, 4.0], 0, []),
        ([], 3, []),
    ],
)
def test_top_k_positions(magnitude, k, expected):
    assert top_k_positions(np.array(magnitude, dtype=F32), k).tolist() == expected


def reference_top_k(magnitude: np.ndarray, k: int) -> list[int]:
    order = np.argsort(-magnitude, kind="stable")[:k]  # largest first, ties by position
    return sorted(int(i) for i in order if magnitude[i] > 0)


@pytest.mark.parametrize(
    "magnitude",
    [
        np.abs(np.random.default_rng(0).standard_normal(100_000)).astype(F32),
        np.arange(100_000, dtype=F32),  # sorted
        np.where(np.arange(100_000) % 64 == 0, 1.0, 2.0).astype(F32),  # the strided sample sees only 1.0
        np.where(np.arange(100_000) % 64 == 0, 3.0, 2.0).astype(F32),  # the strided sample sees only 3.0
        np.where(np.arange(100_000) < 99_000, 0.0, 1.0).astype(F32),  # mostly zeros
        np.round(np.abs(np.random.default_rng(1).standard_normal(100_000)), 1).astype(F32),  # many ties
    ],
    ids=["gaussian", "sorted", "low-sample", "high-sample", "sparse", "ties"],
)
@pytest.mark.parametrize("k", [1, 1000, 20_000])
def test_top_k_on_large_tensors_matches_a_full_sort(magnitude, k):
    assert top_k_positions(magnitude, k).tolist() == reference_top_k(magnitude, k)


@pytest.mark.parametrize("fraction, n, expected", [(0.01, 1000, 10), (0.01, 5, 1), (0.5, 3, 2), (1.0, 7, 7), (0.3, 0, 0)])
def test_keep_count_rounds_up(fraction, n, expected):
    assert keep_count(fraction, n) == expected


@settings(max_examples=examples(50), deadline=None)
@given(
    st.lists(hnp.arrays(F32, st.integers(0, 200), elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0])
                        | st.floats(0, 100, width=32)), min_size=1, max_size=5),
    st.integers(0, 400),
)
def test_global_threshold_equals_the_kth_largest_of_everything(arrays, k):
    pool = GlobalThreshold(k)
    for a in arrays:
        pool.add(a)

    threshold = pool.threshold()

    everything = np.sort(np.concatenate(arrays))[::-1]
    nonzero = everything[everything > 0]
    if k == 0:
        assert threshold.value == np.inf
    elif nonzero.size < k:
        assert threshold.value == 0
    else:
        assert threshold.value == nonzero[k - 1]
        assert threshold.ties == k - np.count_nonzero(nonzero > threshold.value)
