"""Streams of tensors through encode -> frames -> decode / accumulate, and error feedback."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support import examples

import codec
from codec import LOSSLESS, MAX_FRAME_BYTES, CodecError, CodecSpec

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)
FAST = settings(max_examples=examples(60), deadline=None)


def roundtrip(tensors, spec=LOSSLESS):
    frames = list(codec.encode_tensors(tensors, spec))
    assert all(len(f) <= MAX_FRAME_BYTES for f in frames)
    return frames, dict(codec.decode_frames(frames))


def finite_floats(dtype):
    width = np.dtype(dtype).itemsize * 8
    limit = {16: 6e4, 32: 2.0**100, 64: 2.0**100}[width]
    return st.floats(-limit, limit, width=width, allow_subnormal=True)


# ---------------------------------------------------------------------------------- lossless


@FAST
@given(
    st.sampled_from([np.float32, np.float16, np.float64, np.int64, np.int8, np.uint32, np.bool_, np.complex64])
    .flatmap(lambda dt: hnp.arrays(dt, shapes)),
    st.sampled_from([0, 1, 3]),
)
def test_lossless_round_trip_is_bit_exact_for_every_dtype_and_shape(array, zstd_level):
    _, decoded = roundtrip({"t": array}, CodecSpec(zstd_level=zstd_level))

    out = decoded["t"]
    assert (out.dtype, out.shape) == (array.dtype, array.shape)
    assert out.tobytes() == array.tobytes()  # bit-exact, NaN payloads and -0.0 included


def test_tensor_order_names_and_headers_survive():
    tensors = {"enc.0.conv.weight": np.ones((4, 2, 3, 3, 3), np.float32), "enc.0.norm.num_batches_tracked": np.array(7)}

    frames, decoded = roundtrip(tensors, CodecSpec())  # the default spec: zstd level 3
    header = codec.read_header(frames[0])

    assert list(decoded) == list(tensors)
    assert (header.name, header.shape, header.dtype, header.count) == ("enc.0.conv.weight", (4, 2, 3, 3, 3), np.float32, 216)
    assert (header.part, header.parts, header.encoding) == (0, 1, "dense+raw+zstd")
    # codec.LOSSLESS (models, saved state) skips zstd: trained weights do not compress.
    assert codec.read_header(roundtrip(tensors)[0][0]).encoding == "dense+raw"


def test_big_tensors_are_split_into_frames_of_at_most_1_mib():
    big = np.random.default_rng(0).standard_normal(700_000).astype(np.float32)  # 2.8 MB

    frames, decoded = roundtrip({"big": big, "after": np.arange(3.0)})
    headers = [codec.read_header(f) for f in frames]

    assert [(h.name, h.part, h.parts) for h in headers] == [("big", 0, 3), ("big", 1, 3), ("big", 2, 3), ("after", 0, 1)]
    assert [h.start for h in headers[:3]] == [0, headers[0].stop, headers[1].stop]
    assert np.array_equal(decoded["big"], big)


def test_sparse_tensor_with_many_sent_values_is_split_too():
    x = np.random.default_rng(1).standard_normal((2000, 1000)).astype(np.float32)
    spec = CodecSpec(top_k_fraction=0.6, quantization="int8")

    frames, decoded = roundtrip({"x": x}, spec)
    headers = [codec.read_header(f) for f in frames]

    assert len(frames) >= 2 and all(h.encoding.startswith("topk+int8") for h in headers)
    assert sum(h.sent for h in headers) == 1_200_000
    assert np.count_nonzero(decoded["x"]) <= 1_200_000


def test_encoding_is_deterministic():
    x = np.random.default_rng(2).standard_normal(5000).astype(np.float32)
    spec = CodecSpec(top_k_fraction=0.1, quantization="int4", stochastic_rounding=True, seed=3)

    assert list(codec.encode_tensors({"x": x}, spec)) == list(codec.encode_tensors({"x": x}, spec))
    assert list(codec.encode_tensors({"x": x}, spec)) != list(codec.encode_tensors({"x": x}, CodecSpec(
        top_k_fraction=0.1, quantization="int4", stochastic_rounding=True, seed=4)))


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not contiguous
        np.arange(6, dtype=">f4"),  # big-endian
        np.arange(6, dtype=">i8"),
    ],
)
def test_unusual_layouts_decode_to_the_same_values(array):
    _, decoded = roundtrip([("a", array)])

    assert np.array_equal(decoded["a"], array) and decoded["a"].shape == array.shape


@pytest.mark.parametrize("value", [np.array(["a"]), np.array([object()]), np.array(["2020-01-01"], "datetime64[D]")])
def test_unsupported_dtypes_are_refused_by_name(value):
    with pytest.raises(CodecError, match="tensor 'bad': dtype .* cannot be encoded"):
        list(codec.encode_tensors({"bad": value}))


def test_duplicate_names_are_refused_by_the_encoder():
    with pytest.raises(CodecError, match="tensor 'w' appears twice in the input"):
        list(codec.encode_tensors([("w", np.zeros(2)), ("w", np.ones(2))]))


@pytest.mark.parametrize("name", ["", 5, "x" * 1025])
def test_bad_names_are_refused(name):
    with pytest.raises(CodecError, match="tensor name"):
        list(codec.encode_tensors([(name, np.zeros(2))]))


def test_torch_tensors_are_accepted_without_the_codec_importing_torch():
    torch = pytest.importorskip("torch")
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}

    _, decoded = roundtrip(tensors)

    assert np.array_equal(decoded["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert decoded["b"].dtype == np.float32 and decoded["b"].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------- lossy


@FAST
@given(st.sampled_from([np.float32, np.float64]).flatmap(lambda dt: hnp.arrays(dt, shapes, elements=finite_floats(dt))))
def test_fp16_decodes_to_the_nearest_half_in_the_original_dtype(array):
    _, decoded = roundtrip({"t": array}, CodecSpec(quantization="fp16"))

    out = decoded["t"]
    in_range = np.abs(array) <= 65504
    assert (out.dtype, out.shape) == (array.dtype, array.shape)
    assert np.array_equal(out[in_range], array[in_range].astype(np.float16).astype(array.dtype))


@FAST
@given(
    array=st.sampled_from([np.float32, np.float16, np.float64]).flatmap(
        lambda dt: hnp.arrays(dt, shapes, elements=finite_floats(dt))
    ),
    fraction=st.sampled_from([1.0, 0.5, 0.1, 0.01]),
    quantization=st.sampled_from(["fp32", "fp16", "int8", "int4"]),
    block=st.sampled_from([1, 4, 256]),
    stochastic=st.booleans(),
)
def test_sparse_quantized_sends_the_top_k_within_one_step_and_keeps_the_rest_as_residual(
    array, fraction, quantization, block, stochastic
):
    stochastic = stochastic and quantization in ("int8", "int4")
    spec = CodecSpec(top_k_fraction=fraction, quantization=quantization, block_size=block, stochastic_rounding=stochastic)

    frames, residual = codec.encode_update({"t": array}, spec)
    frames = list(frames)
    decoded = dict(codec.decode_frames(frames))["t"]
    parts = list(codec.iter_parts(frames))

    r = residual["t"]
    assert (decoded.dtype, decoded.shape, r.dtype, r.shape) == (array.dtype, array.shape, array.dtype, array.shape)
    # Error feedback: the residual is exactly input - decoded, and adds back to the input exactly.
    with np.errstate(over="ignore"):
        assert np.array_equal(r, array - decoded)
    assert np.array_equal(decoded + r, array)
    flat = array.reshape(-1)
    if fraction < 1.0:
        sent = np.concatenate([p.positions for p in parts])
        k = math.ceil(fraction * flat.size)
        assert sent.size <= k and sent.size == min(k, np.count_nonzero(flat))
        unsent = np.setdiff1d(np.arange(flat.size), sent)
        mags = np.abs(flat.astype(np.float32))
        if sent.size and unsent.size:
            assert mags[sent].min() >= mags[unsent].max()
        assert np.all(decoded.reshape(-1)[unsent] == 0)
    if quantization in ("int8", "int4"):
        levels = 127 if quantization == "int8" else 7
        for part in parts:
            x = (flat[part.positions] if part.positions is not None else flat[part.header.start : part.header.stop])
            x = x.astype(np.float64)
            padded = np.zeros(-(-x.size // block) * block)
            padded[: x.size] = np.abs(x)
            step = np.repeat(padded.reshape(-1, block).max(axis=1) / levels, block)[: x.size]
            err = np.abs(part.values.astype(np.float64) - x)
            tolerance = step * (1.0 if stochastic else 0.5) * (1 + 1e-3) + 4 * np.abs(x) * np.finfo(array.dtype).eps
            assert np.all(err <= tolerance + 1e-30)


def test_an_int8_encoded_float32_tensor_decodes_to_float32():
    x = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(10, 100)

    frames, decoded = roundtrip({"x": x}, CodecSpec(quantization="int8", block_size=100))

    assert codec.read_header(frames[0]).encoding in ("dense+int8", "dense+int8+zstd")
    assert decoded["x"].dtype == np.float32 and decoded["x"].shape == (10, 100)
    assert np.max(np.abs(decoded["x"] - x)) <= 0.5 / 127 * 1.0001


@pytest.mark.parametrize("value", [np.array([1, -2, 3]), np.array([True, False])])
def test_integer_and_bool_tensors_go_dense_and_raw_under_a_lossy_spec(value):
    frames, decoded = roundtrip({"n": value}, CodecSpec(top_k_fraction=0.01, quantization="int4"))

    assert codec.read_header(frames[0]).encoding.startswith("dense+raw")
    assert np.array_equal(decoded["n"], value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("spec", [CodecSpec(quantization="int8"), CodecSpec(top_k_fraction=0.5)])
def test_non_finite_values_are_refused_by_lossy_specs_and_kept_by_lossless(bad, spec):
    x = np.array([1.0, bad, 2.0], np.float32)

    with pytest.raises(CodecError, match="tensor 'w' has NaN/Inf"):
        list(codec.encode_tensors({"w": x}, spec))
    assert roundtrip({"w": x})[1]["w"].tobytes() == x.tobytes()


def test_per_tensor_top_k_by_hand():
    # k = ceil(0.4 * 5) = 2: the largest magnitudes are -3 (position 1) and 2 (position 2)
    x = np.array([0.1, -3.0, 2.0, 0.0, 0.5], np.float32)

    _, decoded = roundtrip({"x": x}, CodecSpec(top_k_fraction=0.4))

    assert decoded["x"].tolist() == [0.0, -3.0, 2.0, 0.0, 0.0]


def test_global_top_k_by_hand():
    # 7 floats, k = ceil(3/7 * 7) = 3 over all tensors: -5, 4, 3; the int tensor is sent whole
    tensors = {
        "a": np.array([1.0, -5.0, 0.5], np.float32),
        "b": np.array([4.0, 0.0, 3.0], np.float32),
        "n": np.array([9, 9]),
        "c": np.array([2.0], np.float32),
    }

    _, decoded = roundtrip(tensors, CodecSpec(top_k_fraction=3 / 7, top_k_scope="global"))

    assert {k: v.tolist() for k, v in decoded.items()} == {
        "a": [0.0, -5.0, 0.0], "b": [4.0, 0.0, 3.0], "n": [9, 9], "c": [0.0]
    }


def test_global_top_k_breaks_ties_in_tensor_order():
    tensors = [("a", np.array([1.0, 2.0], np.float32)), ("b", np.array([2.0, 2.0], np.float32))]

    _, decoded = roundtrip(tensors, CodecSpec(top_k_fraction=0.5, top_k_scope="global"))

    assert decoded["a"].tolist() == [0.0, 2.0] and decoded["b"].tolist() == [2.0, 0.0]


def test_global_top_k_refuses_a_one_shot_iterator():
    pairs = iter([("a", np.ones(3, np.float32))])

    with pytest.raises(CodecError, match="global top-k needs two passes"):
        list(codec.encode_tensors(pairs, CodecSpec(top_k_fraction=0.5, top_k_scope="global")))


def test_top1_int8_zstd_is_over_100x_smaller_than_dense_fp32():
    x = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)

    frames = list(codec.encode_tensors({"x": x}, CodecSpec(top_k_fraction=0.01, quantization="int8")))

    assert x.nbytes / sum(len(f) for f in frames) >= 100


# ---------------------------------------------------------------------------------- error feedback


def test_error_feedback_carries_what_was_not_sent_into_the_next_round():
    rng = np.random.default_rng(4)
    spec = CodecSpec(top_k_fraction=0.1, quantization="int8")
    deltas = [{"w": rng.standard_normal(500).astype(np.float32)} for _ in range(3)]

    residual: dict[str, np.ndarray] | None = None
    sent = np.zeros(500, np.float64)
    for delta in deltas:
        frames, new_residual = codec.encode_update(delta, spec, residual)
        sent += dict(codec.decode_frames(frames))["w"]
        residual = new_residual

    total = sum(d["w"].astype(np.float64) for d in deltas)
    np.testing.assert_allclose(sent + residual["w"], total, atol=1e-5)


def test_the_residual_is_complete_once_the_frames_are_consumed():
    deltas = {"a": np.ones(4, np.float32), "b": np.arange(3), "c": np.ones(2, np.float16)}

    update = codec.encode_update(deltas, CodecSpec(top_k_fraction=0.5), {"a": np.full(4, 0.5, np.float32), "gone": np.ones(1)})

    assert update.residual == {}
    frames = list(update.frames)
    assert list(update.residual) == ["a", "b", "c"]
    assert update.residual["a"].tolist() == [0.0, 0.0, 1.5, 1.5]  # x = 1.5 everywhere, first 2 sent
    assert update.residual["b"].tolist() == [0, 0, 0]
    assert dict(codec.decode_frames(frames))["a"].tolist() == [1.5, 1.5, 0.0, 0.0]


def test_a_residual_of_the_wrong_shape_is_refused():
    with pytest.raises(CodecError, match=r"tensor 'a': residual has shape \(3,\), delta has shape \(4,\)"):
        list(codec.encode_update({"a": np.ones(4, np.float32)}, LOSSLESS, {"a": np.ones(3, np.float32)}).frames)


# ---------------------------------------------------------------------------------- accumulation


def test_accumulate_frames_adds_weighted_updates_without_densifying():
    rng = np.random.default_rng(5)
    a = {"w": rng.standard_normal((30, 20)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    b = {"w": rng.standard_normal((30, 20)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    spec = CodecSpec(top_k_fraction=0.2, quantization="int8")
    frames_a, frames_b = list(codec.encode_tensors(a, spec)), list(codec.encode_tensors(b, spec))
    dense_a, dense_b = dict(codec.decode_frames(frames_a)), dict(codec.decode_frames(frames_b))

    into: dict[str, np.ndarray] = {"w": np.zeros((30, 20), np.float32)}
    codec.accumulate_frames(frames_a, 0.25, into)
    codec.accumulate_frames(frames_b, 0.75, into)

    for name in a:
        expected = np.float32(0.25) * dense_a[name] + np.float32(0.75) * dense_b[name]
        assert into[name].dtype == np.float32
        assert np.array_equal(into[name], expected)


def test_accumulate_dense_and_integer_tensors_into_float64():
    frames = list(codec.encode_tensors({"n": np.array([1, 2, 3]), "x": np.full((2, 2), 0.5, np.float32)}))
    into = {"n": np.ones(3), "x": np.zeros((2, 2))}

    codec.accumulate_frames(frames, 2.0, into)

    assert into["n"].tolist() == [3.0, 5.0, 7.0] and into["x"].tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize(
    "target, problem",
    [
        (np.zeros(5, np.float32), r"target array has shape \(5,\), the tensor has shape \(2, 3\)"),
        (np.zeros((3, 2), np.float32).T, "must be writeable and C-contiguous"),
        (np.zeros((2, 3), np.int64), "cannot accumulate float32 into a int64 array"),
    ],
)
def test_accumulate_refuses_unusable_targets(target, problem):
    frames = list(codec.encode_tensors({"w": np.ones((2, 3), np.float32)}))

    with pytest.raises(CodecError, match=problem):
        codec.accumulate_frames(frames, 1.0, {"w": target})


def test_verify_frames_summarises_without_densifying():
    x = np.array([3.0, 0.0, -4.0, 0.0], np.float32)
    frames = list(codec.encode_tensors({"x": x, "y": np.array([np.nan], np.float32)}, LOSSLESS))
    frames += list(codec.encode_tensors({"z": x}, CodecSpec(top_k_fraction=0.5)))

    summary = codec.verify_frames(frames)

    assert list(summary) == ["x", "y", "z"]
    assert (summary["x"].sq_norm, summary["x"].sent, summary["x"].finite) == (25.0, 4, True)
    assert summary["y"].finite is False
    assert (summary["z"].sq_norm, summary["z"].sent, summary["z"].encodings) == (25.0, 2, frozenset({"topk+raw"}))
