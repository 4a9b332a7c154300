"""CodecSpec: validation at construction and the protobuf field mapping."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import examples

from codec import LOSSLESS, CodecError, CodecSpec


def test_defaults_are_lossless_dense_zstd3():
    spec = CodecSpec()

    assert spec.lossless and not spec.sparse
    assert (spec.top_k_fraction, spec.top_k_scope, spec.quantization) == (1.0, "tensor", "fp32")
    assert (spec.block_size, spec.stochastic_rounding, spec.zstd_level, spec.seed) == (256, False, 3, 0)


def test_the_model_spec_is_the_default_without_zstd():
    assert LOSSLESS == CodecSpec(zstd_level=0)
    assert LOSSLESS.lossless and not LOSSLESS.sparse


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k_fraction": 0.0}, "top_k_fraction must be in (0, 1], got 0.0"),
        ({"top_k_fraction": 1.5}, "top_k_fraction must be in (0, 1], got 1.5"),
        ({"top_k_fraction": float("nan")}, "top_k_fraction must be in (0, 1]"),
        ({"top_k_fraction": "0.1"}, "top_k_fraction must be a number"),
        ({"top_k_scope": "layer"}, "top_k_scope must be one of ('tensor', 'global'), got 'layer'"),
        ({"quantization": "int2"}, "quantization must be one of ('fp32', 'fp16', 'int8', 'int4', 'sign'), got 'int2'"),
        ({"block_size": 0}, "block_size must be in [1, 1048576], got 0"),
        ({"block_size": 2.0}, "block_size must be an integer"),
        ({"zstd_level": 23}, "zstd_level must be in [0, 22] (0 = no zstd), got 23"),
        ({"zstd_level": -1}, "zstd_level must be in [0, 22]"),
        ({"seed": -1}, "seed must be in [0, "),
        ({"stochastic_rounding": True}, "stochastic_rounding applies to quantization 'int8' or 'int4' only"),
        ({"stochastic_rounding": 1, "quantization": "int8"}, "stochastic_rounding must be a bool"),
    ],
)
def test_invalid_values_are_refused_with_the_value_and_the_allowed_range(kwargs, message):
    with pytest.raises(CodecError) as info:
        CodecSpec(**kwargs)

    assert message in str(info.value)


def test_numpy_numbers_are_accepted_and_stored_as_plain_python_numbers():
    spec = CodecSpec(top_k_fraction=np.float32(0.5), block_size=np.int64(64), seed=np.uint64(3))

    assert (spec.top_k_fraction, spec.block_size, spec.seed) == (0.5, 64, 3)
    assert (type(spec.top_k_fraction), type(spec.block_size), type(spec.seed)) == (float, int, int)


@pytest.mark.parametrize(
    "spec, lossless, sparse",
    [
        (CodecSpec(quantization="fp16"), False, False),
        (CodecSpec(top_k_fraction=0.5), False, True),
        (CodecSpec(top_k_fraction=1, quantization="fp32", zstd_level=0), True, False),
    ],
)
def test_lossless_and_sparse_properties(spec, lossless, sparse):
    assert (spec.lossless, spec.sparse) == (lossless, sparse)


specs = st.builds(
    CodecSpec,
    top_k_fraction=st.sampled_from([1.0, 0.5, 0.1, 0.01, 0.001, 0.25, 0.3333333]),
    top_k_scope=st.sampled_from(["tensor", "global"]),
    quantization=st.sampled_from(["int8", "int4"]),
    block_size=st.integers(1, 1 << 20),
    stochastic_rounding=st.booleans(),
    zstd_level=st.integers(0, 22),
    seed=st.integers(0, (1 << 64) - 1),
)


@settings(max_examples=examples(50), deadline=None)
@given(specs)
def test_to_fields_then_from_message_gives_back_the_spec(spec):
    fields = spec.to_fields()
    # Protobuf stores top_k_fraction as float32; from_message must undo that rounding.
    wire = SimpleNamespace(**{**fields, "top_k_fraction": float(np.float32(fields["top_k_fraction"]))})

    assert CodecSpec.from_message(wire) == spec
    assert CodecSpec.from_message(fields) == spec


def test_zero_values_in_a_message_mean_defaults_and_negative_level_means_no_zstd():
    empty = SimpleNamespace(
        top_k_fraction=0.0, top_k_scope="", quantization="", block_size=0, stochastic_rounding=False, zstd_level=0, seed=0
    )

    assert CodecSpec.from_message(empty) == CodecSpec()
    assert CodecSpec.from_message({}) == CodecSpec()
    assert CodecSpec.from_message({"zstd_level": -5}).zstd_level == 0
    assert CodecSpec(zstd_level=0).to_fields()["zstd_level"] == -1


def test_from_message_validates_like_the_constructor():
    with pytest.raises(CodecError, match="quantization must be one of"):
        CodecSpec.from_message({"quantization": "bf16"})


@pytest.mark.skipif(importlib.util.find_spec("google.protobuf") is None, reason="protobuf not installed")
def test_round_trip_through_the_real_protobuf_message():
    pb = pytest.importorskip("protos.fedsegnet.v1.aggregator_pb2")
    spec = CodecSpec(top_k_fraction=0.01, quantization="int4", block_size=64, zstd_level=0, stochastic_rounding=True, seed=7)

    message = pb.CodecSpec(**spec.to_fields())

    assert CodecSpec.from_message(message) == spec
    assert CodecSpec.from_message(pb.CodecSpec()) == CodecSpec()


@pytest.mark.slow  # starts a process
def test_the_codec_package_imports_neither_torch_nor_protobuf_nor_grpc():
    code = (
        "import sys, codec; "
        "bad = [m for m in ('torch', 'google.protobuf', 'grpc') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)

    assert result.returncode == 0, result.stdout + result.stderr
