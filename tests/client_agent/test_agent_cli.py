"""``client-agent`` at its start: options, configuration files, and data refused before anything is sent.

Bad data must stop the agent with a message naming the folder or file and what was expected, a
non-zero exit, and no connection to the aggregator: the tests point it at a listening socket that
records whether anyone knocked.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from agent_federation import TINY_MODEL, Federation, federation_config
from client_agent.cli import OPTIONS, main, resolve_options

EXIT_BAD_INPUT, EXIT_REFUSED = 2, 3


@dataclasses.dataclass
class Outcome:
    code: int | None
    contacted: bool


def run_main(args: list[str], aggregator: str | None = None) -> Outcome:
    """``main(args)`` in a thread (no signal handlers on the test runner); with no ``aggregator``,
    a listening socket stands in for it and tells whether the agent connected."""
    listener = None
    if aggregator is None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        aggregator = f"127.0.0.1:{listener.getsockname()[1]}"
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.update(code=main([*args, "--aggregator", aggregator])), daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "client-agent kept running: bad input must stop it at once"
    contacted = False
    if listener is not None:
        try:
            listener.accept()[0].close()
            contacted = True
        except BlockingIOError:
            pass
        listener.close()
    return Outcome(result.get("code"), contacted)


def common_args(data: Path, tmp_path: Path, *extra: str, site: str = "site-a") -> list[str]:
    return ["--data", str(data), "--site", site, "--state-dir", str(tmp_path / "state"), "--device", "cpu",
            "--augment", "no", "--val-fraction", "0.34", *extra]


# ---------------------------------------------------------------------------------------------
# bad data, refused before contacting the aggregator


def empty_folder(site: Path, tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def images_without_labels(site: Path, tmp: Path) -> Path:
    shutil.copytree(site / "imagesTr", tmp / "nolabels" / "images")
    return tmp / "nolabels"


def paired(site: Path, tmp: Path, *, garbage: tuple[str, ...] = ()) -> Path:
    root = tmp / "paired"
    shutil.copytree(site / "imagesTr", root / "images")
    shutil.copytree(site / "labelsTr", root / "labels")
    for name in garbage:
        (root / "images" / name).write_bytes(b"this is not a NIfTI file")
    return root


def all_unreadable(site: Path, tmp: Path) -> Path:
    return paired(site, tmp, garbage=("site-1_000.nii.gz", "site-1_001.nii.gz", "site-1_002.nii.gz"))


def one_unreadable(site: Path, tmp: Path) -> Path:
    return paired(site, tmp, garbage=("site-1_001.nii.gz",))


def as_is(site: Path, tmp: Path) -> Path:
    return site


BAD_DATA = [
    pytest.param(empty_folder, (), ["no labelled NIfTI cases found in {data}", "accepted layouts"], id="empty-folder"),
    pytest.param(images_without_labels, (), ["{data}/images exists but its label folder {data}/labels does not"],
                 id="no-labels"),
    pytest.param(all_unreadable, (), ["no usable case in {data}", "{data}/images/site-1_000.nii.gz: not a readable NIfTI"],
                 id="unreadable-files"),
    pytest.param(one_unreadable, ("--on-bad-file", "fail"),
                 ["1 case(s) failed validation", "{data}/images/site-1_001.nii.gz: not a readable NIfTI"],
                 id="one-unreadable-file-with-fail"),
    pytest.param(as_is, ("--num-classes", "2"),
                 ["no usable case in {data}", "{data}/labelsTr/site-1_000.nii.gz: label values [2, 3]", "outside [0, 2)"],
                 id="more-classes-than-num-classes"),
]


@pytest.mark.parametrize(("make", "extra", "expected"), BAD_DATA)
def test_bad_data_fails_before_contacting_the_aggregator(
    make: Callable[[Path, Path], Path], extra: tuple[str, ...], expected: list[str],
    mni_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    data = make(mni_site, tmp_path)

    outcome = run_main(common_args(data, tmp_path, *extra))

    err = capsys.readouterr().err
    assert outcome == Outcome(EXIT_BAD_INPUT, contacted=False)
    assert "client-agent: bad data:" in err
    for text in expected:
        assert text.format(data=data) in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_forced_gpu_on_a_cpu_machine_fails_before_contacting(
    mni_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = common_args(mni_site, tmp_path)
    args[args.index("--device") + 1] = "cuda"

    outcome = run_main(args)

    assert outcome == Outcome(EXIT_BAD_INPUT, contacted=False)
    assert "--device cuda: device 'cuda' requested but CUDA is not available" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# checked again after Join, against the federation's model

THREE_CLASS_MODEL = dataclasses.replace(TINY_MODEL, out_channels=3)


@pytest.mark.parametrize(
    ("model", "extra", "site", "code", "expected"),
    [
        pytest.param(TINY_MODEL, ("--num-classes", "5"), "site-a", EXIT_BAD_INPUT,
                     "bad data: --num-classes is 5 but the federation's model predicts 4 classes", id="num-classes"),
        pytest.param(THREE_CLASS_MODEL, (), "site-a", EXIT_BAD_INPUT,
                     "label values [3] outside [0, 3)", id="labels-beyond-the-models-classes"),
        pytest.param(TINY_MODEL, (), "site-z", EXIT_REFUSED,
                     "the aggregator refused this site: PERMISSION_DENIED: site 'site-z' is not in this federation",
                     id="unknown-site"),
    ],
)
def test_data_or_site_that_does_not_fit_the_federation_stops_after_join(
    model: Any, extra: tuple[str, ...], site: str, code: int, expected: str,
    mni_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    with Federation(tmp_path, federation_config(model=model)) as fed:
        outcome = run_main(common_args(mni_site, tmp_path, *extra, site=site), aggregator=fed.target)
        status = fed.status()

    assert outcome.code == code
    assert expected in capsys.readouterr().err
    assert status.submissions_total == 0 and status.bytes_out == 0, "nothing may be downloaded or sent"


# ---------------------------------------------------------------------------------------------
# options

REQUIRED = ["--data", "d", "--aggregator", "host:1", "--site", "s"]


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        resolve_options(["--help"], environ={})

    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for option in OPTIONS:
        assert f"--{option.name}" in out
        assert option.env in out
    assert "--config" in out and "YAML" in out and "Exit status" in out


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--max-round", "1"], {}, "unknown option --max-round (did you mean --max-rounds?); allowed: --config, --data"),
        (["stray"], {}, "unexpected argument 'stray'"),
        (["--max-rounds", "-1"], {}, "--max-rounds: expected an integer >= 0, got -1"),
        (["--num-classes", "1"], {}, "--num-classes: expected an integer >= 2, got 1"),
        (["--val-fraction", "1.5"], {}, "--val-fraction: expected a number in (0, 1), got '1.5'"),
        (["--amp", "maybe"], {}, "--amp: expected yes or no, got 'maybe'"),
        (["--device", "gpu"], {}, "--device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        (["--rpc-timeout", "0"], {}, "--rpc-timeout: expected a number of seconds > 0, got '0'"),
        (["--log-format", "xml"], {}, "--log-format: 'xml' is not one of ['text', 'json']"),
        (["--label-map", "{1: 2"], {}, "--label-map: not a JSON object"),
        (["--tls-cert", "site.crt"], {}, "mutual TLS needs --tls-cert, --tls-key and --tls-ca; missing --tls-key, --tls-ca"),
        ([], {"FEDSEG_NUM_WORKERS": "two"}, "--num-workers from FEDSEG_NUM_WORKERS: expected an integer >= 0, got 'two'"),
    ],
)
def test_invalid_option_fails_at_start_naming_it(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        resolve_options([*REQUIRED, *argv], environ=environ)

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_required_options_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        resolve_options(["--site", "s"], environ={})

    assert "missing required option(s): --data, --aggregator" in capsys.readouterr().err


TOML = """
data = "site-data"
aggregator = "agg.example:50051"
site = "site-a"
max-rounds = 4
amp = false
val_fraction = 0.25
label_map = { 4 = 3 }
"""
YAML = """
data: site-data
aggregator: agg.example:50051
site: site-a
max-rounds: 4
amp: no
val_fraction: 0.25
label_map: {4: 3}
"""


@pytest.mark.parametrize(("name", "text"), [("agent.toml", TOML), ("agent.yaml", YAML)])
def test_config_file_in_toml_or_yaml(name: str, text: str, tmp_path: Path) -> None:
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")  # YAML configuration is optional (PyYAML)
    path = tmp_path / name
    path.write_text(text)

    values = resolve_options(["--config", str(path)], environ={})

    assert values["data"] == str(tmp_path / "site-data"), "relative paths are taken from the file's folder"
    assert (values["aggregator"], values["site"], values["max_rounds"]) == ("agg.example:50051", "site-a", 4)
    assert (values["amp"], values["val_fraction"], values["label_map"]) == (False, 0.25, {"4": 3})
    assert (values["augment"], values["device"], values["log_format"]) == (True, "auto", "text")  # defaults


def test_command_line_beats_environment_beats_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(TOML)

    values = resolve_options(["--config", str(path), "--max-rounds", "7"],
                             environ={"FEDSEG_MAX_ROUNDS": "5", "FEDSEG_SITE": "site-env"})

    assert (values["max_rounds"], values["site"]) == (7, "site-env")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("agent.toml", 'site = "a"\nbatch = 3\n', "unknown option(s) ['batch']; allowed: data, aggregator, site"),
        ("agent.yaml", "- just\n- a list\n", "must hold a table of options, got list"),
        ("agent.toml", "site = \n", "not valid TOML"),
        ("agent.yaml", "site: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_file_is_refused_naming_the_file(
    name: str, text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    path = tmp_path / name
    path.write_text(text)

    with pytest.raises(SystemExit):
        resolve_options(["--config", str(path), *REQUIRED], environ={})

    err = capsys.readouterr().err
    assert f"--config {path}: " in err and message in err
