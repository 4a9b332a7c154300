"""``fedseg simulate``: a whole federation on one machine, with the real services.

It generates the sites' NIfTI folders (``sitedata.py``), writes the initial global model, starts
one ``aggregator-service`` process and one ``client-agent`` process per site talking gRPC over
loopback — the same entry points Kubernetes starts as pods — and watches the aggregator through
its public RPCs. After each round it downloads the new global model and evaluates it on the
held-out test set, then prints a row: each site's local Dice, the global Dice, bytes moved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from aggregator_service.config import FederationConfig, parse_federation_config, read_config_tables
from aggregator_service.launcher import AggregatorProcess
from client_agent.init_model import write_initial_model
from codec import atomic_write_text
from protos.fedsegnet.v1.local_metrics import SEGMENTATION_METRIC_NAMES

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "demo.toml"

FAULTS = ("label_noise", "scaled_update")
GENERATORS = ("profile", "synth")
# How each generated task's labels become the model's classes, at the sites and at the held-out
# evaluation alike: BraTS stores 0/1/2/4, the model predicts 0-3 (client_agent.data.LABEL_PRESETS).
TASK_LABEL_MAPS: dict[str, str | None] = {"tissue": None, "brats": "brats_regions"}


@dataclass(frozen=True)
class SimulationSettings:
    """The ``[simulation]`` section: how the sites' data are made."""

    sites: int = 3
    cases_per_site: tuple[int, ...] = (6, 4, 8)
    test_cases: int = 4
    size: int = 48
    spacing_mm: float = 2.0
    task: str = "tissue"
    seed: int = 0
    # "profile": deformed copies of MNI152 under fixed scanner profiles (sitedata.py);
    # "synth": SynthSeg-style domain randomization from its tissue maps (synth.py; tissue task only).
    generator: str = "profile"
    threads_per_site: int = 0  # 0: share the machine's cores among the sites
    # Centralized baseline: one site holding every site's cases (same code path, one agent).
    pool_sites: bool = False
    # Faulty-site scenario: site number k (1-based; 0: none) misbehaves in the way ``fault`` says:
    # "label_noise" (its labels get noise) or "scaled_update" (its agent multiplies every update
    # it uploads by ``update_scale``; experiments/faulty_agent.py).
    faulty_site: int = 0
    fault: str = "label_noise"
    label_noise: float = 0.6  # fraction of its foreground voxels relabelled at random
    update_scale: float = 10.0  # e.g. 10 (a blown-up update) or -5 (sign-flipped and amplified)

    def __post_init__(self) -> None:
        if self.sites < 1:
            raise ValueError(f"simulation.sites must be >= 1, got {self.sites}")
        if not 0 <= self.faulty_site <= self.sites:
            raise ValueError(f"simulation.faulty_site must be in [0, {self.sites}], got {self.faulty_site}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"simulation.label_noise must be in [0, 1], got {self.label_noise}")
        if self.fault not in FAULTS:
            raise ValueError(f"simulation.fault must be one of {list(FAULTS)}, got {self.fault!r}")
        if not (math.isfinite(self.update_scale) and self.update_scale != 0):
            raise ValueError(f"simulation.update_scale must be a finite non-zero number, got {self.update_scale}")
        if self.task not in TASK_LABEL_MAPS:
            raise ValueError(f"simulation.task must be one of {sorted(TASK_LABEL_MAPS)}, got {self.task!r}")
        if self.generator not in GENERATORS:
            raise ValueError(f"simulation.generator must be one of {list(GENERATORS)}, got {self.generator!r}")
        if self.generator == "synth" and self.task != "tissue":
            raise ValueError(f"simulation.generator = \"synth\" makes tissue cases only, not task {self.task!r}")
        object.__setattr__(self, "cases_per_site", tuple(int(n) for n in self.cases_per_site))


def load_simulation_config(path: str | Path | None = None) -> tuple[SimulationSettings, FederationConfig, str]:
    """Read a simulation TOML (``[simulation]`` plus the federation's sections); None: the built-in demo."""
    if path is None:
        text = resources.files("experiments.configs").joinpath(DEFAULT_CONFIG).read_text()
        source = f"built-in {DEFAULT_CONFIG}"
    else:
        text = Path(path).read_text()
        source = str(path)
    data = read_config_tables(text=text, source=source)
    sim_data = dict(data.pop("simulation", {}))
    allowed = {f.name for f in dataclasses.fields(SimulationSettings)}
    unknown = set(sim_data) - allowed
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)} in [simulation]; allowed: {sorted(allowed)}")
    if isinstance(sim_data.get("cases_per_site"), int):
        sim_data["cases_per_site"] = [sim_data["cases_per_site"]] * int(sim_data.get("sites", 3))
    sim = SimulationSettings(**sim_data)
    if sim.pool_sites:
        data.setdefault("federation", {}).update(sites=["pooled"], min_clients=1, max_clients=1)
    if sim.generator == "synth":
        # Randomized cases are written at exactly spacing_mm on the img_size grid: the model file's
        # configuration records that spacing, so `fedseg segment` resamples scans to it.
        data.setdefault("model", {}).setdefault("spacing_mm", float(sim.spacing_mm))
    federation = parse_federation_config(data, source=source, extensions=("simulation",))
    if not federation.sites:
        federation = dataclasses.replace(federation, sites=tuple(f"site-{i + 1}" for i in range(sim.sites)))
    if not sim.pool_sites and len(federation.sites) != sim.sites:
        raise ValueError(f"{source}: federation.sites lists {len(federation.sites)} sites, simulation.sites is {sim.sites}")
    sections = {k: dict(v) for k, v in data.items()}
    sections.setdefault("federation", {})["sites"] = list(federation.sites)
    return sim, federation, dump_toml(sections)


def dump_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Tables of scalars, arrays and sub-tables as TOML (tomllib reads but cannot write)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    def table(name: str, body: Mapping[str, Any]) -> None:
        lines.append(f"[{name}]")
        nested = {k: v for k, v in body.items() if isinstance(v, Mapping)}
        for k, v in body.items():
            if k not in nested:
                lines.append(f"{k} = {value(v)}")
        lines.append("")
        for k, v in nested.items():
            table(f"{name}.{k}", v)

    for name, body in sections.items():
        table(name, body)
    return "\n".join(lines)


def generate_site_data(sim: SimulationSettings, out: Path) -> Any:
    """The sites' and the held-out folders, made by ``sim.generator`` (reused when already there)."""
    if sim.generator == "synth":
        from experiments.synth import generate_synth_federation

        return generate_synth_federation(out, sites=sim.sites, cases_per_site=sim.cases_per_site,
                                         test_cases=sim.test_cases, size=sim.size, spacing_mm=sim.spacing_mm,
                                         seed=sim.seed)
    from experiments.sitedata import generate_federation

    return generate_federation(out, sites=sim.sites, cases_per_site=sim.cases_per_site, test_cases=sim.test_cases,
                               size=sim.size, spacing_mm=sim.spacing_mm, seed=sim.seed, task=sim.task)


def prepare_site_dirs(data: Any, sim: SimulationSettings, out: Path) -> tuple[Path, ...]:
    """The folders the agents read: the generated sites, pooled into one, or with one faulty site."""
    if sim.pool_sites:
        return (_pool(data.site_dirs, out / "pooled"),)
    if sim.faulty_site and sim.fault == "label_noise":
        dirs = list(data.site_dirs)
        k = sim.faulty_site - 1
        dirs[k] = _with_label_noise(dirs[k], out / f"{dirs[k].name}-noisy", sim.label_noise, sim.seed, data.num_classes)
        return tuple(dirs)
    return tuple(data.site_dirs)


def _pool(site_dirs: Sequence[Path], dest: Path) -> Path:
    """One MSD folder that links every site's cases (case names are unique per site)."""
    shutil.rmtree(dest, ignore_errors=True)
    training = []
    meta: dict[str, Any] = {}
    for site in site_dirs:
        meta = json.loads((site / "dataset.json").read_text())
        for entry in meta["training"]:
            for key in ("image", "label"):
                src = (site / entry[key]).resolve()
                link = dest / Path(entry[key]).parent.name / src.name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(src)
            training.append(entry)
    meta.update(name="pooled", training=training, numTraining=len(training))
    (dest / "dataset.json").write_text(json.dumps(meta, indent=1))
    return dest


def _with_label_noise(site: Path, dest: Path, fraction: float, seed: int, num_classes: int) -> Path:
    """A copy of a site whose labels have ``fraction`` of their foreground relabelled at random."""
    import nibabel as nib
    import numpy as np

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(site, dest)
    rng = np.random.default_rng(seed + 7919)
    for path in sorted((dest / "labelsTr").glob("*.nii.gz")):
        img: Any = nib.load(str(path))  # a NIfTI image: nibabel types it as the base class
        label = np.asarray(img.dataobj).copy()
        foreground = np.flatnonzero(label > 0)
        chosen = rng.choice(foreground, size=int(fraction * foreground.size), replace=False)
        label.flat[chosen] = rng.integers(1, num_classes, size=chosen.size)
        nib.save(nib.Nifti1Image(label.astype(img.get_data_dtype()), img.affine, img.header), str(path))
    return dest


def agent_argv(sim: SimulationSettings, index: int) -> list[str]:
    """The program that runs site number ``index`` (0-based): the real agent, or for the faulty
    site of a ``scaled_update`` scenario the same agent behind the scaling wrapper."""
    if sim.faulty_site == index + 1 and sim.fault == "scaled_update":
        return [sys.executable, "-m", "experiments.faulty_agent", "--update-scale", repr(float(sim.update_scale))]
    return [sys.executable, "-m", "client_agent.cli"]


def task_agent_args(task: str) -> list[str]:
    """Options every agent of a ``task`` federation needs (the label map of its label values)."""
    label_map = TASK_LABEL_MAPS[task]
    return ["--label-map", label_map] if label_map else []


@dataclass
class RoundRow:
    round_id: int
    site_dice: dict[str, float]
    global_metrics: dict[str, float]
    bytes_up: int
    bytes_down: int
    weights: dict[str, float]
    seconds: float
    train_loss: float = float("nan")
    dense_bytes_up: int = 0  # what the same updates cost as dense fp32 (the baseline of the ratio)
    update_norms: dict[str, float] = field(default_factory=dict)  # L2 norm of each site's decoded update


@dataclass
class SimulationResult:
    rows: list[RoundRow] = field(default_factory=list)
    workdir: Path = Path(".")
    seconds: float = 0.0
    final_model: Path | None = None
    finished: bool = True  # False: stopped early (stop_after_s); the workdir can resume it
    # The final model on each installed real scan (experiments/realscan.py): brain, CSF, GM, WM Dice.
    real_scans: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "finished": self.finished,
            "final_model": str(self.final_model) if self.final_model else None,
            "real_scans": self.real_scans,
            "rounds": [dataclasses.asdict(r) for r in self.rows],
        }


class _Processes:
    """The federation's processes; everything started is stopped on exit, logs kept in ``logs/``."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        logdir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        logfile = open(self.logdir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, env=dict(env))
        logfile.close()
        self.procs[name] = proc
        return proc

    def add(self, name: str, proc: subprocess.Popen[bytes] | None) -> None:
        """Watch and stop a process started elsewhere (its log is ``logs/NAME.log`` too)."""
        assert proc is not None
        self.procs[name] = proc

    def tail(self, name: str, lines: int = 20) -> str:
        text = (self.logdir / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def check(self, names: list[str]) -> None:
        """Raise if one of ``names`` exited with an error."""
        for name in names:
            code = self.procs[name].poll()
            if code not in (None, 0):
                raise RuntimeError(f"{name} exited with code {code}; last lines of its log:\n{self.tail(name)}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class GlobalEvaluator:
    """Evaluates a global model file on the held-out test folder (the same preprocessing as sites).

    For the BraTS-like task it also scores the BraTS regions (ET, TC, WT), returned flat as
    ``"ET/dice"``, ``"ET/hd95"``, … beside the class means.
    """

    def __init__(self, config: FederationConfig, test_dir: Path, cache_dir: Path, *, task: str = "tissue") -> None:
        from client_agent.data import (
            NiftiSegDataset,
            PreprocessConfig,
            VolumeCache,
            discover_cases,
            regions_from_labels,
            resolve_label_map,
        )

        self.config = config
        label_map = TASK_LABEL_MAPS[task]
        self.region_fn = regions_from_labels if label_map == "brats_regions" else None
        cache = VolumeCache(
            config=PreprocessConfig(spatial_size=config.model.img_size, spacing_mm=config.model.spacing_mm),
            label_map=resolve_label_map(label_map),
            num_classes=config.model.out_channels,
            cache_dir=cache_dir,
        )
        self.dataset = NiftiSegDataset(discover_cases(test_dir), cache=cache)
        import torch

        # On a GPU machine (paper scale) the held-out evaluation of every round's model uses it too.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def __call__(self, model_path: Path) -> dict[str, float]:
        import numpy as np
        import torch

        import codec
        from client_agent.training import evaluate
        from model import build_model

        m = self.config.model
        net = build_model(m.architecture, in_channels=m.in_channels, out_channels=m.out_channels,
                          img_size=m.img_size, **dict(m.options))
        arrays = codec.load_tensors(model_path)
        if set(arrays) != set(net.state_dict()):
            raise ValueError(f"{model_path}: its tensors differ from the configured {m.architecture}'s: "
                             f"{sorted(set(arrays) ^ set(net.state_dict()))[:5]}")
        net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
        scores = evaluate(net, self.dataset, device=self.device, num_classes=m.out_channels,
                          region_fn=self.region_fn, roi_size=m.patch_size or None)
        out = {k: float(scores[k]) for k in SEGMENTATION_METRIC_NAMES}
        for region, values in scores.get("regions", {}).items():
            out.update({f"{region}/{k}": float(values[k]) for k in SEGMENTATION_METRIC_NAMES if k in values})
        return out


@dataclass
class _Run:
    """What the steps of one simulation share: settings, paths, processes and the result so far."""

    sim: SimulationSettings
    federation: FederationConfig
    workdir: Path
    stream: TextIO
    started: float
    procs: _Processes
    result: SimulationResult
    agents: list[str] = field(default_factory=list)

    @property
    def store(self) -> Path:
        return self.workdir / "store"


def _prepare_workdir(workdir: Path, federation_toml: str, *, fresh: bool) -> None:
    if fresh:
        for sub in ("store", "states", "logs", "models"):
            shutil.rmtree(workdir / sub, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "federation.toml").write_text(federation_toml)


def _prepare_data(run: _Run) -> tuple[Any, tuple[Path, ...], Path]:
    """The sites' data (generated, then prepared for the scenario) and the initial model."""
    from experiments.sitedata import describe

    sim = run.sim
    data = generate_site_data(sim, run.workdir / "data")
    run.stream.write(describe(data) + "\n")
    site_dirs = prepare_site_dirs(data, sim, run.workdir / "data-prepared")
    initial = write_initial_model(run.federation, run.workdir / "models" / "initial.frames")
    return data, site_dirs, initial


def _process_env(sim: SimulationSettings, n_sites: int) -> dict[str, str]:
    threads = sim.threads_per_site or max(1, (os.cpu_count() or 1) // n_sites)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def _start_processes(
    run: _Run, site_dirs: Sequence[Path], initial: Path, env: Mapping[str, str],
    extra_agent_args: Mapping[str, list[str]] | None,
) -> str:
    """Start the aggregator, wait until it serves, then one client agent per site; returns its target."""
    aggregator = AggregatorProcess(
        config=run.workdir / "federation.toml", store=run.store, initial_model=initial,
        log_path=run.procs.logdir / "aggregator.log", port_file=run.workdir / "aggregator.port",
        metrics_listen="127.0.0.1:0", env=env,
        start_timeout_s=60,  # --insecure (the launcher's default): loopback only; SECURITY.md
    ).start()
    run.procs.add("aggregator", aggregator.proc)
    target = aggregator.target
    run.stream.write(f"aggregator serving on {target} (store {run.store})\n")
    for index, (site, site_dir) in enumerate(zip(run.federation.sites, site_dirs, strict=True)):
        name = f"agent-{site}"
        run.procs.start(name, [
            *agent_argv(run.sim, index), "--data", str(site_dir), "--aggregator", target,
            "--site", site, "--state-dir", str(run.workdir / "states" / site),
            "--cache-dir", str(run.workdir / "cache" / site), "--log-format", "json",
            *task_agent_args(run.sim.task), *(extra_agent_args or {}).get(site, []),
        ], env)
        run.agents.append(name)
    run.stream.write(f"{len(run.agents)} client agents started; logs in {run.procs.logdir}\n\n")
    return target


def _round_row(
    run: _Run, client: Any, round_id: int, evaluator: GlobalEvaluator, dense_model_bytes: int, last: float
) -> tuple[RoundRow, float]:
    """Round ``round_id``'s row: its metrics from the aggregator, its result model scored on the held-out set.

    ``seconds`` runs from ``last`` to the download of the round's result (returned as the next ``last``).
    """
    from protos.fedsegnet.v1 import aggregator_pb2 as pb

    metrics = client.stub.GetRoundMetrics(pb.GetRoundMetricsRequest(round_id=round_id), timeout=30)
    model_path = run.workdir / "models" / f"global-{round_id + 1:04d}.frames"
    client.download(round_id + 1, "simulate", model_path)
    now = time.monotonic()
    run.result.final_model = model_path
    return RoundRow(
        round_id=round_id,
        site_dice={s.site: s.metrics.dice for s in metrics.sites},
        global_metrics=evaluator(model_path),
        bytes_up=sum(s.bytes_uploaded for s in metrics.sites),
        bytes_down=sum(s.bytes_downloaded for s in metrics.sites),
        weights={s.site: s.weight for s in metrics.sites},
        seconds=now - last,
        train_loss=metrics.aggregate.train_loss,
        dense_bytes_up=len(metrics.sites) * dense_model_bytes,
        update_norms={s.site: s.update_norm for s in metrics.sites},
    ), now


def _watch_rounds(
    run: _Run, target: str, evaluator: GlobalEvaluator, initial: Path, *, resumed: int, timeout_s: float,
    stop_after_s: float | None,
) -> None:
    """Print a row per closed round until the federation finishes (or the time limit stops it)."""
    from client_agent.transport import AggregatorClient
    from protos.fedsegnet.v1 import aggregator_pb2 as pb

    client = AggregatorClient(target)
    dense_model_bytes = _dense_bytes(initial)
    header = _table_header(run.federation.sites)
    run.stream.write(header + "\n" + "|" + "---|" * (header.count("|") - 1) + "\n")
    reported = resumed
    last = time.monotonic()
    while True:
        run.procs.check(["aggregator", *run.agents])
        status = client.stub.GetStatus(pb.GetStatusRequest(), timeout=30)
        while reported < status.rounds_completed:
            reported += 1
            row, last = _round_row(run, client, reported, evaluator, dense_model_bytes, last)
            run.result.rows.append(row)
            run.stream.write(_table_row(row, run.federation.sites) + "\n")
            run.stream.flush()
        if status.round.state == pb.ROUND_STATE_FINISHED and reported >= status.rounds_completed:
            break
        if stop_after_s is not None and time.monotonic() - run.started > stop_after_s and reported > resumed:
            run.result.finished = False
            run.stream.write(f"stopping after round {reported} (time limit of {stop_after_s:.0f}s)\n")
            break
        if time.monotonic() - run.started > timeout_s:
            raise RuntimeError(f"the simulation did not finish within {timeout_s:.0f}s")
        time.sleep(0.5)
    client.close()


def run_simulation(
    config_path: str | Path | None,
    workdir: Path,
    *,
    stream: TextIO = sys.stdout,
    fresh: bool = True,
    extra_agent_args: Mapping[str, list[str]] | None = None,
    timeout_s: float = 3600,
    resume_rows: Sequence[RoundRow] = (),
    stop_after_s: float | None = None,
) -> SimulationResult:
    """Run a federation to its end and return one row per round (also printed as they close).

    To run a long federation in parts: ``stop_after_s`` stops every process after the first round
    that closes past that many seconds (``result.finished`` is then False); a later call with
    ``fresh=False`` and the rows returned so far as ``resume_rows`` restarts the aggregator on its
    store and the agents on their states, and goes on from the next round.
    """
    if resume_rows and fresh:
        raise ValueError("resume_rows needs fresh=False: resuming keeps the store and the site states")
    started = time.monotonic()
    sim, federation, federation_toml = load_simulation_config(config_path)
    workdir = workdir.resolve()
    _prepare_workdir(workdir, federation_toml, fresh=fresh)
    run = _Run(sim=sim, federation=federation, workdir=workdir, stream=stream, started=started,
               procs=_Processes(workdir / "logs"), result=SimulationResult(workdir=workdir, rows=list(resume_rows)))
    data, site_dirs, initial = _prepare_data(run)
    env = _process_env(sim, len(site_dirs))
    evaluator = GlobalEvaluator(federation, data.test_dir, workdir / "cache" / "test", task=sim.task)
    try:
        target = _start_processes(run, site_dirs, initial, env, extra_agent_args)
        _watch_rounds(run, target, evaluator, initial, resumed=len(resume_rows), timeout_s=timeout_s,
                      stop_after_s=stop_after_s)
        if run.result.finished:
            for name in run.agents:
                run.procs.procs[name].wait(timeout=60)
            run.procs.check(run.agents)
    finally:
        run.procs.stop_all()
    result = run.result
    if result.finished and result.final_model is not None and sim.task == "tissue" and result.rows:
        result.real_scans = score_real_scans(federation, sim.spacing_mm, result.final_model, workdir / "real-scans",
                                             held_out_dice=result.rows[-1].global_metrics["dice"], stream=stream)
    result.seconds = time.monotonic() - started
    atomic_write_text(workdir / "summary.json", json.dumps(result.to_json(), indent=1))
    return result


def score_real_scans(config: FederationConfig, spacing_mm: float, model_path: Path, figure_dir: Path, *,
                     held_out_dice: float | None = None, tag: str = "final", stream: TextIO = sys.stdout,
                     ) -> dict[str, dict[str, float]]:
    """Score a global model on the installed real scans, print it beside the held-out Dice, draw PNGs."""
    from experiments import realscan

    if not realscan.available_real_scans():
        stream.write(f"real scans: {realscan.missing_scan_hint()}\n")
        return {}
    net = realscan.load_federation_model(model_path, config)
    scores = realscan.evaluate_on_real_scans(net, spacing_mm=spacing_mm, size=config.model.img_size,
                                             figure_dir=figure_dir, tag=tag, roi_size=config.model.patch_size or None)
    held = "" if held_out_dice is None else f"held-out Dice {held_out_dice:.4f} | "
    stream.write(f"{tag} global model: {held}real scan (Dice at its native grid vs a 3-class intensity "
                 f"reference) {realscan.summary_line(scores)} | figures in {figure_dir}\n")
    return scores


def _dense_bytes(model_path: Path) -> int:
    import codec

    return sum(4 * a.size for a in codec.load_tensors(model_path).values())


def _table_header(sites: tuple[str, ...]) -> str:
    cols = ["round", *(f"{s} local Dice" for s in sites), "global Dice (held-out)", "global HD95 mm",
            "MB up", "× smaller than fp32", "MB down", "s"]
    return "| " + " | ".join(cols) + " |"


def _table_row(row: RoundRow, sites: tuple[str, ...]) -> str:
    cols = [str(row.round_id), *(f"{row.site_dice.get(s, float('nan')):.4f}" for s in sites),
            f"{row.global_metrics['dice']:.4f}", f"{row.global_metrics['hd95']:.2f}",
            f"{row.bytes_up / 1e6:.3f}", f"{row.dense_bytes_up / max(row.bytes_up, 1):.1f}",
            f"{row.bytes_down / 1e6:.3f}", f"{row.seconds:.1f}"]
    return "| " + " | ".join(cols) + " |"


# ---------------------------------------------------------------------------------------------
# ``fedseg simulate``


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="simulation TOML ([simulation] + federation sections); default: the built-in demo")
    parser.add_argument("--workdir", default="runs/demo", help="where data, store, states, logs and models go")
    parser.add_argument("--resume", action="store_true", help="keep the store and site states of an earlier run")


def run(args: argparse.Namespace) -> int:
    from experiments.plots import plot_runs

    result = run_simulation(args.config, Path(args.workdir), fresh=not args.resume)
    plots = plot_runs({"this run": result.rows}, result.workdir / "plots") if result.rows else []
    last = result.rows[-1] if result.rows else None
    print()
    if last is not None:
        print(f"final global Dice on the held-out set: {last.global_metrics['dice']:.4f} "
              f"(HD95 {last.global_metrics['hd95']:.2f} mm) after {last.round_id} rounds")
    total_up = sum(r.bytes_up for r in result.rows)
    total_down = sum(r.bytes_down for r in result.rows)
    print(f"bytes moved: {total_up / 1e6:.2f} MB up, {total_down / 1e6:.2f} MB down; {result.seconds:.0f}s in all")
    print(f"summary: {result.workdir / 'summary.json'}; final model: {result.final_model}; logs: {result.workdir / 'logs'}")
    if plots:
        print(f"plots: {', '.join(str(p) for p in plots)}")
    return 0
