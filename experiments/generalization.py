"""``fedseg experiment generalization``: trained on randomized sites, judged on a real person's scan.

The experiment's federated runs are ordinary methods of ``experiments/experiment.py``
(centralized, dense FedAvg, FedSegNet) on ``configs/generalization.toml``; this module adds what
the other experiments lack: each method's final model is scored on the installed real scans
(``experiments/realscan.py``: brain-mask, CSF, GM and WM Dice at the scan's native 1 mm grid
against a classical 3-class intensity reference), with a PNG per model and scan, and
``summary.json`` names the final models and the federation configuration, so that
``fedseg segment --model PATH --config PATH`` can be run on them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping, TextIO

__all__ = ["finish_generalization", "SCALES"]

# Applied on top of configs/generalization.toml (which is the quick scale).
SCALES: dict[str, Mapping[str, Any]] = {
    "quick": {},
    # The grid SynthSeg-style training needs for grey matter (3 mm, whole brain), more cases and rounds,
    # and the synthseg augmentation recipe, meant for long training (in the quick scale's short runs
    # it slowed what the models learned of the real scan: results/README.md): hours on a CPU, minutes
    # on a GPU.
    "full": {
        "simulation": {"cases_per_site": [60, 60, 60], "test_cases": 6, "size": 64, "spacing_mm": 3.0},
        "federation": {"rounds": 20},
        "training": {"local_epochs": 6, "augmentation": "synthseg"},
        # 48^3 windows (144 mm) of the 64^3 volumes: not measured yet (it needs the GPU run).
        "model": {"img_size": [64, 64, 64], "spacing_mm": 3.0, "patch_size": [48, 48, 48]},
    },
}


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when below it (what a user types from there)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def finish_generalization(out: Path, runs: Mapping[str, Mapping[str, Any]], summary: dict[str, Any], *,
                          work_dir: Path, stream: TextIO) -> dict[str, Any]:
    """Score every finished method's final model on the real scans; extend table.md and summary.json."""
    from experiments import realscan
    from experiments.simulate import load_simulation_config

    scans = realscan.available_real_scans()
    models: dict[str, str] = {}
    config_path: str | None = None
    real: dict[str, dict[str, dict[str, float]]] = {}
    for method, record in runs.items():
        final = record.get("final_model")
        if not final:
            continue
        model_path = Path(final)
        sim_toml = model_path.parent.parent / "sim.toml"
        federation_toml = model_path.parent.parent / "federation.toml"
        sim, federation, _ = load_simulation_config(sim_toml)
        # summary.json names a model by its method's family (centralized, fedavg, fedsegnet), whichever
        # variant of it the experiment runs: `fedsegnet_short` -> "fedsegnet".
        tag = method.split("_")[0]
        models[tag] = _relative(model_path)
        config_path = _relative(federation_toml)
        if not scans:
            continue
        scored = record.get("real_scans") or {}
        if all(s.name in scored for s in scans):
            # fedseg simulate scored its final model already; its figures are in the run's folder.
            real[method] = {s.name: scored[s.name] for s in scans}
            for s in scans:
                figure = model_path.parent.parent / "real-scans" / f"final-{s.name}.png"
                if figure.is_file():
                    shutil.copyfile(figure, out / f"{tag}-{s.name}.png")
        else:
            net = realscan.load_federation_model(model_path, federation)
            real[method] = realscan.evaluate_on_real_scans(net, spacing_mm=sim.spacing_mm,
                                                           size=federation.model.img_size, figure_dir=out, tag=tag,
                                                           scans=scans, roi_size=federation.model.patch_size or None)
        stream.write(f"{method}: {realscan.summary_line(real[method])}\n")
        summary["methods"][method]["real_scans"] = real[method]
        summary["methods"][method]["spacing_mm"] = sim.spacing_mm
    summary["models"] = models
    summary["config"] = config_path
    summary["real_scans"] = [{"name": s.name, "path": str(s.path), "origin": s.origin, "licence": s.licence}
                             for s in scans]
    if not scans:
        summary["real_scans_note"] = realscan.missing_scan_hint()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = (out / "table.md").read_text()
    if real:
        lines = ["", "### Real scans (native 1 mm grid; reference: 3-class Gaussian mixture inside the brain mask)", "",
                 "| method | scan | brain-mask Dice | CSF Dice | GM Dice | WM Dice | GM/WM mean | held-out Dice |",
                 "|---|---|---:|---:|---:|---:|---:|---:|"]
        for method, by_scan in real.items():
            for scan, sc in by_scan.items():
                lines.append(f"| {summary['methods'][method]['label']} | {scan} | {sc['brain']:.4f} | {sc['CSF']:.4f} | "
                             f"{sc['GM']:.4f} | {sc['WM']:.4f} | {sc['GM_WM_mean']:.4f} | "
                             f"{summary['methods'][method]['dice']:.4f} |")
        table += "\n".join(lines) + "\n"
    else:
        table += f"\nReal scans: {realscan.missing_scan_hint()}\n"
    (out / "table.md").write_text(table)
    stream.write(table + "\n")
    return summary
