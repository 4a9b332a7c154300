"""Updates under a byte budget and in Sparse Ternary Compression aggregate correctly through a real
aggregator: the round asks for the codec the federation file names, the sites encode with it (and
with error feedback), and the next global model is the initial one plus the FedAvg of exactly what
the frames carry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy_federation import config, sample_count, start, upload_requests

import codec
from protos.fedsegnet.v1 import aggregator_pb2 as pb

pytestmark = pytest.mark.slow  # starts a gRPC server

RNG = np.random.default_rng(7)
INITIAL = {
    "conv.weight": RNG.standard_normal((8, 4, 3, 3, 3)).astype(np.float32),
    "conv.bias": RNG.standard_normal(8).astype(np.float32),
    "norm.num_batches_tracked": np.array(5, dtype=np.int64),
    "head.weight": RNG.standard_normal((40, 30)).astype(np.float32),
}


def site_delta(site: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(sum(site.encode()))
    return {
        name: (rng.standard_normal(x.shape) * 0.01).astype(x.dtype) if x.dtype.kind == "f" else x + 1
        for name, x in INITIAL.items()
    }


@pytest.mark.parametrize(
    "asked",
    [
        codec.CodecSpec(byte_budget=900, quantization="int8"),
        codec.CodecSpec(top_k_fraction=0.02, quantization="sign"),
        codec.CodecSpec(byte_budget=700, quantization="sign"),
    ],
    ids=["budget-int8", "stc", "budget-stc"],
)
def test_budget_and_stc_updates_aggregate_to_the_fedavg_of_what_was_sent(tmp_path: Path, asked: codec.CodecSpec):
    cfg = config(sites=("a", "b"), rounds=1, codec=asked)
    served = start(tmp_path, cfg, INITIAL)
    try:
        spec = codec.CodecSpec.from_message(served.stub.GetRound(pb.GetRoundRequest(), timeout=10).round.config.codec)
        assert spec == asked  # [codec] reached the round's TrainingConfig
        sent: dict[str, dict[str, np.ndarray]] = {}
        for site in ("a", "b"):
            # A residual from an earlier round, as error feedback carries it.
            residual = {name: x * 0.5 for name, x in site_delta(site + "-old").items() if x.dtype.kind == "f"}
            update = codec.encode_update(list(site_delta(site).items()), spec, residual)
            frames = list(update.frames)
            if spec.byte_budget:
                assert sum(len(f) for f in frames) <= spec.byte_budget
            sent[site] = dict(codec.decode_frames(frames))
            receipt = served.stub.SubmitUpdate(upload_requests(site, 1, frames), timeout=30)
            assert receipt.submissions in (1, 2)
        final = dict(codec.decode_frames(_frames(served.final_model(cfg))))
    finally:
        served.stop()

    n = {site: sample_count(site) for site in sent}
    for name, x in INITIAL.items():
        if x.dtype.kind != "f":
            assert np.array_equal(final[name], x)  # the aggregator keeps the global counter
            continue
        expected = x.astype(np.float64) + sum(n[s] * sent[s][name].astype(np.float64) for s in sent) / sum(n.values())
        np.testing.assert_allclose(final[name], expected, rtol=1e-6, atol=1e-7)
        assert np.count_nonzero(final[name] - x) <= sum(np.count_nonzero(sent[s][name]) for s in sent)


def _frames(file_bytes: bytes) -> list[bytes]:
    import io

    return list(codec.read_frames(io.BytesIO(file_bytes)))
