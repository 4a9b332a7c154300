"""The sign value coding: Sparse Ternary Compression (top-k + sign) and error-feedback signSGD (dense sign)."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import examples

import codec
from codec import CodecError, CodecSpec
from codec.stages import SIGN_BLOCK, SignCoder, parse_chain

F32 = np.dtype(np.float32)
STC = CodecSpec(top_k_fraction=0.1, quantization="sign", zstd_level=0)
EF_SIGN = CodecSpec(quantization="sign", zstd_level=0)


# ------------------------------------------------------------------------------- the value stage


def test_one_bit_per_value_least_significant_first_then_the_scale():
    values = np.array([0.5, -1.5, 2.0, -0.0, 1.0], dtype=F32)  # mean magnitude 1.0
    coder = SignCoder(SIGN_BLOCK).fit(values)

    data = bytes(coder.encode(values, None))

    assert data[:1] == bytes([0b11101])  # +, -, +, + (-0.0 counts as non-negative), +
    assert np.frombuffer(data[1:], "<f4").tolist() == [1.0]
    assert coder.encoded_size(5) == len(data) == 1 + 4
    assert coder.decode(data, 5, F32, "t").tolist() == [1.0, -1.0, 1.0, 1.0, 1.0]


def test_without_a_fitted_scale_each_block_scales_by_its_own_mean_magnitude():
    values = np.array([1.0, -3.0, 0.5, -0.5, 10.0], dtype=F32)
    coder = SignCoder(2)

    data = coder.encode(values, None)

    assert np.frombuffer(bytes(data)[1:], "<f4").tolist() == [2.0, 0.5, 10.0]
    assert coder.decode(data, 5, F32, "t").tolist() == [2.0, -2.0, 0.5, -0.5, 10.0]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@settings(max_examples=examples(40), deadline=None)
@given(data=st.data())
def test_sign_decodes_to_plus_or_minus_the_scale_in_the_tensors_dtype(dtype, data):
    values = data.draw(hnp.arrays(dtype, st.integers(0, 300), elements=st.floats(-1e3, 1e3, width=16)))
    coder = SignCoder(SIGN_BLOCK).fit(values)

    decoded = coder.decode(coder.encode(values, None), values.size, np.dtype(dtype), "t")

    assert decoded.dtype == dtype
    assert coder.scale is not None
    magnitude = np.abs(values.astype(np.float64))
    if values.size:
        # the mean magnitude, rounded at most to the float grid of the largest value
        grid = float(np.spacing(np.dtype(dtype).type(magnitude.max())))
        assert abs(coder.scale - magnitude.mean()) <= max(grid, 1e-6 * magnitude.mean())
    assert np.array_equal(np.abs(decoded), np.full(values.size, coder.scale, dtype))
    assert np.array_equal(np.signbit(decoded), values < 0)


@pytest.mark.parametrize(
    "data, count, problem",
    [
        (bytes([0b10000001]) + np.float32(1).tobytes(), 5, "sign padding bits are not zero"),
        (bytes([1]) + np.float32(-1).tobytes(), 3, "negative or non-finite sign scale"),
        (bytes([1]) + np.float32(np.nan).tobytes(), 3, "negative or non-finite sign scale"),
        (bytes([1]) + np.float32(1).tobytes() * 2, 3, "2 scales for 3 values in blocks of 1048576"),
    ],
)
def test_bad_sign_sections_are_refused(data, count, problem):
    with pytest.raises(CodecError, match=problem):
        SignCoder(SIGN_BLOCK).decode(data, count, F32, "tensor 'w'")


def test_the_chain_parser_knows_sign_and_keeps_it_off_integer_tensors():
    chain = parse_chain([{"stage": "topk", "k": 2, "index": "varint", "index_bytes": 2}, {"stage": "sign", "block": 8}],
                        F32, 10, "t")
    assert chain.encoding == "topk+sign" and chain.values == SignCoder(8)

    with pytest.raises(CodecError, match="needs integer 'block'"):
        parse_chain([{"stage": "dense"}, {"stage": "sign"}], F32, 10, "t")
    with pytest.raises(CodecError, match="int32 tensors are sent dense and raw"):
        parse_chain([{"stage": "dense"}, {"stage": "sign", "block": 8}], np.dtype(np.int32), 10, "t")


# ------------------------------------------------------------------------------- STC: top-k + sign


def test_stc_sends_the_top_k_as_plus_or_minus_their_mean_magnitude():
    x = np.array([0.1, -4.0, 0.2, 2.0, -0.3, 3.0, 0.0, 0.05, -0.01, 0.02], dtype=F32)
    spec = CodecSpec(top_k_fraction=0.3, quantization="sign", zstd_level=0)

    frames, residual = codec.encode_update({"w": x}, spec)
    frames = list(frames)
    decoded = dict(codec.decode_frames(frames))["w"]

    assert decoded.tolist() == [0, -3.0, 0, 3.0, 0, 3.0, 0, 0, 0, 0]  # mean(|-4|, |2|, |3|) = 3
    assert np.array_equal(decoded + residual["w"], x)
    assert codec.read_header(frames[0]).encoding == "topk+sign"


@settings(max_examples=examples(60), deadline=None)
@given(
    array=st.sampled_from([np.float32, np.float16, np.float64]).flatmap(
        lambda dt: hnp.arrays(dt, st.integers(0, 500), elements=st.floats(-1e4, 1e4, width=16))
    ),
    fraction=st.sampled_from([1.0, 0.5, 0.1, 0.01]),
    scope=st.sampled_from(["tensor", "global"]),
)
def test_sign_coding_keeps_the_error_feedback_invariant(array, fraction, scope):
    spec = CodecSpec(top_k_fraction=fraction, top_k_scope=scope, quantization="sign")

    frames, residual = codec.encode_update({"t": array}, spec)
    frames = list(frames)
    decoded = dict(codec.decode_frames(frames))["t"]

    r = residual["t"]
    assert (r.dtype, r.shape) == (array.dtype, array.shape)
    with np.errstate(over="ignore"):
        assert np.array_equal(r, array - decoded)  # the residual is what was not delivered
    sent = np.flatnonzero(decoded.reshape(-1))
    if fraction < 1.0:
        # STC: entries whose residual could not be exact are held back, so nothing is lost.
        assert np.array_equal(decoded + r, array)
        assert sent.size <= int(np.ceil(fraction * array.size))
    else:
        # EF-signSGD: every entry is sent; its residual is rounded once (half an ulp at most).
        err = np.abs((decoded.astype(np.float64) + r) - array.astype(np.float64))
        assert np.all(err <= np.spacing(np.abs(r)).astype(np.float64) / 2 + np.spacing(np.abs(array)))
    values = np.unique(np.abs(decoded.reshape(-1)[sent]))
    assert values.size <= 1  # one scale per tensor


def test_stc_is_exact_for_the_top_k_of_ordinary_updates():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(100_000).astype(F32)

    frames, residual = codec.encode_update({"w": x}, CodecSpec(top_k_fraction=0.01, quantization="sign"))
    frames = list(frames)
    decoded = dict(codec.decode_frames(frames))["w"]

    assert np.count_nonzero(decoded) == 1000  # nothing needed holding back
    assert np.array_equal(decoded + residual["w"], x)


# ------------------------------------------------------------------------------- EF-signSGD: dense sign


def test_ef_signsgd_sends_every_sign_scaled_by_the_mean_magnitude():
    x = np.array([[0.5, -1.0], [2.0, -0.5]], dtype=F32)  # mean |x| = 1.0

    frames, residual = codec.encode_update({"w": x}, EF_SIGN)
    frames = list(frames)
    decoded = dict(codec.decode_frames(frames))["w"]

    assert decoded.tolist() == [[1.0, -1.0], [1.0, -1.0]]
    assert residual["w"].tolist() == [[-0.5, 0.0], [1.0, 0.5]]
    assert codec.read_header(frames[0]).encoding == "dense+sign"


@pytest.mark.parametrize("count", [1, 7, 8, 9, 100_000])
def test_a_dense_sign_frame_takes_one_bit_per_value_and_one_scale(count):
    x = np.linspace(-1, 1, count, dtype=F32)

    frames = list(codec.encode_tensors({"w": x}, EF_SIGN))

    header = codec.read_header(frames[0])
    assert len(frames) == 1 and header.size == (count + 7) // 8 + 4
    assert x.nbytes / len(frames[0]) >= (25 if count >= 1000 else 0)


@pytest.mark.slow  # 9 M values: the size is what is tested
def test_a_tensor_of_several_parts_uses_one_scale_in_every_part():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(9_000_000).astype(F32)  # more than one frame of 1-bit values

    frames = list(codec.encode_tensors({"w": x}, EF_SIGN))

    assert len(frames) == 2
    scales = {float(np.abs(part.values).max()) for part in codec.iter_parts(frames)}
    assert len(scales) == 1 and scales.pop() == pytest.approx(float(np.abs(x).mean()), rel=1e-5)


def test_error_feedback_delivers_the_sum_of_the_updates_over_rounds():
    rng = np.random.default_rng(4)
    deltas = [{"w": rng.standard_normal(400).astype(F32) * 0.01} for _ in range(30)]
    for spec in (STC, EF_SIGN):
        residual = None
        sent = np.zeros(400)
        for delta in deltas:
            frames, residual = codec.encode_update(delta, spec, residual)
            sent += dict(codec.decode_frames(list(frames)))["w"]
        total = sum(d["w"].astype(np.float64) for d in deltas)
        np.testing.assert_allclose(sent + residual["w"], total, atol=1e-5)
        # and the residual stays bounded (error feedback keeps sign coding on course)
        assert np.abs(residual["w"]).max() < 0.5


def test_the_sign_spec_round_trips_through_protobuf():
    from protos.fedsegnet.v1 import aggregator_pb2 as pb

    for spec in (STC, EF_SIGN):
        message = pb.CodecSpec.FromString(pb.CodecSpec(**spec.to_fields()).SerializeToString())
        assert CodecSpec.from_message(message) == spec
