"""``fedseg experiment generalization``: its configuration, scales, and the real-scan part of its summary."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from experiments import realscan
from experiments.experiment import EXPERIMENTS, method_config, results_tag, run_experiment
from experiments.generalization import finish_generalization
from experiments.simulate import SimulationSettings, dump_toml, load_simulation_config, write_initial_model


FEDSEGNET = EXPERIMENTS["generalization"][-1]


def _base() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((Path(__file__).parents[2] / "experiments/configs/generalization.toml").read_text())


@pytest.mark.parametrize("method", EXPERIMENTS["generalization"])
def test_every_method_trains_on_randomized_whole_brain_sites(method: str, tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(dump_toml(method_config(_base(), method, "quick", "generalization")))
    sim, federation, _ = load_simulation_config(path)
    assert sim.generator == "synth" and sim.size * sim.spacing_mm >= 180
    assert list(federation.model.img_size) == [sim.size] * 3
    # Every method (centralized too) trains on and predicts by the same windows.
    assert federation.model.patch_size == (32, 32, 32)


def test_the_full_scale_is_the_3mm_grid_and_keeps_its_own_results_folder(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(dump_toml(method_config(_base(), FEDSEGNET, "full", "generalization")))
    sim, federation, _ = load_simulation_config(path)
    assert (sim.size, sim.spacing_mm, list(federation.model.img_size)) == (64, 3.0, [64, 64, 64])
    assert federation.model.patch_size == (48, 48, 48)
    # Long training augments with geometry and a contrast per draw; the short quick runs redraw only the
    # contrast of half the draws (their sites each hold one contrast; without it the global model swings).
    assert federation.training.augmentation == "synthseg"
    quick = tmp_path / "quick.toml"
    quick.write_text(dump_toml(method_config(_base(), FEDSEGNET, "quick", "generalization")))
    assert load_simulation_config(quick)[1].training.augmentation == "contrast"
    assert load_simulation_config(quick)[1].warmup.start_budget > load_simulation_config(quick)[1].codec.byte_budget
    assert results_tag("generalization", "quick", None) == "generalization"
    assert results_tag("generalization", "full", None) == "generalization-full"


@pytest.mark.parametrize("name, scale", [("generalization", "paper"), ("table3", "quick")])
def test_scales_belong_to_their_experiments(name: str, scale: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no scale"):
        run_experiment(name, scale=scale, results_dir=tmp_path, work_dir=tmp_path, methods=[])


@pytest.mark.parametrize("kwargs, message", [
    (dict(generator="synth", task="brats"), "tissue cases only"),
    (dict(generator="other"), "simulation.generator must be one of"),
])
def test_the_simulation_refuses_a_generator_it_cannot_use(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimulationSettings(**kwargs)


@pytest.mark.slow  # scores a network on a scan and renders its figure
def test_the_summary_names_models_config_and_real_scan_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A small skull-stripped phantom stands in for the installed scans (a real file, a real network).
    shape = (30, 30, 30)
    r = np.sqrt(((np.indices(shape) - 14.5) ** 2).sum(axis=0))
    image = np.select([r < 5, r < 8, r < 11], [110.0, 70.0, 30.0], 0.0).astype(np.float32)
    image += np.where(image > 0, np.random.default_rng(0).normal(0, 3, shape), 0).astype(np.float32)
    scan = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([4.0, 4.0, 4.0, 1.0])), str(scan))
    monkeypatch.setattr(realscan, "DEFAULT_SCANS", ())
    monkeypatch.setenv("FEDSEG_REAL_SCANS", str(scan))

    config = method_config(_base(), FEDSEGNET, "quick", "generalization")
    config["simulation"]["size"] = 32
    config["model"]["img_size"] = [32, 32, 32]
    config["model"]["patch_size"] = [16, 16, 16]  # scored window by window, as the quick scale's 32^3 of 48^3
    run = tmp_path / "run"
    run.mkdir()
    (run / "sim.toml").write_text(dump_toml(config))
    _, federation, federation_toml = load_simulation_config(run / "sim.toml")
    (run / "federation.toml").write_text(federation_toml)
    model = write_initial_model(federation, run / "models" / "global-0002.frames")
    out = tmp_path / "results"
    out.mkdir()
    (out / "table.md").write_text("## generalization\n")
    summary = {"experiment": "generalization", "scale": "quick",
               "methods": {FEDSEGNET: {"label": "FedSegNet", "dice": 0.5}}}

    finish_generalization(out, {FEDSEGNET: {"final_model": str(model)}}, summary, work_dir=tmp_path,
                          stream=open(tmp_path / "log.txt", "w"))

    written = json.loads((out / "summary.json").read_text())
    assert written["models"] == {"fedsegnet": str(model)} and written["config"] == str(run / "federation.toml")
    scores = written["methods"][FEDSEGNET]["real_scans"]["phantom"]
    assert set(scores) == {"brain", "CSF", "GM", "WM", "GM_WM_mean"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert (out / "fedsegnet-phantom.png").is_file()
    assert "| FedSegNet | phantom |" in (out / "table.md").read_text()
