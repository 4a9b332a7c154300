"""The Prometheus endpoint serves the store's counters and the submission latency histogram."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np

import codec
from aggregator_service.config import FederationConfig
from aggregator_service.metrics import Histogram, serve_metrics
from aggregator_service.rounds import UpdateCommit, UpdateHeader
from aggregator_service.server import Aggregator
from aggregator_service.store import Store


def test_histogram_is_cumulative() -> None:
    h = Histogram(buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 5.0):
        h.observe(v)
    lines = h.lines("x")
    assert lines[:3] == ['x_bucket{le="0.1"} 1', 'x_bucket{le="1.0"} 3', 'x_bucket{le="+Inf"} 4']
    assert lines[-1] == "x_count 4"


def test_metrics_endpoint_reports_submissions_and_rejections(tmp_path: Path) -> None:
    initial = tmp_path / "m.frames"
    codec.save_tensors(initial, {"w": np.zeros(4, np.float32)})
    config = FederationConfig(federation_id="m", rounds=1, min_clients=2, max_clients=2, sites=("a", "b"))
    aggregator = Aggregator(Store(tmp_path / "store"), config, initial_model=initial)
    frames = list(codec.encode_tensors({"w": np.ones(4, np.float32)}))
    commit = UpdateCommit(len(frames), codec.frames_digest(frames))
    aggregator.submit(UpdateHeader(site="a", round_id=1, sample_count=3), [*frames, commit])
    from aggregator_service.errors import WrongRound

    aggregator.count_rejection(WrongRound("late"))
    server = serve_metrics("127.0.0.1:0", aggregator.prometheus_text)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        server.shutdown()
    assert "fedseg_submissions_total 1" in text
    assert "fedseg_round_submissions 1" in text
    assert 'fedseg_rejections_total{reason="wrong_round"} 1' in text
    assert "fedseg_submission_seconds_count 1" in text
    assert f"fedseg_bytes_received_total {sum(map(len, frames))}" in text
