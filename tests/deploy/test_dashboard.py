"""The Grafana dashboard in k8s/ asks only for metrics a running aggregator really exports."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import codec
from aggregator_service.config import FederationConfig
from aggregator_service.errors import WrongRound
from aggregator_service.metrics import serve_metrics
from aggregator_service.rounds import UpdateCommit, UpdateHeader
from aggregator_service.server import Aggregator
from aggregator_service.store import Store

yaml = pytest.importorskip("yaml")

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "60-grafana-dashboard.yaml"
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels and ranges left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors ($__rate_interval, 5m)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # grouping labels
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        follows = text[match.end():].lstrip()
        if match.group() in _KEYWORDS or follows.startswith("("):  # keyword or function call
            continue
        names.add(match.group())
    return names


def dashboard_expressions() -> list[str]:
    config_map = yaml.safe_load(DASHBOARD.read_text())
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar loads
    dashboard = json.loads(config_map["data"]["fedsegnet-federation.json"])
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def exported_names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of a real aggregator after one closed round with two sites, one rejection."""
    root = tmp_path_factory.mktemp("aggregator")
    initial = root / "m.frames"
    codec.save_tensors(initial, {"w": np.zeros(4, np.float32)})
    config = FederationConfig(federation_id="dash", rounds=2, min_clients=2, max_clients=2, sites=("a", "b"))
    aggregator = Aggregator(Store(root / "store"), config, initial_model=initial)
    for site, dice in (("a", 0.7), ("b", 0.5)):
        frames = list(codec.encode_tensors({"w": np.full(4, dice, np.float32)}))
        commit = UpdateCommit(len(frames), hashlib.sha256(b"".join(frames)).hexdigest())
        header = UpdateHeader(site=site, round_id=1, sample_count=3, metrics={"dice": dice, "hd95": 3.0},
                              extra_metrics={"dp/epsilon": 1.5})
        aggregator.submit(header, [*frames, commit])
    aggregator.close_if_due()
    aggregator.count_rejection(WrongRound("late"))
    server = serve_metrics("127.0.0.1:0", aggregator.prometheus_text)
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()


def test_every_dashboard_expression_names_an_exported_metric(scraped: str) -> None:
    exported = exported_names(scraped)
    expressions = dashboard_expressions()

    missing = {expr: sorted(metric_names(expr) - exported) for expr in expressions if metric_names(expr) - exported}
    assert not missing, f"dashboard expressions read metrics the aggregator does not export: {missing}"
    read = set().union(*(metric_names(e) for e in expressions))
    # What the dashboard is for: rounds, submissions, rejections, bytes, close time, per-site series.
    assert {"fedseg_round_current", "fedseg_submissions_total", "fedseg_rejections_total", "fedseg_bytes_received_total",
            "fedseg_bytes_sent_total", "fedseg_round_close_seconds", "fedseg_site_weight", "fedseg_site_dice"} <= read


def test_the_per_site_series_carry_the_closed_rounds_values(scraped: str) -> None:
    assert 'fedseg_site_dice{site="a"} 0.7' in scraped
    assert 'fedseg_site_dp_epsilon{site="b"} 1.5' in scraped
    assert "fedseg_last_closed_round 1" in scraped
    weights = [float(line.split()[-1]) for line in scraped.splitlines() if line.startswith("fedseg_site_weight{")]
    assert len(weights) == 2 and sum(weights) == pytest.approx(1.0)


def test_the_check_catches_a_metric_nobody_exports(scraped: str) -> None:
    assert metric_names('sum by (reason) (rate(fedseg_rejections_total{reason="x"}[5m]))') == {"fedseg_rejections_total"}
    assert metric_names("histogram_quantile(0.9, rate(fedseg_upload_secs_bucket[$__rate_interval]))") - exported_names(
        scraped
    ) == {"fedseg_upload_secs_bucket"}
