"""``fedseg experiment NAME``: the seed paper's comparisons, run with the real services.

Each method is the base simulation configuration plus a few overrides; every method of an
experiment uses the same data, seeds and rounds. A method's run is saved as
``results/NAME/runs/METHOD.json`` together with the hash of its configuration, so an interrupted
experiment resumes where it stopped and a finished one is only re-tabulated. Outputs:
``results/NAME/table.md``, ``summary.json`` and PNG plots (Dice and loss per round per method,
per-site Dice, bytes per round).

Scales: ``demo`` (the base config: 3 sites, a few rounds, 2 mm; minutes on a CPU) and ``paper``
(5 sites, 50 rounds, 3 local epochs, 96³: needs a GPU and hours).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, TextIO

from experiments.simulate import DEFAULT_CONFIG, RoundRow, dump_toml, run_simulation

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMPRESSED = {"top_k_fraction": 0.01, "quantization": "int8", "zstd_level": 3}
TOP10 = {"top_k_fraction": 0.1, "quantization": "int8", "zstd_level": 3}
DENSE = {"top_k_fraction": 1.0, "quantization": "fp32", "zstd_level": 3}


@dataclass(frozen=True)
class Method:
    label: str
    overrides: Mapping[str, Any]


METHODS: dict[str, Method] = {
    "centralized": Method("Centralized (pooled data, Transformer U-Net)", {"simulation": {"pool_sites": True}}),
    "fedavg_dense": Method("FedAvg, dense fp32", {"aggregation": {"strategy": "fedavg"}, "codec": DENSE}),
    "fedavg_compressed": Method("FedAvg, top-1% int8", {"aggregation": {"strategy": "fedavg"}, "codec": COMPRESSED}),
    "fedavg_top10": Method("FedAvg, top-10% int8", {"aggregation": {"strategy": "fedavg"}, "codec": TOP10}),
    "unet_federated": Method(
        "Federated U-Net (MONAI UNet, FedAvg, dense)",
        {"model": {"architecture": "unet", "options": {"channels": [8, 16, 32, 64], "strides": [2, 2, 2],
                                                        "num_res_units": 1,
                                                        "drop": ["num_transformer_layers", "num_heads"]}},
         "aggregation": {"strategy": "fedavg"}, "codec": DENSE},
    ),
    "fedsegnet": Method("FedSegNet (Transformer U-Net + AAM + top-1% int8)",
                        {"aggregation": {"strategy": "aam"}, "codec": COMPRESSED}),
    "fedsegnet_no_transformer": Method(
        "FedSegNet without the transformer",
        {"model": {"architecture": "cnn_unet", "options": {"drop": ["num_transformer_layers", "num_heads"]}},
         "aggregation": {"strategy": "aam"}, "codec": COMPRESSED},
    ),
    "fedsegnet_no_aam": Method("FedSegNet without AAM (FedAvg)",
                               {"aggregation": {"strategy": "fedavg"}, "codec": COMPRESSED}),
    # Dense updates, so that the comparison isolates the aggregation rule.
    "faulty_fedavg": Method("Faulty site (noisy labels), FedAvg",
                            {"simulation": {"faulty_site": 3}, "aggregation": {"strategy": "fedavg"}, "codec": DENSE}),
    "faulty_aam": Method("Faulty site (noisy labels), AAM",
                         {"simulation": {"faulty_site": 3}, "aggregation": {"strategy": "aam"}, "codec": DENSE}),
}

EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "table3": ("centralized", "unet_federated", "fedavg_dense", "fedsegnet"),
    "table4": ("fedavg_dense", "fedavg_compressed", "fedsegnet"),
    "table5": ("fedsegnet", "fedsegnet_no_transformer", "fedsegnet_no_aam"),
    "faulty-site": ("faulty_fedavg", "faulty_aam"),
    "compression": ("fedavg_dense", "fedavg_top10", "fedavg_compressed"),
}

SCALES: dict[str, Mapping[str, Any]] = {
    "demo": {},
    "paper": {
        "simulation": {"sites": 5, "cases_per_site": [12, 8, 16, 10, 6], "test_cases": 8, "size": 96},
        "federation": {"rounds": 50, "min_clients": 5, "max_clients": 5,
                       "sites": ["site-1", "site-2", "site-3", "site-4", "site-5"]},
        "training": {"local_epochs": 3, "learning_rate": 1e-4},
        "model": {"img_size": [96, 96, 96], "options": {"channels": [16, 32, 64, 128], "num_transformer_layers": 2,
                                                          "num_heads": 4}},
    },
}


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge TOML tables; ``{"drop": [keys]}`` inside a table removes those keys."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if key == "drop":
            for gone in value:
                out.pop(gone, None)
        elif isinstance(value, Mapping):
            out[key] = merge(out.get(key, {}), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def method_config(base: Mapping[str, Any], method: str, scale: str) -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return merge(merge(base, SCALES[scale]), METHODS[method].overrides)


def run_experiment(
    name: str,
    *,
    results_dir: Path = Path("results"),
    work_dir: Path = Path("runs/experiments"),
    base_config: str | Path | None = None,
    scale: str = "demo",
    force: bool = False,
    stream: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Run (or resume) every method of an experiment and write its table, summary and plots."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
    text = (Path(base_config).read_text() if base_config
            else resources.files("experiments.configs").joinpath(DEFAULT_CONFIG).read_text())
    base = tomllib.loads(text)
    # Another base configuration is another experiment: keep its results apart.
    tag = name if base_config is None else f"{name}-{Path(base_config).stem}"
    out = results_dir / tag
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    for method in EXPERIMENTS[name]:
        config = method_config(base, method, scale)
        config_text = dump_toml(config)
        digest = hashlib.sha256(config_text.encode()).hexdigest()[:16]
        saved = out / "runs" / f"{method}.json"
        if saved.exists() and not force:
            previous = json.loads(saved.read_text())
            if previous.get("config_digest") == digest:
                stream.write(f"[{name}] {method}: reusing {saved}\n")
                runs[method] = previous
                continue
        stream.write(f"[{name}] {method}: {METHODS[method].label}\n")
        workdir = work_dir / scale / tag / method
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "sim.toml").write_text(config_text)
        started = time.monotonic()
        result = run_simulation(workdir / "sim.toml", workdir, stream=stream)
        record = {"method": method, "label": METHODS[method].label, "config_digest": digest,
                  "wall_seconds": time.monotonic() - started, **result.to_json()}
        saved.write_text(json.dumps(record, indent=1))
        runs[method] = record
    table = render_table(name, runs)
    (out / "table.md").write_text(table)
    summary = {m: summarize(r) for m, r in runs.items()}
    (out / "summary.json").write_text(json.dumps({"experiment": name, "scale": scale, "methods": summary}, indent=1))
    from experiments.plots import plot_runs

    plots = plot_runs({METHODS[m].label: rows_of(r) for m, r in runs.items()}, out)
    stream.write("\n" + table + "\n" + "plots: " + ", ".join(str(p) for p in plots) + "\n")
    return summary


def rows_of(record: Mapping[str, Any]) -> list[RoundRow]:
    fields = {f.name for f in dataclasses.fields(RoundRow)}
    return [RoundRow(**{k: v for k, v in row.items() if k in fields}) for row in record["rounds"]]


def summarize(record: Mapping[str, Any]) -> dict[str, Any]:
    rows = rows_of(record)
    last = rows[-1]
    up = sum(r.bytes_up for r in rows)
    dense = sum(r.dense_bytes_up for r in rows)
    summary: dict[str, Any] = {
        "label": record["label"],
        **{k: last.global_metrics[k] for k in ("dice", "iou", "hd95", "precision", "recall")},
        "rounds": len(rows),
        "mb_up_per_round": up / len(rows) / 1e6,
        "mb_up_total": up / 1e6,
        "mb_down_total": sum(r.bytes_down for r in rows) / 1e6,
        "ratio_vs_dense_fp32": dense / up if up else 0.0,
        "wall_seconds": record["wall_seconds"],
        "final_weights": last.weights,
    }
    return summary


def render_table(name: str, runs: Mapping[str, Mapping[str, Any]]) -> str:
    head = ("| method | Dice | IoU | HD95 mm | precision | recall | MB up/round | MB up total | × smaller than fp32 "
            "| wall s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for method, record in runs.items():
        s = summarize(record)
        lines.append(
            f"| {s['label']} | {s['dice']:.4f} | {s['iou']:.4f} | {s['hd95']:.2f} | {s['precision']:.4f} | "
            f"{s['recall']:.4f} | {s['mb_up_per_round']:.3f} | {s['mb_up_total']:.2f} | "
            f"{s['ratio_vs_dense_fp32']:.1f} | {s['wall_seconds']:.0f} |"
        )
    note = ""
    if name == "faulty-site":
        weights = {m: summarize(r)["final_weights"] for m, r in runs.items()}
        note = "\nLast round's aggregation weights: " + "; ".join(
            f"{METHODS[m].label}: " + ", ".join(f"{site} {w:.3f}" for site, w in sorted(ws.items()))
            for m, ws in weights.items()) + "\n"
    return f"## {name}\n\n" + head + "\n".join(lines) + "\n" + note
