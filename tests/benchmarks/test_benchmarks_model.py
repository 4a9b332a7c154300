"""The model benchmarks: FLOP counts of every network, Dice at equal steps, and the GPU record's smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import dice_equal_steps  # noqa: E402
import gpu_record  # noqa: E402
import train_speed  # noqa: E402

MODELS = ["transformer_unet", "unet", "unetr", "swin_unetr"]


@pytest.mark.slow  # builds every network at full size
def test_flops_only_counts_every_network_and_ends_with_the_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    # 64³ batch 1 (SwinUNETR needs multiples of 32 and more than one voxel at its deepest level);
    # counted on the meta device, so the size costs nothing but the count changes with it.
    rc = train_speed.main(["--flops-only", "--size", "64", "--batch", "1", "--json"])

    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    assert list(last) == ["gflop_per_step"]
    gflop = last["gflop_per_step"]
    assert sorted(gflop) == sorted(MODELS)
    assert all(isinstance(v, float) and v > 0 for v in gflop.values())
    # 64³ b1 is 1/16 of 128³ b2: ours within the 500 GFLOP budget there, and the baselines' order
    assert gflop["transformer_unet"] * 16 <= 500
    assert gflop["unet"] < gflop["transformer_unet"] < gflop["unetr"] < gflop["swin_unetr"]


def test_equal_wall_time_takes_the_last_point_within_ours_time() -> None:
    results = {
        "transformer_unet": {"curve": [{"step": 0, "train_s": 0.0, "dice": 0.1}, {"step": 10, "train_s": 5.0, "dice": 0.6}],
                             "dice": 0.6, "steps": 10, "train_s": 5.0},
        "unetr": {"curve": [{"step": 0, "train_s": 0.0, "dice": 0.1}, {"step": 5, "train_s": 4.0, "dice": 0.3},
                            {"step": 10, "train_s": 8.0, "dice": 0.5}], "dice": 0.5, "steps": 10, "train_s": 8.0},
        "swin_unetr": {"skipped": "needs multiples of 32"},
    }

    summary = dice_equal_steps.summarize(results)

    assert summary["dice_at_equal_steps"] == {"transformer_unet": 0.6, "unetr": 0.5}
    assert summary["wall_time_s"] == 5.0
    assert summary["dice_at_equal_wall_time"] == {"transformer_unet": 0.6, "unetr": 0.3}
    assert summary["steps_at_equal_wall_time"] == {"transformer_unet": 10, "unetr": 5}
    assert summary["dice_minus"]["unetr"] == pytest.approx(0.1)
    assert dice_equal_steps.eval_points(40) == [0, 5, 10, 20, 40]
    assert dice_equal_steps.skip_reason("swin_unetr", 48) is not None
    assert dice_equal_steps.skip_reason("transformer_unet", 48) is None


def test_round_timings_split_each_round_from_the_agents_json_logs(tmp_path: Path) -> None:
    # Two sites; the round's figure is the slower site's.
    def events(t0: float, train: float) -> list[dict]:
        return [
            {"time": t0 + 1.0, "event": "download", "round": 1, "bytes": 10},
            {"time": t0 + 1.0 + train, "event": "epoch", "round": 1, "epoch": 1, "epochs": 1, "seconds": train},
            {"time": t0 + 3.0 + train, "event": "round", "round": 1, "seconds": 3.0 + train},
        ]

    for site, train in (("site-1", 4.0), ("site-2", 6.0)):
        lines = ["not json: a plain log line", *(json.dumps(e) for e in events(100.0, train))]
        (tmp_path / f"agent-{site}.log").write_text("\n".join(lines) + "\n")

    timings = gpu_record.round_timings(tmp_path, {1: 0.25})

    assert timings == [{"round": 1, "train": 6.0, "download": 1.0, "validate_encode_upload": 2.0,
                        "site_round": 9.0, "close": 0.25}]


@pytest.mark.slow  # starts a process
def test_gpu_record_reports_missing_packages_and_stops_fast(tmp_path: Path) -> None:
    # An interpreter without torch (the system's, or an empty venv): status 3 naming what is missing.
    bare = Path("/usr/bin/python3")
    if not bare.exists() or subprocess.run([str(bare), "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("no interpreter without torch on this machine")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_record.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(bare), "FEDSEG_WHEELS": str(tmp_path / "none")}, timeout=60)

    assert proc.returncode == 3
    assert "MISSING:" in proc.stderr and "torch" in proc.stderr


@pytest.mark.slow
def test_gpu_record_smoke_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "record.json"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_record.sh"), "--smoke", "--workdir", str(tmp_path / "work"),
         "--out", str(out), "--budget-s", "150"],
        capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=1200,
    )

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["mode"] == "smoke"
    assert record["device"].startswith("cpu")
    assert sorted(record["vol_per_s"]) == sorted(MODELS)
    assert all(v > 0 for v in record["vol_per_s"].values())
    assert record["ratio_vs_unetr"] > 0 and record["ratio_vs_swin_unetr"] > 0
    assert all(v > 0 for v in record["gflop_per_step"].values())
    dice = record["dice_equal_steps"]
    assert sorted(dice["dice_at_equal_steps"]) == sorted(MODELS)
    assert len(set(dice["steps_done"].values())) == 1  # the same number of steps for every network
    fed = record["federation"]
    assert fed["rounds_done"] >= 1
    timing = fed["timings"][0]
    assert timing["train"] > 0 and timing["close"] is not None and timing["download"] is not None
    assert {p: v["status"] for p, v in record["phases"].items()} == {
        "environment": "done", "data": "done", "speed": "done", "dice": "done", "federation": "done"}
