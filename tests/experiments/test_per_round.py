"""``python -m experiments.per_round``: every global model of a run scored on the real scans, in round order."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import codec
from experiments import per_round
from experiments.realscan import RealScan, evaluate_on_real_scans
from model import build_model
from tests.experiments.test_realscan import _phantom_scan

CONFIG = """
[federation]
id = "rounds"
rounds = 2
min_clients = 1
max_clients = 1

[model]
architecture = "cnn_unet"
in_channels = 1
out_channels = 4
img_size = [32, 32, 32]
spacing_mm = 4.0
patch_size = [16, 16, 16]

[model.options]
channels = [4, 8, 16, 32]
"""


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn_unet", in_channels=1, out_channels=4, img_size=(32, 32, 32), channels=[4, 8, 16, 32]).eval()


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    (workdir / "models").mkdir(parents=True)
    (workdir / "federation.toml").write_text(CONFIG)
    # Written out of order, with a stray file: the rows come back in round order, the stray ignored.
    for number, seed in ((3, 2), (2, 1)):
        arrays = {k: v.numpy() for k, v in _net(seed).state_dict().items()}
        codec.save_tensors(workdir / "models" / f"global-{number:04d}.frames", arrays)
    (workdir / "models" / "global-latest.tmp").write_text("partial")
    return workdir


@pytest.fixture()
def scan(tmp_path: Path) -> RealScan:
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(_phantom_scan((40, 40, 40))[0], np.diag([1.0, 1.0, 1.0, 1.0])), str(path))
    return RealScan(name="phantom", path=path, origin="test", licence="test")


def test_every_global_model_is_scored_as_the_final_one_is_in_round_order(run_dir: Path, scan: RealScan) -> None:
    rows = per_round.score_rounds(run_dir, scans=[scan])
    assert [row["round"] for row in rows] == [1, 2]
    assert [Path(row["model"]).name for row in rows] == ["global-0002.frames", "global-0003.frames"]
    for row, seed in zip(rows, (1, 2)):
        direct = evaluate_on_real_scans(_net(seed), spacing_mm=4.0, size=(32, 32, 32), scans=[scan], roi_size=(16, 16, 16))
        assert row["scores"] == direct
    assert rows[0]["scores"] != rows[1]["scores"]  # two different networks, told apart


def test_the_command_prints_each_round_and_writes_json_lines(run_dir: Path, scan: RealScan, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FEDSEG_REAL_SCANS", str(scan.path))
    monkeypatch.setattr(per_round, "available_real_scans", lambda: [scan])
    out = tmp_path / "rounds.jsonl"
    assert per_round.main([str(run_dir), "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in printed] == ["1", "2"] and all("phantom: brain" in line for line in printed)
    assert [json.loads(line)["round"] for line in out.read_text().splitlines()] == [1, 2]


def test_a_folder_that_is_not_a_run_is_refused_by_name(tmp_path: Path, run_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert per_round.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere is not a fedseg simulate work folder" in capsys.readouterr().err
    for model in (run_dir / "models").glob("global-*.frames"):
        model.unlink()
    with pytest.raises(FileNotFoundError, match="holds no global-NNNN.frames model"):
        per_round.global_models(run_dir)
