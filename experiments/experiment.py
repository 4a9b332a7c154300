"""``fedseg experiment NAME``: the seed paper's comparisons, run with the real services.

Each method is the base simulation configuration plus a few overrides; every method of an
experiment uses the same data, seeds and rounds. A method's run is saved as
``results/NAME/runs/METHOD.json`` together with the hash of its configuration, so an interrupted
experiment resumes where it stopped and a finished one is only re-tabulated. Outputs:
``results/NAME/table.md``, ``summary.json`` and PNG plots (Dice and loss per round per method,
per-site Dice, bytes per round).

Scales: ``demo`` (the base config: 3 sites, a few rounds, 2 mm; minutes on a CPU) and ``paper``
(5 sites, 50 rounds, 3 local epochs, 96³: needs a GPU and hours). A long experiment runs in parts:
``methods`` picks which of its methods to run now (the table shows every method that has a
finished run), and ``max_seconds`` stops a method after the round that passes the limit, keeping
its store and site states so that the same command resumes it at the next round.

The ``brats`` experiment runs on the BraTS-like task (four modalities, labels 0/1/2/4) and adds
the BraTS regions (ET, TC, WT: Dice and HD95) to its table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from aggregator_service.config import read_config_tables
from codec import atomic_write_text
from experiments.simulate import DEFAULT_CONFIG, RoundRow, dump_toml, run_simulation
from protos.fedsegnet.v1.local_metrics import SEGMENTATION_METRIC_NAMES

COMPRESSED = {"top_k_fraction": 0.01, "quantization": "int8", "zstd_level": 3}
TOP10 = {"top_k_fraction": 0.1, "quantization": "int8", "zstd_level": 3}
DENSE = {"top_k_fraction": 1.0, "quantization": "fp32", "zstd_level": 3}
TOP2_INT4 = {"top_k_fraction": 0.02, "quantization": "int4", "zstd_level": 3}
# The top 1% of the whole update rather than of each tensor: an SGD update's energy sits in a few
# tensors, where per-tensor top-1% sends about a fifth of it (benchmarks/update_energy.py).
COMPRESSED_GLOBAL = {"top_k_fraction": 0.01, "top_k_scope": "global", "quantization": "int8", "zstd_level": 3}
GLOBAL_TOP2_INT4 = {"top_k_fraction": 0.02, "top_k_scope": "global", "quantization": "int4", "zstd_level": 3}
# FedSegNet's sites train with SGD: its round updates are sums of gradients, whose energy sits in
# few entries (the largest 1% hold 70-99% of it), where Adam moves every entry by about lr and the
# largest 1% hold 2-4% (benchmarks/update_energy.py on these data; results/README.md). The
# learning rate is SGD's own; at a constant 0.1 the global Dice swings by up to 0.3 between rounds
# late in a run (and dense FedAvg's alternates every round), so it anneals to 0.01 over the run.
SGD_LOCAL = {"optimizer": "sgd", "momentum": 0.9, "learning_rate": 0.1, "lr_schedule": "cosine",
             "final_learning_rate": 0.01}
# The compression experiment's techniques (docs/compression.md), each one switch over FedSegNet's
# configuration: DGC's momentum correction and masking at round granularity, local gradient
# clipping and a sparsity warm-up; the site's optimizer state kept across rounds; server momentum
# over the aggregated sparse update.
DGC_TRAINING = {**SGD_LOCAL, "momentum_correction": 0.5, "clip_norm": 5.0}
DGC_CODEC = {**COMPRESSED_GLOBAL, "warmup_rounds": 4, "warmup_start_fraction": 0.25}
KEEP_OPTIMIZER = {**SGD_LOCAL, "keep_optimizer_state": True}
SERVER_MOMENTUM = {"strategy": "aam", "server_momentum": 0.5}
# Byte budgets per upload aimed at 300x and 500x below the dense fp32 update of the compression
# experiment's model (2 181 968 bytes): k per tensor by energy share, so that the frames fit
# (codec/budget.py); zstd then only shrinks them.
BUDGET_300 = {"byte_budget": 7200, "quantization": "int8", "zstd_level": 3}
BUDGET_500 = {"byte_budget": 4300, "quantization": "int8", "zstd_level": 3}
# A short federation (the quick generalization experiment: 10 rounds) under the 300x budget lets
# ~1,800 entries a round through, too few for the model to move far from its initial weights; the
# byte-budget warm-up (docs/compression.md) sends a tenth of the dense fp32 update in round 1
# and falls to the budget by round 5, so only the first rounds cost more bytes.
BUDGET_300_WARMUP = {**BUDGET_300, "warmup_rounds": 4, "warmup_start_budget": 218_000}
# Ten rounds are too few for the 300x budget to carry what the sites learn: in the quick
# generalization experiment it left FedSegNet 0.04 GM/WM Dice below the same federation with a dense
# codec on the real scan, where 21,600 B (100x below fp32) after the same warm-up came within 0.002
# of it (results/README.md, "Generalization, sixth pass"). The generalization experiment uses it at
# both scales (10 and 20 rounds); the compression experiment's 50-round federations keep the 300x budget.
BUDGET_100_WARMUP = {"byte_budget": 21_600, "quantization": "int8", "zstd_level": 3, "warmup_rounds": 4,
                     "warmup_start_budget": 218_000}
# Half SGD_LOCAL's step for 60-step rounds: momentum kept, 0.05 annealed to 0.005 (one run each in
# the quick generalization experiment: at 0.1 its real-scan GM/WM ended 0.010 lower, its held-out
# Dice 0.008 higher; the real scan is what the experiment is for).
KEEP_OPTIMIZER_SHORT = {**KEEP_OPTIMIZER, "learning_rate": 0.05, "final_learning_rate": 0.005}
# The top 0.18% of EVERY tensor: global top-k (and an energy-proportional byte budget) send almost
# only the full-resolution layers' entries and leave the deep layers and the transformer at their
# initial values (results/README.md, "Compression"); per-tensor selection gives every tensor its share.
TENSOR_300 = {"top_k_fraction": 0.0018, "top_k_scope": "tensor", "quantization": "int8", "zstd_level": 3}
# Sparse Ternary Compression (Sattler et al. 2019): the global top 1%, sent as sign x mean magnitude.
STC = {"top_k_fraction": 0.01, "top_k_scope": "global", "quantization": "sign", "zstd_level": 3}
SCALED_FAULT = {"faulty_site": 3, "fault": "scaled_update", "update_scale": 10.0}
FLIPPED_FAULT = {"faulty_site": 3, "fault": "scaled_update", "update_scale": -5.0}


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
    # FedSegNet's default since the compression experiment (results/README.md, "Compression"): the
    # sites keep their SGD momentum across rounds and send a 7200-byte update (~300x below fp32 for
    # the demo's and the experiments' model), k per tensor by energy.
    "fedsegnet": Method("FedSegNet (Transformer U-Net + AAM + local SGD, momentum kept, 7200 B/update int8)",
                        {"aggregation": {"strategy": "aam"}, "codec": BUDGET_300, "training": KEEP_OPTIMIZER}),
    "fedsegnet_warmup": Method(
        "FedSegNet (Transformer U-Net + AAM + local SGD, momentum kept, 7200 B/update int8 after a "
        "byte-budget warm-up from 218 kB over 4 rounds)",
        {"aggregation": {"strategy": "aam"}, "codec": BUDGET_300_WARMUP, "training": KEEP_OPTIMIZER}),
    # The generalization experiment's FedSegNet (10 rounds of 60 steps): 100x budget after the warm-up.
    "fedsegnet_short": Method(
        "FedSegNet (Transformer U-Net + AAM + local SGD 0.05, momentum kept, 21,600 B/update int8 after a "
        "byte-budget warm-up from 218 kB over 4 rounds)",
        {"aggregation": {"strategy": "aam"}, "codec": BUDGET_100_WARMUP, "training": KEEP_OPTIMIZER_SHORT}),
    # FedSegNet until the compression experiment: global top-1% int8, a fresh optimizer every round.
    "fedsegnet_global1": Method("FedSegNet before: global top-1% int8, fresh SGD momentum every round",
                                {"aggregation": {"strategy": "aam"}, "codec": COMPRESSED_GLOBAL, "training": SGD_LOCAL}),
    "fedsegnet_tensor": Method("FedSegNet, per-tensor top-1% int8 (Transformer U-Net + AAM + local SGD)",
                               {"aggregation": {"strategy": "aam"}, "codec": COMPRESSED, "training": SGD_LOCAL}),
    "fedsegnet_top2_int4_global": Method(
        "FedSegNet, global top-2% int4 (Transformer U-Net + AAM + local SGD)",
        {"aggregation": {"strategy": "aam"}, "codec": GLOBAL_TOP2_INT4, "training": SGD_LOCAL}),
    "fedsegnet_adam": Method("FedSegNet with local Adam, per-tensor top-1% int8 (Transformer U-Net + AAM)",
                             {"aggregation": {"strategy": "aam"}, "codec": COMPRESSED}),
    "centralized_sgd": Method("Centralized (pooled data, Transformer U-Net), SGD",
                              {"simulation": {"pool_sites": True}, "training": SGD_LOCAL}),
    "fedavg_top2_int4": Method("FedAvg, top-2% int4", {"aggregation": {"strategy": "fedavg"}, "codec": TOP2_INT4}),
    # Measured before FedSegNet's sites trained with SGD (results/README.md, targets-long-30).
    "fedsegnet_top2_int4": Method("FedSegNet with local Adam, top-2% int4 (Transformer U-Net + AAM)",
                                  {"aggregation": {"strategy": "aam"}, "codec": TOP2_INT4}),
    # AAM without its quality factor (divergence only): the site with the best self-reported Dice
    # is not favoured, which matters when that site's data differ most from the others'.
    "fedsegnet_top2_int4_divergence_only": Method(
        "FedSegNet with local Adam, top-2% int4, AAM divergence only (quality_floor = 1)",
        {"aggregation": {"strategy": "aam", "aam": {"quality_floor": 1.0}}, "codec": TOP2_INT4}),
    "fedsegnet_no_transformer": Method(
        "FedSegNet without the transformer",
        {"model": {"architecture": "cnn_unet", "options": {"drop": ["num_transformer_layers", "num_heads"]}},
         "aggregation": {"strategy": "aam"}, "codec": COMPRESSED_GLOBAL, "training": SGD_LOCAL},
    ),
    "fedsegnet_dgc": Method(
        "FedSegNet + DGC (momentum correction 0.5 and masking, clipping 5, warm-up 25% -> 1% over 4 rounds)",
        {"aggregation": {"strategy": "aam"}, "codec": DGC_CODEC, "training": DGC_TRAINING}),
    "fedsegnet_optstate": Method(
        "FedSegNet + the sites' SGD momentum kept across rounds",
        {"aggregation": {"strategy": "aam"}, "codec": COMPRESSED_GLOBAL, "training": KEEP_OPTIMIZER}),
    "fedsegnet_optstate_servermom": Method(
        "FedSegNet + sites' SGD momentum kept + server momentum 0.5",
        {"aggregation": SERVER_MOMENTUM, "codec": COMPRESSED_GLOBAL, "training": KEEP_OPTIMIZER}),
    "fedsegnet_budget500": Method(
        "FedSegNet + sites' SGD momentum kept, byte budget 4300 B/update (int8)",
        {"aggregation": {"strategy": "aam"}, "codec": BUDGET_500, "training": KEEP_OPTIMIZER}),
    "fedsegnet_tensor300": Method(
        "FedSegNet with per-tensor top-0.18% int8 (every tensor its share)",
        {"aggregation": {"strategy": "aam"}, "codec": TENSOR_300, "training": SGD_LOCAL}),
    "fedsegnet_stc": Method(
        "FedSegNet with Sparse Ternary Compression (global top-1%, sign x mean; Sattler et al. 2019)",
        {"aggregation": {"strategy": "aam"}, "codec": STC, "training": SGD_LOCAL}),
    "fedsegnet_no_aam": Method("FedSegNet without AAM (FedAvg)",
                               {"aggregation": {"strategy": "fedavg"}, "codec": COMPRESSED_GLOBAL, "training": SGD_LOCAL}),
    # Dense updates, so that the comparison isolates the aggregation rule.
    "faulty_fedavg": Method("Faulty site (noisy labels), FedAvg",
                            {"simulation": {"faulty_site": 3}, "aggregation": {"strategy": "fedavg"}, "codec": DENSE}),
    "faulty_aam": Method("Faulty site (noisy labels), AAM",
                         {"simulation": {"faulty_site": 3}, "aggregation": {"strategy": "aam"}, "codec": DENSE}),
    # Site 3 holds the most cases, so FedAvg gives its (scaled) update the largest weight.
    "faulty_scaled_fedavg": Method("Faulty site (update x10), FedAvg",
                                   {"simulation": SCALED_FAULT, "aggregation": {"strategy": "fedavg"}, "codec": DENSE}),
    "faulty_scaled_aam": Method("Faulty site (update x10), AAM",
                                {"simulation": SCALED_FAULT, "aggregation": {"strategy": "aam"}, "codec": DENSE}),
    "faulty_flipped_fedavg": Method("Faulty site (update x-5), FedAvg",
                                    {"simulation": FLIPPED_FAULT, "aggregation": {"strategy": "fedavg"}, "codec": DENSE}),
    "faulty_flipped_aam": Method("Faulty site (update x-5), AAM",
                                 {"simulation": FLIPPED_FAULT, "aggregation": {"strategy": "aam"}, "codec": DENSE}),
}

EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "table3": ("centralized", "unet_federated", "fedavg_dense", "fedsegnet"),
    "table4": ("fedavg_dense", "fedavg_compressed", "fedsegnet"),
    "table5": ("fedsegnet", "fedsegnet_no_transformer", "fedsegnet_no_aam"),
    "faulty-site": ("faulty_fedavg", "faulty_aam", "faulty_scaled_fedavg", "faulty_scaled_aam",
                    "faulty_flipped_fedavg", "faulty_flipped_aam"),
    # Dense FedAvg against today's FedSegNet and each technique against its plateau (docs/compression.md).
    "compression": ("fedavg_dense", "fedsegnet_global1", "fedsegnet_dgc", "fedsegnet_optstate",
                    "fedsegnet_optstate_servermom", "fedsegnet", "fedsegnet_budget500", "fedsegnet_stc",
                    "fedsegnet_tensor300"),
    # The project's two numeric targets side by side: Dice against centralized (trained with either
    # optimizer: the better one is the bar), bytes against dense; fedsegnet_tensor and
    # fedsegnet_adam isolate what the codec's top-k scope and the local optimizer each add.
    "targets": ("centralized", "centralized_sgd", "fedavg_dense", "fedsegnet", "fedsegnet_top2_int4_global",
                "fedsegnet_tensor", "fedsegnet_adam"),
    "brats": ("centralized", "fedavg_dense", "fedsegnet"),
    # Trained on domain-randomized sites, scored on the held-out set and on real scans
    # (experiments/generalization.py; its own base config and scales quick/full). FedSegNet with the
    # byte-budget warm-up and the 100x budget: the quick scale is 10 rounds.
    "generalization": ("centralized", "fedavg_dense", "fedsegnet_short"),
}
# Experiments with their own base configuration (instead of the built-in demo.toml) and scales.
EXPERIMENT_CONFIGS: dict[str, str] = {"generalization": "generalization.toml", "compression": "compression.toml"}

# What an experiment changes in the base configuration for all of its methods (before the methods'
# own overrides): the BraTS-like task has four modalities; labels 0/1/2/4 map to 4 classes.
EXPERIMENT_OVERRIDES: dict[str, Mapping[str, Any]] = {
    # The lesion task has no randomized generator: scanner-profile sites at 2 mm, as it was measured.
    "brats": {"simulation": {"task": "brats", "generator": "profile", "spacing_mm": 2.0},
              "model": {"in_channels": 4, "out_channels": 4}},
}
REGIONS = ("ET", "TC", "WT")

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


def _experiment_scales() -> dict[str, Mapping[str, Any]]:
    from experiments.generalization import SCALES as GENERALIZATION_SCALES

    return dict(GENERALIZATION_SCALES)


SCALES.update(_experiment_scales())
# Which scales each experiment takes; those not listed take demo and paper.
EXPERIMENT_SCALES: dict[str, tuple[str, ...]] = {"generalization": ("quick", "full")}


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


def method_config(base: Mapping[str, Any], method: str, scale: str, experiment: str | None = None) -> dict[str, Any]:
    """The simulation configuration of one method: base, then scale, experiment and method overrides."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    config = merge(base, SCALES[scale])
    config = merge(config, EXPERIMENT_OVERRIDES.get(experiment or "", {}))
    return merge(config, METHODS[method].overrides)


def results_tag(name: str, scale: str, base_config: str | Path | None) -> str:
    """``results/<tag>``: other scales and base configurations are other experiments, kept apart."""
    default_scale = EXPERIMENT_SCALES.get(name, ("demo",))[0]
    tag = name if scale == default_scale else f"{name}-{scale}"
    return tag if base_config is None else f"{tag}-{Path(base_config).stem}"


def run_experiment(
    name: str,
    *,
    results_dir: Path = Path("results"),
    work_dir: Path = Path("runs/experiments"),
    base_config: str | Path | None = None,
    scale: str = "demo",
    force: bool = False,
    methods: Sequence[str] | None = None,
    max_seconds: float | None = None,
    stream: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Run (or resume) the methods of an experiment and write its table, summary and plots.

    ``methods``: run only these (default: all; empty: none, only tabulate); the table holds every method of the experiment
    with a finished run of the current configuration. ``max_seconds``: stop a method after the
    round that passes this limit; the next call resumes it (see the module's docstring).
    Returns the summaries of the methods in the table.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    allowed_scales = EXPERIMENT_SCALES.get(name, ("demo", "paper"))
    if scale == "demo" and name in EXPERIMENT_SCALES:
        scale = allowed_scales[0]
    if scale not in allowed_scales:
        raise ValueError(f"experiment {name!r} has no scale {scale!r}; its scales: {', '.join(allowed_scales)}")
    selected = tuple(EXPERIMENTS[name] if methods is None else methods)
    unknown = [m for m in selected if m not in EXPERIMENTS[name]]
    if unknown:
        raise ValueError(f"experiment {name!r} has no method(s) {unknown}; its methods: {', '.join(EXPERIMENTS[name])}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    text = (Path(base_config).read_text() if base_config
            else resources.files("experiments.configs").joinpath(EXPERIMENT_CONFIGS.get(name, DEFAULT_CONFIG)).read_text())
    base = read_config_tables(text=text, source=str(base_config or EXPERIMENT_CONFIGS.get(name, DEFAULT_CONFIG)))
    tag = results_tag(name, scale, base_config)
    out = results_dir / tag
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started_all = time.monotonic()
    runs: dict[str, dict[str, Any]] = {}
    for method in EXPERIMENTS[name]:
        config = method_config(base, method, scale, name)
        config_text = dump_toml(config)
        digest = hashlib.sha256(config_text.encode()).hexdigest()[:16]
        saved = out / "runs" / f"{method}.json"
        if saved.exists() and not force:
            previous = json.loads(saved.read_text())
            if previous.get("config_digest") == digest:
                stream.write(f"[{tag}] {method}: reusing {saved}\n")
                runs[method] = previous
                continue
        if method not in selected:
            continue
        left = None if max_seconds is None else max_seconds - (time.monotonic() - started_all)
        if left is not None and left <= 0:
            stream.write(f"[{tag}] {method}: not started, the time limit is spent; run the same command again\n")
            continue
        record = _run_method(name, method, tag, config_text, digest, work_dir / scale / tag / method,
                             out / "runs", force=force, max_seconds=left, stream=stream)
        if record is not None:
            runs[method] = record
    if not runs:
        stream.write(f"[{tag}] no finished method yet; nothing to tabulate\n")
        return {}
    table = render_table(name, runs)
    summary = {m: summarize(r) for m, r in runs.items()}
    extra_plots: list[Path] = []
    if name == "compression":
        from experiments.compression import (
            compression_fields,
            plot_coverage,
            plot_diagnostics,
            read_coverage,
            read_diagnostics,
            render_compression_table,
        )

        for m, r in runs.items():
            method_dir = work_dir / scale / tag / m
            # Runs recorded before these were kept, whose work folder is still here, get them now.
            if not r.get("diagnostics") and (method_dir / "store").is_dir():
                r["diagnostics"] = read_diagnostics(method_dir / "store")
            if not r.get("coverage") and (method_dir / "states").is_dir():
                r["coverage"] = read_coverage(method_dir / "states")
            if r.get("coverage") or r.get("diagnostics"):
                atomic_write_text(out / "runs" / f"{m}.json", json.dumps(r, indent=1))
            summary[m].update(compression_fields(r, summary[m]["ratio_vs_dense_fp32"]))
        table += "\n" + render_compression_table(summary)
        extra_plots = plot_diagnostics(runs, out)
        sizes = {n: int(v) for n, v in _tensor_sizes(runs).items()}
        coverage_plot = plot_coverage(runs, sizes, out)
        extra_plots += [coverage_plot] if coverage_plot else []
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "summary.json", json.dumps({"experiment": name, "scale": scale, "methods": summary}, indent=1))
    from experiments.plots import plot_runs

    plots = plot_runs({METHODS[m].label: rows_of(r) for m, r in runs.items()}, out) + extra_plots
    stream.write("\n" + table + "\n" + "plots: " + ", ".join(str(p) for p in plots) + "\n")
    if name == "generalization":
        from experiments.generalization import finish_generalization

        full = finish_generalization(out, runs, {"experiment": name, "scale": scale, "methods": summary},
                                     work_dir=work_dir, stream=stream)
        return dict(full["methods"])
    return summary


def _run_method(
    name: str, method: str, tag: str, config_text: str, digest: str, workdir: Path, runs_dir: Path, *,
    force: bool, max_seconds: float | None, stream: TextIO,
) -> dict[str, Any] | None:
    """Run one method, or resume its interrupted run; returns its record once it has finished."""
    saved = runs_dir / f"{method}.json"
    partial_path = runs_dir / f"{method}.partial.json"
    resume_rows: list[RoundRow] = []
    resuming = False
    wall_before = 0.0
    if partial_path.exists() and not force and (workdir / "store").is_dir():
        partial = json.loads(partial_path.read_text())
        if partial.get("config_digest") == digest:
            # Rows not in the record (e.g. an interrupted process never wrote them) are read back
            # from the aggregator's store and the saved global models when the run resumes.
            resuming, resume_rows = True, rows_of(partial)
            wall_before = float(partial["wall_seconds"])
            stream.write(f"[{tag}] {method}: resuming after round {len(resume_rows)}\n")
    if not resuming:
        stream.write(f"[{tag}] {method}: {METHODS[method].label}\n")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sim.toml").write_text(config_text)
    federation = read_config_tables(text=config_text, source=str(workdir / "sim.toml")).get("federation", {})
    # Long runs are bounded by the aggregator's round deadlines, not by a fixed total.
    timeout_s = 600.0 + float(federation.get("rounds", 3)) * float(federation.get("round_timeout_s", 600))
    started = time.monotonic()
    result = run_simulation(workdir / "sim.toml", workdir, stream=stream, fresh=not resuming,
                            resume_rows=resume_rows, stop_after_s=max_seconds, timeout_s=timeout_s)
    record = {"method": method, "label": METHODS[method].label, "config_digest": digest,
              "wall_seconds": wall_before + time.monotonic() - started, **result.to_json()}
    if name == "compression":
        from experiments.compression import read_diagnostics

        # The sites' ef/* reports, kept in the record: the store stays behind in the work folder.
        record["diagnostics"] = read_diagnostics(workdir / "store")
    if not result.finished:
        atomic_write_text(partial_path, json.dumps(record, indent=1))
        stream.write(f"[{tag}] {method}: stopped after round {len(result.rows)} (time limit); "
                     "run the same command again to resume\n")
        return None
    atomic_write_text(saved, json.dumps(record, indent=1))
    partial_path.unlink(missing_ok=True)
    return record


def _tensor_sizes(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Entries per tensor, from a finished run's final model (for the coverage plot's labels)."""
    import codec

    for record in runs.values():
        path = record.get("final_model")
        if path and Path(path).exists():
            return {n: int(a.size) for n, a in codec.load_tensors(path).items()}
    return {}


def rows_of(record: Mapping[str, Any]) -> list[RoundRow]:
    fields = {f.name for f in dataclasses.fields(RoundRow)}
    return [RoundRow(**{k: v for k, v in row.items() if k in fields}) for row in record.get("rounds", [])]


def summarize(record: Mapping[str, Any]) -> dict[str, Any]:
    """A finished run's last-round metrics on the held-out set, bytes and weights.

    Keys: ``dice iou hd95 precision recall`` (class means), ``regions`` ({ET/TC/WT: {metric}},
    BraTS-like task only), ``mb_up_per_round``, ``mb_up_total``, ``mb_down_total``,
    ``ratio_vs_dense_fp32``, ``wall_seconds``, ``final_weights`` and ``final_update_norms`` (per site).
    """
    rows = rows_of(record)
    last = rows[-1]
    up = sum(r.bytes_up for r in rows)
    dense = sum(r.dense_bytes_up for r in rows)
    summary: dict[str, Any] = {
        "label": record["label"],
        **{k: last.global_metrics[k] for k in SEGMENTATION_METRIC_NAMES},
        "rounds": len(rows),
        "mb_up_per_round": up / len(rows) / 1e6,
        "mb_up_total": up / 1e6,
        "mb_down_total": sum(r.bytes_down for r in rows) / 1e6,
        "ratio_vs_dense_fp32": dense / up if up else 0.0,
        "wall_seconds": record["wall_seconds"],
        "final_weights": last.weights,
        "final_update_norms": last.update_norms,
    }
    regions = {
        region: {k.split("/", 1)[1]: v for k, v in last.global_metrics.items() if k.startswith(f"{region}/")}
        for region in REGIONS
    }
    if any(regions.values()):
        summary["regions"] = {region: values for region, values in regions.items() if values}
    return summary


def render_table(name: str, runs: Mapping[str, Mapping[str, Any]]) -> str:
    """The experiment's Markdown table: one row per method; BraTS region columns when measured."""
    summaries = {m: summarize(r) for m, r in runs.items()}
    regions = [g for g in REGIONS if any(g in s.get("regions", {}) for s in summaries.values())]
    cols = ["method", "Dice", "IoU", "HD95 mm", "precision", "recall",
            *(f"{g} Dice" for g in regions), *(f"{g} HD95 mm" for g in regions),
            "MB up/round", "MB up total", "× smaller than fp32", "wall s"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    lines = []
    for s in summaries.values():
        region_of = s.get("regions", {})
        cells = [
            s["label"], f"{s['dice']:.4f}", f"{s['iou']:.4f}", f"{s['hd95']:.2f}", f"{s['precision']:.4f}",
            f"{s['recall']:.4f}",
            *(f"{region_of.get(g, {}).get('dice', float('nan')):.4f}" for g in regions),
            *(f"{region_of.get(g, {}).get('hd95', float('nan')):.2f}" for g in regions),
            f"{s['mb_up_per_round']:.3f}", f"{s['mb_up_total']:.2f}", f"{s['ratio_vs_dense_fp32']:.1f}",
            f"{s['wall_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = ""
    if name == "faulty-site":
        note = "\nLast round's aggregation weights (and L2 norm of each site's update): " + "; ".join(
            f"{METHODS[m].label}: " + ", ".join(
                f"{site} {w:.3f} (‖Δ‖ {s['final_update_norms'].get(site, float('nan')):.3g})"
                for site, w in sorted(s["final_weights"].items()))
            for m, s in summaries.items()) + "\n"
    return f"## {name}\n\n" + head + "\n".join(lines) + "\n" + note


# ---------------------------------------------------------------------------------------------
# ``fedseg experiment``


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(EXPERIMENTS))
    parser.add_argument("--scale", choices=sorted(SCALES), default="demo",
                        help="demo: the built-in demo's size (CPU minutes); paper: 5 sites, 50 rounds (GPU hours); "
                             "generalization takes quick (its default) or full (64^3 at 3 mm)")
    parser.add_argument("--config", help="base simulation TOML (default: the built-in demo; generalization.toml "
                                         "for generalization)")
    parser.add_argument("--results", default="results", help="where results/NAME/ goes")
    parser.add_argument("--workdir", default="runs/experiments", help="where the runs' data, stores and logs go")
    parser.add_argument("--force", action="store_true", help="rerun methods that already have results")
    parser.add_argument("--methods", help="comma-separated methods of the experiment to run now (default: all); "
                        "the table shows every method with a finished run")
    parser.add_argument("--tabulate", action="store_true",
                        help="run nothing: write the table, summary and plots of the methods that have finished runs")
    parser.add_argument("--max-minutes", type=float, default=0,
                        help="stop after the round that passes this many minutes; the same command resumes (0: no limit)")


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if args.tabulate:
        methods = []
    max_seconds = 60 * args.max_minutes if args.max_minutes else None
    run_experiment(args.name, results_dir=Path(args.results), work_dir=Path(args.workdir), base_config=args.config,
                   scale=args.scale, force=args.force, methods=methods, max_seconds=max_seconds)
    return 0
