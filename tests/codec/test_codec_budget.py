"""A byte budget per update (CodecSpec.byte_budget): the frames fit, nothing is lost, energy decides."""

from __future__ import annotations

import re

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import examples

import codec
from codec import CodecError, CodecSpec
from codec.budget import allocate

QUANTIZATIONS = ["fp32", "fp16", "int8", "int4", "sign"]


def encode(deltas, spec, residual=None):
    frames, new_residual = codec.encode_update(deltas, spec, residual)
    frames = list(frames)
    return frames, new_residual, dict(codec.decode_frames(frames))


def sent_counts(frames) -> dict[str, int]:
    counts: dict[str, int] = {}
    for part in codec.iter_parts(frames):
        counts[part.name] = counts.get(part.name, 0) + part.values.size
    return counts


def update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((16, 8, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(16).astype(np.float32) * 3,
        "norm.num_batches_tracked": np.array(7, dtype=np.int64),
        "head.weight": rng.standard_normal((60, 50)).astype(np.float32) * 0.1,
    }


# ------------------------------------------------------------------------------- the invariants


finite32 = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@settings(max_examples=examples(60), deadline=None)
@given(
    a=hnp.arrays(np.float32, st.integers(1, 400), elements=finite32),
    b=hnp.arrays(np.float16, st.integers(1, 60), elements=st.floats(-100, 100, width=16)),
    c=hnp.arrays(np.float64, st.integers(0, 50), elements=st.floats(-1e6, 1e6)),
    quantization=st.sampled_from(QUANTIZATIONS),
    budget=st.integers(1, 3000),
    zstd_level=st.sampled_from([0, 3]),
)
def test_the_frames_fit_the_budget_and_sent_plus_residual_is_the_input(a, b, c, quantization, budget, zstd_level):
    deltas = {"a": a, "b": b, "steps": np.array([3], np.int32), "c": c}
    spec = CodecSpec(byte_budget=budget, quantization=quantization, zstd_level=zstd_level)

    try:
        frames, residual, decoded = encode(deltas, spec)
    except CodecError as exc:
        # Only a budget below the frame headers is refused, and the message says what fits.
        match = re.search(r"byte_budget of (\d+) bytes cannot hold .* at least (\d+)", str(exc))
        assert match and int(match.group(1)) == budget and int(match.group(2)) > budget, str(exc)
        frames, residual, decoded = encode(deltas, CodecSpec(byte_budget=int(match.group(2)), quantization=quantization))
        budget = int(match.group(2))

    assert sum(len(f) for f in frames) <= budget
    assert list(decoded) == list(deltas)
    for name, x in deltas.items():
        assert np.array_equal(decoded[name] + residual[name], x), name  # nothing lost, only delayed
    assert np.array_equal(decoded["steps"], deltas["steps"])  # integers go dense and exact


def test_a_budget_below_the_headers_is_refused_naming_the_budget_and_what_fits():
    deltas = update()

    with pytest.raises(CodecError) as info:
        list(codec.encode_update(deltas, CodecSpec(byte_budget=50, quantization="int8")).frames)

    message = str(info.value)
    assert message.startswith("byte_budget of 50 bytes cannot hold this update")
    minimum = int(re.search(r"at least (\d+)", message).group(1))  # type: ignore[union-attr]
    frames, _, decoded = encode(deltas, CodecSpec(byte_budget=minimum, quantization="int8"))
    assert sum(len(f) for f in frames) <= minimum
    assert sent_counts(frames)["conv.weight"] == 0  # the minimum sends headers and integers only


@pytest.mark.parametrize("quantization", ["fp32", "fp16", "int8", "int4"])
@pytest.mark.parametrize("budget", [400, 2_000, 5_000])
def test_the_budget_is_used_not_just_respected(quantization, budget):
    deltas = update()
    frames, _, _ = encode(deltas, CodecSpec(byte_budget=budget, quantization=quantization, zstd_level=0))

    size = sum(len(f) for f in frames)
    everything = sent_counts(frames) == {name: x.size for name, x in deltas.items()}
    # Without zstd the plan's sizes are the frames' sizes: unless the whole update fits, one
    # more entry would not, so the frames fill the budget up to about one entry's bytes per tensor.
    assert size <= budget and (everything or size >= budget - 4 * 16)


def test_a_budget_that_holds_everything_sends_everything():
    deltas = update()
    frames, residual, decoded = encode(deltas, CodecSpec(byte_budget=10_000_000))

    for name, x in deltas.items():
        assert np.array_equal(decoded[name], x) and not np.any(residual[name])
    assert {codec.read_header(f).encoding for f in frames} <= {"dense+raw", "dense+raw+zstd"}


def test_top_k_fraction_caps_each_tensor_under_a_budget():
    deltas = update()
    frames, _, _ = encode(deltas, CodecSpec(byte_budget=10_000_000, top_k_fraction=0.1, quantization="int8"))

    counts = sent_counts(frames)
    assert counts["conv.weight"] == int(np.ceil(0.1 * deltas["conv.weight"].size))
    assert counts["head.weight"] == 300 and counts["conv.bias"] == 2


# ------------------------------------------------------------------------------- allocation by energy


def test_allocate_gives_entries_in_proportion_to_energy_up_to_each_cap():
    # k_i = min(cap_i, floor(lam * E_i))
    assert allocate([1.0, 2.0, 4.0, 0.0], [10, 10, 3, 5], 2.0) == [2, 4, 3, 0]
    assert allocate([1.0, 2.0], [10, 10], 0.49) == [0, 0]


@pytest.mark.parametrize("quantization", ["int8", "sign", "fp32"])
@pytest.mark.parametrize("budget", [600, 1500, 5000])
def test_tensors_with_more_energy_get_more_entries(quantization, budget):
    rng = np.random.default_rng(3)
    scales = [0.125, 0.5, 1.0, 2.0, 4.0]
    # The same values in another order, scaled by powers of two (exactly): only the energy
    # differs, not which entries sign coding must hold back.
    base = rng.standard_normal(2000).astype(np.float32)
    deltas = {f"t{i}": (np.roll(base, 17 * i) * s).astype(np.float32) for i, s in enumerate(scales)}

    frames, _, _ = encode(deltas, CodecSpec(byte_budget=budget, quantization=quantization))

    counts = sent_counts(frames)
    ks = [counts[f"t{i}"] for i in range(len(scales))]
    assert ks == sorted(ks) and (ks[-1] > ks[0] or quantization == "sign")  # sign: all capped at 5000
    energy = np.array([s * s for s in scales])
    if quantization != "sign" and ks[-1] < 2000 and ks[-2] > 20:  # nothing capped: shares follow energy
        assert ks[-1] / ks[-2] == pytest.approx(energy[-1] / energy[-2], rel=0.15)


def test_unsent_energy_waits_in_the_residual_and_gets_its_turn():
    rng = np.random.default_rng(5)
    spec = CodecSpec(byte_budget=700, quantization="int8")
    deltas = [{"big": rng.standard_normal(3000).astype(np.float32), "small": 0.05 * np.ones(500, np.float32)}
              for _ in range(12)]

    residual = None
    sent = {"big": np.zeros(3000), "small": np.zeros(500)}
    small_sent_rounds = 0
    for delta in deltas:
        frames, residual, decoded = encode(delta, spec, residual)
        assert sum(len(f) for f in frames) <= 700
        small_sent_rounds += int(np.any(decoded["small"]))
        for name in sent:
            sent[name] += decoded[name]

    for name in sent:
        total = sum(d[name].astype(np.float64) for d in deltas)
        np.testing.assert_allclose(sent[name] + residual[name], total, atol=1e-4)
    assert small_sent_rounds >= 1  # its energy grew in the residual until it earned entries


# ------------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"byte_budget": -1}, "byte_budget must be in [0, "),
        ({"byte_budget": 1.5}, "byte_budget must be an integer"),
        ({"byte_budget": 100, "top_k_scope": "global"}, "top_k_scope must be 'tensor' with it, got 'global'"),
    ],
)
def test_invalid_budgets_are_refused(kwargs, message):
    with pytest.raises(CodecError) as info:
        CodecSpec(**kwargs)

    assert message in str(info.value)


def test_a_budget_makes_the_spec_sparse_and_lossy():
    spec = CodecSpec(byte_budget=1000)

    assert spec.sparse and not spec.lossless and not CodecSpec().sparse


def test_the_budget_travels_in_the_protobuf_message_and_the_federation_file():
    from aggregator_service.config import parse_federation_config, read_config_tables
    from aggregator_service.wire import training_config_to_proto
    from protos.fedsegnet.v1 import aggregator_pb2 as pb

    spec = CodecSpec(byte_budget=123_456, quantization="sign")
    message = pb.CodecSpec.FromString(pb.CodecSpec(**spec.to_fields()).SerializeToString())
    assert message.byte_budget == 123_456 and CodecSpec.from_message(message) == spec

    config = parse_federation_config(read_config_tables(text='[codec]\nbyte_budget = 9000\nquantization = "sign"\n'))
    carried = training_config_to_proto(config).codec
    assert CodecSpec.from_message(carried) == CodecSpec(byte_budget=9000, quantization="sign")


def test_a_one_shot_iterator_is_refused_under_a_budget():
    with pytest.raises(CodecError, match="a byte budget needs two passes"):
        list(codec.encode_tensors(iter([("a", np.ones(3, np.float32))]), CodecSpec(byte_budget=500)))
