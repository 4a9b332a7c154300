"""benchmarks/generalization_full.sh: the prepared GPU command stops early, saying why, where it cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "generalization_full.sh"


@pytest.mark.slow  # starts processes that import torch
def test_without_packages_it_names_them_and_exits_3(tmp_path: Path) -> None:
    bare = Path("/usr/bin/python3")
    if not bare.exists() or subprocess.run([str(bare), "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("no interpreter without torch on this machine")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(bare), "FEDSEG_WHEELS": str(tmp_path / "none")})
    assert proc.returncode == 3
    assert "generalization_full: MISSING:" in proc.stderr and "torch" in proc.stderr


@pytest.mark.slow
def test_without_a_gpu_it_refuses_the_hours_long_cpu_run_and_otherwise_runs_the_experiment(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    # ALLOW_CPU=1 gets through to `fedseg experiment generalization --scale full`; --tabulate runs nothing,
    # and the scans named in FEDSEG_REAL_SCANS are passed on as they are.
    results = REPO / "results" / "generalization-full"
    existed = results.exists()
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "--tabulate"], capture_output=True, text=True, timeout=300,
                              env={**env, "ALLOW_CPU": "1", "FEDSEG_REAL_SCANS": str(tmp_path / "missing.nii.gz")})
    finally:
        if not existed and results.exists():
            import shutil

            shutil.rmtree(results)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generalization_full: real scans: " + str(tmp_path / "missing.nii.gz") in proc.stderr
    assert "[generalization-full] no finished method yet" in proc.stdout  # the full scale's own results folder
