"""The compression experiment's own outputs (experiments/compression.py): the summary fields, the
FeTS upload seconds, the diagnostics read from a store and the coverage read from site states."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import codec
from client_agent.state import SiteState
from experiments.compression import (
    FETS_LINKS,
    compression_fields,
    plot_diagnostics,
    read_coverage,
    read_diagnostics,
    render_compression_table,
)
from experiments.experiment import EXPERIMENTS, METHODS


def _record(dices: list[float]) -> dict:
    return {"label": "x", "rounds": [
        {"round_id": i + 1, "global_metrics": {"dice": d}, "bytes_up": 300, "site_dice": {"a": 0.1, "b": 0.2, "c": 0.3}}
        for i, d in enumerate(dices)]}


def test_summary_fields() -> None:
    fields = compression_fields(_record([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]), 300.0)
    assert fields["dice_mean_last5"] == pytest.approx(0.5)
    assert fields["ratio_vs_fp32"] == 300.0
    assert fields["bytes_per_round_per_site"] == pytest.approx(100.0)
    assert FETS_LINKS == {"fastest": 20.0, "median": pytest.approx(151.06), "slowest": 430.95}
    assert fields["fets_upload_seconds"]["slowest"] == pytest.approx(430.95 / 300)
    table = render_compression_table({"fedavg_dense": {**fields, "label": "dense", "dice": 0.7, "wall_seconds": 1.0}})
    assert "+0.0000" in table and "0.5000" in table


def test_experiment_names_dense_and_fedsegnet() -> None:
    methods = EXPERIMENTS["compression"]
    assert {"fedavg_dense", "fedsegnet", "fedsegnet_global1"} <= set(methods)
    assert all(m in METHODS for m in methods)


def test_diagnostics_and_coverage_are_read_back(tmp_path: Path) -> None:
    round_dir = tmp_path / "store" / "rounds" / "0002"
    round_dir.mkdir(parents=True)
    (round_dir / "site-a.json").write_text(json.dumps({"extra_metrics": {"ef/lr": 0.1, "dice/1": 0.5,
                                                                           "ef/residual_norm": 2.0}}))
    (round_dir / "_result.json").write_text("{}")
    assert read_diagnostics(tmp_path / "store") == {"2": {"site-a": {"ef/lr": 0.1, "ef/residual_norm": 2.0}}}

    site = SiteState(tmp_path / "states" / "site-a")
    site.write_tensors("residual", 3, [("w", np.zeros(4, np.float32)),
                                       ("age/w", np.array([0, 3, 1, 3], np.int32))])
    site.save({"submitted": {"1": {}, "2": {}, "3": {}}, "refused": {}, "residual": "residual-0003.frames"})
    coverage = read_coverage(tmp_path / "states")
    assert coverage["site-a"]["w"] == pytest.approx(0.5)  # two entries never sent in 3 rounds
    assert coverage["site-a"]["_all"] == pytest.approx(0.5)
    assert codec.load_tensors(site.path("residual", 3))  # the state file itself is untouched


@pytest.mark.slow  # matplotlib renders a figure (seconds of CPU the first time)
def test_diagnostics_are_plotted(tmp_path: Path) -> None:
    record = {**_record([0.2, 0.3]), "diagnostics": {
        str(r): {"site-a": {"ef/velocity_norm": 1.0, "ef/residual_norm": 0.5, "ef/sent_energy": 0.9,
                            "ef/update_energy_sent": 0.8, "ef/stale_mean": 2.0, "ef/lr": 0.1}} for r in (1, 2)}}
    written = plot_diagnostics({"m": record}, tmp_path)
    assert [p.name for p in written] == ["diagnostics_m.png"] and written[0].stat().st_size > 1000
