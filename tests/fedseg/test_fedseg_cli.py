"""The ``fedseg`` dispatcher: lazy command modules; operator commands without the training stack.

The no-torch tests run ``python -m fedseg`` in a subprocess whose import system refuses torch,
MONAI, nibabel and scipy (a ``sys.meta_path`` finder that raises ImportError for them), which is
what an environment with only ``pip install fedsegnet`` (the aggregator's) looks like.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedseg.cli import COMMANDS, main
from support import federation_toml

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "monai", "nibabel", "scipy")

# Runs fedseg's main with the blocker installed, then prints which project packages got imported.
WRAPPER = f"""
import json, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
from fedseg.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & {{"client_agent", "experiments", "model", *{BLOCKED!r}}})
print("LOADED " + json.dumps(loaded))
sys.exit(code)
"""

TINY_FEDERATION = federation_toml(federation_id="cli", out_channels=2, channels=(4, 8))


def fedseg_without_torch(*args: str, cwd: Path) -> tuple[int, str, str, list[str]]:
    """Run ``fedseg ARGS`` with torch, MONAI, nibabel and scipy unimportable: (exit code, stdout, stderr, loaded)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    lines = proc.stdout.splitlines()
    loaded = json.loads(lines[-1].removeprefix("LOADED ")) if lines and lines[-1].startswith("LOADED ") else []
    return proc.returncode, "\n".join(lines[:-1]), proc.stderr, loaded


@pytest.mark.slow
def test_the_blocker_really_blocks_torch(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = WRAPPER.split("from fedseg.cli import main")[0] + "import torch\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)

    assert proc.returncode != 0 and "No module named 'torch' (blocked)" in proc.stderr


@pytest.mark.slow
def test_help_lists_every_command_without_importing_any(tmp_path: Path) -> None:
    code, out, err, loaded = fedseg_without_torch("--help", cwd=tmp_path)

    assert code == 0, err
    for name in COMMANDS:
        assert name in out
    assert loaded == []


@pytest.mark.slow
def test_certs_make_a_pki_without_the_training_stack(tmp_path: Path) -> None:
    for args in (["init"], ["server", "--dns", "aggregator.svc", "--ip", "127.0.0.1"], ["site", "site-1"],
                 ["revoke", "site-1", "--serial-only"], ["revoke", "site-2"]):
        code, out, err, loaded = fedseg_without_torch("certs", *args, "--dir", "pki", cwd=tmp_path)
        assert code == 0, f"fedseg certs {args}: {err}"
        assert loaded == [], f"fedseg certs {args} imported {loaded}"

    pki = tmp_path / "pki"
    for path in ("ca.crt", "ca.key", "server/aggregator.crt", "server/aggregator.key", "sites/site-1.crt",
                 "sites/site-1.key"):
        assert (pki / path).is_file(), path
    revoked = (pki / "revoked.txt").read_text()
    assert "site-2" in revoked and "serial" in revoked


@pytest.mark.slow
def test_certs_refuse_a_bad_site_name_in_one_line(tmp_path: Path) -> None:
    fedseg_without_torch("certs", "init", "--dir", "pki", cwd=tmp_path)

    code, _, err, _ = fedseg_without_torch("certs", "site", "../x", "--dir", "pki", cwd=tmp_path)

    assert code == 2
    assert err.startswith("fedseg certs: ") and "'../x' is not valid" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_init_model_without_torch_names_the_extra_to_install(tmp_path: Path) -> None:
    (tmp_path / "federation.toml").write_text(TINY_FEDERATION)

    code, out, err, _ = fedseg_without_torch("init-model", "--config", "federation.toml", "--out", "init.frames",
                                             cwd=tmp_path)

    assert code == 2
    assert err.strip().splitlines() == [err.strip()], err  # one line, no traceback
    assert err.startswith("fedseg init-model: ") and "torch is not installed" in err
    assert "pip install 'fedsegnet[client]'" in err
    assert not (tmp_path / "init.frames").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command, extra", [("train", "client"), ("segment", "client"), ("make-data", "experiments")])
def test_a_command_that_needs_an_extra_says_which(tmp_path: Path, command: str, extra: str) -> None:
    code, _, err, _ = fedseg_without_torch(command, "--help", cwd=tmp_path)

    assert code == 2
    line = err.strip()
    assert line.splitlines() == [line], err  # one line, no traceback
    assert line.startswith(f"fedseg {command}: needs the '{extra}' extra (")
    assert line.endswith(f" is not installed): pip install 'fedsegnet[{extra}]'")
    assert line.split("extra (", 1)[1].split(" ", 1)[0] in BLOCKED


def test_init_model_writes_the_model_the_aggregator_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import codec

    (tmp_path / "federation.toml").write_text(TINY_FEDERATION)

    assert main(["init-model", "--config", str(tmp_path / "federation.toml"), "--out", str(tmp_path / "m.frames")]) == 0

    tensors = codec.load_tensors(tmp_path / "m.frames")
    assert tensors and all(a.dtype.kind == "f" for a in tensors.values())
    assert f"wrote {tmp_path / 'm.frames'}" in capsys.readouterr().out


def test_an_unknown_command_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["certify"])

    assert exc.value.code == 2
    assert "invalid choice: 'certify'" in capsys.readouterr().err


def test_every_command_module_has_the_interface() -> None:
    from fedseg.cli import load_command

    for name in COMMANDS:
        module = load_command(name)
        assert callable(module.add_arguments) and callable(module.run), name
