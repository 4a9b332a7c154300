"""The deployment scripts' own behaviour (fast), and the whole deploy smoke test on request.

CI runs ``scripts/deploy-smoke.sh`` itself after the unit tests (it builds the images, plays
k8s/ with podman and runs one federation round: minutes, not a unit test). Here:

* the smoke script skips cleanly, exit 0 with a printed reason, where it cannot run (not root);
* the build script refuses what it does not know;
* the podman variant's command line writes what the smoke script plays;
* the smoke script's health checks tell a health-only port from one that serves the aggregator;
* ``FEDSEG_DEPLOY_SMOKE=1 pytest tests/deploy/test_deploy.py`` also runs the smoke script end to end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Iterator

import numpy as np
import pytest

import codec
from aggregator_service.config import parse_federation_config
from aggregator_service.server import Aggregator, RunningServer, serve
from aggregator_service.store import Store

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"


def _as_unprivileged_user() -> list[str]:
    """A command prefix that runs as ``nobody`` when we are root (the tests' usual CI case)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root for this test")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.slow  # starts a process
def test_smoke_script_skips_with_a_reason_when_not_root() -> None:
    # nobody may not be able to read the clone (a checkout under /root is mode 0700): run a copy
    # from a folder anyone can read.
    with tempfile.TemporaryDirectory(prefix="fedseg-smoke-") as tmp:
        folder = Path(tmp) / "scripts"
        folder.mkdir()
        script = folder / "deploy-smoke.sh"
        shutil.copyfile(SCRIPTS / "deploy-smoke.sh", script)
        for path in (Path(tmp), folder):
            path.chmod(0o755)
        script.chmod(0o644)
        result = subprocess.run(
            [*_as_unprivileged_user(), "bash", str(script)], capture_output=True, text=True, timeout=60, cwd="/",
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SKIP: deploy smoke test: needs root")


@pytest.mark.slow  # starts a process
@pytest.mark.parametrize("argument", ["--online", "scheduler", "-x"])
def test_build_script_refuses_an_unknown_argument(argument: str) -> None:
    result = subprocess.run(["bash", str(SCRIPTS / "build-images.sh"), argument],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"unknown argument {argument}" in result.stderr


@pytest.mark.slow  # starts a process
def test_podman_variant_command_writes_the_init_pod_the_rest_and_the_volumes(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    init, volumes = tmp_path / "init.yaml", tmp_path / "volumes.txt"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "podman_variant.py"), "--workdir", str(tmp_path), "--grpc-port", "1",
         "--metrics-port", "2", "--health-port", "3", "--site", f"site-1={tmp_path}", "--site", f"site-2={tmp_path}",
         "--init-out", str(init), "--volumes-out", str(volumes)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    played = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout)]
    first = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(init.read_text())]
    assert first == [("ConfigMap", "fedsegnet-federation"), ("Pod", "fedsegnet-aggregator-initial-model")]
    assert played == [("ConfigMap", "fedsegnet-federation"), ("Deployment", "fedsegnet-aggregator"),
                      ("Pod", "fedsegnet-site-1"), ("Pod", "fedsegnet-site-2")]
    # One volume per emptyDir (named after its pod, so pods never share one) and per ConfigMap.
    assert volumes.read_text().split() == [
        "fedsegnet-aggregator-tmp", "fedsegnet-aggregator-tmp-init", "fedsegnet-federation",
        "fedsegnet-site-1-tmp", "fedsegnet-site-2-tmp",
    ]


@pytest.mark.slow  # starts a process
def test_podman_variant_refuses_a_site_without_its_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "podman_variant.py"), "--workdir", str(tmp_path), "--grpc-port", "1",
         "--metrics-port", "2", "--health-port", "3", "--site", "site-1", "--init-out", str(tmp_path / "i.yaml")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--site expects NAME=DATA_DIR, got 'site-1'" in result.stderr


@pytest.fixture(scope="module")
def smoke_checks() -> ModuleType:
    sys.path.insert(0, str(SCRIPTS))
    try:
        import smoke_checks
    finally:
        sys.path.pop(0)
    return smoke_checks


@pytest.fixture
def plaintext_aggregator(tmp_path: Path) -> Iterator[RunningServer]:
    """A plaintext aggregator on port 0 with a health-only port beside it."""
    initial = tmp_path / "initial.frames"
    codec.save_tensors(initial, [("w", np.zeros((2, 3), dtype=np.float32))])
    config = parse_federation_config({"federation": {"id": "t", "sites": ["a", "b"]}})
    running = serve(Aggregator(Store(tmp_path / "store"), config, initial_model=initial), "127.0.0.1:0",
                    health_listen="127.0.0.1:0")
    yield running
    running.stop(grace=None)


@pytest.mark.parametrize("port,expected", [("health", 0), ("main", 1)])
def test_smoke_check_health_only_passes_only_a_port_without_the_aggregator(
    smoke_checks: ModuleType, plaintext_aggregator: RunningServer, port: str, expected: int, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{plaintext_aggregator.health_port if port == 'health' else plaintext_aggregator.port}"

    serving = smoke_checks.main(["health", "--target", target, "--timeout", "10"])
    health_only = smoke_checks.main(["health-only", "--target", target])

    assert serving == 0
    assert health_only == expected
    assert ("UNIMPLEMENTED" if port == "health" else ": OK") in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FEDSEG_DEPLOY_SMOKE") != "1",
                    reason="set FEDSEG_DEPLOY_SMOKE=1 (CI runs scripts/deploy-smoke.sh directly)")
def test_deploy_smoke_end_to_end() -> None:
    result = subprocess.run(["bash", str(SCRIPTS / "deploy-smoke.sh")], capture_output=True, text=True,
                            timeout=1800, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "PASS: deploy smoke test" in output or "SKIP: deploy smoke test" in output, output[-6000:]
